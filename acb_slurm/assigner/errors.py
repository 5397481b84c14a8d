"""Errors of the assigner daemon that stop it from starting; the CLI turns them into one message."""

from __future__ import annotations


class AssignerStartError(RuntimeError):
    """The daemon cannot start as configured (no GPUs, bad flag value, socket in use, ...).

    `exit_code` is what the CLI exits with: 2 for usage errors, 1 for everything else.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
