"""A worker process of the local runner: Beam's SDK harness, ended as soon as it is done.

`python -m pipelines.local_worker` runs `apache_beam.runners.worker.sdk_worker_main`
and, once the harness has returned, ends the process without the interpreter's teardown
(`pipelines.process_exit.exit_process`: threads are waited for, exit handlers run — among them
the shutdown of a shared model's server process — and output is flushed first).

Why: Beam's FnApiRunner stops its worker processes one after another and waits for each
to end (`WorkerHandlerManager.close_all`), and a worker holding torch and a model spends
about 2 s tearing its interpreter down. With two workers a run ended about 4 s after its
last row was published; now it ends at once (benchmarks/scale.py, 1 vs 2 workers).
`pipelines.local_runner.LocalRunner` starts its workers with this module.
"""

from __future__ import annotations

import sys


def main() -> None:
    from apache_beam.runners.worker import sdk_worker_main

    # A harness that fails raises: Python's own exit then reports it, with code 1.
    sdk_worker_main.main(sys.argv)
    from pipelines.process_exit import exit_process

    exit_process(0)


if __name__ == "__main__":
    main()
