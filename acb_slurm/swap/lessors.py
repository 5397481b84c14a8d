"""Where automatic mode gets its leases: the node's assigner (`ClientLessor`) or nowhere
(`LocalLessor`, grants at once)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from acb_slurm.swap.auto import AutoSwap, SwapLease

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from acb_slurm.client import Client, LeaseLost
    from acb_slurm.client import Lease as ClientLease


class ClientLessor:
    """Leases from the node's assigner through a `Client`; yield requests reach `AutoSwap`.

    The process is bound to the GPUs of its first grant (a storage keeps its device, so swapped
    state can only come back there): every later request is pinned to that grant's
    `gpu_indices` (`required_gpus`, `gpus` their number) and waits for exactly those GPUs."""

    def __init__(
        self,
        client: Client,
        *,
        gpus: int = 1,
        memory_bytes: int = 0,
        priority: int = 0,
        label: str = "auto",
    ):
        self.client = client
        self.gpus = gpus
        self.memory_bytes = memory_bytes
        self.priority = priority
        self.label = label
        self._held: dict[str, ClientLease] = {}
        #: The first grant's GPU indices, once granted: what every later request asks for.
        self.pinned: tuple[int, ...] | None = None

    def attach(self, auto: AutoSwap) -> None:
        """Route the session's YieldRequests to `auto` (a safe point will honour them), and
        its lost leases (`AutoSwap.lease_lost`: holding, the program stops)."""
        from acb_slurm.client import LeaseListener

        class _Yields(LeaseListener):
            def on_yield_request(self, client: Client, lease_id: str, reason: str) -> None:
                auto.request_yield(lease_id, reason)

            def on_lease_lost(self, client: Client, lease: ClientLease, error: LeaseLost) -> None:
                auto.lease_lost(lease.lease_id, error.reason)

        self.client.add_listener(_Yields())

    def acquire(self) -> SwapLease:
        pinned = self.pinned
        granted = self.client.allocate(
            gpus=self.gpus if pinned is None else len(pinned),
            memory=self.memory_bytes,
            priority=self.priority,
            label=self.label,
            required_gpus=pinned,
        )
        if pinned is None:
            self.pinned = granted.gpu_indices
        self._held[granted.lease_id] = granted
        return SwapLease(granted.lease_id, granted.device_ids)

    def release(self, lease: SwapLease, *, yielded: bool = False) -> None:
        """Give `lease` back. One that was lost meanwhile (its session ended) is only
        forgotten: nothing is left to give back, and automatic mode releases only after the
        state reached host memory."""
        from acb_slurm.client import LeaseLost

        held = self._held.pop(lease.lease_id, None)
        try:
            self.client.release(held or lease.lease_id)
        except LeaseLost as exc:
            log.warning("lease %s was lost before its release (%s)", lease.lease_id, exc.reason)
            return
        if yielded:
            self.client.yield_done(lease.lease_id)

    def report_usage(self, lease: SwapLease, resident_bytes: int) -> None:
        self.client.report_usage(lease.lease_id, resident_bytes)

    def abandon(self) -> None:
        """End the session after a failed release: the assigner releases every lease the
        session held (it sees the stream close), and the next acquire opens a new session
        (still pinned: the swapped state is bound to the same GPUs)."""
        self._held.clear()
        self.client.end_session()


class LocalLessor:
    """Grants at once, with no assigner: automatic mode's swapping alone (benchmarks, hook tests,
    a run outside any allocation). Counts what it was asked."""

    def __init__(self, device_ids: tuple[str, ...] = ()):
        self.device_ids = device_ids
        self.acquired = 0
        self.released = 0
        self.yielded = 0
        self.usage: list[int] = []
        self._next = 0

    def acquire(self) -> SwapLease:
        self._next += 1
        self.acquired += 1
        return SwapLease(f"local-{self._next}", self.device_ids)

    def release(self, lease: SwapLease, *, yielded: bool = False) -> None:
        self.released += 1
        self.yielded += int(yielded)

    def report_usage(self, lease: SwapLease, resident_bytes: int) -> None:
        self.usage.append(resident_bytes)

    def abandon(self) -> None:
        """Nothing to end: no session."""
