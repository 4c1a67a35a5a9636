"""Real distributed engines on loopback: a Dask cluster and Beam's portable runner.

Each engine runs in processes of its own, started and stopped here: a `dask scheduler`
with two `dask worker` processes (one thread each), and a portable job service
(`pipelines.job_service`: Beam's, with `--sdk_worker_parallelism` honoured) with an
external worker pool (the path Flink and Spark use for Python workers). Every run is
compared with an in-process run of the same job: same rows, same values, same
`errors.jsonl`, same manifest counts. A Dask worker SIGKILLs itself after staging a part
(`BEAM_ENRICH_KILL_AT`, see `transforms.staging._kill_point`), so the kill lands at the
same point on every machine; waits are on process output and Dask's own events, never
on sleeps.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from tests.conftest import SAMPLE_DATA, read_local_parts, sentiment_ner_spec

distributed = pytest.importorskip("distributed")

START_TIMEOUT_S = 120
_JOB_SERVICE = "pipelines.job_service"
_WORKER_POOL = "apache_beam.runners.worker.worker_pool_main"
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    # One torch thread per worker process: two workers share two cores.
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }


class _Service:
    """A process whose output is drained by a thread and searched for lines."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        for line in self.process.stdout:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    def wait_for(self, pattern: str) -> re.Match:
        """The first output line matching `pattern`; fails when the process exits first."""
        found = None

        def seen() -> bool:
            nonlocal found
            found = next(filter(None, (re.search(pattern, line) for line in self.lines)), None)
            return found is not None or self.process.poll() is not None

        with self._new_line:
            self._new_line.wait_for(seen, timeout=START_TIMEOUT_S)
        assert found is not None, f"{pattern!r} not in output:\n{''.join(self.lines)[-3000:]}"
        return found

    def stop(self) -> int:
        # Nothing to save in these test services: SIGKILL is the fast way down.
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _DaskCluster:
    """A scheduler on a free loopback port; workers added with `add_worker`."""

    def __init__(self):
        self.scheduler = _Service(
            [
                str(BIN / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
            ],
            _env(),
        )
        self.address = self.scheduler.wait_for(r"Scheduler at:\s+(tcp://\S+)")[1]
        self.workers: list[_Service] = []

    def add_worker(self, *extra: str, **env: str) -> _Service:
        worker = _Service(
            [
                str(BIN / "dask"),
                "worker",
                self.address,
                "--nthreads",
                "1",
                "--no-nanny",  # a killed worker stays dead: Dask reruns its tasks elsewhere
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                *extra,
            ],
            _env(**env),
        )
        self.workers.append(worker)
        return worker

    def wait_for_workers(self, count: int) -> None:
        with distributed.Client(self.address, timeout=START_TIMEOUT_S) as client:
            client.wait_for_workers(count, timeout=START_TIMEOUT_S)

    def stop(self) -> None:
        for service in [*self.workers, self.scheduler]:
            service.stop()


@pytest.fixture(scope="module")
def dask_cluster():
    cluster = _DaskCluster()
    try:
        cluster.add_worker()
        cluster.add_worker()
        cluster.wait_for_workers(2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def job_service():
    """A portable job service: runs jobs on `--sdk_worker_parallelism` SDK workers of a
    worker pool (Beam's own runs one whatever the job asks)."""
    service = _Service(
        [sys.executable, "-m", _JOB_SERVICE, "--port", "0"],
        _env(),
    )
    try:
        port = service.wait_for(r"Listening for beam jobs on port (\d+)")[1]
        yield f"localhost:{port}"
    finally:
        service.stop()


def _worker_pool(env: dict[str, str]) -> tuple[_Service, str]:
    port = _free_port()
    pool = _Service(
        [sys.executable, "-m", _WORKER_POOL, "--service_port", str(port)],
        env,
    )
    pool.wait_for(rf"Started worker pool servicer at port: \S+:{port}")
    return pool, f"localhost:{port}"


@pytest.fixture(scope="module")
def worker_pool():
    """An external worker pool whose `python` (found on PATH) has beam-enrich."""
    pool, address = _worker_pool(_env())
    try:
        yield address
    finally:
        pool.stop()


def _inputs(folder: Path) -> list[Path]:
    """Two Parquet files; the first of six row groups, so that it splits into work items.

    One blank text fails a row, so `errors.jsonl` is compared too.
    """
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet")
    texts = table.column("text").to_pylist()
    texts[7] = "   "
    table = table.set_column(table.schema.get_field_index("text"), "text", [texts])
    folder.mkdir()
    paths = [folder / "a.parquet", folder / "b.parquet"]
    pq.write_table(table.slice(0, 48), paths[0], row_group_size=8)
    pq.write_table(table.slice(48), paths[1])
    return paths


def _job(tmp_path: Path, models: dict) -> list[str]:
    inputs = _inputs(tmp_path / "in")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(sentiment_ner_spec(models)))  # JSON is YAML
    # Work items of one row group each: the first file alone spreads over the workers.
    return [
        *(f"--input={path}" for path in inputs),
        f"--spec={spec}",
        "--work-item-mb=0.000001",
    ]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_models) -> list[str]:
    """The job every engine runs: its flags but `--output` (inputs, spec)."""
    return _job(tmp_path_factory.mktemp("job"), tiny_models)


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory) -> Path:
    """The job's output from an in-process run (FnApiRunner)."""
    output = tmp_path_factory.mktemp("reference") / "in-process"
    assert main([*job, f"--output={output}", "--quiet"]) == 0
    return output


def _assert_same_output(output: Path, reference: Path) -> None:
    got, want = read_local_parts(output).sort_by("id"), read_local_parts(reference).sort_by("id")
    assert got.num_rows == want.num_rows == 71
    assert got.column_names == want.column_names
    for name in ("id", "text", "sentiment_label", "enrich_errors"):
        assert got.column(name).to_pylist() == want.column(name).to_pylist()
    scores = zip(*(t.column("sentiment_score").to_pylist() for t in (got, want)), strict=True)
    for score, expected in scores:
        assert score == expected or math.isclose(score, expected, abs_tol=1e-4)
    for row, expected in zip(
        got.column("entities").to_pylist(), want.column("entities").to_pylist(), strict=True
    ):
        assert [{**e, "score": round(e["score"], 4)} for e in row or []] == [
            {**e, "score": round(e["score"], 4)} for e in expected or []
        ]
    errors = (output / "errors.jsonl").read_text().splitlines()
    assert len(errors) == len(set(errors)) == 2  # the blank row, once per task
    assert sorted(errors) == sorted((reference / "errors.jsonl").read_text().splitlines())
    manifest = json.loads((output / "manifest.json").read_text())
    expected = json.loads((reference / "manifest.json").read_text())
    assert manifest["rows"] == expected["rows"]
    counts = ("name", "rows", "succeeded", "failed")
    assert [{k: t[k] for k in counts} for t in manifest["tasks"]] == [
        {k: t[k] for k in counts} for t in expected["tasks"]
    ]


def _model_loads(summary: str) -> dict[str, int]:
    found = re.search(r"model loads per task: ([^;]+);", summary)
    assert found, summary
    return {task: int(n) for task, n in (item.split() for item in found[1].split(", "))}


def test_a_dask_cluster_gives_the_in_process_output(tmp_path, job, reference, dask_cluster, capsys):
    """Two worker processes share the work; each loads each model once, not per partition."""
    output = tmp_path / "dask"
    argv = [*job, f"--output={output}", "--runner=dask"]
    assert main([*argv, "--dask_client_address", dask_cluster.address]) == 0
    _assert_same_output(output, reference)
    captured = capsys.readouterr()
    assert "Discarding unparseable args" not in captured.err
    # Progress from the job's Beam metrics: the workers cannot write to the driver's disk.
    assert "beam-enrich: progress: sentiment: 71/71 rows, 1 failed" in captured.err
    # Both workers enriched rows (the file's items spread); Beam's DaskRunner sets DoFns
    # up for each of its many partitions, but each process loaded each model once.
    assert _model_loads(captured.out) == {"sentiment": 2, "entities": 2}
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["runner"] == "pipelines.dask_runner.DaskRunner"
    assert {t["name"]: t["model_loads"] for t in manifest["tasks"]} == {
        "sentiment": 2,
        "entities": 2,
    }


def test_a_dask_worker_killed_mid_run(tmp_path, job, reference):
    """A worker SIGKILLed after staging a part: Dask reruns what it lost on another one;
    every row is there once, `errors.jsonl` has no duplicate, values are unchanged.

    The doomed worker starts alone, so it surely reaches its second staged part whatever
    the machine's speed; the healthy worker joins once it is dead, and the scheduler hands
    it the lost and the remaining work items.
    """
    cluster = _DaskCluster()
    doomed = cluster.add_worker(BEAM_ENRICH_KILL_AT="staged:2")
    died: list[int] = []

    def replace_when_dead() -> None:
        died.append(doomed.process.wait())
        cluster.add_worker()

    replacer = threading.Thread(target=replace_when_dead, daemon=True)
    try:
        cluster.wait_for_workers(1)
        replacer.start()
        output = tmp_path / "dask"
        argv = [*job, f"--output={output}", "--runner=DaskRunner", "--quiet"]
        assert main([*argv, f"--dask_client_address={cluster.address}"]) == 0
        assert died == [-signal.SIGKILL]
    finally:
        doomed.stop()
        if replacer.ident is not None:  # started: it adds its worker, then ends
            replacer.join()
        cluster.stop()
    _assert_same_output(output, reference)


def test_dask_workers_that_cannot_start_fail_the_run_in_bounded_time(tmp_path, job, capsys, caplog):
    """No worker at all, then one whose Python lacks beam-enrich: one line each, exit 2."""
    cluster = _DaskCluster()
    try:
        argv = [*job, f"--output={tmp_path / 'out'}", "--runner=dask"]
        argv += [f"--dask_client_address={cluster.address}", "--worker_start_timeout_s=2"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"waiting for Dask workers at {cluster.address} (up to 2 s)" in caplog.text
        assert f"no Dask worker joined the scheduler at {cluster.address} within 2 s" in err

        # The preload hides beam-enrich's packages, as a Python without it would.
        hide = tmp_path / "hide_beam_enrich.py"
        hide.write_text("import sys\nsys.modules['pipelines'] = sys.modules['transforms'] = None\n")
        cluster.add_worker("--preload", str(hide))
        cluster.wait_for_workers(1)
        assert main(argv) == 2
        (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
        assert re.fullmatch(
            r"beam-enrich: error: Dask worker tcp://\S+ cannot import beam-enrich; install "
            r"beam-enrich\[dask\] in the workers' Python environment",
            line,
        )
    finally:
        cluster.stop()
    assert not (tmp_path / "out").exists()


def test_a_crash_in_setup_on_a_dask_worker_fails_the_run(tmp_path, job, capsys):
    """The driver reports the worker's error and returns; it does not wait on the cluster."""
    # The preload makes every model load on this worker raise, as a broken model would.
    crash = tmp_path / "crash_in_setup.py"
    crash.write_text(
        "import transforms.enrich\n"
        "def load_task(task):\n"
        "    raise RuntimeError('model load crashed on the worker')\n"
        "transforms.enrich.load_task = load_task\n"
    )
    cluster = _DaskCluster()
    try:
        cluster.add_worker("--preload", str(crash))
        cluster.wait_for_workers(1)
        argv = [*job, f"--output={tmp_path / 'out'}", "--runner=dask", "--quiet"]
        assert main([*argv, f"--dask_client_address={cluster.address}"]) == 1
    finally:
        cluster.stop()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(
        "beam-enrich: error: the run failed (RuntimeError: model load crashed on the worker)"
    )
    assert not (tmp_path / "out").exists()


def test_the_portable_runner_gives_the_in_process_output(
    tmp_path, job, reference, job_service, worker_pool
):
    """Two SDK workers of the pool share the work; each loads each model once.

    The stage that reads and enriches work items gets its input from a reshuffle: its 7
    work items (random keys) are dealt to the two workers in turn, so both enrich rows.
    """
    output = tmp_path / "portable"
    argv = [*job, f"--output={output}", "--runner=PortableRunner", "--quiet"]
    argv += [f"--job_endpoint={job_service}", "--environment_type=EXTERNAL"]
    argv += [f"--environment_config={worker_pool}", "--sdk_worker_parallelism=2"]
    assert main(argv) == 0
    _assert_same_output(output, reference)
    manifest = json.loads((output / "manifest.json").read_text())
    assert {t["name"]: t["model_loads"] for t in manifest["tasks"]} == {
        "sentiment": 2,
        "entities": 2,
    }
    reference_manifest = json.loads((reference / "manifest.json").read_text())
    assert [t["model_loads"] for t in reference_manifest["tasks"]] == [1, 1]


def test_a_worker_pool_without_apache_beam_fails_the_run_in_bounded_time(
    tmp_path, job, job_service, capsys
):
    """The pool starts `python` from its PATH; that one cannot import apache_beam."""
    bare = tmp_path / "bare-python"
    bare.mkdir()
    # -S: no site-packages, so no apache_beam, as in a Python where it is not installed.
    (bare / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    (bare / "python").chmod(0o755)
    pool, address = _worker_pool({**_env(), "PATH": f"{bare}{os.pathsep}{os.environ['PATH']}"})
    try:
        argv = [*job, f"--output={tmp_path / 'out'}", "--runner=portable"]
        argv += [f"--job_endpoint={job_service}", "--environment_type=EXTERNAL"]
        argv += [f"--environment_config={address}", "--worker_start_timeout_s=2"]
        assert main(argv) == 2
    finally:
        pool.stop()
    err = capsys.readouterr().err
    assert "beam-enrich: waiting for workers to start (up to 2 s)" in err
    assert (
        f"beam-enrich: error: no worker of the job at {job_service} started work within 2 s"
    ) in err
    assert f"the worker pool at {address}" in err
    assert not (tmp_path / "out").exists()


def test_runner_names_and_options(tmp_path):
    """Short names select beam-enrich's Dask runner; its options parse without warnings."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.runners import DASK_RUNNER, resolve_runner

    for name in ("dask", "DaskRunner", "apache_beam.runners.dask.dask_runner.DaskRunner"):
        assert resolve_runner(["--runner", name]) == ["--runner", DASK_RUNNER]
        assert resolve_runner([f"--runner={name}"]) == [f"--runner={DASK_RUNNER}"]
    assert resolve_runner(["--runner", "FlinkRunner"]) == ["--runner", "FlinkRunner"]
    options = PipelineOptions(
        resolve_runner(["--runner=dask", "--dask_client_address=tcp://h:1", "--dask_npartitions=7"])
    ).get_all_options(drop_default=True)
    assert options["address"] == "tcp://h:1"
    assert options["npartitions"] == 7


def test_dask_metrics_keep_the_latest_totals_of_each_task():
    """A task rerun after its worker died replaces the lost attempt's counts."""
    from apache_beam.metrics.metric import MetricsFilter

    from pipelines.dask_runner import _DaskMetrics

    metrics = _DaskMetrics()

    def report(task: str, rows: int) -> tuple[float, dict]:
        counters = [["beam_enrich", "sentiment_rows", rows]]
        distributions = [["beam_enrich", "sentiment_batch_rows", rows, 1, rows, rows]]
        return 0.0, {
            "task": task,
            "step": "Enrich",
            "counters": counters,
            "distributions": distributions,
        }

    metrics.add_event(report("a", 5))
    metrics.add_event(report("b", 7))
    metrics.add_event(report("a", 8))  # task a again, on another worker
    result = metrics.query(MetricsFilter().with_name("sentiment_rows"))
    (counter,) = result[metrics.COUNTERS]
    assert counter.attempted == counter.committed == 15
    (distribution,) = metrics.query(MetricsFilter().with_name("sentiment_batch_rows"))[
        metrics.DISTRIBUTIONS
    ]
    assert (distribution.attempted.data.sum, distribution.attempted.data.count) == (15, 2)
