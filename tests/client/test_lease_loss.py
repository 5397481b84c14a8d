"""A holder learns at once that its lease is gone (the assigner died or restarted, or dropped the
holder as silent while it was stopped), and ending such a lease raises `LeaseLost` instead of
releasing it "normally". Real assigners, real processes, real gRPC over Unix sockets."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from acb_slurm import env
from acb_slurm.assigner.testing import AssignerProcess, wait_for
from acb_slurm.assigner.testing import events_of as of
from acb_slurm.client import (
    Client,
    Lease,
    LeaseListener,
    LeaseLost,
    LeaseNotHeld,
    SessionLost,
    default_client,
    on_device,
    set_default_client,
)

StartAssigner = Callable[..., AssignerProcess]

#: How soon a holder must be told once its assigner is gone (seen: a few milliseconds).
TOLD_WITHIN_S = 2.0

#: A holder using the manual API: says when it is told of a loss (callback), ends its `with`
#: block when the test writes a line to its stdin, and reports how the block ended.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from acb_slurm.client import LeaseLost, on_device, on_lease_lost

    @on_lease_lost
    def told(lease, error):
        print("lost", lease.lease_id, time.time(), flush=True)

    try:
        with on_device(label="holder") as lease:
            print("held", lease.lease_id, flush=True)
            sys.stdin.readline()
    except LeaseLost as exc:
        print("LeaseLost", exc.lease_id, flush=True)
        sys.exit(3)
    print("released", flush=True)
    """
)


#: A process with a session but no lease: asks for one when the test writes a line.
ALLOCATOR = textwrap.dedent(
    """
    import sys
    from acb_slurm.client import default_client, on_device_begin, on_device_end

    default_client().session_id  # the session opens now
    print("held nothing", flush=True)
    sys.stdin.readline()
    lease = on_device_begin(timeout=20)
    print("granted", lease.lease_id, flush=True)
    on_device_end(lease)
    """
)


class Holder:
    """A HOLDER process with its stdout read line by line on a thread (no blocking reads)."""

    def __init__(self, assigner: AssignerProcess, worker: str, program: str = HOLDER) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", program],
            env=assigner.client_env(ACB_WORKER=worker),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first = self.line(30)
        assert first.startswith("held "), first + self.stderr()
        self.lease_id = first.split()[1]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the holder said nothing within {timeout}s") from None

    def end_block(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 20) -> tuple[int, list[str]]:
        """Wait for the exit; its code and the lines it said since the last `line()`."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        return code, rest

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.kill()


class LostRecorder(LeaseListener):
    def __init__(self) -> None:
        self.told: queue.SimpleQueue[tuple[str, LeaseLost, float]] = queue.SimpleQueue()

    def on_lease_lost(self, client: Client, lease: Lease, error: LeaseLost) -> None:
        self.told.put((lease.lease_id, error, time.monotonic()))


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_holder_is_told_at_once_when_its_assigner_goes(
    start_assigner: StartAssigner, how: str
) -> None:
    assigner = start_assigner(gpus=2)
    with Client(target=assigner.target, token="", worker="told") as client:
        listener = LostRecorder()
        client.add_listener(listener)
        called: queue.SimpleQueue[tuple[Lease, LeaseLost, float]] = queue.SimpleQueue()
        client.on_lease_lost(lambda lease, error: called.put((lease, error, time.monotonic())))
        first = client.allocate(timeout=10)
        second = client.allocate(timeout=10)
        gone_at = time.monotonic()
        if how == "SIGKILL":
            assigner.kill()
        else:
            assert assigner.terminate() == 0
        told = [called.get(timeout=TOLD_WITHIN_S) for _ in range(2)]
        assert {lease.lease_id for lease, _, _ in told} == {first.lease_id, second.lease_id}
        assert max(at for _, _, at in told) - gone_at < TOLD_WITHIN_S
        heard = [listener.told.get(timeout=TOLD_WITHIN_S) for _ in range(2)]
        assert {lease_id for lease_id, _, _ in heard} == {first.lease_id, second.lease_id}
        for lease, error, _ in told:
            assert isinstance(error, LeaseLost) and isinstance(error, SessionLost)
            assert error.lease_id == lease.lease_id and error.lease == lease
            assert "was lost" in str(error) and assigner.target in str(error)
        assert client.held == [] and client.lost == [first, second]
        with pytest.raises(LeaseLost):
            client.check_lease(first)  # at a safe point; the lease stays to be ended
        assert client.latest_lease() == second
        with pytest.raises(LeaseLost) as raised:
            client.release(first)  # not released "normally"
        assert raised.value.lease_id == first.lease_id
        with pytest.raises(LeaseNotHeld):
            client.release(first)  # ended: forgotten
        with pytest.raises(LeaseLost):
            client.release(second)
        assert client.lost == []


def test_ending_the_session_on_purpose_loses_nothing(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=1)
    called: list[Lease] = []
    with Client(target=assigner.target, token="", worker="ender") as client:
        client.on_lease_lost(lambda lease, error: called.append(lease))
        lease = client.allocate(timeout=10)
        client.end_session()
        with pytest.raises(LeaseNotHeld):
            client.release(lease)  # ended with the session, as before: not "lost"
        again = client.allocate(timeout=10)
        client.release(again)
        held = client.allocate(timeout=10)
    time.sleep(0.3)  # a loss would be told within milliseconds
    assert called == [] and held.lease_id
    assert of(assigner.events(), "release", lease=again.lease_id)[0]["reason"] == "release"


def test_a_with_block_whose_lease_was_lost_raises_at_its_exit(
    start_assigner: StartAssigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    assigner = start_assigner(gpus=1)
    monkeypatch.setenv(env.ASSIGNER, assigner.target)
    monkeypatch.delenv(env.TOKEN_FILE, raising=False)
    monkeypatch.delenv(env.TOKEN, raising=False)
    set_default_client(None)
    try:
        with pytest.raises(LeaseLost) as raised, on_device() as lease:
            assigner.kill()
            wait_for(lambda: default_client().lost, 5, "the loss to be seen")
        assert raised.value.lease_id == lease.lease_id
        assert default_client().held == [] and default_client().lost == []
    finally:
        previous = set_default_client(None)
        if previous is not None:
            previous.close()


def test_a_restarted_assigner_s_new_holder_and_the_old_one_who_learns_it_lost(
    start_assigner: StartAssigner, holders: list[Holder]
) -> None:
    assigner = start_assigner(gpus=1)
    holder = Holder(assigner, "old-holder")
    holders.append(holder)
    killed_at = time.time()
    assigner.kill()  # a crash: the socket file stays behind
    told = holder.line(TOLD_WITHIN_S + 1)
    assert told.startswith(f"lost {holder.lease_id} "), told
    assert float(told.split()[2]) - killed_at < TOLD_WITHIN_S
    assigner.start()  # the same socket, a fresh inventory: GPU 0 is free again
    with Client(target=assigner.target, token="", worker="new-holder") as other:
        taken = other.allocate(timeout=10)
        assert taken.gpu_indices == (0,)
        holder.end_block()
        code, said = holder.finish()
        assert code == 3, (said, holder.stderr())
        assert said == [f"LeaseLost {holder.lease_id}"]
        other.release(taken)
    # The old holder gave nothing back to the new assigner: only the new holder's release.
    releases = of(assigner.events(), "release")
    assert [(e["worker"], e["reason"]) for e in releases] == [("new-holder", "release")]


@pytest.mark.slow
def assert_told_not_released(said: list[str], lease_id: str) -> None:
    """The block's end raised LeaseLost and nothing was released "normally". The callback's
    `lost` line, when the session thread got there first, may come before or after it: the
    callback runs on the session thread, the exception in the holder's own."""
    assert f"LeaseLost {lease_id}" in said, said
    assert all(
        line.startswith(f"lost {lease_id} ") for line in said if not line.startswith("LeaseLost")
    ), said


def test_a_resumed_holder_that_was_dropped_while_stopped_learns_it_lost_its_lease(
    start_assigner: StartAssigner, holders: list[Holder]
) -> None:
    """SIGSTOP two holders until the assigner's keepalive drops them (~10 s) and their GPUs go
    to a waiter; on SIGCONT one is told by its callback at once, the other ends its block at the
    very moment it resumes (its line was written while it was stopped) and, racing the session
    thread, must still learn the lease was lost rather than release it "normally"."""
    assigner = start_assigner(gpus=2, policy="gpu-affinity")
    told = Holder(assigner, "told")
    racing = Holder(assigner, "racing")
    holders.extend([told, racing])
    waiter_grant: queue.SimpleQueue[Lease | BaseException] = queue.SimpleQueue()
    with Client(target=assigner.target, token="", worker="waiter") as waiter:

        def wait_for_gpus() -> None:
            try:
                waiter_grant.put(waiter.allocate(gpus=2, timeout=60))
            except BaseException as exc:  # reported to the test thread
                waiter_grant.put(exc)

        time.sleep(0.5)  # the holders' connections idle, as a stopped process's are
        for holder in (told, racing):
            holder.proc.send_signal(signal.SIGSTOP)
        threading.Thread(target=wait_for_gpus, daemon=True).start()
        granted = waiter_grant.get(timeout=30)  # both dropped by keepalive, GPUs given away
        assert isinstance(granted, Lease), granted
        for holder in (told, racing):
            (release,) = of(assigner.events(), "release", lease=holder.lease_id)
            assert release["reason"] == "disconnect"
        racing.end_block()  # buffered in the pipe: read the moment it resumes
        resumed_at = time.time()
        racing.proc.send_signal(signal.SIGCONT)
        told.proc.send_signal(signal.SIGCONT)
        line = told.line(TOLD_WITHIN_S + 1)
        assert line.startswith(f"lost {told.lease_id} "), line
        assert float(line.split()[2]) - resumed_at < TOLD_WITHIN_S
        code, said = racing.finish()
        assert code == 3, (said, racing.stderr())
        assert_told_not_released(said, racing.lease_id)
        told.end_block()
        code, said = told.finish()
        assert code == 3, (said, told.stderr())
        assert said == [f"LeaseLost {told.lease_id}"]
        waiter.release(granted)
    # Nothing but the keepalive's drop ended the holders' leases.
    for holder in (told, racing):
        assert [e["reason"] for e in of(assigner.events(), "release", lease=holder.lease_id)] == [
            "disconnect"
        ]


def test_processes_resumed_after_their_assigner_was_replaced_race_their_session_s_end(
    start_assigner: StartAssigner, holders: list[Holder]
) -> None:
    """Stopped while their assigner is killed and a new one starts on the same socket, then
    resumed with their next call already due: the holder's release races the session thread
    (and may reach the new assigner, which knows nothing of its session), the other one's
    request too. The holder must still learn its lease was lost; the request must be served by
    the new assigner on a new session, not fail on the dead one."""
    assigner = start_assigner(gpus=1)
    holder = Holder(assigner, "racing-holder")
    asker = Holder(assigner, "racing-asker", program=ALLOCATOR)
    holders.extend([holder, asker])
    for process in (holder, asker):
        process.proc.send_signal(signal.SIGSTOP)
    assigner.kill()
    assigner.start()
    for process in (holder, asker):
        process.end_block()  # buffered in the pipe: read the moment it resumes
        process.proc.send_signal(signal.SIGCONT)
    code, said = holder.finish()
    assert code == 3, (said, holder.stderr())
    assert_told_not_released(said, holder.lease_id)
    code, said = asker.finish()
    assert code == 0, (said, asker.stderr())
    (granted,) = said
    assert of(assigner.events(), "grant", worker="racing-asker", lease=granted.split()[1])
