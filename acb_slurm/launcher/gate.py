"""Process-level gating: hold a lease exactly while a command runs (any framework).

`run_gated(spec)` acquires GPUs from the node's assigner, runs the command with
CUDA_VISIBLE_DEVICES set to the granted device ids (and ACB_LEASE_ID), forwards
SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 to it, waits, releases and returns the child's exit code
(128+N when the child died of signal N). If this process is killed outright, its session ends
and the assigner releases the lease by itself, and the child is killed with it (SIGKILL via
``PR_SET_PDEATHSIG``): a program must not go on using a GPU whose lease was given back.

The death signal is set by a tiny exec wrapper (`acb_slurm._deathwrap`, shared with the
campaign worker, run as ``python -S -I``: prctl, check that the parent is still this process,
reset the signal mask, execvp the command; the pid stays the child's). ``preexec_fn`` is not
used: it is unsafe with threads alive, and the gRPC client has them. ``setpriv --pdeathsig
KILL`` (util-linux) starts faster (about 1.5 ms against 15 ms measured) but cannot close the
race of this process dying before the prctl, and is not on every machine; 15 ms per command is
nothing next to the grant.

Signals that arrive while the child is being started are blocked (``pthread_sigmask``) until
the forwarding handlers are installed, then delivered to the child: none is lost, none kills
this process with the child left behind.

Without a terminal (batch jobs) the child leads its own process group, which acb-run owns
whole: every forwarded signal goes to the group (a script's children get it too, once), what is
left of the group when the child ends is killed before the lease goes back, and a guard process
(`acb_slurm._deathwrap.guard`) kills the group if acb-run itself is killed. With a terminal on
stdin the child stays in the terminal's foreground group (so an interactive program can read
it), the terminal delivers Ctrl-C to both processes, and SIGINT is therefore not forwarded a
second time; there, only the direct child is acb-run's to signal and kill.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from acb_slurm import _deathwrap as deathwrap
from acb_slurm import env

if TYPE_CHECKING:  # imported by run_gated: `run_child` (acb-run --auto) needs no gRPC client
    from acb_slurm.client.session import Client

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


class GateError(RuntimeError):
    """The command could not be started under a lease; the message says why."""


@dataclass(frozen=True)
class GateSpec:
    """What `acb-run --gate` was asked to run, validated."""

    command: Sequence[str]
    gpus: int = 1
    memory_bytes: int = 0
    priority: int = 0
    label: str = ""
    timeout: float | None = None


def exit_code(returncode: int) -> int:
    """A child's returncode as a shell reports it (128+N for death by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def run_gated(spec: GateSpec, client: Client | None = None) -> int:
    """Run `spec.command` under a lease and return its exit code."""
    if not spec.command:
        raise GateError("no command to run: put it after `--`, e.g. acb-run --gate -- python x.py")
    own_client = client is None
    if client is None:
        from acb_slurm.client.session import Client

        client = Client()
    try:
        lease = client.allocate(
            gpus=spec.gpus,
            memory=spec.memory_bytes,
            priority=spec.priority,
            label=spec.label or os.path.basename(spec.command[0]),
            timeout=spec.timeout,
        )
        try:
            child_env = dict(os.environ)
            child_env["CUDA_VISIBLE_DEVICES"] = lease.cuda_visible_devices
            child_env[env.LEASE_ID] = lease.lease_id
            code = run_child(spec.command, child_env)
        except BaseException:
            with contextlib.suppress(Exception):
                client.release(lease)
            raise
        try:
            client.release(lease)
        except Exception as exc:  # the child's result matters more; the session end frees it
            log.error(
                "acb-run: releasing lease %s failed (%s); the assigner frees it when this "
                "process's session ends",
                lease.lease_id,
                exc,
            )
        return code
    finally:
        if own_client:
            client.close()


def _stdin_is_terminal() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def run_child(command: Sequence[str], child_env: dict[str, str]) -> int:
    """Spawn, forward signals, wait; the previous signal handlers come back afterwards."""
    interactive = _stdin_is_terminal()
    if shutil.which(command[0], path=child_env.get("PATH")) is None and not os.path.isfile(
        command[0]
    ):
        raise GateError(f"cannot start {command[0]!r}: command not found")
    wrapped = deathwrap.command(command, name="acb-run")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        try:
            child = subprocess.Popen(
                wrapped, env=child_env, process_group=None if interactive else 0
            )
        except OSError as exc:
            raise GateError(f"cannot start {command[0]!r}: {exc.strerror or exc}") from None

        guard = None if interactive else deathwrap.guard(child.pid)

        def forward(signum: int, frame: FrameType | None) -> None:
            if interactive and signum == signal.SIGINT:
                return  # the terminal sent it to the child too
            if interactive:
                if child.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.send_signal(signum)
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signum)  # the child's own children too

        previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # pending signals are forwarded now
    try:
        while True:
            try:
                return exit_code(child.wait())
            except KeyboardInterrupt:  # pragma: no cover - SIGINT is forwarded, not raised
                continue
    finally:
        if guard is not None:  # nothing of the command outlives it (the lease goes back next)
            deathwrap.stop_guard(guard, child.pid)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.stdout.flush()
