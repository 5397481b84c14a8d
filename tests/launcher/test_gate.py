"""`acb-run --gate` as a real process against a real acb-assigner."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from acb_slurm import _deathwrap, env
from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.client import Client
from acb_slurm.exitcodes import ExitCode
from acb_slurm.scheduler.replay import replay

StartAssigner = Callable[..., AssignerProcess]
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "acb-run")
#: The installed console script when there is one (what users run), else the module.
ACB_RUN = (
    [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [sys.executable, "-m", "acb_slurm.launcher.cli"]
)

#: A child that reports its environment, then waits for a signal and records it.
SIGNALLED_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    marker = sys.argv[1]
    def on_signal(signum, frame):
        with open(marker, "w") as fh:
            fh.write(signal.Signals(signum).name)
        sys.exit(7)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(os.environ["CUDA_VISIBLE_DEVICES"], os.environ["ACB_LEASE_ID"], flush=True)
    time.sleep(120)
    """
)


def command_children(pid: int) -> list[int]:
    """The children of `pid` that run the command (not the guard of its process group)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [
        int(child)
        for child in children.stdout.split()
        if b"--guard" not in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
    ]


def acb_run(assigner: AssignerProcess | None, *args: str, **kwargs: Any) -> Any:
    environ = (
        assigner.client_env()
        if assigner
        else {k: v for k, v in os.environ.items() if not k.startswith("ACB_")}
    )
    return subprocess.run(
        [*ACB_RUN, *args], env=environ, capture_output=True, text=True, timeout=60, **kwargs
    )


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("raise SystemExit(0)", 0),
        ("raise SystemExit(3)", 3),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 128 + signal.SIGTERM),
    ],
    ids=["success", "exit-3", "killed-by-sigterm"],
)
def test_exit_code_of_the_child_comes_back(
    start_assigner: StartAssigner, script: str, expected: int
) -> None:
    assigner = start_assigner(gpus=1)
    result = acb_run(assigner, "--gate", "--", sys.executable, "-c", script)
    assert result.returncode == expected, result.stderr
    events = assigner.events()
    assert [e["event"] for e in events if e["event"] in ("grant", "release")] == [
        "grant",
        "release",
    ]


def test_child_sees_its_granted_gpus(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=3, policy="gpu-affinity")
    code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['ACB_LEASE_ID'])"
    result = acb_run(
        assigner, "--gate", "--gpus", "2", "--label", "fold", "--", sys.executable, "-c", code
    )
    assert result.returncode == 0, result.stderr
    devices, lease_id = result.stdout.split()
    assert devices == "0,1"
    (grant,) = [e for e in assigner.events() if e["event"] == "grant"]
    assert grant["lease"] == lease_id
    assert grant["device_ids"] == ["0", "1"]


def test_a_worker_gets_its_gpu_back_on_its_next_run_under_gpu_affinity(
    start_assigner: StartAssigner,
) -> None:
    # One `acb-run --gate` per item: each run is a new process and a new session, but the same
    # worker. Another worker takes a GPU between its runs and still holds it during the second.
    assigner = start_assigner(gpus=4, policy="gpu-affinity")
    code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"

    def run_item() -> str:
        result = subprocess.run(
            [*ACB_RUN, "--gate", "--", sys.executable, "-c", code],
            env=assigner.client_env(**{env.JOB_ID: "job-7", env.WORKER: "worker-a"}),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    first = run_item()
    with Client(target=assigner.target, token="", job_id="job-7", worker="worker-b") as other:
        taken = other.allocate(timeout=10)
        assert taken.device_ids != (first,), "the other worker took worker-a's last GPU"
        second = run_item()
    assert second == first
    requests = [e for e in assigner.events() if e["event"] == "request"]
    assert [r["affinity_key"] for r in requests] == [
        "job-7/worker-a",
        "job-7/worker-b",
        "job-7/worker-a",
    ]
    replay(assigner.events())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signals_are_forwarded_to_the_child(
    start_assigner: StartAssigner, tmp_path: Path, signum: signal.Signals
) -> None:
    assigner = start_assigner(gpus=1)
    marker = tmp_path / "signal.txt"
    proc = subprocess.Popen(
        [*ACB_RUN, "--gate", "--", sys.executable, "-c", SIGNALLED_CHILD, str(marker)],
        env=assigner.client_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    devices, _lease = proc.stdout.readline().split()
    assert devices == "0"
    proc.send_signal(signum)
    proc.wait(timeout=30)
    assert marker.read_text() == signum.name
    assert proc.returncode == 7
    releases = [e for e in assigner.events() if e["event"] == "release"]
    assert [r["reason"] for r in releases] == ["release"]


def test_sigkilled_launcher_gives_the_lease_back(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=1)
    proc = subprocess.Popen(
        [
            *ACB_RUN,
            "--gate",
            "--",
            sys.executable,
            "-c",
            "import time; print(1, flush=True); time.sleep(120)",
        ],
        env=assigner.client_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    (child,) = command_children(proc.pid)
    proc.kill()
    proc.wait()
    with contextlib.suppress(ProcessLookupError):  # it died with acb-run (PR_SET_PDEATHSIG)
        os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not [e for e in assigner.events() if e["event"] == "release"]:
        assert time.monotonic() < deadline, "lease of a SIGKILLed acb-run not released"
        time.sleep(0.02)
    (release,) = [e for e in assigner.events() if e["event"] == "release"]
    assert release["reason"] == "disconnect"


def test_without_an_assigner_it_says_what_to_set() -> None:
    result = acb_run(None, "--gate", "--", "true")
    assert result.returncode == ExitCode.ASSIGNER_UNAVAILABLE
    assert "ACB_ASSIGNER is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_impossible_grant_is_a_clear_error(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=1)
    result = acb_run(assigner, "--gate", "--gpus", "2", "--", "true")
    assert result.returncode == ExitCode.BAD_REQUEST
    assert "asks for 2 GPUs" in result.stderr


def test_a_timeout_while_waiting_is_a_clear_error(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=1)
    with subprocess.Popen(
        [
            *ACB_RUN,
            "--gate",
            "--",
            sys.executable,
            "-c",
            "import time; print(1, flush=True); time.sleep(60)",
        ],
        env=assigner.client_env(),
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None
        holder.stdout.readline()
        result = acb_run(assigner, "--gate", "--timeout", "0.3", "--", "true")
        holder.send_signal(signal.SIGTERM)
    assert result.returncode == ExitCode.NO_GRANT
    assert "no GPU granted within 0.3s" in result.stderr


def test_without_a_mode_it_asks_to_pick_one() -> None:
    result = acb_run(None, "--", "true")
    assert result.returncode == ExitCode.USAGE
    assert "pick a mode" in result.stderr
    assert "--gate" in result.stderr


def test_help_teaches_both_modes_with_examples() -> None:
    result = acb_run(None, "--help")
    assert result.returncode == 0, result.stderr
    for example in (
        "acb-run --gate -- python fold.py",
        "acb-run --gate --gpus 2 --memory 20GiB -- ",
        "acb-run --auto -- python train.py",
    ):
        assert example in result.stdout
    assert "--memory SIZE" in result.stdout
    assert "<bool>" not in result.stdout


@pytest.mark.parametrize("terminal", [False, True], ids=["batch", "terminal"])
def test_child_has_its_own_process_group_unless_stdin_is_a_terminal(
    start_assigner: StartAssigner, terminal: bool
) -> None:
    assigner = start_assigner(gpus=1)
    code = "import os; print(os.getpgrp() == os.getpgid(os.getppid()))"
    primary, secondary = os.openpty() if terminal else (None, None)
    try:
        result = subprocess.run(
            [*ACB_RUN, "--gate", "--", sys.executable, "-c", code],
            env=assigner.client_env(),
            stdin=secondary if terminal else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        for fd in (primary, secondary):
            if fd is not None:
                os.close(fd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(terminal)


def test_a_sigkilled_launcher_takes_its_child_with_it(start_assigner: StartAssigner) -> None:
    """The child must not keep using a GPU whose lease the assigner already gave back."""
    assigner = start_assigner(gpus=1)
    proc = subprocess.Popen(
        [*ACB_RUN, "--gate", "--", sys.executable, "-c", "import time; print(1, flush=True); "
         "time.sleep(120)"],
        env=assigner.client_env(),
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.readline()  # the command itself runs (the wrapper exec'd it, same pid)
    (child,) = command_children(proc.pid)
    proc.kill()
    proc.wait()
    killed = time.monotonic()
    while time.monotonic() - killed < 1.0:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # A zombie (dead, not yet reaped by init) counts as dead.
        with open(f"/proc/{child}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived a SIGKILLed acb-run by more than 1 s")


def test_a_failed_release_keeps_the_childs_exit_code(
    start_assigner: StartAssigner, caplog: pytest.LogCaptureFixture
) -> None:
    from acb_slurm.client.errors import AssignerError
    from acb_slurm.launcher.gate import GateSpec, run_gated

    class RefusingClient(Client):
        """A real client whose release is refused after the real one ran (the assigner
        unreachable at that moment looks the same to acb-run)."""

        def release(self, lease: Any) -> None:
            super().release(lease)
            raise AssignerError("release refused: the assigner is unreachable")

    assigner = start_assigner(gpus=1)
    client = RefusingClient(target=assigner.target, token="", worker="gate-release")
    try:
        code = run_gated(
            GateSpec(command=[sys.executable, "-c", "raise SystemExit(3)"]), client=client
        )
    finally:
        client.close()
    assert code == 3
    assert "releasing lease" in caplog.text and "unreachable" in caplog.text


def test_the_exec_wrapper_clears_the_signal_mask_and_names_its_caller() -> None:
    """The shared wrapper (`acb_slurm._deathwrap`) execs in place with no signal blocked, though
    its parent blocked some while starting it; a missing command is named with the caller."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGUSR1])
    try:
        shown = subprocess.run(
            _deathwrap.command(["grep", "^SigBlk", "/proc/self/status"], name="acb-run"),
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    assert shown.returncode == 0, shown.stderr
    assert int(shown.stdout.split()[1], 16) == 0
    missing = subprocess.run(
        _deathwrap.command(["no-such-command-acb"], name="acb-run"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == _deathwrap.CANNOT_START
    assert missing.stderr.startswith("acb-run: cannot start 'no-such-command-acb'")


# ---- the whole process tree ------------------------------------------------------------------

#: A script that starts a grandchild (what `run_alphafold.sh` does), records its pid, and waits.
TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    open(sys.argv[1], "w").write(str(grandchild.pid))
    if sys.argv[2] == "wait":
        time.sleep(300)
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"  # a zombie waits only for its reaper


def wait_for_file(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.02)
    return predicate()


def test_what_the_command_started_is_gone_before_the_lease_goes_back(
    start_assigner: StartAssigner, tmp_path: Path
) -> None:
    assigner = start_assigner(gpus=1)
    pidfile = tmp_path / "grandchild"
    result = acb_run(
        assigner,
        "--gate",
        "--",
        sys.executable,
        "-c",
        TREE,
        str(pidfile),
        "exit",
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert not alive(int(pidfile.read_text())), "the command's child outlived acb-run"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_acb_run_kills_the_command_s_children_too(
    start_assigner: StartAssigner, tmp_path: Path, how: signal.Signals
) -> None:
    assigner = start_assigner(gpus=1)
    pidfile = tmp_path / "grandchild"
    run = subprocess.Popen(
        [*ACB_RUN, "--gate", "--", sys.executable, "-c", TREE, str(pidfile), "wait"],
        env=assigner.client_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        grandchild = int(wait_for_file(pidfile))
        assert alive(grandchild)
        run.send_signal(how)
        run.wait(timeout=30)
        assert until(lambda: not alive(grandchild)), f"the grandchild survived {how.name}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            run.kill()
        run.wait(timeout=30)


def test_a_command_that_cannot_start_exits_as_acb_run_help_says(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1)
    result = acb_run(assigner, "--gate", "--", "no-such-command-acb")
    assert result.returncode == ExitCode.CANNOT_START, result.stderr
    assert "cannot start 'no-such-command-acb': command not found" in result.stderr
