"""The errors a job reports to its user as their own to fix, by type."""

from __future__ import annotations

__all__ = ["JobError"]


class JobError(ValueError):
    """A job that cannot start, or bad input found while it runs: the user's to fix.

    Its message is one paragraph that names the cause and the fix. The command line exits
    2 for it, whichever process raised it (`pipelines.cli.exit_code`); its subclasses say
    what is wrong: the spec (`pipelines.spec.SpecError`), the input
    (`transforms.io.InputError`) or a model (`transforms.models.ModelError`).
    """
