"""Submission backends: a small registry (`cli`, `pyslurm`), chosen by what this machine has.

The sbatch CLI always works. pyslurm is used only when it is importable AND built for the same
Slurm major.minor as `sbatch --version` reports: a mismatched pyslurm fails in confusing ways.
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from acb_slurm.slurm.commands import (
    parse_sbatch_parsable,
    parse_slurm_version,
    parse_test_only,
    run_slurm,
    slurm_version,
)
from acb_slurm.slurm.errors import AcbSlurmError, SlurmError


class Submitter(ABC):
    """Hands a rendered batch script to Slurm."""

    name: str = ""

    @classmethod
    def unavailable_because(cls) -> str | None:
        """None when usable on this machine, else why not."""
        return None

    @abstractmethod
    def submit(self, script: str, *, cwd: str) -> str:
        """Submit; return the job id."""

    def test_only(self, script: str, *, cwd: str) -> dict[str, str]:
        """Ask Slurm whether it would accept the script, submitting nothing (sbatch --test-only)."""
        result = run_slurm(["sbatch", "--test-only"], stdin=script, cwd=cwd)
        return parse_test_only(result.stderr + result.stdout)


_REGISTRY: dict[str, type[Submitter]] = {}


def register_submitter(cls: type[Submitter]) -> type[Submitter]:
    """Add a backend under `cls.name`; a second one with the same name is refused."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"a submitter named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_submitters() -> list[str]:
    return sorted(_REGISTRY)


def get_submitter(name: str) -> Submitter:
    """The backend registered as `name`; unknown names list the known ones."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise AcbSlurmError(
            f"unknown submitter {name!r}; known: {', '.join(available_submitters())}"
        ) from None
    reason = cls.unavailable_because()
    if reason:
        raise AcbSlurmError(f"submitter {name!r} cannot be used here: {reason}")
    return cls()


def choose_submitter() -> Submitter:
    """pyslurm when it matches the installed Slurm, else the sbatch CLI."""
    if PyslurmSubmitter.unavailable_because() is None:
        return PyslurmSubmitter()
    return CliSubmitter()


@register_submitter
class CliSubmitter(Submitter):
    """`sbatch --parsable` with the script on stdin."""

    name = "cli"

    def submit(self, script: str, *, cwd: str) -> str:
        result = run_slurm(["sbatch", "--parsable"], stdin=script, cwd=cwd)
        return parse_sbatch_parsable(result.stdout)


@register_submitter
class PyslurmSubmitter(Submitter):
    """pyslurm's JobSubmitDescription (pyslurm >= 22.5), reading the script's #SBATCH lines."""

    name = "pyslurm"

    @classmethod
    def unavailable_because(cls) -> str | None:
        try:
            import pyslurm  # type: ignore[import-not-found]
        except ImportError:
            return "pyslurm is not installed"
        version = getattr(pyslurm, "__version__", "")
        try:
            theirs = parse_slurm_version(version)
        except SlurmError:
            return f"pyslurm reports no version ({version!r})"
        try:
            ours = slurm_version()
        except SlurmError as exc:
            return str(exc)
        if theirs != ours:
            return (
                f"pyslurm {version} is built for Slurm {theirs[0]}.{theirs[1]:02d} but sbatch is "
                f"{ours[0]}.{ours[1]:02d}"
            )
        if not hasattr(pyslurm, "JobSubmitDescription"):
            return f"pyslurm {version} has no JobSubmitDescription"
        return None

    def submit(self, script: str, *, cwd: str) -> str:  # pragma: no cover - needs pyslurm
        import pyslurm

        fd, path = tempfile.mkstemp(prefix="acb-job-", suffix=".sh", dir=cwd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(script)
            desc = pyslurm.JobSubmitDescription(script=path, working_directory=cwd)
            desc.load_sbatch_options()
            try:
                return str(desc.submit())
            except Exception as exc:  # pyslurm raises its own RPCError
                raise SlurmError(f"pyslurm could not submit: {exc}") from None
        finally:
            Path(path).unlink(missing_ok=True)
