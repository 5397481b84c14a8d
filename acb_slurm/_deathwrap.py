"""Start a command that dies with its parent, without ``preexec_fn``.

    python -S -I _deathwrap.py [--name=NAME] PARENT_PID NICE -- CMD...

A process with threads (the gRPC client has them: `acb-run`, the campaign worker) may only call
async-signal-safe functions between fork() and exec(), so no Python code may run there. Such a
process starts this script (`command()` builds the line) instead, and it does the set-up in a
fresh single-threaded process before exec'ing CMD in place (same pid, session, process group):

- PR_SET_PDEATHSIG = SIGKILL: CMD dies with PARENT_PID, so a killed parent never leaves a
  program running on a GPU whose lease died with it. If the parent died before the call (the
  parent is no longer PARENT_PID), CMD does not start: exit 137, as if SIGKILLed with it. Where
  there is no prctl (not Linux) it goes on without one; a prctl that fails refuses to start.
- niceness NICE (campaign cpu stages default to 10; `acb-run` uses 0).
- an empty signal mask (a caller may have signals blocked while it starts the child; the
  mask would otherwise be inherited across exec).

The same script guards a whole process group (``--guard``): `guard()` starts it beside a child
that leads its own group. The death signal only reaches the direct child, so a script's own
children would outlive a killed parent and go on using the GPU; the guard waits for its parent's
death (PR_SET_PDEATHSIG = SIGTERM, caught), then kills the group with SIGKILL. On a normal end
the parent kills the group itself and then the guard (`stop_guard`).

Standard library only and run with -S -I (no site, no environment), so it needs nothing
installed and starts fast (about 15 ms). A CMD that cannot be exec'd exits 127 with the reason
on stderr, prefixed with NAME (default ``acb``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a guard is started, not by the exec wrapper (start-up time)
    import subprocess

_PR_SET_PDEATHSIG = 1
#: Exit status when CMD cannot be started (as a shell's "command not found").
CANNOT_START = 127
#: Exit status when the parent died before the death signal was armed.
PARENT_GONE = 128 + signal.SIGKILL
#: This script, as `command()` runs it.
WRAPPER = os.path.abspath(__file__)


def command(
    argv: Sequence[str], *, nice: int = 0, name: str = "acb", parent_pid: int | None = None
) -> list[str]:
    """The command line that runs `argv` as a child of `parent_pid` (default: this process)
    that dies with it, at niceness `nice`."""
    parent = os.getpid() if parent_pid is None else parent_pid
    return [
        sys.executable,
        "-S",
        "-I",
        WRAPPER,
        f"--name={name}",
        str(parent),
        str(nice),
        "--",
        *argv,
    ]


def guard(pgid: int) -> subprocess.Popen[bytes]:
    """Start the guard of process group `pgid`: it kills the group if this process dies."""
    import subprocess

    return subprocess.Popen(
        [sys.executable, "-S", "-I", WRAPPER, "--guard", str(os.getpid()), str(pgid)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # never in the group it guards, nor in the terminal's
    )


def stop_guard(guard: subprocess.Popen[bytes], pgid: int) -> None:
    """A normal end: kill what is left of the group, then the guard (without its killpg, so a
    reused group id is never touched)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        guard.kill()
    guard.wait()


def _run_guard(parent_pid: int, pgid: int) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return 0  # not Linux: no death signal, nothing to guard with
    if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0 and os.getppid() == parent_pid:
        signal.sigwait([signal.SIGTERM])  # the parent died (or asked)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    return 0


def main(argv: list[str]) -> int:
    """Arm the death signal, check the parent, set niceness and the signal mask, then exec the
    command (returns only when it cannot)."""
    if argv[:1] == ["--guard"] and len(argv) == 3:
        return _run_guard(int(argv[1]), int(argv[2]))
    name = "acb"
    if argv and argv[0].startswith("--name="):
        name, argv = argv[0].removeprefix("--name="), argv[1:]
    if len(argv) < 4 or argv[2] != "--":
        print("usage: _deathwrap.py [--name=NAME] PARENT_PID NICE -- CMD...", file=sys.stderr)
        return 2
    parent_pid, nice, cmd = int(argv[0]), int(argv[1]), argv[3:]
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None  # not Linux: no death signal to arm
    if prctl is not None and prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(f"{name}: prctl(PR_SET_PDEATHSIG): {os.strerror(err)}", file=sys.stderr)
        return CANNOT_START
    if os.getppid() != parent_pid:
        return PARENT_GONE  # nobody waits for this command any more
    if nice:
        os.nice(nice)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"{name}: cannot start {cmd[0]!r}: {exc.strerror or exc}", file=sys.stderr)
    return CANNOT_START


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
