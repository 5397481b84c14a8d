"""Process-level gating: hold a lease exactly while a command runs (any framework).

`run_gated(spec)` acquires GPUs from the node's assigner, runs the command with
CUDA_VISIBLE_DEVICES set to the granted device ids (and ACB_LEASE_ID), forwards
SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 to it, waits, releases and returns the child's exit code
(128+N when the child died of signal N). If this process is killed outright, its session ends
and the assigner releases the lease by itself, and the child is killed with it (SIGKILL via
``PR_SET_PDEATHSIG``): a program must not go on using a GPU whose lease was given back.

The command is started and supervised by `acb_slurm.supervise` (shared with campaign stages).
The death signal is set by a tiny exec wrapper (`acb_slurm._deathwrap`, shared with the
campaign worker, run as ``python -S -I``: prctl, check that the parent is still this process,
reset the signal mask, execvp the command; the pid stays the child's). ``preexec_fn`` is not
used: it is unsafe with threads alive, and the gRPC client has them. ``setpriv --pdeathsig
KILL`` (util-linux) starts faster (about 1.5 ms against 15 ms measured) but cannot close the
race of this process dying before the prctl, and is not on every machine; 15 ms per command is
nothing next to the grant.

The forwarding handlers are installed before the child is started; a signal that arrives
before the child exists is kept and delivered to it once it does: none is lost, none kills this
process with the child left behind. (A ``pthread_sigmask`` on the main thread would not do: the
signal is then delivered to one of gRPC's threads, where the default action of SIGTERM ends
the process.)

Without a terminal (batch jobs) the child leads its own process group, which acb-run owns
whole: every forwarded signal goes to the group (a script's children get it too, once), what is
left of the group when the child ends is killed before the lease goes back, and a guard process
(`acb_slurm._deathwrap.guard`) kills the group if acb-run itself is killed. With a terminal on
stdin the child stays in the terminal's foreground group (so an interactive program can read
it), the terminal delivers Ctrl-C to both processes, and SIGINT is therefore not forwarded a
second time; there, only the direct child is acb-run's to signal and kill.

A lost lease stops the command: if the lease is lost while the command runs (the assigner died
or restarted, or dropped this process as silent after a SIGSTOP), its GPUs may already be
another process's, so the client's session thread kills the command's process group (the child
alone with a terminal) with SIGKILL at once, and `run_gated` raises `GateLeaseLost`: acb-run
says so in one line and exits with `ExitCode.LEASE_LOST` (70), not the command's own status.
A loss after the command ended only makes the release fail (logged; the command's status stands).

The per-node launcher (`acb_slurm.launcher.nodelaunch`) runs many gated workers in one process:
it gives `run_gated` each worker's own `Client`, environment and a `start` factory that makes
the worker's `Supervised` child (no signal handlers of its own, one shared group guard); the
lease, the lost-lease kill and the exit status are the same as acb-run's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from acb_slurm import env
from acb_slurm.exitcodes import ExitCode
from acb_slurm.supervise import FORWARDED_SIGNALS, Supervised, exit_code

if TYPE_CHECKING:  # the client (gRPC) is imported by run_gated, when it is needed
    from acb_slurm.client.errors import LeaseLost
    from acb_slurm.client.session import Client, Lease

__all__ = [
    "FORWARDED_SIGNALS",
    "ChildFactory",
    "GateError",
    "GateLeaseLost",
    "GateSpec",
    "exit_code",
    "run_child",
    "run_gated",
]

log = logging.getLogger(__name__)

#: Makes the (unstarted) supervised child of a gated command: `factory(command, child_env)`.
ChildFactory = Callable[[Sequence[str], dict[str, str]], Supervised]


class GateError(RuntimeError):
    """The command could not be started under a lease; the message says why."""

    exit_code = ExitCode.CANNOT_START


class GateLeaseLost(GateError):
    """The lease was lost while the command ran; its process group was killed."""

    exit_code = ExitCode.LEASE_LOST


class _LossWatch:
    """Kills the command when the lease is lost (the callback runs on the session thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.lease_id: str | None = None
        self.error: LeaseLost | None = None
        self.killed = False  # the command was running when the loss came, and was killed
        self._child: Supervised | None = None
        self._early: dict[str, LeaseLost] = {}  # losses told before `granted` named the lease

    def lost(self, lease: Lease, error: LeaseLost) -> None:
        with self._lock:
            if self.lease_id is None:  # allocate() has not returned yet: maybe ours
                self._early[lease.lease_id] = error
                return
            if lease.lease_id != self.lease_id:
                return  # another lease of a shared client
            self.error = error
            self._kill()

    def granted(self, lease_id: str) -> None:
        with self._lock:
            self.lease_id = lease_id
            self.error = self._early.pop(lease_id, None)
            self._early.clear()

    def attach(self, child: Supervised) -> None:
        """`child` is about to start: kill it if the lease is lost (or was already)."""
        with self._lock:
            self._child = child
            if self.error is not None:  # lost before the command could even start
                self._kill()

    def _kill(self) -> None:
        if self._child is not None and self._child.kill("lease lost"):
            self.killed = True  # (False once the child was reaped: its end was its own)


@dataclass(frozen=True)
class GateSpec:
    """What `acb-run --gate` was asked to run, validated."""

    command: Sequence[str]
    gpus: int = 1
    memory_bytes: int = 0
    priority: int = 0
    label: str = ""
    timeout: float | None = None


def run_gated(
    spec: GateSpec,
    client: Client | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    start: ChildFactory | None = None,
) -> int:
    """Run `spec.command` under a lease and return its exit code. `GateLeaseLost` if the lease
    is lost while the command runs (the command's process group was killed). `environ` is the
    command's environment before the lease's variables (default this process's); `start` makes
    its supervised child (default: acb-run's, which forwards this process's signals to it)."""
    if not spec.command:
        raise GateError("no command to run: put it after `--`, e.g. acb-run --gate -- python x.py")
    own_client = client is None
    if client is None:
        from acb_slurm.client.session import Client

        client = Client()
    watch = _LossWatch()
    client.on_lease_lost(watch.lost)  # before the grant: no loss goes unseen
    try:
        lease = client.allocate(
            gpus=spec.gpus,
            memory=spec.memory_bytes,
            priority=spec.priority,
            label=spec.label or os.path.basename(spec.command[0]),
            timeout=spec.timeout,
        )
        watch.granted(lease.lease_id)
        try:
            child_env = dict(os.environ if environ is None else environ)
            child_env["CUDA_VISIBLE_DEVICES"] = lease.cuda_visible_devices
            child_env[env.LEASE_ID] = lease.lease_id
            code = run_child(spec.command, child_env, watch, start=start)
        except BaseException:
            with contextlib.suppress(Exception):
                client.release(lease)
            raise
        if watch.killed:
            with contextlib.suppress(Exception):
                client.release(lease)  # forgets it (LeaseLost): nothing to give back
            reason = watch.error.reason if watch.error is not None else "?"
            gpus = ",".join(lease.device_ids)
            raise GateLeaseLost(
                f"lease {lease.lease_id} (GPU {gpus}) was lost while the command ran ({reason}); "
                "the command was killed (SIGKILL to its process group) rather than run on GPUs "
                "another process may hold now"
            )
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
        client.remove_lease_lost_callback(watch.lost)
        if own_client:
            client.close()


def _stdin_is_terminal() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def acb_run_child(command: Sequence[str], child_env: dict[str, str]) -> Supervised:
    """acb-run's child: its own process group without a terminal (the terminal's with one),
    this process's SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 forwarded to it."""
    interactive = _stdin_is_terminal()
    return Supervised(
        command, child_env, group=not interactive, forward=FORWARDED_SIGNALS, name="acb-run"
    )


def findable(
    command: Sequence[str],
    child_env: Mapping[str, str],
    cwd: str | os.PathLike[str] | None = None,
) -> bool:
    """Whether `command[0]` names a program: on the child's PATH, or a file (relative to the
    child's working directory `cwd`, when it has one)."""
    name = command[0]
    if os.sep in name:
        return os.path.isfile(os.path.join(os.fspath(cwd), name) if cwd else name)
    return shutil.which(name, path=child_env.get("PATH")) is not None or os.path.isfile(name)


def run_child(
    command: Sequence[str],
    child_env: dict[str, str],
    watch: _LossWatch | None = None,
    *,
    start: ChildFactory | None = None,
) -> int:
    """Spawn, forward signals, wait; the previous signal handlers come back afterwards. `watch`
    kills the child if the lease is lost while it runs; `start` makes the child (default
    `acb_run_child`)."""
    child = (start or acb_run_child)(command, child_env)
    if not findable(command, child_env, child.cwd):
        raise GateError(f"cannot start {command[0]!r}: command not found")
    if watch is not None:
        watch.attach(child)
    try:
        try:
            child.start()
        except OSError as exc:
            raise GateError(f"cannot start {command[0]!r}: {exc.strerror or exc}") from None
        return child.wait().exit_status
    finally:
        sys.stdout.flush()
