"""The bounds on everything a client sends the assigner, and on what the assigner says back.

Every string and list a client puts in a message has a bound here; the assigner checks them
before anything else and refuses a longer one with INVALID_ARGUMENT naming the field. Error
messages quote a client's value by a bounded prefix (`echo`) and are themselves cut at
`MAX_MESSAGE` characters, so no answer and no event-log line grows with what a client sent. A
Status reply is kept under `STATUS_MAX_BYTES` whatever the clients sent (`fit_node_status`,
`fit_status`), below gRPC's default 4 MiB message limit, so a default client can always read it.
docs/ARCHITECTURE.md lists these bounds; change them here and there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the lease book checks identities too, and imports no protobuf
    from acb_slurm._proto.acb.v1 import assigner_pb2 as pb

#: Session ids, session keys and lease ids (the assigner's own are 34 and 43 characters).
MAX_ID = 64
#: `ClientIdentity` (the Session stream's `register`), UTF-8 bytes.
MAX_CLIENT_ID = 128
MAX_JOB_ID = 64
MAX_WORKER = 1024
MAX_HOSTNAME = 255
#: `AllocRequest.label` and `.request_tag`, UTF-8 bytes.
MAX_LABEL = 256
MAX_REQUEST_TAG = 64
#: `ReleaseRequest.reason` (it must be one of a few known words anyway).
MAX_REASON = 32
#: Entries of `AllocRequest.required_gpu_indices` (a pin names GPUs of one node).
MAX_REQUIRED_GPUS = 256
#: Characters of a client's value an error message or log line may quote.
MAX_ECHO = 64
#: Characters of any error message the assigner answers or logs.
MAX_MESSAGE = 1024
#: Bytes of a Status reply (and of an executor's report to its controller): below gRPC's
#: default 4 MiB limit on a received message, with room to spare.
STATUS_MAX_BYTES = 3 * 1024 * 1024

#: Field → bound, for the text fields of each message a client sends.
IDENTITY_FIELDS = {
    "client_id": MAX_CLIENT_ID,
    "job_id": MAX_JOB_ID,
    "worker": MAX_WORKER,
    "hostname": MAX_HOSTNAME,
}
ALLOC_FIELDS = {
    "session_id": MAX_ID,
    "session_key": MAX_ID,
    "label": MAX_LABEL,
    "request_tag": MAX_REQUEST_TAG,
}
RELEASE_FIELDS = {"session_id": MAX_ID, "session_key": MAX_ID, "lease_id": MAX_ID}
#: `GangJoin` and `GangLeave` (a gang's name is at most a worker's name long).
GANG_JOIN_FIELDS = {
    "session_id": MAX_ID,
    "session_key": MAX_ID,
    "gang": MAX_WORKER,
    "node": MAX_HOSTNAME,
    "label": MAX_LABEL,
}
GANG_LEAVE_FIELDS = {
    "session_id": MAX_ID,
    "session_key": MAX_ID,
    "lease_id": MAX_ID,
    "reason": MAX_MESSAGE,
}
#: Members of one gang (nodes of one multi-node job).
MAX_GANG_NODES = 4096


class OutOfBounds(ValueError):
    """A client's field is longer than its bound; the message names the field and the bound."""


def _utf8_length(value: str, bound: int) -> int:
    if len(value) * 4 <= bound:  # cheap: no UTF-8 character is longer than 4 bytes
        return len(value)
    return len(value.encode("utf-8", "surrogatepass"))


def check_text(field: str, value: str, bound: int) -> None:
    """OutOfBounds unless `value` takes at most `bound` bytes in UTF-8."""
    size = _utf8_length(value, bound)
    if size > bound:
        raise OutOfBounds(f"{field} has {size} bytes; at most {bound} are allowed")


def check_fields(message: Any, bounds: dict[str, int], prefix: str = "") -> None:
    """Check each bounded text field of a protobuf message."""
    for field, bound in bounds.items():
        check_text(prefix + field, getattr(message, field), bound)


class Identity(Protocol):
    """A client's identity as the wire (`pb.ClientIdentity`) or the lease book carries it."""

    @property
    def client_id(self) -> str: ...
    @property
    def job_id(self) -> str: ...
    @property
    def worker(self) -> str: ...
    @property
    def hostname(self) -> str: ...


def check_identity(identity: Identity) -> None:
    check_fields(identity, IDENTITY_FIELDS)


def check_alloc(request: pb.AllocRequest) -> None:
    check_fields(request, ALLOC_FIELDS)
    count = len(request.required_gpu_indices)
    if count > MAX_REQUIRED_GPUS:
        raise OutOfBounds(
            f"required_gpu_indices has {count} entries; at most {MAX_REQUIRED_GPUS} are allowed"
        )


def check_release(request: pb.ReleaseRequest) -> None:
    check_fields(request, RELEASE_FIELDS)
    check_text("reason", request.reason, MAX_REASON)


def check_gang_join(request: pb.GangJoin) -> None:
    check_fields(request, GANG_JOIN_FIELDS)
    if request.node_count > MAX_GANG_NODES:
        raise OutOfBounds(f"node_count is {request.node_count}; at most {MAX_GANG_NODES}")


def check_gang_leave(request: pb.GangLeave) -> None:
    check_fields(request, GANG_LEAVE_FIELDS)


def echo(value: object, limit: int = MAX_ECHO) -> str:
    """`repr` of a client's value, cut to a bounded prefix that says how much was left out."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, Sequence) and len(value) > 16:
        shown = ", ".join(repr(v) for v in list(value[:16]))
        return f"[{shown}, ...] ({len(value)} entries)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    """An error message cut to `limit` characters, saying how much was cut."""
    if len(message) <= limit:
        return message
    return f"{message[: limit - 40]}... ({len(message) - limit + 40} more characters)"


# ---- Status under its bound -------------------------------------------------------------------


def _varint_size(value: int) -> int:
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def _entry_size(payload: int) -> int:
    """Bytes a length-delimited field (tag < 16) of `payload` bytes takes on the wire."""
    return 1 + _varint_size(payload) + payload


#: Room for the `*_omitted` counts a trim adds (each at most 6 bytes) and rounding.
_SLACK = 64


def _drop_tail(entries: Any, excess: int, size_of: Any) -> tuple[int, int]:
    """Remove entries from the end of a repeated field until `excess` bytes are gone (or none
    is left); returns (how many were removed, the excess still left)."""
    dropped = 0
    while excess > 0 and dropped < len(entries):
        dropped += 1
        excess -= size_of(entries[len(entries) - dropped])
    if dropped:
        del entries[len(entries) - dropped :]
    return dropped, excess


def fit_node_status(node: pb.NodeStatus, budget: int = STATUS_MAX_BYTES) -> pb.NodeStatus:
    """Trim `node` in place until it takes at most `budget` bytes: the last waiters in service
    order first, then the newest leases, then lease ids listed per GPU; each list's `*_omitted`
    count grows by what was left out. Returns `node`."""
    size = node.ByteSize()
    if size <= budget:
        return node
    excess = size + _SLACK - budget

    def message_size(entry: Any) -> int:
        return _entry_size(entry.ByteSize())

    def text_size(entry: str) -> int:
        return _entry_size(len(entry.encode("utf-8")))

    dropped, excess = _drop_tail(node.queue, excess, message_size)
    node.queue_omitted += dropped
    dropped, excess = _drop_tail(node.leases, excess, message_size)
    node.leases_omitted += dropped
    for gpu in node.gpus:
        if excess <= 0:
            break
        before = gpu.ByteSize()
        dropped, _ = _drop_tail(gpu.lease_ids, excess, text_size)
        gpu.lease_ids_omitted += dropped
        excess -= before - gpu.ByteSize()
    return node


def fit_status(reply: pb.StatusReply, budget: int = STATUS_MAX_BYTES) -> pb.StatusReply:
    """Trim a Status reply in place to at most `budget` bytes: each node (this one and every
    executor) gets an equal share; executors that still do not fit are left out from the last
    (`executors_omitted`). Returns `reply`."""
    if reply.ByteSize() <= budget:
        return reply
    share = (budget - _SLACK) // (1 + len(reply.executors))
    fit_node_status(reply.self, share)
    for executor in reply.executors:
        fit_node_status(executor, share)
    excess = reply.ByteSize() + _SLACK - budget
    dropped, _ = _drop_tail(reply.executors, excess, lambda e: _entry_size(e.ByteSize()))
    reply.executors_omitted += dropped
    if reply.ByteSize() > budget:  # only an inventory too large to list is left
        fit_node_status(reply.self, budget - _SLACK)
    while reply.gangs and reply.ByteSize() > budget:  # the newest gangs, last of all
        del reply.gangs[-1]
    return reply
