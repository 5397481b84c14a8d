"""The bounds of `acb_slurm.assigner.limits`: field checks, bounded echoes, Status kept under its
byte budget whatever it lists."""

from __future__ import annotations

import pytest

from acb_slurm._proto.acb.v1 import assigner_pb2 as pb
from acb_slurm.assigner import limits


def identity(n: int) -> pb.ClientIdentity:
    return pb.ClientIdentity(
        client_id="c" * limits.MAX_CLIENT_ID,
        job_id="j" * limits.MAX_JOB_ID,
        worker=f"{n:05d}".ljust(limits.MAX_WORKER, "w"),
        hostname="h" * limits.MAX_HOSTNAME,
        pid=n,
    )


def crowded_node(leases: int, waiters: int, gpus: int = 8) -> pb.NodeStatus:
    node = pb.NodeStatus(node="n1", address="unix:/x", policy="gpu-sharing")
    for index in range(gpus):
        gpu = node.gpus.add(index=index, device_id=str(index), memory_bytes=80 << 30)
        gpu.lease_ids.extend(f"l-{n:032x}" for n in range(leases))
    for n in range(leases):
        node.leases.add(
            lease_id=f"l-{n:032x}",
            client=identity(n),
            gpu_indices=range(gpus),
            label="l" * limits.MAX_LABEL,
        )
    for n in range(waiters):
        node.queue.add(client=identity(n), gpu_count=1, label="q" * limits.MAX_LABEL)
    return node


def test_fields_over_their_bound_are_named() -> None:
    limits.check_alloc(pb.AllocRequest(label="x" * limits.MAX_LABEL))
    with pytest.raises(limits.OutOfBounds, match="label has 257 bytes; at most 256"):
        limits.check_alloc(pb.AllocRequest(label="x" * (limits.MAX_LABEL + 1)))
    with pytest.raises(limits.OutOfBounds, match="label has 258 bytes"):  # bytes, not characters
        limits.check_alloc(pb.AllocRequest(label="é" * 129))
    with pytest.raises(limits.OutOfBounds, match="required_gpu_indices has 257 entries"):
        limits.check_alloc(pb.AllocRequest(required_gpu_indices=[0] * 257))
    with pytest.raises(limits.OutOfBounds, match="worker has"):
        limits.check_identity(pb.ClientIdentity(worker="w" * (limits.MAX_WORKER + 1)))
    with pytest.raises(limits.OutOfBounds, match="reason has"):
        limits.check_release(pb.ReleaseRequest(reason="r" * 33))


def test_echoes_and_messages_are_bounded() -> None:
    assert limits.echo("abc") == "'abc'"
    long = limits.echo("x" * 1_000_000)
    assert len(long) < 2 * limits.MAX_ECHO and "1000000 characters" in long
    assert "(100000 entries)" in limits.echo(list(range(100_000)))
    assert len(limits.clip("m" * 1_000_000)) <= limits.MAX_MESSAGE


def test_a_crowded_node_status_is_trimmed_under_its_budget() -> None:
    node = crowded_node(leases=3000, waiters=5000)
    assert node.ByteSize() > 4 * 1024 * 1024
    total_leases, total_waiters = len(node.leases), len(node.queue)
    limits.fit_node_status(node)
    assert node.ByteSize() <= limits.STATUS_MAX_BYTES
    assert len(node.queue) + node.queue_omitted == total_waiters
    assert len(node.leases) + node.leases_omitted == total_leases
    assert node.queue_omitted == total_waiters  # waiters go first, then the newest leases
    assert node.leases[0].lease_id == f"l-{0:032x}"  # the oldest stay
    for gpu in node.gpus:
        assert len(gpu.lease_ids) + gpu.lease_ids_omitted == total_leases


def test_a_small_status_is_left_whole() -> None:
    node = crowded_node(leases=3, waiters=4)
    before = node.SerializeToString()
    limits.fit_node_status(node)
    assert node.SerializeToString() == before


def test_a_controller_status_with_many_crowded_executors_fits() -> None:
    reply = pb.StatusReply(self=crowded_node(100, 100), role="controller")
    for _ in range(40):
        reply.executors.append(crowded_node(100, 300))
    assert reply.ByteSize() > 12 * 1024 * 1024
    limits.fit_status(reply)
    assert reply.ByteSize() <= limits.STATUS_MAX_BYTES
    assert len(reply.executors) + reply.executors_omitted == 40
    assert reply.self.gpus  # the inventory stays
