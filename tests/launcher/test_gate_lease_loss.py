"""`acb-run --gate` whose lease is lost while the command runs: the command's whole process group
is killed at once and acb-run exits with `ExitCode.LEASE_LOST`, saying so in one line. Real
acb-run, real assigner, real processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.exitcodes import ExitCode

StartAssigner = Callable[..., AssignerProcess]
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "acb-run")
ACB_RUN = (
    [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [sys.executable, "-m", "acb_slurm.launcher.cli"]
)


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie not yet reaped."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_lost_lease_kills_the_command_s_group_and_exits_lease_lost(
    start_assigner: StartAssigner, tmp_path: Path
) -> None:
    assigner = start_assigner(gpus=1)
    pids = tmp_path / "pids"
    # A script with a child of its own (what run_alphafold.sh is): both must stop.
    script = f"sleep 100 & echo $$ $! > {pids}.tmp && mv {pids}.tmp {pids}; wait"
    proc = subprocess.Popen(
        [*ACB_RUN, "--gate", "--", "sh", "-c", script],
        env=assigner.client_env(ACB_WORKER="gated"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(pids.exists, 30), "the command did not start"
        child, grandchild = (int(pid) for pid in pids.read_text().split())
        killed_at = time.monotonic()
        assigner.kill()  # the assigner dies: its grants are void, the GPU anyone's
        _, err = proc.communicate(timeout=20)
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == ExitCode.LEASE_LOST == 70, err
    assert took < 2.0, f"acb-run took {took:.2f}s to stop the command"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("acb-run: lease l-"), err
    assert "was lost while the command ran" in lines[0] and "killed" in lines[0]
    assert wait_until(lambda: gone(child) and gone(grandchild), 1.0), "the command outlived it"


def test_the_exit_status_is_in_the_help() -> None:
    shown = subprocess.run([*ACB_RUN, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"^\s*{int(ExitCode.LEASE_LOST)}\s+the lease was lost", shown.stdout, re.M)
