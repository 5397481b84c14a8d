"""Placement policies of the scheduler core: one base class, one registry keyed by name.

A policy answers two questions about a request, both pure functions of their arguments:

* `check(request, gpus)`: can it *ever* be placed on this inventory? (raises `Infeasible`)
* `place(request, view)`: which GPUs now, or `None` for "not now, retry later"?

A request with `required_gpus` must be placed on exactly those GPUs or not at all; every policy
here does that with `place_required` (which asks the policy's `fits` of each required GPU), and
the core refuses any other placement of it as a bug in the policy.

Queue order, backfill and the bypass bound are the core's (`Scheduler`), not the policy's, so
adding a policy is one class with `@register_policy`.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import ClassVar, Protocol, TypeVar

from acb_slurm.scheduler.types import Gpu, Infeasible, Request, UnknownPolicy
from acb_slurm.units import format_size

__all__ = [
    "GpuAffinity",
    "GpuSharing",
    "GpuSharingPack",
    "Policy",
    "PolicyView",
    "Simple",
    "available_policies",
    "get_policy",
    "register_policy",
]


class PolicyView(Protocol):
    """What a policy may read of the scheduler's state (the `Scheduler` implements it)."""

    @property
    def gpus(self) -> Sequence[Gpu]: ...

    def promised_bytes(self, gpu_index: int) -> int: ...

    def holders_of(self, gpu_index: int) -> tuple[str, ...]: ...

    def is_exclusive(self, gpu_index: int) -> bool: ...

    def last_gpus(self, key: str) -> tuple[int, ...]: ...

    def last_key_of(self, gpu_index: int) -> str | None: ...


class Policy(ABC):
    """Decides where a request goes. Subclasses set `name` and implement `place`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: True when whether a pinned request can be placed depends only on its required GPUs (it is
    #: placed with `place_required`, and `fits` reads only the GPU it is asked about): then the
    #: core retries a pinned waiter only when one of its GPUs was freed. Every policy here sets
    #: it (a subclass that places pins otherwise must set it False); a policy that does not is
    #: retried whenever any GPU is freed.
    local_pins: ClassVar[bool] = False

    def exclusive(self, request: Request) -> bool:
        """Whether a grant to `request` owns its GPUs alone (default: always)."""
        return True

    def shape(self, request: Request) -> Hashable | None:
        """Requests of equal shape fit alike: once one cannot be placed, the core skips the rest
        of that shape, and tries none of them again until GPUs are freed (the core indexes its
        waiters by shape, so long queues of identical workers cost nothing per call). Return
        None when placement depends on more than the GPU count, memory and required GPUs: each
        such request is then tried on its own (still only when GPUs were freed since)."""
        return (
            request.gpu_count,
            request.memory_bytes,
            self.exclusive(request),
            tuple(sorted(request.required_gpus)),
        )

    def fits(self, request: Request, gpu_index: int, view: PolicyView) -> bool:
        """Whether `request` may take this GPU now (default: a whole GPU, nobody holds it and it
        has the memory asked). `place_required` asks it of each required GPU."""
        gpu = view.gpus[gpu_index]
        return gpu.memory_bytes >= request.memory_bytes and not view.holders_of(gpu_index)

    def place_required(self, request: Request, view: PolicyView) -> tuple[int, ...] | None:
        """A pinned request's placement: its required GPUs when each `fits` now, else None."""
        required = tuple(sorted(request.required_gpus))
        return required if all(self.fits(request, i, view) for i in required) else None

    def check(self, request: Request, gpus: Sequence[Gpu]) -> None:
        """Raise `Infeasible` when `request` can never be placed on `gpus` under this policy."""
        if request.required_gpus:
            self._check_required(request, gpus)
            return
        count = request.gpu_count
        if count > len(gpus):
            raise Infeasible(
                f"request {request.request_id!r} asks for {_gpus(count)}, this node has {len(gpus)}"
            )
        need = request.memory_bytes
        big_enough = sum(1 for gpu in gpus if gpu.memory_bytes >= need)
        if big_enough < count:
            largest = max(gpu.memory_bytes for gpu in gpus)
            if big_enough == 0:
                raise Infeasible(
                    f"request {request.request_id!r} asks for {format_size(need)} per GPU, "
                    f"the largest GPU of this node has {format_size(largest)}"
                )
            raise Infeasible(
                f"request {request.request_id!r} asks for {_gpus(count)} with "
                f"{format_size(need)} each, only {big_enough} GPU(s) of this node have that much"
            )

    def _check_required(self, request: Request, gpus: Sequence[Gpu]) -> None:
        rid, required = request.request_id, sorted(request.required_gpus)
        missing = [i for i in required if i >= len(gpus)]
        if missing:
            have = f"GPUs 0..{len(gpus) - 1}" if gpus else "no GPUs"
            raise Infeasible(
                f"request {rid!r} requires GPU(s) {missing}, this node has {have} "
                f"(required GPUs are indices of this assigner's inventory)"
            )
        need = request.memory_bytes
        for index in required:
            if gpus[index].memory_bytes < need:
                raise Infeasible(
                    f"request {rid!r} requires GPU {index} with {format_size(need)}, "
                    f"GPU {index} has {format_size(gpus[index].memory_bytes)}"
                )

    @abstractmethod
    def place(self, request: Request, view: PolicyView) -> tuple[int, ...] | None:
        """The GPU indices to grant `request` now, or `None` when it cannot be placed now.
        A request with `required_gpus` gets exactly those or None (see `place_required`).
        `None` must stay `None` while GPUs are only taken (grants, holders growing): the core
        tries a waiter again only after GPUs were freed."""

    def __repr__(self) -> str:
        return f"<policy {self.name}>"


_REGISTRY: dict[str, type[Policy]] = {}

P = TypeVar("P", bound=type[Policy])


def register_policy(cls: P) -> P:
    """Class decorator: make `cls` available under `cls.name`. Duplicate names are refused."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy class {cls.__qualname__} must set a non-empty `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        other = _REGISTRY[name]
        raise ValueError(
            f"policy name {name!r} is already registered by "
            f"{other.__module__}.{other.__qualname__}; choose another name"
        )
    _REGISTRY[name] = cls
    return cls


def available_policies() -> list[str]:
    """Names of all registered policies, sorted."""
    return sorted(_REGISTRY)


def policy_variants() -> list[str]:
    """Names of the variants of registered policies (`name:option`), sorted."""
    return sorted(_VARIANTS)


def get_policy(name: str) -> Policy:
    """A fresh instance of the policy registered as `name` (or of a variant, `name:option`);
    `UnknownPolicy` lists the known ones."""
    cls = _REGISTRY.get(name) or _VARIANTS.get(name)
    if cls is not None:
        return cls()
    known = ", ".join(available_policies())
    variants = ", ".join(sorted(_VARIANTS))
    close = difflib.get_close_matches(str(name), [*_REGISTRY, *_VARIANTS], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownPolicy(
        f"unknown policy {name!r}{hint}; known policies: {known} (variants: {variants})"
    )


def _gpus(count: int) -> str:
    return "1 GPU" if count == 1 else f"{count} GPUs"


def _free_fitting(request: Request, view: PolicyView) -> list[int]:
    """Indices of GPUs nobody holds that have at least the request's memory, in index order."""
    return [
        gpu.index
        for gpu in view.gpus
        if gpu.memory_bytes >= request.memory_bytes and not view.holders_of(gpu.index)
    ]


@register_policy
class Simple(Policy):
    """FIFO, one whole GPU per request; memory only rules out GPUs smaller than asked."""

    name = "simple"
    description = "one whole GPU per request, first come first served"
    local_pins = True

    def check(self, request: Request, gpus: Sequence[Gpu]) -> None:
        super().check(request, gpus)
        if request.gpu_count > 1:
            asks = (
                f"requires GPUs {sorted(request.required_gpus)}"
                if request.required_gpus
                else f"asks for {_gpus(request.gpu_count)}"
            )
            raise Infeasible(
                f"request {request.request_id!r} {asks}: policy simple grants one GPU per "
                "request: use gpu-affinity for multi-GPU requests"
            )

    def place(self, request: Request, view: PolicyView) -> tuple[int, ...] | None:
        if request.required_gpus:
            return self.place_required(request, view)
        free = _free_fitting(request, view)
        return (free[0],) if free else None


@register_policy
class GpuSharing(Policy):
    """Requests with a memory promise share a GPU while the promises fit; 0 bytes = exclusive.

    Placement spreads before it packs: a shared request goes to GPUs nobody holds when enough
    of them have its memory, and shares a held GPU only when too few are idle; among held GPUs
    it takes those with the fewest holders. GPUs that compute share their SMs, so k holders of
    one GPU each run at about 1/k speed: packing two predictions onto one GPU while another GPU
    idles halves the throughput of both. Ties go to the GPU that leaves the least memory over
    (best fit: the smallest idle GPU that fits, so larger GPUs stay whole for larger requests),
    then to the lower index, which keeps the decision deterministic (the core must replay).
    An exclusive request (0 bytes) takes the smallest empty GPUs.

    Whole GPUs for exclusive and multi-GPU requests are not held back while one waits: such a
    waiter is protected by the core's bypass bound (after `max_bypass` later grants it
    reserves, and the GPUs drain for it). A node whose workload mixes whole-GPU requests with
    small shared ones can ask for packing instead: policy `gpu-sharing:pack` (best fit only,
    the placement of gpu-sharing before issue 12), which keeps idle GPUs whole as long as the
    shared requests fit on held ones.
    """

    name = "gpu-sharing"
    description = "requests share a GPU while their memory promises fit; idle GPUs first"
    local_pins = True
    #: True: best fit over all GPUs (pack); False: idle GPUs first, then the least shared.
    pack: ClassVar[bool] = False

    def exclusive(self, request: Request) -> bool:
        return request.memory_bytes == 0

    def fits(self, request: Request, gpu_index: int, view: PolicyView) -> bool:
        if request.memory_bytes == 0:
            return not view.holders_of(gpu_index)
        if view.is_exclusive(gpu_index):
            return False
        room = view.gpus[gpu_index].memory_bytes - view.promised_bytes(gpu_index)
        return room >= request.memory_bytes

    def place(self, request: Request, view: PolicyView) -> tuple[int, ...] | None:
        if request.required_gpus:
            return self.place_required(request, view)
        need = request.memory_bytes
        # (holders, memory left over after placing, index): spread, then best fit, then index;
        # under `pack` the holder count is left out (0), so best fit alone decides.
        candidates: list[tuple[int, int, int]] = []
        for gpu in view.gpus:
            holders = view.holders_of(gpu.index)
            if need == 0:
                if not holders:
                    candidates.append((0, gpu.memory_bytes, gpu.index))
                continue
            if view.is_exclusive(gpu.index):
                continue
            room = gpu.memory_bytes - view.promised_bytes(gpu.index)
            if room >= need:
                sharing = 0 if self.pack else len(holders)
                candidates.append((sharing, room - need, gpu.index))
        if len(candidates) < request.gpu_count:
            return None
        candidates.sort()
        return tuple(sorted(index for _, _, index in candidates[: request.gpu_count]))


class GpuSharingPack(GpuSharing):
    """gpu-sharing that packs: best fit over all GPUs, held or idle (`gpu-sharing:pack`)."""

    name = "gpu-sharing:pack"
    description = "gpu-sharing that packs shared requests onto held GPUs to keep idle ones whole"
    pack = True


#: Variants of a registered policy, by `name:option`: known to `get_policy` (so to the assigner's
#: `--policy` and to replay), not listed by `available_policies`.
_VARIANTS: dict[str, type[Policy]] = {GpuSharingPack.name: GpuSharingPack}


@register_policy
class GpuAffinity(Policy):
    """Exclusive, multi-GPU grants; a client (or a worker that reconnects under the same affinity
    key) gets back the GPUs it held last when they are free."""

    name = "gpu-affinity"
    description = "exclusive multi-GPU grants that return a client to the GPUs it held last"
    local_pins = True

    def place(self, request: Request, view: PolicyView) -> tuple[int, ...] | None:
        if request.required_gpus:
            return self.place_required(request, view)
        free = _free_fitting(request, view)
        if len(free) < request.gpu_count:
            return None
        own = set(view.last_gpus(request.affinity))

        # The key's own last GPUs first (warm caches, memory it left pinned), then GPUs nobody
        # held last, then those another key held last (so that it can get them back too).
        def rank(index: int) -> tuple[int, int]:
            if index in own:
                return (0, index)
            return (1 if view.last_key_of(index) is None else 2, index)

        return tuple(sorted(sorted(free, key=rank)[: request.gpu_count]))
