"""Automatic mode in this process with the real client against a real acb-assigner."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

import pytest
import torch

from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.client import Client, InvalidGpuRequest, on_device, set_default_client
from acb_slurm.swap.auto import AutoSwap, Phase, SwapLease
from acb_slurm.swap.engine import SwapEngine, SwapError, SwapState, SwapStats
from acb_slurm.swap.lessors import ClientLessor
from acb_slurm.swap.manual import SwapOnRelease, enable_swap

StartAssigner = Callable[..., AssignerProcess]


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_resident_bytes_reach_the_scheduler_and_idle_releases_the_lease(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1, policy="gpu-sharing", gpu_memory="1GiB")
    client = Client(target=assigner.target, token=None, worker="swap-test")
    lessor = ClientLessor(client, memory_bytes=4096, label="auto-test")
    auto = AutoSwap(lessor, device="cpu", idle_ms=1500, report_s=0.1)
    lessor.attach(auto)
    auto.install()
    try:
        weights = torch.randn(512, 512)  # 1 MiB, far above the 4 KiB asked for
        assert auto.holding

        def promised() -> int:
            return client.status().self.gpus[0].promised_bytes

        # gpu-sharing charges a holder max(its request, what it reports): the report arrived.
        assert wait_until(lambda: promised() >= 512 * 512 * 4), promised()
        assert wait_until(lambda: auto.phase is Phase.AWAY), "idle never released the lease"
        assert wait_until(lambda: promised() == 0)
        assert (weights @ weights).shape == (512, 512)  # back: a second grant
        assert auto.holding
    finally:
        auto.uninstall()
        client.close()
    grants = [e for e in assigner.events() if e["event"] == "grant"]
    releases = [e for e in assigner.events() if e["event"] == "release"]
    assert len(grants) == 2 and len(releases) == 2
    assert all(e["worker"] == "swap-test" for e in grants)


def test_manual_api_with_swap_offloads_on_end_and_onloads_on_begin(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1)
    client = Client(target=assigner.target, token=None, worker="manual-swap")
    listener = enable_swap("cpu", client)
    try:
        lease = client.allocate(label="phase-1")
        weights = torch.linspace(0, 1, 4096)
        client.release(lease)
        assert listener.engine.state is SwapState.OFFLOADED
        assert weights.untyped_storage().nbytes() == 0
        client.allocate(label="phase-2")
        assert listener.engine.state is SwapState.RESIDENT
        assert torch.equal(weights, torch.linspace(0, 1, 4096))
    finally:
        client.close()


class StaleLessor(ClientLessor):
    """Releases under a lease id the assigner does not know: the real client raises, and the
    lease really granted stays held by the assigner (what a release lost in transit leaves)."""

    def release(self, lease: SwapLease, *, yielded: bool = False) -> None:
        super().release(SwapLease(lease.lease_id + "-stale", lease.device_ids), yielded=yielded)


def test_a_failed_release_ends_the_session_so_the_lease_is_not_leaked(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1)
    client = Client(target=assigner.target, token=None, worker="release-fails")
    lessor = StaleLessor(client, label="auto-test")
    auto = AutoSwap(lessor, device="cpu", idle_ms=3_600_000)
    lessor.attach(auto)
    auto.install()
    try:
        weights = torch.arange(1000.0)
        first = auto._lease
        assert first is not None
        auto.swap_out("test")  # offload, then the release fails
        assert auto.stats.failed_releases == 1 and not auto.holding

        def released() -> bool:
            return any(
                e["event"] == "release" and e["lease"] == first.lease_id for e in assigner.events()
            )

        assert wait_until(released), "the lease stayed held after a failed release"
        assert weights.sum().item() == 499500.0  # a new session, a new grant, onloaded
        assert auto.holding and auto._lease is not None
        assert auto._lease.lease_id != first.lease_id
    finally:
        auto.lessor = ClientLessor(client)  # release normally at the end
        auto.uninstall()
        client.close()
    (release,) = [e for e in assigner.events() if e["event"] == "release" and
                  e["lease"] == first.lease_id]  # fmt: skip
    assert release["reason"] == "disconnect"


class RefusingEngine(SwapEngine):
    """Refuses every offload, as the engine does while CUDA graph pools exist."""

    def offload(self) -> SwapStats:
        raise SwapError("refused (test)")


def test_manual_api_with_swap_reports_usage_without_a_walk_per_grant(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1)
    client = Client(target=assigner.target, token=None, worker="manual-walks")
    listener = SwapOnRelease(SwapEngine("cpu"), report_s=3600.0)
    client.add_listener(listener)
    try:
        weights = torch.ones(1000)
        for _ in range(3):
            client.release(client.allocate(label="phase"))
        client.allocate(label="last")  # onload: the storages are away after a release
        assert weights.sum().item() == 1000.0
    finally:
        client.close()
    assert listener.walks == 1  # 4 grants, one walk: a report is due once per report_s


def test_manual_api_keeps_the_lease_when_offload_fails(start_assigner: StartAssigner) -> None:
    assigner = start_assigner(gpus=1)
    client = Client(target=assigner.target, token=None, worker="manual-refused")
    client.add_listener(SwapOnRelease(RefusingEngine("cpu")))
    try:
        weights = torch.ones(1000)
        lease = client.allocate(label="phase")
        with pytest.raises(SwapError):
            client.release(lease)
        assert weights.untyped_storage().nbytes() == 4000  # the data stayed on the device
        assert [held.lease_id for held in client.held] == [lease.lease_id]
        assert not [e for e in assigner.events() if e["event"] == "release"]
        assert [lease.lease_id] == [h.lease_id for h in client.status().self.leases]
    finally:
        client.close()


def test_the_with_block_keeps_the_lease_and_raises_when_offload_fails(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1)
    client = Client(target=assigner.target, token=None, worker="with-refused")
    client.add_listener(SwapOnRelease(RefusingEngine("cpu")))
    previous = set_default_client(client)
    try:
        with pytest.raises(SwapError), on_device(label="phase") as lease:
            weights = torch.ones(1000)
        assert weights.untyped_storage().nbytes() == 4000
        assert [held.lease_id for held in client.held] == [lease.lease_id]
        assert not [e for e in assigner.events() if e["event"] == "release"]
    finally:
        set_default_client(previous)
        client.close()


def requests_of(assigner: AssignerProcess, worker: str) -> list[list[int]]:
    return [
        e["required_gpus"]
        for e in assigner.events()
        if e["event"] == "request" and e["worker"] == worker
    ]


def check_pinned_to_first_grant(
    assigner: AssignerProcess,
    acquire: Callable[[], tuple[int, ...]],
    release: Callable[[], None],
    worker: str,
) -> None:
    """The swapping process got GPU k first; while another client holds GPU k and a third gets
    the other GPU meanwhile, its next request waits, then it gets GPU k."""
    (k,) = acquire()
    release()
    with (
        Client(target=assigner.target, token=None, worker="holder") as holder,
        Client(target=assigner.target, token=None, worker="other") as other,
    ):
        taken = holder.allocate(required_gpus=[k], timeout=10)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            again = pool.submit(acquire)

            def queued() -> bool:
                return [w.client.worker for w in holder.status().self.queue] == [worker]

            assert wait_until(queued), "the pinned request never queued"
            free = other.allocate(timeout=10)  # the other GPU was free all along
            assert free.gpu_indices == (1 - k,)
            time.sleep(0.3)
            assert not again.done(), "the pinned request was granted another GPU"
            holder.release(taken)
            assert again.result(timeout=30) == (k,)
        other.release(free)
    assert requests_of(assigner, worker) == [[], [k]]


def test_the_auto_mode_lessor_pins_later_requests_to_its_first_grant(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=2, gpu_memory="1GiB")
    client = Client(target=assigner.target, token=None, worker="auto-pinned")
    lessor = ClientLessor(client, label="auto-test")
    held: list[SwapLease] = []

    def acquire() -> tuple[int, ...]:
        held.append(lessor.acquire())
        return lessor._held[held[-1].lease_id].gpu_indices

    try:
        check_pinned_to_first_grant(
            assigner, acquire, lambda: lessor.release(held.pop()), "auto-pinned"
        )
        assert lessor.pinned is not None
        lessor.release(held.pop())
        lessor.abandon()  # a new session stays bound to the same GPUs
        acquire()
        assert requests_of(assigner, "auto-pinned")[-1] == list(lessor.pinned)
    finally:
        client.close()


def test_the_manual_swap_pins_later_requests_to_its_first_grant(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=2, gpu_memory="1GiB")
    client = Client(target=assigner.target, token=None, worker="manual-pinned")
    listener = enable_swap("cpu", client)
    weights = torch.ones(1000)
    try:

        def acquire() -> tuple[int, ...]:
            return client.allocate(label="phase").gpu_indices

        check_pinned_to_first_grant(
            assigner, acquire, lambda: client.release(client.held[-1]), "manual-pinned"
        )
        assert listener.engine.state is SwapState.RESIDENT
        assert weights.sum().item() == 1000.0
        assert listener.pinned is not None
        with pytest.raises(InvalidGpuRequest, match="bound to"):
            client.allocate(required_gpus=[1 - listener.pinned[0]])
    finally:
        client.close()
