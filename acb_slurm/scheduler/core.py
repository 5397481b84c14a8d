"""The scheduler core: a queue of requests, an inventory of GPUs, and the grants between them.

Pure and synchronous: every call takes plain data and returns the grants it made, in order; the
shell (the assigner daemon) commits them. The same sequence of calls always gives the same
grants, which is what lets an event log replay into it.

Queue service, generic for every policy: waiters are served in order (higher priority first,
equal priorities by arrival). When an earlier waiter cannot be placed now, a later one that can
be placed is granted anyway (backfill), and every earlier waiter it went past counts one bypass.
A waiter bypassed `max_bypass` times holds a reservation: nothing behind it is granted until it
is served, so no waiter is passed more than `max_bypass` times. A request pinned to its GPUs
(`Request.required_gpus`) queues, is bypassed and reserves like any other; every policy places it
on exactly those GPUs or not at all.

Affinity memory (read by gpu-affinity): the GPUs of the latest grant of each affinity key
(`Request.affinity`: the request's `affinity_key`, else its client). A client's own key is
forgotten when it disconnects. A named key outlives its clients, so a worker that reconnects under
it gets its GPUs back, but only while one of its GPUs has not been granted to another key since:
memory stays bounded by the connected clients' keys plus one key per GPU.

Cost: waiters are indexed by shape (`Policy.shape`: equal shapes fit alike) as well as kept in
service order, so no call walks the whole queue. Every call ends in a settled state: every waiter
up to the first reservation (all of them when there is none) cannot be placed now. A pass
therefore need only try the first waiter of each shape, in service order, and stop at a
reservation; a submit tries only the new request (and only when no earlier waiter has its shape
and no reservation is ahead of it); a withdraw schedules only when it removes the first
reservation. What makes the state settle is the rule the pass always relied on: granting only
uses up GPUs, so a request that cannot be placed stays so until GPUs are freed (a release, a
disconnect, a holder's usage shrinking). The decisions are those of a walk over the whole queue
(tests/scheduler/reference_core.py keeps that walk; the tests compare the two call for call).
"""

from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from acb_slurm import defaults
from acb_slurm.scheduler.policies import Policy, get_policy
from acb_slurm.scheduler.types import (
    Gpu,
    Grant,
    InvalidRequest,
    Request,
    SchedulerError,
    UnknownRequest,
)

__all__ = ["Scheduler"]


class _Waiter:
    """A queued request, its place in the queue and how often later requests went past it.
    Compared by identity: the queue removes exactly this waiter."""

    __slots__ = ("bypassed", "key", "queued", "request", "seq", "shape")

    def __init__(self, request: Request, seq: int) -> None:
        self.request = request
        self.seq = seq
        self.bypassed = 0
        self.key = (-request.priority, seq)  # service order: higher priority, then arrival
        self.shape: Hashable = None  # its key in the shape index (the policy's, else its own)
        self.queued = True  # False once granted or withdrawn (the reservation heap forgets lazily)

    def __repr__(self) -> str:
        return f"<waiter {self.request.request_id!r} #{self.seq}, bypassed {self.bypassed}>"


class _Queue:
    """Waiters in service order with O(1) add, remove and first: one band per priority (an
    OrderedDict by arrival; `seq` only grows, so arrivals append), bands by priority."""

    __slots__ = ("_bands", "_len", "_order", "gpus")

    def __init__(self, gpus: frozenset[int] | None = None) -> None:
        self._bands: dict[int, OrderedDict[int, _Waiter]] = {}
        self._order: list[int] = []  # the bands' -priority, ascending (service order)
        self._len = 0
        self.gpus = gpus  # a shape's: the only GPUs that decide whether it fits (None: any)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[_Waiter]:
        for negated in self._order:
            yield from self._bands[-negated].values()

    def first(self) -> _Waiter:
        """The first waiter (the queue must not be empty)."""
        return next(iter(self._bands[-self._order[0]].values()))

    def add(self, waiter: _Waiter) -> None:
        priority = waiter.request.priority
        band = self._bands.get(priority)
        if band is None:
            band = self._bands[priority] = OrderedDict()
            bisect.insort(self._order, -priority)
        band[waiter.seq] = waiter
        self._len += 1

    def remove(self, waiter: _Waiter) -> None:
        priority = waiter.request.priority
        band = self._bands[priority]
        del band[waiter.seq]
        self._len -= 1
        if not band:
            del self._bands[priority]
            del self._order[bisect.bisect_left(self._order, -priority)]


_OWN_SHAPE = object()  # a shape index key of its own, for a request whose policy shape is None


@dataclass(slots=True)
class _Holding:
    """A granted request and what it is charged on each of its GPUs."""

    request: Request
    grant: Grant
    exclusive: bool
    charge: int  # bytes charged per GPU (shared grants; exclusive ones charge the whole GPU)

    @property
    def gpus(self) -> tuple[int, ...]:
        return self.grant.gpu_indices


class Scheduler:
    """Decides which waiting request gets which GPUs, under a named policy."""

    def __init__(
        self, gpus: Sequence[Gpu], policy: str | Policy = defaults.POLICY, max_bypass: int = 8
    ) -> None:
        gpus = tuple(gpus)
        for position, gpu in enumerate(gpus):
            if not isinstance(gpu, Gpu):
                raise TypeError(f"inventory entry {position} is {gpu!r}, not a Gpu")
            if gpu.index != position:
                raise ValueError(
                    f"inventory GPU at position {position} has index {gpu.index}: indices must "
                    "be 0..n-1 in order"
                )
            if gpu.memory_bytes <= 0:
                raise ValueError(
                    f"GPU {gpu.index} has memory_bytes={gpu.memory_bytes}; must be > 0"
                )
        if isinstance(max_bypass, bool) or not isinstance(max_bypass, int) or max_bypass < 0:
            raise ValueError(f"max_bypass must be an integer >= 0, got {max_bypass!r}")
        if isinstance(policy, str):
            policy = get_policy(policy)
        elif not isinstance(policy, Policy):
            raise TypeError(f"policy must be a policy name or a Policy, got {policy!r}")
        self._gpus = gpus
        self._policy = policy
        self._max_bypass = max_bypass
        self._seq = 0
        self._queue = _Queue()  # service order
        self._waiting: dict[str, _Waiter] = {}
        self._by_shape: dict[Hashable, _Queue] = {}  # shape -> its waiters, service order
        # The shapes by the GPUs that decide whether they fit (pinned shapes, under a policy
        # with `local_pins`), and the shapes any GPU may decide: what a pass after GPUs were
        # freed has to try (ordered sets).
        self._shapes_on: list[dict[Hashable, None]] = [{} for _ in gpus]
        self._shapes_anywhere: dict[Hashable, None] = {}
        self._by_client: dict[str, dict[str, _Waiter]] = {}  # client -> its waiters
        # Waiters bypassed max_bypass times, a heap by service order; entries of waiters that
        # left stay until they come to the top (or the heap is rebuilt without them).
        self._reserving: list[tuple[tuple[int, int], _Waiter]] = []
        self._reserving_count = 0  # how many entries are of waiters still queued
        self._settled = True  # every waiter up to the first reservation cannot be placed now
        self._held: dict[str, _Holding] = {}  # grant order
        self._grants: dict[str, Grant] = {}  # the same, as the grants handed out
        self._grants_view = MappingProxyType(self._grants)
        self._promised = [0] * len(gpus)
        self._holders: list[dict[str, None]] = [{} for _ in gpus]  # ordered sets of request ids
        self._exclusive_holder: list[str | None] = [None] * len(gpus)
        self._last: dict[str, tuple[int, ...]] = {}  # affinity key -> GPUs of its latest grant
        self._last_view = MappingProxyType(self._last)
        self._last_key: list[str | None] = [None] * len(gpus)  # GPU -> key that got it last
        self._keys_of: dict[str, dict[str, None]] = {}  # client -> affinity keys it used
        self._users: dict[str, set[str]] = {}  # affinity key -> connected clients using it

    # ---- read-only views -------------------------------------------------------------------

    @property
    def gpus(self) -> Sequence[Gpu]:
        """The inventory, by index."""
        return self._gpus

    @property
    def policy(self) -> Policy:
        """The policy that places requests."""
        return self._policy

    @property
    def max_bypass(self) -> int:
        """How often a waiter may be passed by later requests before it holds a reservation."""
        return self._max_bypass

    @property
    def holdings(self) -> Mapping[str, Grant]:
        """Granted requests by id, in the order granted (a live read-only view)."""
        return self._grants_view

    @property
    def queue(self) -> Sequence[Request]:
        """Waiting requests in service order (a fresh tuple: O(queue length))."""
        return tuple(w.request for w in self._queue)

    def promised_bytes(self, gpu_index: int) -> int:
        """Memory promised on a GPU: the whole GPU for an exclusive holder, else the sum of the
        shared holders' charges (each max(its promise, its reported resident bytes))."""
        return self._promised[self._gpu(gpu_index)]

    def holders_of(self, gpu_index: int) -> tuple[str, ...]:
        """Request ids holding a GPU, in the order granted."""
        return tuple(self._holders[self._gpu(gpu_index)])

    def is_exclusive(self, gpu_index: int) -> bool:
        """Whether a GPU is held by an exclusive grant."""
        return self._exclusive_holder[self._gpu(gpu_index)] is not None

    def last_gpus(self, key: str) -> tuple[int, ...]:
        """GPUs of the latest grant under an affinity key (a client id, or a named key)."""
        return self._last.get(key, ())

    def last_key_of(self, gpu_index: int) -> str | None:
        """The remembered affinity key whose latest grant included this GPU, if any."""
        return self._last_key[self._gpu(gpu_index)]

    @property
    def affinity_memory(self) -> Mapping[str, tuple[int, ...]]:
        """Every remembered affinity key and the GPUs of its latest grant (a live view)."""
        return self._last_view

    def bypass_count(self, request_id: str) -> int:
        """How often later requests were granted ahead of a waiting request."""
        return self._waiter(request_id).bypassed

    def is_waiting(self, request_id: str) -> bool:
        """Whether the request waits in the queue."""
        return request_id in self._waiting

    def is_held(self, request_id: str) -> bool:
        """Whether the request holds a grant."""
        return request_id in self._held

    def request(self, request_id: str) -> Request:
        """The waiting or granted request with this id."""
        if request_id in self._held:
            return self._held[request_id].request
        return self._waiter(request_id).request

    def reserved(self) -> Request | None:
        """The first waiter that holds a reservation (bypassed `max_bypass` times), if any."""
        waiter = self._first_reserving()
        return None if waiter is None else waiter.request

    # ---- calls ------------------------------------------------------------------------------

    def submit(self, request: Request) -> list[Grant]:
        """Queue a request and return the grants made now (possibly its own).

        Raises `InvalidRequest` for a malformed request and `Infeasible` when it can never be
        placed here; nothing changes when it raises.
        """
        self._validate(request)
        self._policy.check(request, self._gpus)
        shape = self._policy.shape(request)
        reservation = self._first_reserving()
        waiter = _Waiter(request, self._seq)
        self._seq += 1
        waiter.shape = (_OWN_SHAPE, waiter.seq) if shape is None else shape
        self._enqueue(waiter)
        self._keys_of.setdefault(request.client_id, {})[request.affinity] = None
        self._users.setdefault(request.affinity, set()).add(request.client_id)
        if not self._settled:
            return self._schedule()
        # Settled: nothing that waited could be placed, and nothing was freed. A pass would
        # stop at a reservation ahead of the new waiter, or skip it when an earlier waiter of
        # its shape did not fit; else it tries the new waiter alone, and what it grants (if
        # anything) only uses up GPUs: the waiters behind still cannot be placed.
        if reservation is not None and reservation.key < waiter.key:
            return []
        if self._by_shape[waiter.shape].first() is not waiter:
            return []
        try:
            placed = self._policy.place(request, self)
            if placed is None:
                return []
            return [self._grant(waiter, placed)]
        except BaseException:
            self._settled = False  # the next call makes a full pass
            raise

    def release(self, request_id: str) -> list[Grant]:
        """Free a grant; return the grants that made possible."""
        if request_id not in self._held:
            hint = " (it is waiting: withdraw it instead)" if request_id in self._waiting else ""
            raise UnknownRequest(f"no granted request with id {request_id!r}{hint}")
        reservation = self._first_reserving()
        freed = self._held[request_id].gpus
        self._drop_holding(request_id)
        return self._schedule(freed, reservation)

    def withdraw(self, request_id: str) -> list[Grant]:
        """Remove a waiting request (its caller gave up); return the grants that made possible."""
        if request_id not in self._waiting:
            hint = " (it is granted: release it instead)" if request_id in self._held else ""
            raise UnknownRequest(f"no waiting request with id {request_id!r}{hint}")
        # Settled and nothing freed: the withdrawal makes a difference only when it lifts the
        # first reservation, behind which waiters that fit may wait.
        lifted = self._waiting[request_id] is self._first_reserving()
        self._drop_waiter(request_id)
        return self._schedule() if lifted or not self._settled else []

    def disconnect(self, client_id: str) -> tuple[list[str], list[Grant]]:
        """Drop all grants and waits of a client: (their ids, grants then made possible).

        Ids come held first (in grant order), then waiting (in queue order). A client with
        nothing is not an error.
        """
        reservation = self._first_reserving()
        held = [rid for rid, h in self._held.items() if h.request.client_id == client_id]
        freed = {i for rid in held for i in self._held[rid].gpus}
        mine = sorted(self._by_client.get(client_id, {}).values(), key=lambda w: w.key)
        waiting = [w.request.request_id for w in mine]
        for rid in held:
            self._drop_holding(rid)
        for rid in waiting:
            self._drop_waiter(rid)
        for key in self._keys_of.pop(client_id, {}):
            users = self._users[key]
            users.discard(client_id)
            if users:
                continue
            del self._users[key]
            if key == client_id:  # the client's own key: nobody comes back under it
                self._last_key = [None if k == key else k for k in self._last_key]
            self._forget_if_unused(key)
        return held + waiting, self._schedule(freed, reservation)

    def update_usage(self, request_id: str, resident_bytes: int) -> list[Grant]:
        """Re-charge a shared holder with max(its promise, `resident_bytes`) per GPU.

        A holder that uses more than it promised tightens its GPUs; one that shrinks back makes
        room, and the grants that made possible are returned. Nothing is ever revoked. Exclusive
        holders already own their GPUs, and a waiting request has nothing to charge: no change.
        """
        if isinstance(resident_bytes, bool) or not isinstance(resident_bytes, int):
            raise InvalidRequest(f"resident_bytes must be an int, got {resident_bytes!r}")
        if resident_bytes < 0:
            raise InvalidRequest(f"resident_bytes must be >= 0, got {resident_bytes}")
        holding = self._held.get(request_id)
        if holding is None:
            if request_id in self._waiting:
                return []
            raise UnknownRequest(f"no waiting or granted request with id {request_id!r}")
        if holding.exclusive:
            return []
        charge = max(holding.request.memory_bytes, resident_bytes)
        delta = charge - holding.charge
        if delta >= 0:  # GPUs only tightened: what could not be placed still cannot
            holding.charge = charge
            for index in holding.gpus:
                self._promised[index] += delta
            return []
        reservation = self._first_reserving()
        holding.charge = charge
        for index in holding.gpus:
            self._promised[index] += delta
        return self._schedule(holding.gpus, reservation)

    # ---- internals --------------------------------------------------------------------------

    def _gpu(self, gpu_index: int) -> int:
        if not 0 <= gpu_index < len(self._gpus):
            raise IndexError(f"no GPU {gpu_index}: this node has GPUs 0..{len(self._gpus) - 1}")
        return gpu_index

    def _waiter(self, request_id: str) -> _Waiter:
        try:
            return self._waiting[request_id]
        except KeyError:
            raise UnknownRequest(f"no waiting request with id {request_id!r}") from None

    def _validate(self, request: Request) -> None:
        if not isinstance(request, Request):
            raise InvalidRequest(f"expected a Request, got {request!r}")
        rid = request.request_id
        if not isinstance(rid, str) or not rid:
            raise InvalidRequest(f"request_id must be a non-empty string, got {rid!r}")
        if not isinstance(request.client_id, str) or not request.client_id:
            raise InvalidRequest(
                f"request {rid!r}: client_id must be a non-empty string, got {request.client_id!r}"
            )
        if not isinstance(request.affinity_key, str):
            raise InvalidRequest(
                f"request {rid!r}: affinity_key must be a string, got {request.affinity_key!r}"
            )
        for name in ("gpu_count", "memory_bytes", "priority"):
            value = getattr(request, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"request {rid!r}: {name} must be an int, got {value!r}")
        if request.gpu_count < 1:
            raise InvalidRequest(
                f"request {rid!r}: gpu_count must be >= 1, got {request.gpu_count}"
            )
        if request.memory_bytes < 0:
            raise InvalidRequest(
                f"request {rid!r}: memory_bytes must be >= 0 (0 = whole GPU), "
                f"got {request.memory_bytes}"
            )
        required = request.required_gpus
        if not isinstance(required, tuple) or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in required
        ):
            raise InvalidRequest(
                f"request {rid!r}: required_gpus must be a tuple of GPU indices (ints >= 0), "
                f"got {required!r}"
            )
        if len(set(required)) != len(required):
            raise InvalidRequest(
                f"request {rid!r}: required_gpus {list(required)} names a GPU more than once"
            )
        if required and request.gpu_count != len(required):
            raise InvalidRequest(
                f"request {rid!r}: gpu_count is {request.gpu_count} but required_gpus names "
                f"{len(required)} GPU(s) {list(required)}; they must match"
            )
        if rid in self._waiting or rid in self._held:
            state = "waiting" if rid in self._waiting else "granted"
            raise InvalidRequest(f"request id {rid!r} is already {state}; use a new id")

    def _enqueue(self, waiter: _Waiter) -> None:
        request = waiter.request
        self._waiting[request.request_id] = waiter
        self._queue.add(waiter)
        same_shape = self._by_shape.get(waiter.shape)
        if same_shape is None:
            required = request.required_gpus
            local = bool(required) and self._policy.local_pins
            same_shape = _Queue(frozenset(required) if local else None)
            self._by_shape[waiter.shape] = same_shape
            if same_shape.gpus is None:
                self._shapes_anywhere[waiter.shape] = None
            for index in same_shape.gpus or ():
                self._shapes_on[index][waiter.shape] = None
        same_shape.add(waiter)
        self._by_client.setdefault(request.client_id, {})[request.request_id] = waiter
        if waiter.bypassed >= self._max_bypass:  # max_bypass 0: every waiter reserves
            self._reserve(waiter)

    def _drop_waiter(self, request_id: str) -> None:
        waiter = self._waiting.pop(request_id)
        waiter.queued = False
        self._queue.remove(waiter)
        same_shape = self._by_shape[waiter.shape]
        same_shape.remove(waiter)
        if not same_shape:
            del self._by_shape[waiter.shape]
            if same_shape.gpus is None:
                del self._shapes_anywhere[waiter.shape]
            for index in same_shape.gpus or ():
                del self._shapes_on[index][waiter.shape]
        client = waiter.request.client_id
        mine = self._by_client[client]
        del mine[request_id]
        if not mine:
            del self._by_client[client]
        if waiter.bypassed >= self._max_bypass:
            self._reserving_count -= 1
            if len(self._reserving) > 2 * self._reserving_count + 32:
                self._reserving = [entry for entry in self._reserving if entry[1].queued]
                heapq.heapify(self._reserving)

    def _reserve(self, waiter: _Waiter) -> None:
        heapq.heappush(self._reserving, (waiter.key, waiter))
        self._reserving_count += 1

    def _first_reserving(self) -> _Waiter | None:
        """The first waiter in service order that holds a reservation, if any."""
        heap = self._reserving
        while heap and not heap[0][1].queued:
            heapq.heappop(heap)
        return heap[0][1] if heap else None

    def _drop_holding(self, request_id: str) -> None:
        holding = self._held.pop(request_id)
        del self._grants[request_id]
        for index in holding.gpus:
            del self._holders[index][request_id]
            if holding.exclusive:
                self._exclusive_holder[index] = None
                self._promised[index] -= self._gpus[index].memory_bytes
            else:
                self._promised[index] -= holding.charge

    def _schedule(
        self, freed: Iterable[int] | None = None, reserved_before: _Waiter | None = None
    ) -> list[Grant]:
        """One pass over the queue in service order: grant what fits, backfill, honour
        reservations. One pass suffices: granting only uses up GPUs, so a waiter that did not
        fit earlier in the pass cannot fit later in it; nor can any later waiter of its shape,
        so the pass tries only the first waiter of each shape, shapes in the order of their
        first waiters, and the waiters it skips are the ones a walk over the whole queue would
        skip. The walk stops at the first waiter that did not fit and holds a reservation; this
        pass stops before the first waiter that would come after such a one.

        `freed`: the call freed only these GPUs since a settled state whose first reservation
        was `reserved_before`. Then a pinned shape on other GPUs still cannot fit and is not
        tried, unless the pass may get past that reservation (its shape is tried, or it left)."""
        if not self._by_shape:  # nobody waits
            self._settled = True
            return []
        shapes: Iterable[Hashable] = self._by_shape
        if freed is not None and self._settled:
            scoped = dict(self._shapes_anywhere)
            for index in freed:
                scoped.update(self._shapes_on[index])
            before = reserved_before
            if before is None or (before.queued and before.shape not in scoped):
                shapes = scoped
        self._settled = False  # until the pass is through (a policy may raise)
        grants: list[Grant] = []
        by_shape = self._by_shape
        heads = [(by_shape[shape].first().key, shape) for shape in shapes]
        heapq.heapify(heads)  # keys are unique: shapes are never compared
        while heads:
            key, shape = heads[0]
            reservation = self._first_reserving()
            if reservation is not None and reservation.key < key:
                break  # a waiter ahead (blocked, as all ahead are) holds a reservation
            waiter = self._by_shape[shape].first()
            placed = self._policy.place(waiter.request, self)
            if placed is None:
                if waiter.bypassed >= self._max_bypass:
                    break  # reservation: nothing behind it goes first
                heapq.heappop(heads)  # the rest of this shape cannot fit in this pass either
                continue
            grants.append(self._grant(waiter, placed))
            rest = self._by_shape.get(shape)
            if rest is None:
                heapq.heappop(heads)
            else:
                heapq.heapreplace(heads, (rest.first().key, shape))
        self._settled = True
        return grants

    def _grant(self, waiter: _Waiter, placed: tuple[int, ...]) -> Grant:
        request = waiter.request
        exclusive = self._policy.exclusive(request)
        gpus = tuple(sorted(placed))
        self._check_placement(request, gpus, exclusive)
        if exclusive:
            memory = min(self._gpus[i].memory_bytes for i in gpus)
        else:
            memory = request.memory_bytes
        grant = Grant(request.request_id, request.client_id, gpus, memory)
        self._drop_waiter(request.request_id)
        # Every waiter ahead of it could not be placed (or it would have been granted first):
        # each counts one bypass. A waiter counts at most max_bypass of them while it waits (then
        # it reserves and nothing goes past it): amortised, O(max_bypass) per request.
        queue = self._queue
        if queue and queue.first().key < waiter.key:
            for earlier in queue:
                if earlier.key > waiter.key:
                    break
                earlier.bypassed += 1
                if earlier.bypassed == self._max_bypass:
                    self._reserve(earlier)
        self._held[request.request_id] = _Holding(
            request, grant, exclusive, charge=request.memory_bytes
        )
        self._grants[request.request_id] = grant
        for index in gpus:
            self._holders[index][request.request_id] = None
            if exclusive:
                self._exclusive_holder[index] = request.request_id
                self._promised[index] += self._gpus[index].memory_bytes
            else:
                self._promised[index] += request.memory_bytes
        key = request.affinity
        for index in self._last.get(key, ()):
            if self._last_key[index] == key:
                self._last_key[index] = None
        self._last[key] = gpus
        displaced = []
        for index in gpus:
            previous = self._last_key[index]
            if previous is not None and previous != key:
                displaced.append(previous)
            self._last_key[index] = key
        for previous in displaced:
            self._forget_if_unused(previous)
        return grant

    def _forget_if_unused(self, key: str) -> None:
        """Drop a key's memory once no connected client uses it and no GPU names it last."""
        if key not in self._users and key not in self._last_key:
            self._last.pop(key, None)

    def _check_placement(self, request: Request, gpus: tuple[int, ...], exclusive: bool) -> None:
        """Guard the invariants against a faulty policy: a bad placement is a bug, not a grant."""
        problem = ""
        if len(gpus) != request.gpu_count or len(set(gpus)) != len(gpus):
            problem = f"{len(set(gpus))} distinct GPUs for a request of {request.gpu_count}"
        elif request.required_gpus and gpus != tuple(sorted(request.required_gpus)):
            problem = f"the request requires GPUs {sorted(request.required_gpus)}"
        elif any(not 0 <= i < len(self._gpus) for i in gpus):
            problem = f"GPU indices {gpus} outside 0..{len(self._gpus) - 1}"
        else:
            for i in gpus:
                if exclusive and self._holders[i]:
                    problem = f"GPU {i} is held, exclusive grant impossible"
                elif self._exclusive_holder[i] is not None:
                    problem = f"GPU {i} is held exclusively"
                elif self._promised[i] + request.memory_bytes > self._gpus[i].memory_bytes:
                    problem = f"GPU {i} has not enough memory left"
                if problem:
                    break
        if problem:
            raise SchedulerError(
                f"policy {self._policy.name} placed request {request.request_id!r} on {gpus}: "
                f"{problem} (a bug in the policy)"
            )
