"""Differential tests: the indexed core decides exactly as the walk it replaced.

`reference_core.Scheduler` is the core as it was before waiters were indexed by shape (every call
walked the whole queue). Both are fed the same calls; after every call they must have returned
the same grants (or raised the same error) and be in the same state: queue order, holdings in
grant order, bypass counts, the reservation, per-GPU holders and promised bytes, affinity memory.

Hypothesis drives short random sequences under every built-in policy, a policy without shapes
and one that raises for some requests; seeded random walks drive long ones, where queues of
hundreds of waiters of a few shapes build up and drain.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from acb_slurm.scheduler import Gpu, GpuAffinity, GpuSharing, Policy, Request, Scheduler
from acb_slurm.scheduler.policies import PolicyView

from .reference_core import Scheduler as ReferenceScheduler


class Shapeless(GpuSharing):
    """gpu-sharing that declares no shapes: the core must try every waiter."""

    name = "shapeless"

    def shape(self, request: Request) -> None:
        return None


class Moody(GpuAffinity):
    """gpu-affinity whose placement of a 7-byte request fails with an error (a policy bug):
    both cores must raise at the same call, with the same grants made before it."""

    name = "moody"

    def place(self, request: Request, view: PolicyView) -> tuple[int, ...] | None:
        if request.memory_bytes == 7:
            raise RuntimeError(f"cannot place {request.request_id}")
        return super().place(request, view)


POLICIES: dict[str, Callable[[], str | Policy]] = {
    "simple": lambda: "simple",
    "gpu-sharing": lambda: "gpu-sharing",
    "gpu-sharing:pack": lambda: "gpu-sharing:pack",
    "gpu-affinity": lambda: "gpu-affinity",
    "shapeless": Shapeless,
    "moody": Moody,
}


class Pair:
    """A reference scheduler and an indexed one, called alike and compared after every call."""

    def __init__(self, gpus: list[Gpu], policy: str, max_bypass: int) -> None:
        self.gpus = gpus
        self.reference = ReferenceScheduler(gpus, POLICIES[policy](), max_bypass)
        self.indexed = Scheduler(gpus, POLICIES[policy](), max_bypass)
        self.calls = 0

    def call(self, name: str, *args: Any) -> Any:
        """Call both; return the reference's result (None when both raised alike)."""
        outcomes = []
        for scheduler in (self.reference, self.indexed):
            try:
                outcomes.append(("returned", getattr(scheduler, name)(*args)))
            except Exception as error:  # compared below
                outcomes.append(("raised", type(error), str(error)))
        self.calls += 1
        assert outcomes[1] == outcomes[0], f"call {self.calls}: {name}{args}"
        self.check_state()
        return outcomes[0][1] if outcomes[0][0] == "returned" else None

    def check_state(self) -> None:
        ref, new = self.reference, self.indexed
        assert new.queue == ref.queue
        assert list(new.holdings.items()) == list(ref.holdings.items())
        for request in ref.queue:
            rid = request.request_id
            assert new.bypass_count(rid) == ref.bypass_count(rid), rid
            assert new.is_waiting(rid) and not new.is_held(rid)
            assert new.request(rid) == request
        assert new.reserved() == ref.reserved()
        for gpu in self.gpus:
            i = gpu.index
            assert new.promised_bytes(i) == ref.promised_bytes(i)
            assert new.holders_of(i) == ref.holders_of(i)
            assert new.is_exclusive(i) == ref.is_exclusive(i)
            assert new.last_key_of(i) == ref.last_key_of(i)
        assert dict(new.affinity_memory) == dict(ref.affinity_memory)

    def waiting(self) -> list[str]:
        return [r.request_id for r in self.reference.queue]

    def held(self) -> list[str]:
        return list(self.reference.holdings)


# ---- short random sequences (hypothesis) -------------------------------------------------------

CLIENTS = st.sampled_from(["c0", "c1", "c2", "c3"])
PRIORITY = st.sampled_from([-1, 0, 0, 0, 0, 1, 2])
MEMORY = st.sampled_from([0, 0, 0, 10, 20, 30, 50, 90])


class DifferentialMachine(RuleBasedStateMachine):
    policy: ClassVar[str]

    @initialize(
        sizes=st.lists(st.sampled_from([20, 40, 80, 80]), min_size=1, max_size=4),
        max_bypass=st.sampled_from([0, 1, 2, 3, 8]),
    )
    def start(self, sizes: list[int], max_bypass: int) -> None:
        gpus = [Gpu(i, memory, str(i)) for i, memory in enumerate(sizes)]
        self.pair = Pair(gpus, self.policy, max_bypass)
        self.ids = 0

    def submit(self, request: Request) -> None:
        self.ids += 1
        self.pair.call("submit", request)

    @rule(
        client=CLIENTS,
        count=st.sampled_from([1, 1, 1, 2, 3]),
        memory=MEMORY,
        priority=PRIORITY,
        key=st.sampled_from(["", "", "w0"]),
    )
    def submit_any(self, client: str, count: int, memory: int, priority: int, key: str) -> None:
        self.submit(Request(f"r{self.ids}", client, count, memory, priority, key))

    @rule(client=CLIENTS, memory=st.sampled_from([0, 0, 10, 7]), priority=PRIORITY)
    def submit_one_of_a_kind(self, client: str, memory: int, priority: int) -> None:
        """Many requests of one shape: the queue's shape index has long runs to skip."""
        self.submit(Request(f"r{self.ids}", client, 1, memory, priority))

    @rule(
        client=CLIENTS,
        required=st.lists(st.integers(0, 4), min_size=1, max_size=2, unique=True).map(tuple),
        memory=st.sampled_from([0, 0, 10]),
        priority=PRIORITY,
    )
    def submit_pinned(
        self, client: str, required: tuple[int, ...], memory: int, priority: int
    ) -> None:
        request = Request(f"r{self.ids}", client, len(required), memory, priority, "", required)
        self.submit(request)

    @precondition(lambda self: self.pair.held())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.pair.call("release", data.draw(st.sampled_from(self.pair.held())))

    @precondition(lambda self: self.pair.waiting())
    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        self.pair.call("withdraw", data.draw(st.sampled_from(self.pair.waiting())))

    @precondition(lambda self: self.pair.waiting())
    @rule()
    def withdraw_the_reservation(self) -> None:
        reserved = self.pair.reference.reserved()
        if reserved is not None:
            self.pair.call("withdraw", reserved.request_id)

    @rule(client=CLIENTS)
    def disconnect(self, client: str) -> None:
        self.pair.call("disconnect", client)

    @precondition(lambda self: self.pair.held())
    @rule(data=st.data(), resident=st.sampled_from([0, 5, 10, 30, 60, 90]))
    def update_usage(self, data: st.DataObject, resident: int) -> None:
        self.pair.call("update_usage", data.draw(st.sampled_from(self.pair.held())), resident)

    @precondition(lambda self: self.pair.held())
    @rule(data=st.data(), grown=st.sampled_from([40, 90]), shrunk=st.sampled_from([0, 10]))
    def usage_grows_then_shrinks(self, data: st.DataObject, grown: int, shrunk: int) -> None:
        """A shared holder uses more than it promised while others queue, then gives it back."""
        rid = data.draw(st.sampled_from(self.pair.held()))
        self.pair.call("update_usage", rid, grown)
        count = data.draw(st.sampled_from([1, 2]))
        required = tuple(data.draw(st.permutations(range(len(self.pair.gpus))))[:count])
        self.submit(Request(f"r{self.ids}", "c1", len(required), 10, 0, "", required))
        self.submit(Request(f"r{self.ids}", "c2", 1, 20))
        self.pair.call("update_usage", rid, shrunk)

    @rule(data=st.data())
    def refused_calls(self, data: st.DataObject) -> None:
        known = self.pair.waiting() + self.pair.held()
        if known:
            self.pair.call("submit", Request(data.draw(st.sampled_from(known)), "c0"))
            self.pair.call("release", data.draw(st.sampled_from(known)))
            self.pair.call("withdraw", data.draw(st.sampled_from(known)))
        self.pair.call("submit", Request("big", "c0", 9))
        self.pair.call("release", "never-submitted")

    @invariant()
    def same_state(self) -> None:
        if hasattr(self, "pair"):
            self.pair.check_state()


SETTINGS = settings(max_examples=75, stateful_step_count=50, deadline=None)


def machine(policy: str) -> Any:
    cls = type(f"Differential_{policy}", (DifferentialMachine,), {"policy": policy})
    case = cls.TestCase
    case.settings = SETTINGS
    return case


TestSimpleDecidesAsTheWalk = machine("simple")
TestGpuSharingDecidesAsTheWalk = machine("gpu-sharing")
TestGpuSharingPackDecidesAsTheWalk = machine("gpu-sharing:pack")
TestGpuAffinityDecidesAsTheWalk = machine("gpu-affinity")
TestShapelessDecidesAsTheWalk = machine("shapeless")
TestRaisingPolicyDecidesAsTheWalk = machine("moody")


# ---- long random walks (seeded) ----------------------------------------------------------------


def random_walk(policy: str, seed: int, steps: int) -> Pair:
    rng = random.Random(seed)
    sizes = [rng.choice([40, 80, 80]) for _ in range(rng.randint(2, 4))]
    pair = Pair([Gpu(i, m, str(i)) for i, m in enumerate(sizes)], policy, rng.choice([1, 3, 8]))
    clients = [f"c{i}" for i in range(6)]
    # A few shapes, so that long runs of one shape build up behind a blocked one.
    shapes = [(1, 0, ()), (1, 30, ()), (2, 0, ()), (1, 0, (0,)), (1, 10, (1,)), (2, 0, (0, 1))]
    if policy == "simple":
        shapes = [s for s in shapes if s[0] == 1]
    peak = 0
    for n in range(steps):
        waiting, held = pair.waiting(), pair.held()
        peak = max(peak, len(waiting))
        # Fill for a while, then drain: queues grow to a few hundred, then empty.
        filling = (n // 300) % 2 == 0
        roll = rng.random()
        if roll < (0.75 if filling else 0.25):
            count, memory, required = rng.choice(shapes)
            priority = rng.choice([0, 0, 0, 0, 1, -1])
            request = Request(f"r{n}", rng.choice(clients), count, memory, priority, "", required)
            pair.call("submit", request)
        elif roll < 0.85 and held:
            pair.call("release", rng.choice(held))
        elif roll < 0.93 and waiting:
            pair.call("withdraw", rng.choice(waiting))
        elif roll < 0.96 and held:
            pair.call("update_usage", rng.choice(held), rng.choice([0, 20, 60]))
        elif roll < 0.97:
            pair.call("disconnect", rng.choice(clients))
        elif waiting and pair.reference.reserved() is not None:
            pair.call("withdraw", pair.reference.reserved().request_id)  # type: ignore[union-attr]
    assert peak >= 100, f"the walk never built a long queue (peak {peak})"
    return pair


def test_a_holder_that_shrinks_its_usage_lets_a_pinned_waiter_in() -> None:
    pair = Pair([Gpu(i, 80, str(i)) for i in range(2)], "gpu-sharing", 8)
    pair.call("submit", Request("a", "ca", 1, 30, required_gpus=(0,)))
    pair.call("submit", Request("b", "cb", 1, 30, required_gpus=(1,)))
    pair.call("update_usage", "a", 70)
    pair.call("update_usage", "b", 70)
    pair.call("submit", Request("w0", "c0", 1, 20, required_gpus=(0,)))
    pair.call("submit", Request("w1", "c1", 1, 20, required_gpus=(1,)))
    assert [r.request_id for r in pair.reference.queue] == ["w0", "w1"]
    grants = pair.call("update_usage", "a", 30)  # GPU 0 has room again, GPU 1 has not
    assert [g.request_id for g in grants] == ["w0"]
    grants = pair.call("update_usage", "b", 0)
    assert [g.request_id for g in grants] == ["w1"]


@pytest.mark.parametrize(
    "policy", ["simple", "gpu-sharing", "gpu-sharing:pack", "gpu-affinity", "shapeless"]
)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_long_random_walks_decide_as_the_walk(policy: str, seed: int) -> None:
    random_walk(policy, seed, 1200)


def test_the_recorded_scene_of_the_benchmark_decides_as_the_walk() -> None:
    """The benchmark's scene: a held GPU, waiters pinned to it, a probe of higher priority."""
    gpus = [Gpu(i, 80, str(i)) for i in range(2)]
    pair = Pair(gpus, "simple", 8)
    pair.call("submit", Request("holder", "h"))
    for i in range(300):
        pair.call("submit", Request(f"w{i}", "flood", required_gpus=(0,)))
        if i % 50 == 0:
            assert pair.call("submit", Request(f"p{i}", "probe", priority=1))
            pair.call("release", f"p{i}")
    # At equal priority the probe goes past every waiter until the first one reserves.
    for i in range(10):
        pair.call("submit", Request(f"q{i}", "probe"))
        if pair.reference.is_held(f"q{i}"):
            pair.call("release", f"q{i}")
    assert pair.reference.reserved() == Request("w0", "flood", required_gpus=(0,))
    pair.call("release", "holder")
    for i in range(0, 300, 2):
        pair.call("withdraw", f"w{i}") if pair.reference.is_waiting(f"w{i}") else None
    pair.call("disconnect", "flood")
    assert not pair.reference.queue or all(r.client_id == "probe" for r in pair.reference.queue)
