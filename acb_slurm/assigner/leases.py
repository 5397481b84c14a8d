"""The daemon's bookkeeping: sessions, leases, blocked Allocate calls and counters.

`LeaseBook` is the shell around the pure scheduler core: it turns client actions into calls on
`Scheduler`, commits the grants those calls return (resolving the waiting Allocate futures,
notifying session streams, writing the event log) and keeps what the core does not: who the
clients are, when things happened, labels, counters. Everything runs on the daemon's event loop,
so nothing here needs a lock; no method awaits.

The book speaks in its own terms, not the wire's: it refuses with `BookError` subclasses, a grant
resolves to a `LeaseGrant`, a session's stream is fed `LeaseGrant` and `YieldRequested` items and
`node_status()` returns `NodeStatus` dataclasses. `acb_slurm.assigner.server` turns them into gRPC
status codes and protobuf messages, in one place; this module imports neither grpc nor protobuf.

Identities are unguessable and bound to the stream that made them: a session has a public id
(`s-` and 128 random bits, in logs) and a secret key (256 random bits, told only on its own stream),
and `submit` and `release` act for a session only when given both; a lease (`l-` and 128 random
bits) belongs to the session that asked for it and ends with it. What clients send is bounded
(`limits`), and so is every message quoted back or logged.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from acb_slurm.assigner import limits
from acb_slurm.assigner.eventlog import EventLog
from acb_slurm.assigner.limits import echo
from acb_slurm.scheduler.types import (
    Grant,
    Infeasible,
    InvalidRequest,
    Request,
    SchedulerError,
    UnknownRequest,
)

if TYPE_CHECKING:
    from acb_slurm.scheduler import Scheduler


P = ParamSpec("P")
R = TypeVar("R")


def _flushes_log(
    method: Callable[Concatenate[LeaseBook, P], R],
) -> Callable[Concatenate[LeaseBook, P], R]:
    """Write the events a book operation logged before its caller answers the client."""

    @functools.wraps(method)
    def wrapper(self: LeaseBook, /, *args: P.args, **kwargs: P.kwargs) -> R:
        log = self.log
        log.batching += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            log.batching -= 1
            if not log.batching:
                log.flush()

    return wrapper


class LeaseState(StrEnum):
    """Life of a lease: waiting → granted → released, or waiting → withdrawn."""

    WAITING = "waiting"
    GRANTED = "granted"
    RELEASED = "released"
    WITHDRAWN = "withdrawn"


# ---- errors ------------------------------------------------------------------------------------


class BookError(Exception):
    """A client action the book refuses; the subclass says why, `message` says it to the client
    (cut to `limits.MAX_MESSAGE`). The daemon maps each subclass to a gRPC status
    (`acb_slurm.assigner.server.STATUS_OF`)."""

    def __init__(self, message: str) -> None:
        message = limits.clip(message)
        super().__init__(message)
        self.message = message


class BadRequest(BookError):
    """The call itself is malformed: a field out of its bound, a malformed pin, a zero GPU
    count, a stream that does not start with `register`. Sent again unchanged, it fails again."""


class RequestImpossible(BookError):
    """The request is well formed but this node can never grant it (more GPUs or memory than it
    has, a pinned GPU it lacks): the scheduler core's `Infeasible`."""


class UnknownSession(BookError):
    """The call names no open session (never opened, or its stream already ended)."""


class NotSessionOwner(BookError):
    """The call names a session but not with its key: the caller did not open that session."""


class UnknownLease(BookError):
    """The lease is not held by the caller's session (already released, or never its)."""


class LeaseNotGranted(BookError):
    """The lease is still waiting: it can be withdrawn (cancel its Allocate), not released."""


class Withdrawn(BookError):
    """A waiting request was withdrawn before it was granted (its session ended, its caller
    gave up)."""


class ShuttingDown(BookError):
    """The assigner is stopping: no new calls, and every waiter is answered with this."""


class GangAborted(BookError):
    """A gang failed before it was granted (a member left or died, a node went away)."""


class NotController(BookError):
    """A gang call reached an executor: gangs are joined at the job's controller."""


# ---- what the book hands out -------------------------------------------------------------------


@dataclass(frozen=True)
class ClientIdentity:
    """Who a session's client says it is (its `register` message)."""

    client_id: str = ""
    job_id: str = ""
    worker: str = ""
    pid: int = 0
    hostname: str = ""


@dataclass(frozen=True)
class LeaseGrant:
    """What a granted Allocate call answers with (and the session's grant notice repeats)."""

    lease_id: str
    gpu_indices: tuple[int, ...]
    device_ids: tuple[str, ...]  # what to put in CUDA_VISIBLE_DEVICES, same order
    memory_bytes: int  # per GPU, promised to this lease
    node: str
    waited_seconds: float
    request_tag: str  # the Allocate call's


@dataclass(frozen=True)
class YieldRequested:
    """The holder of `lease_id` is asked to give it back at its next safe point."""

    lease_id: str
    reason: str


@dataclass(frozen=True)
class GangEnded:
    """The gang of member lease `lease_id` ended under it (`acb_slurm.assigner.gangs`)."""

    gang: str
    lease_id: str
    reason: str


#: What a session's stream is fed: grant notices, yield requests, gang ends, and None when it
#: must end.
SessionEvent = LeaseGrant | YieldRequested | GangEnded | None


def new_id(prefix: str) -> str:
    """A session or lease id: `prefix-` and 128 random bits in hex."""
    return f"{prefix}-{secrets.token_hex(16)}"


@dataclass(eq=False)
class ClientSession:
    """One client process, alive exactly as long as its Session stream."""

    session_id: str
    identity: ClientIdentity
    opened_at: float
    #: The secret that proves a call comes from this session's own client (never logged).
    key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    outbox: asyncio.Queue[SessionEvent] = field(default_factory=asyncio.Queue)
    leases: dict[str, LeaseRecord] = field(default_factory=dict)  # waiting and granted, by id

    def who(self) -> dict[str, Any]:
        """The fields naming this client on every event-log line. `client` is the session id:
        unique by construction, and the client id the scheduler core knows (replay needs it)."""
        return {
            "client": self.session_id,
            "worker": self.identity.worker,
            "job": self.identity.job_id,
        }

    @property
    def affinity_key(self) -> str:
        """Who gpu-affinity remembers: the job's worker, so that a worker reconnecting under the
        same name (one `acb-run --gate` per item) gets its GPUs back; "" (the session) unnamed."""
        worker = self.identity.worker
        return f"{self.identity.job_id}/{worker}" if worker else ""


@dataclass(eq=False)
class LeaseRecord:
    """The book's record of one Allocate request and, once granted, the GPUs it holds."""

    lease_id: str
    session: ClientSession
    gpu_count: int
    memory_bytes: int
    priority: int
    label: str
    requested_at: float
    future: asyncio.Future[LeaseGrant]
    state: LeaseState = LeaseState.WAITING
    granted_at: float = 0.0
    gpu_indices: tuple[int, ...] = ()
    granted_memory: int = 0
    yield_requested: bool = False  # asked once to give the lease back (time slice)
    request_tag: str = ""  # the client's tag of its Allocate call, echoed in the grant
    required_gpus: tuple[int, ...] = ()  # the only GPUs it may get (empty: any)
    notify: bool = True  # send a grant notice on the session stream when granted


@dataclass
class Counters:
    requests: int = 0
    grants: int = 0
    releases: int = 0
    yields: int = 0
    disconnects: int = 0
    errors: int = 0
    sessions: int = 0


# ---- status ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuStatus:
    """One GPU of the inventory: its memory, what is promised on it, and its holders."""

    index: int
    device_id: str
    uuid: str
    name: str
    memory_bytes: int
    promised_bytes: int
    lease_ids: tuple[str, ...]


@dataclass(frozen=True)
class LeaseStatus:
    """A granted lease."""

    lease_id: str
    client: ClientIdentity
    gpu_indices: tuple[int, ...]
    memory_bytes: int
    held_seconds: float
    label: str


@dataclass(frozen=True)
class WaiterStatus:
    """A waiting request, in service order."""

    client: ClientIdentity
    gpu_count: int
    memory_bytes: int
    priority: int
    waiting_seconds: float
    label: str
    required_gpu_indices: tuple[int, ...]


@dataclass(frozen=True)
class NodeStatus:
    """Inventory, holders, queue and counters of one assigner (Status, the executor's report)."""

    node: str
    address: str
    policy: str
    gpus: tuple[GpuStatus, ...]
    leases: tuple[LeaseStatus, ...]
    queue: tuple[WaiterStatus, ...]
    counters: Counters
    uptime_seconds: float


class LeaseBook:
    """Sessions, leases and counters of one assigner, driving its scheduler core."""

    def __init__(
        self,
        scheduler: Scheduler,
        node: str,
        log: EventLog,
        address: str = "",
        clock: Callable[[], float] = time.monotonic,
        time_slice: float = 0.0,
        error_code: Callable[[BookError], str] = lambda error: type(error).__name__,
    ) -> None:
        """`error_code` names a refusal on the event log's `error` lines (the daemon passes the
        name of the gRPC status it answers with)."""
        self.scheduler = scheduler
        self.node = node
        self.address = address
        self.log = log
        self.clock = clock
        self.started_at = clock()
        self.sessions: dict[str, ClientSession] = {}
        self.leases: dict[str, LeaseRecord] = {}
        self.counters = Counters()
        self.closed = False
        self.error_code = error_code
        #: Seconds a lease may be held while others wait before its holder is asked to yield
        #: (0 = never ask). Its timer runs on the event loop: `clock` must be the loop's time.
        self.time_slice = time_slice
        self._slice_timer: asyncio.TimerHandle | None = None
        #: Called after every change of holders or queue (the executor role reports them).
        self.change_listeners: list[Callable[[], None]] = []
        #: Called with the session id once a session is closed and its leases are released
        #: (the gang coordinator ends the gangs of a member that died).
        self.session_close_listeners: list[Callable[[str], None]] = []

    # ---- sessions ----

    @_flushes_log
    def open_session(self, identity: ClientIdentity) -> ClientSession:
        """Register a client; its leases live until `close_session`. The session's `key` goes
        to this client only: `submit` and `release` need it."""
        self._check_open()
        try:
            limits.check_identity(identity)
        except limits.OutOfBounds as exc:
            raise self._refuse(BadRequest(f"register: {exc}")) from None
        session = ClientSession(new_id("s"), identity, self.clock())
        self.sessions[session.session_id] = session
        self.counters.sessions += 1
        self.log.emit(
            "session",
            **session.who(),
            pid=identity.pid,
            host=identity.hostname,
            client_id=identity.client_id,
        )
        return session

    @_flushes_log
    def close_session(self, session_id: str, reason: str = "disconnect") -> None:
        """The client's stream ended: withdraw its waits, release its grants, serve the next."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        session.outbox.put_nowait(None)
        if self.closed:
            return
        dropped, grants = self.scheduler.disconnect(session_id)
        released = []
        for lease_id in dropped:
            lease = self.leases.pop(lease_id, None)
            if lease is None:
                continue
            if lease.state is LeaseState.GRANTED:
                self._log_release(lease, reason)
                released.append(lease_id)
            else:
                self._fail_waiting(lease, reason, Withdrawn("the client's session ended"))
        # Leases the core did not list (should not happen) are dropped here all the same.
        for lease in list(session.leases.values()):
            self.leases.pop(lease.lease_id, None)
            if lease.state is LeaseState.WAITING:
                self._fail_waiting(lease, reason, Withdrawn("the client's session ended"))
        session.leases.clear()
        self.counters.disconnects += 1
        self.log.emit("disconnect", **session.who(), leases=released)
        self._commit(grants)
        self._changed()
        for listener in list(self.session_close_listeners):
            listener(session_id)

    # ---- allocation ----

    @_flushes_log
    def submit(
        self,
        session_id: str,
        gpu_count: int,
        memory_bytes: int,
        priority: int,
        label: str,
        request_tag: str = "",
        required_gpus: Iterable[int] = (),
        notify: bool = True,
        session_key: str = "",
    ) -> LeaseRecord:
        """Queue a request; its `future` resolves with its `LeaseGrant` once granted (or fails
        with `Withdrawn` or `ShuttingDown`).

        `session_key` must be the session's own (`ClientSession.key`): a lease always belongs to
        the session of the stream that asked for it. `required_gpus` pins it to exactly those
        inventory indices (a process whose device state lives on its first grant's GPUs); the
        core refuses a malformed or impossible pin. `notify=False`: no grant notice on the
        session stream when it is granted (the Allocate call has no deadline, so its reply
        cannot arrive too late).

        Refuses with `ShuttingDown`, `UnknownSession`, `NotSessionOwner`, `BadRequest` (a
        malformed request) or `RequestImpossible` (one this node can never grant)."""
        self._check_open()
        session = self._session(session_id, session_key)
        lease = LeaseRecord(
            lease_id=new_id("l"),
            session=session,
            gpu_count=gpu_count,
            memory_bytes=memory_bytes,
            priority=priority,
            label=label,
            requested_at=self.clock(),
            future=asyncio.get_running_loop().create_future(),
            request_tag=request_tag,
            required_gpus=tuple(required_gpus),
            notify=notify,
        )
        request = Request(
            request_id=lease.lease_id,
            client_id=session_id,
            gpu_count=gpu_count,
            memory_bytes=memory_bytes,
            priority=priority,
            affinity_key=session.affinity_key,
            required_gpus=lease.required_gpus,
        )
        self.leases[lease.lease_id] = lease
        session.leases[lease.lease_id] = lease
        try:
            grants = self.scheduler.submit(request)
        except (InvalidRequest, Infeasible) as exc:
            del self.leases[lease.lease_id]
            del session.leases[lease.lease_id]
            kind = BadRequest if isinstance(exc, InvalidRequest) else RequestImpossible
            raise self._error(session, kind(str(exc))) from exc
        self.counters.requests += 1
        self.log.emit(
            "request",
            **session.who(),
            lease=lease.lease_id,
            gpu_count=gpu_count,
            memory_bytes=memory_bytes,
            priority=priority,
            label=label,
            affinity_key=request.affinity_key,
            required_gpus=list(lease.required_gpus),
        )
        self._commit(grants)
        self._changed()
        return lease

    @_flushes_log
    def abandon(self, lease_id: str, reason: str) -> None:
        """The Allocate caller gave up (cancelled, deadline): withdraw, or release a fresh grant."""
        lease = self.leases.get(lease_id)
        if lease is None or self.closed:
            return
        if lease.state is LeaseState.GRANTED:
            session = lease.session
            self.release(session.session_id, lease_id, reason=reason, session_key=session.key)
            return
        self.leases.pop(lease_id)
        lease.session.leases.pop(lease_id, None)
        grants = self.scheduler.withdraw(lease_id)
        self._fail_waiting(lease, reason, Withdrawn(f"the request was withdrawn ({reason})"))
        self._commit(grants)
        self._changed()

    @_flushes_log
    def release(
        self, session_id: str, lease_id: str, reason: str = "release", session_key: str = ""
    ) -> None:
        """Give a granted lease back and serve whoever its GPUs make possible. Only the session
        that holds it can (`session_key` proves the caller opened that session).

        Reason `deadline` or `cancelled`: the caller gave up on its Allocate just as it was
        granted; a lease already released on that account is then not an error. Refuses with
        `ShuttingDown`, `UnknownSession`, `NotSessionOwner`, `UnknownLease` or `LeaseNotGranted`.
        """
        self._check_open()
        session = self._session(session_id, session_key)
        lease = session.leases.get(lease_id)
        if lease is None and reason in ("deadline", "cancelled"):
            return
        if lease is None:
            raise self._error(
                session,
                UnknownLease(
                    f"lease {echo(lease_id)} is not held by this session (already released, or "
                    "never granted to it)"
                ),
            )
        if lease.state is not LeaseState.GRANTED:
            raise self._error(
                session,
                LeaseNotGranted(
                    f"lease {echo(lease_id)} is still waiting; cancel its Allocate call to "
                    "withdraw it"
                ),
            )
        grants = self.scheduler.release(lease_id)
        del self.leases[lease_id]
        del session.leases[lease_id]
        self._log_release(lease, reason)
        self._commit(grants)
        self._changed()

    @_flushes_log
    def update_usage(self, session_id: str, lease_id: str, resident_bytes: int) -> None:
        """A holder reports its resident device memory; gpu-sharing may fit more clients."""
        session = self.sessions.get(session_id)
        lease = session.leases.get(lease_id) if session else None
        if lease is None or lease.state is not LeaseState.GRANTED or self.closed:
            return
        try:
            grants = self.scheduler.update_usage(lease_id, resident_bytes)
        except (UnknownRequest, SchedulerError):
            return
        who = lease.session.who()
        self.log.emit(
            "usage",
            client=who["client"],
            worker=who["worker"],
            lease=lease_id,
            resident_bytes=resident_bytes,
        )
        self._commit(grants)
        self._changed()

    @_flushes_log
    def request_yield(self, lease_id: str, reason: str) -> bool:
        """Ask the holder of `lease_id` to give it back at its next safe point."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.state is not LeaseState.GRANTED:
            return False
        lease.yield_requested = True
        self.counters.yields += 1
        self.log.emit("yield", **lease.session.who(), lease=lease_id, reason=reason)
        lease.session.outbox.put_nowait(YieldRequested(lease_id, reason))
        return True

    @_flushes_log
    def record_error(self, session_id: str, error: BookError) -> None:
        """Count and log an error answered outside the book (e.g. a bad first stream message)."""
        session = self.sessions.get(session_id)
        self.counters.errors += 1
        who = session.who() if session else {"client": session_id[: limits.MAX_ID], "worker": ""}
        self.log.emit("error", **who, code=self.error_code(error), message=error.message)

    @_flushes_log
    def shutdown(self) -> None:
        """The daemon stops: every grant released and every waiter failed, all logged."""
        if self.closed:
            return
        self.closed = True
        if self._slice_timer is not None:
            self._slice_timer.cancel()
            self._slice_timer = None
        for lease in list(self.leases.values()):
            if lease.state is LeaseState.GRANTED:
                self._log_release(lease, "shutdown")
            else:
                self._fail_waiting(lease, "shutdown", ShuttingDown("the assigner is shutting down"))
        self.leases.clear()
        for session in self.sessions.values():
            session.leases.clear()
            session.outbox.put_nowait(None)

    # ---- status ----

    def node_status(self) -> NodeStatus:
        """Inventory, holders, queue and counters, as Status and the executor report them."""
        now = self.clock()
        holders: dict[int, list[LeaseRecord]] = {}
        granted = [lease for lease in self.leases.values() if lease.state is LeaseState.GRANTED]
        for lease in granted:
            for index in lease.gpu_indices:
                holders.setdefault(index, []).append(lease)
        gpus = tuple(
            GpuStatus(
                index=gpu.index,
                device_id=gpu.device_id,
                uuid=gpu.uuid,
                name=gpu.name,
                memory_bytes=gpu.memory_bytes,
                promised_bytes=self.scheduler.promised_bytes(gpu.index),
                lease_ids=tuple(lease.lease_id for lease in holders.get(gpu.index, [])),
            )
            for gpu in self.scheduler.gpus
        )
        leases = tuple(
            LeaseStatus(
                lease_id=lease.lease_id,
                client=lease.session.identity,
                gpu_indices=lease.gpu_indices,
                memory_bytes=lease.granted_memory,
                held_seconds=now - lease.granted_at,
                label=lease.label,
            )
            for lease in granted
        )
        queue = []
        for request in self.scheduler.queue:
            waiting = self.leases.get(request.request_id)
            if waiting is None:
                continue
            queue.append(
                WaiterStatus(
                    client=waiting.session.identity,
                    gpu_count=waiting.gpu_count,
                    memory_bytes=waiting.memory_bytes,
                    priority=waiting.priority,
                    waiting_seconds=now - waiting.requested_at,
                    label=waiting.label,
                    required_gpu_indices=waiting.required_gpus,
                )
            )
        return NodeStatus(
            node=self.node,
            address=self.address,
            policy=_policy_name(self.scheduler),
            gpus=gpus,
            leases=leases,
            queue=tuple(queue),
            counters=replace(self.counters),
            uptime_seconds=now - self.started_at,
        )

    # ---- internals ----

    def _commit(self, grants: Iterable[Grant]) -> None:
        now = self.clock()
        gpus = self.scheduler.gpus
        for grant in grants:
            lease = self.leases.get(grant.request_id)
            if lease is None:  # pragma: no cover - the core only grants what it was given
                continue
            lease.state = LeaseState.GRANTED
            lease.granted_at = now
            lease.gpu_indices = tuple(grant.gpu_indices)
            lease.granted_memory = grant.memory_bytes
            granted = LeaseGrant(
                lease_id=lease.lease_id,
                gpu_indices=lease.gpu_indices,
                device_ids=tuple(gpus[i].device_id for i in lease.gpu_indices),
                memory_bytes=grant.memory_bytes,
                node=self.node,
                waited_seconds=now - lease.requested_at,
                request_tag=lease.request_tag,
            )
            self.counters.grants += 1
            self.log.emit(
                "grant",
                **lease.session.who(),
                lease=lease.lease_id,
                gpus=list(lease.gpu_indices),
                device_ids=list(granted.device_ids),
                memory_bytes=grant.memory_bytes,
                waited=granted.waited_seconds,
            )
            if not lease.future.done():
                lease.future.set_result(granted)
            if lease.notify:
                # The notice goes out a loop turn later, behind the Allocate reply it duplicates,
                # unless the lease is gone by then (its caller gave up, its session ended).
                asyncio.get_running_loop().call_soon(self._notify_grant, lease, granted)

    def _notify_grant(self, lease: LeaseRecord, granted: LeaseGrant) -> None:
        if lease.state is LeaseState.GRANTED and self.leases.get(lease.lease_id) is lease:
            lease.session.outbox.put_nowait(granted)

    def _log_release(self, lease: LeaseRecord, reason: str) -> None:
        lease.state = LeaseState.RELEASED
        self.counters.releases += 1
        self.log.emit(
            "release",
            **lease.session.who(),
            lease=lease.lease_id,
            gpus=list(lease.gpu_indices),
            held=self.clock() - lease.granted_at,
            reason=reason,
        )

    def _fail_waiting(self, lease: LeaseRecord, reason: str, error: BookError) -> None:
        lease.state = LeaseState.WITHDRAWN
        who = lease.session.who()
        self.log.emit(
            "withdraw",
            client=who["client"],
            worker=who["worker"],
            lease=lease.lease_id,
            reason=reason,
        )
        if not lease.future.done():
            lease.future.set_exception(error)
            # Nobody may be awaiting it any more (the caller is gone); mark it retrieved.
            lease.future.exception()

    def session(self, session_id: str, session_key: str) -> ClientSession:
        """The open session a call names, if the call proves it is that session's own client;
        refuses (counted, logged) with `UnknownSession` or `NotSessionOwner`."""
        self._check_open()
        return self._session(session_id, session_key)

    def _session(self, session_id: str, session_key: str) -> ClientSession:
        """The session a call names, if the call proves it is that session's own client."""
        session = self.sessions.get(session_id)
        if session is None:
            error = UnknownSession(
                f"unknown session {echo(session_id)}: open a Session stream and use the "
                "session_id and session_key its Registered message carries (sessions end when "
                "their stream does)"
            )
            self.counters.errors += 1
            self.log.emit(
                "error",
                client=session_id[: limits.MAX_ID],
                worker="",
                code=self.error_code(error),
                message="unknown session",
            )
            raise error
        if not _proves(session, session_key):
            # Logged as from no known session: the caller is not the one it names.
            raise self._refuse(
                NotSessionOwner(
                    f"session {session_id} is not the caller's: a call acts only for the session "
                    "its own Session stream opened (send that stream's session_id and session_key)"
                )
            )
        return session

    def _refuse(self, error: BookError) -> BookError:
        """Count and log a refusal of a call that proves no session is its caller's."""
        self.counters.errors += 1
        self.log.emit(
            "error", client="", worker="", code=self.error_code(error), message=error.message
        )
        return error

    def _error(self, session: ClientSession, error: BookError) -> BookError:
        """Count and log a refusal of a call of `session`."""
        self.counters.errors += 1
        who = session.who()
        self.log.emit(
            "error",
            client=who["client"],
            worker=who["worker"],
            code=self.error_code(error),
            message=error.message,
        )
        return error

    @_flushes_log
    def refuse(self, error: BookError, session_id: str = "", session_key: str = "") -> BookError:
        """A call refused before the book acted (a field out of bounds): counted, logged (under
        the caller's session when the call proves it is that session's), returned to raise."""
        session = self.sessions.get(session_id) if len(session_id) <= limits.MAX_ID else None
        if session is None or not _proves(session, session_key):
            return self._refuse(error)
        return self._error(session, error)

    def _check_open(self) -> None:
        if self.closed:
            raise ShuttingDown("the assigner is shutting down")

    def _changed(self) -> None:
        self._check_time_slice()
        for listener in self.change_listeners:
            listener()

    def _check_time_slice(self) -> None:
        """While a request waits, ask every holder whose lease is at least `time_slice` old to
        yield (once per lease); then arm a timer for the next lease to come of age. When every
        waiter is pinned, only holders of GPUs they require are asked: another GPU's holder
        yielding would help none of them."""
        if self._slice_timer is not None:
            self._slice_timer.cancel()
            self._slice_timer = None
        if self.time_slice <= 0 or self.closed or not self.scheduler.queue:
            return
        wanted = self._wanted_gpus()
        now = self.clock()
        next_due: float | None = None
        for lease in list(self.leases.values()):
            if lease.state is not LeaseState.GRANTED or lease.yield_requested:
                continue
            if wanted is not None and wanted.isdisjoint(lease.gpu_indices):
                continue
            due = lease.granted_at + self.time_slice
            if due <= now:
                self.request_yield(lease.lease_id, "time-slice")
            elif next_due is None or due < next_due:
                next_due = due
        if next_due is not None:
            self._slice_timer = asyncio.get_running_loop().call_later(
                next_due - now, self._check_time_slice
            )

    def _wanted_gpus(self) -> set[int] | None:
        """The GPUs some waiter could be granted: None (any) unless every waiter is pinned."""
        wanted: set[int] = set()
        for request in self.scheduler.queue:
            if not request.required_gpus:
                return None
            wanted.update(request.required_gpus)
        return wanted


def _proves(session: ClientSession, session_key: str) -> bool:
    """Whether `session_key` is `session`'s own (compared in constant time: it is a secret)."""
    return hmac.compare_digest(
        session_key.encode("utf-8", "surrogatepass"), session.key.encode("ascii")
    )


def _policy_name(scheduler: Scheduler) -> str:
    policy: Any = scheduler.policy
    return str(getattr(policy, "name", policy))
