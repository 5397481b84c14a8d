"""The manual API with swapping: ``on_device_end()`` offloads the device state, the next
``on_device_begin()`` brings it back, so a process keeps its tensors between GPU phases.

    from acb_slurm.swap.manual import enable_swap
    enable_swap()                     # once, after importing torch
    with on_device():                 # acquire, then onload (nothing to do the first time)
        train_some()
    cpu_phase()                       # storages live in host memory meanwhile
"""

from __future__ import annotations

import logging

from acb_slurm.client import Client, LeaseListener, default_client
from acb_slurm.client import Lease as ClientLease
from acb_slurm.swap.engine import SwapEngine, SwapState

log = logging.getLogger(__name__)


class SwapOnRelease(LeaseListener):
    """Offload before the last held lease goes back; onload after a grant."""

    def __init__(self, engine: SwapEngine):
        self.engine = engine

    def on_granted(self, client: Client, lease: ClientLease) -> None:
        if self.engine.state is SwapState.OFFLOADED:
            stats = self.engine.onload()
            log.info("%s", stats)
        client.report_usage(lease, self.engine.resident_bytes())

    def before_release(self, client: Client, lease: ClientLease) -> None:
        others = [held for held in client.held if held.lease_id != lease.lease_id]
        if others or self.engine.state is SwapState.OFFLOADED:
            return  # the device is still in use under another lease
        # A failure raises here; the client still releases, with the data intact on the device.
        stats = self.engine.offload()
        log.info("%s", stats)


def enable_swap(device: str = "cuda", client: Client | None = None) -> SwapOnRelease:
    """Make the manual API of `client` (default: this process's) swap on end and begin."""
    listener = SwapOnRelease(SwapEngine(device))
    (client or default_client()).add_listener(listener)
    return listener
