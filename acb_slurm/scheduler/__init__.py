"""The pure scheduler core: who gets which GPU next. No I/O, no clocks, no threads.

The assigner daemon turns client calls into calls on a `Scheduler` and commits the grants it
returns; the event log replays into one (`acb_slurm.scheduler.replay`).
"""

from __future__ import annotations

from acb_slurm.scheduler.core import Scheduler
from acb_slurm.scheduler.gang import GangPlanner, GangRequest, LocalRequest, PoolGrant
from acb_slurm.scheduler.policies import (
    GpuAffinity,
    GpuSharing,
    GpuSharingPack,
    Policy,
    PolicyView,
    Simple,
    available_policies,
    get_policy,
    register_policy,
)
from acb_slurm.scheduler.replay import ReplayMismatch, replay
from acb_slurm.scheduler.types import (
    Gpu,
    Grant,
    Infeasible,
    InvalidRequest,
    Request,
    SchedulerError,
    UnknownPolicy,
    UnknownRequest,
)

__all__ = [
    "GangPlanner",
    "GangRequest",
    "Gpu",
    "GpuAffinity",
    "GpuSharing",
    "GpuSharingPack",
    "Grant",
    "Infeasible",
    "InvalidRequest",
    "LocalRequest",
    "Policy",
    "PolicyView",
    "PoolGrant",
    "ReplayMismatch",
    "Request",
    "Scheduler",
    "SchedulerError",
    "Simple",
    "UnknownPolicy",
    "UnknownRequest",
    "available_policies",
    "get_policy",
    "register_policy",
    "replay",
]
