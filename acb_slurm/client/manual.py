"""The manual API: mark where a program needs a GPU, and the assigner time-shares the rest.

    from acb_slurm.client import on_device, on_device_begin, on_device_end

    lease = on_device_begin(gpus=1, memory="20GiB")   # blocks until granted
    ...                                              # use lease.device_ids
    on_device_end(lease)

    with on_device() as lease:
        ...

A process that swaps its GPU state to host memory between leases (the swap engine, or its own
offload/onload around these calls) is bound to the GPUs of its FIRST grant: a tensor's storage
keeps its device, so after an offload it must come back onto the same GPUs. Such a process pins
every later request to that grant:

    first = on_device_begin()
    ...                                              # offload, on_device_end(first), ...
    lease = on_device_begin(required_gpus=first.gpu_indices)   # waits for exactly those GPUs

A lease can be lost while held: its session ended without this process ending it (the assigner
died or restarted, or dropped this process as silent after a SIGSTOP), and its GPUs may already
be another process's. Then `on_device_end()` (and a `with on_device()` block's exit) raises
`LeaseLost` rather than release the lease as if nothing happened. To learn of it at once, register
a callback (it runs on the client's session thread, so keep it short):

    on_lease_lost(lambda lease, error: os._exit(70))   # or set a flag the program checks

All calls go through this process's `default_client()` (one Session per process, opened on
first use from ACB_ASSIGNER / ACB_TOKEN_FILE / ACB_JOB_ID / ACB_WORKER). To act around these
calls (the swap engine offloads before a release and onloads after a grant), register a
`LeaseListener` on that client: see `acb_slurm.client.session`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from acb_slurm.client.errors import LeaseNotHeld
from acb_slurm.client.session import Lease, LostCallback, default_client
from acb_slurm.units import parse_size


def on_device_begin(
    gpus: int = 1,
    memory: int | str | None = None,
    priority: int = 0,
    label: str = "",
    timeout: float | None = None,
    required_gpus: Sequence[int] | None = None,
) -> Lease:
    """Block until `gpus` GPUs are granted (with `memory` per GPU, e.g. "20GiB"; None = whole).

    `required_gpus` (an earlier lease's `gpu_indices`) pins the request to exactly those GPUs;
    `gpus` must be their number. Raises TimeoutError after `timeout` seconds (the request is
    withdrawn), GrantImpossible when it can never be granted here (e.g. a required GPU this node
    does not have), InvalidGpuRequest when it is malformed.
    """
    memory_bytes = 0 if memory is None else parse_size(memory)
    return default_client().allocate(
        gpus=gpus,
        memory=memory_bytes,
        priority=priority,
        label=label,
        timeout=timeout,
        required_gpus=required_gpus,
    )


def on_device_end(lease: Lease | None = None) -> None:
    """Give back `lease`, or the most recently granted lease not yet ended. Raises `LeaseLost`
    if the lease was lost while held (its session ended: see `on_lease_lost`); it is then
    forgotten, and was not released "normally"."""
    client = default_client()
    if lease is None:
        lease = client.latest_lease()
        if lease is None:
            raise LeaseNotHeld("on_device_end() called without a lease held by this process")
    client.release(lease)


def on_lease_lost(callback: LostCallback) -> LostCallback:
    """Call `callback(lease, error)` as soon as a lease of this process is lost (its session
    ended under it: the assigner died or restarted, or dropped this process as silent); `error`
    is the `LeaseLost` that ending the lease will raise. Runs on the client's session thread:
    keep it short. Returns `callback`, so it can decorate a function."""
    return default_client().on_lease_lost(callback)


@contextmanager
def on_device(
    gpus: int = 1,
    memory: int | str | None = None,
    priority: int = 0,
    label: str = "",
    timeout: float | None = None,
    required_gpus: Sequence[int] | None = None,
) -> Iterator[Lease]:
    """Hold GPUs for the duration of a `with` block (`required_gpus`: see on_device_begin).
    The exit raises `LeaseLost` if the lease was lost inside the block."""
    lease = on_device_begin(
        gpus=gpus,
        memory=memory,
        priority=priority,
        label=label,
        timeout=timeout,
        required_gpus=required_gpus,
    )
    try:
        yield lease
    finally:
        on_device_end(lease)
