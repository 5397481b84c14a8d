"""The Slurm layer's errors; the CLI turns each into one message and exit code 1."""

from __future__ import annotations

from acb_slurm.specfile.problems import InvalidSpec, Problem

__all__ = ["AcbSlurmError", "JobStateError", "Problem", "RenderError", "SlurmError", "SpecError"]


class AcbSlurmError(Exception):
    """Base of the Slurm layer's errors: the message says what is wrong and what to do."""


class SpecError(AcbSlurmError, InvalidSpec):
    """A job.yaml is invalid; carries every problem found (`problems`), each with file, line and
    field, one per line of the message."""


class SlurmError(AcbSlurmError):
    """A Slurm command failed or answered something we cannot parse; quotes Slurm's words."""


class RenderError(AcbSlurmError):
    """A template is missing or does not render (bad user template dir, unknown variable)."""


class JobStateError(AcbSlurmError):
    """A job's run directory, config file or assigners cannot be read."""
