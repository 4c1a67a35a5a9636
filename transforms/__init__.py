"""beam-enrich library: Beam transforms and the task adapters they run."""
