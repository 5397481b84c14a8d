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
from pathlib import Path

import pytest
import torch

from acb_slurm.swap.auto import AutoSwap, Phase, SwapLease
from acb_slurm.swap.engine import SwapEngine, SwapError, SwapState, SwapStats
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


class ThreadRecordingLessor(LocalLessor):
    """Grants at once and records which thread released (the program's or the watchdog)."""

    def __init__(self) -> None:
        super().__init__()
        self.released_by: list[str] = []

    def release(self, lease: SwapLease, *, yielded: bool = False) -> None:
        self.released_by.append(threading.current_thread().name)
        super().release(lease, yielded=yielded)


def test_a_yield_while_a_call_is_in_flight_waits_for_it_to_end() -> None:
    lessor = ThreadRecordingLessor()
    auto = AutoSwap(lessor, device="cpu", idle_ms=3_600_000)
    auto.install()
    try:
        x = torch.zeros(100)
        # A call in flight (hold(), as torch.save is held): neither the watchdog nor a nested
        # call may offload under it, however long it lasts.
        with auto.hold():
            lease = auto._lease
            assert lease is not None
            auto.request_yield(lease.lease_id, "fairness")
            time.sleep(0.2)
            x.add_(1)  # nested: not a safe point
            assert lessor.yielded == 0 and auto.holding
        # The outermost call ended: the yield is honoured (by the watchdog, woken for it, or by
        # the next call), then the next call acquires again.
        assert wait_until(lambda: lessor.yielded == 1)
        assert x.sum().item() == 100.0
        assert lessor.acquired == 2 and auto.holding
    finally:
        auto.uninstall()


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
    # Bringing the state back needs the device: a lease is taken for it, then given back.
    assert lessor.acquired == lessor.released == 2


def test_a_forked_child_passes_its_calls_through(auto: AutoSwap, lessor: LocalLessor) -> None:
    """DataLoader workers are forked with the mode on their stack: no lease, no swap, no hang."""
    data = torch.randn(100)
    assert lessor.acquired == 1
    assert wait_until(lambda: auto.phase is Phase.AWAY)
    pid = os.fork()
    if pid == 0:  # the child: torch calls must run at once, without asking for a lease
        code = 1
        try:
            ok = torch.ones(3).sum().item() == 3.0 and data.numel() == 100
            buffer = io.BytesIO()
            torch.save({"x": torch.arange(5)}, buffer)  # wrapped entry points pass through too
            buffer.seek(0)
            ok = ok and torch.equal(torch.load(buffer)["x"], torch.arange(5))
            with auto.hold():
                pass
            # Nothing was acquired or onloaded in the child (the counters are the child's copy).
            ok = ok and lessor.acquired == 1 and not auto.holding and not auto._slow
            ok = ok and auto.engine.state is SwapState.OFFLOADED
            code = 0 if ok else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lessor.acquired == 1, "the child must not have taken a lease in the parent's name"


def test_reading_metadata_does_not_take_the_device(auto: AutoSwap, lessor: LocalLessor) -> None:
    weights = torch.randn(8, 4, requires_grad=True)
    weights.sum().backward()
    assert wait_until(lambda: auto.phase is Phase.AWAY)
    seen = (
        weights.shape, weights.dtype, weights.device, weights.grad, weights.size(), weights.dim(),
        weights.numel(), len(weights), weights.requires_grad, weights.ndim, weights.is_leaf,
        weights.stride(), weights.layout, weights.is_contiguous(), weights.element_size(),
    )  # fmt: skip
    assert seen[0] == (8, 4) and seen[6] == 32
    assert lessor.acquired == 1 and auto.phase is Phase.AWAY, "metadata took the device"
    assert weights.sum().item() != 0  # a real read does take it
    assert lessor.acquired == 2


def test_load_and_save_take_the_device_only_when_they_touch_it(tmp_path: Path) -> None:
    """Managed device cuda, CPU tensors only (this machine): a checkpoint of CPU tensors loaded
    to the CPU or saved is no device use; a load that may land on the GPU is."""
    lessor = LocalLessor()
    auto = AutoSwap(lessor, device="cuda", idle_ms=3_600_000)
    auto.install()
    try:
        path = tmp_path / "ckpt.pt"
        torch.save({"w": torch.ones(4), "step": 3, "nested": [(torch.zeros(2), "a")]}, path)
        assert lessor.acquired == 0
        for location in ("cpu", torch.device("cpu"), {"cuda:0": "cpu"}):
            assert torch.load(path, map_location=location)["step"] == 3
        assert lessor.acquired == 0
        assert torch.load(path, None)["step"] == 3  # no map_location: it may land on cuda
        assert lessor.acquired == 1
        for location in (None, "cuda", "cuda:0", 0, torch.device("cuda"), {"cpu": "cuda:0"}):
            assert auto._load_needs_device((path,), {"map_location": location}), location
        assert auto._load_needs_device((path, lambda storage, where: storage), {})
        assert not auto._load_needs_device((path, "cpu"), {})
    finally:
        auto.uninstall()


def test_save_takes_the_managed_device_only_for_its_tensors(
    auto: AutoSwap, lessor: LocalLessor
) -> None:
    weights = torch.arange(10.0)
    assert wait_until(lambda: auto.phase is Phase.AWAY)
    buffer = io.BytesIO()
    torch.save({"step": 3, "names": ["a", "b"], "dtype": torch.float32}, buffer)
    assert lessor.acquired == 1 and auto.phase is Phase.AWAY
    torch.save({"state": [{"w": weights}]}, buffer)  # a nested tensor on the managed device
    assert lessor.acquired == 2


@pytest.mark.parametrize(
    ("call", "touches"),
    [
        (lambda: (torch.zeros, (3,), {"device": 0}), True),
        (lambda: (torch.Tensor.to, (torch.ones(1), 0), {}), True),
        (lambda: (torch.Tensor.to, (torch.ones(1), 0, torch.float16), {}), True),
        (lambda: (torch.add, (torch.ones(1), 1), {}), False),
        (lambda: (torch.Tensor.to, (torch.ones(1), torch.float16), {}), False),
        (lambda: (torch.Tensor.to, (torch.ones(1),), {"device": 1}), True),
        (lambda: (torch.cat, ([torch.ones(1)],), {"dim": 0}), False),
        (lambda: (torch.tensor, ([1.0],), {"device": "cuda"}), True),
        (lambda: (torch.nn.functional.pad, (torch.ones(2), [1, 1]), {}), False),
    ],
    ids=[
        "factory-ordinal", "to-ordinal", "to-ordinal-dtype", "add-int", "to-dtype",
        "to-ordinal-kwarg", "cat-dim", "tensor-cuda", "pad-ints",
    ],
)  # fmt: skip
def test_integer_ordinals_are_cuda_devices_only_where_a_device_is_expected(
    call: Callable[[], tuple[Callable[..., object], tuple[object, ...], dict[str, object]]],
    touches: bool,
) -> None:
    auto = AutoSwap(LocalLessor(), device="cuda")
    func, args, kwargs = call()
    assert auto._touches(func, args, kwargs) is touches


def test_tensors_in_nested_containers_are_seen() -> None:
    """Managed device cpu here; the scan is the same for cuda."""
    auto = AutoSwap(LocalLessor(), device="cpu")
    nested = ([[torch.ones(1)], [torch.ones(1)]],)
    assert auto._touches(torch.Tensor.add, (torch.empty(0, device="meta"), *nested), {})
    assert auto._touches(torch.Tensor.add, (torch.empty(0, device="meta"),), {"x": {"a": [
        torch.ones(1)]}})  # fmt: skip
    on_cuda = AutoSwap(LocalLessor(), device="cuda")
    assert not on_cuda._touches(torch.cat, nested, {})  # CPU tensors deep down: no factory


class RefusingEngine(SwapEngine):
    """The engine refusing every offload, as it does while CUDA graph pools exist."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.refused = 0

    def offload(self) -> SwapStats:
        self.refused += 1
        raise SwapError("refused (test)")


def test_a_refused_swap_out_keeps_the_lease_and_is_retried_with_backoff() -> None:
    lessor = LocalLessor()
    engine = RefusingEngine()
    auto = AutoSwap(lessor, device="cpu", idle_ms=40, engine=engine)
    auto.install()
    try:
        x = torch.ones(10)
        time.sleep(3.0)
        refused = engine.refused
        assert auto.holding and lessor.released == 0 and auto.phase is Phase.HOLDING
        assert x.sum().item() == 10.0
    finally:
        auto.engine = SwapEngine("cpu")
        auto.uninstall()
    # Without backoff: one try every idle/4 = 10 ms, ~300 in 3 s. With it: 10, 20, 40, ... ms.
    assert 2 <= refused <= 12, refused
    assert auto.stats.failed_swaps == refused


def test_compiled_callables_run_under_the_lock(auto: AutoSwap, lessor: LocalLessor) -> None:
    """What torch.compile returns is held for the whole call: the watchdog cannot offload in
    the middle of one (dynamo does not show the calls inside to the mode one by one)."""
    inside: list[bool] = []

    @torch._dynamo.disable
    def probe() -> None:  # runs as plain Python between two compiled pieces
        inside.append(auto.busy)

    def step(x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        probe()
        return y * 2

    compiled = torch.compile(step, backend="eager")
    module = torch.compile(torch.nn.Linear(4, 4), backend="eager")
    x = torch.ones(4)
    assert wait_until(lambda: auto.phase is Phase.AWAY)
    assert torch.equal(compiled(x), torch.tanh(torch.ones(4)) * 2)
    assert inside == [True] and lessor.acquired == 2
    assert getattr(type(module).__call__, "_acb_held", False)
    assert module(x).shape == (4,)


# ---- threads, defaults, serialisation ----------------------------------------------------------


def test_a_thread_started_after_installation_is_seen_and_never_swapped_under(
    auto: AutoSwap, lessor: LocalLessor
) -> None:
    """The worker computes with pauses shorter than the idle interval while the installing
    thread sleeps: its calls are device use, so nothing is offloaded until it stops."""
    shared = torch.zeros(1000)
    offloads_before = lessor.released

    def work() -> None:
        for _ in range(40):
            shared.add_(1.0)
            time.sleep(IDLE_MS / 1000 / 10)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert lessor.released == offloads_before, "offloaded while the worker computed"
    assert shared.sum().item() == 40_000.0
    assert wait_until(lambda: auto.phase is Phase.AWAY)  # idle once it stopped


def test_a_thread_from_before_installation_blocks_offload_and_is_named_once(
    lessor: LocalLessor, caplog: pytest.LogCaptureFixture
) -> None:
    go, done = threading.Event(), threading.Event()
    old = threading.Thread(target=lambda: (go.wait(), done.wait()), name="early-bird")
    old.start()
    auto = AutoSwap(lessor, device="cpu", idle_ms=50)
    auto.install()
    try:
        x = torch.ones(100)
        go.set()
        time.sleep(1.0)
        assert lessor.released == 0 and auto.holding, "offloaded with an unseen thread alive"
        said = [r for r in caplog.records if "early-bird" in r.getMessage()]
        assert len([r for r in said if r.levelname == "WARNING"]) == 1
        done.set()
        old.join()
        assert wait_until(lambda: auto.phase is Phase.AWAY)  # the thread is gone: offload
        assert x.sum().item() == 100.0
    finally:
        done.set()
        auto.uninstall()


def test_a_factory_with_device_none_lands_on_the_default_device() -> None:
    """nn.Module constructors call torch.empty(..., device=None): that is the default device."""
    auto = AutoSwap(LocalLessor(), device="meta")
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        assert auto._touches(torch.empty, ((3, 3),), {"device": None, "dtype": None})
    finally:
        torch.set_default_device(previous)
    assert not auto._touches(torch.empty, ((3, 3),), {"device": None})


class _SlowFile(io.BytesIO):
    def write(self, data: bytes) -> int:  # type: ignore[override]
        time.sleep(0.05)
        return super().write(data)


class _Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(64.0))
        self.plain = torch.arange(256.0)  # not a parameter, not a buffer


def test_torch_save_of_a_plain_attribute_is_whole_even_while_offloads_are_due(
    auto: AutoSwap,
) -> None:
    auto.idle_s = 0.02  # far shorter than the save
    holder = _Holder()
    assert wait_until(lambda: auto.phase is Phase.AWAY)
    out = _SlowFile()
    torch.save(holder, out)
    out.seek(0)
    loaded = torch.load(out, weights_only=False)
    assert torch.equal(loaded.plain, torch.arange(256.0))
    assert torch.equal(loaded.weight.detach(), torch.arange(64.0))
