"""Repeated row inputs computed once: input keys and a bounded cache of results.

Real datasets repeat themselves (the same review pasted twice, boilerplate, prompts
built from a few fields). Where a task's output is a pure function of its input, the
hot path (`transforms.inference.run_rows`) runs each distinct input of a chunk once and
copies its result, and keeps results in a `ResultCache` for later chunks.
"""

from __future__ import annotations

import collections
import hashlib
import sys
import threading
from typing import Any

__all__ = ["CACHE_MAX_BYTES", "CACHE_MAX_ENTRIES", "ResultCache", "input_key"]

#: The cache's bounds, per task and worker process. Results are small next to a
#: worker's memory (about 0.7 GB peak RSS measured at scale): a label and a score take
#: about 150 bytes, so 65,536 entries (128 chunks of 512 rows) hold about 10 MB of
#: them; a 384-float embedding takes 1.8 kB, so 32 MiB holds about 18,000. Past
#: either bound the least recently used results go first.
CACHE_MAX_ENTRIES = 65_536
CACHE_MAX_BYTES = 32 * 2**20

#: Types whose `repr` spells out the whole value, so equal reprs mean equal inputs.
_EXACT = (str, bytes, int, float, bool, type(None))


def input_key(value: Any) -> bytes | None:
    """A digest that equal row inputs share, or None for an input that cannot be keyed.

    Row inputs are texts, tuples of texts (question and context, chat cells) or other
    values a plugin returns; only those built from str, bytes, numbers, None, tuples and
    lists are keyed, since only their `repr` is the whole value (an object's may be its
    address, a large array's is elided). A 128-bit digest keeps long texts out of the
    cache's keys.
    """
    if not _exact(value):
        return None
    return hashlib.blake2b(repr(value).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _exact(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_exact(part) for part in value)
    return type(value) in _EXACT


class ResultCache:
    """Results of earlier chunks by input key: least recently used first out.

    Shared by the threads of a process, so every access takes a lock.

    Args:
        max_entries: the most results kept.
        max_bytes: the most bytes of results kept, as `approx_bytes` counts them.
    """

    def __init__(self, max_entries: int = CACHE_MAX_ENTRIES, max_bytes: int = CACHE_MAX_BYTES):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[bytes, tuple[Any, int]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Any | None:
        """The value stored under `key`, or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: bytes, value: Any) -> None:
        """Stores `value`; a value larger than the whole cache is not kept."""
        size = approx_bytes(value) + len(key) + 100  # the key and the dict's slot
        if size > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= previous[1]
            self._entries[key] = (value, size)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped


def approx_bytes(value: Any) -> int:
    """About how much memory a result takes: exact enough to bound a cache."""
    if isinstance(value, (tuple, list)):
        return sys.getsizeof(value) + sum(approx_bytes(part) for part in value)
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(
            approx_bytes(k) + approx_bytes(v) for k, v in value.items()
        )
    nbytes = getattr(value, "nbytes", None)  # numpy arrays, tensors
    if isinstance(nbytes, int):
        return nbytes + 112
    return sys.getsizeof(value)
