"""The manual API with swapping: ``on_device_end()`` offloads the device state, the next
``on_device_begin()`` brings it back, so a process keeps its tensors between GPU phases.

    from acb_slurm.swap.manual import enable_swap
    enable_swap()                     # once, after importing torch
    with on_device():                 # acquire, then onload (nothing to do the first time)
        train_some()
    cpu_phase()                       # storages live in host memory meanwhile

The process is bound to the GPUs of its first grant (a storage keeps its device): from then on
every ``on_device_begin()`` of the client is pinned to that grant's ``gpu_indices``
(``required_gpus``, through `LeaseListener.required_gpus`) and waits for exactly those GPUs.

A failed offload follows the rule of automatic mode: the lease is kept and the error
(`SwapError`) is raised from ``on_device_end()``; the data stays intact on the device the
program still holds, and ``on_device_end()`` can be called again later.

Resident bytes are reported after a grant: ``torch.cuda.memory_reserved()`` on CUDA (no walk);
on ``cpu`` an object walk, at most once per `report_s`.
"""

from __future__ import annotations

import logging
import time

import torch

from acb_slurm.client import Client, LeaseListener, default_client
from acb_slurm.client import Lease as ClientLease
from acb_slurm.swap.auto import DEFAULT_REPORT_S
from acb_slurm.swap.engine import SwapEngine, SwapError, SwapState

log = logging.getLogger(__name__)


class SwapOnRelease(LeaseListener):
    """Offload before the last held lease goes back; onload after a grant."""

    def __init__(self, engine: SwapEngine, report_s: float = DEFAULT_REPORT_S):
        self.engine = engine
        self.report_s = report_s
        self.walks = 0  # object walks made for usage reports (cpu only)
        self._next_report = 0.0
        #: The first grant's GPU indices: every later request of the client is pinned to them.
        self.pinned: tuple[int, ...] | None = None

    def required_gpus(self, client: Client) -> tuple[int, ...] | None:
        return self.pinned

    def on_granted(self, client: Client, lease: ClientLease) -> None:
        if self.pinned is None:
            self.pinned = lease.gpu_indices
        if self.engine.state is SwapState.OFFLOADED:
            stats = self.engine.onload()
            log.info("%s", stats)
        resident = self._resident_bytes()
        if resident is not None:
            client.report_usage(lease, resident)

    def _resident_bytes(self) -> int | None:
        """What to report now, or None when no report is due (cpu: a walk costs tens of ms)."""
        if self.engine.device.type == "cuda":
            return int(torch.cuda.memory_reserved()) if torch.cuda.is_initialized() else 0
        now = time.monotonic()
        if now < self._next_report:
            return None
        self._next_report = now + self.report_s
        self.walks += 1
        return self.engine.resident_bytes()

    def before_release(self, client: Client, lease: ClientLease) -> None:
        others = [held for held in client.held if held.lease_id != lease.lease_id]
        if others or self.engine.state is SwapState.OFFLOADED:
            return  # the device is still in use under another lease
        try:
            stats = self.engine.offload()
        except SwapError as exc:
            log.error("cannot offload before releasing lease %s: %s", lease.lease_id, exc)
            raise  # the release must not happen: the data is still on the device
        log.info("%s", stats)


def enable_swap(
    device: str = "cuda", client: Client | None = None, *, allow_graph_pools: bool = False
) -> SwapOnRelease:
    """Make the manual API of `client` (default: this process's) swap on end and begin."""
    listener = SwapOnRelease(SwapEngine(device, allow_graph_pools=allow_graph_pools))
    (client or default_client()).add_listener(listener)
    return listener
