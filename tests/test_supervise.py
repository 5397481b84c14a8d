"""The process supervisor (`acb_slurm.supervise`) with real processes: exit statuses, signals
forwarded (also those that come before the child exists), the group killed at the end, at a
timeout and from another thread, the child's own CPU time, and a killed supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from acb_slurm.supervise import (
    CANNOT_START,
    FORWARDED_SIGNALS,
    Result,
    Supervised,
    exit_code,
    run_supervised,
)


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie not yet reaped."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def pids_of(path: Path, timeout: float = 10.0) -> list[int]:
    assert wait_until(path.exists, timeout), "the command did not start"
    return [int(p) for p in path.read_text().split()]


def with_grandchild(pids: Path, then: str = "wait") -> list[str]:
    """sh that starts `sleep 100` in the background, writes both pids, then runs `then`."""
    return ["sh", "-c", f"sleep 100 & echo $$ $! > {pids}.tmp && mv {pids}.tmp {pids}; {then}"]


def test_exit_codes_are_reported_as_a_shell_does() -> None:
    assert run_supervised(["sh", "-c", "exit 0"]).exit_status == 0
    three = run_supervised(["sh", "-c", "exit 3"])
    assert (three.returncode, three.exit_status, three.signal) == (3, 3, None)
    termed = run_supervised(["sh", "-c", "kill -TERM $$"])
    assert termed.returncode == -signal.SIGTERM
    assert termed.exit_status == 128 + signal.SIGTERM == 143
    assert termed.signal == signal.SIGTERM
    assert not termed.timed_out and termed.killed is None
    assert exit_code(-9) == 137 and exit_code(5) == 5


def test_a_command_that_cannot_be_execd_exits_127_and_says_so(tmp_path: Path) -> None:
    err = tmp_path / "err"
    with open(err, "wb") as fh:
        result = run_supervised(["/no/such/program"], name="acb-test", stderr=fh)
    assert result.exit_status == CANNOT_START == 127
    assert "acb-test: cannot start '/no/such/program'" in err.read_text()


def test_what_the_command_left_in_its_group_is_killed_at_its_end(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    result = run_supervised(with_grandchild(pids, then="exit 4"))
    assert result.exit_status == 4
    _, grandchild = pids_of(pids)
    assert wait_until(lambda: gone(grandchild), 2.0), "the background sleep outlived the command"


def test_without_a_group_only_the_child_is_the_supervisors(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    result = run_supervised(with_grandchild(pids, then="exit 0"), group=False)
    assert result.exit_status == 0
    _, grandchild = pids_of(pids)
    try:
        time.sleep(0.2)
        assert not gone(grandchild), "group=False must not kill this process's own group"
    finally:
        os.kill(grandchild, signal.SIGKILL)


class _RaiseWhenUsed(os.PathLike[str]):
    """A cwd whose path is looked up inside `Popen`, before the child exists: this process gets
    `signum` right then (a real signal, handled at once in the main thread)."""

    def __init__(self, path: Path, signum: int) -> None:
        self.path, self.signum, self.raised = path, signum, 0

    def __fspath__(self) -> str:
        if not self.raised:
            self.raised += 1
            signal.raise_signal(self.signum)
        return str(self.path)


def test_a_signal_that_comes_before_the_child_exists_is_delivered_once_it_does(
    tmp_path: Path,
) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    cwd = _RaiseWhenUsed(tmp_path, signal.SIGUSR1)
    # Without forwarding, SIGUSR1 would end this test process; without early delivery the
    # child would sleep until the timeout.
    result = run_supervised(["sleep", "30"], forward=FORWARDED_SIGNALS, timeout=20, cwd=cwd)
    assert cwd.raised == 1
    assert not result.timed_out
    assert result.signal == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before, "the previous handler was not put back"


def test_signals_are_forwarded_to_the_whole_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    child = Supervised(with_grandchild(pids), forward=FORWARDED_SIGNALS, timeout=20).start()
    sent = threading.Thread(
        target=lambda: (pids_of(pids), os.kill(os.getpid(), signal.SIGHUP)), daemon=True
    )
    sent.start()
    result = child.wait()
    sent.join()
    assert not result.timed_out and result.signal == signal.SIGHUP
    assert wait_until(lambda: all(gone(pid) for pid in pids_of(pids)), 2.0)


def test_a_timeout_kills_the_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    result = run_supervised(with_grandchild(pids), timeout=0.5)
    assert result.timed_out and result.killed is None
    assert result.signal == signal.SIGKILL and result.exit_status == 137
    assert 0.5 <= result.wall_s < 3.0
    assert wait_until(lambda: all(gone(pid) for pid in pids_of(pids)), 2.0)


def test_kill_from_another_thread_stops_the_group_at_once(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    child = Supervised(with_grandchild(pids))
    killed_at: list[float] = []

    def lose() -> None:
        pids_of(pids)
        killed_at.append(time.monotonic())
        assert child.kill("lease lost")

    thread = threading.Thread(target=lose, daemon=True)
    child.start()
    thread.start()
    result = child.wait()
    returned = time.monotonic()
    thread.join()
    assert result.killed == "lease lost" and not result.timed_out
    assert result.signal == signal.SIGKILL
    assert returned - killed_at[0] < 0.5, "the wait did not notice the kill promptly"
    assert wait_until(lambda: all(gone(pid) for pid in pids_of(pids)), 2.0)
    assert not child.kill("too late"), "a reaped child is no longer the supervisor's to kill"


def test_a_kill_before_the_start_kills_the_child_as_soon_as_it_exists() -> None:
    child = Supervised(["sleep", "30"])
    assert child.kill("lost before the start")
    result = child.start().wait()
    assert result.killed == "lost before the start" and result.signal == signal.SIGKILL
    assert result.wall_s < 5


def test_the_childs_own_cpu_time_is_measured() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
    busy = run_supervised([sys.executable, "-S", "-c", burn])
    assert busy.exit_status == 0 and busy.cpu_s >= 0.35, busy
    idle = run_supervised(["sleep", "0.5"])
    assert idle.wall_s >= 0.5 and idle.cpu_s < 0.2, idle
    assert isinstance(idle, Result) and idle.started <= time.time()


def test_an_exception_in_the_wait_kills_the_group_before_it_propagates(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    child = Supervised(with_grandchild(pids))
    thread = threading.Thread(
        target=lambda: (pids_of(pids), os.kill(os.getpid(), signal.SIGINT)), daemon=True
    )
    child.start()
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        child.wait()
    thread.join()
    assert wait_until(lambda: all(gone(pid) for pid in pids_of(pids)), 2.0)


def test_a_sigkilled_supervisor_takes_the_whole_group_with_it(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = textwrap.dedent(
        f"""
        from acb_slurm.supervise import run_supervised
        run_supervised({with_grandchild(pids)!r})
        """
    )
    supervisor = subprocess.Popen([sys.executable, "-c", script])
    try:
        child, grandchild = pids_of(pids, timeout=30)
        supervisor.kill()
        supervisor.wait(10)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    assert wait_until(lambda: gone(child) and gone(grandchild), 5.0), "the command outlived it"


def test_a_session_or_a_group_of_its_own_or_this_processs_group(tmp_path: Path) -> None:
    out = tmp_path / "stat"
    me = os.getpid()
    show = ["sh", "-c", f"cut -d' ' -f5,6 /proc/$$/stat > {out}; echo $$ >> {out}"]

    def ids(**options: object) -> tuple[int, int, int]:
        assert run_supervised(show, **options).exit_status == 0  # type: ignore[arg-type]
        pgrp, sid, pid = out.read_text().split()
        return int(pgrp), int(sid), int(pid)

    pgrp, sid, pid = ids()
    assert pgrp == pid and sid == os.getsid(me)
    pgrp, sid, pid = ids(session=True)
    assert pgrp == sid == pid
    pgrp, sid, pid = ids(group=False)
    assert pgrp == os.getpgid(me) and sid == os.getsid(me)
