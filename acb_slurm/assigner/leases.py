"""The daemon's bookkeeping: sessions, leases, blocked Allocate calls and counters.

`LeaseBook` is the shell around the pure scheduler core: it turns client actions into calls on
`Scheduler`, commits the grants those calls return (resolving the waiting Allocate futures,
notifying session streams, writing the event log) and keeps what the core does not: who the
clients are, when things happened, labels, counters. Everything runs on the daemon's event loop,
so nothing here needs a lock; no method awaits.

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
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from acb_slurm._proto.acb.v1 import assigner_pb2 as pb
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


F = TypeVar("F", bound=Callable[..., Any])


def _flushes_log(method: F) -> F:
    """Write the events a book operation logged before its caller answers the client."""

    @functools.wraps(method)
    def wrapper(self: LeaseBook, *args: Any, **kwargs: Any) -> Any:
        log = self.log
        log.batching += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            log.batching -= 1
            if not log.batching:
                log.flush()

    return wrapper  # type: ignore[return-value]


class LeaseState(StrEnum):
    """Life of a lease: waiting → granted → released, or waiting → withdrawn."""

    WAITING = "waiting"
    GRANTED = "granted"
    RELEASED = "released"
    WITHDRAWN = "withdrawn"


class BookError(Exception):
    """A client action the book refuses; `code` is the gRPC status the daemon answers with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = limits.clip(message)
        super().__init__(message)
        self.code = code
        self.message = message


def new_id(prefix: str) -> str:
    """A session or lease id: `prefix-` and 128 random bits in hex."""
    return f"{prefix}-{secrets.token_hex(16)}"


@dataclass(eq=False)
class ClientSession:
    """One client process, alive exactly as long as its Session stream."""

    session_id: str
    identity: pb.ClientIdentity
    opened_at: float
    #: The secret that proves a call comes from this session's own client (never logged).
    key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    outbox: asyncio.Queue[pb.ServerMessage | None] = field(default_factory=asyncio.Queue)
    leases: dict[str, Lease] = field(default_factory=dict)  # waiting and granted, by id

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
class Lease:
    """One Allocate request and, once granted, the GPUs it holds."""

    lease_id: str
    session: ClientSession
    gpu_count: int
    memory_bytes: int
    priority: int
    label: str
    requested_at: float
    future: asyncio.Future[pb.AllocReply]
    state: LeaseState = LeaseState.WAITING
    granted_at: float = 0.0
    gpu_indices: tuple[int, ...] = ()
    granted_memory: int = 0
    yield_requested: bool = False  # asked once to give the lease back (time slice)
    request_tag: str = ""  # the client's tag of its Allocate call, echoed in the grant
    required_gpus: tuple[int, ...] = ()  # the only GPUs it may get (empty: any)
    notify: bool = True  # send a GrantNotice on the session stream when granted


@dataclass
class Counters:
    requests: int = 0
    grants: int = 0
    releases: int = 0
    yields: int = 0
    disconnects: int = 0
    errors: int = 0
    sessions: int = 0


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
    ) -> None:
        self.scheduler = scheduler
        self.node = node
        self.address = address
        self.log = log
        self.clock = clock
        self.started_at = clock()
        self.sessions: dict[str, ClientSession] = {}
        self.leases: dict[str, Lease] = {}
        self.counters = Counters()
        self.closed = False
        #: Seconds a lease may be held while others wait before its holder is asked to yield
        #: (0 = never ask). Its timer runs on the event loop: `clock` must be the loop's time.
        self.time_slice = time_slice
        self._slice_timer: asyncio.TimerHandle | None = None
        #: Called after every change of holders or queue (the executor role reports them).
        self.change_listeners: list[Callable[[], None]] = []

    # ---- sessions ----

    @_flushes_log
    def open_session(self, identity: pb.ClientIdentity) -> ClientSession:
        """Register a client; its leases live until `close_session`. The session's `key` goes
        to this client only: `submit` and `release` need it."""
        self._check_open()
        try:
            limits.check_identity(identity)
        except limits.OutOfBounds as exc:
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT, f"register: {exc}") from None
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
                self._fail_waiting(lease, reason, "the client's session ended")
        # Leases the core did not list (should not happen) are dropped here all the same.
        for lease in list(session.leases.values()):
            self.leases.pop(lease.lease_id, None)
            if lease.state is LeaseState.WAITING:
                self._fail_waiting(lease, reason, "the client's session ended")
        session.leases.clear()
        self.counters.disconnects += 1
        self.log.emit("disconnect", **session.who(), leases=released)
        self._commit(grants)
        self._changed()

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
    ) -> Lease:
        """Queue a request; its `future` resolves with the AllocReply once granted.

        `session_key` must be the session's own (`ClientSession.key`): a lease always belongs to
        the session of the stream that asked for it. `required_gpus` pins it to exactly those
        inventory indices (a process whose device state lives on its first grant's GPUs); the
        core refuses a malformed or impossible pin. `notify=False`: no GrantNotice on the
        session stream when it is granted (the Allocate call has no deadline, so its reply
        cannot arrive too late)."""
        self._check_open()
        session = self._session(session_id, session_key)
        lease = Lease(
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
            code = (
                grpc.StatusCode.INVALID_ARGUMENT
                if isinstance(exc, InvalidRequest)
                else grpc.StatusCode.FAILED_PRECONDITION
            )
            raise self._error(session, code, str(exc)) from exc
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
        self._fail_waiting(lease, reason, f"the request was withdrawn ({reason})")
        self._commit(grants)
        self._changed()

    @_flushes_log
    def release(
        self, session_id: str, lease_id: str, reason: str = "release", session_key: str = ""
    ) -> None:
        """Give a granted lease back and serve whoever its GPUs make possible. Only the session
        that holds it can (`session_key` proves the caller opened that session).

        Reason `deadline` or `cancelled`: the caller gave up on its Allocate just as it was
        granted; a lease already released on that account is then not an error.
        """
        self._check_open()
        session = self._session(session_id, session_key)
        lease = session.leases.get(lease_id)
        if lease is None and reason in ("deadline", "cancelled"):
            return
        if lease is None:
            raise self._error(
                session,
                grpc.StatusCode.NOT_FOUND,
                f"lease {echo(lease_id)} is not held by this session (already released, or never "
                "granted to it)",
            )
        if lease.state is not LeaseState.GRANTED:
            raise self._error(
                session,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"lease {echo(lease_id)} is still waiting; cancel its Allocate call to withdraw it",
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
        lease.session.outbox.put_nowait(
            pb.ServerMessage(yield_request=pb.YieldRequest(lease_id=lease_id, reason=reason))
        )
        return True

    @_flushes_log
    def record_error(self, session_id: str, code: grpc.StatusCode, message: str) -> None:
        """Count and log an error answered outside the book (e.g. a bad first stream message)."""
        session = self.sessions.get(session_id)
        self.counters.errors += 1
        who = session.who() if session else {"client": session_id[: limits.MAX_ID], "worker": ""}
        self.log.emit("error", **who, code=code.name, message=limits.clip(message))

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
                self._fail_waiting(
                    lease, "shutdown", "the assigner is shutting down", grpc.StatusCode.UNAVAILABLE
                )
        self.leases.clear()
        for session in self.sessions.values():
            session.leases.clear()
            session.outbox.put_nowait(None)

    # ---- status ----

    def node_status(self) -> pb.NodeStatus:
        """Inventory, holders, queue and counters, as Status and the executor report them."""
        now = self.clock()
        holders: dict[int, list[Lease]] = {}
        granted = [lease for lease in self.leases.values() if lease.state is LeaseState.GRANTED]
        for lease in granted:
            for index in lease.gpu_indices:
                holders.setdefault(index, []).append(lease)
        gpus = [
            pb.GpuStatus(
                index=gpu.index,
                device_id=gpu.device_id,
                uuid=gpu.uuid,
                name=gpu.name,
                memory_bytes=gpu.memory_bytes,
                promised_bytes=self.scheduler.promised_bytes(gpu.index),
                lease_ids=[lease.lease_id for lease in holders.get(gpu.index, [])],
            )
            for gpu in self.scheduler.gpus
        ]
        leases = [
            pb.LeaseStatus(
                lease_id=lease.lease_id,
                client=lease.session.identity,
                gpu_indices=lease.gpu_indices,
                memory_bytes=lease.granted_memory,
                held_seconds=now - lease.granted_at,
                label=lease.label,
            )
            for lease in granted
        ]
        queue = []
        for request in self.scheduler.queue:
            waiting = self.leases.get(request.request_id)
            if waiting is None:
                continue
            queue.append(
                pb.WaiterStatus(
                    client=waiting.session.identity,
                    gpu_count=waiting.gpu_count,
                    memory_bytes=waiting.memory_bytes,
                    priority=waiting.priority,
                    waiting_seconds=now - waiting.requested_at,
                    label=waiting.label,
                    required_gpu_indices=waiting.required_gpus,
                )
            )
        c = self.counters
        status = pb.NodeStatus(
            node=self.node,
            address=self.address,
            policy=_policy_name(self.scheduler),
            gpus=gpus,
            leases=leases,
            queue=queue,
            counters=pb.Counters(
                requests=c.requests,
                grants=c.grants,
                releases=c.releases,
                yields=c.yields,
                disconnects=c.disconnects,
                errors=c.errors,
                sessions=c.sessions,
            ),
            uptime_seconds=now - self.started_at,
        )
        return limits.fit_node_status(status)

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
            reply = pb.AllocReply(
                lease_id=lease.lease_id,
                gpu_indices=lease.gpu_indices,
                device_ids=[gpus[i].device_id for i in lease.gpu_indices],
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
                device_ids=list(reply.device_ids),
                memory_bytes=grant.memory_bytes,
                waited=reply.waited_seconds,
            )
            if not lease.future.done():
                lease.future.set_result(reply)
            if lease.notify:
                # The notice goes out a loop turn later, behind the Allocate reply it duplicates,
                # unless the lease is gone by then (its caller gave up, its session ended).
                asyncio.get_running_loop().call_soon(self._notify_grant, lease, reply)

    def _notify_grant(self, lease: Lease, reply: pb.AllocReply) -> None:
        if lease.state is LeaseState.GRANTED and self.leases.get(lease.lease_id) is lease:
            lease.session.outbox.put_nowait(pb.ServerMessage(grant=pb.GrantNotice(lease=reply)))

    def _log_release(self, lease: Lease, reason: str) -> None:
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

    def _fail_waiting(
        self,
        lease: Lease,
        reason: str,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.CANCELLED,
    ) -> None:
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
            lease.future.set_exception(BookError(code, message))
            # Nobody may be awaiting it any more (the caller is gone); mark it retrieved.
            lease.future.exception()

    def _session(self, session_id: str, session_key: str) -> ClientSession:
        """The session a call names, if the call proves it is that session's own client."""
        session = self.sessions.get(session_id)
        if session is None:
            self.counters.errors += 1
            self.log.emit(
                "error",
                client=session_id[: limits.MAX_ID],
                worker="",
                code=grpc.StatusCode.FAILED_PRECONDITION.name,
                message="unknown session",
            )
            raise BookError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"unknown session {echo(session_id)}: open a Session stream and use the "
                "session_id and session_key its Registered message carries (sessions end when "
                "their stream does)",
            )
        if not hmac.compare_digest(
            session_key.encode("utf-8", "surrogatepass"), session.key.encode("ascii")
        ):
            # Logged as from no known session: the caller is not the one it names.
            raise self._refuse(
                grpc.StatusCode.PERMISSION_DENIED,
                f"session {session_id} is not the caller's: a call acts only for the session its "
                "own Session stream opened (send that stream's session_id and session_key)",
            )
        return session

    def _refuse(self, code: grpc.StatusCode, message: str) -> BookError:
        """Count and log a refusal of a call that proves no session is its caller's."""
        self.counters.errors += 1
        message = limits.clip(message)
        self.log.emit("error", client="", worker="", code=code.name, message=message)
        return BookError(code, message)

    def _error(self, session: ClientSession, code: grpc.StatusCode, message: str) -> BookError:
        self.counters.errors += 1
        who = session.who()
        message = limits.clip(message)
        self.log.emit(
            "error", client=who["client"], worker=who["worker"], code=code.name, message=message
        )
        return BookError(code, message)

    @_flushes_log
    def refuse(
        self, code: grpc.StatusCode, message: str, session_id: str = "", session_key: str = ""
    ) -> BookError:
        """A call refused before the book acted (a field out of bounds): counted, logged (under
        the caller's session when the call proves it is that session's), returned to raise."""
        session = self.sessions.get(session_id) if len(session_id) <= limits.MAX_ID else None
        if session is None or not hmac.compare_digest(
            session_key.encode("utf-8", "surrogatepass"), session.key.encode("ascii")
        ):
            return self._refuse(code, message)
        return self._error(session, code, message)

    def _check_open(self) -> None:
        if self.closed:
            raise BookError(grpc.StatusCode.UNAVAILABLE, "the assigner is shutting down")

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


def _policy_name(scheduler: Scheduler) -> str:
    policy: Any = scheduler.policy
    return str(getattr(policy, "name", policy))
