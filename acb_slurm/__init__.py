"""acb-slurm: within-node time-sharing of GPUs for Slurm allocations.

The manual client API lives here so that a program needs one import::

    from acb_slurm import on_device

    with on_device() as lease:      # blocks until the node's assigner grants a GPU
        run_inference(lease.device_ids)
"""

from __future__ import annotations

from typing import Any

__all__ = ["Lease", "on_device", "on_device_begin", "on_device_end"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported lazily: the daemon and the CLIs must not pay for the client (or torch).
    if name in __all__:
        from acb_slurm.client import manual

        return getattr(manual, name)
    raise AttributeError(f"module 'acb_slurm' has no attribute {name!r}")
