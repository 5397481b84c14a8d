"""The seam below automatic mode: how a process's device memory is moved away and back.

A backend moves *all* of the process's state on one device (type or index) to host memory and
back, keeping the program's objects valid. Automatic mode and the manual API drive it through
`SwapBackend` only, and pick one by name from `BACKENDS`:

- ``storage`` (`acb_slurm.swap.engine.SwapEngine`): copies each tensor storage out and frees it
  with ``resize_(0)``. Stock allocators, every device type, so CI runs it on ``cpu``.
- An allocator-level backend for CUDA (a pluggable allocator or a CUDA virtual-memory arena that
  unmaps physical pages and keeps virtual addresses, as ``torch_memory_saver`` and vLLM's
  ``CuMemAllocator`` do) registers here under its own name; it is measured on a GPU first.

Contract: `offload` and `onload` either complete or raise `SwapError` with the data where it
was; `offload` warns `SwapWarning` (once per kind of object) for bytes it must leave in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from acb_slurm.swap.engine import SwapState, SwapStats


class SwapBackend(Protocol):
    """What automatic mode needs from a memory mechanism."""

    device: torch.device

    @property
    def state(self) -> SwapState:
        """RESIDENT or OFFLOADED."""
        ...

    def offload(self) -> SwapStats:
        """Move the device state to host memory and free the device memory."""
        ...

    def onload(self) -> SwapStats:
        """Bring the device state back."""
        ...

    def resident_bytes(self) -> int:
        """Device bytes the process holds now (for usage reports)."""
        ...

    def close(self) -> None:
        """Give back host buffers (while resident)."""
        ...


def _storage(device: str, **options: Any) -> SwapBackend:
    from acb_slurm.swap.engine import SwapEngine

    return SwapEngine(device, **options)


#: Backends by name; `create_backend` is the one way to make one.
BACKENDS: dict[str, Callable[..., SwapBackend]] = {"storage": _storage}
DEFAULT_BACKEND = "storage"


def register_backend(name: str, factory: Callable[..., SwapBackend]) -> None:
    """Add a backend; a name can be registered once."""
    if name in BACKENDS:
        raise ValueError(f"swap backend {name!r} is already registered")
    BACKENDS[name] = factory


def create_backend(name: str, device: str, **options: Any) -> SwapBackend:
    """The backend `name` for `device`; an unknown name is answered with the known ones."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ValueError(f"unknown swap backend {name!r}; known: {known}") from None
    return factory(device, **options)
