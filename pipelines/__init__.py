"""beam-enrich runnable pipelines: CLI, job spec, manifest, notebook API."""

import logging


def _not_beam_gcp_notice(record: logging.LogRecord) -> bool:
    # Beam logs this on import when its optional GCP client libraries are not
    # installed, which is expected without the [gcp] extra; it is noise on every run.
    return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_not_beam_gcp_notice)

__all__ = ["clear_model_cache", "enrich_dataframe", "enrich_table"]

_NOTEBOOK_API = frozenset(__all__)


def __getattr__(name: str):
    # Imported on first use: `pipelines.spec` and the CLI need not pay for the notebook
    # module, and `python -m pipelines.enrich` must not find pipelines.enrich imported
    # by the package already.
    if name in _NOTEBOOK_API:
        from pipelines import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
