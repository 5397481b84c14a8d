"""The client library: a process's session with its assigner and the manual API."""

from __future__ import annotations

from acb_slurm.client.errors import (
    AssignerError,
    AssignerNotConfigured,
    AssignerUnavailable,
    GrantImpossible,
    InvalidGpuRequest,
    LeaseNotHeld,
    SessionLost,
    Unauthenticated,
)
from acb_slurm.client.manual import on_device, on_device_begin, on_device_end
from acb_slurm.client.session import (
    Client,
    Lease,
    LeaseListener,
    default_client,
    set_default_client,
)

__all__ = [
    "AssignerError",
    "AssignerNotConfigured",
    "AssignerUnavailable",
    "Client",
    "GrantImpossible",
    "InvalidGpuRequest",
    "Lease",
    "LeaseListener",
    "LeaseNotHeld",
    "SessionLost",
    "Unauthenticated",
    "default_client",
    "on_device",
    "on_device_begin",
    "on_device_end",
    "set_default_client",
]
