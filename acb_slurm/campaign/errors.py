"""The campaign runner's errors; the CLI turns each into one message and exit code 1."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from acb_slurm.specfile.problems import InvalidSpec, Problem


class CampaignError(Exception):
    """Base of the campaign runner's errors."""


class SpecError(CampaignError, InvalidSpec):
    """The campaign file (or an items file) is invalid: every problem found (`problems`), one per
    line of the message, each naming file, line and field; path, line, field and message are
    the first problem's."""

    def __init__(
        self,
        path: Path | str,
        line: int | None,
        field: str,
        message: str,
        *,
        more: Iterable[Problem] = (),
    ) -> None:
        self.path = Path(path)
        self.line = line
        self.field = field
        self.message = message
        super().__init__([Problem(str(self.path), line or 0, field, message), *more])

    @classmethod
    def of(cls, problems: Sequence[Problem]) -> SpecError:
        """The error of several problems (at least one), the first one first."""
        first, *more = problems
        return cls(first.file, first.line or None, first.field, first.message, more=more)


class StageFailed(CampaignError):
    """One stage of an item failed (non-zero exit, timeout, or it could not be started)."""


class StageInterrupted(Exception):
    """A stage process was stopped for a reason that is not the item's: the claim on another
    item of its batch was lost, so the process was killed. The attempt is recorded interrupted
    (it does not count against the item's retries) and the item runs again. Not a
    CampaignError: it stops no worker."""
