"""`acb-run --auto` when its lease is lost: a program holding the device stops at once with
`ExitCode.LEASE_LOST` and one line on stderr (its data is on a GPU it no longer holds); a program
whose state is in host memory just needs a new lease (and fails clearly when no assigner is left
to grant one). Real acb-run, real assigner, real torch on the `cpu` device."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from acb_slurm.assigner.testing import AssignerProcess, wait_for
from acb_slurm.assigner.testing import events_of as of
from acb_slurm.exitcodes import ExitCode

StartAssigner = Callable[..., AssignerProcess]
AUTO = [sys.executable, "-m", "acb_slurm.launcher.cli", "--auto", "--device", "cpu"]

#: "hold": keeps using the device (the lease stays held). "away": a CPU phase waiting for a line
#: on stdin (the state goes to host memory, the lease back), then the device again.
PROGRAM = textwrap.dedent(
    """
    import sys, time, torch
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    before = (x @ x).sum().item()
    print("phase1", flush=True)
    if sys.argv[1] == "hold":
        while True:
            y = (x @ x) / x.norm()
            time.sleep(0.005)
    sys.stdin.readline()
    print("phase2", (x @ x).sum().item() == before, flush=True)
    """
)


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "program.py"
    path.write_text(PROGRAM)
    return path


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(
    assigner: AssignerProcess, program: Path, mode: str, idle_ms: int, worker: str
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*AUTO, "--idle-ms", str(idle_ms), "--", sys.executable, str(program), mode],
        env=assigner.client_env(ACB_WORKER=worker),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    assert first == "phase1", first + (proc.stderr.read() if proc.poll() is not None else "")
    return proc


def test_a_program_holding_the_device_stops_when_its_assigner_dies(
    start_assigner: StartAssigner, program: Path, procs: list[subprocess.Popen[str]]
) -> None:
    assigner = start_assigner(gpus=1)
    proc = start(assigner, program, "hold", idle_ms=60_000, worker="holding")
    procs.append(proc)
    (grant,) = of(assigner.events(), "grant", worker="holding")
    killed_at = time.monotonic()
    assigner.kill()
    _, err = proc.communicate(timeout=20)
    took = time.monotonic() - killed_at
    assert proc.returncode == ExitCode.LEASE_LOST == 70, err
    assert took < 2.0, f"the program ran on for {took:.2f}s"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"acb-run --auto: lease {grant['lease']} was lost while the program")
    assert "(exit 70)" in lines[0]


def test_a_program_whose_state_is_away_takes_a_new_lease_from_a_restarted_assigner(
    start_assigner: StartAssigner, program: Path, procs: list[subprocess.Popen[str]]
) -> None:
    assigner = start_assigner(gpus=1)
    proc = start(assigner, program, "away", idle_ms=100, worker="away")
    procs.append(proc)
    wait_for(lambda: of(assigner.events(), "release", worker="away"), 20, "the idle release")
    assigner.kill()
    time.sleep(0.3)  # the program's session sees the end (it held nothing: nothing lost)
    assigner.start()
    out, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == ["phase2", "True"]
    assert of(assigner.events(), "grant", worker="away"), "no new lease from the new assigner"


def test_a_program_whose_state_is_away_fails_clearly_when_no_assigner_is_left(
    start_assigner: StartAssigner, program: Path, procs: list[subprocess.Popen[str]]
) -> None:
    assigner = start_assigner(gpus=1)
    proc = start(assigner, program, "away", idle_ms=100, worker="orphan")
    procs.append(proc)
    wait_for(lambda: of(assigner.events(), "release", worker="orphan"), 20, "the idle release")
    assigner.kill()
    out, err = proc.communicate("\n", timeout=60)
    assert proc.returncode not in (0, ExitCode.LEASE_LOST), err
    assert "phase2" not in out
    assert "AssignerUnavailable" in err and assigner.socket in err
