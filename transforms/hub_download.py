"""Hub download: a model's files at its pinned commit, into a cache offline workers use."""

from __future__ import annotations

from transforms.models import ModelError, ResolvedModel, worker_file_patterns

__all__ = ["fetch_snapshot"]


def fetch_snapshot(model: ResolvedModel, cache: str) -> str:
    """Downloads the files workers load at the model's commit; returns the snapshot folder.

    Raises:
        ModelError: the download fails, or the revision moved while it ran.
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        folder = snapshot_download(
            model.model, revision=model.revision, cache_dir=cache, **worker_file_patterns(model)
        )
        pinned = model.revision
        if model.requested_revision != model.revision:
            # A download by commit records no branch or tag; an offline driver resolves
            # the spec's revision through the cache's refs/, so record it there.
            pinned = (
                HfApi()
                .resolve_revision(
                    model.model,
                    revision=model.requested_revision,
                    cache_dir=cache,
                    local_files_only=constants.HF_HUB_OFFLINE,
                )
                .resolved
            )
    except Exception as err:
        reason = " ".join(str(err).split())[:300]
        raise ModelError(
            f"cannot download {model.model} at {model.revision} into {cache} "
            f"({type(err).__name__}: {reason}); check the network, the disk and access to "
            "the model (HF_TOKEN), then run download again"
        ) from err
    if pinned != model.revision:
        raise ModelError(
            f"{model.model} revision {model.requested_revision!r} moved from {model.revision} "
            f"to {pinned} during the download; run download again"
        )
    return folder
