"""The gang planner (acb_slurm.scheduler.gang): property tests over random sequences of gang and
local submits, releases and withdrawals, and a few scenarios that read as examples.

The stateful machine keeps its own model of who holds which (node, GPU) pair and of how many
later grants went past each waiter, and checks after every call:

1. all or nothing: every grant of a gang has exactly its K parts, on distinct nodes (its named
   ones when it names them), each of `gpus_per_node` GPUs; a local grant is on its node;
2. no (node, GPU) pair is granted twice, and only GPUs of the pool are granted;
3. no deadlock: when nothing is granted, nothing waits (every queued request fits the pool, so
   two gangs that each need more than half of it are served one after the other); and no waiter
   could be placed now unless a reservation ahead of it holds its GPUs back;
4. bounded bypass: a waiter's bypass count is the number of later grants that went past it,
   capped at `max_bypass`; the first reserving waiter has every free GPU of its target nodes
   held back for it (up to what it needs there); and a drain (release the oldest grant, submit a
   new local request, again and again) grants every waiter that was queued when it began.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from acb_slurm.scheduler import (
    GangPlanner,
    GangRequest,
    Gpu,
    Infeasible,
    InvalidRequest,
    LocalRequest,
    PoolGrant,
    UnknownRequest,
)


@dataclass
class Model:
    gpus: dict[str, int]
    max_bypass: int
    held: dict[str, PoolGrant] = field(default_factory=dict)
    pairs: set[tuple[str, int]] = field(default_factory=set)
    waiting: dict[str, GangRequest | LocalRequest] = field(default_factory=dict)
    key: dict[str, tuple[int, int]] = field(default_factory=dict)
    overtaken: dict[str, int] = field(default_factory=dict)
    seq: int = 0


def need_of(request: GangRequest | LocalRequest) -> tuple[int, int]:
    """(GPUs per node, how many nodes) of a request."""
    if isinstance(request, LocalRequest):
        return request.gpu_count, 1
    return request.gpus_per_node, request.size


class GangMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.counter = 0

    @initialize(
        sizes=st.lists(st.integers(1, 4), min_size=2, max_size=4),
        max_bypass=st.integers(0, 3),
    )
    def setup(self, sizes: list[int], max_bypass: int) -> None:
        gpus = {f"n{i}": n for i, n in enumerate(sizes)}
        self.nodes = tuple(gpus)
        self.planner = GangPlanner(gpus, max_bypass=max_bypass)
        self.model = Model(gpus, max_bypass)

    # ---- the model's bookkeeping ----------------------------------------------------------

    def fresh_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def candidates(self, request: GangRequest | LocalRequest) -> tuple[str, ...]:
        if isinstance(request, LocalRequest):
            return (request.node,)
        return request.nodes or self.nodes

    def never_fits(self, request: GangRequest | LocalRequest) -> bool:
        need, size = need_of(request)
        big = [n for n in self.candidates(request) if self.model.gpus.get(n, 0) >= need]
        if isinstance(request, GangRequest) and request.nodes:
            return len(big) < len(request.nodes)
        return len(big) < size

    def check(self, grants: list[PoolGrant]) -> None:
        m = self.model
        for grant in grants:
            rid = grant.request_id
            assert rid in m.waiting, f"{rid} granted but not waiting"
            request = m.waiting[rid]
            need, size = need_of(request)
            nodes = grant.nodes
            # (1) all or nothing
            assert len(nodes) == size == len(set(nodes)), grant
            assert set(nodes) <= set(self.candidates(request)), grant
            for node, gpus in grant.parts:
                assert len(gpus) == need == len(set(gpus)), grant
                assert all(0 <= g < m.gpus[node] for g in gpus), grant
            # (2) never twice
            assert not (set(grant.pairs) & m.pairs), f"{grant} takes a held GPU"
            m.pairs.update(grant.pairs)
            m.held[rid] = grant
            # every waiter ahead of it in service order, still waiting, is gone past once
            for other, key in m.key.items():
                if other != rid and key < m.key[rid]:
                    m.overtaken[other] += 1
            del m.waiting[rid], m.key[rid], m.overtaken[rid]
            assert grant == self.planner.holdings[rid]

    def queued(self, request: GangRequest | LocalRequest) -> None:
        m = self.model
        m.waiting[request.request_id] = request
        m.key[request.request_id] = (-request.priority, m.seq)
        m.overtaken[request.request_id] = 0
        m.seq += 1

    def submit(self, request: GangRequest | LocalRequest) -> None:
        if self.never_fits(request):
            with pytest.raises(Infeasible):
                self.planner.submit(request)
            return
        self.queued(request)
        self.check(self.planner.submit(request))

    # ---- rules ------------------------------------------------------------------------------

    @rule(
        per_node=st.integers(1, 4),
        data=st.data(),
        named=st.booleans(),
        priority=st.sampled_from([0, 0, 0, 1]),
    )
    def submit_gang(self, per_node: int, data: st.DataObject, named: bool, priority: int) -> None:
        if named:
            nodes = data.draw(st.lists(st.sampled_from(self.nodes), min_size=1, unique=True))
            request = GangRequest(self.fresh_id("g"), "job", per_node, tuple(nodes), 0, priority)
        else:
            count = data.draw(st.integers(1, len(self.nodes)))
            request = GangRequest(self.fresh_id("g"), "job", per_node, (), count, priority)
        self.submit(request)

    @rule(data=st.data(), count=st.sampled_from([1, 1, 1, 2]), priority=st.sampled_from([0, 0, 1]))
    def submit_local(self, data: st.DataObject, count: int, priority: int) -> None:
        node = data.draw(st.sampled_from(self.nodes))
        self.submit(LocalRequest(self.fresh_id("l"), "executor", node, count, priority))

    @precondition(lambda self: bool(self.model.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.model.held)))
        self.do_release(rid)

    def do_release(self, rid: str) -> None:
        grant = self.model.held.pop(rid)
        self.model.pairs.difference_update(grant.pairs)
        self.check(self.planner.release(rid))

    @precondition(lambda self: bool(self.model.waiting))
    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.model.waiting)))
        m = self.model
        del m.waiting[rid], m.key[rid], m.overtaken[rid]
        self.check(self.planner.withdraw(rid))

    @rule()
    def unknown_ids_are_refused(self) -> None:
        with pytest.raises(UnknownRequest):
            self.planner.release("nobody")
        with pytest.raises(UnknownRequest):
            self.planner.withdraw("nobody")

    @precondition(lambda self: bool(self.model.waiting))
    @rule(data=st.data())
    def drain_under_backfill(self, data: st.DataObject) -> None:
        """(4) Release the oldest grant and submit a new one-GPU local request, again and again:
        every request waiting when the drain began is granted within a bounded number of steps,
        however many later local requests keep arriving."""
        m = self.model
        before = set(m.waiting)
        pool = sum(m.gpus.values())
        bound = (len(before) + len(m.held) + 1) * (m.max_bypass + 2) * (pool + 1)
        for step in range(bound):
            if not before & set(m.waiting):
                break
            assert m.held, "requests wait while nothing is granted"
            self.do_release(next(iter(m.held)))
            node = self.nodes[step % len(self.nodes)]
            self.submit(LocalRequest(self.fresh_id("b"), "executor", node, 1))
        assert not before & set(m.waiting), f"{sorted(before & set(m.waiting))} starved"

    # ---- invariants -------------------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self) -> None:
        if not hasattr(self, "planner"):
            return
        m, p = self.model, self.planner
        assert dict(p.holdings) == m.held
        order = sorted(m.waiting, key=m.key.__getitem__)
        assert [r.request_id for r in p.queue] == order
        for rid in order:
            assert p.bypass_count(rid) == min(m.overtaken[rid], m.max_bypass), rid
        # (2) the planner's free GPUs are exactly those no grant holds
        for node, count in m.gpus.items():
            held = {g for n, g in m.pairs if n == node}
            assert set(p.free(node)) == set(range(count)) - held

    @invariant()
    def no_deadlock_and_settled(self) -> None:
        if not hasattr(self, "planner"):
            return
        m, p = self.model, self.planner
        # (3) nothing granted -> nothing waits
        if not m.held:
            assert not m.waiting, "the pool is idle but requests wait"
        holds = p.held_back()
        reserved = set(p.reserved())
        assert set(holds) == reserved
        free = {node: len(p.free(node)) for node in m.gpus}
        available = dict(free)
        first = True
        for request in p.queue:
            rid = request.request_id
            need, size = need_of(request)
            fitting = [n for n in self.candidates(request) if available[n] >= need]
            assert len(fitting) < size, f"{rid} fits now but waits"
            if rid in reserved:
                target = p.target(rid)
                assert target is not None and len(target) == size
                assert set(target) <= set(self.candidates(request))
                if first:  # (4) the first reservation gets every free GPU it needs
                    assert dict(holds[rid]) == {n: min(need, free[n]) for n in target}
                    first = False
                for node, count in holds[rid].items():
                    assert 0 <= count <= min(need, available[node])
                    available[node] -= count


GangMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestGangPlannerKeepsItsPromises = GangMachine.TestCase


# ---- scenarios ------------------------------------------------------------------------------


def ids(grants: list[PoolGrant]) -> list[str]:
    return [grant.request_id for grant in grants]


def test_two_gangs_over_half_the_pool_are_served_one_after_the_other() -> None:
    """Two 2-node gangs on a 3-node pool: each needs more than half of it, so one waits holding
    nothing, and gets the whole of what it needs when the other is released."""
    planner = GangPlanner({"a": 2, "b": 2, "c": 2})
    assert ids(planner.submit(GangRequest("g1", "job", 2, node_count=2))) == ["g1"]
    assert ids(planner.submit(GangRequest("g2", "job", 2, node_count=2))) == []
    assert planner.holdings["g1"].nodes == ("a", "b")
    assert planner.is_waiting("g2")
    # g2 holds nothing while it waits: node c stays free for anyone
    assert planner.free("c") == (0, 1)
    (grant,) = planner.release("g1")
    assert grant.request_id == "g2"
    assert grant.parts == (("a", (0, 1)), ("b", (0, 1)))


def test_named_nodes_wait_for_those_nodes_any_k_goes_where_it_fits() -> None:
    planner = GangPlanner({"a": 2, "b": 2, "c": 2})
    planner.submit(LocalRequest("busy", "executor", "a", 2))
    # named nodes a and b: a is busy, so it waits (holding nothing on b)
    assert ids(planner.submit(GangRequest("named", "job", 1, nodes=("a", "b")))) == []
    assert planner.free("b") == (0, 1)
    # any 2 nodes: b and c fit
    (grant,) = planner.submit(GangRequest("any", "job", 1, node_count=2))
    assert grant.nodes == ("b", "c")
    assert grant.pairs == (("b", 0), ("c", 0))
    assert ids(planner.release("busy")) == ["named"]
    assert planner.holdings["named"].parts == (("a", (0,)), ("b", (1,)))


def test_any_k_prefers_the_best_fit() -> None:
    """A gang of any K nodes leaves whole nodes whole: it goes where the fewest GPUs are left."""
    planner = GangPlanner({"a": 4, "b": 2, "c": 4, "d": 2})
    (grant,) = planner.submit(GangRequest("g", "job", 2, node_count=2))
    assert grant.nodes == ("b", "d")


def test_local_requests_backfill_a_bounded_number_of_times() -> None:
    """While a gang waits, local one-GPU requests backfill; after max_bypass of them went past
    it, the gang reserves: GPUs freed on its nodes are held back for it until it fits."""
    planner = GangPlanner({"a": 2, "b": 2}, max_bypass=2)
    planner.submit(LocalRequest("x", "executor", "a", 1))
    assert ids(planner.submit(GangRequest("gang", "job", 2, nodes=("a", "b")))) == []
    assert ids(planner.submit(LocalRequest("l1", "executor", "b", 1))) == ["l1"]
    assert planner.bypass_count("gang") == 1
    assert ids(planner.submit(LocalRequest("l2", "executor", "a", 1))) == ["l2"]
    assert planner.reserved() == ("gang",)
    assert planner.target("gang") == ("a", "b")
    # b's last free GPU is held back for the gang: a third local request waits
    assert dict(planner.held_back()["gang"]) == {"a": 0, "b": 1}
    assert ids(planner.submit(LocalRequest("l3", "executor", "b", 1))) == []
    assert ids(planner.release("x")) == []  # a's GPU 0 is held back too
    assert dict(planner.held_back()["gang"]) == {"a": 1, "b": 1}
    assert ids(planner.release("l1")) == []
    assert dict(planner.held_back()["gang"]) == {"a": 1, "b": 2}
    assert ids(planner.release("l2")) == ["gang"]
    assert planner.is_waiting("l3")
    assert ids(planner.release("gang")) == ["l3"]


def test_a_reserved_gang_does_not_stop_backfill_elsewhere() -> None:
    planner = GangPlanner({"a": 1, "b": 1, "c": 1}, max_bypass=0)
    planner.submit(LocalRequest("x", "executor", "a", 1))
    assert ids(planner.submit(GangRequest("gang", "job", 1, nodes=("a", "b")))) == []
    assert planner.reserved() == ("gang",)
    # b is held back for the gang; c is not
    assert ids(planner.submit(LocalRequest("on-b", "executor", "b", 1))) == []
    assert ids(planner.submit(LocalRequest("on-c", "executor", "c", 1))) == ["on-c"]
    assert ids(planner.release("x")) == ["gang"]
    assert ids(planner.release("gang")) == ["on-b"]


def test_any_k_reservation_keeps_its_target() -> None:
    planner = GangPlanner({"a": 2, "b": 2, "c": 2}, max_bypass=0)
    planner.submit(LocalRequest("a1", "executor", "a", 1))
    planner.submit(LocalRequest("b1", "executor", "b", 2))
    planner.submit(LocalRequest("c1", "executor", "c", 2))
    assert ids(planner.submit(GangRequest("gang", "job", 2, node_count=2))) == []
    assert planner.target("gang") == ("a", "b")  # the most available GPUs when it reserved
    assert ids(planner.release("c1")) == []  # c is not its target: still one node short
    assert ids(planner.submit(LocalRequest("c2", "executor", "c", 2))) == ["c2"]
    assert ids(planner.release("a1")) == []
    assert ids(planner.release("b1")) == ["gang"]
    assert planner.holdings["gang"].nodes == ("a", "b")


def test_priority_goes_first() -> None:
    planner = GangPlanner({"a": 1})
    planner.submit(LocalRequest("x", "e", "a"))
    planner.submit(LocalRequest("low", "e", "a"))
    planner.submit(GangRequest("high", "job", 1, node_count=1, priority=1))
    assert [r.request_id for r in planner.queue] == ["high", "low"]
    assert ids(planner.release("x")) == ["high"]


def test_gpu_inventories_name_the_gpus() -> None:
    planner = GangPlanner({"a": [Gpu(3, 80, "3"), Gpu(5, 80, "5")], "b": 1})
    (grant,) = planner.submit(GangRequest("g", "job", 2, nodes=["a"]))
    assert grant.parts == (("a", (3, 5)),)
    assert planner.nodes == {"a": (3, 5), "b": (0,)}


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (GangRequest("g", "j", 0, node_count=1), InvalidRequest),
        (GangRequest("g", "j", 1), InvalidRequest),  # neither nodes nor a count
        (GangRequest("g", "j", 1, nodes=("a", "a")), InvalidRequest),
        (GangRequest("g", "j", 1, nodes=("a",), node_count=2), InvalidRequest),
        (GangRequest("", "j", 1, node_count=1), InvalidRequest),
        (LocalRequest("l", "e", "a", 0), InvalidRequest),
        (GangRequest("g", "j", 1, nodes=("zz",)), Infeasible),
        (GangRequest("g", "j", 3, nodes=("a",)), Infeasible),
        (GangRequest("g", "j", 2, node_count=2), Infeasible),  # only a has 2 GPUs
        (GangRequest("g", "j", 1, node_count=3), Infeasible),
        (LocalRequest("l", "e", "b", 2), Infeasible),
    ],
)
def test_refusals(request_: GangRequest | LocalRequest, error: type[Exception]) -> None:
    planner = GangPlanner({"a": 2, "b": 1})
    with pytest.raises(error):
        planner.submit(request_)
    assert not planner.queue


def test_duplicate_ids_are_refused() -> None:
    planner = GangPlanner({"a": 1})
    planner.submit(LocalRequest("x", "e", "a"))
    with pytest.raises(InvalidRequest):
        planner.submit(GangRequest("x", "j", 1, node_count=1))
    planner.submit(LocalRequest("y", "e", "a"))
    with pytest.raises(InvalidRequest):
        planner.submit(LocalRequest("y", "e", "a"))


# ---- the pool changes: nodes join and leave -------------------------------------------------


def test_a_node_that_joins_serves_the_gangs_waiting_for_it() -> None:
    planner = GangPlanner({"n1": 1})
    assert len(planner.submit(GangRequest("first", "c", gpus_per_node=1, node_count=1))) == 1
    assert planner.submit(GangRequest("next", "c", gpus_per_node=1, node_count=1)) == []
    (grant,) = planner.add_node("n2", 2)
    assert (grant.request_id, grant.parts) == ("next", (("n2", (0,)),))
    with pytest.raises(ValueError, match="already in the pool"):
        planner.add_node("n2", 1)


def test_a_node_that_leaves_takes_its_grants_and_named_waiters_with_it() -> None:
    planner = GangPlanner({"n1": 1, "n2": 1, "n3": 1})
    (held,) = planner.submit(GangRequest("held", "c", gpus_per_node=1, nodes=("n1", "n2")))
    assert planner.submit(GangRequest("named", "c", gpus_per_node=1, nodes=("n2", "n3"))) == []
    assert planner.submit(GangRequest("any3", "c", gpus_per_node=1, node_count=3)) == []
    assert planner.submit(GangRequest("any2", "c", gpus_per_node=1, node_count=2)) == []
    dropped, grants = planner.remove_node("n2")
    # `held` had a part there, `named` names it, `any3` can no longer fit two nodes; `any2`
    # gets the nodes left, whose GPUs `held` gave back.
    assert sorted(dropped) == ["any3", "held", "named"]
    assert [(g.request_id, g.nodes) for g in grants] == [("any2", ("n1", "n3"))]
    assert held.request_id not in planner.holdings and planner.queue == ()
    assert tuple(planner.nodes) == ("n1", "n3")
