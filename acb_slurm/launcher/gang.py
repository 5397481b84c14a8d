"""`acb-run --gang`: one node's member of a gang, e.g. a `torchrun` over several nodes.

Every node of the group runs ``acb-run --gang NAME --gang-nodes K --gpus N -- CMD`` (one srun
task per node). Each joins the gang NAME at the job's controller (`ACB_CONTROLLER`; in a one-node
job the node's own assigner) and waits until the whole gang is granted: N GPUs on each of the K
nodes, all at once (`acb_slurm.assigner.gangs`). Then CMD starts on every node at the same
moment, with

- ``CUDA_VISIBLE_DEVICES``: this node's part; ``ACB_LEASE_ID``: this member's lease;
- ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``: what `torchrun`
  reads for ``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port`` (static
  rendezvous at node rank 0, on a port that was free there), so a plain
  ``torchrun --nproc-per-node P train.py`` needs nothing more; ``MASTER_ADDR``,
  ``MASTER_PORT``, ``ACB_GANG``, ``ACB_GANG_NODE_RANK``, ``ACB_GANG_NODES`` for other launchers.

Since every rank starts within milliseconds of the others (the grant reaches all members at
once), torchrun's join timeout is never spent waiting for GPUs.

The end: CMD's exit status goes back to the controller (`LeaveGang`). 0 gives this node's part
back; anything else ends the whole gang, and every other member's command is killed at once and
its acb-run exits 70 (`ExitCode.LEASE_LOST`), as when the controller, or a node's assigner, or a
member dies. A rank that dies with a failure is noticed by acb-run itself, not only by torchrun
(whose agent takes 0.5-2 s to end after a rank dies): `RankWatch` watches the command's ranks
(its descendants with ``LOCAL_RANK`` in their environment, as torchrun starts them) through
pidfds, and reads a dead rank's status from ``/proc`` before its parent reaps it; a failed rank
ends the gang at once, so every node's part goes back within milliseconds. (A gang run therefore
ends at its first failed rank: torchrun's ``--max-restarts`` cannot restart it within the gang.)
torchrun starts its workers in sessions of their own, out of reach of a signal to
its process group: acb-run is their *child subreaper* (``PR_SET_CHILD_SUBREAPER``), so a
worker that outlives torchrun becomes acb-run's child, and is killed (with its process group)
when the command ends. A gang that fails before its grant exits 75, like a grant that never came.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from acb_slurm import env
from acb_slurm.launcher.gate import GateError, GateLeaseLost, _LossWatch, run_child
from acb_slurm.supervise import Supervised

if TYPE_CHECKING:
    from acb_slurm.client.session import Client, GangLease

_PR_SET_CHILD_SUBREAPER = 36
#: Signals after which a rank's death is the command stopping, not a rank failing.
_STOPPING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@dataclass(frozen=True)
class GangSpec:
    """What `acb-run --gang` was asked to run, validated."""

    command: Sequence[str]
    gang: str
    node_count: int
    gpus_per_node: int = 1
    priority: int = 0
    label: str = ""
    timeout: float | None = None


def gang_env(lease: GangLease, environ: Mapping[str, str]) -> dict[str, str]:
    """The command's environment: `environ` and what says where this member stands."""
    child_env = dict(environ)
    child_env.update(
        {
            "CUDA_VISIBLE_DEVICES": lease.cuda_visible_devices,
            env.LEASE_ID: lease.lease_id,
            env.GANG: lease.gang,
            env.GANG_NODE_RANK: str(lease.node_rank),
            env.GANG_NODES: str(lease.node_count),
            "MASTER_ADDR": lease.master_addr,
            "MASTER_PORT": str(lease.master_port),
            "PET_NNODES": str(lease.node_count),
            "PET_NODE_RANK": str(lease.node_rank),
            "PET_MASTER_ADDR": lease.master_addr,
            "PET_MASTER_PORT": str(lease.master_port),
        }
    )
    return child_env


def run_gang(
    spec: GangSpec, client: Client | None = None, environ: Mapping[str, str] | None = None
) -> int:
    """Join the gang, run the command once it is granted, leave with its status; returns the
    status. `GateLeaseLost` if the gang ended under the command (it was killed)."""
    if not spec.command:
        raise GateError("no command to run: put it after `--`, e.g. acb-run --gang g -- torchrun")
    own_client = client is None
    if client is None:
        from acb_slurm.client.session import Client

        client = Client(target=env.controller_target())
    _become_subreaper()
    watch = _GangWatch()
    client.on_lease_lost(watch.lost)
    try:
        lease = client.join_gang(
            spec.gang,
            spec.node_count,
            spec.gpus_per_node,
            priority=spec.priority,
            label=spec.label or os.path.basename(spec.command[0]),
            timeout=spec.timeout,
        )
        watch.granted(lease.lease_id)
        child_env = gang_env(lease, os.environ if environ is None else environ)

        def rank_failed(pid: int, status: int) -> None:
            # The session thread's LeaveGang would race the command's own end: leave now, from
            # the watch's thread; the gang's end reaches every member, this one included.
            with contextlib.suppress(Exception):
                client.leave_gang(lease, _exit_status(status), f"rank pid {pid} {_how(status)}")

        watch.on_rank_failure = rank_failed
        try:
            code = run_child(spec.command, child_env, watch)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                client.leave_gang(lease, 1, f"acb-run could not run the command: {exc}")
            raise
        finally:
            watch.stop_ranks()
            kill_adopted()
        if watch.rank_failure is not None:  # already left: the gang ended with this rank
            pid, status = watch.rank_failure
            print(
                f"acb-run: rank pid {pid} on node {lease.node} {_how(status)}: gang {lease.gang} "
                "ended on every node; this node's command was stopped",
                file=sys.stderr,
            )
            return _exit_status(status)
        if watch.killed:
            reason = watch.error.reason if watch.error is not None else "?"
            with contextlib.suppress(Exception):
                client.leave_gang(lease, code)  # forgets it (LeaseLost): nothing to give back
            raise GateLeaseLost(
                f"gang {lease.gang} ended while the command ran on node {lease.node} ({reason}); "
                "the command was killed (SIGKILL to its process group and to every process it "
                "left behind) rather than run on GPUs another process may hold now"
            )
        try:
            signal_name = _signal_name(code)
            client.leave_gang(
                lease,
                code,
                f"killed by {signal_name}" if signal_name else "",
                stopping=watch.stopping(),
            )
        except Exception as exc:  # the command's status matters more; the session end frees it
            import logging

            logging.getLogger(__name__).error(
                "acb-run: leaving gang %s failed (%s); the controller frees it when this "
                "process's session ends",
                lease.gang,
                exc,
            )
        return code
    finally:
        client.remove_lease_lost_callback(watch.lost)
        if own_client:
            client.close()


class _GangWatch(_LossWatch):
    """The lease watch of a gang member, which also watches the command's ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.on_rank_failure: Callable[[int, int], None] | None = None
        self.rank_failure: tuple[int, int] | None = None
        self._ranks: RankWatch | None = None

    def attach(self, child: Supervised) -> None:
        super().attach(child)
        self._ranks = RankWatch(child, self._rank_failed)
        self._ranks.start()

    def _kill(self) -> None:
        """The gang ended under the command (called with `_lock` held): its ranks die with it,
        those in sessions of their own too."""
        super()._kill()
        if self._ranks is not None:
            self._ranks.kill_all()

    def _rank_failed(self, pid: int, status: int) -> None:
        """A rank failed: this node's ranks and command are killed (the others would wait on
        the dead one), then the gang ends everywhere (`on_rank_failure` leaves it), so that
        this node's GPUs go back only once nothing of the run is left on them. Nothing when
        the gang had already ended under the command (that end is the story, not this rank)."""
        with self._lock:
            if self.error is not None:
                return
            self.rank_failure = (pid, status)
            child, ranks = self._child, self._ranks
        if ranks is not None:
            ranks.kill_all()
        if child is not None:
            child.kill("a rank failed")
        if self.on_rank_failure is not None:
            self.on_rank_failure(pid, status)

    def stopping(self) -> bool:
        """Whether a stop signal was forwarded to the command (a cancelled job, a time limit)."""
        with self._lock:
            child = self._child
        return child is not None and _told_to_stop(child)

    def stop_ranks(self) -> None:
        if self._ranks is not None:
            self._ranks.stop()


class RankWatch(threading.Thread):
    """Tells `on_failure(pid, wait_status)` of the first rank of `child` that dies with a
    failure (a non-zero exit or a signal), within milliseconds.

    Ranks are the processes under `child` with ``LOCAL_RANK`` in their environment whose parent
    has none (torchrun's workers, not their own children). Every `interval` the tree under
    `child` is walked (``/proc/PID/task/TID/children``) for new ranks; each one is watched
    through a pidfd, which wakes this thread the moment it dies, and its status is read from its
    ``/proc/PID/stat`` while it is a zombie (its parent reaps it later: torchrun polls every
    0.1 s). A rank reaped before it is read is left to its launcher to report."""

    def __init__(
        self, child: Supervised, on_failure: Callable[[int, int], None], interval: float = 0.05
    ) -> None:
        super().__init__(name="acb-rank-watch", daemon=True)
        self.child = child
        self.on_failure = on_failure
        self.interval = interval
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._watched: dict[int, int] = {}  # pidfd -> pid, of ranks alive when last seen

    def kill_all(self) -> None:
        """SIGKILL every watched rank (through its pidfd: never another process that took its
        pid) and its process group (torchrun starts each in a session of its own)."""
        with self._lock:
            watched = list(self._watched.items())
        for fd, pid in watched:
            with contextlib.suppress(OSError):
                group = os.getpgid(pid)
                if group == pid:  # a group of its own, led by it (and so not reused yet)
                    os.killpg(group, signal.SIGKILL)
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)

    def stop(self) -> None:
        self._done.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(1.0)

    def run(self) -> None:
        if not hasattr(os, "pidfd_open"):
            return
        poller = select.poll()
        watched = self._watched
        known: set[int] = set()
        try:
            while not self._done.is_set():
                root = self.child.pid
                if root is not None:
                    for pid, started in _new_ranks(root, known):
                        with contextlib.suppress(OSError):
                            fd = os.pidfd_open(pid)
                            if _start_time(pid) != started:  # not the process we looked at
                                os.close(fd)
                                continue
                            with self._lock:
                                watched[fd] = pid
                            poller.register(fd, select.POLLIN)
                for fd, _ in poller.poll(self.interval * 1000):
                    with self._lock:
                        pid = watched.pop(fd)
                    poller.unregister(fd)
                    status = _zombie_status(pid)
                    os.close(fd)
                    if status and not self._stopping():
                        self.on_failure(pid, status)
                        return
        finally:
            with self._lock:
                for fd in watched:
                    os.close(fd)
                watched.clear()

    def _stopping(self) -> bool:
        """Whether the command was told to stop: its ranks may then end as they choose (a
        checkpoint, then a non-zero exit) without failing the other nodes' ranks, which were
        most likely told the same; the command's own status says the rest."""
        return _told_to_stop(self.child)


def _told_to_stop(child: Supervised) -> bool:
    """Whether SIGTERM, SIGINT or SIGHUP was forwarded to the command."""
    return any(sig in _STOPPING for sig in child.signals_sent)


def _children(parent: int) -> list[int]:
    """Pids of `parent`'s children, from the kernel's children list of each of its threads."""
    try:
        tasks = os.listdir(f"/proc/{parent}/task")
    except OSError:
        return []
    children: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{parent}/task/{tid}/children", "rb") as fh:
                children.extend(int(pid) for pid in fh.read().split())
        except OSError:
            continue
    return children


def _descendants(root: int) -> list[tuple[int, int]]:
    """(pid, parent pid) of every process under `root`."""
    found: list[tuple[int, int]] = []
    todo = [root]
    while todo and len(found) < 100_000:
        parent = todo.pop()
        children = _children(parent)
        found.extend((pid, parent) for pid in children)
        todo.extend(children)
    return found


def _is_rank(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return b"\0LOCAL_RANK=" in b"\0" + fh.read()
    except OSError:
        return False


def _new_ranks(root: int, known: set[int]) -> list[tuple[int, int]]:
    """(pid, start time) of the ranks under `root` not in `known` (every process looked at is
    added to it). A rank has ``LOCAL_RANK`` in its environment and its parent has none: with
    ``LOCAL_RANK`` inherited by the command itself, nothing is a rank (torchrun reports)."""
    ranks = []
    rank_set: set[int] = set()
    for pid, parent in _descendants(root):
        if pid in known:
            continue
        known.add(pid)
        if _is_rank(pid) and not (parent in rank_set or _is_rank(parent)):
            started = _start_time(pid)
            if started is not None:
                ranks.append((pid, started))
                rank_set.add(pid)
    return ranks


def _stat(pid: int) -> list[bytes]:
    """The fields of ``/proc/PID/stat`` after the command name (field 3 first); [] when the
    process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return []
    return stat[stat.rfind(b")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    """When the process started (field 22, clock ticks since boot)."""
    fields = _stat(pid)
    return int(fields[19]) if len(fields) > 19 else None


def _zombie_status(pid: int) -> int | None:
    """The wait status of a dead, not yet reaped process (field 52); None when it was reaped
    already (or the kernel does not say)."""
    fields = _stat(pid)
    if len(fields) < 50 or fields[0] != b"Z":
        return None
    return int(fields[49])


def _exit_status(status: int) -> int:
    """acb-run's convention for a wait status: the exit code, or 128+N for signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status) or 1


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _signal_name(status: int) -> str:
    """SIGKILL for 137 (a status of 128+N is a death by signal N), "" for other statuses."""
    with contextlib.suppress(ValueError):
        if status > 128:
            return signal.Signals(status - 128).name
    return ""


def _become_subreaper() -> None:
    """Orphans of the command (torchrun's workers, in sessions of their own) become this
    process's children, so that `kill_adopted` finds them. Linux only; elsewhere nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def kill_adopted(deadline_s: float = 2.0) -> int:
    """SIGKILL every child this process has left (orphans it adopted as subreaper), with each
    one's process group, and reap them; returns how many there were."""
    if not os.path.isdir("/proc"):
        return 0
    own_group = os.getpgrp()
    seen: set[int] = set()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        children = _children(os.getpid())
        if not children:
            break
        for pid in children:
            seen.add(pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(pid)
                if group != own_group:
                    os.killpg(group, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)
    return len(seen)
