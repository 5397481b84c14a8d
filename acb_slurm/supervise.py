"""Run and supervise one child process: the one place that starts commands for `acb-run`
(`launcher.gate`), campaign stages (`campaign.runner`) and the per-node launcher
(`launcher.nodelaunch`, many children in one process).

    result = run_supervised(["python", "train.py"], env, forward=FORWARDED_SIGNALS)
    sys.exit(result.exit_status)       # 128+N when the child died of signal N

or, to kill it from another thread (a lost lease, a lost claim):

    child = Supervised(argv, env, timeout=3600)
    child.start()                      # from here on, child.kill("lease lost") works anywhere
    result = child.wait()

What it does:

- **Death signal.** The command starts through the exec wrapper `acb_slurm._deathwrap` (never
  ``preexec_fn``: the callers have threads, gRPC's), which arms ``PR_SET_PDEATHSIG = SIGKILL``,
  sets the niceness and clears the signal mask, then execs the command (same pid).
- **Process group** (``group=True``, the default). The child leads a new process group, which
  the supervisor owns whole: signals go to the group (a script's children get them too, once),
  a timeout or `kill()` SIGKILLs the group, what is left of the group when the child ends is
  killed, and a guard process (`_deathwrap.guard`) kills the group if this process is killed
  outright (the death signal only reaches the direct child). A process that supervises many
  children passes one shared `GroupGuard` instead (``guard=``): one guard process for all their
  groups rather than one Python process per child. With ``group=False`` the child
  stays in this process's group (an interactive command in the terminal's foreground group, so
  it can read the terminal); only the direct child is then signalled and killed, and SIGINT,
  which the terminal delivers to both processes, is not forwarded a second time. With
  ``session=True`` the child leads a new session (and so its own group): no controlling
  terminal at all (campaign stages).
- **Signal forwarding** (``forward``; main thread only). The handlers are installed before the
  child starts and put back after it ends; a signal that arrives before the child exists is
  kept and delivered once it does: none is lost, none kills this process with the child left
  behind. (A ``pthread_sigmask`` on the main thread would not do: the signal is then delivered
  to one of gRPC's threads, where SIGTERM's default action ends the process.)
- **Timeout**: the group is SIGKILLed `timeout` seconds after the start (`Result.timed_out`).
- **kill(reason)** from any thread (or a signal handler): SIGKILL to the group at once; before
  the start, the child is killed the moment it exists; after it was reaped, nothing (its pid
  is no longer ours to signal). `Result.killed` is the reason when the kill hit a live child.
- **Prompt wait**: a pidfd (Linux 5.3+) wakes the wait the moment the child exits (elsewhere
  it polls every 50 ms at most); it is polled with `poll()`, not `select()`, so a process with
  more than 1024 descriptors (hundreds of children) waits as well. The child is reaped with
  ``wait4``: `Result.cpu_s` is its own CPU time (and that of the descendants it waited for),
  not that of other children.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any

from acb_slurm import _deathwrap as deathwrap

#: What `acb-run` forwards to its command.
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
#: Exit status of a command that could not be exec'd (as a shell's "command not found").
CANNOT_START = deathwrap.CANNOT_START

_POLL_S = 0.05  # without a pidfd: the longest an exit goes unnoticed

# The shared guard (`GroupGuard`), run as ``python -S -I -c``: standard library only. It reads
# "+PGID" / "-PGID" lines; at end of input (its parent died, or closed the pipe at its end) it
# SIGKILLs every group still listed. The signals a job's end sends to every process of a step
# are ignored: the guard must outlive its parent to do its work.
_GROUP_GUARD = """
import os, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
groups = set()
for line in sys.stdin.buffer:
    try:
        op, pgid = line[:1], int(line[1:])
    except ValueError:
        continue
    if op == b"+":
        groups.add(pgid)
    else:
        groups.discard(pgid)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""

_File = int | IO[Any] | None


def exit_code(returncode: int) -> int:
    """A child's returncode as a shell reports it (128+N for death by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(frozen=True, slots=True)
class Result:
    """How a supervised child ended."""

    pid: int
    returncode: int  # as `Popen.returncode`: -N for death by signal N
    started: float  # time.time() at the start
    wall_s: float
    cpu_s: float  # user + system CPU of the child (and of the descendants it waited for)
    timed_out: bool = False
    killed: str | None = None  # the reason given to `kill()`, when it hit the running child

    @property
    def exit_status(self) -> int:
        """The exit status as a shell reports it (128+N for death by signal N)."""
        return exit_code(self.returncode)

    @property
    def signal(self) -> int | None:
        """The signal that ended the child, if one did."""
        return -self.returncode if self.returncode < 0 else None


class GroupGuard:
    """One guard process for the process groups of many children (`Supervised(guard=...)`).

    `deathwrap.guard` starts a Python process per child, about 10 MB and 15 ms of CPU each: too
    much for a launcher of hundreds of workers. This one guard learns each group as its child
    starts and forgets it when its child ends, over a pipe; when the pipe closes without a
    `close()` (this process was killed outright), it SIGKILLs every group it still knows. The
    pipe's write end stays in this process only (children are started with close_fds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process = subprocess.Popen(
            [sys.executable, "-S", "-I", "-c", _GROUP_GUARD],
            stdin=subprocess.PIPE,
            start_new_session=True,  # never in a group it guards, nor in the terminal's
        )

    def _send(self, line: str) -> None:
        stdin = self._process.stdin
        with self._lock:
            if stdin is None or stdin.closed:
                return
            with contextlib.suppress(BrokenPipeError, ValueError):
                stdin.write(line.encode())
                stdin.flush()

    def watch(self, pgid: int) -> None:
        """Kill group `pgid` if this process dies before `forget(pgid)`."""
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def close(self) -> None:
        """A normal end: the guard forgets everything and exits (it kills any group still
        watched, so call it after the children ended)."""
        with self._lock:
            if self._process.stdin is not None and not self._process.stdin.closed:
                with contextlib.suppress(BrokenPipeError):
                    self._process.stdin.close()
        self._process.wait()


class Supervised:
    """One supervised child: `start()`, then `wait()` (once); `kill()` and `send_signal()` from
    anywhere. See the module's documentation."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        group: bool = True,
        session: bool = False,
        forward: Iterable[int] = (),
        timeout: float | None = None,
        nice: int = 0,
        name: str = "acb",
        cwd: str | os.PathLike[str] | None = None,
        stdin: _File = None,
        stdout: _File = None,
        stderr: _File = None,
        guard: bool | GroupGuard = True,
    ) -> None:
        if not argv:
            raise ValueError("no command to run")
        self.argv = list(argv)
        self.env = None if env is None else dict(env)
        self.group = group or session
        self.session = session
        self.forward = tuple(forward)
        self.timeout = timeout
        self.nice = nice
        self.name = name
        self.cwd = cwd
        self._files = (stdin, stdout, stderr)
        self._lock = threading.RLock()  # reentrant: a signal handler may run while it is held
        self._child: subprocess.Popen[bytes] | None = None
        self._reaped = False
        self._kill_reason: str | None = None  # asked for (maybe before the start)
        self._killed: str | None = None  # done to the running child
        self._timed_out = False
        self._early: list[int] = []
        #: Every signal sent to the child (forwarded or `send_signal`), in order.
        self.signals_sent: list[int] = []
        self._previous: dict[int, Any] = {}
        self._guard_option = guard
        self._guard: subprocess.Popen[bytes] | None = None
        self._shared_guard: GroupGuard | None = None
        self._pidfd: int | None = None
        self._started = 0.0
        self._started_mono = 0.0
        self._cpu_s = 0.0

    @property
    def pid(self) -> int | None:
        """The child's pid once started."""
        return None if self._child is None else self._child.pid

    @property
    def running(self) -> bool:
        """Started and not reaped yet."""
        return self._child is not None and not self._reaped

    # ---- start ----

    def start(self) -> Supervised:
        """Install the forwarding handlers, then start the child (`OSError` if it cannot be
        started at all; a command that cannot be exec'd exits `CANNOT_START` instead)."""
        if self._child is not None:
            raise RuntimeError("already started")
        self._previous = {signum: signal.signal(signum, self._forward) for signum in self.forward}
        stdin, stdout, stderr = self._files
        session = self.session
        try:
            child = subprocess.Popen(
                deathwrap.command(self.argv, nice=self.nice, name=self.name),
                env=self.env,
                cwd=self.cwd,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                process_group=0 if self.group and not session else None,
                start_new_session=session,
            )
        except BaseException:
            self._restore_handlers()
            raise
        self._started = time.time()
        self._started_mono = time.monotonic()
        with contextlib.suppress(AttributeError, OSError):
            self._pidfd = os.pidfd_open(child.pid)
        if self.group:
            # If this process is killed outright, the guard kills the child's whole group.
            if isinstance(self._guard_option, GroupGuard):
                self._shared_guard = self._guard_option
                self._shared_guard.watch(child.pid)
            elif self._guard_option:
                self._guard = deathwrap.guard(child.pid)
        with self._lock:
            self._child = child
            if self._kill_reason is not None:  # asked before the child existed
                self._kill_now(self._kill_reason)
        while self._early:  # sent before the child was there: it has not had them
            self._deliver(self._early.pop(0), sent_to_us_only=True)
        return self

    # ---- signals ----

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        # Python runs this in the main thread, between two bytecodes of whatever it does.
        if self._child is None:
            self._early.append(signum)
        else:
            self._deliver(signum, sent_to_us_only=False)

    def _deliver(self, signum: int, sent_to_us_only: bool) -> None:
        if not self.group and signum == signal.SIGINT and not sent_to_us_only:
            return  # the terminal sent it to the child too
        self.send_signal(signum)

    def send_signal(self, signum: int) -> None:
        """Send `signum` to the child's group (to the child alone with ``group=False``); before
        the start it is kept and sent once the child exists; after the end, nothing."""
        with self._lock:
            self.signals_sent.append(signum)
            child = self._child
            if child is None:
                self._early.append(signum)
                return
            if self._reaped:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if self.group:
                    os.killpg(child.pid, signum)
                else:
                    os.kill(child.pid, signum)

    def kill(self, reason: str = "killed") -> bool:
        """SIGKILL the child's group now (thread-safe); before the start, as soon as it exists.
        Returns False when the child had already been reaped (nothing was killed)."""
        with self._lock:
            if self._kill_reason is None:
                self._kill_reason = reason
            if self._child is None:
                return True
            if self._reaped:
                return False
            self._kill_now(reason)
            return True

    def _kill_now(self, reason: str) -> None:
        """Under the lock, the child started and not reaped (its pid, and so its group id, are
        still ours: a zombie keeps both)."""
        assert self._child is not None
        if self._killed is None:
            self._killed = reason
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.group:
                os.killpg(self._child.pid, signal.SIGKILL)
            else:
                os.kill(self._child.pid, signal.SIGKILL)

    # ---- wait ----

    def wait(self) -> Result:
        """Wait for the child (killing its group at the timeout), then clean up: what is left
        of its group is killed, the guard stopped, the signal handlers put back. If the wait is
        interrupted (an exception in a signal handler), the child's group is killed first."""
        child = self._child
        if child is None:
            raise RuntimeError("not started")
        deadline = None if self.timeout is None else self._started_mono + self.timeout
        try:
            while not self._reaped:
                slice_s: float | None = None
                if deadline is not None and not self._timed_out:
                    slice_s = deadline - time.monotonic()
                    if slice_s <= 0:
                        with self._lock:
                            if not self._reaped:
                                self._timed_out = True
                                self._kill_now(f"timed out after {self.timeout:g}s")
                        slice_s = None
                self._wait_exit(slice_s)
                self._reap(block=False)
        finally:
            self._finish()
        assert child.returncode is not None
        return Result(
            pid=child.pid,
            returncode=child.returncode,
            started=self._started,
            wall_s=time.monotonic() - self._started_mono,
            cpu_s=self._cpu_s,
            timed_out=self._timed_out,
            killed=None if self._timed_out else self._killed,
        )

    def _wait_exit(self, timeout: float | None) -> None:
        """Return once the child has exited, or after `timeout` seconds."""
        if self._pidfd is not None:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            # PEP 475: retried after signal handlers. poll() takes milliseconds, None = forever.
            poller.poll(None if timeout is None else max(0.0, timeout) * 1000)
        else:
            time.sleep(_POLL_S if timeout is None else max(0.0, min(timeout, _POLL_S)))

    def _reap(self, block: bool) -> None:
        child = self._child
        assert child is not None
        with self._lock:
            if self._reaped:
                return
            try:
                pid, status, usage = os.wait4(child.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored?): status unknown
                child.returncode = child.poll() if child.returncode is None else child.returncode
                if child.returncode is None:
                    child.returncode = 0
                self._reaped = True
                return
            if pid == 0:
                return
            child.returncode = os.waitstatus_to_exitcode(status)
            self._cpu_s = usage.ru_utime + usage.ru_stime
            self._reaped = True

    def _finish(self) -> None:
        child = self._child
        assert child is not None
        if not self._reaped:  # interrupted: nothing of the command outlives the wait
            self.kill("the supervisor was interrupted")
            self._reap(block=True)
        if self._guard is not None:
            deathwrap.stop_guard(self._guard, child.pid)  # and the rest of the group with it
            self._guard = None
        if self._shared_guard is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)  # what is left of the group
            self._shared_guard.forget(child.pid)
            self._shared_guard = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def run_supervised(
    argv: Sequence[str], env: Mapping[str, str] | None = None, **options: Any
) -> Result:
    """Start `argv` supervised (options as `Supervised`) and wait for it."""
    return Supervised(argv, env, **options).start().wait()
