"""Automatic mode in this process with the real client against a real acb-assigner."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.client import Client
from acb_slurm.swap.auto import AutoSwap, Phase
from acb_slurm.swap.engine import SwapState
from acb_slurm.swap.lessors import ClientLessor
from acb_slurm.swap.manual import enable_swap

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
