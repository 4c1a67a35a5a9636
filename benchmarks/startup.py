"""Start-up and wind-down: a run's fixed cost around its rows, whole process timed.

    python -m benchmarks.startup [--repeat 3] [--jobs main,sentiment] [--profile JOB]

Each job runs as `beam-enrich` would, in a fresh Python process (imports included),
`--repeat` times; the process stamps the moment its first chunk reaches a model (after
imports, job preparation, runner start and model load), its first and last chunk done,
and the parent the launch and the exit. Reported per job, medians over the repeats:

  to first row:   launch -> first chunk's rows enriched,
  rows:           first chunk reaches a model -> last chunk enriched,
  after last row: last chunk enriched -> process exit (writing, publishing, manifest,
                  report, interpreter exit).

Jobs: `main`, the README's main job (sample_data/job-main.yaml on reviews.csv: MiniLM
embeddings and SmolLM2 generation); `sentiment`, one text-classification task with a
tiny model (`beam-enrich make-test-models`), where fixed costs are nearly all there is.
`--profile JOB` also writes a cProfile of one run (results/startup-JOB.prof) and prints
its 25 costliest calls. Results go to benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
_STAMPS_ENV = "BEAM_ENRICH_STARTUP_STAMPS"


def _child(argv: list[str], profile: str | None) -> NoReturn:
    """Runs beam-enrich in this process, stamping when chunks reach and leave a model.

    The stamps wrap `LoadedModel.run_measured`, the one call per chunk and task; on the
    local runner (workers in this process) it runs here. Written by an exit handler,
    after the run; the process ends as the `beam-enrich` command ends it.
    """
    import atexit

    stamps: dict[str, float] = {"imports_started": time.time()}
    from pipelines.cli import main
    from pipelines.process_exit import exit_process
    from transforms.inference import LoadedModel

    stamps["imports_done"] = time.time()
    measured = LoadedModel.run_measured

    def run_measured(self, *args, **kwargs):
        stamps.setdefault("first_chunk_started", time.time())
        result = measured(self, *args, **kwargs)
        stamps.setdefault("first_chunk_done", time.time())
        stamps["last_chunk_done"] = time.time()
        return result

    LoadedModel.run_measured = run_measured
    atexit.register(
        lambda: Path(os.environ[_STAMPS_ENV]).write_text(json.dumps(stamps), encoding="utf-8")
    )
    try:
        if profile is None:
            code = main(argv)
        else:
            import cProfile

            profiler = cProfile.Profile()
            try:
                code = profiler.runcall(main, argv)
            finally:
                profiler.dump_stats(profile)
    finally:
        stamps["run_done"] = time.time()
    exit_process(code)  # as `beam-enrich` (pipelines.cli.console_main) ends


def _tiny_sentiment(workdir: Path) -> Path:
    """A tiny text-classification model, as the test fixtures build it (offline)."""
    from pipelines.test_models import make_test_models

    return make_test_models(workdir / "models", only={"text-classification"})["text-classification"]


def _jobs(workdir: Path, names: list[str]) -> dict[str, list[str]]:
    jobs = {}
    if "main" in names:
        jobs["main"] = ["--spec", str(ROOT / "sample_data/job-main.yaml")]
    if "sentiment" in names:
        spec = workdir / "sentiment.json"
        task = {"name": "s", "task": "sentiment-analysis", "model": str(_tiny_sentiment(workdir))}
        spec.write_text(json.dumps({"tasks": [task]}), encoding="utf-8")
        jobs["sentiment"] = ["--spec", str(spec)]
    return jobs


def run_once(name: str, spec_args: list[str], workdir: Path, profile: str | None = None) -> dict:
    """One whole-process run; returns its phases in seconds."""
    stamps_path = workdir / f"stamps-{name}.json"
    stamps_path.unlink(missing_ok=True)
    output = workdir / f"out-{name}-{time.time_ns()}"
    argv = ["--input", str(ROOT / "sample_data/reviews.csv"), "--output", str(output)]
    command = [sys.executable, "-m", "benchmarks.startup", "--child", *argv, *spec_args]
    if profile:
        command[4:4] = ["--child-profile", profile]
    env = {**os.environ, _STAMPS_ENV: str(stamps_path), "HF_HUB_OFFLINE": "1"}
    launched = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    stamps = json.loads(stamps_path.read_text(encoding="utf-8"))
    return {
        "total_s": ended - launched,
        "python_and_imports_s": stamps["imports_done"] - launched,
        "to_first_chunk_s": stamps["first_chunk_started"] - launched,
        "to_first_row_s": stamps["first_chunk_done"] - launched,
        "rows_s": stamps["last_chunk_done"] - stamps["first_chunk_started"],
        "after_last_row_s": ended - stamps["last_chunk_done"],
        "run_end_after_last_row_s": stamps["run_done"] - stamps["last_chunk_done"],
        "exit_s": ended - stamps["run_done"],
    }


def _median(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    from benchmarks import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per job (default 3)")
    parser.add_argument("--jobs", default="main,sentiment", help="main, sentiment or both")
    parser.add_argument("--profile", help="also profile one run of this job")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    names = [n.strip() for n in args.jobs.split(",") if n.strip()]
    machine = report.machine()
    print(f"{machine['cpu']}, {machine['cpu_kind']}; {machine['cores']} cores")
    results: dict = {"machine": machine, "settings": vars(args), "jobs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        jobs = _jobs(workdir, names)
        for name, spec_args in jobs.items():
            runs = [run_once(name, spec_args, workdir) for _ in range(args.repeat)]
            median = _median(runs)
            results["jobs"][name] = {"median": median, "runs": runs}
            print(
                f"{name:10s} to first row {median['to_first_row_s']:5.2f}s "
                f"(imports {median['python_and_imports_s']:.2f}s, first chunk reaches the "
                f"model at {median['to_first_chunk_s']:.2f}s)  rows {median['rows_s']:6.2f}s  "
                f"after last row {median['after_last_row_s']:5.2f}s (of which interpreter "
                f"exit {median['exit_s']:.2f}s)  total "
                f"{median['total_s']:6.2f}s"
            )
        if args.profile:
            RESULTS.mkdir(exist_ok=True)
            prof = RESULTS / f"startup-{args.profile}.prof"
            run_once(args.profile, jobs[args.profile], workdir, profile=str(prof))
            import pstats

            pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(25)
    if not args.no_save:
        report.save_results(RESULTS / "startup.json", results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        rest = sys.argv[2:]
        profile_path = None
        if rest[:1] == ["--child-profile"]:
            profile_path, rest = rest[1], rest[2:]
        _child(rest, profile_path)
    main()
