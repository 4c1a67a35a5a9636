"""The local runner: Beam's FnApiRunner, with worker processes that end promptly.

The default runner of a run without `--runner`. In memory (the default) it is Beam's
FnApiRunner unchanged. With `--direct_running_mode=multi_processing` its worker
processes run `pipelines.local_worker` instead of Beam's
`apache_beam.runners.worker.sdk_worker_main`: the same harness, whose process ends
without the interpreter's teardown once the harness is done (see there why).
"""

from __future__ import annotations

import sys

from apache_beam.portability import python_urns
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

__all__ = ["LocalRunner"]

_BEAM_WORKER = f"{sys.executable} -m apache_beam.runners.worker.sdk_worker_main"
_WORKER = f"{sys.executable} -m pipelines.local_worker"


class LocalRunner(FnApiRunner):
    """FnApiRunner whose worker processes (multi_processing) run `pipelines.local_worker`."""

    def run_via_runner_api(self, pipeline_proto, options):
        for environment in pipeline_proto.components.environments.values():
            if (
                environment.urn == python_urns.SUBPROCESS_SDK
                and environment.payload.decode("utf-8") == _BEAM_WORKER
            ):
                environment.payload = _WORKER.encode("utf-8")
        return super().run_via_runner_api(pipeline_proto, options)
