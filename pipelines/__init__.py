"""beam-enrich runnable pipelines: CLI, job spec, manifest."""
