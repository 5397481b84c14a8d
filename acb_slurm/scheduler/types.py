"""Plain data of the scheduler core: GPUs, requests, grants, and its errors.

The core is pure: no I/O, no clocks, no threads. The assigner daemon (the shell) turns gRPC calls
into calls on `acb_slurm.scheduler.Scheduler` and commits the grants it returns.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU of the node's inventory. `index` is its position in the inventory (0..n-1)."""

    index: int
    memory_bytes: int
    device_id: str  # what a client puts in CUDA_VISIBLE_DEVICES ("0", "3", "GPU-<uuid>")
    uuid: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class Request:
    """A client's wish for GPUs. `memory_bytes` is per GPU; 0 means the whole GPU.

    `affinity_key` names who gpu-affinity remembers the last GPUs of; empty means the client
    itself. A key other than the client id outlives the client's disconnect, so a worker that
    reconnects under the same key (the daemon uses job/worker) gets its GPUs back.

    `required_gpus` pins the request: it is granted exactly these GPU indices (under every
    policy) or waits, whatever else is free. A process that keeps device state across leases (it
    swaps to host memory and back) pins its later requests to its first grant's GPUs.
    `gpu_count` must equal their number. Empty: any GPUs. A list is kept as a tuple.
    """

    request_id: str
    client_id: str
    gpu_count: int = 1
    memory_bytes: int = 0
    priority: int = 0  # higher first; equal priorities FIFO
    affinity_key: str = ""
    required_gpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.required_gpus, list):
            object.__setattr__(self, "required_gpus", tuple(self.required_gpus))

    @property
    def affinity(self) -> str:
        """The key the core remembers this request's GPUs under: `affinity_key` or the client."""
        return self.affinity_key or self.client_id


@dataclass(frozen=True, slots=True)
class Grant:
    """GPUs given to a request. `memory_bytes` is what is promised on each of them."""

    request_id: str
    client_id: str
    gpu_indices: tuple[int, ...]
    memory_bytes: int


class SchedulerError(Exception):
    """Base of the scheduler core's errors."""


class InvalidRequest(SchedulerError):
    """The request is malformed (zero GPUs, negative memory, duplicate id, ...)."""


class Infeasible(SchedulerError):
    """The request can never be satisfied on this inventory under this policy."""


class UnknownRequest(SchedulerError, KeyError):
    """No waiting or granted request has this id."""

    def __str__(self) -> str:
        # KeyError quotes its argument; the message is meant for people, so print it as is.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class UnknownPolicy(SchedulerError, LookupError):
    """No policy is registered under this name; the message lists the known ones."""
