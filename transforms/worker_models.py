"""What a worker process keeps loaded: its models, for as long as the process lives.

Beam's `shared.Shared` keeps an object alive only while some DoFn holds it (plus the one
acquired last). Runners that tear DoFns down after every bundle or partition (Beam's
DaskRunner calls `setup()` and `teardown()` around each Dask partition) would then load
a job's models again for every partition, and a job with two tasks would reload both.
This registry holds them for the process's life instead, and counts the loads, so a run
can say how many times each model was loaded.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import TypeVar

__all__ = ["MAX_MODELS", "acquire", "load_counts", "release_all"]

T = TypeVar("T")

#: Models a process keeps at most; the one used least recently goes first. More than
#: any job's task count in practice, few enough that a long-lived process (a notebook
#: running job after job) does not keep every model it ever loaded.
MAX_MODELS = 8

_lock = threading.Lock()
_models: OrderedDict[str, object] = OrderedDict()
_loading: dict[str, threading.Lock] = {}
_loads: Counter = Counter()


def acquire(key: str, load: Callable[[], T]) -> tuple[T, bool]:
    """The model stored under `key`, loaded by `load()` if this process has none yet.

    Threads of one process asking for the same key wait for one load.

    Returns:
        (model, loaded): `loaded` is True when this call loaded it.
    """
    with _lock:
        key_lock = _loading.setdefault(key, threading.Lock())
    with key_lock:
        with _lock:
            if key in _models:
                _models.move_to_end(key)
                return _models[key], False  # type: ignore[return-value]
        model = load()
        with _lock:
            _models[key] = model
            _loads[key] += 1
            while len(_models) > MAX_MODELS:
                _models.popitem(last=False)
        return model, True


def load_counts() -> dict[str, int]:
    """Key -> how many times this process loaded it."""
    with _lock:
        return dict(_loads)


def release_all() -> None:
    """Forgets every model, so that memory goes back once no DoFn holds them.

    For a process that was the worker of a job that has ended: an in-process run's
    driver (a notebook keeps running after the job).
    """
    with _lock:
        _models.clear()
