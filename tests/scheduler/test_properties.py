"""Property tests: random sequences of calls against an independent model of the rules.

The model below knows what may be granted (who holds what, how much memory is charged) but not
how the core picks; after every call it checks each grant the core returned, in order:

* it goes to a waiting request, on distinct GPUs that the request may use at that moment
  (never two exclusive holders of a GPU, never more memory promised than the GPU has), and a
  request pinned to GPUs (`required_gpus`) gets exactly those;
* every request ahead of it in service order could not be placed at that moment (FIFO except
  where backfill allows it), had not yet been bypassed `max_bypass` times, and counts one bypass;
* under gpu-affinity, a client whose last GPUs are all free gets exactly those back (requests
  naming an affinity key are remembered under it, not checked here, but replayed; a pinned
  request goes where it is pinned);
* under gpu-sharing, a shared request spreads before it packs: it takes as many idle GPUs
  (no holder) as fit it before any held one, and the held ones it takes have no more holders
  than any held GPU it could have taken instead; so no GPU gets a second holder while a GPU
  that fits stays idle. Under `gpu-sharing:pack` it goes where it leaves the least memory over
  (best fit). Under both, a whole-GPU request takes the smallest empty GPUs;

and then the whole state: queue order, holdings, per-GPU holders and promised bytes, bypass
counts, and that no waiter could be placed now unless a reservation ahead of it holds it back.
At the end, the event log the run would have written replays into the same grants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from acb_slurm.scheduler import (
    Gpu,
    Grant,
    Infeasible,
    InvalidRequest,
    Request,
    Scheduler,
    UnknownRequest,
    replay,
)

CLIENTS = st.sampled_from(["c0", "c1", "c2", "c3"])
AFFINITY_KEYS = st.sampled_from(["", "", "w0", "w1"])
GPU_MEMORY = st.sampled_from([20, 40, 80, 80])
REQUEST_MEMORY = st.sampled_from([0, 0, 10, 20, 30, 50, 90])
RESIDENT = st.sampled_from([0, 5, 10, 30, 60, 90])
# GPU indices to pin to: up to 4 GPUs exist, so index 4 (and any beyond a smaller node) is absent.
REQUIRED = st.lists(st.integers(0, 4), min_size=1, max_size=3, unique=True).map(tuple)


@dataclass
class Waiting:
    request: Request
    seq: int
    bypassed: int = 0


@dataclass
class Held:
    request: Request
    gpus: tuple[int, ...]
    exclusive: bool
    charge: int  # per GPU, shared grants only


class SchedulerMachine(RuleBasedStateMachine):
    """Drives one Scheduler and the model side by side."""

    policy: ClassVar[str]

    @initialize(sizes=st.lists(GPU_MEMORY, min_size=1, max_size=4), max_bypass=st.integers(0, 3))
    def start(self, sizes: list[int], max_bypass: int) -> None:
        self.gpus = [Gpu(i, memory, str(i)) for i, memory in enumerate(sizes)]
        self.max_bypass = max_bypass
        self.scheduler = Scheduler(self.gpus, self.policy, max_bypass)
        self.waiting: dict[str, Waiting] = {}
        self.held: dict[str, Held] = {}  # grant order
        self.last: dict[str, tuple[int, ...]] = {}
        self.granted: list[tuple[str, tuple[int, ...]]] = []  # (client, GPUs) of every grant
        self.seq = 0
        self.ids = 0
        gpus = [
            {"index": g.index, "device_id": g.device_id, "memory_bytes": g.memory_bytes}
            for g in self.gpus
        ]
        self.log: list[dict[str, Any]] = [self.line("start", policy=self.policy, gpus=gpus)]

    def line(self, kind: str, **fields: Any) -> dict[str, Any]:
        """An event-log line as the assigner writes it (fields the replay ignores left out)."""
        return {"ts": float(len(getattr(self, "log", ()))), "event": kind, "node": "n", **fields}

    # ---- the model's rules -------------------------------------------------------------------

    def exclusive(self, request: Request) -> bool:
        return not self.policy.startswith("gpu-sharing") or request.memory_bytes == 0

    def holders(self, index: int) -> list[Held]:
        return [h for h in self.held.values() if index in h.gpus]

    def promised(self, index: int) -> int:
        return sum(
            self.gpus[index].memory_bytes if h.exclusive else h.charge for h in self.holders(index)
        )

    def fits_on(self, request: Request, index: int) -> bool:
        gpu, holders = self.gpus[index], self.holders(index)
        if self.exclusive(request):
            return not holders and gpu.memory_bytes >= request.memory_bytes
        return (
            not any(h.exclusive for h in holders)
            and gpu.memory_bytes - self.promised(index) >= request.memory_bytes
        )

    def placeable(self, request: Request) -> bool:
        if request.required_gpus:
            return all(self.fits_on(request, i) for i in request.required_gpus)
        return sum(self.fits_on(request, g.index) for g in self.gpus) >= request.gpu_count

    def infeasible(self, request: Request) -> bool:
        if self.policy == "simple" and request.gpu_count > 1:
            return True
        if request.required_gpus:
            return any(
                i >= len(self.gpus) or self.gpus[i].memory_bytes < request.memory_bytes
                for i in request.required_gpus
            )
        big_enough = sum(g.memory_bytes >= request.memory_bytes for g in self.gpus)
        return big_enough < request.gpu_count

    def order(self) -> list[Waiting]:
        return sorted(self.waiting.values(), key=lambda w: (-w.request.priority, w.seq))

    def take(self, grants: list[Grant]) -> None:
        """Check each grant against the model at the moment it was made, then apply it."""
        for grant in grants:
            rid = grant.request_id
            assert rid in self.waiting, f"grant to {rid!r}, which was not waiting"
            request = self.waiting[rid].request
            gpus = grant.gpu_indices
            assert grant.client_id == request.client_id
            assert len(gpus) == request.gpu_count == len(set(gpus)), f"bad GPU set {gpus}"
            for index in gpus:
                assert self.fits_on(request, index), f"{rid!r} may not go on GPU {index} now"
            if request.required_gpus:
                assert gpus == tuple(sorted(request.required_gpus)), (
                    f"{rid!r} got {gpus}, it is pinned to {request.required_gpus}"
                )
                event("a pinned request got its GPUs")
            if self.policy.startswith("gpu-sharing") and not request.required_gpus:
                self.check_sharing_placement(request, gpus)
            last = self.last.get(request.client_id, ())
            if (
                self.policy == "gpu-affinity"
                and not request.required_gpus
                and not request.affinity_key
                and len(last) == request.gpu_count
                and all(self.fits_on(request, i) for i in last)
            ):
                assert gpus == tuple(sorted(last)), f"{rid!r} got {gpus}, its last were {last}"
                event("a client got its last GPUs back")
            for ahead in self.order():
                if ahead.request.request_id == rid:
                    break
                assert not self.placeable(ahead.request), (
                    f"{rid!r} granted before {ahead.request.request_id!r}, which fit then"
                )
                assert ahead.bypassed < self.max_bypass, (
                    f"{rid!r} went past {ahead.request.request_id!r}, bypassed "
                    f"{ahead.bypassed} times already (max_bypass={self.max_bypass})"
                )
                ahead.bypassed += 1
                event("backfill past a waiter that did not fit")
                if ahead.bypassed == self.max_bypass:
                    event("a waiter reached the bypass bound")
            exclusive = self.exclusive(request)
            if exclusive:
                assert grant.memory_bytes == min(self.gpus[i].memory_bytes for i in gpus)
            else:
                assert grant.memory_bytes == request.memory_bytes
            self.log.append(
                self.line(
                    "grant",
                    client=grant.client_id,
                    lease=rid,
                    gpus=list(gpus),
                    memory_bytes=grant.memory_bytes,
                )
            )
            del self.waiting[rid]
            self.held[rid] = Held(request, gpus, exclusive, request.memory_bytes)
            self.granted.append((request.client_id, gpus))
            if not request.affinity_key:
                self.last[request.client_id] = gpus

    def check_sharing_placement(self, request: Request, gpus: tuple[int, ...]) -> None:
        """gpu-sharing's choice among the GPUs that fit (checked before the grant is applied)."""
        rid = request.request_id
        fitting = [g.index for g in self.gpus if self.fits_on(request, g.index)]
        others = [i for i in fitting if i not in gpus]
        if self.exclusive(request):  # whole GPUs: the smallest empty ones
            memory = [g.memory_bytes for g in self.gpus]
            assert all(memory[i] <= memory[j] for i in gpus for j in others), (
                f"{rid!r} got {gpus}, not the smallest empty GPUs of {fitting}"
            )
            return
        left = {
            i: self.gpus[i].memory_bytes - self.promised(i) - request.memory_bytes for i in fitting
        }
        if self.policy == "gpu-sharing:pack":
            assert max(left[i] for i in gpus) <= min((left[j] for j in others), default=1 << 62), (
                f"{rid!r} got {gpus}: not the best fit among {fitting}"
            )
            return
        holders = {i: len(self.holders(i)) for i in fitting}
        idle = [i for i in fitting if not holders[i]]
        taken_idle = [i for i in gpus if not holders[i]]
        assert len(taken_idle) == min(request.gpu_count, len(idle)), (
            f"{rid!r} got {gpus} (holders {[holders[i] for i in gpus]}) while GPUs {idle} were idle"
        )
        if any(holders[i] for i in gpus):
            event("a shared request joined a held GPU: no idle GPU fitted")
            assert max(holders[i] for i in gpus) <= min((holders[j] for j in others), default=99), (
                f"{rid!r} got {gpus}, not the least shared of {fitting} ({holders})"
            )
        elif len(self.gpus) > 1 and any(self.holders(g.index) for g in self.gpus):
            event("a shared request went to an idle GPU while another was held")

    # ---- calls -------------------------------------------------------------------------------

    # Submissions come in through three rules so that queues build up and backfill happens.
    @rule(
        client=CLIENTS,
        gpu_count=st.sampled_from([1, 2, 3]),
        memory=REQUEST_MEMORY,
        priority=st.sampled_from([0, 0, 0, 1]),
        key=AFFINITY_KEYS,
    )
    def submit(self, client: str, gpu_count: int, memory: int, priority: int, key: str) -> None:
        self.submit_request(Request(f"r{self.ids}", client, gpu_count, memory, priority, key))

    @rule(client=CLIENTS, memory=REQUEST_MEMORY)
    def submit_one_gpu(self, client: str, memory: int) -> None:
        self.submit_request(Request(f"r{self.ids}", client, 1, memory))

    @rule(client=CLIENTS, memory=st.sampled_from([0, 10]))
    def submit_a_small_one(self, client: str, memory: int) -> None:
        self.submit_request(Request(f"r{self.ids}", client, 1, memory))

    @rule(
        client=CLIENTS,
        required=REQUIRED,
        memory=REQUEST_MEMORY,
        priority=st.sampled_from([0, 0, 1]),
        key=AFFINITY_KEYS,
    )
    def submit_pinned(
        self, client: str, required: tuple[int, ...], memory: int, priority: int, key: str
    ) -> None:
        request = Request(f"r{self.ids}", client, len(required), memory, priority, key, required)
        self.submit_request(request)

    @precondition(lambda self: self.granted)
    @rule(data=st.data(), memory=st.sampled_from([0, 0, 10]))
    def come_back_to_the_gpus_of_a_grant(self, data: st.DataObject, memory: int) -> None:
        """A swapping process asks again, pinned to the GPUs its state lives on."""
        client, gpus = data.draw(st.sampled_from(self.granted))
        self.submit_request(Request(f"r{self.ids}", client, len(gpus), memory, 0, "", gpus))

    def submit_request(self, request: Request) -> None:
        self.ids += 1
        if self.infeasible(request):
            with pytest.raises(Infeasible):
                self.scheduler.submit(request)
            event("an infeasible request was refused")
            return
        self.waiting[request.request_id] = Waiting(request, self.seq)
        self.seq += 1
        grants = self.scheduler.submit(request)
        self.log.append(
            self.line(
                "request",
                client=request.client_id,
                lease=request.request_id,
                gpu_count=request.gpu_count,
                memory_bytes=request.memory_bytes,
                priority=request.priority,
                affinity_key=request.affinity_key,
                required_gpus=list(request.required_gpus),
            )
        )
        self.take(grants)

    @rule(data=st.data(), required=REQUIRED)
    def refused_calls_change_nothing(self, data: st.DataObject, required: tuple[int, ...]) -> None:
        known = sorted([*self.waiting, *self.held])
        if known:
            with pytest.raises(InvalidRequest):
                self.scheduler.submit(Request(data.draw(st.sampled_from(known)), "c0"))
        count = data.draw(st.integers(1, 4).filter(lambda n: n != len(required)))
        with pytest.raises(InvalidRequest, match="must match"):
            self.scheduler.submit(Request("bad", "c0", count, required_gpus=required))
        with pytest.raises(InvalidRequest, match="more than once"):
            self.scheduler.submit(Request("bad", "c0", 2, required_gpus=required[:1] * 2))
        with pytest.raises(UnknownRequest):
            self.scheduler.release("never-submitted")
        with pytest.raises(UnknownRequest):
            self.scheduler.withdraw("never-submitted")

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.held)))
        grants = self.scheduler.release(rid)
        self.log.append(self.line("release", lease=rid, reason="release"))
        del self.held[rid]
        self.take(grants)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.waiting)))
        grants = self.scheduler.withdraw(rid)
        self.log.append(self.line("withdraw", lease=rid, reason="cancelled"))
        del self.waiting[rid]
        self.take(grants)

    @rule(client=CLIENTS)
    def disconnect(self, client: str) -> None:
        held = [rid for rid, h in self.held.items() if h.request.client_id == client]
        waiting = [w.request.request_id for w in self.order() if w.request.client_id == client]
        dropped, grants = self.scheduler.disconnect(client)
        assert dropped == held + waiting
        self.log += [self.line("release", lease=rid, reason="disconnect") for rid in held]
        self.log += [self.line("withdraw", lease=rid, reason="disconnect") for rid in waiting]
        self.log.append(self.line("disconnect", client=client, leases=held))
        for rid in held:
            del self.held[rid]
        for rid in waiting:
            del self.waiting[rid]
        self.last.pop(client, None)
        self.take(grants)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), resident=RESIDENT)
    def update_usage(self, data: st.DataObject, resident: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.held)))
        grants = self.scheduler.update_usage(rid, resident)
        self.log.append(self.line("usage", lease=rid, resident_bytes=resident))
        holding = self.held[rid]
        if not holding.exclusive:
            holding.charge = max(holding.request.memory_bytes, resident)
        self.take(grants)

    def teardown(self) -> None:
        """The event log of the whole run replays into the same grants and the same state."""
        if not hasattr(self, "log"):
            return
        replayed = replay(self.log, max_bypass=self.max_bypass)
        assert dict(replayed.holdings) == dict(self.scheduler.holdings)
        assert replayed.queue == self.scheduler.queue

    # ---- after every step --------------------------------------------------------------------

    @invariant()
    def state_matches_the_model(self) -> None:
        scheduler, order = self.scheduler, self.order()
        assert [r.request_id for r in scheduler.queue] == [w.request.request_id for w in order]
        assert {rid: g.gpu_indices for rid, g in scheduler.holdings.items()} == {
            rid: h.gpus for rid, h in self.held.items()
        }
        for waiting in order:
            assert scheduler.bypass_count(waiting.request.request_id) == waiting.bypassed
            assert waiting.bypassed <= self.max_bypass
        for gpu in self.gpus:
            holders = self.holders(gpu.index)
            assert set(scheduler.holders_of(gpu.index)) == {h.request.request_id for h in holders}
            assert scheduler.promised_bytes(gpu.index) == self.promised(gpu.index)
            if any(h.exclusive for h in holders):
                assert len(holders) == 1, f"GPU {gpu.index} has an exclusive holder and others"
            promises = sum(h.request.memory_bytes for h in holders if not h.exclusive)
            assert promises <= gpu.memory_bytes, f"GPU {gpu.index} promised {promises}"

    @invariant()
    def no_waiter_could_be_placed_now_unless_a_reservation_holds_it(self) -> None:
        reserved = False
        for waiting in self.order():
            if not reserved:
                assert not self.placeable(waiting.request), (
                    f"{waiting.request.request_id!r} waits although it fits now"
                )
            elif self.placeable(waiting.request):
                event("a reservation holds back a waiter that fits")
            reserved = reserved or waiting.bypassed >= self.max_bypass


SETTINGS = settings(max_examples=120, stateful_step_count=30, deadline=None)


class SimpleMachine(SchedulerMachine):
    policy = "simple"


class GpuSharingMachine(SchedulerMachine):
    policy = "gpu-sharing"


class GpuSharingPackMachine(SchedulerMachine):
    policy = "gpu-sharing:pack"


class GpuAffinityMachine(SchedulerMachine):
    policy = "gpu-affinity"


TestSimpleKeepsItsPromises = SimpleMachine.TestCase
TestSimpleKeepsItsPromises.settings = SETTINGS
TestGpuSharingKeepsItsPromises = GpuSharingMachine.TestCase
TestGpuSharingKeepsItsPromises.settings = SETTINGS
TestGpuSharingPackKeepsItsPromises = GpuSharingPackMachine.TestCase
TestGpuSharingPackKeepsItsPromises.settings = SETTINGS
TestGpuAffinityKeepsItsPromises = GpuAffinityMachine.TestCase
TestGpuAffinityKeepsItsPromises.settings = SETTINGS
