"""The assigner against other users and misbehaving clients of its own job: a private socket and
token, identities bound to the stream that made them, bounded inputs and answers, fast detection
of a silent peer."""

from __future__ import annotations

import os
import queue
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from acb_slurm._proto.acb.v1 import assigner_pb2 as pb
from acb_slurm._proto.acb.v1 import assigner_pb2_grpc as pb_grpc
from acb_slurm.assigner.testing import AssignerProcess, assigner_command, wait_for
from acb_slurm.assigner.testing import events_of as of
from acb_slurm.client import Client
from acb_slurm.scheduler.replay import replay

from .test_daemon import HOLDER, WAITER

StartAssigner = Callable[..., AssignerProcess]

#: gRPC's default limit on a received message: a default `status()` fails beyond it.
GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024


def run_assigner(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*assigner_command(), "--virtual-gpus", "1", "--gpu-memory", "1GiB", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---- 1. a private socket, token and files ------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o720])
def test_a_socket_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    result = run_assigner("--socket", str(shared / "a.sock"))
    assert result.returncode == 1, result.stderr
    assert "group or others can write" in result.stderr
    assert f"{stat.S_IMODE(mode):04o}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (shared / "a.sock").exists()
    assert stat.S_IMODE(shared.stat().st_mode) == mode  # left as it was


def test_a_socket_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    result = run_assigner("--socket", str(theirs / "a.sock"))
    assert result.returncode == 1, result.stderr
    assert "owned by uid 65534" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (theirs / "a.sock").exists()


def test_a_regular_file_at_the_socket_path_is_refused_and_kept(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    precious = directory / "a.sock"
    precious.write_text("not a socket\n")
    result = run_assigner("--socket", str(precious))
    assert result.returncode == 1, result.stderr
    assert "is not a socket" in result.stderr
    assert "Traceback" not in result.stderr
    assert precious.read_text() == "not a socket\n"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_token_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(mode)
    result = run_assigner("--socket", str(tmp_path / "run" / "a.sock"), "--token-file", str(token))
    assert result.returncode == 2, result.stderr
    assert "group or others can read" in result.stderr
    assert "chmod 600" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_non_ascii_token_is_refused_at_start(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3crét\n", encoding="utf-8")
    token.chmod(0o600)
    result = run_assigner("--socket", str(tmp_path / "run" / "a.sock"), "--token-file", str(token))
    assert result.returncode == 2, result.stderr
    assert "printable ASCII" in result.stderr
    assert "s3cr" not in result.stderr  # the token is a secret: never printed
    assert "Traceback" not in result.stderr


def test_the_event_log_and_ready_file_are_private(start_assigner: StartAssigner) -> None:
    old = os.umask(0o022)  # the usual umask: files would come out 0644
    try:
        assigner = start_assigner(gpus=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(assigner.event_log.stat().st_mode) == 0o600
    assert stat.S_IMODE(assigner.ready_file.stat().st_mode) == 0o600


def test_an_existing_event_log_is_made_private(
    start_assigner: StartAssigner, tmp_path: Path
) -> None:
    log = tmp_path / "assigner0.events.jsonl"
    log.write_text("")
    log.chmod(0o644)
    assigner = start_assigner(gpus=1)
    assert assigner.event_log == log
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


# ---- 2. identities bound to the stream that made them ------------------------------------------


class RawSession:
    """A Session stream opened by hand, as any process holding the job's token can."""

    def __init__(self, assigner: AssignerProcess, worker: str = "raw", **identity: Any) -> None:
        self.channel = grpc.insecure_channel(assigner.target)
        self.stub = pb_grpc.AssignerStub(self.channel)
        self.metadata = assigner.metadata()
        self._pending: queue.SimpleQueue[pb.ClientMessage | None] = queue.SimpleQueue()
        fields = {"client_id": f"raw-{worker[:20]}", "worker": worker, **identity}
        self._pending.put(pb.ClientMessage(register=pb.ClientIdentity(**fields)))
        self.stream = self.stub.Session(self._messages(), metadata=self.metadata, timeout=300)
        self.registered = next(self.stream).registered

    def _messages(self) -> Iterator[pb.ClientMessage]:
        while (message := self._pending.get()) is not None:
            yield message

    @property
    def session_id(self) -> str:
        return self.registered.session_id

    def _sign(self, request: Any) -> Any:
        """Carry this stream's own session key, where the wire has one."""
        if "session_key" in type(request).DESCRIPTOR.fields_by_name:
            request.session_key = self.registered.session_key
        return request

    def allocate_request(self, session_id: str | None = None, **fields: Any) -> pb.AllocRequest:
        fields.setdefault("gpu_count", 1)
        return self._sign(pb.AllocRequest(session_id=session_id or self.session_id, **fields))

    def release_request(self, lease_id: str, session_id: str | None = None) -> pb.ReleaseRequest:
        return self._sign(
            pb.ReleaseRequest(session_id=session_id or self.session_id, lease_id=lease_id)
        )

    def allocate(self, session_id: str | None = None, **fields: Any) -> pb.AllocReply:
        request = self.allocate_request(session_id, **fields)
        return self.stub.Allocate(request, metadata=self.metadata, timeout=30)

    def release(self, lease_id: str, session_id: str | None = None) -> pb.ReleaseReply:
        request = self.release_request(lease_id, session_id)
        return self.stub.Release(request, metadata=self.metadata, timeout=30)

    def close(self) -> None:
        self._pending.put(None)
        self.channel.close()


def test_session_and_lease_ids_carry_128_random_bits(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=2, token="tok")
    sessions, leases = [], []
    for _ in range(3):
        with Client(target=assigner.target, token="tok") as client:
            sessions.append(client.session_id)
            leases += [client.allocate(timeout=10).lease_id, client.allocate(timeout=10).lease_id]
    for prefix, ids in (("s", sessions), ("l", leases)):
        assert len(set(ids)) == len(ids)
        for identity in ids:
            assert re.fullmatch(prefix + r"-[0-9a-f]{32}", identity), identity
        # Random from their first character (a counter or a boot id would repeat here).
        assert len({identity[2:10] for identity in ids}) == len(ids)


def test_a_client_cannot_release_another_client_s_lease_even_knowing_its_ids(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=2, token="tok")
    a = Client(target=assigner.target, token="tok", worker="a")
    b = RawSession(assigner, worker="b")
    try:
        lease = a.allocate(timeout=10)
        # B read both ids (the event log, a status): neither naming its own session nor A's
        # lets it release A's lease.
        for session_id in (b.session_id, a.session_id):
            with pytest.raises(grpc.RpcError) as refused:
                b.release(lease.lease_id, session_id=session_id)
            assert refused.value.code() in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.NOT_FOUND,
            ), refused.value
        status = a.status().self
        assert [held.lease_id for held in status.leases] == [lease.lease_id]
        assert not of(assigner.events(), "release")
        a.release(lease)  # its owner still can
    finally:
        b.close()
        a.close()
    (release,) = of(assigner.events(), "release")
    assert release["lease"] == lease.lease_id and release["reason"] == "release"


def test_a_lease_allocated_under_another_session_s_id_is_refused(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=2, token="tok")
    with Client(target=assigner.target, token="tok", worker="victim") as victim:
        victim_lease = victim.allocate(timeout=10)
        attacker = RawSession(assigner, worker="attacker")
        try:
            with pytest.raises(grpc.RpcError) as refused:
                attacker.allocate(session_id=victim.session_id)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "session" in (refused.value.details() or "")
            own = attacker.allocate()  # under its own session: granted
        finally:
            attacker.close()
        # The attacker's stream ended: its own lease went with it, the victim's stays.
        wait_for(
            lambda: of(assigner.events(), "release", lease=own.lease_id, reason="disconnect"),
            what="the attacker's lease to die with its stream",
        )
        status = victim.status().self
        assert [held.lease_id for held in status.leases] == [victim_lease.lease_id]
        victim.release(victim_lease)
    events = assigner.events()
    assert {e["lease"] for e in of(events, "grant")} == {victim_lease.lease_id, own.lease_id}
    replay(events)


FORGER = """
import queue, sys, time
import grpc
from acb_slurm import env
from acb_slurm._proto.acb.v1 import assigner_pb2 as pb
from acb_slurm._proto.acb.v1 import assigner_pb2_grpc as pb_grpc

victim = sys.argv[1]
metadata = ((env.TOKEN_METADATA_KEY, env.token()),)
stub = pb_grpc.AssignerStub(grpc.insecure_channel(env.assigner_target()))
pending = queue.SimpleQueue()
pending.put(pb.ClientMessage(register=pb.ClientIdentity(client_id="forger", worker="forger")))
stream = stub.Session(iter(pending.get, None), metadata=metadata)
registered = next(stream).registered

def request(session_id):
    request = pb.AllocRequest(session_id=session_id, gpu_count=1)
    if "session_key" in pb.AllocRequest.DESCRIPTOR.fields_by_name:
        request.session_key = registered.session_key
    return request

try:
    forged = stub.Allocate(request(victim), metadata=metadata, timeout=30)
    print("forged-granted", forged.lease_id, flush=True)
except grpc.RpcError as exc:
    print("forged-refused", exc.code().name, flush=True)
own = stub.Allocate(request(registered.session_id), metadata=metadata, timeout=30)
print("own", own.lease_id, flush=True)
time.sleep(600)
"""


def test_sigkill_of_a_holder_frees_every_lease_it_allocated(
    start_assigner: StartAssigner,
) -> None:
    # A process that allocates under another session's id and is then SIGKILLed must not leave
    # a lease behind in that session: such an Allocate is refused, and what it did allocate
    # (under its own session) dies with it.
    assigner = start_assigner(gpus=3, token="tok")
    with Client(target=assigner.target, token="tok", worker="victim") as victim:
        victim_lease = victim.allocate(timeout=10)
        forger = subprocess.Popen(
            [sys.executable, "-c", FORGER, victim.session_id],
            env=assigner.client_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert forger.stdout is not None
            forged = forger.stdout.readline().split()
            own = forger.stdout.readline().split()
            assert own and own[0] == "own", forger.stderr.read() if forger.stderr else ""
        finally:
            forger.kill()
            forger.communicate()
        assert forged == ["forged-refused", "PERMISSION_DENIED"]
        own_lease = own[1]
        wait_for(
            lambda: of(assigner.events(), "release", lease=own_lease, reason="disconnect"),
            what="the killed holder's lease to be released",
        )
        status = victim.status().self
        assert [held.lease_id for held in status.leases] == [victim_lease.lease_id]
        victim.release(victim_lease)
    replay(assigner.events())


# ---- 3. bounded inputs, echoes and answers -----------------------------------------------------

MIB = 1024 * 1024


def assert_refused_naming(error: grpc.RpcError, field: str) -> None:
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), details[:300])
    assert field in details, details[:300]
    assert len(details) < 1024, f"{len(details)} chars of error message"


def assert_log_lines_bounded(assigner: AssignerProcess, limit: int = 8192) -> None:
    text = assigner.event_log.read_text(encoding="utf-8")
    longest = max(len(line) for line in text.splitlines())
    assert longest < limit, f"an event-log line of {longest} chars"


@pytest.mark.parametrize(
    ("field", "fields"),
    [
        ("required_gpu_indices", {"required_gpu_indices": [0, 1] * 750_000}),
        ("label", {"label": "x" * MIB}),
        ("request_tag", {"request_tag": "t" * MIB}),
    ],
)
def test_oversized_allocate_fields_are_refused_naming_the_field(
    start_assigner: StartAssigner, field: str, fields: dict[str, Any]
) -> None:
    assigner = start_assigner(gpus=2)
    session = RawSession(assigner)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            session.allocate(**fields)
        assert_refused_naming(refused.value, field)
        with pytest.raises(grpc.RpcError) as forged:  # an unknown session id, echoed bounded
            session.allocate(session_id="s" * MIB)
        assert_refused_naming(forged.value, "session_id")
        assert session.allocate().gpu_indices == [0]  # and it keeps serving
    finally:
        session.close()
    assert_log_lines_bounded(assigner)


def test_oversized_release_fields_are_refused_naming_the_field(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1)
    session = RawSession(assigner)
    try:
        lease = session.allocate()
        with pytest.raises(grpc.RpcError) as refused:
            session.release("l" * MIB)
        assert_refused_naming(refused.value, "lease_id")
        request = session.release_request(lease.lease_id)
        request.reason = "r" * MIB
        with pytest.raises(grpc.RpcError) as bad_reason:
            session.stub.Release(request, metadata=session.metadata, timeout=30)
        assert_refused_naming(bad_reason.value, "reason")
        session.release(lease.lease_id)
    finally:
        session.close()
    assert_log_lines_bounded(assigner)


@pytest.mark.parametrize("field", ["client_id", "job_id", "worker", "hostname"])
def test_an_oversized_identity_is_refused_naming_the_field(
    start_assigner: StartAssigner, field: str
) -> None:
    assigner = start_assigner(gpus=1)
    with pytest.raises(grpc.RpcError) as refused:
        RawSession(assigner, **{field: "n" * MIB})
    assert_refused_naming(refused.value, field)
    with Client(target=assigner.target, token="") as client:
        client.release(client.allocate(timeout=10))
    assert_log_lines_bounded(assigner)


def test_waiters_with_huge_labels_do_not_break_status(start_assigner: StartAssigner) -> None:
    # Five waiters with 1 MiB labels made Status 5.2 MB, over gRPC's default limit.
    assigner = start_assigner(gpus=1)
    with Client(target=assigner.target, token="") as holder:
        holder.allocate(timeout=10)
        waiters = [RawSession(assigner, worker=f"w{i}") for i in range(5)]
        try:
            calls = [
                w.stub.Allocate.future(
                    w.allocate_request(label="x" * MIB), metadata=w.metadata, timeout=30
                )
                for w in waiters
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as refused:
                    call.result()
                assert_refused_naming(refused.value, "label")
            status = holder.status()
            assert status.ByteSize() < 64 * 1024
        finally:
            for waiter in waiters:
                waiter.close()
    assert_log_lines_bounded(assigner)


@pytest.mark.slow
def test_status_stays_under_the_default_message_limit_with_many_max_size_waiters(
    start_assigner: StartAssigner,
) -> None:
    from acb_slurm.assigner import limits

    assigner = start_assigner(gpus=1)
    identity = {
        "client_id": "c" * limits.MAX_CLIENT_ID,
        "job_id": "j" * limits.MAX_JOB_ID,
        "hostname": "h" * limits.MAX_HOSTNAME,
        "pid": 2**32 - 1,
    }
    label = "l" * limits.MAX_LABEL
    per_session = 256
    one_waiter = pb.WaiterStatus(
        client=pb.ClientIdentity(worker="w" * limits.MAX_WORKER, **identity),
        gpu_count=1,
        memory_bytes=2**64 - 1,
        priority=-(2**31),
        waiting_seconds=1e9,
        label=label,
    ).ByteSize()
    # Enough waiters that listing them all would not fit in one default message.
    sessions_needed = GRPC_DEFAULT_MAX_MESSAGE // (one_waiter * per_session) + 2
    with Client(target=assigner.target, token="") as holder:
        holder.allocate(timeout=10)
        sessions = [
            RawSession(assigner, worker=f"{i:03d}".ljust(limits.MAX_WORKER, "w"), **identity)
            for i in range(sessions_needed)
        ]
        calls: list[Any] = []
        try:
            for session in sessions:
                request = session.allocate_request(label=label)
                # A burst of thousands of new streams trips gRPC's own overload protection
                # (some are refused, CANCELLED): queue them a session at a time, again if need be.
                batch = [
                    session.stub.Allocate.future(request, metadata=session.metadata, timeout=300)
                    for _ in range(per_session)
                ]
                expected = len(calls) + per_session + 1

                def queued(
                    batch: list[Any] = batch,
                    expected: int = expected,
                    session: RawSession = session,
                    request: pb.AllocRequest = request,
                ) -> bool:
                    for i, call in enumerate(batch):
                        if call.done():
                            assert call.code() == grpc.StatusCode.CANCELLED, call
                            batch[i] = session.stub.Allocate.future(
                                request, metadata=session.metadata, timeout=300
                            )
                    return holder.status().self.counters.requests == expected

                wait_for(queued, timeout=60, what=f"{expected - 1} waiters to queue")
                calls += batch
            total = len(calls)
            status = holder.status()  # the default client limit: must fit
            assert status.ByteSize() < GRPC_DEFAULT_MAX_MESSAGE
            listed = len(status.self.queue)
            assert listed > 0
            assert listed + status.self.queue_omitted == total
            assert status.self.queue_omitted > 0  # the test did overflow one message
            # The listed ones are the first in service order.
            assert [w.client.worker[:3] for w in status.self.queue[:2]] == ["000", "000"]
        finally:
            for call in calls:
                call.cancel()
            for session in sessions:
                session.close()
    assert_log_lines_bounded(assigner)


# ---- 4. a silent peer is dropped fast ----------------------------------------------------------

# HOLDER and WAITER: the same programs as the daemon tests' (imported above).


@pytest.mark.slow
def test_a_stopped_holder_loses_its_gpu_to_a_waiter_within_20_seconds(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1, token="tok")

    def spawn(code: str, worker: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", code],
            env=assigner.client_env(ACB_WORKER=worker),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    holder = spawn(HOLDER, "holder")
    waiter: subprocess.Popen[str] | None = None
    try:
        assert holder.stdout is not None
        holder_lease = holder.stdout.readline().strip()
        assert holder_lease, holder.stderr.read() if holder.stderr else ""
        waiter = spawn(WAITER, "waiter")
        wait_for(lambda: of(assigner.events(), "request", worker="waiter"), what="the waiter")
        time.sleep(1.0)  # the holder's connection is idle, as a hung process's is
        stopped_at = time.time()
        holder.send_signal(signal.SIGSTOP)
        out, err = waiter.communicate(timeout=45)
        assert waiter.returncode == 0, err
        granted_at = float(out.split()[0])
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.communicate()
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    waited = granted_at - stopped_at
    print(f"a stopped holder's lease went to the waiter after {waited:.1f}s")
    assert waited < 20, f"the stopped holder kept its GPU for {waited:.1f}s"
    (release,) = of(assigner.events(), "release", lease=holder_lease)
    assert release["reason"] == "disconnect"
