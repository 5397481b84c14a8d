"""The lease book in its own terms: domain errors, grants and status, no gRPC or protobuf; and the
one table (`server.STATUS_OF`) that turns its refusals into gRPC status codes."""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from acb_slurm._proto.acb.v1 import assigner_pb2 as pb
from acb_slurm.assigner import leases, limits, server
from acb_slurm.assigner.eventlog import EventLog
from acb_slurm.assigner.inventory import virtual_inventory
from acb_slurm.assigner.leases import (
    BadRequest,
    BookError,
    ClientIdentity,
    LeaseBook,
    LeaseGrant,
    LeaseNotGranted,
    NodeStatus,
    NotSessionOwner,
    RequestImpossible,
    ShuttingDown,
    UnknownLease,
    UnknownSession,
    Withdrawn,
    YieldRequested,
)
from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.scheduler import Scheduler


def test_the_lease_book_imports_neither_grpc_nor_protobuf() -> None:
    probe = (
        "import sys, json, acb_slurm.assigner.leases\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'grpc' or m.startswith(("
        "'grpc.', 'grpc_', 'google.protobuf', 'acb_slurm._proto')))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(done.stdout) == []


#: The contract of the daemon's answers: each refusal of the book and the status it gets.
EXPECTED_STATUS = [
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (RequestImpossible, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownSession, grpc.StatusCode.FAILED_PRECONDITION),
    (NotSessionOwner, grpc.StatusCode.PERMISSION_DENIED),
    (UnknownLease, grpc.StatusCode.NOT_FOUND),
    (LeaseNotGranted, grpc.StatusCode.FAILED_PRECONDITION),
    (Withdrawn, grpc.StatusCode.CANCELLED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (leases.GangAborted, grpc.StatusCode.ABORTED),
    (leases.NotController, grpc.StatusCode.FAILED_PRECONDITION),
]


def test_every_refusal_of_the_book_has_its_grpc_status_in_one_table() -> None:
    refusals = {
        kind
        for _, kind in inspect.getmembers(leases, inspect.isclass)
        if issubclass(kind, BookError) and kind is not BookError
    }
    assert refusals == set(server.STATUS_OF) == {kind for kind, _ in EXPECTED_STATUS}
    for kind, code in EXPECTED_STATUS:
        assert server.status_of(kind("x")) is code
        assert server.status_name(kind("x")) == code.name
    assert server.status_of(BookError("unmapped")) is grpc.StatusCode.INTERNAL
    assert len(BadRequest("m" * 1_000_000).message) <= limits.MAX_MESSAGE


def test_the_book_answers_in_domain_terms(tmp_path: Path) -> None:
    """Grants resolve to LeaseGrant, streams get LeaseGrant and YieldRequested, refusals are
    BookError subclasses, status is dataclasses; the event log names the gRPC status."""
    events = tmp_path / "events.jsonl"

    async def scenario() -> tuple[NodeStatus, pb.NodeStatus]:
        log = EventLog(str(events), node="n1")
        book = LeaseBook(
            Scheduler(virtual_inventory(1, 80 << 30)),
            node="n1",
            log=log,
            clock=asyncio.get_running_loop().time,
            error_code=server.status_name,
        )
        identity = ClientIdentity(client_id="c1", job_id="7", worker="w1", pid=42, hostname="h")
        first = book.open_session(identity)
        second = book.open_session(ClientIdentity(client_id="c2", job_id="7", worker="w2"))
        held = book.submit(first.session_id, 1, 0, 0, "train", "tag-1", session_key=first.key)
        grant = await held.future
        assert grant == LeaseGrant(
            lease_id=held.lease_id,
            gpu_indices=(0,),
            device_ids=("0",),
            memory_bytes=80 << 30,
            node="n1",
            waited_seconds=grant.waited_seconds,
            request_tag="tag-1",
        )
        await asyncio.sleep(0)  # the notice follows the reply a loop turn later
        assert first.outbox.get_nowait() == grant

        waiting = book.submit(second.session_id, 1, 0, 0, "infer", session_key=second.key)
        assert book.request_yield(held.lease_id, "time-slice")
        assert first.outbox.get_nowait() == YieldRequested(held.lease_id, "time-slice")
        with pytest.raises(UnknownSession):
            book.release("s-nobody", held.lease_id)
        with pytest.raises(NotSessionOwner):
            book.release(first.session_id, held.lease_id)  # no key
        with pytest.raises(UnknownLease):
            book.release(second.session_id, held.lease_id, session_key=second.key)
        with pytest.raises(LeaseNotGranted):
            book.release(second.session_id, waiting.lease_id, session_key=second.key)
        with pytest.raises(BadRequest, match="gpu_count must be >= 1"):
            book.submit(first.session_id, 0, 0, 0, "", session_key=first.key)
        with pytest.raises(RequestImpossible, match="asks for 2 GPUs"):
            book.submit(first.session_id, 2, 0, 0, "", session_key=first.key)
        with pytest.raises(BadRequest, match="register: worker has"):
            book.open_session(ClientIdentity(worker="w" * (limits.MAX_WORKER + 1)))

        status = book.node_status()
        assert status.gpus[0].lease_ids == (held.lease_id,)
        assert status.leases[0].client == identity
        assert [w.label for w in status.queue] == ["infer"]
        assert status.counters.errors == 7
        message = server.node_status_message(status)

        book.close_session(second.session_id)
        with pytest.raises(Withdrawn, match="session ended"):
            waiting.future.result()
        late = book.open_session(ClientIdentity(worker="w3"))
        queued = book.submit(late.session_id, 1, 0, 0, "", session_key=late.key)
        book.shutdown()
        with pytest.raises(ShuttingDown):
            queued.future.result()
        with pytest.raises(ShuttingDown):
            book.submit(first.session_id, 1, 0, 0, "", session_key=first.key)
        log.close()
        return status, message

    status, message = asyncio.run(scenario())
    assert message.leases[0].client == pb.ClientIdentity(
        client_id="c1", job_id="7", worker="w1", pid=42, hostname="h"
    )
    assert list(message.gpus[0].lease_ids) == list(status.gpus[0].lease_ids)
    assert message.queue[0].label == "infer" and message.counters.errors == 7
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["code"] for e in lines if e["event"] == "error"] == [
        "FAILED_PRECONDITION",
        "PERMISSION_DENIED",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
        "INVALID_ARGUMENT",
    ]


def test_the_health_service_watches_as_well_as_checks(
    start_assigner: Callable[..., AssignerProcess],
) -> None:
    assigner = start_assigner(gpus=1)
    with grpc.insecure_channel(assigner.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", server.ASSIGNER_SERVICE):
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
