"""Module regions (`TorchHooks._module_region`): a module call that starts while the state is
resident runs as one call in flight, without the mode inside; otherwise it goes call by call.
The race tests offload from other threads (``swap_out`` as often as it can, and the watchdog
with a short idle interval) while program threads run module calls that read their parameters
throughout: no offload may start inside a region, and every result equals a run without
automatic mode. Real torch, managed device ``cpu``, leases from `LocalLessor`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from acb_slurm.swap.auto import AutoSwap, Phase
from acb_slurm.swap.engine import SwapEngine, SwapState, SwapStats
from acb_slurm.swap.intercept import DeviceUseMode
from acb_slurm.swap.lessors import LocalLessor


def top_mode() -> Any:
    return torch.overrides._get_current_function_mode()


class Probe(nn.Module):
    """Records, at each forward, whether the mode was on this thread's stack and how many
    calls were in flight."""

    def __init__(self, auto: AutoSwap | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))
        self.auto = auto
        self.seen: list[tuple[bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.auto._active if self.auto is not None else 0
        self.seen.append((isinstance(top_mode(), DeviceUseMode), active))
        return x * self.weight


@pytest.fixture
def auto() -> Iterator[AutoSwap]:
    swap = AutoSwap(LocalLessor(), device="cpu", idle_ms=3_600_000)
    swap.install()
    try:
        yield swap
    finally:
        swap.uninstall()


def test_a_module_call_on_resident_state_is_one_call_in_flight_without_the_mode(
    auto: AutoSwap,
) -> None:
    probe = Probe(auto)
    x = torch.ones(8)  # the first call: acquires, so the state is resident
    assert auto.phase is Phase.HOLDING and not auto._slow
    calls = auto._calls
    out = probe(x)
    assert auto._calls == calls + 2  # started and ended: the watchdog sees activity
    assert probe.seen == [(False, 1)]  # no mode inside, counted in flight
    assert isinstance(top_mode(), DeviceUseMode) and auto._active == 0  # back on the stack
    assert torch.equal(out, x)


def test_a_module_call_on_state_that_is_away_or_with_a_yield_pending_goes_call_by_call(
    auto: AutoSwap,
) -> None:
    probe = Probe(auto)
    x = torch.ones(8)
    auto.swap_out("test")
    assert auto.phase is Phase.AWAY and auto.engine.state is SwapState.OFFLOADED
    assert torch.equal(probe(x), x)  # its first torch call brings the state back
    assert probe.seen == [(True, 0)]
    lease = auto._lease
    assert lease is not None and auto.phase is Phase.HOLDING
    auto.request_yield(lease.lease_id, "test")  # the watchdog sleeps an hour: still pending
    assert auto._slow
    assert torch.equal(probe(x), x)
    assert probe.seen[-1] == (True, 0)


def test_an_exception_in_a_region_puts_the_mode_back(auto: AutoSwap) -> None:
    class Failing(nn.Module):
        def forward(self) -> None:
            raise ValueError("inside")

    torch.ones(1)
    with pytest.raises(ValueError, match="inside"):
        Failing()()
    assert isinstance(top_mode(), DeviceUseMode) and auto._active == 0


def test_inner_module_calls_and_calls_under_another_mode_start_no_region(
    auto: AutoSwap,
) -> None:
    inner = Probe(auto)
    outer = nn.Sequential(inner, Probe(auto))
    x = torch.ones(8)
    outer(x)
    assert inner.seen == [(False, 1)]  # one region, the outermost call's

    class Other(TorchFunctionMode):
        def __torch_function__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            return func(*args, **(kwargs or {}))

    with Other():  # another mode on top of ours: every call goes through both, as before
        inner(x)
    assert inner.seen[-1] == (False, 0)  # Other is on top; ours is below it, counting calls


class RecordingEngine(SwapEngine):
    """Records, at each offload, how many program threads were inside a region and how many
    calls were in flight."""

    def __init__(self, auto_ref: list[AutoSwap], inside: list[int]) -> None:
        super().__init__("cpu")
        self._auto_ref, self._inside = auto_ref, inside
        self.at_offload: list[tuple[int, int]] = []

    def offload(self) -> SwapStats:
        self.at_offload.append((self._inside[0], self._auto_ref[0]._active))
        return super().offload()


class Reader(nn.Module):
    """Reads its weight again and again, pausing between reads (as a module that does host
    work between kernels): an offload in its middle would make a read fail or differ. Counts
    the calls that run as a region (no mode on the stack) and how many are inside one now; a
    call that runs call by call may see offloads between its reads (each read brings the
    state back)."""

    def __init__(self, inside: list[int], lock: threading.Lock, pause_s: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.arange(64, dtype=torch.float64))
        self.inside, self.lock, self.pause_s = inside, lock, pause_s
        self.regions = self.by_call = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = not isinstance(top_mode(), DeviceUseMode)
        with self.lock:
            self.inside[0] += region
            self.regions += region
            self.by_call += not region
        try:
            acc = x
            for _ in range(4):
                acc = acc + self.weight.sum()
                time.sleep(self.pause_s)
            return acc
        finally:
            with self.lock:
                self.inside[0] -= region


@pytest.mark.parametrize("driver", ["swap_out", "watchdog"])
def test_no_offload_starts_inside_a_region_while_other_threads_offload(driver: str) -> None:
    """Two program threads run module calls back to back (each pauses inside, between two
    reads of its weight, longer than the idle interval); the state is offloaded from another
    thread as often as it can (``swap_out``), or by the watchdog with a 5 ms idle interval
    between the module calls. No offload starts while a module call is in flight, every read
    finds the weight where it was, and offloads do happen between the module calls."""
    inside = [0]
    lock = threading.Lock()
    auto_ref: list[AutoSwap] = []
    engine = RecordingEngine(auto_ref, inside)
    idle_ms = 5 if driver == "watchdog" else 3_600_000
    auto = AutoSwap(LocalLessor(), device="cpu", idle_ms=idle_ms, engine=engine)
    auto_ref.append(auto)
    expected = torch.tensor([4 * float(sum(range(64)))], dtype=torch.float64)
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []
    auto.install()
    stop = threading.Event()
    try:
        model = Reader(inside, lock, pause_s=0.02)

        def program() -> None:
            try:
                for _ in range(12):
                    with torch.no_grad():
                        results.append(model(torch.zeros(1, dtype=torch.float64)))
                    time.sleep(0.03)  # between module calls: a gap for the offloads
            except BaseException as exc:
                errors.append(exc)

        def swapper() -> None:
            while not stop.is_set():
                auto.swap_out("test")
                time.sleep(0.002)

        workers = [threading.Thread(target=program) for _ in range(2)]
        helpers = [threading.Thread(target=swapper)] if driver == "swap_out" else []
        for thread in workers + helpers:
            thread.start()
        for thread in workers:
            thread.join()
        stop.set()
        for thread in helpers:
            thread.join()
    finally:
        stop.set()
        auto.uninstall()
    assert not errors, errors
    assert len(results) == 24 and all(torch.equal(r, expected) for r in results)
    assert engine.at_offload, "no offload happened between the module calls"
    assert all(at == (0, 0) for at in engine.at_offload), engine.at_offload
    assert model.regions > 0, "no module call ran as a region"
    assert auto.stats.acquires >= 2


def test_dynamo_builds_the_same_graphs_with_module_regions() -> None:
    """Dynamo traces through the patched ``nn.Module.__call__`` (transparent while it
    compiles): one graph, the same ops, as without automatic mode."""
    from torch._dynamo.testing import CompileCounter

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    x = torch.ones(3, 4)
    auto = AutoSwap(LocalLessor(), device="cpu", idle_ms=3_600_000)
    auto.install()
    with torch.no_grad():
        try:
            torch.ones(1)  # resident: the compiled call may start a region
            counter = CompileCounter()
            torch._dynamo.reset()
            got = torch.compile(build(), backend=counter)(x)
            with_auto = (counter.frame_count, counter.op_count)
        finally:
            auto.uninstall()
        counter = CompileCounter()
        torch._dynamo.reset()
        want = torch.compile(build(), backend=counter)(x)
        torch._dynamo.reset()
    assert with_auto == (counter.frame_count, counter.op_count) and with_auto[0] == 1
    assert torch.equal(got, want)
