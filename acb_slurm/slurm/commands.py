"""Every Slurm command goes through `run_slurm`; the parsers of their output live beside it.

The parsers are tested on output recorded from a real Slurm 22.05 (tests/slurm/data/).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Sequence

from acb_slurm.slurm.errors import SlurmError

#: Seconds a Slurm command may take before we give up on it.
DEFAULT_TIMEOUT = 60.0


def run_slurm(
    argv: Sequence[str],
    *,
    stdin: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run one Slurm command with captured output; SlurmError quotes Slurm's stderr on failure."""
    command = shlex.join(argv)
    try:
        result = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise SlurmError(
            f"{argv[0]} not found: is Slurm installed and on PATH? "
            "(for a local test cluster: sudo scripts/slurm-dev-cluster up)"
        ) from None
    except subprocess.TimeoutExpired:
        raise SlurmError(
            f"`{command}` did not answer within {timeout:.0f}s: is slurmctld running "
            "(scontrol ping)?"
        ) from None
    if check and result.returncode != 0:
        said = result.stderr.strip() or result.stdout.strip() or "(no output)"
        said = said.replace("\n", "\n  ")
        raise SlurmError(f"`{command}` failed (exit {result.returncode}):\n  {said}")
    return result


# ---- parsers ---------------------------------------------------------------------------------

_PARSABLE = re.compile(r"^(\d+)(?:_\d+)?(?:;(\S+))?$")


def parse_sbatch_parsable(stdout: str) -> str:
    """The job id from `sbatch --parsable` ("123" or "123;cluster")."""
    lines = [line.strip() for line in stdout.strip().splitlines() if line.strip()]
    match = _PARSABLE.match(lines[-1]) if lines else None
    if not match:
        raise SlurmError(
            f"could not read a job id from sbatch --parsable output {stdout!r}; the job may have "
            "been submitted anyway: check `squeue --me`"
        )
    return match.group(1)


_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def parse_slurm_version(stdout: str) -> tuple[int, int]:
    """(major, minor) from `sbatch --version` ("slurm-wlm 22.05.8", "slurm 23.11.1")."""
    match = _VERSION.search(stdout)
    if not match:
        raise SlurmError(f"could not read a Slurm version from {stdout.strip()!r}")
    return int(match.group(1)), int(match.group(2))


def parse_hostnames(stdout: str) -> list[str]:
    """Node names from `scontrol show hostnames`, one per line."""
    return [line.strip() for line in stdout.splitlines() if line.strip()]


_KEY = re.compile(r"^([A-Za-z][A-Za-z0-9_:/]*)=(.*)$")


def parse_scontrol_record(stdout: str) -> dict[str, str]:
    """Key=Value pairs of one `scontrol show job|node` record (values may contain spaces)."""
    fields: dict[str, str] = {}
    last: str | None = None
    for token in stdout.split():
        match = _KEY.match(token)
        if match:
            last = match.group(1)
            fields[last] = match.group(2)
        elif last is not None:
            fields[last] += " " + token
    return fields


def parse_exit_code(text: str) -> tuple[int, int]:
    """(exit status, signal) from scontrol's ExitCode=N:S."""
    status, _, signal = text.partition(":")
    try:
        return int(status), int(signal or 0)
    except ValueError:
        raise SlurmError(f"could not read an exit code from {text!r}") from None


_TEST_ONLY = re.compile(r"Job (\d+) to start at (\S+) using (\d+) processors on nodes (\S+)")


def parse_test_only(stderr: str) -> dict[str, str]:
    """What `sbatch --test-only` promised: job id, start time, processors, nodes."""
    match = _TEST_ONLY.search(stderr)
    if not match:
        raise SlurmError(f"could not read sbatch --test-only's answer: {stderr.strip()!r}")
    job, start, cpus, nodes = match.groups()
    return {"job_id": job, "start": start, "processors": cpus, "nodes": nodes}


# ---- small wrappers used by the CLI ---------------------------------------------------------


def slurm_version() -> tuple[int, int]:
    return parse_slurm_version(run_slurm(["sbatch", "--version"]).stdout)


def show_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o JOBID` as a dict; SlurmError when Slurm no longer knows the job."""
    return parse_scontrol_record(run_slurm(["scontrol", "show", "job", "-o", job_id]).stdout)


def cancel_job(job_id: str) -> None:
    run_slurm(["scancel", job_id])
