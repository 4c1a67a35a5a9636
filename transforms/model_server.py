"""A model served by another process: tokenize and decode here, send it forward passes only.

With `share_model: machine` one process per GPU holds the model (Beam's
`MultiProcessShared`) for every SDK process of the machine. If it ran whole chunks,
every caller's tokenizing and post-processing would run in that one process,
serialized with the forward passes, and the GPU would wait for Python. So each caller
loads the task's front (`TaskAdapter.load_front`: tokenizer, config, label maps, no
weights) and runs `run_rows` itself; only padded arrays go to the server
(`LoadedModel.forward`) and only the model's outputs come back.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from transforms.inference import LoadedModel, TaskBinding
from transforms.tasks.base import SplitRunner

__all__ = ["with_local_front"]

_LOG = logging.getLogger(__name__)

#: Per task: the front loaded in this process, or None for a family that cannot split.
_FRONTS: dict[str, LoadedModel | None] = {}
_FRONTS_LOCK = threading.Lock()


class _ServedRunner:
    """A `SplitRunner` whose forward pass runs in the model server."""

    def __init__(self, front: SplitRunner, server: Any):
        self.front = front
        self.server = server

    def prepare(self, inputs: list) -> list:
        return self.front.prepare(inputs)

    def cost(self, item: Any) -> int:
        return self.front.cost(item)

    def collate(self, items: list) -> dict:
        return self.front.collate(items)

    def forward(self, batch: dict) -> dict:
        return self.server.forward(batch)

    def forward_many(self, batches: list[dict]) -> list:
        return self.server.forward_many(batches)

    def decode(self, items: list, outputs: dict) -> list[tuple]:
        return self.front.decode(items, outputs)

    def infer(self, items: list) -> list[tuple]:
        return self.decode(items, self.forward(self.collate(items)))


def with_local_front(task: TaskBinding, loaded: Any) -> Any:
    """The model to run chunks with: `loaded` itself when it lives in this process, else
    a `LoadedModel` here that tokenizes and decodes with the task's front and sends the
    server (`loaded`, a proxy) forward passes only.

    The front, its batch limit and its cache of results are kept per process and task,
    across setups. A family without a front, or a front that fails to load, leaves the
    server running whole chunks, as before.
    """
    if isinstance(loaded, LoadedModel):
        return loaded
    adapter = task.adapter
    key = repr(
        (type(adapter), task.name, task.model, adapter.params, adapter.on_long_input, task.dtype)
    )
    with _FRONTS_LOCK:
        if key not in _FRONTS:
            _FRONTS[key] = _load_front(task, loaded)
        local = _FRONTS[key]
    if local is None:
        return loaded
    local.runner.server = loaded  # a new setup may hold a new proxy to the same server
    return local


def _load_front(task: TaskBinding, server: Any) -> LoadedModel | None:
    try:
        front = task.adapter.load_front(task.model)
    except Exception as err:
        _LOG.warning(
            "task %s: the model's front does not load here (%s); the model server runs "
            "whole chunks",
            task.name,
            err,
        )
        return None
    if front is None:
        return None
    device, dtype = server.placement()
    # A chunk's micro-batches go to the server in one call (`LoadedModel.forward_many`).
    return LoadedModel(_ServedRunner(front, server), device, dtype)
