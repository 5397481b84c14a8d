"""The campaign runner's errors; the CLI turns each into one message and exit code 1."""

from __future__ import annotations

from pathlib import Path


class CampaignError(Exception):
    """Base of the campaign runner's errors."""


class SpecError(CampaignError):
    """The campaign file (or an items file) is invalid; the message names file, line and field."""

    def __init__(self, path: Path | str, line: int | None, field: str, message: str) -> None:
        self.path = Path(path)
        self.line = line
        self.field = field
        self.message = message
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        prefix = f"{where}: {field}: " if field else f"{where}: "
        super().__init__(prefix + message)


class StageFailed(CampaignError):
    """One stage of an item failed (non-zero exit, timeout, or it could not be started)."""
