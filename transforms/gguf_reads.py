"""One read of a GGUF file's header per model load, however often transformers asks.

Loading a GGUF checkpoint, transformers makes a new `gguf.GGUFReader` for the config, again
for the tokenizer, and again for the config and the weights of the model
(`load_gguf_checkpoint`): four parses of a header that, with a large vocabulary, takes
seconds each (SmolLM2-135M's 49,152 tokens and merges: about 8 s on a Zen 3 core). Within
`shared_gguf_readers()`, readers of one unchanged file are made once and shared. Sharing is
safe: a reader maps the file read-only, and transformers only reads from it.

No library offers this: gguf has no reader cache and transformers no way to pass a reader,
so the one `GGUFReader` name transformers imports at each call is replaced by a subclass
that returns the shared reader inside the block and behaves as the original outside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

__all__ = ["shared_gguf_readers"]

#: (absolute path, size, mtime) -> reader, inside `shared_gguf_readers`; None outside.
_READERS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "beam_enrich_gguf_readers", default=None
)


@contextlib.contextmanager
def shared_gguf_readers() -> Iterator[None]:
    """Within this block, a GGUF file's header is read once; readers go at its end."""
    try:
        import gguf
    except ImportError:  # no GGUF support installed: nothing to share
        yield
        return
    _install(gguf)
    token = _READERS.set({})
    try:
        yield
    finally:
        _READERS.reset(token)


def _install(gguf) -> None:
    if getattr(gguf.GGUFReader, "_shares_headers", False):
        return
    original = gguf.GGUFReader

    class SharedReader(original):
        _shares_headers = True

        def __new__(cls, path, mode="r"):
            readers = _READERS.get()
            if readers is None or mode != "r":
                return super().__new__(cls)
            stat = os.stat(path)
            key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
            reader = readers.get(key)
            if reader is None:
                reader = super().__new__(cls)
                original.__init__(reader, path, mode)  # a file that fails is not kept
                readers[key] = reader
            return reader

        def __init__(self, path, mode="r"):
            if _READERS.get() is None or mode != "r":  # inside the block: parsed in __new__
                super().__init__(path, mode)

    SharedReader.__name__ = SharedReader.__qualname__ = original.__name__
    SharedReader.__module__ = original.__module__
    gguf.GGUFReader = SharedReader
