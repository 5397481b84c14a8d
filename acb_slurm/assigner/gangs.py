"""Gangs: whole GPUs on several nodes of a multi-node job, all at once or not at all.

A gang is what `torchrun` over K nodes needs: `gpus_per_node` GPUs on each of its K nodes, and
none of them until all of them. Its members (one process per node, `acb-run --gang`) join it by
name at the job's controller (`Assigner.JoinGang`, under their own Session there).

Who decides what:

* The **controller** decides between gangs with the pure `GangPlanner` over the pool of
  (node, GPU) pairs: its own node and every executor that joined it. Once every member joined
  (and every member's node is in the pool) the gang is submitted; the planner grants gangs
  all-or-nothing, in priority then arrival order, with bounded bypass, and never two gangs more
  GPUs of a node than it has.
* Each **node** then takes its part locally (`LocalParts`): an internal session of the node's
  lease book asks for the part's GPUs, one whole GPU per request, at `TOP_PRIORITY`, ahead of
  every local waiter. A part's GPUs that local workers hold are taken as those workers release
  them (or yield them: a time slice asks). Local single-GPU requests go on being granted on the
  node's other GPUs meanwhile (they backfill), but never ahead of a part.
* When every node holds its part, the gang is granted: every member learns its node's GPUs, its
  node rank (the pool's node order) and a rendezvous address (node rank 0's address and a port
  that was free there).

Why it cannot deadlock: a part waits only for local leases, which wait for nothing a gang holds
(a local request holds nothing while it waits); and gangs never wait for each other's parts,
since the planner never grants two gangs more of a node than it has. Parts taken before the last
one hold their GPUs idle for that while: the price of all-or-nothing.

How a gang ends: a member that leaves with exit status 0 gives its node's part back at once, and
the gang ends with its last member. A member that leaves with another status, whose session ends
(its process died), or whose Join call gives up, and a node whose assigner goes away, end the
whole gang: every part is dropped, the planner serves the next gang, the members still waiting
get ABORTED and the granted ones a `GangEnded` notice on their Session stream, within
milliseconds. Executors drop their parts when their link to the controller breaks.

Everything here runs on the daemon's event loop; no lock is needed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from acb_slurm.assigner import leases, limits
from acb_slurm.assigner.leases import (
    BadRequest,
    BookError,
    ClientIdentity,
    GangAborted,
    GangEnded,
    LeaseBook,
    RequestImpossible,
    UnknownLease,
    new_id,
)
from acb_slurm.scheduler.gang import GangPlanner, GangRequest, PoolGrant
from acb_slurm.scheduler.types import Infeasible, InvalidRequest

log = logging.getLogger(__name__)

#: The priority of a gang part's requests on its node: ahead of every client's (a client's
#: priority is an int32 too; one that asks for this much is served with the parts, FIFO).
TOP_PRIORITY = 2**31 - 1
#: Gangs not yet ended at one controller (collecting members included).
MAX_GANGS = 1024
#: How long the other members of a gang may go on after a member's program ended on a stop
#: signal (a cancelled job, a time limit: every node was told; some save a checkpoint): Slurm's
#: default KillWait, after which it kills them anyway.
GANG_STOP_GRACE_S = 30.0


class NodeGone(Exception):
    """A node's assigner left the pool while a part was being taken there."""


@dataclass(frozen=True)
class Part:
    """One node's share of a granted gang."""

    node: str
    gpu_indices: tuple[int, ...]
    device_ids: tuple[str, ...]
    address: str  # the node's host, for rendezvous
    free_port: int


@dataclass(frozen=True)
class GangGrant:
    """What a member's JoinGang answers: its node rank and every node's part, in rank order."""

    gang: str
    lease_id: str
    node_rank: int
    parts: tuple[Part, ...]
    master_addr: str
    master_port: int
    waited_seconds: float


def host_of(address: str) -> str:
    """The host of an assigner's address (`host:port`, `[v6]:port`); 127.0.0.1 for a Unix
    socket (a job without TCP has one node)."""
    if not address or address.startswith("unix:"):
        return "127.0.0.1"
    host = address.rsplit(":", 1)[0]
    return host.strip("[]")


def free_port() -> int:
    """A TCP port free on this node now (the rendezvous port, when this node is rank 0). Another
    process may take it before torchrun does: rare, and then the gang's run fails clearly."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


class NodePort(Protocol):
    """How the controller has a node take and drop gang parts (its own book, or an executor)."""

    async def take(self, part_id: str, gang: str, gpu_count: int, job_id: str) -> Part: ...

    def drop(self, part_id: str, reason: str) -> None: ...


class LocalParts:
    """A node's side of gang parts: each part is an internal session of the node's lease book
    holding its GPUs (so status, the event log and reports show them as leases of worker
    `gang:<name>`, label `gang <name>`). Also the controller's `NodePort` for its own node."""

    def __init__(self, book: LeaseBook) -> None:
        self.book = book
        self._sessions: dict[str, str] = {}  # part id -> internal session id

    async def take(self, part_id: str, gang: str, gpu_count: int, job_id: str) -> Part:
        """Hold `gpu_count` whole GPUs for the part; returns once all are held. Cancelled or
        failed, it holds nothing."""
        book = self.book
        identity = ClientIdentity(
            client_id=limits.clip(f"gang-part:{part_id}", limits.MAX_CLIENT_ID),
            job_id=job_id[: limits.MAX_JOB_ID],
            worker=limits.clip(f"gang:{gang}", limits.MAX_WORKER),
            pid=os.getpid(),
            hostname=book.node[: limits.MAX_HOSTNAME],
        )
        session = book.open_session(identity)
        self._sessions[part_id] = session.session_id
        label = limits.clip(f"gang {gang}", limits.MAX_LABEL)
        try:
            records = [
                book.submit(
                    session.session_id,
                    1,
                    0,  # 0: the whole GPU, whatever the policy
                    TOP_PRIORITY,
                    label,
                    notify=False,
                    session_key=session.key,
                )
                for _ in range(gpu_count)
            ]
            grants = [await record.future for record in records]
            held = sorted(
                zip(
                    (i for grant in grants for i in grant.gpu_indices),
                    (d for grant in grants for d in grant.device_ids),
                    strict=True,
                )
            )
            return Part(
                node=book.node,
                gpu_indices=tuple(index for index, _ in held),
                device_ids=tuple(device for _, device in held),
                address=host_of(book.address),
                free_port=free_port(),
            )
        except BaseException:  # cancelled, withdrawn, no free port: nothing stays held
            self.drop(part_id, "gang-failed")
            raise

    def drop(self, part_id: str, reason: str) -> None:
        """Give the part's GPUs back (or stop waiting for them); nothing if it is not held."""
        session_id = self._sessions.pop(part_id, None)
        if session_id is not None:
            self.book.close_session(session_id, reason=reason)

    def drop_all(self, reason: str) -> None:
        for part_id in list(self._sessions):
            self.drop(part_id, reason)


class RemotePort:
    """The controller's `NodePort` for an executor: commands go down its Join stream (`send`),
    answers come back through `taken`."""

    def __init__(self, node: str, send: Callable[[TakeOrDrop], None]) -> None:
        self.node = node
        self._send = send
        self._pending: dict[str, asyncio.Future[Part]] = {}

    async def take(self, part_id: str, gang: str, gpu_count: int, job_id: str) -> Part:
        future: asyncio.Future[Part] = asyncio.get_running_loop().create_future()
        self._pending[part_id] = future
        self._send(("take", part_id, gang, gpu_count, job_id))
        try:
            return await future
        except asyncio.CancelledError:
            self.drop(part_id, "gang-failed")
            raise

    def taken(self, part_id: str, part: Part | None, error: str) -> None:
        """The executor's answer to a take."""
        future = self._pending.pop(part_id, None)
        if future is None or future.done():
            return
        if part is None:
            future.set_exception(NodeGone(f"node {self.node} could not take its part: {error}"))
        else:
            future.set_result(part)

    def drop(self, part_id: str, reason: str) -> None:
        future = self._pending.pop(part_id, None)
        if future is not None and not future.done():
            future.cancel()
        self._send(("drop", part_id, reason, 0, ""))

    def gone(self, why: str) -> None:
        """The executor's stream ended: every take in flight fails."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NodeGone(why))
        self._pending.clear()


#: A command for an executor: ("take", part id, gang, GPU count, job id) or ("drop", part id,
#: reason, 0, "").
TakeOrDrop = tuple[str, str, str, int, str]


@dataclass(eq=False)
class _Member:
    node: str
    session_id: str
    lease_id: str
    joined_at: float
    future: asyncio.Future[GangGrant]
    left: bool = False


@dataclass(eq=False)
class Gang:
    """One run of a named gang, from its first member's join to its end."""

    name: str
    gang_id: str
    node_count: int
    gpus_per_node: int
    priority: int
    label: str
    job_id: str
    since: float
    members: dict[str, _Member] = field(default_factory=dict)  # by node
    state: str = "collecting"  # → waiting → taking → granted → ended
    grant: PoolGrant | None = None
    parts: dict[str, Part] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    stop_timer: asyncio.TimerHandle | None = None  # a member stopped: the others' grace

    def part_id(self, node: str) -> str:
        return f"{self.gang_id}/{node}"


@dataclass(frozen=True)
class GangStatus:
    gang: str
    state: str
    node_count: int
    gpus_per_node: int
    members: tuple[str, ...]
    parts: tuple[Part, ...]
    seconds: float
    label: str
    priority: int


class GangCoordinator:
    """The controller's gangs: members, the planner over the pool, parts on each node."""

    def __init__(self, book: LeaseBook, own: NodePort, gpu_count: int) -> None:
        self.book = book
        self.planner = GangPlanner({book.node: gpu_count})
        self.ports: dict[str, NodePort] = {book.node: own}
        self.addresses: dict[str, str] = {}
        self.gangs: dict[str, Gang] = {}  # by name: the current run of each
        self._by_id: dict[str, Gang] = {}
        self._by_lease: dict[str, tuple[Gang, _Member]] = {}
        self.closed = False
        book.session_close_listeners.append(self.session_closed)

    # ---- members ----

    async def join(
        self,
        session_id: str,
        session_key: str,
        gang_name: str,
        node_count: int,
        gpus_per_node: int,
        node: str,
        priority: int = 0,
        label: str = "",
    ) -> GangGrant:
        """Join `gang_name` as its member on `node`; returns once the whole gang is granted.
        Refuses with `BookError`s (see `Assigner.JoinGang`); a gang that fails before its grant
        raises `GangAborted`; cancelled (the caller gave up), it fails the whole gang."""
        book = self.book
        session = book.session(session_id, session_key)
        if self.closed:
            raise leases.ShuttingDown("the assigner is shutting down")

        def refuse(error: BookError) -> BookError:
            return book.refuse(error, session_id, session_key)

        if not gang_name:
            raise refuse(BadRequest("join gang: the gang's name is empty"))
        if not node:
            raise refuse(BadRequest("join gang: the member's node is empty"))
        if node_count < 1 or gpus_per_node < 1:
            raise refuse(
                BadRequest(
                    f"join gang {limits.echo(gang_name)}: node_count ({node_count}) and "
                    f"gpus_per_node ({gpus_per_node}) must be at least 1"
                )
            )
        gang = self.gangs.get(gang_name)
        if gang is None:
            if len(self.gangs) >= MAX_GANGS:
                raise refuse(RequestImpossible(f"this controller already has {MAX_GANGS} gangs"))
            gang = Gang(
                name=gang_name,
                gang_id=new_id("G"),
                node_count=node_count,
                gpus_per_node=gpus_per_node,
                priority=priority,
                label=label,
                job_id=session.identity.job_id,
                since=book.clock(),
            )
        elif (gang.node_count, gang.gpus_per_node) != (node_count, gpus_per_node):
            raise refuse(
                BadRequest(
                    f"gang {limits.echo(gang_name)}: this member asks {gpus_per_node} GPU(s) on "
                    f"each of {node_count} node(s), its first member asked {gang.gpus_per_node} "
                    f"on each of {gang.node_count}: every member must ask the same"
                )
            )
        elif gang.state != "collecting":
            raise refuse(
                RequestImpossible(
                    f"gang {limits.echo(gang_name)} already has its {gang.node_count} member(s) "
                    f"({', '.join(gang.members)}): give each run of a gang its own name"
                )
            )
        elif node in gang.members:
            raise refuse(
                RequestImpossible(
                    f"gang {limits.echo(gang_name)} already has a member on node "
                    f"{limits.echo(node)}: one member per node"
                )
            )
        gpus = self.planner.nodes.get(node)
        if gpus is not None and len(gpus) < gpus_per_node:
            raise refuse(
                RequestImpossible(
                    f"gang {limits.echo(gang_name)} asks {gpus_per_node} GPU(s) per node; node "
                    f"{limits.echo(node)} has {len(gpus)}"
                )
            )
        member = _Member(
            node=node,
            session_id=session_id,
            lease_id=new_id("g"),
            joined_at=book.clock(),
            future=asyncio.get_running_loop().create_future(),
        )
        if gang.name not in self.gangs:
            self.gangs[gang.name] = gang
            self._by_id[gang.gang_id] = gang
        gang.members[node] = member
        self._by_lease[member.lease_id] = (gang, member)
        book.log.emit(
            "gang_join",
            **session.who(),
            gang=gang.name,
            member_node=node,
            members=len(gang.members),
            node_count=gang.node_count,
            gpus_per_node=gang.gpus_per_node,
        )
        self._submit_if_complete(gang)
        try:
            return await asyncio.shield(member.future)
        except asyncio.CancelledError:
            self._fail(gang, f"the member on node {node} gave up waiting")
            raise

    def leave(
        self,
        session_id: str,
        session_key: str,
        lease_id: str,
        exit_status: int,
        reason: str = "",
        stopping: bool = False,
    ) -> None:
        """A granted member's program ended with `exit_status`: 0 gives its node's part back,
        anything else ends the whole gang, at once, or, when the program ended after a stop
        signal (`stopping`), once every member left or `GANG_STOP_GRACE_S` later."""
        self.book.session(session_id, session_key)
        found = self._by_lease.get(lease_id)
        if found is None or found[1].session_id != session_id or found[1].left:
            raise self.book.refuse(
                UnknownLease(
                    f"no gang member lease {limits.echo(lease_id)} of this session (its gang "
                    "ended, or it already left)"
                ),
                session_id,
                session_key,
            )
        gang, member = found
        if gang.state != "granted":
            raise self.book.refuse(
                leases.LeaseNotGranted(f"gang {limits.echo(gang.name)} is not granted yet"),
                session_id,
                session_key,
            )
        if exit_status != 0:
            why = f"the ranks on node {member.node} ended with exit status {exit_status}"
            if reason:
                why += f" ({reason})"
            if not stopping:
                self._fail(gang, why, failed_member=member)
                return
            if gang.stop_timer is None:  # the others were told to stop too: let them finish
                gang.stop_timer = asyncio.get_running_loop().call_later(
                    GANG_STOP_GRACE_S,
                    self._fail,
                    gang,
                    f"{why} after a stop signal, {GANG_STOP_GRACE_S:g} s ago",
                )
        member.left = True
        del self._by_lease[member.lease_id]
        self.ports[member.node].drop(gang.part_id(member.node), "gang-done")
        if all(m.left for m in gang.members.values()):
            self._end(gang, "stopped" if gang.stop_timer else "done", failed=False)

    def session_closed(self, session_id: str) -> None:
        """A session ended: the gangs it was a member of fail (its process died)."""
        for gang in list(self.gangs.values()):
            for member in gang.members.values():
                if member.session_id == session_id and not member.left:
                    self._fail(gang, f"the member on node {member.node} ended (its session closed)")
                    break

    # ---- the pool ----

    def node_joined(self, node: str, gpu_count: int, port: NodePort, address: str) -> None:
        self.ports[node] = port
        self.addresses[node] = address
        self._start(self.planner.add_node(node, gpu_count))
        for gang in list(self.gangs.values()):
            self._submit_if_complete(gang)

    def node_left(self, node: str, why: str) -> None:
        """A node's assigner went away: every gang with a member or a part there fails."""
        if self.ports.pop(node, None) is None:
            return
        self.addresses.pop(node, None)
        dropped, grants = self.planner.remove_node(node)
        released = set(dropped)
        for gang in list(self.gangs.values()):
            if gang.gang_id in released or node in gang.members:
                self._fail(gang, why, planner_done=gang.gang_id in released)
        self._start(grants)

    def status(self) -> list[GangStatus]:
        now = self.book.clock()
        return [
            GangStatus(
                gang=gang.name,
                state=gang.state,
                node_count=gang.node_count,
                gpus_per_node=gang.gpus_per_node,
                members=tuple(gang.members),
                parts=tuple(  # in node-rank order
                    gang.parts[node]
                    for node in (gang.grant.nodes if gang.grant else ())
                    if node in gang.parts
                ),
                seconds=now - gang.since,
                label=gang.label,
                priority=gang.priority,
            )
            for gang in self.gangs.values()
        ]

    def shutdown(self) -> None:
        """The daemon stops: every gang fails (members told); the planner is left as it is
        (ending one gang must not grant the next)."""
        self.closed = True
        for gang in list(self.gangs.values()):
            self._fail(gang, "the controller's assigner is shutting down", planner_done=True)

    # ---- internals ----

    def _submit_if_complete(self, gang: Gang) -> None:
        if gang.state != "collecting" or len(gang.members) < gang.node_count:
            return
        if any(node not in self.planner.nodes for node in gang.members):
            return  # a member's node has not joined the pool yet: submitted when it does
        gang.state, gang.since = "waiting", self.book.clock()
        request = GangRequest(
            request_id=gang.gang_id,
            client_id=gang.name,
            gpus_per_node=gang.gpus_per_node,
            nodes=tuple(gang.members),
            priority=gang.priority,
        )
        try:
            grants = self.planner.submit(request)
        except (Infeasible, InvalidRequest) as exc:
            self._fail(gang, str(exc), planner_done=True, error=RequestImpossible)
            return
        self._start(grants)

    def _start(self, grants: list[PoolGrant]) -> None:
        if self.closed:
            return
        for grant in grants:
            gang = self._by_id[grant.request_id]
            gang.state, gang.since, gang.grant = "taking", self.book.clock(), grant
            gang.task = asyncio.ensure_future(self._take(gang, grant))

    async def _take(self, gang: Gang, grant: PoolGrant) -> None:
        """Every node of the grant takes its part; the gang is granted when all hold theirs."""

        async def take(node: str, count: int) -> Part:
            part = await self.ports[node].take(gang.part_id(node), gang.name, count, gang.job_id)
            gang.parts[node] = part
            return part

        try:
            parts = await asyncio.gather(*(take(node, len(gpus)) for node, gpus in grant.parts))
        except asyncio.CancelledError:
            return  # the gang failed meanwhile; `_fail` dropped the parts
        except (NodeGone, BookError) as exc:
            self._fail(gang, str(exc))
            return
        except Exception as exc:  # a bug or an OS error: the gang fails, nothing stays held
            log.exception("gang %s: taking its parts failed", gang.name)
            self._fail(gang, f"taking its parts failed: {exc}")
            return
        now = self.book.clock()
        gang.state, gang.since = "granted", now
        master = parts[0]
        for rank, part in enumerate(parts):
            member = gang.members[part.node]
            member.future.set_result(
                GangGrant(
                    gang=gang.name,
                    lease_id=member.lease_id,
                    node_rank=rank,
                    parts=tuple(parts),
                    master_addr=master.address,
                    master_port=master.free_port,
                    waited_seconds=now - member.joined_at,
                )
            )
        self.book.log.emit(
            "gang_grant",
            client="",
            worker="",
            gang=gang.name,
            parts={part.node: list(part.gpu_indices) for part in parts},
            master=f"{master.address}:{master.free_port}",
        )

    def _fail(
        self,
        gang: Gang,
        reason: str,
        planner_done: bool = False,
        failed_member: _Member | None = None,
        error: type[BookError] = GangAborted,
    ) -> None:
        """End the whole gang: parts dropped, members told."""
        if gang.state == "ended":
            return
        for member in gang.members.values():
            if member.left or member is failed_member:
                continue
            if not member.future.done():
                member.future.set_exception(error(f"gang {gang.name}: {reason}"))
                member.future.exception()  # the caller may be gone already
            else:
                session = self.book.sessions.get(member.session_id)
                if session is not None:
                    session.outbox.put_nowait(GangEnded(gang.name, member.lease_id, reason))
        self._end(gang, reason, failed=True, planner_done=planner_done)

    def _end(self, gang: Gang, reason: str, failed: bool, planner_done: bool = False) -> None:
        previous, gang.state = gang.state, "ended"
        if gang.task is not None and not gang.task.done():
            gang.task.cancel()
        if gang.stop_timer is not None:
            gang.stop_timer.cancel()
        if gang.grant is not None:
            for node in gang.grant.nodes:
                port = self.ports.get(node)
                if port is not None:
                    port.drop(gang.part_id(node), "gang-failed" if failed else "gang-done")
        for member in gang.members.values():
            self._by_lease.pop(member.lease_id, None)
        self.gangs.pop(gang.name, None)
        self._by_id.pop(gang.gang_id, None)
        self.book.log.emit(
            "gang_end", client="", worker="", gang=gang.name, failed=failed, reason=reason
        )
        # The planner knows a gang from its submission ("waiting") to its end: a waiting gang
        # is withdrawn, a taking or granted one released. Not when the planner already let it
        # go (`planner_done`: a node left, it was never accepted, the daemon stops).
        if planner_done or previous == "collecting":
            return
        if previous == "waiting":
            grants = self.planner.withdraw(gang.gang_id)
        else:
            grants = self.planner.release(gang.gang_id)
        self._start(grants)
