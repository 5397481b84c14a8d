"""Automatic mode in this process on device `cpu`: hooks, idle detection, yields, the lock.

Leases come from `LocalLessor` (grants at once) so that what is tested is the swapping; the
assigner is exercised by test_auto_launcher.py with real processes.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from acb_slurm.swap.auto import AutoSwap, Phase
from acb_slurm.swap.engine import SwapState
from acb_slurm.swap.lessors import LocalLessor

IDLE_MS = 300  # generous: a loaded machine can stall a thread for tens of ms


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Liveness bound only: the watchdog acts within a few idle intervals on a loaded machine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def lessor() -> LocalLessor:
    return LocalLessor()


@pytest.fixture
def auto(lessor: LocalLessor) -> Iterator[AutoSwap]:
    swap = AutoSwap(lessor, device="cpu", idle_ms=IDLE_MS)
    swap.install()
    try:
        yield swap
    finally:
        swap.uninstall()


def test_idle_program_gives_the_device_back_and_gets_it_again_on_next_use(
    auto: AutoSwap, lessor: LocalLessor
) -> None:
    weights = torch.randn(64, 64)
    expected = (weights @ weights).sum().item()
    assert auto.holding and lessor.acquired == 1

    assert wait_until(lambda: auto.phase is Phase.AWAY), "the watchdog never noticed idleness"
    assert lessor.released == 1
    assert auto.engine.state is SwapState.OFFLOADED
    # The storage is away: read its size without a torch call (the mode would onload first).
    assert auto.engine.offloaded_bytes >= 64 * 64 * 4

    again = (weights @ weights).sum().item()  # the next device call acquires and onloads
    assert again == expected
    assert lessor.acquired == 2 and auto.phase is Phase.HOLDING
    assert lessor.usage and lessor.usage[-1] >= 64 * 64 * 4


def test_yield_while_idle_is_done_by_the_watchdog(auto: AutoSwap, lessor: LocalLessor) -> None:
    auto.idle_s = 3600.0  # only the yield may release
    x = torch.ones(1000)
    lease = auto._lease
    assert lease is not None
    auto.request_yield(lease.lease_id, "priority")
    assert wait_until(lambda: lessor.yielded == 1)
    assert not auto.holding and auto.stats.yields == 1
    assert x.sum().item() == 1000.0
    assert lessor.acquired == 2


def test_yield_while_busy_is_done_at_the_next_call(auto: AutoSwap, lessor: LocalLessor) -> None:
    auto.idle_s = 3600.0
    x = torch.zeros(100)
    with auto.lock:  # the program is inside a call: the watchdog cannot act
        lease = auto._lease
        assert lease is not None
        auto.request_yield(lease.lease_id, "fairness")
        time.sleep(5 * IDLE_MS / 1000)
        assert lessor.yielded == 0
    x.add_(1)  # next safe point: offload, release, acquire again, onload, then the call
    assert lessor.yielded == 1 and lessor.acquired == 2
    assert auto.holding and x.sum().item() == 100.0


def test_a_yield_for_a_lease_no_longer_held_is_ignored(auto: AutoSwap, lessor: LocalLessor) -> None:
    auto.idle_s = 3600.0
    torch.zeros(1)
    auto.request_yield("some-old-lease", "late")
    torch.zeros(1)
    assert lessor.yielded == 0 and lessor.acquired == 1


def test_no_call_runs_while_its_storage_is_away() -> None:
    """Swap-outs from another thread, as often as it can, interleaved with the program's calls:
    the result equals a run without them, and every call saw its storage resident."""

    def compute(steps: int) -> torch.Tensor:
        torch.manual_seed(7)
        state = torch.randn(256)
        for i in range(steps):
            state = torch.tanh(state * 1.01 + i * 1e-3)
        return state

    expected = compute(3000)
    lessor = LocalLessor()
    auto = AutoSwap(lessor, device="cpu", idle_ms=3_600_000)
    auto.install()
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:  # each swap walks every object of the process: keep them few
        nonlocal swaps
        while not stop.is_set() and swaps < 20:
            auto.swap_out("test")
            swaps += 1
            time.sleep(0.005)

    thread = threading.Thread(target=swapper)
    try:
        thread.start()
        got = compute(3000)
    finally:
        stop.set()
        thread.join()
        auto.uninstall()
    assert torch.equal(got, expected)
    assert lessor.released >= 1, "the swapper never got between two calls"
    assert lessor.acquired == lessor.released


def test_cpu_work_does_not_take_a_cuda_lease() -> None:
    """Under the cuda device, calls on CPU tensors are CPU phases: no lease is asked for."""
    lessor = LocalLessor()
    auto = AutoSwap(lessor, device="cuda", idle_ms=IDLE_MS)
    auto.install()
    try:
        x = torch.randn(128, 128)
        y = (x @ x).relu().sum(dim=0)
        _ = y.numpy().sum(), x.shape, x.to("cpu")
    finally:
        auto.uninstall()
    assert lessor.acquired == 0


@pytest.mark.parametrize(
    ("call", "touches"),
    [
        (lambda: (torch.add, (torch.ones(1), 1), {}), False),
        (lambda: (torch.Tensor.to, (torch.ones(1), "cuda"), {}), True),
        (lambda: (torch.Tensor.to, (torch.ones(1),), {"device": torch.device("cuda", 1)}), True),
        (lambda: (torch.zeros, (3,), {"device": "cuda:0"}), True),
        (lambda: (torch.zeros, (3,), {"device": "cpu"}), False),
        (lambda: (torch.cat, ([torch.ones(1), torch.ones(1)],), {}), False),
        (lambda: (torch.Tensor.cuda, (torch.ones(1),), {}), True),
    ],
    ids=["cpu-op", "to-cuda", "to-cuda-kwarg", "factory-cuda", "factory-cpu", "cat-cpu", "cuda()"],
)
def test_which_calls_touch_a_cuda_device(
    call: Callable[[], tuple[Callable[..., object], tuple[object, ...], dict[str, object]]],
    touches: bool,
) -> None:
    auto = AutoSwap(LocalLessor(), device="cuda")
    func, args, kwargs = call()
    assert auto._touches(func, args, kwargs) is touches


def test_torch_save_while_away_brings_the_state_back(auto: AutoSwap) -> None:
    x = torch.arange(1000, dtype=torch.float64)
    assert wait_until(lambda: auto.phase is Phase.AWAY)
    buffer = io.BytesIO()
    torch.save(x, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), torch.arange(1000, dtype=torch.float64))


def test_uninstall_restores_the_storages_and_releases(lessor: LocalLessor) -> None:
    auto = AutoSwap(lessor, device="cpu", idle_ms=IDLE_MS)
    auto.install()
    x = torch.full((500,), 3.0)
    assert wait_until(lambda: auto.phase is Phase.AWAY)
    auto.uninstall()
    assert auto.engine.state is SwapState.RESIDENT
    assert x.untyped_storage().nbytes() == 2000 and x.sum().item() == 1500.0
    assert lessor.acquired == lessor.released == 1


def test_a_forked_child_passes_its_calls_through(auto: AutoSwap, lessor: LocalLessor) -> None:
    """DataLoader workers are forked with the mode on their stack: no lease, no swap, no hang."""
    data = torch.randn(100)
    assert lessor.acquired == 1
    assert wait_until(lambda: auto.phase is Phase.AWAY)
    pid = os.fork()
    if pid == 0:  # the child: torch calls must run at once, without asking for a lease
        ok = False
        try:
            ok = torch.ones(3).sum().item() == 3.0 and not auto.holding and data.numel() == 100
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lessor.acquired == 1, "the child must not have taken a lease in the parent's name"
