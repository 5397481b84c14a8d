"""Start a stage command for the campaign worker: `python -S _stagewrap.py PID NICE -- CMD...`

The worker has threads (heartbeat, progress, gRPC), so between fork() and exec() its child may
only call async-signal-safe functions: no Python code (no `preexec_fn`). The worker therefore
starts this script, in a new session, and it does the set-up in a fresh single-threaded process
before exec'ing CMD in place (same pid, session and process group):

- PR_SET_PDEATHSIG = SIGKILL: the stage dies with its worker (PID), so a killed worker never
  leaves a stage running on a GPU whose lease died with it. If the worker died before the call,
  the parent is no longer PID and the stage does not start.
- niceness NICE (cpu stages default to 10).

Standard library only and run with -S (no site), so it needs nothing installed and starts fast.
A CMD that cannot be exec'd exits 127 with the reason on stderr (the attempt's log).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
#: Exit status when CMD cannot be started (as a shell's "command not found").
CANNOT_START = 127


def main(argv: list[str]) -> int:
    """Set the parent-death signal and niceness, then exec the command (returns only on error)."""
    if len(argv) < 4 or argv[2] != "--":
        print("usage: _stagewrap.py PID NICE -- CMD...", file=sys.stderr)
        return 2
    worker_pid, nice, command = int(argv[0]), int(argv[1]), argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(f"acb-campaign: prctl(PR_SET_PDEATHSIG): {os.strerror(err)}", file=sys.stderr)
        return CANNOT_START
    if os.getppid() != worker_pid:
        # The worker died before the death signal was armed: nobody waits for this stage.
        return CANNOT_START
    if nice:
        os.nice(nice)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"acb-campaign: cannot start {command[0]!r}: {exc}", file=sys.stderr)
    return CANNOT_START


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
