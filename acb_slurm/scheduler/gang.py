"""The gang planner: all-or-nothing grants of whole GPUs over a pool of (node, GPU) pairs.

Pure and synchronous like `acb_slurm.scheduler.Scheduler`: no I/O, no clocks, no threads; every
call takes plain data and returns the grants it made, in order. It is meant for the controller of
a multi-node job: a *gang* asks for `gpus_per_node` GPUs on each of K nodes (named nodes, or any
K nodes of the pool); a *local* request asks for GPUs on one node. The controller
(`acb_slurm.assigner.gangs`) plans gangs with it over the nodes that joined its pool
(`add_node`, `remove_node`); local requests stay with each node's own scheduler there, where a
granted gang's part is served ahead of them, so it submits only gangs.

Rules:

* **All or nothing.** A request is granted only when every one of its parts fits at once; a
  waiting request holds no GPU, and a grant is released as a whole. So no two waiters each hold
  part of what the other needs (the Volcano deadlock): when nothing is granted, the first waiter
  in service order is granted (every queued request fits the pool; one that never could is
  refused with `Infeasible`).
* **Service order.** Higher priority first, equal priorities by arrival. A pass walks the queue in
  that order and grants every waiter that fits what is available, so a later request that fits
  may go past an earlier one that does not (backfill), and every earlier waiter it went past
  counts one bypass.
* **Bounded bypass.** A waiter bypassed `max_bypass` times *reserves*: on its target nodes (a
  gang's named nodes; for "any K nodes", the K nodes with the most available GPUs at the moment it
  reserves, fixed from then on; a local request's node) every GPU that is free, up to what it
  needs on that node, is held back for it, and GPUs freed there later are held back too, until it
  fits. Later requests may still be granted elsewhere, and on the GPUs of its nodes beyond what it
  needs, since that never delays it. Reservations are taken in service order, each from what
  the earlier ones left, so the first one always gets every GPU it needs as soon as enough are
  released: holds never form a cycle, and no waiter is passed more than `max_bypass` times.

Within a node, GPUs are interchangeable (whole GPUs, one holder each); a grant takes the lowest
free indices. A gang of "any K nodes" goes to the nodes that leave the fewest GPUs over (best fit,
so whole nodes stay whole for other gangs), ties by the pool's node order.

Cost: every call that may grant walks the queue once, and again each time a waiter reserves
during the walk; a controller's queue is short (its job's gangs and its executors' requests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from acb_slurm.scheduler.types import Gpu, Infeasible, InvalidRequest, UnknownRequest

__all__ = ["GangPlanner", "GangRequest", "LocalRequest", "PoolGrant"]


@dataclass(frozen=True, slots=True)
class GangRequest:
    """`gpus_per_node` whole GPUs on each of K nodes, all at once or not at all.

    `nodes` names the nodes (K = their number; `node_count` must then be 0 or K); empty means any
    `node_count` nodes of the pool. A list is kept as a tuple.
    """

    request_id: str
    client_id: str
    gpus_per_node: int
    nodes: tuple[str, ...] = ()
    node_count: int = 0
    priority: int = 0  # higher first; equal priorities FIFO

    def __post_init__(self) -> None:
        if isinstance(self.nodes, list):
            object.__setattr__(self, "nodes", tuple(self.nodes))

    @property
    def size(self) -> int:
        """K: how many nodes the gang spans."""
        return len(self.nodes) if self.nodes else self.node_count


@dataclass(frozen=True, slots=True)
class LocalRequest:
    """An executor's own request: `gpu_count` whole GPUs on `node`."""

    request_id: str
    client_id: str
    node: str
    gpu_count: int = 1
    priority: int = 0


PoolRequest = GangRequest | LocalRequest


@dataclass(frozen=True, slots=True)
class PoolGrant:
    """GPUs given to a request: `parts` is (node, GPU indices) per node, in the pool's node order.

    A gang's grant has one part per node of the gang, each of `gpus_per_node` GPUs; a local
    request's grant has one part.
    """

    request_id: str
    client_id: str
    parts: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(node for node, _ in self.parts)

    @property
    def pairs(self) -> tuple[tuple[str, int], ...]:
        """Every (node, GPU index) pair of the grant."""
        return tuple((node, gpu) for node, gpus in self.parts for gpu in gpus)


@dataclass(slots=True, eq=False)
class _Waiter:
    request: PoolRequest
    seq: int
    need: int  # GPUs per node
    size: int  # how many nodes
    candidates: tuple[str, ...]  # nodes it may use, in pool order
    bypassed: int = 0
    target: tuple[str, ...] | None = None  # set once it reserves
    key: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.key = (-self.request.priority, self.seq)


class GangPlanner:
    """Decides all-or-nothing grants over a pool of nodes' GPUs; see the module docstring.

    `nodes` maps each node name to its GPU inventory: a sequence of `Gpu` (their `index` values
    name the GPUs) or a GPU count n (indices 0..n-1). Its order is the pool's node order.
    """

    def __init__(self, nodes: Mapping[str, int | Sequence[Gpu]], max_bypass: int = 8) -> None:
        if isinstance(max_bypass, bool) or not isinstance(max_bypass, int) or max_bypass < 0:
            raise ValueError(f"max_bypass must be an integer >= 0, got {max_bypass!r}")
        inventory = {node: _indices(node, gpus) for node, gpus in nodes.items()}
        self._max_bypass = max_bypass
        self._order = tuple(inventory)
        self._position = {node: i for i, node in enumerate(self._order)}
        self._gpus = inventory
        self._gpus_view = MappingProxyType(inventory)
        self._free: dict[str, set[int]] = {node: set(gpus) for node, gpus in inventory.items()}
        self._seq = 0
        self._waiting: dict[str, _Waiter] = {}  # arrival order; served sorted by key
        self._held: dict[str, PoolGrant] = {}  # grant order
        self._held_view = MappingProxyType(self._held)
        self._requests: dict[str, PoolRequest] = {}  # granted ones
        self._holds: dict[str, dict[str, int]] = {}  # reserving waiter -> node -> GPUs held

    # ---- read-only views -------------------------------------------------------------------

    @property
    def nodes(self) -> Mapping[str, tuple[int, ...]]:
        """Each node's GPU indices, in the pool's node order."""
        return self._gpus_view

    @property
    def max_bypass(self) -> int:
        return self._max_bypass

    @property
    def holdings(self) -> Mapping[str, PoolGrant]:
        """Granted, by request id, in grant order."""
        return self._held_view

    @property
    def queue(self) -> Sequence[PoolRequest]:
        """Waiting, in service order."""
        return tuple(waiter.request for waiter in self._service_order())

    def free(self, node: str) -> tuple[int, ...]:
        """The node's GPUs no grant holds (some may be held back for a reservation)."""
        return tuple(sorted(self._free[node]))

    def held_back(self) -> Mapping[str, Mapping[str, int]]:
        """Reserving waiters -> node -> how many free GPUs are held back for it there, as of
        the end of the last call, in service order."""
        return MappingProxyType({rid: MappingProxyType(dict(h)) for rid, h in self._holds.items()})

    def reserved(self) -> tuple[str, ...]:
        """Waiters bypassed `max_bypass` times, in service order."""
        return tuple(
            w.request.request_id for w in self._service_order() if w.bypassed >= self._max_bypass
        )

    def target(self, request_id: str) -> tuple[str, ...] | None:
        """The nodes a reserving waiter holds GPUs back on (None: it does not reserve)."""
        return self._waiter(request_id).target

    def bypass_count(self, request_id: str) -> int:
        return self._waiter(request_id).bypassed

    def is_waiting(self, request_id: str) -> bool:
        return request_id in self._waiting

    def is_held(self, request_id: str) -> bool:
        return request_id in self._held

    def request(self, request_id: str) -> PoolRequest:
        """A waiting or granted request."""
        if request_id in self._waiting:
            return self._waiting[request_id].request
        if request_id in self._requests:
            return self._requests[request_id]
        raise UnknownRequest(f"no waiting or granted request {request_id!r}")

    # ---- calls ------------------------------------------------------------------------------

    def submit(self, request: PoolRequest) -> list[PoolGrant]:
        """Queues a request; returns the grants made now (possibly its own).

        Raises `InvalidRequest` (malformed, duplicate id) or `Infeasible` (never fits the pool).
        """
        waiter = self._validate(request)
        self._waiting[request.request_id] = waiter
        return self._schedule()

    def release(self, request_id: str) -> list[PoolGrant]:
        """Frees a grant, every part of it; returns the grants that made possible."""
        grant = self._held.pop(request_id, None)
        if grant is None:
            raise UnknownRequest(f"no granted request {request_id!r}")
        del self._requests[request_id]
        for node, gpus in grant.parts:
            self._free[node].update(gpus)
        return self._schedule()

    def withdraw(self, request_id: str) -> list[PoolGrant]:
        """Removes a waiting request (its caller gave up); returns grants that made possible
        (a reservation it held is gone)."""
        if self._waiting.pop(request_id, None) is None:
            raise UnknownRequest(f"no waiting request {request_id!r}")
        return self._schedule()

    def add_node(self, node: str, gpus: int | Sequence[Gpu]) -> list[PoolGrant]:
        """A node joins the pool (last in its order); returns the grants that made possible."""
        if node in self._gpus:
            raise ValueError(f"node {node!r} is already in the pool")
        indices = _indices(node, gpus)
        self._gpus[node] = indices
        self._order = (*self._order, node)
        self._position[node] = len(self._order) - 1
        self._free[node] = set(indices)
        for waiter in self._waiting.values():
            if not _names_nodes(waiter.request):  # "any K nodes": the new one too
                waiter.candidates = self._order
        return self._schedule()

    def remove_node(self, node: str) -> tuple[list[str], list[PoolGrant]]:
        """A node leaves the pool: every grant with a part there is released and every waiter
        that names it is withdrawn. Returns (those request ids, grants made possible)."""
        if node not in self._gpus:
            raise UnknownRequest(f"no node {node!r} in the pool")
        gone = [rid for rid, grant in self._held.items() if node in grant.nodes]
        for rid in gone:
            for part_node, gpus in self._held.pop(rid).parts:
                self._free[part_node].update(gpus)
            del self._requests[rid]
        named = [
            rid
            for rid, waiter in self._waiting.items()
            if node in waiter.candidates and _names_nodes(waiter.request)
        ]
        for rid in named:
            del self._waiting[rid]
        del self._gpus[node], self._free[node]
        self._order = tuple(n for n in self._order if n != node)
        self._position = {n: i for i, n in enumerate(self._order)}
        dropped = gone + named
        for waiter in list(self._waiting.values()):
            waiter.candidates = tuple(n for n in waiter.candidates if n != node)
            if waiter.target is not None and node in waiter.target:
                waiter.target = None  # picks its nodes again
            big = sum(1 for n in waiter.candidates if len(self._gpus[n]) >= waiter.need)
            if big < waiter.size:  # an "any K nodes" gang the smaller pool can never hold
                del self._waiting[waiter.request.request_id]
                dropped.append(waiter.request.request_id)
        return dropped, self._schedule()

    # ---- internals --------------------------------------------------------------------------

    def _waiter(self, request_id: str) -> _Waiter:
        try:
            return self._waiting[request_id]
        except KeyError:
            raise UnknownRequest(f"no waiting request {request_id!r}") from None

    def _service_order(self) -> list[_Waiter]:
        return sorted(self._waiting.values(), key=lambda w: w.key)

    def _validate(self, request: PoolRequest) -> _Waiter:
        if not isinstance(request, GangRequest | LocalRequest):
            raise InvalidRequest(f"not a GangRequest or LocalRequest: {request!r}")
        rid = request.request_id
        if not isinstance(rid, str) or not rid:
            raise InvalidRequest("request_id must be a non-empty string")
        if rid in self._waiting or rid in self._held:
            raise InvalidRequest(f"request id {rid!r} is already waiting or granted")
        named: tuple[str, ...]
        if isinstance(request, LocalRequest):
            need, size, named = request.gpu_count, 1, (request.node,)
            if isinstance(need, bool) or not isinstance(need, int) or need < 1:
                raise InvalidRequest(f"{rid}: gpu_count must be >= 1, got {need!r}")
        else:
            need, named = request.gpus_per_node, request.nodes
            if isinstance(need, bool) or not isinstance(need, int) or need < 1:
                raise InvalidRequest(f"{rid}: gpus_per_node must be >= 1, got {need!r}")
            count = request.node_count
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise InvalidRequest(f"{rid}: node_count must be an integer >= 0, got {count!r}")
            if named:
                if len(set(named)) != len(named):
                    raise InvalidRequest(f"{rid}: nodes are not distinct: {named}")
                if count not in (0, len(named)):
                    raise InvalidRequest(
                        f"{rid}: node_count={count} but {len(named)} nodes are named"
                    )
            elif count < 1:
                raise InvalidRequest(f"{rid}: name the nodes or give node_count >= 1")
            size = request.size
        unknown = [node for node in named if node not in self._gpus]
        if unknown:
            raise Infeasible(f"{rid}: the pool has no node {', '.join(map(repr, unknown))}")
        candidates = tuple(sorted(named, key=self._position.__getitem__)) if named else self._order
        if named:
            small = [node for node in candidates if len(self._gpus[node]) < need]
            if small:
                raise Infeasible(
                    f"{rid}: asks {need} GPUs on node(s) {', '.join(small)}, which have fewer"
                )
        else:
            big = sum(1 for node in candidates if len(self._gpus[node]) >= need)
            if big < size:
                raise Infeasible(
                    f"{rid}: asks {need} GPUs on each of {size} nodes; only {big} of the pool's "
                    f"{len(candidates)} nodes have that many"
                )
        waiter = _Waiter(request, self._seq, need, size, candidates)
        self._seq += 1
        return waiter

    def _place(self, waiter: _Waiter, available: Mapping[str, int]) -> tuple[str, ...] | None:
        """The nodes it goes to now, or None: best fit, ties by pool order."""
        fitting = [node for node in waiter.candidates if available[node] >= waiter.need]
        if len(fitting) < waiter.size:
            return None
        if len(fitting) == waiter.size:
            return tuple(fitting)
        chosen = sorted(fitting, key=lambda n: (available[n] - waiter.need, self._position[n]))
        return tuple(sorted(chosen[: waiter.size], key=self._position.__getitem__))

    def _pick_target(self, waiter: _Waiter, available: Mapping[str, int]) -> tuple[str, ...]:
        """Where a reserving gang of any K nodes waits: the K nodes with the most available
        GPUs (ties by pool order); among the nodes big enough for it."""
        if len(waiter.candidates) == waiter.size:
            return waiter.candidates
        big = [node for node in waiter.candidates if len(self._gpus[node]) >= waiter.need]
        chosen = sorted(big, key=lambda n: (-available[n], self._position[n]))[: waiter.size]
        return tuple(sorted(chosen, key=self._position.__getitem__))

    def _grant(self, waiter: _Waiter, nodes: tuple[str, ...]) -> PoolGrant:
        parts = []
        for node in nodes:
            gpus = tuple(sorted(self._free[node])[: waiter.need])
            self._free[node].difference_update(gpus)
            parts.append((node, gpus))
        request = waiter.request
        grant = PoolGrant(request.request_id, request.client_id, tuple(parts))
        del self._waiting[request.request_id]
        self._held[request.request_id] = grant
        self._requests[request.request_id] = request
        return grant

    def _schedule(self) -> list[PoolGrant]:
        grants: list[PoolGrant] = []
        while not self._pass(grants):
            pass  # a waiter reserved during the pass: walk again with its holds in place
        return grants

    def _pass(self, grants: list[PoolGrant]) -> bool:
        """One walk in service order; False when a waiter reserved on the way (walk again)."""
        available = {node: len(free) for node, free in self._free.items()}
        holds: dict[str, dict[str, int]] = {}
        passed: list[_Waiter] = []  # earlier waiters this walk could not place
        for waiter in self._service_order():
            nodes = self._place(waiter, available)
            if nodes is not None:
                grants.append(self._grant(waiter, nodes))
                for node in nodes:
                    available[node] -= waiter.need
                reserved_now = False
                for earlier in passed:
                    if earlier.bypassed < self._max_bypass:
                        earlier.bypassed += 1
                        reserved_now |= earlier.bypassed >= self._max_bypass
                if reserved_now:
                    return False
                continue
            passed.append(waiter)
            if waiter.bypassed >= self._max_bypass:
                if waiter.target is None:
                    waiter.target = self._pick_target(waiter, available)
                held = {node: min(waiter.need, available[node]) for node in waiter.target}
                for node, count in held.items():
                    available[node] -= count
                holds[waiter.request.request_id] = held
        self._holds = holds
        return True


def _indices(node: str, gpus: int | Sequence[Gpu]) -> tuple[int, ...]:
    """A node's GPU indices from its inventory (`Gpu`s) or GPU count (0..n-1)."""
    if not isinstance(node, str) or not node:
        raise ValueError(f"node names must be non-empty strings, got {node!r}")
    if isinstance(gpus, bool):
        raise TypeError(f"node {node!r}: {gpus!r} is not a GPU count or inventory")
    if isinstance(gpus, int):
        if gpus < 0:
            raise ValueError(f"node {node!r} has {gpus} GPUs; must be >= 0")
        return tuple(range(gpus))
    for gpu in gpus:
        if not isinstance(gpu, Gpu):
            raise TypeError(f"node {node!r}: inventory entry {gpu!r} is not a Gpu")
    indices = tuple(sorted(gpu.index for gpu in gpus))
    if len(set(indices)) != len(indices):
        raise ValueError(f"node {node!r} lists a GPU index twice: {indices}")
    return indices


def _names_nodes(request: PoolRequest) -> bool:
    """Whether the request is for named nodes (a local request names its node)."""
    return isinstance(request, LocalRequest) or bool(request.nodes)
