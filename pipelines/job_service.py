"""`python -m pipelines.job_service`: Beam's local job service, with parallel SDK workers.

A portable job service on one machine, for the way Flink and Spark run Python workers
(`--runner PortableRunner --environment_type EXTERNAL` with a worker pool), that spreads
each stage's bundles over `--sdk_worker_parallelism` SDK workers of the pool, as Flink
and Spark spread them over their workers' SDK processes.

Beam's own (`apache_beam.runners.portability.local_job_service_main`, 2.77) runs every
bundle on one SDK worker, whatever the job asks for: its `BeamJob._invoke_runner` calls
`FnApiRunner(...).run_via_runner_api(proto, options)`, and only
`FnApiRunner.run_pipeline` (the in-process path) turns `--direct_num_workers` into the
runner's number of worker handlers, so it stays 1; `--sdk_worker_parallelism` is read by
no Python code at all (Flink's and Spark's job servers read it). This service is Beam's,
with that one number taken from the job's `--sdk_worker_parallelism`: FnApiRunner then
asks the pool for that many SDK workers and splits each stage's input over them
(`ParallelBundleManager`), as it does for local multi-process runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

from apache_beam.options.pipeline_options import PortableOptions
from apache_beam.portability.api import beam_job_api_pb2
from apache_beam.runners.portability import local_job_service
from apache_beam.runners.portability.fn_api_runner import fn_runner

__all__ = ["main", "sdk_workers"]

_LOG = logging.getLogger(__name__)


def sdk_workers(options) -> int:
    """SDK workers for a job: its `--sdk_worker_parallelism`; 0 means one per core.

    Raises:
        ValueError: the option is not a whole number of workers.
    """
    value = options.view_as(PortableOptions).sdk_worker_parallelism
    try:
        # Beam declares the option without a type: it arrives as text or a number.
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if number < 0 or not number.is_integer():
        raise ValueError(
            f"--sdk_worker_parallelism {value!r} is not a number of SDK workers; "
            "give 1 or more, or 0 for one per core"
        )
    return int(number) or os.cpu_count() or 1


class _ParallelBeamJob(local_job_service.BeamJob):
    """Beam's local job, run by a FnApiRunner with the job's number of SDK workers."""

    def _invoke_runner(self):
        # As Beam's BeamJob._invoke_runner, plus the number of workers.
        self.set_state(beam_job_api_pb2.JobState.RUNNING)
        options = self.pipeline_options()
        runner = fn_runner.FnApiRunner(provision_info=self._provision_info)
        runner._num_workers = sdk_workers(options)
        _LOG.info("Running the job on %d SDK worker(s)", runner._num_workers)
        return runner.run_via_runner_api(self._pipeline_proto, options)


def _check_beam() -> None:
    """Fails at start, not on the first job, if Beam's internals used here have moved."""
    runner = fn_runner.FnApiRunner()
    if not (
        hasattr(runner, "_num_workers")
        and callable(getattr(local_job_service.BeamJob, "_invoke_runner", None))
    ):
        import apache_beam

        raise SystemExit(
            f"pipelines.job_service does not support apache-beam {apache_beam.__version__} "
            "(FnApiRunner._num_workers or BeamJob._invoke_runner is gone); use Beam's "
            "apache_beam.runners.portability.local_job_service_main (one SDK worker)"
        )


def main(argv: list[str] | None = None) -> None:
    """Serves the Beam job API on `--port` until killed."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.job_service", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "-p", "--port", type=int, default=8099, help="port of the job API (0: any free port)"
    )
    parser.add_argument("--staging_dir", help="where jobs' artifacts go (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    _check_beam()
    servicer = local_job_service.LocalJobServicer(args.staging_dir, beam_job_type=_ParallelBeamJob)
    port = servicer.start_grpc_server(args.port)
    # The line Beam's job service prints, so scripts that wait for one wait for both.
    print(f"Listening for beam jobs on port {port}.", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        servicer.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
