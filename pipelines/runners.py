"""Runner names and options, and a run's progress as the runner's Beam metrics tell it.

`--runner dask` (or `DaskRunner`, or Beam's own class path) selects
`pipelines.dask_runner.DaskRunner`; other names go to Beam unchanged (it already knows
`flink`, `spark`, `portable`, `dataflow`, …). The runner's module is imported before
the options are parsed, so its options (`--dask_client_address`, `--flink_master`) are
known at once instead of being reported as "unparseable".
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Mapping, Sequence

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState

from transforms.enrich import METRICS_NAMESPACE
from transforms.errors import JobError
from transforms.progress import TaskProgress

__all__ = [
    "DASK_RUNNER",
    "ClusterOptions",
    "MetricsProgress",
    "WorkerStartError",
    "model_loads",
    "resolve_runner",
    "wait_for_job",
]

_LOG = logging.getLogger(__name__)

#: beam-enrich's Dask runner (see `pipelines.dask_runner`).
DASK_RUNNER = "pipelines.dask_runner.DaskRunner"

#: Names that select it, lower case: Beam's own DaskRunner cannot run this pipeline.
_DASK_NAMES = {"dask", "daskrunner", "apache_beam.runners.dask.dask_runner.daskrunner"}


class WorkerStartError(JobError):
    """The runner's workers are missing or cannot run the job's code."""


class ClusterOptions(PipelineOptions):
    """Options of beam-enrich for runners with workers of their own."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--worker_start_timeout_s",
            type=float,
            default=300.0,
            help="fail the run when no worker has started within this many seconds (Dask: "
            "joined the scheduler and passed its import check; portable runners: reported "
            "a metric or started a part, so the time covers a model load and a first chunk)",
        )


def resolve_runner(beam_args: Sequence[str]) -> list[str]:
    """`beam_args` with the runner's short name replaced, after importing its module.

    Imports the runner's module so that its options are known before Beam parses them.
    """
    args = list(beam_args)
    for i, arg in enumerate(args):
        if arg == "--runner" and i + 1 < len(args):
            args[i + 1] = _runner_path(args[i + 1])
            _import_runner(args[i + 1])
        elif arg.startswith("--runner="):
            path = _runner_path(arg.partition("=")[2])
            args[i] = f"--runner={path}"
            _import_runner(path)
    return args


def _runner_path(name: str) -> str:
    return DASK_RUNNER if name.lower() in _DASK_NAMES else name


def _import_runner(name: str) -> None:
    known = {path.rsplit(".", 1)[-1].lower(): path for path in StandardOptions.ALL_KNOWN_RUNNERS}
    path = known.get(name.lower(), known.get(name.lower() + "runner", name))
    if "." not in path:
        return  # Beam names the valid runners when it creates this one
    try:
        importlib.import_module(path.rsplit(".", 1)[0])
    except ImportError as err:
        if path == DASK_RUNNER or "dask" in str(err):
            raise WorkerStartError(
                f"--runner {name} needs Dask ({err}); install beam-enrich[dask]"
            ) from None
        # Beam says what to install when it creates the runner.


class MetricsProgress:
    """Rows done per task, from a running job's Beam metrics (attempted counts).

    For `pipelines.progress.show_progress` on runners whose workers cannot publish
    progress files to the driver's disk. Empty until `attach` gives it the job, and
    for runners that report metrics only when the job is done.
    """

    def __init__(self):
        self._result = None

    def attach(self, result) -> None:
        self._result = result

    def read(self) -> Mapping[str, TaskProgress]:
        if self._result is None:
            return {}
        try:
            counters = _counters(self._result)
        except Exception as err:  # a runner without metrics: no progress, never a failure
            _LOG.debug("no metrics: %s", err)
            return {}
        rows: dict[str, int] = {}
        failed: dict[str, int] = {}
        for name, value in counters.items():
            if name.endswith("_failed_rows"):
                failed[name.removesuffix("_failed_rows")] = value
            elif name.endswith("_rows"):
                rows[name.removesuffix("_rows")] = value
        return {
            task: TaskProgress(rows=count, failed=failed.get(task, 0))
            for task, count in rows.items()
        }


def _counters(result) -> dict[str, int]:
    """Counter name -> attempted value, summed over steps, in beam-enrich's namespace."""
    metrics = _live_metrics(result)
    query = metrics.query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    totals: dict[str, int] = {}
    for counter in query[metrics.COUNTERS]:
        name = counter.key.metric.name
        totals[name] = totals.get(name, 0) + (counter.attempted or counter.committed or 0)
    return totals


def _live_metrics(result):
    # A portable runner's result caches its first metrics answer; a running job's
    # metrics need a fresh one each time.
    service, job_id = getattr(result, "_job_service", None), getattr(result, "_job_id", None)
    if service is not None and job_id is not None:
        from apache_beam.portability.api import beam_job_api_pb2
        from apache_beam.runners.portability.portable_runner import PortableMetrics

        request = beam_job_api_pb2.GetJobMetricsRequest(job_id=job_id)
        return PortableMetrics(service.GetJobMetrics(request))
    return result.metrics()


def model_loads(result) -> dict[str, int] | None:
    """Task -> how many times worker processes loaded its model, from the job's metrics.

    The one reader of the `N_model_loads` counters. A task without one loaded nothing
    (all its work reused, no rows): it is absent here.

    Returns:
        None when the runner reports no metrics, or none of beam-enrich's: then nothing
        is known about loads (not even that there were none).
    """
    try:
        counters = _counters(result)
    except Exception as err:  # a runner without metrics
        _LOG.debug("no metrics: %s", err)
        return None
    if not counters:
        return None
    return {
        name.removesuffix("_model_loads"): value
        for name, value in counters.items()
        if name.endswith("_model_loads")
    }


#: Seconds between two looks at a portable job while no worker has shown up.
_WATCH_INTERVAL_S = 1.0


def wait_for_job(
    result, options: PipelineOptions, staging_dir: str, *, quiet: bool = False
) -> None:
    """Waits for a job; a portable job whose workers never start fails in bounded time.

    A portable job service (Flink, Spark, Beam's own) keeps a job RUNNING while it
    waits for an SDK worker, forever if the worker cannot start (its Python lacks
    apache_beam or beam-enrich). Nothing in the job's state or messages says whether a
    worker connected, so this watches for the first sign of work: a metric reported, or
    a file under `staging_dir` (a part being written, on local disks, after the first
    chunk is enriched; a finished part on object stores). With none within
    `--worker_start_timeout_s`, it cancels the job.

    Raises:
        WorkerStartError: no worker showed a sign of work in time.
    """
    if getattr(result, "_job_service", None) is None:
        result.wait_until_finish()
        return
    timeout_s = options.view_as(ClusterOptions).worker_start_timeout_s
    if not quiet:
        print(
            f"beam-enrich: waiting for workers to start (up to {timeout_s:g} s)",
            file=sys.stderr,
            flush=True,
        )
    before = _staged_names(staging_dir)
    deadline = time.monotonic() + timeout_s
    while not PipelineState.is_terminal(result.state):
        if _counters_or_empty(result) or _staged_names(staging_dir) != before:
            break  # a worker runs: from here on, Beam's own wait
        if time.monotonic() >= deadline:
            result.cancel()
            endpoint = options.get_all_options().get("job_endpoint")
            pool = options.get_all_options().get("environment_config")
            raise WorkerStartError(
                f"no worker of the job at {endpoint} started work within {timeout_s:g} s, so "
                f"the job was cancelled; check that the workers' Python (the worker pool "
                f"at {pool}, or the SDK container) has apache-beam and beam-enrich, or raise "
                "--worker_start_timeout_s"
            )
        time.sleep(_WATCH_INTERVAL_S)
    result.wait_until_finish()


def _counters_or_empty(result) -> dict[str, int]:
    try:
        return _counters(result)
    except Exception:
        return {}


def _staged_names(directory: str) -> set[str]:
    try:
        (found,) = FileSystems.match([FileSystems.join(directory, "*")])
    except Exception:  # nothing there yet: Beam raises for an empty match
        return set()
    return {metadata.path for metadata in found.metadata_list}
