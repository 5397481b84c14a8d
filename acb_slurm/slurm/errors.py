"""The Slurm layer's errors; the CLI turns each into one message and exit code 1."""

from __future__ import annotations

from dataclasses import dataclass


class AcbSlurmError(Exception):
    """Base of the Slurm layer's errors: the message says what is wrong and what to do."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a job.yaml: where (file, 1-based line, dotted field) and what."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class SpecError(AcbSlurmError):
    """A job.yaml is invalid; carries every problem found, each with file, line and field."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in job spec:"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


class SlurmError(AcbSlurmError):
    """A Slurm command failed or answered something we cannot parse; quotes Slurm's words."""


class RenderError(AcbSlurmError):
    """A template is missing or does not render (bad user template dir, unknown variable)."""


class JobStateError(AcbSlurmError):
    """A job's run directory, config file or assigners cannot be read."""
