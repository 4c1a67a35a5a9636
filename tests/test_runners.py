"""Cluster readiness: the pipeline pickles, runs in worker processes, and reads and writes
remote paths through Beam's `FileSystems`."""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
from pathlib import Path

import apache_beam as beam
import cloudpickle
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.internal import pickler
from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata, FileSystem
from apache_beam.runners.portability import local_job_service, prism_runner
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

import pipelines.enrich as enrich_cli
import pipelines.job
import transforms.io
from pipelines.cli import main
from pipelines.enrich import build
from pipelines.job import prepare_job
from pipelines.local_runner import LocalRunner
from pipelines.spec import load_spec
from tests.conftest import SAMPLE_DATA, read_local_parts, sentiment_ner_spec
from transforms.chunks import Chunk
from transforms.io import iter_tables

TASK_COLUMNS = ["sentiment_label", "sentiment_score", "entities", "enrich_errors"]


def write_spec(path: Path, models: dict) -> Path:
    spec = sentiment_ner_spec(models)
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def sample_tables(rows: int = 20) -> list[pa.Table]:
    """Two input files' worth of sample rows, so two workers both get a file."""
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet")
    return [table.slice(0, rows), table.slice(rows, rows)]


def assert_same_results(actual: pa.Table, expected: pa.Table) -> None:
    """Same rows and task columns; scores within float noise (thread counts may differ)."""
    assert actual.column_names == expected.column_names
    inputs = [name for name in expected.column_names if name not in TASK_COLUMNS]
    assert actual.select(inputs).equals(expected.select(inputs))
    for name in ("sentiment_label", "enrich_errors"):
        assert actual.column(name).to_pylist() == expected.column(name).to_pylist()
    for got, want in zip(
        actual.column("sentiment_score").to_pylist(),
        expected.column("sentiment_score").to_pylist(),
        strict=True,
    ):
        assert math.isclose(got, want, abs_tol=1e-4)
    for got_row, want_row in zip(
        actual.column("entities").to_pylist(), expected.column("entities").to_pylist(), strict=True
    ):
        assert [{**e, "score": None} for e in got_row] == [{**e, "score": None} for e in want_row]
        for got, want in zip(got_row, want_row, strict=True):
            assert math.isclose(got["score"], want["score"], abs_tol=1e-4)


def test_worker_processes_give_the_in_process_result(tmp_path, tiny_models, monkeypatch):
    """`--direct_running_mode multi_processing` runs on FnApiRunner's worker processes.

    Beam's `--runner DirectRunner` first tries the Prism runner (a download); without
    `--runner`, beam-enrich's local default (FnApiRunner) honors the same direct_* options
    and downloads nothing.
    """
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, table in enumerate(sample_tables()):
        pq.write_table(table, inputs / f"part{i}.parquet")
    spec = write_spec(tmp_path / "job.yaml", tiny_models)

    prism_calls = []

    def no_prism(*args, **kwargs):
        prism_calls.append(args)
        raise RuntimeError("the local default must not start Prism")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", no_prism)
    worker_commands = []
    start_worker = local_job_service.SubprocessSdkWorker.__init__

    def recorded_worker(self, worker_command_line, *args, **kwargs):
        worker_commands.append(worker_command_line.decode())
        start_worker(self, worker_command_line, *args, **kwargs)

    monkeypatch.setattr(local_job_service.SubprocessSdkWorker, "__init__", recorded_worker)
    runners = []
    make_pipeline = enrich_cli._make_pipeline

    def recorded_pipeline(options):
        pipeline = make_pipeline(options)
        runners.append(pipeline.runner)
        return pipeline

    monkeypatch.setattr(enrich_cli, "_make_pipeline", recorded_pipeline)

    common = ["--input", str(inputs), "--spec", str(spec)]
    workers = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
    assert main([*common, "--output", str(tmp_path / "procs"), *workers]) == 0
    assert main([*common, "--output", str(tmp_path / "inproc")]) == 0

    assert prism_calls == []
    assert [type(runner) for runner in runners] == [LocalRunner, LocalRunner]
    assert issubclass(LocalRunner, FnApiRunner)
    # Only the multi_processing run started worker processes: two, each of them running
    # Beam's harness through `pipelines.local_worker`, which ends the process promptly.
    assert worker_commands == [f"{sys.executable} -m pipelines.local_worker"] * 2
    assert_same_results(read_local_parts(tmp_path / "procs"), read_local_parts(tmp_path / "inproc"))
    manifest = json.loads((tmp_path / "procs" / "manifest.json").read_text())
    assert manifest["options"]["direct_running_mode"] == "multi_processing"
    assert manifest["rows"]["out"] == 40


def test_the_launcher_reads_metadata_only_and_the_graph_does_not_grow(
    tmp_path, tiny_models, monkeypatch
):
    """No hash and no row read on the launcher; the file list is data, not a graph literal."""

    def refuse(*args, **kwargs):
        raise AssertionError("the launcher read input data")

    monkeypatch.setattr(pipelines.job, "iter_tables", refuse)
    monkeypatch.setattr(transforms.io, "file_sha256", refuse)
    spec = load_spec(write_spec(tmp_path / "job.yaml", tiny_models))
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet").slice(0, 3)
    graphs = {}
    for count in (3, 70, 200):
        folder = tmp_path / f"in{count}"
        folder.mkdir()
        for i in range(count):
            pq.write_table(table, folder / f"{i:03d}.parquet")
        job = prepare_job(spec, [str(folder)], str(tmp_path / f"out{count:03d}"))
        assert all(len(entry) == 2 for entry in job.context.inputs)  # (path, size) only
        # Up to 64 footers before the run (then a sample): the total only when all were read.
        assert len(job.checked) == min(count, pipelines.job.CHECKED_FILES)
        assert job.context.rows_total == (3 * count if count <= 64 else None)
        pipeline = beam.Pipeline()
        build(pipeline, job)
        listing = Path(job.context.listing_path).read_text().splitlines()
        assert [json.loads(line)["index"] for line in listing] == list(range(count))
        proto = pipeline.to_runner_api()
        graphs[count] = sum(len(t.spec.payload) for t in proto.components.transforms.values())
    # Past the launcher's sample, more files leave the job graph the same size (up to
    # the compressed pickles' noise: run ids differ; 130 more paths would add kilobytes).
    assert abs(graphs[200] - graphs[70]) < 256


def _pardo_dofns(pipeline: beam.Pipeline) -> dict[str, beam.DoFn]:
    found = {}

    class Collect(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            if isinstance(node.transform, beam.ParDo):
                found[node.full_label] = node.transform.dofn

    pipeline.visit(Collect())
    return found


@pytest.mark.parametrize("library", [pickler, cloudpickle], ids=["beam-pickler", "cloudpickle"])
def test_job_and_dofns_pickle(tmp_path, tiny_models, library):
    """Remote runners pickle every DoFn with the job in it; an unpickled DoFn still works."""
    job = prepare_job(
        load_spec(write_spec(tmp_path / "job.yaml", tiny_models)),
        [str(SAMPLE_DATA / "reviews.parquet")],
        str(tmp_path / "out"),
    )
    copy = library.loads(library.dumps(job))
    assert (copy.spec, copy.files, copy.context) == (job.spec, job.files, job.context)
    for binding, original in zip(copy.bindings, job.bindings, strict=True):
        assert (binding.name, binding.model) == (original.name, original.model)
        assert binding.adapter.fields() == original.adapter.fields()

    pipeline = beam.Pipeline()
    build(pipeline, job)
    dofns = _pardo_dofns(pipeline)
    assert {"Enrich[sentiment]/Infer", "Enrich[entities]/Infer", "Finalize"} <= dofns.keys()
    for label, dofn in dofns.items():
        pickled = library.dumps(dofn)
        # No model, tokenizer or data rides along: workers load the model in setup().
        assert len(pickled) < 1_000_000, f"{label} pickles to {len(pickled)} bytes"
        assert type(library.loads(pickled)) is type(dofn), label

    table = next(iter_tables(str(SAMPLE_DATA / "reviews.parquet"), 6))
    chunk = Chunk(0, "reviews.parquet", 0, 0, table, rows_read=table.num_rows)
    original = dofns["Enrich[sentiment]/Infer"]
    outputs = []
    # The unpickled copy first: it loads the model from its own (unpickled) binding, and
    # the original then shares that load, as threads of one worker process do.
    for dofn in (library.loads(library.dumps(original)), original):
        dofn.setup()
        (enriched,) = dofn.process(chunk)
        outputs.append(enriched.table)
    assert outputs[0].column_names[-3:] == ["sentiment_label", "sentiment_score", "enrich_errors"]
    assert outputs[0].equals(outputs[1])


# A tiny object store for the remote code path: Beam finds FileSystem subclasses by
# their scheme, so defining the class registers `memfs://` for this test session. The
# FnApiRunner runs in this process by default, so a module-level dict is the "bucket".
# Hand-written: Beam ships no public in-memory FileSystem (only test doubles in its tests).
_BUCKET: dict[str, bytes] = {}


class _MemoryObject(io.BytesIO):
    """A write handle: the object appears on close, as on GCS or S3."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def close(self) -> None:
        if not self.closed:
            _BUCKET[self._path] = self.getvalue()
        super().close()


class MemoryFileSystem(FileSystem):
    """`memfs://`: flat keys, no folders, like an object store."""

    @classmethod
    def scheme(cls):
        return "memfs"

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/"), *(path.strip("/") for path in paths)])

    def split(self, path):
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def mkdirs(self, path):
        pass  # object stores have no folders

    def has_dirs(self):
        return False

    def _list(self, dir_or_prefix):
        for path in sorted(_BUCKET):
            if path.startswith(dir_or_prefix):
                yield self.metadata(path)

    def create(self, path, mime_type=None, compression_type=CompressionTypes.AUTO):
        return _MemoryObject(path)

    def open(self, path, mime_type=None, compression_type=CompressionTypes.AUTO):
        if path not in _BUCKET:
            raise BeamIOError(f"open: no object {path}")
        return io.BytesIO(_BUCKET[path])

    def copy(self, source_file_names, destination_file_names):
        for source, destination in zip(source_file_names, destination_file_names, strict=True):
            _BUCKET[destination] = _BUCKET[source]

    def rename(self, source_file_names, destination_file_names):
        for source, destination in zip(source_file_names, destination_file_names, strict=True):
            _BUCKET[destination] = _BUCKET.pop(source)

    def exists(self, path):
        return path in _BUCKET

    def size(self, path):
        return len(_BUCKET[path])

    def last_updated(self, path):
        return 0.0

    def checksum(self, path):
        return hashlib.md5(_BUCKET[path]).hexdigest()

    def metadata(self, path):
        if path not in _BUCKET:
            raise BeamIOError(f"metadata: no object {path}")
        return FileMetadata(path, len(_BUCKET[path]), 0.0)

    def delete(self, paths):
        for path in paths:
            doomed = [key for key in _BUCKET if key == path or key.startswith(path + "/")]
            if not doomed:
                raise BeamIOError(f"delete: no object {path}")
            for key in doomed:
                del _BUCKET[key]


@pytest.fixture
def bucket():
    _BUCKET.clear()
    yield _BUCKET
    _BUCKET.clear()


def _read_remote_parquet(path: str) -> pa.Table:
    return pq.read_table(io.BytesIO(_BUCKET[path]))


def test_remote_input_and_output_through_beam_filesystems(tmp_path, tiny_models, bucket):
    """Inputs read from and outputs published to an object store, through `FileSystems`."""
    tables = sample_tables(12)
    broken = tables[1].column_names.index("text")
    tables[1] = tables[1].set_column(broken, "text", pa.array([None] * 12, pa.string()))
    for i, table in enumerate(tables):
        sink = io.BytesIO()
        pq.write_table(table, sink)
        bucket[f"memfs://in/part{i}.parquet"] = sink.getvalue()
    bucket["memfs://in/notes.txt"] = b"not matched by the glob"
    # A previous run's output: replaced, its stale part deleted.
    bucket["memfs://out/run/part-00000-of-00003.parquet"] = b"stale"
    earlier = {"run_id": "r", "fingerprint": "f", "output": {"path": "memfs://out/run"}}
    bucket["memfs://out/run/manifest.json"] = json.dumps(
        {**earlier, "versions": {"beam-enrich": "0"}}  # the keys every manifest has
    ).encode()
    spec = write_spec(tmp_path / "job.yaml", tiny_models)

    argv = ["--input", "memfs://in/*.parquet", "--output", "memfs://out/run", "--spec", str(spec)]
    assert main(argv) == 0

    written = sorted(key for key in bucket if key.startswith("memfs://out/"))
    parts = [f"memfs://out/run/part-0000{i}-of-00002.parquet" for i in range(2)]
    assert {*parts, "memfs://out/run/errors.jsonl", "memfs://out/run/manifest.json"} <= {*written}
    assert all(key.startswith("memfs://out/run/") for key in written), "staging left behind"
    assert "memfs://out/run/part-00000-of-00003.parquet" not in written, "stale part kept"
    for path, table in zip(parts, tables, strict=True):
        part = _read_remote_parquet(path)
        assert part.select(table.column_names).equals(table)
        assert part.column_names[len(table.column_names) :] == TASK_COLUMNS
    records = [json.loads(line) for line in bucket["memfs://out/run/errors.jsonl"].splitlines()]
    assert {(r["file"], r["row"]) for r in records} == {
        ("memfs://in/part1.parquet", row) for row in range(12)
    }
    assert {r["task"] for r in records} == {"sentiment", "entities"}

    manifest = json.loads(bucket["memfs://out/run/manifest.json"])
    assert [entry["path"] for entry in manifest["inputs"]] == [
        "memfs://in/part0.parquet",
        "memfs://in/part1.parquet",
    ]
    for entry in manifest["inputs"]:
        assert entry["sha256"] == hashlib.sha256(bucket[entry["path"]]).hexdigest()
    assert [f["path"] for f in manifest["output"]["files"]] == parts
    assert manifest["output"]["errors_file"] == "memfs://out/run/errors.jsonl"
    rows = manifest["rows"]
    assert (rows["in"], rows["out"]) == (24, 24)
    assert rows["failed"] == {"sentiment": 12, "entities": 12}
