"""GPU leases for `gate` stages, through the client's manual API.

The worker process holds the client session (one per process); a gate stage's lease lives
exactly while its command runs, and dies with the worker if the worker is killed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol


class HeldLease(Protocol):
    """A granted lease: the device ids to export, and how to give it back."""

    @property
    def device_ids(self) -> Sequence[str]: ...

    @property
    def waited_s(self) -> float: ...

    def release(self) -> None: ...

    def on_lost(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call `callback(reason)` (on another thread) if the lease is lost while held, or at
        once if it already was; returns the function that unregisters it."""
        ...


class LeaseProvider(Protocol):
    """Where leases come from (the node's assigner, through the client library)."""

    def acquire(self, *, gpus: int, memory_bytes: int, priority: int, label: str) -> HeldLease: ...


class _ClientLease:
    def __init__(self, lease: Any, waited_s: float) -> None:
        self._lease = lease
        self._waited_s = waited_s

    @property
    def device_ids(self) -> Sequence[str]:
        """The lease's device ids as strings."""
        return tuple(str(d) for d in self._lease.device_ids)

    @property
    def waited_s(self) -> float:
        """Queueing time measured by the assigner."""
        return self._waited_s

    def release(self) -> None:
        """Release through the process's client session."""
        from acb_slurm.client import manual

        manual.on_device_end(self._lease)

    def on_lost(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Through the client's `on_lease_lost` (runs on its session thread)."""
        from acb_slurm.client.errors import LeaseLost
        from acb_slurm.client.session import default_client

        client = default_client()

        def lost(lease: Any, error: LeaseLost) -> None:
            if lease.lease_id == self._lease.lease_id:
                callback(error.reason or str(error))

        client.on_lease_lost(lost)
        try:
            client.check_lease(self._lease)  # lost before the callback was there?
        except LeaseLost as exc:
            callback(exc.reason or str(exc))
        return lambda: client.remove_lease_lost_callback(lost)


class ClientLeaseProvider:
    """Leases from `acb_slurm.client.manual` (the node's assigner named by ACB_ASSIGNER)."""

    def acquire(self, *, gpus: int, memory_bytes: int, priority: int, label: str) -> HeldLease:
        """One lease per call through `on_device_begin` (blocks while queued)."""
        import time

        from acb_slurm.client import manual

        started = time.monotonic()
        lease = manual.on_device_begin(
            gpus=gpus, memory=memory_bytes, priority=priority, label=label
        )
        waited = getattr(lease, "waited_seconds", None)
        if waited is None:
            waited = time.monotonic() - started
        return _ClientLease(lease, float(waited))
