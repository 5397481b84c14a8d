"""The gRPC face of the assigner: thin servicers over a `LeaseBook`, the token check, health.

The lease book speaks in domain terms; this module is where they meet the wire: `STATUS_OF` maps
each of its refusals to a gRPC status (the refusal's message is the details), and the functions
under "Domain ↔ protobuf" turn identities, grants, stream events and node status into messages.

`create_server(...)` builds a grpc.aio server bound to a Unix socket (and optionally TCP) and
returns it with the TCP port actually bound; `serve(config)` runs one daemon until SIGTERM or
SIGINT, then releases everything (logged with reason `shutdown`), writes `stop` and returns.

The socket is private: its directory must belong to this user and be writable by nobody else
(it is made 0700 when missing), so no other user can replace the socket and receive the job's
token from the next client; whatever else is at the socket's path is never deleted. Every field
a client sends is checked against `limits` before anything else.

The TCP listener (multi-node jobs) speaks TLS with the job's material (`acb_slurm.tls`) and
accepts only clients that show the job's certificate; plaintext TCP only when the caller asked
for it (`acb-assigner --insecure-tcp`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from acb_slurm import defaults
from acb_slurm import tls as job_tls
from acb_slurm._proto.acb.v1 import assigner_pb2 as pb
from acb_slurm._proto.acb.v1 import assigner_pb2_grpc as pb_grpc
from acb_slurm.assigner import gangs, leases, limits
from acb_slurm.assigner.errors import AssignerStartError
from acb_slurm.assigner.eventlog import EventLog, create_private
from acb_slurm.assigner.inventory import describe
from acb_slurm.assigner.leases import BookError, LeaseBook
from acb_slurm.env import REFUSAL_METADATA_KEY, TOKEN_METADATA_KEY
from acb_slurm.scheduler.types import Gpu

log = logging.getLogger(__name__)

#: Keepalive pings find a silent peer: a stopped or hung client, a node that died (a local SIGKILL
#: closes the socket at once). Every connection is pinged after 5 s without a frame and dropped
#: when the answer takes over 5 s: a silent client loses its leases within ~10 s (gRPC core
#: answers pings on its own threads, so a busy client is not silent). gRPC core waits
#: `grpc.http2.ping_timeout_ms` (default 60 s) for a ping's answer whatever
#: `grpc.keepalive_timeout_ms` says, so both are set. Clients ping every 10 s
#: (`acb_slurm.client.session.CHANNEL_OPTIONS`), which the minimum interval here allows.
KEEPALIVE_TIME_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 5_000
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),
]

ASSIGNER_SERVICE = "acb.v1.Assigner"
#: Reasons a client may give in a ReleaseRequest (logged on the `release` event).
RELEASE_REASONS = ("release", "deadline", "cancelled")

#: The gRPC status each refusal of the lease book is answered with; its message is the details.
#: The event log's `error` lines name the same status (`LeaseBook(error_code=...)`).
STATUS_OF: dict[type[BookError], grpc.StatusCode] = {
    leases.BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    leases.RequestImpossible: grpc.StatusCode.FAILED_PRECONDITION,
    leases.UnknownSession: grpc.StatusCode.FAILED_PRECONDITION,
    leases.NotSessionOwner: grpc.StatusCode.PERMISSION_DENIED,
    leases.UnknownLease: grpc.StatusCode.NOT_FOUND,
    leases.LeaseNotGranted: grpc.StatusCode.FAILED_PRECONDITION,
    leases.Withdrawn: grpc.StatusCode.CANCELLED,
    leases.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    leases.GangAborted: grpc.StatusCode.ABORTED,
    leases.NotController: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(error: BookError) -> grpc.StatusCode:
    """The gRPC status a refusal of the lease book is answered with (INTERNAL if unmapped)."""
    for kind in type(error).__mro__:
        code = STATUS_OF.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def status_name(error: BookError) -> str:
    """The event log's `code` of a refusal: the name of the gRPC status it is answered with."""
    return str(status_of(error).name)


# ---- Domain ↔ protobuf ------------------------------------------------------------------------


def _message(kind: type[Any], value: Any, **nested: Any) -> Any:
    """The protobuf message `kind` made from dataclass `value`, whose fields have the message's
    names (`nested`: fields given already converted)."""
    return kind(**{**{f.name: getattr(value, f.name) for f in fields(value)}, **nested})


def identity_from_message(message: pb.ClientIdentity) -> leases.ClientIdentity:
    return leases.ClientIdentity(
        **{f.name: getattr(message, f.name) for f in fields(leases.ClientIdentity)}
    )


def identity_message(identity: leases.ClientIdentity) -> pb.ClientIdentity:
    return _message(pb.ClientIdentity, identity)


def alloc_reply(grant: leases.LeaseGrant) -> pb.AllocReply:
    return _message(pb.AllocReply, grant)


def server_message(
    event: leases.LeaseGrant | leases.YieldRequested | leases.GangEnded,
) -> pb.ServerMessage:
    """What a session's stream says for an item of its outbox."""
    if isinstance(event, leases.GangEnded):
        return pb.ServerMessage(gang_ended=_message(pb.GangEnded, event))
    if isinstance(event, leases.YieldRequested):
        return pb.ServerMessage(
            yield_request=pb.YieldRequest(lease_id=event.lease_id, reason=event.reason)
        )
    return pb.ServerMessage(grant=pb.GrantNotice(lease=alloc_reply(event)))


def node_status_message(status: leases.NodeStatus) -> pb.NodeStatus:
    """A node's status on the wire, trimmed under `limits.STATUS_MAX_BYTES`."""
    message = _message(
        pb.NodeStatus,
        status,
        gpus=[_message(pb.GpuStatus, gpu) for gpu in status.gpus],
        leases=[
            _message(pb.LeaseStatus, lease, client=identity_message(lease.client))
            for lease in status.leases
        ],
        queue=[
            _message(pb.WaiterStatus, waiter, client=identity_message(waiter.client))
            for waiter in status.queue
        ],
        counters=_message(pb.Counters, status.counters),
    )
    return limits.fit_node_status(message)


def gang_part_message(part: gangs.Part) -> pb.GangPart:
    return pb.GangPart(
        node=part.node,
        gpu_indices=part.gpu_indices,
        device_ids=part.device_ids,
        address=part.address,
    )


def gang_grant_message(grant: gangs.GangGrant) -> pb.GangGrant:
    return _message(pb.GangGrant, grant, parts=[gang_part_message(p) for p in grant.parts])


def gang_status_message(status: gangs.GangStatus) -> pb.GangStatus:
    return _message(pb.GangStatus, status, parts=[gang_part_message(p) for p in status.parts])


@dataclass
class AssignerConfig:
    """Everything `acb-assigner` was told on its command line, validated."""

    socket_path: str
    gpus: list[Gpu]
    policy: str = defaults.POLICY
    tcp: str | None = None
    event_log: str | None = None
    token: str | None = None
    ready_file: str | None = None
    controller: str | None = None
    time_slice: float = 0.0
    #: The job's TLS material for the TCP listener and the link to the controller; None only
    #: with `insecure_tcp` (or without TCP at all).
    tls: job_tls.Material | None = None
    insecure_tcp: bool = False
    node: str = field(
        default_factory=lambda: os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    )


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose `x-acb-token` metadata is not the job's token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"missing or wrong {TOKEN_METADATA_KEY} metadata: this assigner serves one job; "
                "set ACB_TOKEN_FILE to the job's token file",
            )

        async def refuse_stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            await refuse(None, context)

        self._unary = grpc.unary_unary_rpc_method_handler(refuse)
        self._stream = grpc.stream_stream_rpc_method_handler(refuse_stream)
        self._unary_stream = grpc.unary_stream_rpc_method_handler(refuse)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        for key, value in handler_call_details.invocation_metadata or ():
            if key != TOKEN_METADATA_KEY:
                continue
            given = value if isinstance(value, bytes) else str(value).encode("utf-8")
            if hmac.compare_digest(given, self._token):  # constant time: the token is a secret
                return await continuation(handler_call_details)
        method = handler_call_details.method
        if method.endswith(("/Session", "/Join")):
            return self._stream
        if method.endswith("/Watch"):
            return self._unary_stream
        return self._unary


async def _abort(context: grpc.aio.ServicerContext, error: BookError) -> None:
    """End the call with the gRPC status of `error` (`STATUS_OF`) and its message; the trailing
    metadata names the refusal, for clients that must tell those of one status apart."""
    await context.abort(
        status_of(error),
        error.message,
        trailing_metadata=((REFUSAL_METADATA_KEY, type(error).__name__),),
    )


def _out_of_bounds(book: LeaseBook, exc: limits.OutOfBounds, what: str, request: Any) -> BookError:
    """The refusal of a call whose field is longer than its bound (counted and logged)."""
    session_id = getattr(request, "session_id", "")
    session_key = getattr(request, "session_key", "")
    return book.refuse(leases.BadRequest(f"{what}: {exc}"), session_id, session_key)


class AssignerServicer(pb_grpc.AssignerServicer):
    """acb.v1.Assigner: each method hands its work to the LeaseBook."""

    def __init__(
        self,
        book: LeaseBook,
        role: Callable[[], pb.StatusReply],
        coordinator: gangs.GangCoordinator | None = None,
    ) -> None:
        """`coordinator`: this assigner's gangs (None at an executor)."""
        self.book = book
        self._status = role
        self.gangs = coordinator

    async def Session(
        self,
        request_iterator: AsyncIterator[pb.ClientMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ServerMessage]:
        book = self.book
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "register":
            refusal = leases.BadRequest("the first message of a Session stream must be `register`")
            book.record_error("", refusal)
            await _abort(context, refusal)
            return
        try:
            session = book.open_session(identity_from_message(first.register))
        except BookError as exc:
            await _abort(context, exc)
            return
        reader = asyncio.ensure_future(self._read(session.session_id, request_iterator))
        try:
            yield pb.ServerMessage(
                registered=pb.Registered(
                    session_id=session.session_id,
                    node=book.node,
                    policy=book.scheduler.policy.name,
                    session_key=session.key,
                )
            )
            while True:
                event = await session.outbox.get()
                if event is None:
                    break
                yield server_message(event)
        finally:
            reader.cancel()
            book.close_session(session.session_id)

    async def _read(
        self, session_id: str, request_iterator: AsyncIterator[pb.ClientMessage]
    ) -> None:
        """Usage reports and yield acknowledgements; the end of input ends the session."""
        book = self.book
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "usage":
                    book.update_usage(
                        session_id, message.usage.lease_id, message.usage.resident_bytes
                    )
        except (asyncio.CancelledError, grpc.RpcError):
            return  # the stream broke: the Session handler is cancelled and cleans up
        except Exception:
            log.exception("session %s: unexpected error on its stream; ending it", session_id)
        book.close_session(session_id)

    async def Allocate(
        self, request: pb.AllocRequest, context: grpc.aio.ServicerContext
    ) -> pb.AllocReply:
        # The GrantNotice on the session stream lets a client give back a grant whose reply it
        # did not take. A call with a deadline may see its reply arrive after its own deadline
        # fired: it gets the notice. A call without one loses its reply only when it is
        # cancelled, and a cancellation that comes while it waits withdraws or releases its
        # lease here (`abandon`): no notice (docs/ARCHITECTURE.md, "Late grants").
        notify = context.time_remaining() is not None
        try:
            limits.check_alloc(request)
        except limits.OutOfBounds as exc:
            await _abort(context, _out_of_bounds(self.book, exc, "allocate", request))
            raise  # unreachable: abort raises
        try:
            lease = self.book.submit(
                request.session_id,
                request.gpu_count,
                request.memory_bytes,
                request.priority,
                request.label,
                request.request_tag,
                request.required_gpu_indices,
                notify=notify,
                session_key=request.session_key,
            )
        except BookError as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises
        if lease.future.done():
            return alloc_reply(lease.future.result())
        try:
            return alloc_reply(await lease.future)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            reason = "deadline" if remaining is not None and remaining <= 0 else "cancelled"
            self.book.abandon(lease.lease_id, reason)
            raise
        except BookError as exc:
            await _abort(context, exc)
            raise

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseReply:
        try:
            limits.check_release(request)
        except limits.OutOfBounds as exc:
            await _abort(context, _out_of_bounds(self.book, exc, "release", request))
        reason = request.reason or "release"
        if reason not in RELEASE_REASONS:
            known = ", ".join(RELEASE_REASONS)
            await _abort(
                context,
                leases.BadRequest(
                    f"unknown release reason {limits.echo(request.reason)}; known reasons: {known}"
                ),
            )
        try:
            self.book.release(request.session_id, request.lease_id, reason, request.session_key)
        except BookError as exc:
            await _abort(context, exc)
        # Let the Allocate calls this release unblocked answer first: the handoff is the
        # latency that matters, the releaser's acknowledgement can wait one loop turn.
        await asyncio.sleep(0)
        return pb.ReleaseReply()

    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatusReply:
        return limits.fit_status(self._status())

    def _coordinator(self, request: Any) -> gangs.GangCoordinator:
        if self.gangs is None:
            raise self.book.refuse(
                leases.NotController(
                    "this assigner is an executor: gangs are joined at the job's controller "
                    "(ACB_CONTROLLER)"
                ),
                request.session_id,
                request.session_key,
            )
        return self.gangs

    async def JoinGang(
        self, request: pb.GangJoin, context: grpc.aio.ServicerContext
    ) -> pb.GangGrant:
        try:
            limits.check_gang_join(request)
        except limits.OutOfBounds as exc:
            await _abort(context, _out_of_bounds(self.book, exc, "join gang", request))
        try:
            grant = await self._coordinator(request).join(
                request.session_id,
                request.session_key,
                request.gang,
                request.node_count,
                request.gpus_per_node,
                request.node,
                request.priority,
                request.label,
            )
        except BookError as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises
        return gang_grant_message(grant)

    async def LeaveGang(
        self, request: pb.GangLeave, context: grpc.aio.ServicerContext
    ) -> pb.GangLeaveReply:
        try:
            limits.check_gang_leave(request)
        except limits.OutOfBounds as exc:
            await _abort(context, _out_of_bounds(self.book, exc, "leave gang", request))
        try:
            self._coordinator(request).leave(
                request.session_id,
                request.session_key,
                request.lease_id,
                request.exit_status,
                request.reason,
                request.stopping,
            )
        except BookError as exc:
            await _abort(context, exc)
        await asyncio.sleep(0)  # the other members' notices go out first
        return pb.GangLeaveReply()


class ControllerServicer(pb_grpc.ControllerServicer):
    """acb.v1.Controller: keeps the last state each joined executor reported, and adds each
    executor's node to the gang pool (`gangs`) for as long as its stream lives."""

    def __init__(self, coordinator: gangs.GangCoordinator | None = None) -> None:
        self.executors: dict[str, pb.NodeStatus] = {}
        self.ever_joined = False
        self.gangs = coordinator
        self._ids = 0

    async def Join(
        self,
        request_iterator: AsyncIterator[pb.ExecutorMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ControllerMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "join":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message of Join must be `join`"
            )
            return
        node = first.join.node
        # An executor that comes back (its link broke; it dropped its parts) replaces its old
        # stream, which the controller may not have seen end yet: same node, same address.
        # Two assigners under one node name (no --node on one host) are told apart by their
        # address: both report, only the first is in the gang pool, since a gang names nodes.
        coordinator = self.gangs
        pooled = coordinator is not None and (
            node not in coordinator.ports or coordinator.addresses.get(node) == first.join.address
        )
        if coordinator is not None and pooled and node in coordinator.ports:
            coordinator.node_left(node, f"node {node}'s assigner reconnected (its parts dropped)")
        self._ids += 1
        key = f"{self._ids}"
        self.executors[key] = first.join
        self.ever_joined = True
        outbox: asyncio.Queue[pb.ControllerMessage | None] = asyncio.Queue()
        port = gangs.RemotePort(node, lambda command: outbox.put_nowait(_command(command)))

        async def read() -> None:
            try:
                async for message in request_iterator:
                    kind = message.WhichOneof("kind")
                    if kind == "state":
                        self.executors[key] = message.state
                    elif kind == "taken":
                        taken = message.taken
                        part = None
                        if not taken.error:
                            part = gangs.Part(
                                node=node,
                                gpu_indices=tuple(taken.gpu_indices),
                                device_ids=tuple(taken.device_ids),
                                address=gangs.host_of(self.executors[key].address),
                                free_port=taken.free_port,
                            )
                        port.taken(taken.part_id, part, taken.error)
            except (asyncio.CancelledError, grpc.RpcError):
                pass
            finally:
                outbox.put_nowait(None)

        reader = asyncio.ensure_future(read())
        note = f"joined as executor {limits.echo(node)}"
        if coordinator is not None and pooled:
            coordinator.node_joined(node, len(first.join.gpus), port, first.join.address)
        elif coordinator is not None:
            note += "; another assigner has this node name, so gangs cannot use this one"
            log.warning("executor %s: %s", limits.echo(node), note)
        try:
            yield pb.ControllerMessage(note=note)
            while (message := await outbox.get()) is not None:
                yield message
        finally:
            reader.cancel()
            self.executors.pop(key, None)
            port.gone(f"node {node}'s assigner went away")
            if coordinator is not None and coordinator.ports.get(node) is port:
                coordinator.node_left(node, f"node {node}'s assigner went away")


def _command(command: gangs.TakeOrDrop) -> pb.ControllerMessage:
    kind, part_id, text, count, job_id = command
    if kind == "take":
        return pb.ControllerMessage(
            take=pb.TakePart(part_id=part_id, gang=text, gpu_count=count, job_id=job_id)
        )
    return pb.ControllerMessage(drop=pb.DropPart(part_id=part_id, reason=text))


def create_server(
    book: LeaseBook,
    socket_path: str,
    tcp: str | None = None,
    token: str | None = None,
    controller: ControllerServicer | None = None,
    role: Callable[[], pb.StatusReply] | None = None,
    tls: job_tls.Material | None = None,
    insecure_tcp: bool = False,
    coordinator: gangs.GangCoordinator | None = None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int | None]:
    """The daemon's server, bound but not started: (server, health servicer, bound TCP port).

    The TCP listener is TLS with `tls` (clients must show a certificate of the job's CA);
    without it, plaintext only when `insecure_tcp` says so, else AssignerStartError."""
    if tcp and tls is None and not insecure_tcp:
        raise AssignerStartError(
            f"refusing to listen on TCP {tcp} without TLS: give the job's TLS material "
            "(--tls-dir) or ask for plaintext explicitly (--insecure-tcp)"
        )
    interceptors = [TokenInterceptor(token)] if token else []
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    controller = controller or ControllerServicer(coordinator)

    def standalone() -> pb.StatusReply:
        return pb.StatusReply(
            self=node_status_message(book.node_status()),
            role="standalone",
            gangs=[gang_status_message(g) for g in coordinator.status()] if coordinator else [],
        )

    pb_grpc.add_AssignerServicer_to_server(
        AssignerServicer(book, role or standalone, coordinator), server
    )
    pb_grpc.add_ControllerServicer_to_server(controller, server)
    health_servicer = health.aio.HealthServicer()  # the asyncio one: public as `health.aio`
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _check_socket_directory(os.path.dirname(os.path.abspath(socket_path)))
    _clear_socket_path(socket_path)
    try:
        server.add_insecure_port(f"unix:{os.path.abspath(socket_path)}")
    except RuntimeError as exc:
        raise AssignerStartError(f"cannot listen on Unix socket {socket_path}: {exc}") from exc
    # Only this user may connect, even when the directory was there before and is shared.
    with contextlib.suppress(OSError):
        os.chmod(socket_path, 0o600)
    port = None
    if tcp:
        try:
            if tls is not None:
                port = server.add_secure_port(tcp, job_tls.server_credentials(tls))
            else:
                port = server.add_insecure_port(tcp)
        except RuntimeError as exc:
            raise AssignerStartError(
                f"cannot listen on TCP {tcp}: {exc} (is the port in use? use port 0 for any)"
            ) from exc
    return server, health_servicer, port


def _check_socket_directory(directory: str) -> None:
    """Make the socket's directory (0700) if it is missing; refuse one that another user owns or
    that group or others can write: they could replace the socket with their own and receive
    the job's token from the next client."""
    if not os.path.lexists(directory):
        try:
            os.makedirs(directory, mode=0o700)
            os.chmod(directory, 0o700)  # makedirs honours the umask; this directory must not
        except OSError as exc:
            raise AssignerStartError(f"cannot create the socket's directory: {exc}") from None
    try:
        info = os.stat(directory)
    except OSError as exc:
        raise AssignerStartError(f"cannot use the socket's directory: {exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise AssignerStartError(f"the socket's directory {directory} is not a directory")
    problem = unsafe_directory(info)
    if problem:
        raise AssignerStartError(
            f"refusing to put the socket in {directory}: it is {problem}, so another user could "
            "replace the socket and receive the job's token; use a directory of this user that "
            "only it can write (chmod 700), or a path whose directory does not exist yet (it is "
            "then made 0700)"
        )


def unsafe_directory(info: os.stat_result) -> str:
    """What makes a socket's directory unsafe for this user ("" when nothing does)."""
    uid = os.geteuid()
    if info.st_uid != uid:
        return f"owned by uid {info.st_uid}, not by this user (uid {uid})"
    if info.st_mode & 0o022:
        return f"a directory group or others can write (mode {stat.S_IMODE(info.st_mode):04o})"
    return ""


def _clear_socket_path(path: str) -> None:
    """Make room for the socket: remove one left by a dead assigner; refuse if an assigner still
    answers on it, or if something other than a socket is there (it is never deleted)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AssignerStartError(f"cannot use --socket {path}: {exc}") from None
    if not stat.S_ISSOCK(info.st_mode):
        kind = (
            "a regular file"
            if stat.S_ISREG(info.st_mode)
            else "a directory"
            if stat.S_ISDIR(info.st_mode)
            else "a symbolic link"
            if stat.S_ISLNK(info.st_mode)
            else "not a file"
        )
        raise AssignerStartError(
            f"--socket {path} exists and is not a socket ({kind}): refusing to delete it; "
            "remove it or choose another --socket"
        )
    _remove_stale_socket(path)


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead assigner; refuse if one still answers on it."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise AssignerStartError(
        f"another process is already listening on {path}: stop it or choose another --socket"
    )


def tcp_address(tcp: str, port: int) -> str:
    """The reachable `host:port` of a TCP listen address whose port may have been 0."""
    host = tcp.rsplit(":", 1)[0].strip("[]")
    if host in ("", "0.0.0.0", "::", "*"):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def _write_ready_file(path: str, content: dict[str, Any]) -> None:
    """Write the ready file (0600) whole: a reader sees the old one or the new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a process with our pid: never written through
    with create_private(tmp, exclusive=True) as fh:
        json.dump(content, fh)
        fh.write("\n")
    os.replace(tmp, path)


async def serve(
    config: AssignerConfig, started: Callable[[dict[str, Any]], None] | None = None
) -> None:
    """Run one assigner until SIGTERM/SIGINT; return after a clean shutdown."""
    from acb_slurm.assigner.executor import ExecutorLink
    from acb_slurm.scheduler import Scheduler

    scheduler = Scheduler(config.gpus, policy=config.policy)
    try:
        log = EventLog(config.event_log, node=config.node)
    except OSError as exc:
        raise AssignerStartError(f"cannot open --event-log {config.event_log}: {exc}") from None
    address = f"unix:{os.path.abspath(config.socket_path)}"
    book = LeaseBook(
        scheduler,
        node=config.node,
        log=log,
        address=address,
        clock=asyncio.get_running_loop().time,
        time_slice=config.time_slice,
        error_code=status_name,
    )
    # Every assigner but an executor coordinates gangs: over its own node alone until
    # executors join it.
    own_parts = gangs.LocalParts(book)
    coordinator = (
        None if config.controller else gangs.GangCoordinator(book, own_parts, len(config.gpus))
    )
    controller = ControllerServicer(coordinator)
    link: ExecutorLink | None = None

    def role() -> pb.StatusReply:
        reply = pb.StatusReply(self=node_status_message(book.node_status()))
        if link is not None:
            reply.role = "executor"
        elif controller.ever_joined:
            reply.role = "controller"
            reply.executors.extend(controller.executors.values())
        else:
            reply.role = "standalone"
        if coordinator is not None:
            reply.gangs.extend(gang_status_message(g) for g in coordinator.status())
        return reply

    server, health_servicer, port = create_server(
        book,
        config.socket_path,
        config.tcp,
        config.token,
        controller,
        role,
        tls=config.tls,
        insecure_tcp=config.insecure_tcp,
        coordinator=coordinator,
    )
    tcp = tcp_address(config.tcp, port) if config.tcp and port is not None else None
    if tcp:
        book.address = tcp
    stop = asyncio.Event()
    stopped_by: list[str] = []
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        stopped_by.append(signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await server.start()
    log.emit("start", policy=scheduler.policy.name, gpus=describe(config.gpus), pid=os.getpid())
    if config.controller:
        link = ExecutorLink(book, config.controller, config.token, config.tls, own_parts)
        link.start()
    await health_servicer.set(health.OVERALL_HEALTH, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(ASSIGNER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    ready = {
        "pid": os.getpid(),
        "socket": os.path.abspath(config.socket_path),
        "target": address,
        "tcp": tcp,
        "tls": bool(tcp) and config.tls is not None,
        "node": config.node,
        "policy": scheduler.policy.name,
    }
    try:
        if config.ready_file:
            _write_ready_file(config.ready_file, ready)
        if started is not None:
            started(ready)
        await stop.wait()
    except OSError as exc:
        stopped_by.append("error")
        raise AssignerStartError(f"cannot write --ready-file {config.ready_file}: {exc}") from None
    finally:
        await health_servicer.enter_graceful_shutdown()
        if link is not None:
            await link.stop()
        if coordinator is not None:
            coordinator.shutdown()
        own_parts.drop_all("shutdown")
        book.shutdown()
        await server.stop(grace=0.5)
        log.emit("stop", reason=stopped_by[0] if stopped_by else "stopped")
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(config.socket_path)
        if config.ready_file:
            with contextlib.suppress(OSError):
                os.unlink(config.ready_file)
