"""The client library against a real acb-assigner: manual API, errors, hooks, usage reports."""

from __future__ import annotations

import concurrent.futures
import queue
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from acb_slurm import env
from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.client import (
    AssignerNotConfigured,
    AssignerUnavailable,
    Client,
    InvalidGpuRequest,
    Lease,
    LeaseListener,
    LeaseLost,
    LeaseNotHeld,
    default_client,
    on_device,
    on_device_begin,
    on_device_end,
    set_default_client,
)
from acb_slurm.scheduler.replay import replay
from acb_slurm.units import parse_size

StartAssigner = Callable[..., AssignerProcess]


@pytest.fixture
def manual_env(
    start_assigner: StartAssigner, monkeypatch: pytest.MonkeyPatch
) -> Iterator[AssignerProcess]:
    """An assigner with two GPUs that this process's manual API talks to."""
    assigner = start_assigner(gpus=2, token="tok")
    monkeypatch.setenv(env.ASSIGNER, assigner.target)
    assert assigner.token_file is not None
    monkeypatch.setenv(env.TOKEN_FILE, str(assigner.token_file))
    monkeypatch.setenv(env.WORKER, "manual-test")
    monkeypatch.setenv(env.JOB_ID, "4242")
    set_default_client(None)
    yield assigner
    previous = set_default_client(None)
    if previous is not None:
        previous.close()


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def test_on_device_grants_and_releases_with_identity_in_the_log(
    manual_env: AssignerProcess,
) -> None:
    with on_device(memory="10GiB", label="fold") as lease:
        assert isinstance(lease, Lease)
        assert lease.gpu_indices == (0,)
        assert lease.device_ids == ("0",)
        assert lease.cuda_visible_devices == "0"
        assert lease.memory_bytes == parse_size("80GiB")  # simple: the whole GPU
        assert lease.waited_seconds >= 0
        assert lease.node
        assert default_client().held == [lease]
    assert default_client().held == []
    events = manual_env.events()
    (request,) = of(events, "request")
    assert request["label"] == "fold"
    assert request["memory_bytes"] == parse_size("10GiB")
    assert request["worker"] == "manual-test"
    assert request["job"] == "4242"
    (release,) = of(events, "release")
    assert release["reason"] == "release"


def test_on_device_end_releases_the_latest_lease_and_refuses_without_one(
    manual_env: AssignerProcess,
) -> None:
    first = on_device_begin()
    second = on_device_begin()
    assert {first.gpu_indices, second.gpu_indices} == {(0,), (1,)}
    on_device_end()
    assert default_client().held == [first]
    on_device_end(first)
    with pytest.raises(LeaseNotHeld, match="without a lease"):
        on_device_end()
    with pytest.raises(LeaseNotHeld):
        on_device_end(first)


def test_timeout_raises_and_withdraws_the_request(manual_env: AssignerProcess) -> None:
    held = [on_device_begin(), on_device_begin()]
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="withdrawn"):
        on_device_begin(timeout=0.3)
    assert time.monotonic() - started < 10
    status = default_client().status()
    assert len(status.self.queue) == 0
    for lease in held:
        on_device_end(lease)
    (withdraw,) = of(manual_env.events(), "withdraw")
    assert withdraw["reason"] == "deadline"


def test_missing_assigner_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(env.ASSIGNER, raising=False)
    set_default_client(None)
    with pytest.raises(AssignerNotConfigured, match="ACB_ASSIGNER is not set"):
        on_device_begin()


def test_unreachable_assigner_is_a_clear_error(tmp_path: Any) -> None:
    client = Client(target=f"unix:{tmp_path}/nobody.sock", token="", connect_timeout=10)
    with pytest.raises(AssignerUnavailable, match="cannot reach the assigner"):
        client.allocate()
    client.close()


class Recorder(LeaseListener):
    def __init__(self, fail_on_grant: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_on_grant = fail_on_grant

    def on_granted(self, client: Client, lease: Lease) -> None:
        self.calls.append(("granted", lease.lease_id))
        if self.fail_on_grant:
            raise RuntimeError("onload failed")

    def before_release(self, client: Client, lease: Lease) -> None:
        self.calls.append(("before_release", lease.lease_id))


def test_listeners_run_around_grant_and_release(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=1)
    with Client(target=assigner.target, token="") as client:
        recorder = Recorder()
        client.add_listener(recorder)
        lease = client.allocate()
        assert recorder.calls == [("granted", lease.lease_id)]
        client.release(lease)
        assert recorder.calls[-1] == ("before_release", lease.lease_id)
        client.remove_listener(recorder)
        failing = Recorder(fail_on_grant=True)
        client.add_listener(failing)
        with pytest.raises(RuntimeError, match="onload failed"):
            client.allocate()
        assert client.held == []
        assert client.status().self.leases == []  # rolled back: the GPU is free again


def test_a_process_that_exits_holding_a_lease_gives_it_back(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1)
    code = "from acb_slurm.client import on_device_begin; on_device_begin()"
    subprocess.run([sys.executable, "-c", code], env=assigner.client_env(), check=True, timeout=60)
    with Client(target=assigner.target, token="") as client:
        lease = client.allocate(timeout=10)
        client.release(lease)
    (first_release, _) = of(assigner.events(), "release")
    assert first_release["reason"] == "disconnect"


def test_usage_reports_tighten_and_loosen_a_shared_gpu(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=1, gpu_memory="80GiB", policy="gpu-sharing")
    gib = parse_size("1GiB")
    with (
        Client(target=assigner.target, token="") as a,
        Client(target=assigner.target, token="") as b,
    ):
        lease = a.allocate(memory=10 * gib)
        a.report_usage(lease, 75 * gib)
        deadline = time.monotonic() + 10
        while a.status().self.gpus[0].promised_bytes != 75 * gib:
            assert time.monotonic() < deadline, "usage report not applied"
            time.sleep(0.02)
        with pytest.raises(TimeoutError):
            b.allocate(memory=10 * gib, timeout=0.3)
        a.report_usage(lease, 5 * gib)
        other = b.allocate(memory=10 * gib, timeout=10)
        assert other.gpu_indices == (0,)
    events = assigner.events()
    assert [e["resident_bytes"] for e in events if e["event"] == "usage"] == [75 * gib, 5 * gib]
    replay(events)  # usage reports are in the log, so the log replays exactly


def test_a_restarted_assigner_means_a_new_session_and_no_stale_lease(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1)
    with Client(target=assigner.target, token="") as client:
        lease = client.allocate(timeout=10)
        assert assigner.terminate() == 0
        first_session = lease.lease_id
        deadline = time.monotonic() + 10
        while client.connected:  # the session thread notices the end
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(LeaseLost):  # died with the session: not released "normally"
            client.release(lease)
        assigner.start()
        again = client.allocate(timeout=10)
        assert again.lease_id != first_session
        client.release(again)
    assert [e["reason"] for e in assigner.events() if e["event"] == "release"] == [
        "shutdown",
        "release",
    ]


class YieldRecorder(LeaseListener):
    """Records the yield requests its client receives, with the time they came."""

    def __init__(self) -> None:
        self.asked: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()

    def on_yield_request(self, client: Client, lease_id: str, reason: str) -> None:
        self.asked.put((lease_id, reason))


def test_a_holder_is_asked_to_yield_after_its_time_slice_only_while_another_waits(
    start_assigner: StartAssigner,
) -> None:
    time_slice = 0.4
    assigner = start_assigner(gpus=1, extra_args=["--time-slice", str(time_slice)])
    first_recorder, second_recorder = YieldRecorder(), YieldRecorder()
    with (
        Client(target=assigner.target, token="", worker="first") as first,
        Client(target=assigner.target, token="", worker="second") as second,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        first.add_listener(first_recorder)
        second.add_listener(second_recorder)
        lease = first.allocate(timeout=10)
        # Nobody waits: however long the lease is held, nobody is asked to yield.
        with pytest.raises(queue.Empty):
            first_recorder.asked.get(timeout=3 * time_slice)
        assert not first.yield_requested(lease)
        # A waiter comes while the lease is older than the slice: the holder is asked at once,
        # and only once.
        waiting = pool.submit(second.allocate, timeout=30)
        assert first_recorder.asked.get(timeout=10) == (lease.lease_id, "time-slice")
        assert first.yield_requested(lease)
        with pytest.raises(queue.Empty):
            first_recorder.asked.get(timeout=2 * time_slice)
        first.release(lease)
        handed = waiting.result(timeout=10)
        # The new holder is asked once its own slice is used up, not before.
        again = pool.submit(first.allocate, timeout=30)
        assert second_recorder.asked.get(timeout=10) == (handed.lease_id, "time-slice")
        second.release(handed)
        first.release(again.result(timeout=10))
    events = assigner.events()
    (grant,) = [e for e in of(events, "grant") if e["lease"] == handed.lease_id]
    (asked,) = [e for e in of(events, "yield") if e["lease"] == handed.lease_id]
    assert asked["ts"] - grant["ts"] >= time_slice - 0.01
    assert asked["reason"] == "time-slice" and asked["worker"] == "second"
    assert len(of(events, "yield")) == 2
    assert first_recorder.asked.empty() and second_recorder.asked.empty()
    replay(events)


def test_a_pinned_waiter_asks_only_the_holder_of_its_gpu_to_yield(
    start_assigner: StartAssigner,
) -> None:
    time_slice = 0.3
    assigner = start_assigner(gpus=2, extra_args=["--time-slice", str(time_slice)])
    recorders = {"a": YieldRecorder(), "b": YieldRecorder()}
    with (
        Client(target=assigner.target, token="", worker="a") as a,
        Client(target=assigner.target, token="", worker="b") as b,
        Client(target=assigner.target, token="", worker="pinned") as pinned,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        a.add_listener(recorders["a"])
        b.add_listener(recorders["b"])
        on_zero, on_one = a.allocate(timeout=10), b.allocate(timeout=10)
        assert (on_zero.gpu_indices, on_one.gpu_indices) == ((0,), (1,))
        waiting = pool.submit(pinned.allocate, timeout=30, required_gpus=[1])
        assert recorders["b"].asked.get(timeout=10) == (on_one.lease_id, "time-slice")
        with pytest.raises(queue.Empty):  # GPU 0 would not help the pinned waiter
            recorders["a"].asked.get(timeout=3 * time_slice)
        b.release(on_one)
        assert waiting.result(timeout=10).gpu_indices == (1,)
        a.release(on_zero)
    assert [e["worker"] for e in of(assigner.events(), "yield")] == ["b"]
    replay(assigner.events())


def test_without_a_time_slice_nobody_is_asked_to_yield(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=1)
    recorder = YieldRecorder()
    with (
        Client(target=assigner.target, token="") as holder,
        Client(target=assigner.target, token="") as other,
    ):
        holder.add_listener(recorder)
        lease = holder.allocate(timeout=10)
        with pytest.raises(TimeoutError):
            other.allocate(timeout=1.0)
        assert recorder.asked.empty() and not holder.yield_requested(lease)
    assert of(assigner.events(), "yield") == []


def test_a_grant_that_comes_just_after_the_timeout_is_given_back(
    start_assigner: StartAssigner,
) -> None:
    # A free GPU and timeouts shorter than one Allocate round trip: most calls still return in
    # time, some time out before the assigner saw them, and some time out while their grant is
    # on its way back (the race). None of them may leave a lease held.
    assigner = start_assigner(gpus=1)
    timeouts = [1e-6, 1e-5, 5e-5, 1e-4, 3e-4]
    outcomes = {"granted": 0, "timed out": 0}
    with Client(target=assigner.target, token="") as client:
        client.status()  # the session and channel are up before the timing starts
        for attempt in range(2000):
            try:
                lease = client.allocate(timeout=timeouts[attempt % len(timeouts)])
            except TimeoutError:
                outcomes["timed out"] += 1
                if outcomes["timed out"] == 40:
                    break
                continue
            outcomes["granted"] += 1
            client.release(lease)

        def nothing_held() -> bool:
            return not client.status().self.leases

        deadline = time.monotonic() + 10
        while not nothing_held() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert nothing_held(), f"a lease stays held after {outcomes}"
        assert client.allocate(timeout=5).gpu_indices == (0,)
    # Closing the client released that last lease; the assigner logs it as the session ends.
    deadline = time.monotonic() + 10
    while not of(assigner.events(), "disconnect") and time.monotonic() < deadline:
        time.sleep(0.02)
    events = assigner.events()
    late = [e for e in of(events, "release") if e["reason"] in ("deadline", "cancelled")]
    print(outcomes, "late grants given back:", len(late))
    assert len(of(events, "grant")) == len(of(events, "release"))
    replay(events)


PINNED_WAITER = """
import sys
from acb_slurm.client import on_device_begin
lease = on_device_begin(required_gpus=[int(sys.argv[1])], label="pinned")
print(",".join(map(str, lease.gpu_indices)), flush=True)
"""


@pytest.mark.parametrize("policy", ["simple", "gpu-sharing", "gpu-affinity"])
def test_a_pinned_request_waits_for_its_gpu_while_another_is_free(
    start_assigner: StartAssigner, policy: str
) -> None:
    # A swapping process must come back to the GPU its state lives on: pinned to GPU 1, it
    # waits while GPU 0 is free and gets GPU 1 once its holder lets go, never GPU 0.
    assigner = start_assigner(gpus=2, policy=policy)
    with (
        Client(target=assigner.target, token="", worker="a") as a,
        Client(target=assigner.target, token="", worker="b") as b,
    ):
        first = a.allocate(timeout=10)
        second = b.allocate(timeout=10)
        assert (first.gpu_indices, second.gpu_indices) == ((0,), (1,))
        pinned = subprocess.Popen(
            [sys.executable, "-c", PINNED_WAITER, "1"],
            env=assigner.client_env(ACB_WORKER="pinned"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not (queue_now := a.status().self.queue):
                assert pinned.poll() is None, pinned.communicate()
                assert time.monotonic() < deadline, "the pinned request never queued"
                time.sleep(0.02)
            (waiter,) = queue_now
            assert waiter.client.worker == "pinned"
            assert list(waiter.required_gpu_indices) == [1]
            a.release(first)
            time.sleep(0.5)  # GPU 0 is free all this time; the pinned request must not take it
            assert pinned.poll() is None, f"the pinned request returned: {pinned.communicate()}"
            status = a.status().self
            assert list(status.gpus[0].lease_ids) == []
            assert [w.client.worker for w in status.queue] == ["pinned"]
            b.release(second)
            out, err = pinned.communicate(timeout=30)
        finally:
            if pinned.poll() is None:
                pinned.kill()
                pinned.communicate()
        assert pinned.returncode == 0, err
        assert out.strip() == "1"
    events = assigner.events()
    requests = {e["worker"]: e for e in of(events, "request")}
    assert requests["pinned"]["required_gpus"] == [1]
    assert requests["a"]["required_gpus"] == requests["b"]["required_gpus"] == []
    pinned_grants = [e["gpus"] for e in of(events, "grant") if e["worker"] == "pinned"]
    assert pinned_grants == [[1]]
    replay(events)


def test_the_manual_api_pins_a_request_to_an_earlier_lease_s_gpus(
    manual_env: AssignerProcess,
) -> None:
    first = on_device_begin(label="first")
    assert first.gpu_indices == (0,)
    on_device_end(first)
    with Client(target=manual_env.target, token="tok") as other:
        taken = other.allocate(timeout=10)
        assert taken.gpu_indices == (0,)
        with pytest.raises(TimeoutError):  # GPU 1 is free, but this request is pinned to GPU 0
            on_device_begin(required_gpus=first.gpu_indices, timeout=0.5)
        other.release(taken)
        with on_device(required_gpus=first.gpu_indices, timeout=10) as again:
            assert again.gpu_indices == (0,)
    with pytest.raises(InvalidGpuRequest, match="GPU indices"):
        on_device_begin(required_gpus=[-1])
    with pytest.raises(InvalidGpuRequest, match="sequence of GPU indices"):
        on_device_begin(required_gpus="0")  # type: ignore[arg-type]
    requests = of(manual_env.events(), "request")
    assert [r["required_gpus"] for r in requests] == [[], [], [0], [0]]


def test_end_session_frees_every_lease_and_the_next_call_opens_a_new_session(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=2)
    with Client(target=assigner.target, token="", worker="ender", release_timeout=5.0) as client:
        assert client.release_timeout == 5.0
        first = client.allocate(timeout=10)
        second = client.allocate(timeout=10)
        old_session = client.session_id
        client.end_session()
        assert client.held == [] and not client.connected

        def freed() -> bool:
            released = {e["lease"]: e["reason"] for e in of(assigner.events(), "release")}
            return released == {first.lease_id: "disconnect", second.lease_id: "disconnect"}

        deadline = time.monotonic() + 20
        while not freed():
            assert time.monotonic() < deadline, "ending the session did not free its leases"
            time.sleep(0.02)
        again = client.allocate(timeout=10)  # a new session, the client still usable
        assert client.session_id != old_session
        assert [lease.lease_id for lease in client.status().self.leases] == [again.lease_id]
        client.release(again)
