"""The connection of one process to its node's assigner.

A `Client` opens its Session stream lazily, on first use, and keeps it open from a daemon thread
for as long as the process lives: every lease the process holds is bound to that stream, so when
the process dies (even by SIGKILL) the assigner releases its GPUs at once. Calls are plain
synchronous gRPC; a program needs no asyncio. One `Client` per process is the rule
(`default_client()`), several are allowed (benchmarks, tests).

Hooks for the swap engine and the automatic mode: register a `LeaseListener` with
`Client.add_listener`. Its `on_granted(client, lease)` runs after a grant, before `allocate()`
returns (onload there); `before_release(client, lease)` runs before the lease goes back to the
assigner (offload there); `on_yield_request(client, lease_id, reason)` runs on the session thread
when the assigner asks for a lease back (release it at the next safe point; a program without a
listener can poll `Client.yield_requested(lease)` there instead; gate mode ignores both). A
listener that raises in `on_granted` makes `allocate()` release the lease and re-raise.

Pinned requests: `allocate(..., required_gpus=lease.gpu_indices)` is granted exactly those GPUs
(the assigner's inventory indices) or waits for them, whatever else is free. A process that keeps
device state across leases (it swaps tensors to host memory between leases, in automatic mode or
through the manual API) must pin every later request to its FIRST grant's `gpu_indices`: a
tensor's storage keeps its device, so its state can only come back onto the same GPUs.

A grant that arrives just after `allocate()` gave up (its timeout fired, or it was interrupted)
is given back at once: every Allocate call carries a tag, the grant's notice on the session
stream echoes it, and the session thread releases a grant whose call no longer waits (the
assigner sends notices only where a reply may be lost: docs/ARCHITECTURE.md, "Late grants").

Safety: before it connects to a Unix socket (and so before the job's token leaves the process),
a client checks that the socket and its directory belong to this user and that nobody else can
write the directory; otherwise another user could have put their own socket there
(`UnsafeAssignerSocket`). Its calls carry the session's secret key, which only its own stream
was told: no other process can act for its session.

Lost leases: when the session ends without this process asking (the assigner was killed or
restarted, or it dropped this process as silent, e.g. after a SIGSTOP), every lease it held is
gone, and the assigner may already have granted its GPUs to another process. The session thread
notices at once (the stream breaks or ends) and marks those leases lost: each
`LeaseListener.on_lease_lost(client, lease, error)` and each callback given to
`Client.on_lease_lost(callback)` runs on that thread (keep them short: kill a child, set a flag,
exit). The lease leaves `held` for `lost`; ending it later (`release()`, `on_device_end()`, a
`with on_device()` block's exit) raises `LeaseLost` instead of releasing it "normally", and
`check_lease(lease)` raises it at any safe point. A release that races with the end of the session
(the process was resumed after SIGSTOP) waits for the session thread's verdict and raises
`LeaseLost` too: a lease is released normally only when the assigner accepted its release. An
`allocate()` whose call failed because its session had just ended (the stream had not said so
yet) is made once more, on a new session.

Exit: every Client ends its session at interpreter exit (an `atexit` hook): the stream is
cancelled, the channel closed and the session thread joined (a few seconds at most), so that
no gRPC call is finalised during interpreter shutdown while a daemon thread holds its lock (the
grpc-Python exit deadlock). A client used after that (an exit handler registered before this
module was imported) opens a new session, which its owner closes.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import secrets
import socket
import stat
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from acb_slurm import env
from acb_slurm._proto.acb.v1 import assigner_pb2 as pb
from acb_slurm._proto.acb.v1 import assigner_pb2_grpc as pb_grpc
from acb_slurm.client.errors import (
    AssignerError,
    AssignerNotConfigured,
    AssignerUnavailable,
    GangAborted,
    InvalidGpuRequest,
    LeaseLost,
    LeaseNotHeld,
    SessionLost,
    UnsafeAssignerSocket,
    from_rpc_error,
)

log = logging.getLogger(__name__)

#: How many given-up Allocate calls are remembered for a grant that may still come (it comes
#: within a few milliseconds, if at all, so a short memory is enough).
ABANDONED_MEMORY = 256

#: Seconds `close()` (and the exit hook) waits for the session thread to end.
JOIN_TIMEOUT = 5.0

#: Seconds a failed Release call waits for the session thread to say whether the session ended
#: (the call and the stream share one connection: both fail together, in either order).
SESSION_END_WAIT = 2.0

#: Release failures that may mean the session (and so the lease) is gone.
_LOSS_CODES = frozenset(
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    ]
)

#: A callback told of a lost lease: `callback(lease, error)`, on the session thread.
LostCallback = Callable[["Lease", LeaseLost], None]

#: Keepalive: a ping after 10 s without a frame, the connection dropped when its answer takes
#: over 5 s, so a silent assigner (a stopped process, a dead node) is noticed within ~15 s
#: (`SessionLost`). gRPC core waits `grpc.http2.ping_timeout_ms` (default 60 s) for a ping's
#: answer whatever `grpc.keepalive_timeout_ms` says, so both are set. The assigner allows a ping
#: every 5 s (`acb_slurm.assigner.server.SERVER_OPTIONS`), and pings its clients the same way.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
]


@dataclass(frozen=True, slots=True)
class Lease:
    """GPUs granted to this process until released. `device_ids` go into CUDA_VISIBLE_DEVICES."""

    lease_id: str
    gpu_indices: tuple[int, ...]
    device_ids: tuple[str, ...]
    memory_bytes: int
    node: str
    waited_seconds: float
    label: str = ""

    @property
    def cuda_visible_devices(self) -> str:
        """The value of CUDA_VISIBLE_DEVICES that shows exactly the granted GPUs."""
        return ",".join(self.device_ids)

    @classmethod
    def from_reply(cls, reply: pb.AllocReply, label: str = "") -> Lease:
        return cls(
            lease_id=reply.lease_id,
            gpu_indices=tuple(reply.gpu_indices),
            device_ids=tuple(reply.device_ids),
            memory_bytes=reply.memory_bytes,
            node=reply.node,
            waited_seconds=reply.waited_seconds,
            label=label,
        )


@dataclass(frozen=True, slots=True)
class GangPart:
    """One node's share of a granted gang."""

    node: str
    gpu_indices: tuple[int, ...]
    device_ids: tuple[str, ...]
    address: str  # the node's host


@dataclass(frozen=True, slots=True)
class GangLease(Lease):
    """This member's lease in a granted gang (`Client.join_gang`): its own node's GPUs (the
    `Lease` fields), its `node_rank`, every node's part in rank order, and the rendezvous
    address (node rank 0's host and a port that was free there)."""

    gang: str = ""
    node_rank: int = 0
    parts: tuple[GangPart, ...] = ()
    master_addr: str = ""
    master_port: int = 0

    @property
    def node_count(self) -> int:
        return len(self.parts)

    @classmethod
    def from_grant(cls, reply: pb.GangGrant, label: str = "") -> GangLease:
        parts = tuple(
            GangPart(p.node, tuple(p.gpu_indices), tuple(p.device_ids), p.address)
            for p in reply.parts
        )
        own = parts[reply.node_rank]
        return cls(
            lease_id=reply.lease_id,
            gpu_indices=own.gpu_indices,
            device_ids=own.device_ids,
            memory_bytes=0,
            node=own.node,
            waited_seconds=reply.waited_seconds,
            label=label,
            gang=reply.gang,
            node_rank=reply.node_rank,
            parts=parts,
            master_addr=reply.master_addr,
            master_port=reply.master_port,
        )


class LeaseListener:
    """Hooks around a client's leases (the swap engine's seam); every method is optional."""

    def on_granted(self, client: Client, lease: Lease) -> None:
        """After a grant, before allocate() returns."""

    def before_release(self, client: Client, lease: Lease) -> None:
        """Before a held lease goes back to the assigner."""

    def on_yield_request(self, client: Client, lease_id: str, reason: str) -> None:
        """The assigner asks for `lease_id` back at the next safe point (session thread; do not
        block here: release from the program's own thread). `reason` is e.g. "time-slice"."""

    def on_lease_lost(self, client: Client, lease: Lease, error: LeaseLost) -> None:
        """`lease` is gone without this process releasing it (its session ended: the assigner
        died, restarted, or dropped this process); its GPUs may already be another process's.
        Runs on the session thread as soon as the loss is seen: do not block here."""

    def required_gpus(self, client: Client) -> Sequence[int] | None:
        """The GPUs this process is bound to (e.g. its first grant's `gpu_indices`, once swapped
        state lives there), or None. A non-empty answer pins every `allocate()` that names no
        `required_gpus` itself to exactly those GPUs (and `gpus` to their number)."""
        return None


class Client:
    """One process's session with its assigner, and the calls made under it."""

    def __init__(
        self,
        target: str | None = None,
        token: str | None = None,
        job_id: str | None = None,
        worker: str | None = None,
        connect_timeout: float = 30.0,
        release_timeout: float = 30.0,
    ) -> None:
        try:
            self.target = target or env.assigner_target()
        except env.ConfigurationError as exc:
            raise AssignerNotConfigured(str(exc)) from None
        self._token = token if token is not None else env.token()
        self.job_id = env.job_id() if job_id is None else job_id
        self.worker = env.worker_name() if worker is None else worker
        self.connect_timeout = connect_timeout
        #: Seconds a Release call may take before it fails (AssignerError).
        self.release_timeout = release_timeout
        self.client_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.pid = os.getpid()
        self._metadata = ((env.TOKEN_METADATA_KEY, self._token),) if self._token else ()
        self._lock = threading.Lock()
        self._listeners: list[LeaseListener] = []
        # Leases granted and not yet ended by the program, in grant order; those whose session
        # ended under them are also in `_lost` (until the program ends them: LeaseLost). Both,
        # and `_session_error` and `_generation`, change under `_lease_lock` (never held across
        # a call or a callback).
        self._lease_lock = threading.Lock()
        self._held: dict[str, Lease] = {}
        self._lost: dict[str, LeaseLost] = {}
        self._lost_callbacks: list[LostCallback] = []
        self._generation = 0  # sessions opened so far (which session a call was made under)
        self._session_ended = threading.Event()  # set when the current session's stream ends
        self._yield_requests: set[str] = set()  # lease ids the assigner asked back
        # Allocate calls by tag: in flight, their grant notices seen early, and given up.
        self._tags = (str(n) for n in itertools.count(1))
        self._calls_lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._early_notices: dict[str, pb.AllocReply] = {}
        self._abandoned: OrderedDict[str, str] = OrderedDict()  # tag -> reason it gave up
        # Gang ends told before join_gang() recorded the grant they end: lease id -> reason.
        self._early_gang_ends: OrderedDict[str, str] = OrderedDict()
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.AssignerStub | None = None
        self._session_id: str | None = None
        self._session_key = ""  # the secret proving calls come from this session's client
        self._session_error: AssignerError | None = None
        self._outgoing: queue.SimpleQueue[pb.ClientMessage | None] | None = None
        self._call: Any = None
        self._reader: threading.Thread | None = None
        self._closed = False
        self.node = ""
        self.policy = ""
        with _live_lock:
            _live.add(self)

    # ---- session ----

    @property
    def session_id(self) -> str:
        """The session's id, opening the session on first use."""
        with self._lock:
            if self._session_id is None or self._session_error is not None:
                self._open_session()
            assert self._session_id is not None
            return self._session_id

    @property
    def connected(self) -> bool:
        """Whether the session is open (False before first use and once it broke)."""
        return self._session_id is not None and self._session_error is None

    def _open_session(self) -> None:
        if self._closed:
            raise AssignerError("this client is closed")
        self._teardown()
        # Leases of a session that ended under them were marked lost then (and stay until the
        # program ends them); any other lease of an earlier session was ended with it on
        # purpose (the exit hook): forgotten, as `end_session()` forgets them.
        self._forget_held()
        with self._lease_lock:
            self._yield_requests.clear()
            self._session_error = None
            self._generation += 1
            ended = self._session_ended = threading.Event()
        check_unix_target(self.target)  # before the token leaves this process
        from acb_slurm import tls  # TCP targets: TLS with ACB_TLS_DIR (TlsError otherwise)

        self._channel = tls.channel(self.target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.AssignerStub(self._channel)
        outgoing: queue.SimpleQueue[pb.ClientMessage | None] = queue.SimpleQueue()
        self._outgoing = outgoing
        identity = pb.ClientIdentity(
            client_id=self.client_id,
            job_id=self.job_id,
            worker=self.worker,
            pid=os.getpid(),
            hostname=socket.gethostname(),
        )

        def messages() -> Iterator[pb.ClientMessage]:
            yield pb.ClientMessage(register=identity)
            while True:
                message = outgoing.get()
                if message is None:
                    return
                yield message

        registered = threading.Event()
        result: dict[str, Any] = {}
        call = self._stub.Session(messages(), metadata=self._metadata)
        self._call = call
        thread = threading.Thread(
            target=self._read_session,
            args=(call, registered, result, ended),
            name="acb-session",
            daemon=True,
        )
        self._reader = thread
        thread.start()
        if not registered.wait(self.connect_timeout):
            call.cancel()
            raise AssignerUnavailable(
                f"the assigner at {self.target} did not answer within {self.connect_timeout:g}s"
            )
        if "error" in result:
            self._session_id = None
            raise result["error"]
        self._session_id = result["session_id"]
        self._session_key = result["session_key"]

    def _read_session(
        self,
        call: Any,
        registered: threading.Event,
        result: dict[str, Any],
        ended: threading.Event,
    ) -> None:
        try:
            self._read_stream(call, registered, result)
        finally:
            ended.set()

    def _read_stream(self, call: Any, registered: threading.Event, result: dict[str, Any]) -> None:
        try:
            for message in call:
                kind = message.WhichOneof("kind")
                if kind == "registered":
                    result["session_id"] = message.registered.session_id
                    result["session_key"] = message.registered.session_key
                    self.node = message.registered.node
                    self.policy = message.registered.policy
                    registered.set()
                elif kind == "grant":
                    self._on_grant_notice(message.grant.lease)
                elif kind == "gang_ended":
                    self._gang_ended(call, message.gang_ended)
                elif kind == "yield_request":
                    request = message.yield_request
                    self._yield_requests.add(request.lease_id)
                    for listener in list(self._listeners):
                        try:
                            listener.on_yield_request(self, request.lease_id, request.reason)
                        except Exception:
                            log.exception("a lease listener failed on a yield request")
        except grpc.RpcError as exc:
            # The error is the call itself, and its traceback holds frames that hold the call:
            # break that cycle, so the call is freed when this thread ends, never by the garbage
            # collector during interpreter shutdown (where its finaliser can deadlock).
            exc.__traceback__ = None
            if call is not self._call or self._closed:
                return
            if not registered.is_set():
                error = from_rpc_error(
                    exc, f"cannot open a session with the assigner at {self.target}"
                )
                if error.code == grpc.StatusCode.UNAVAILABLE:
                    error = AssignerUnavailable(
                        f"cannot reach the assigner at {self.target} ({exc.details()}): is "
                        f"acb-assigner running, and is {env.ASSIGNER} right?",
                        error.code,
                    )
                result["error"] = error
                registered.set()
                return
            self._session_lost(
                call,
                SessionLost(
                    f"the session with the assigner at {self.target} ended ({exc.details()}); "
                    "its leases were released",
                    exc.code(),
                ),
            )
            return
        if not registered.is_set():
            result["error"] = AssignerUnavailable(
                f"the assigner at {self.target} closed the session before registering it"
            )
            registered.set()
        elif call is self._call and not self._closed:
            self._session_lost(
                call,
                SessionLost(
                    f"the assigner at {self.target} ended the session; its leases were released"
                ),
            )

    def _session_lost(self, call: Any, error: SessionLost) -> None:
        """Session thread: the stream `call` ended without this process ending it. Every lease
        still held is lost; listeners and callbacks are told, at once."""
        with self._lease_lock:
            if call is not self._call or self._closed:
                return  # ended by this process (close, end_session): nothing was lost
            self._session_error = error
            self._yield_requests.clear()
            lost = [lease for lease_id, lease in self._held.items() if lease_id not in self._lost]
            errors = [_lost_error(lease, error) for lease in lost]
            for lease, lost_error in zip(lost, errors, strict=True):
                self._lost[lease.lease_id] = lost_error
        # A loss nobody is told of is logged as an error; one a callback or listener handles
        # is theirs to report (acb-run says it once, its own way).
        handled = bool(self._lost_callbacks) or any(
            type(listener).on_lease_lost is not LeaseListener.on_lease_lost
            for listener in self._listeners
        )
        for lease, lost_error in zip(lost, errors, strict=True):
            log.log(logging.INFO if handled else logging.ERROR, "%s", lost_error)
            self._notify_lost(lease, lost_error)

    def _gang_ended(self, call: Any, ended: pb.GangEnded) -> None:
        """Session thread: the gang of a member lease ended under it (another member failed,
        a node went away): that lease is lost, told at once like a session's end."""
        with self._lease_lock:
            lease = self._held.get(ended.lease_id)
            if call is not self._call or ended.lease_id in self._lost:
                return
            if lease is None:  # before join_gang() recorded its grant: it will look here
                self._early_gang_ends[ended.lease_id] = ended.reason
                while len(self._early_gang_ends) > ABANDONED_MEMORY:
                    self._early_gang_ends.popitem(last=False)
                return
            error = LeaseLost(
                f"gang {ended.gang} ended: {ended.reason}; this node's part was released and "
                "its GPUs must not be used any more",
                lease_id=lease.lease_id,
                lease=lease,
                reason=ended.reason,
            )
            self._lost[lease.lease_id] = error
        self._notify_lost(lease, error)

    def _notify_lost(self, lease: Lease, error: LeaseLost) -> None:
        for listener in list(self._listeners):
            try:
                listener.on_lease_lost(self, lease, error)
            except Exception:
                log.exception("a lease listener failed on a lost lease")
        for callback in list(self._lost_callbacks):
            try:
                callback(lease, error)
            except Exception:
                log.exception("an on_lease_lost callback failed")

    def _teardown(self) -> threading.Thread | None:
        """End the stream and the channel; returns the session thread, for the caller to join
        once it no longer holds `_lock` (the thread may be in a listener that takes it)."""
        # Detached first: the session thread, seeing the cancellation, must find its call is
        # no longer the client's (an end on purpose, not a loss).
        with self._lease_lock:
            call, channel, outgoing = self._call, self._channel, self._outgoing
            self._call = self._channel = self._stub = self._outgoing = None
        if outgoing is not None:
            outgoing.put(None)
        if call is not None:
            call.cancel()
        if channel is not None:
            channel.close()
        reader, self._reader = self._reader, None
        self._session_id = None
        self._session_key = ""
        return reader

    @staticmethod
    def _join(reader: threading.Thread | None, timeout: float = JOIN_TIMEOUT) -> None:
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout)
            if reader.is_alive():
                log.warning("the acb session thread did not end within %gs", timeout)

    def end_session(self) -> None:
        """End the session but keep the client: the assigner releases every lease the session
        held (it sees the stream close; logged as `disconnect`), and the next call opens a new
        session. For a release that failed, so that nothing stays held behind this process."""
        with self._lock:
            reader = self._teardown()
            self._forget_held()
            self._yield_requests.clear()
        self._join(reader)

    def close(self) -> None:
        """End the session: the assigner releases whatever this client still holds. Idempotent;
        waits (a few seconds at most) for the session thread to end."""
        with self._lock:
            self._closed = True
            reader = self._teardown()
            self._forget_held()
        self._join(reader)

    def _forget_held(self) -> None:
        """This process ended its session on purpose: its held leases went with it (not lost).
        Lost ones stay until the program ends them, so that it still learns of the loss."""
        with self._lease_lock:
            self._held = {
                lease_id: lease for lease_id, lease in self._held.items() if lease_id in self._lost
            }

    def _end_at_exit(self) -> None:
        """The exit hook: end the session (its leases go with it) and wait for its thread, so
        that nothing of gRPC is left running at interpreter shutdown. The client stays usable:
        an exit handler that runs later may still use it (a new session)."""
        locked = self._lock.acquire(timeout=JOIN_TIMEOUT)
        try:
            reader = self._teardown()
        finally:
            if locked:
                self._lock.release()
        self._join(reader)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- listeners ----

    def add_listener(self, listener: LeaseListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: LeaseListener) -> None:
        self._listeners.remove(listener)

    # ---- calls ----

    def on_lease_lost(self, callback: LostCallback) -> LostCallback:
        """Call `callback(lease, error)` (a `LeaseLost`) for each lease lost from now on: its
        session ended without this process ending it, so the assigner released it and may have
        given its GPUs to another process. It runs on the session thread as soon as the loss is
        seen (within milliseconds of an assigner's death; on resuming from a stop that outlasted
        the assigner's keepalive): keep it short. Returns `callback` (usable as a decorator)."""
        self._lost_callbacks.append(callback)
        return callback

    def remove_lease_lost_callback(self, callback: LostCallback) -> None:
        self._lost_callbacks.remove(callback)

    @property
    def held(self) -> list[Lease]:
        """Leases this client holds, oldest first (lost ones are not: see `lost`)."""
        with self._lease_lock:
            return [lease for lease_id, lease in self._held.items() if lease_id not in self._lost]

    @property
    def lost(self) -> list[Lease]:
        """Leases lost while held (their session ended) that the program has not ended yet."""
        with self._lease_lock:
            return [lease for lease_id, lease in self._held.items() if lease_id in self._lost]

    def latest_lease(self) -> Lease | None:
        """The most recently granted lease not yet ended, lost or not (what `on_device_end()`
        ends when it is given none)."""
        with self._lease_lock:
            return next(reversed(self._held.values()), None)

    def check_lease(self, lease: Lease | str) -> None:
        """At a safe point: raise `LeaseLost` if `lease` was lost (the lease stays to be ended),
        `LeaseNotHeld` if it is not this process's; return if it is still held."""
        lease_id = lease if isinstance(lease, str) else lease.lease_id
        with self._lease_lock:
            error = self._lost.get(lease_id)
            known = lease_id in self._held
        if error is not None:
            raise error
        if not known:
            raise LeaseNotHeld(f"lease {lease_id!r} is not held by this process")

    def yield_requested(self, lease: Lease | str) -> bool:
        """Whether the assigner asked for this lease back (poll it at a safe point)."""
        return (lease if isinstance(lease, str) else lease.lease_id) in self._yield_requests

    def allocate(
        self,
        gpus: int = 1,
        memory: int = 0,
        priority: int = 0,
        label: str = "",
        timeout: float | None = None,
        required_gpus: Sequence[int] | None = None,
    ) -> Lease:
        """Block until the assigner grants `gpus` GPUs; TimeoutError (request withdrawn) after
        `timeout` seconds.

        `required_gpus` (inventory indices, e.g. an earlier lease's `gpu_indices`) pins the
        request: it gets exactly those GPUs, waiting for them while others are free; `gpus` must
        be their number. None or empty: any GPUs, unless a listener binds this process to some
        (`LeaseListener.required_gpus`): then exactly those, and `gpus` is their number."""
        required = _required_indices(required_gpus)
        bound = self._bound_gpus()
        if bound:
            if not required:
                required, gpus = bound, len(bound)
            elif sorted(required) != sorted(bound):
                raise InvalidGpuRequest(
                    f"this process is bound to GPU(s) {bound} (its swapped state lives there); "
                    f"it cannot ask for {required}"
                )
        deadline = None if timeout is None else time.monotonic() + timeout
        first_failure: str | None = None  # of the call made on a session that ended
        while True:
            try:
                session_id, session_key, stub, generation, ended = self._current_session()
            except AssignerError as exc:
                if first_failure is None:
                    raise
                # No new session either: say also how the call on the old one failed.
                raise type(exc)(
                    f"{exc} (before that, on the session that ended: {first_failure})", exc.code
                ) from None
            tag = next(self._tags)
            request = pb.AllocRequest(
                session_id=session_id,
                session_key=session_key,
                gpu_count=gpus,
                memory_bytes=memory,
                priority=priority,
                label=label,
                request_tag=tag,
                required_gpu_indices=required,
            )
            with self._calls_lock:
                self._in_flight.add(tag)
            reply: pb.AllocReply | None = None
            gave_up = "cancelled"
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                reply = stub.Allocate(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
                    gave_up = "deadline"
                    raise TimeoutError(
                        f"no GPU granted within {timeout:g}s by the assigner at {self.target}; "
                        "the request was withdrawn"
                    ) from None
                # The session broke just before or during the call (the stream had not said so
                # yet): nothing was granted under it. Once more, on a new session.
                if first_failure is None and self._ended_under(exc, generation, ended):
                    first_failure = f"allocate: {exc.details()}"
                    continue
                raise self._rpc_error(exc, "allocate") from None
            finally:
                self._call_ended(tag, reply, gave_up)
            break
        lease = Lease.from_reply(reply, label)
        with self._lease_lock:
            gone = self._generation != generation or self._session_error is not None
            if not gone:
                self._held[lease.lease_id] = lease
        if gone:  # granted, but the session ended before this call returned: never usable
            raise _lost_error(
                lease,
                self._session_error
                or SessionLost(f"the session with the assigner at {self.target} ended"),
            )
        try:
            for listener in list(self._listeners):
                listener.on_granted(self, lease)
        except BaseException:
            self._release(lease, notify=False)
            raise
        return lease

    def join_gang(
        self,
        gang: str,
        node_count: int,
        gpus_per_node: int = 1,
        node: str | None = None,
        priority: int = 0,
        label: str = "",
        timeout: float | None = None,
    ) -> GangLease:
        """Join `gang` as its member on `node` (default: this node, SLURMD_NODENAME or the
        host name) and block until the whole gang is granted: `gpus_per_node` GPUs on each of
        `node_count` nodes, one member per node, all at once. This client must talk to the
        job's controller (`ACB_CONTROLLER`).

        Raises `GangAborted` if the gang fails before its grant (a member left or died, a
        node's assigner went away), `TimeoutError` after `timeout` seconds (which fails the
        gang for every member), `GrantImpossible`/`InvalidGpuRequest` for a gang that can never
        be granted or a member that disagrees with the first. Once granted, the lease is lost
        (`on_lease_lost`) when the gang ends under it; end it with `leave_gang`."""
        node = node or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        session_id, session_key, stub, generation, _ended = self._current_session()
        request = pb.GangJoin(
            session_id=session_id,
            session_key=session_key,
            gang=gang,
            node_count=node_count,
            gpus_per_node=gpus_per_node,
            node=node,
            priority=priority,
            label=label,
        )
        try:
            reply = stub.JoinGang(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
                raise TimeoutError(
                    f"gang {gang} was not granted within {timeout:g}s by the controller at "
                    f"{self.target}; it was failed for every member (a grant that came at the "
                    "same instant is held until this client's session ends)"
                ) from None
            raise self._rpc_error(exc, f"join gang {gang}") from None
        lease = GangLease.from_grant(reply, label)
        with self._lease_lock:
            gone = self._generation != generation or self._session_error is not None
            ended = self._early_gang_ends.pop(lease.lease_id, None)
            if not gone and ended is None:
                self._held[lease.lease_id] = lease
        if ended is not None:  # another member failed the moment it was granted
            raise GangAborted(f"gang {gang} ended as soon as it was granted: {ended}")
        if gone:
            raise _lost_error(
                lease,
                self._session_error
                or SessionLost(f"the session with the assigner at {self.target} ended"),
            )
        return lease

    def leave_gang(
        self,
        lease: GangLease | str,
        exit_status: int = 0,
        reason: str = "",
        stopping: bool = False,
    ) -> None:
        """This member's program ended with `exit_status`: 0 gives its node's part back (the
        gang ends with its last member), anything else ends the whole gang, stopping the other
        members; `stopping` (it ended after a stop signal, which the other members were most
        likely sent too) gives them a grace period to end on their own first. Raises
        `LeaseLost` if the gang had already ended under this member."""
        lease_id = lease if isinstance(lease, str) else lease.lease_id
        with self._lease_lock:
            held = self._held.pop(lease_id, None)
            error = self._lost.pop(lease_id, None)
            stub, session_id, key = self._stub, self._session_id, self._session_key
            generation, ended = self._generation, self._session_ended
        if error is not None:
            raise error
        if held is None:
            raise LeaseNotHeld(f"gang lease {lease_id!r} is not held by this process")
        if stub is None or session_id is None:
            return  # the session ended on purpose (exit hook): the gang saw it end
        try:
            stub.LeaveGang(
                pb.GangLeave(
                    session_id=session_id,
                    session_key=key,
                    lease_id=lease_id,
                    exit_status=exit_status,
                    reason=reason[:1024],
                    stopping=stopping,
                ),
                timeout=self.release_timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            lost = self._lost_in_release(held, exc, generation, ended)
            if lost is not None:
                raise lost from None
            raise self._rpc_error(exc, "leave gang") from None

    def _current_session(
        self,
    ) -> tuple[str, str, pb_grpc.AssignerStub, int, threading.Event]:
        """(id, key, stub, generation, ended event) of the open session, opening one if
        needed."""
        with self._lock:
            if self._session_id is None or self._session_error is not None:
                self._open_session()
            assert self._session_id is not None and self._stub is not None
            return (
                self._session_id,
                self._session_key,
                self._stub,
                self._generation,
                self._session_ended,
            )

    def _ended_under(
        self, exc: grpc.RpcError, generation: int, ended: threading.Event, release: bool = False
    ) -> bool:
        """Whether the session a failed call was made under has ended. The call and the stream
        share one connection and fail together, in either order, so for a failure that may
        mean it (the connection broke; an assigner that does not know the session, e.g. a new
        one on the same socket, seen by a process resumed after SIGSTOP), wait up to
        SESSION_END_WAIT for the stream's own verdict."""
        if self._generation != generation:
            return True
        code = exc.code() if hasattr(exc, "code") else None
        if code not in _LOSS_CODES:
            return False
        # An Allocate's FAILED_PRECONDITION is most often a request that can never be granted
        # (no waiting for those); UnknownSession only if the assigner lost the session.
        if (
            code == grpc.StatusCode.FAILED_PRECONDITION
            and not release
            and _refusal(exc) != "UnknownSession"
        ):
            return ended.is_set()
        return ended.wait(SESSION_END_WAIT) or self._generation != generation

    def _bound_gpus(self) -> list[int]:
        """The GPUs a listener binds this process to ([] when none does)."""
        for listener in list(self._listeners):
            bound = listener.required_gpus(self)
            if bound:
                return _required_indices(bound)
        return []

    def _call_ended(self, tag: str, reply: pb.AllocReply | None, gave_up: str) -> None:
        """An Allocate call returned (`reply`) or gave up; give back a grant it will not use."""
        with self._calls_lock:
            self._in_flight.discard(tag)
            notice = self._early_notices.pop(tag, None)
            if reply is not None or notice is None:
                if reply is None:
                    self._abandoned[tag] = gave_up
                    while len(self._abandoned) > ABANDONED_MEMORY:
                        self._abandoned.popitem(last=False)
                return
        self._give_back(notice.lease_id, gave_up)

    def _on_grant_notice(self, reply: pb.AllocReply) -> None:
        """Session thread: a grant. Kept while its call is in flight, given back if it gave up."""
        tag = reply.request_tag
        with self._calls_lock:
            if tag in self._in_flight:
                self._early_notices[tag] = reply
                return
            reason = self._abandoned.pop(tag, None)
        if reason is not None:
            self._give_back(reply.lease_id, reason)

    def _give_back(self, lease_id: str, reason: str) -> None:
        """Release a grant nobody waits for any more (best effort: a broken session took it)."""
        stub, session_id, key = self._stub, self._session_id, self._session_key
        if stub is None or self._session_error is not None:
            return
        try:
            stub.Release(
                pb.ReleaseRequest(
                    session_id=session_id, session_key=key, lease_id=lease_id, reason=reason
                ),
                timeout=self.release_timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            log.warning("could not give back lease %s granted too late: %s", lease_id, exc)

    def release(self, lease: Lease | str) -> None:
        """Give a lease back. Listeners' before_release runs first; if one raises (e.g. the swap
        engine could not offload), the lease stays held (the data is still on its GPUs) and the
        error propagates: call release() again later, or end the session.

        A lease that was lost (its session ended under it: `on_lease_lost`) is not released
        "normally": this raises `LeaseLost` (and forgets the lease), without running
        before_release (its GPUs may be another process's by now)."""
        lease_id = lease if isinstance(lease, str) else lease.lease_id
        with self._lease_lock:
            held = self._held.get(lease_id)
            error = self._lost.pop(lease_id, None)
            if error is not None:
                del self._held[lease_id]
        if error is not None:
            raise error
        if held is None:
            raise LeaseNotHeld(f"lease {lease_id!r} is not held by this process")
        if isinstance(held, GangLease):
            self.leave_gang(held, 0)
            return
        self._release(held, notify=True)

    def _release(self, lease: Lease, notify: bool) -> None:
        if notify:
            for listener in list(self._listeners):
                listener.before_release(self, lease)  # raises: nothing given back
        with self._lease_lock:
            self._held.pop(lease.lease_id, None)
            error = self._lost.pop(lease.lease_id, None)  # lost while the listeners ran
            self._yield_requests.discard(lease.lease_id)
            stub, session_id, key = self._stub, self._session_id, self._session_key
            generation, ended = self._generation, self._session_ended
        if error is not None:
            raise error
        if stub is None or session_id is None:
            return  # the exit hook ended the session on purpose: the lease went with it
        try:
            stub.Release(
                pb.ReleaseRequest(session_id=session_id, session_key=key, lease_id=lease.lease_id),
                timeout=self.release_timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            lost = self._lost_in_release(lease, exc, generation, ended)
            if lost is not None:
                raise lost from None
            raise self._rpc_error(exc, "release") from None

    def _lost_in_release(
        self, lease: Lease, exc: grpc.RpcError, generation: int, ended: threading.Event
    ) -> LeaseLost | None:
        """A Release call failed: the LeaseLost to raise if the lease is gone (its session ended
        around the call, or the assigner no longer knows it), else None."""
        code = exc.code() if hasattr(exc, "code") else None
        if code not in _LOSS_CODES:
            return None
        if self._ended_under(exc, generation, ended, release=True):
            return _lost_error(
                lease,
                self._session_error
                or SessionLost(f"the session with the assigner at {self.target} ended", code),
            )
        if code == grpc.StatusCode.NOT_FOUND:
            details = exc.details() if hasattr(exc, "details") else ""
            return _lost_error(
                lease, SessionLost(f"the assigner at {self.target} no longer has it ({details})")
            )
        return None

    def report_usage(self, lease: Lease | str, resident_bytes: int) -> None:
        """Tell the assigner how much device memory a lease really uses (gpu-sharing)."""
        lease_id = lease if isinstance(lease, str) else lease.lease_id
        self.session_id  # noqa: B018 - opens the session
        if self._outgoing is not None:
            self._outgoing.put(
                pb.ClientMessage(
                    usage=pb.UsageReport(lease_id=lease_id, resident_bytes=resident_bytes)
                )
            )

    def yield_done(self, lease_id: str) -> None:
        """Acknowledge a yield request (after releasing the lease)."""
        if self._outgoing is not None:
            self._outgoing.put(pb.ClientMessage(yield_done=pb.YieldDone(lease_id=lease_id)))

    def status(self, timeout: float = 10.0) -> pb.StatusReply:
        """The assigner's inventory, holders, queue and counters."""
        self.session_id  # noqa: B018 - opens the channel
        assert self._stub is not None
        try:
            return self._stub.Status(pb.StatusRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._rpc_error(exc, "status") from None

    def _rpc_error(self, exc: grpc.RpcError, what: str) -> AssignerError:
        session_error = self._session_error
        if session_error is None:
            return from_rpc_error(exc, f"{what} at the assigner {self.target}")
        # The session ended too (its end and this call's answer race): say both, so that the
        # assigner's own reason ("the assigner is shutting down") is never lost.
        details = exc.details() if hasattr(exc, "details") else ""
        if not details:
            return session_error
        return SessionLost(f"{session_error} ({what}: {details})", session_error.code)


def _lost_error(lease: Lease, cause: AssignerError) -> LeaseLost:
    """The LeaseLost for `lease`, lost because of `cause` (the end of its session)."""
    gpus = ",".join(str(index) for index in lease.gpu_indices) or "?"
    return LeaseLost(
        f"lease {lease.lease_id} on GPU {gpus} was lost ({cause}): its GPUs may already be "
        "another process's and must not be used any more",
        cause.code,
        lease_id=lease.lease_id,
        lease=lease,
        reason=str(cause),
    )


def _refusal(exc: grpc.RpcError) -> str:
    """The lease book's name for a refused call (its trailing metadata), "" when it has none."""
    try:
        metadata = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:  # not a call's error (e.g. a channel's)
        return ""
    return next((str(v) for k, v in metadata if k == env.REFUSAL_METADATA_KEY), "")


def unix_socket_path(target: str) -> str | None:
    """The filesystem path of a `unix:` gRPC target (`unix:path`, `unix:///abs/path`), else None."""
    if not target.startswith("unix:"):
        return None
    path = target[len("unix:") :]
    if path.startswith("//"):
        path = path[2:]
    return path


def _unsafe(info: os.stat_result, uid: int, what: str) -> str:
    if info.st_uid != uid:
        return f"{what} is owned by uid {info.st_uid}, not by this user (uid {uid})"
    return ""


def check_unix_target(target: str) -> None:
    """UnsafeAssignerSocket unless a Unix socket target is safe to send the job's token to: the
    socket and its directory are this user's and nobody else can write the directory (else
    another user could have unlinked the assigner's socket and listen in its place). A socket
    that is not there yet is left to the connection to report."""
    if target.startswith("unix-abstract:"):
        raise UnsafeAssignerSocket(
            f"refusing to connect to the assigner at {target}: an abstract Unix socket belongs "
            "to no user, so any local process could be listening on it; use a socket path in a "
            "directory of this user (unix:/path/assigner.sock)"
        )
    path = unix_socket_path(target)
    if path is None:
        return
    real = os.path.realpath(path)
    directory = os.path.dirname(real)
    uid = os.geteuid()
    try:
        info = os.stat(directory)
    except OSError:
        return  # no directory, no socket: connecting fails and says so
    problem = _unsafe(info, uid, f"its directory {directory}")
    if not problem and info.st_mode & 0o022:
        mode = stat.S_IMODE(info.st_mode)
        problem = f"its directory {directory} is one group or others can write (mode {mode:04o})"
    if not problem:
        try:
            socket_info = os.stat(real)
        except OSError:
            return
        problem = _unsafe(socket_info, uid, f"the socket {real}")
    if problem:
        raise UnsafeAssignerSocket(
            f"refusing to connect to the assigner at {target}: {problem}, so another user could "
            "have put their own socket there and would receive the job's token. Use the socket "
            "of an assigner started by this user in a directory only it can write (acb-assigner "
            "refuses any other)"
        )


def _required_indices(required_gpus: Sequence[int] | None) -> list[int]:
    """The required GPU indices as the wire carries them; InvalidGpuRequest if they cannot be."""
    if required_gpus is None:
        return []
    if isinstance(required_gpus, str | bytes):
        raise InvalidGpuRequest(
            f"required_gpus must be a sequence of GPU indices, got {required_gpus!r}"
        )
    indices = list(required_gpus)
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise InvalidGpuRequest(
                f"required_gpus must hold GPU indices (ints >= 0), got {indices!r}"
            )
    return indices


_default: Client | None = None
_default_lock = threading.Lock()
#: Every Client of this process not yet garbage-collected: the exit hook ends their sessions.
_live: weakref.WeakSet[Client] = weakref.WeakSet()
_live_lock = threading.Lock()


def default_client() -> Client:
    """This process's Client, made from the environment on first use (and anew after fork)."""
    global _default
    with _default_lock:
        if _default is None or _default.pid != os.getpid():
            _default = Client()
        return _default


def set_default_client(client: Client | None) -> Client | None:
    """Make `client` this process's default (None: build anew from the environment next time);
    returns the previous one, which stays open."""
    global _default
    with _default_lock:
        previous, _default = _default, client
        return previous


def _close_at_exit() -> None:
    """At interpreter exit: end the session of every Client of this process (the default one
    included), cancelling its stream and joining its thread, before shutdown finalises them."""
    with _live_lock:
        clients = list(_live)
    for client in clients:
        if client.pid != os.getpid():
            continue  # a fork's copy: the parent's stream is not ours to end
        try:
            client._end_at_exit()
        except Exception:
            log.exception("could not end an acb session at exit")


atexit.register(_close_at_exit)
