"""The policy registry: names to classes, duplicates refused, unknown names answered with the
known ones, and a new policy added as one class."""

from __future__ import annotations

import pytest

from acb_slurm.scheduler import (
    Gpu,
    GpuAffinity,
    GpuSharing,
    Policy,
    PolicyView,
    Request,
    Scheduler,
    SchedulerError,
    Simple,
    UnknownPolicy,
    available_policies,
    get_policy,
    policies,
    register_policy,
)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register policies without leaving them behind."""
    monkeypatch.setattr(policies, "_REGISTRY", dict(policies._REGISTRY))


def test_the_three_policies_are_registered_by_name() -> None:
    assert available_policies() == ["gpu-affinity", "gpu-sharing", "simple"]
    assert type(get_policy("simple")) is Simple
    assert type(get_policy("gpu-sharing")) is GpuSharing
    assert type(get_policy("gpu-affinity")) is GpuAffinity


def test_the_packing_variant_of_gpu_sharing_is_known_by_name_but_not_listed() -> None:
    """`gpu-sharing:pack` is found by name (assigner --policy, replay of its logs) and keeps
    its name, but is not one of the policies a job file lists."""
    packing = get_policy("gpu-sharing:pack")
    assert isinstance(packing, GpuSharing) and packing.pack and not GpuSharing.pack
    assert packing.name == "gpu-sharing:pack"
    assert Scheduler([Gpu(0, 1, "0")], "gpu-sharing:pack").policy.name == "gpu-sharing:pack"
    assert "gpu-sharing:pack" not in available_policies()


def test_each_lookup_gives_a_fresh_instance() -> None:
    assert get_policy("simple") is not get_policy("simple")


def test_an_unknown_name_is_answered_with_the_known_ones() -> None:
    with pytest.raises(UnknownPolicy) as raised:
        get_policy("fair-share")
    assert str(raised.value) == (
        "unknown policy 'fair-share'; known policies: gpu-affinity, gpu-sharing, simple "
        "(variants: gpu-sharing:pack)"
    )


def test_a_misspelt_name_gets_a_suggestion() -> None:
    with pytest.raises(UnknownPolicy, match="did you mean 'gpu-sharing'"):
        get_policy("gpu_sharing")
    with pytest.raises(UnknownPolicy, match="did you mean 'gpu-sharing:pack'"):
        get_policy("gpu-sharing:packed")


def test_a_scheduler_with_an_unknown_policy_name_is_refused() -> None:
    with pytest.raises(UnknownPolicy, match="known policies"):
        Scheduler([Gpu(0, 1, "0")], "nope")


def test_a_duplicate_name_is_refused(registry: None) -> None:
    with pytest.raises(ValueError, match=r"'simple' is already registered by .*Simple"):

        @register_policy
        class AnotherSimple(Simple):
            name = "simple"


def test_a_policy_without_a_name_is_refused(registry: None) -> None:
    with pytest.raises(ValueError, match="must set a non-empty `name`"):

        @register_policy
        class Nameless(Simple):
            name = ""


def test_registering_the_same_class_twice_is_harmless(registry: None) -> None:
    assert register_policy(Simple) is Simple
    assert available_policies().count("simple") == 1


def test_a_new_policy_is_one_class_and_usable_by_name(registry: None) -> None:
    @register_policy
    class HighestIndexFirst(Policy):
        """Fills GPUs from the top: a policy written in one class."""

        name = "highest-first"

        def place(self, request: Request, view: PolicyView) -> tuple[int, ...] | None:
            free = [g.index for g in view.gpus if not view.holders_of(g.index)]
            return tuple(free[-request.gpu_count :]) if len(free) >= request.gpu_count else None

    assert "highest-first" in available_policies()
    scheduler = Scheduler([Gpu(i, 1, str(i)) for i in range(3)], "highest-first")
    assert scheduler.submit(Request("a", "c"))[0].gpu_indices == (2,)
    assert scheduler.submit(Request("b", "c", gpu_count=2))[0].gpu_indices == (0, 1)


def test_a_policy_that_places_on_a_held_gpu_is_caught_by_the_core() -> None:
    class Careless(Policy):
        name = "careless"

        def place(self, request: Request, view: PolicyView) -> tuple[int, ...] | None:
            return (0,)

    scheduler = Scheduler([Gpu(0, 1, "0"), Gpu(1, 1, "1")], Careless())
    scheduler.submit(Request("a", "c"))
    with pytest.raises(SchedulerError, match=r"GPU 0 is held.*a bug in the policy"):
        scheduler.submit(Request("b", "c"))


def test_a_scheduler_accepts_a_policy_instance() -> None:
    policy = GpuSharing()
    assert Scheduler([Gpu(0, 1, "0")], policy).policy is policy


class CountingSimple(Simple):
    """Simple, counting the placements it is asked for."""

    name = "counting-simple"
    asked = 0

    def place(self, request: Request, view: PolicyView) -> tuple[int, ...] | None:
        self.asked += 1
        return super().place(request, view)


class CountingClientBound(CountingSimple):
    """As above, but declares that its placements depend on more than count and memory."""

    def shape(self, request: Request) -> None:
        return None


@pytest.mark.parametrize(
    ("policy", "asked_on_submit", "asked_on_release"),
    [(CountingSimple(), 0, 3), (CountingClientBound(), 1, 11)],
    ids=[
        "a policy is asked once per request shape in a pass",
        "a policy without shapes is asked for every waiter",
    ],
)
def test_the_core_skips_shapes_that_did_not_fit(
    policy: CountingSimple, asked_on_submit: int, asked_on_release: int
) -> None:
    scheduler = Scheduler([Gpu(0, 10, "0")], policy)
    scheduler.submit(Request("held", "c"))
    for n in range(10):
        scheduler.submit(Request(f"w{n}", "c", memory_bytes=n % 2))
    policy.asked = 0
    # Nothing was freed since the waiters were tried: a new request is tried alone, and not at
    # all when an earlier waiter of its shape (w0: one GPU, no memory) could not be placed.
    assert scheduler.submit(Request("late", "c")) == []
    assert policy.asked == asked_on_submit
    policy.asked = 0
    # A release tries the first waiter of each shape (w0 is granted, then w2 and w1 do not fit),
    # or, without shapes, every waiter.
    assert [g.request_id for g in scheduler.release("held")] == ["w0"]
    assert policy.asked == asked_on_release
