"""beam-enrich runnable pipelines: CLI, job spec, manifest."""

import logging


def _not_beam_gcp_notice(record: logging.LogRecord) -> bool:
    # Beam logs this on import when its optional GCP client libraries are not
    # installed, which is expected without the [gcp] extra; it is noise on every run.
    return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_not_beam_gcp_notice)
