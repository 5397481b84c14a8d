"""Problems found in a spec file, and the error that carries them (no pydantic, no YAML here)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a spec file: where (file, 1-based line or 0, dotted field) and what."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


def sorted_problems(problems: Iterable[Problem]) -> list[Problem]:
    """Problems in reading order: by line, then by field (problems without a line first)."""
    return sorted(problems, key=lambda p: (p.line, p.field))


def format_problems(problems: Iterable[Problem]) -> str:
    """One line per problem, `file:line: field: message`, the first problem first."""
    return "\n".join(str(p) for p in problems)


class InvalidSpec(Exception):
    """A spec file is invalid: every problem found, each with file, line and field.

    Each spec module raises its own subclass, which also derives from its subsystem's base error
    (so each CLI catches it as one of its own).
    """

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(format_problems(self.problems))
