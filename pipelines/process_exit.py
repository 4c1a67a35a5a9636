"""Ending a finished process at once: Python's exit without its teardown of every module.

Used by the `beam-enrich` command (`pipelines.cli.console_main`) and by the local
runner's worker processes (`pipelines.local_worker`).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

__all__ = ["exit_process"]


def exit_process(code: int) -> NoReturn:
    """Ends the process as Python's exit would, without its teardown of every module.

    That teardown takes 1.4-2.6 s with torch, transformers and Beam loaded, after a
    run whose output, manifest and report are already written (benchmarks/startup.py),
    and nothing needs it. The steps of Python's exit before it still run, in its
    order: threads that are not daemons are waited for, and `concurrent.futures`'
    pools (`threading._shutdown`); then the exit handlers (logging's flush and close,
    `weakref.finalize` and temporary-folder cleanup, Beam's job server and shared-model
    process shutdown, Dask's client close, the wait for timed-out micro-batches in
    `transforms.inference`, coverage); then stdout and stderr are flushed. Both hooks
    are CPython's own; where one is missing, the exit is Python's.
    """
    shutdown_threads = getattr(threading, "_shutdown", None)
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if shutdown_threads is None or run_exit_handlers is None:
        sys.exit(code)
    shutdown_threads()
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            # As Python does when it cannot flush stdout at exit (e.g. a closed pipe).
            code = code or 120
    os._exit(code)
