"""The client library: a process's session with its assigner and the manual API.

The names are loaded on first use, so that importing the errors (``acb-run`` does, to report
them) does not import gRPC and the generated protobuf code (about 60 ms).
"""

from __future__ import annotations

import gc
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from acb_slurm.client.errors import (
        AssignerError,
        AssignerNotConfigured,
        AssignerUnavailable,
        GangAborted,
        GrantImpossible,
        InvalidGpuRequest,
        LeaseLost,
        LeaseNotHeld,
        SessionLost,
        Unauthenticated,
    )
    from acb_slurm.client.manual import on_device, on_device_begin, on_device_end, on_lease_lost
    from acb_slurm.client.session import (
        Client,
        GangLease,
        Lease,
        LeaseListener,
        default_client,
        set_default_client,
    )

#: Exported name -> the submodule that defines it.
_EXPORTS = {
    "AssignerError": "errors",
    "AssignerNotConfigured": "errors",
    "AssignerUnavailable": "errors",
    "GangAborted": "errors",
    "GrantImpossible": "errors",
    "InvalidGpuRequest": "errors",
    "LeaseLost": "errors",
    "LeaseNotHeld": "errors",
    "SessionLost": "errors",
    "Unauthenticated": "errors",
    "on_device": "manual",
    "on_device_begin": "manual",
    "on_device_end": "manual",
    "on_lease_lost": "manual",
    "Client": "session",
    "GangLease": "session",
    "Lease": "session",
    "LeaseListener": "session",
    "default_client": "session",
    "set_default_client": "session",
}

__all__ = [
    "AssignerError",
    "AssignerNotConfigured",
    "AssignerUnavailable",
    "Client",
    "GangAborted",
    "GangLease",
    "GrantImpossible",
    "InvalidGpuRequest",
    "Lease",
    "LeaseListener",
    "LeaseLost",
    "LeaseNotHeld",
    "SessionLost",
    "Unauthenticated",
    "default_client",
    "on_device",
    "on_device_begin",
    "on_device_end",
    "on_lease_lost",
    "set_default_client",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_load(module), name)
    globals()[name] = value  # later lookups do not come here
    return value


def _load(module: str) -> Any:
    """Import a submodule with the cyclic garbage collector paused. Importing gRPC and protobuf
    allocates enough to trigger a full collection, and in a program that has imported torch
    (automatic mode loads the client just then) that walks some 170k objects: 50-120 ms spent
    finding nothing to free. The collection comes back with the program's own allocations."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return importlib.import_module(f"{__name__}.{module}")
    finally:
        if enabled:
            gc.enable()


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
