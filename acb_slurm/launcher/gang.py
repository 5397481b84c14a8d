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
member dies. torchrun starts its workers in sessions of their own, out of reach of a signal to
its process group: acb-run is their *child subreaper* (``PR_SET_CHILD_SUBREAPER``), so a
worker that outlives torchrun becomes acb-run's child, and is killed (with its process group)
when the command ends. A gang that fails before its grant exits 75, like a grant that never came.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from acb_slurm import env
from acb_slurm.launcher.gate import GateError, GateLeaseLost, _LossWatch, run_child

if TYPE_CHECKING:
    from acb_slurm.client.session import Client, GangLease

_PR_SET_CHILD_SUBREAPER = 36


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
    watch = _LossWatch()
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
        try:
            code = run_child(spec.command, child_env, watch)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                client.leave_gang(lease, 1, f"acb-run could not run the command: {exc}")
            raise
        finally:
            kill_adopted()
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
            client.leave_gang(lease, code, f"exit status {code}" if code else "")
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


def _become_subreaper() -> None:
    """Orphans of the command (torchrun's workers, in sessions of their own) become this
    process's children, so that `kill_adopted` finds them. Linux only; elsewhere nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _children() -> list[int]:
    """Pids of this process's children (read from /proc)."""
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == me:
            found.append(int(entry.name))
    return found


def kill_adopted(deadline_s: float = 2.0) -> int:
    """SIGKILL every child this process has left (orphans it adopted as subreaper), with each
    one's process group, and reap them; returns how many there were."""
    if not os.path.isdir("/proc"):
        return 0
    own_group = os.getpgrp()
    seen: set[int] = set()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        children = _children()
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
