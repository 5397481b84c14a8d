"""acb-assigner as a real process: exclusion under contention, leases that die with their holder,
errors that leave the daemon serving, policies over gRPC, controller/executor, clean shutdown."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from acb_slurm import env, tls
from acb_slurm._proto.acb.v1 import assigner_pb2 as pb
from acb_slurm._proto.acb.v1 import assigner_pb2_grpc as pb_grpc
from acb_slurm.assigner.testing import AssignerProcess, assigner_command, wait_for
from acb_slurm.assigner.testing import events_of as of
from acb_slurm.client import Client, GrantImpossible, InvalidGpuRequest, Unauthenticated
from acb_slurm.scheduler.replay import replay
from acb_slurm.units import parse_size

StartAssigner = Callable[..., AssignerProcess]

CONTENDING_WORKER = """
import sys, time
from acb_slurm.client import on_device
rounds, hold = int(sys.argv[1]), float(sys.argv[2])
for _ in range(rounds):
    with on_device(label="contend"):
        time.sleep(hold)
    time.sleep(0.005)
"""

HOLDER = """
import time
from acb_slurm.client import on_device_begin
lease = on_device_begin(label="holder")
print(lease.lease_id, flush=True)
time.sleep(600)
"""

WAITER = """
import time
from acb_slurm.client import on_device_begin
lease = on_device_begin(label="waiter")
print(time.time(), lease.lease_id, flush=True)
"""


def spawn(code: str, assigner: AssignerProcess, *args: str, worker: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=assigner.client_env(ACB_WORKER=worker),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_six_workers_contending_for_two_gpus_never_share_one(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=2, policy="simple")
    rounds = 4
    workers = [
        spawn(CONTENDING_WORKER, assigner, str(rounds), "0.03", worker=f"w{i}") for i in range(6)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
    events = assigner.events()
    holder: dict[int, str] = {}
    most_held_at_once = 0
    for event in events:
        if event["event"] == "grant":
            for gpu in event["gpus"]:
                assert gpu not in holder, f"GPU {gpu} granted to {event['lease']} while {holder}"
                holder[gpu] = event["lease"]
        elif event["event"] == "release":
            for gpu in event["gpus"]:
                assert holder.pop(gpu) == event["lease"]
        most_held_at_once = max(most_held_at_once, len(holder))
    requested = {e["lease"] for e in of(events, "request")}
    granted = {e["lease"] for e in of(events, "grant")}
    released = {e["lease"] for e in of(events, "release", reason="release")}
    assert len(requested) == 6 * rounds
    assert requested == granted == released
    assert not of(events, "withdraw")
    assert most_held_at_once == 2, "two GPUs and six workers: both GPUs should have been busy"
    assert {e["worker"] for e in of(events, "grant")} == {f"w{i}" for i in range(6)}
    replay(events)  # the log replays into the scheduler core, grant for grant


def test_sigkilled_holder_loses_its_gpu_to_the_waiter_within_a_second(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1)
    holder = spawn(HOLDER, assigner, worker="holder")
    assert holder.stdout is not None
    holder_lease = holder.stdout.readline().strip()
    assert holder_lease, holder.stderr.read() if holder.stderr else ""
    waiter = spawn(WAITER, assigner, worker="waiter")
    wait_for(lambda: of(assigner.events(), "request", worker="waiter"), what="the waiter's request")
    killed_at = time.time()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    granted_at = float(out.split()[0])
    events = assigner.events()
    (release,) = of(events, "release", lease=holder_lease)
    assert release["reason"] == "disconnect"
    (disconnect,) = of(events, "disconnect", worker="holder")
    assert disconnect["leases"] == [holder_lease]
    (grant,) = of(events, "grant", worker="waiter")
    assert release["ts"] - killed_at < 1.0
    assert granted_at - killed_at < 1.0, f"waiter served {granted_at - killed_at:.3f}s after kill"
    assert grant["ts"] >= release["ts"]
    replay(events)


def test_unknown_policy_is_refused_with_the_known_ones(tmp_path: Any) -> None:
    result = subprocess.run(
        [
            *assigner_command(),
            "--socket",
            str(tmp_path / "s" / "a.sock"),
            "--virtual-gpus",
            "1",
            "--gpu-memory",
            "1GiB",
            "--policy",
            "fair-share",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown policy 'fair-share'" in result.stderr
    assert "gpu-affinity, gpu-sharing, simple" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_gpus_and_no_virtual_ones_is_a_clear_error(tmp_path: Any) -> None:
    result = subprocess.run(
        [*assigner_command(), "--socket", str(tmp_path / "a.sock")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 1
    assert "--virtual-gpus N --gpu-memory" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_requests_get_clear_errors_and_the_daemon_keeps_serving(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=2, policy="simple")
    with Client(target=assigner.target, token="") as client:
        with pytest.raises(InvalidGpuRequest, match="gpu_count must be >= 1"):
            client.allocate(gpus=0)
        with pytest.raises(GrantImpossible, match="asks for 3 GPUs, this node has 2"):
            client.allocate(gpus=3)
        with pytest.raises(GrantImpossible, match=r"asks for 1\.0TiB per GPU"):
            client.allocate(memory=parse_size("1TiB"))
        lease = client.allocate()
        client.release(lease)
        stub = pb_grpc.AssignerStub(grpc.insecure_channel(assigner.target))
        with pytest.raises(grpc.RpcError) as unknown_session:
            stub.Allocate(pb.AllocRequest(session_id="nobody", gpu_count=1), timeout=10)
        assert unknown_session.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "unknown session" in (unknown_session.value.details() or "")
        refusal = (env.REFUSAL_METADATA_KEY, "UnknownSession")
        assert refusal in (unknown_session.value.trailing_metadata() or ())
        with pytest.raises(grpc.RpcError) as unknown_lease:
            stub.Release(
                pb.ReleaseRequest(
                    session_id=client.session_id,
                    session_key=client._session_key,
                    lease_id=lease.lease_id,
                ),
                timeout=10,
            )
        assert unknown_lease.value.code() == grpc.StatusCode.NOT_FOUND
        lease = client.allocate(timeout=10)
        assert lease.gpu_indices == (0,)
        status = client.status()
    assert status.self.counters.errors == 5
    assert status.self.counters.grants == 2
    errors = of(assigner.events(), "error")
    assert [e["code"] for e in errors] == [
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
        "FAILED_PRECONDITION",
        "FAILED_PRECONDITION",
        "NOT_FOUND",
    ]


@pytest.mark.parametrize("policy", ["simple", "gpu-affinity"])
def test_pinned_requests_that_cannot_be_granted_get_clear_errors(
    start_assigner: StartAssigner, policy: str
) -> None:
    assigner = start_assigner(gpus=2, policy=policy)
    with Client(target=assigner.target, token="") as client:
        with pytest.raises(InvalidGpuRequest, match=r"gpu_count is 1 but required_gpus names 2"):
            client.allocate(gpus=1, required_gpus=[0, 1])
        with pytest.raises(InvalidGpuRequest, match=r"required_gpus \[1, 1\] names a GPU more"):
            client.allocate(gpus=2, required_gpus=[1, 1])
        with pytest.raises(GrantImpossible, match=r"requires GPU\(s\) \[2\], this node has GPUs"):
            client.allocate(required_gpus=[2])
        with pytest.raises(GrantImpossible, match=r"requires GPU 1 with 1\.0TiB"):
            client.allocate(memory=parse_size("1TiB"), required_gpus=[1])
        if policy == "simple":
            with pytest.raises(GrantImpossible, match="policy simple grants one GPU per request"):
                client.allocate(gpus=2, required_gpus=[0, 1])
            lease = client.allocate(required_gpus=[1], timeout=10)
            assert lease.gpu_indices == (1,)
        else:
            lease = client.allocate(gpus=2, required_gpus=[1, 0], timeout=10)
            assert lease.gpu_indices == (0, 1)
        client.release(lease)
    errors = of(assigner.events(), "error")
    assert [e["code"] for e in errors] == ["INVALID_ARGUMENT"] * 2 + ["FAILED_PRECONDITION"] * (
        3 if policy == "simple" else 2
    )
    replay(assigner.events())


def test_calls_without_the_job_token_are_refused(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=1, token="s3cret-token")
    for token in ("", "wrong-token"):
        client = Client(target=assigner.target, token=token)
        with pytest.raises(Unauthenticated, match="x-acb-token"):
            client.allocate(timeout=10)
        client.close()
    stub = pb_grpc.AssignerStub(grpc.insecure_channel(assigner.target))
    with pytest.raises(grpc.RpcError) as refused:
        stub.Status(pb.StatusRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(target=assigner.target, token="s3cret-token") as client:
        lease = client.allocate(timeout=10)
        assert lease.device_ids == ("0",)
        client.release(lease)


def test_gpu_sharing_puts_two_small_requests_on_one_gpu(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=1, gpu_memory="80GiB", policy="gpu-sharing")
    ten = parse_size("10GiB")
    with (
        Client(target=assigner.target, token="") as a,
        Client(target=assigner.target, token="") as b,
        Client(target=assigner.target, token="") as c,
    ):
        first = a.allocate(memory=ten, timeout=10)
        second = b.allocate(memory=ten, timeout=10)
        assert first.gpu_indices == second.gpu_indices == (0,)
        assert first.memory_bytes == second.memory_bytes == ten
        gpu = a.status().self.gpus[0]
        assert sorted(gpu.lease_ids) == sorted([first.lease_id, second.lease_id])
        assert gpu.promised_bytes == 2 * ten
        with pytest.raises(TimeoutError):
            c.allocate(memory=0, timeout=0.5)  # the whole GPU: must wait for both
        a.release(first)
        b.release(second)
        whole = c.allocate(memory=0, timeout=10)
        assert whole.memory_bytes == parse_size("80GiB")
    replay(assigner.events())


def test_gpu_affinity_grants_two_gpus_and_gives_a_client_its_last_gpus_back(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=3, policy="gpu-affinity")
    with (
        Client(target=assigner.target, token="") as a,
        Client(target=assigner.target, token="") as b,
    ):
        pair = a.allocate(gpus=2, timeout=10)
        assert len(pair.gpu_indices) == 2 and len(pair.device_ids) == 2
        single = b.allocate(gpus=1, timeout=10)
        assert set(single.gpu_indices).isdisjoint(pair.gpu_indices)
        a.release(pair)
        b.release(single)
        # b asks first; lowest-index-first would hand it GPU 0, affinity gives its own GPU back.
        again = b.allocate(gpus=1, timeout=10)
        assert again.gpu_indices == single.gpu_indices
        pair_again = a.allocate(gpus=2, timeout=10)
        assert pair_again.gpu_indices == pair.gpu_indices
    replay(assigner.events())


def test_executor_joins_the_controller_and_reports_its_state(
    start_assigner: StartAssigner, tmp_path: Path
) -> None:
    material = tls.init(tmp_path / "tls")  # the job's TLS material: the link is mutual TLS
    controller = start_assigner(
        gpus=1, tcp="127.0.0.1:0", token="job-token", tls_dir=material.directory
    )
    assert controller.tcp and controller.ready["tls"]
    executor = start_assigner(
        gpus=2,
        tcp="127.0.0.1:0",
        token="job-token",
        controller=controller.tcp,
        tls_dir=material.directory,
    )
    with (
        Client(target=controller.target, token="job-token") as on_controller,
        Client(target=executor.target, token="job-token") as on_executor,
    ):
        status = wait_for(
            lambda: (s := on_controller.status()).executors and s, what="the executor to join"
        )
        assert status.role == "controller"
        (joined,) = status.executors
        assert joined.address == executor.tcp
        assert len(joined.gpus) == 2
        assert on_executor.status().role == "executor"
        lease = on_executor.allocate(timeout=10)  # a local grant on the executor's node
        assert lease.gpu_indices == (0,)
        wait_for(
            lambda: [
                x for x in on_controller.status().executors if x.counters.grants == 1 and x.leases
            ],
            what="the executor's new state at the controller",
        )
        on_executor.release(lease)
    executor.terminate()
    wait_for(
        lambda: not Client(target=controller.target, token="job-token").status().executors,
        what="the controller to drop the stopped executor",
    )


def test_sigterm_releases_everything_and_exits_zero(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=1)
    holder = spawn(HOLDER, assigner, worker="holder")
    assert holder.stdout is not None
    lease = holder.stdout.readline().strip()
    waiter = spawn(WAITER, assigner, worker="waiter")
    wait_for(lambda: of(assigner.events(), "request", worker="waiter"), what="waiter's request")
    assert assigner.terminate() == 0
    _, err = waiter.communicate(timeout=30)
    assert waiter.returncode != 0
    assert "shutting down" in err
    holder.kill()
    holder.wait()
    events = assigner.events()
    (release,) = of(events, "release", lease=lease)
    assert release["reason"] == "shutdown"
    assert of(events, "withdraw", worker="waiter", reason="shutdown")
    assert events[-1]["event"] == "stop"
    assert events[-1]["reason"] == "SIGTERM"
    assert not os.path.exists(assigner.socket)
    replay(events)


def test_session_stream_registers_first_and_carries_grant_notices(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1)
    channel = grpc.insecure_channel(assigner.target)
    stub = pb_grpc.AssignerStub(channel)
    # Our half of the stream stays open while the generator blocks; ending it ends the session.
    pending: queue.SimpleQueue[pb.ClientMessage | None] = queue.SimpleQueue()
    pending.put(pb.ClientMessage(register=pb.ClientIdentity(client_id="raw", worker="raw-1")))

    def messages() -> Any:
        while (message := pending.get()) is not None:
            yield message

    stream = stub.Session(messages(), timeout=30)
    first = next(stream)
    assert first.WhichOneof("kind") == "registered"
    assert first.registered.policy == "simple"
    session_id, key = first.registered.session_id, first.registered.session_key
    reply = stub.Allocate(
        pb.AllocRequest(session_id=session_id, session_key=key, gpu_count=1, request_tag="t1"),
        timeout=10,
    )
    assert reply.request_tag == "t1"
    notice = next(stream)
    assert notice.WhichOneof("kind") == "grant"
    assert notice.grant.lease.lease_id == reply.lease_id
    assert notice.grant.lease.request_tag == "t1"
    with pytest.raises(grpc.RpcError) as unknown_reason:
        stub.Release(
            pb.ReleaseRequest(
                session_id=session_id, session_key=key, lease_id=reply.lease_id, reason="bored"
            ),
            timeout=10,
        )
    assert unknown_reason.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "known reasons: release, deadline, cancelled" in (unknown_reason.value.details() or "")
    # A caller that gave up gives back a late grant; giving back one already gone is no error.
    for _ in range(2):
        stub.Release(
            pb.ReleaseRequest(
                session_id=session_id, session_key=key, lease_id=reply.lease_id, reason="deadline"
            ),
            timeout=10,
        )
    assert of(assigner.events(), "release", lease=reply.lease_id, reason="deadline")
    # A call without a deadline gets no notice (its reply is lost only if it is cancelled, and
    # then the assigner takes the lease back itself); the next call with a deadline gets one.
    untimed = stub.Allocate(
        pb.AllocRequest(session_id=session_id, session_key=key, gpu_count=1, request_tag="t2")
    )
    stub.Release(
        pb.ReleaseRequest(session_id=session_id, session_key=key, lease_id=untimed.lease_id)
    )
    reply = stub.Allocate(
        pb.AllocRequest(session_id=session_id, session_key=key, gpu_count=1), timeout=10
    )
    assert next(stream).grant.lease.lease_id == reply.lease_id
    pending.put(None)  # end our side: the session ends and its lease is released
    wait_for(
        lambda: of(assigner.events(), "release", lease=reply.lease_id, reason="disconnect"),
        what="the release of the closed session's lease",
    )
    bad = stub.Session(iter([pb.ClientMessage(usage=pb.UsageReport(lease_id="x"))]), timeout=10)
    with pytest.raises(grpc.RpcError) as refused:
        next(bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be `register`" in (refused.value.details() or "")
    channel.close()


def test_socket_is_private_and_a_stale_one_is_replaced_but_a_live_one_is_not(
    start_assigner: StartAssigner, tmp_path: Any
) -> None:
    import stat

    first = start_assigner(gpus=1)
    assert stat.S_IMODE(os.stat(os.path.dirname(first.socket)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(first.socket).st_mode) == 0o600
    second = subprocess.run(
        [
            *assigner_command(),
            "--socket",
            first.socket,
            "--virtual-gpus",
            "1",
            "--gpu-memory",
            "1GiB",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert "already listening" in second.stderr
    first.kill()  # SIGKILL leaves the socket file behind
    assert os.path.exists(first.socket)
    first.start()  # a stale socket is replaced
    with Client(target=first.target, token="") as client:
        client.release(client.allocate(timeout=10))
