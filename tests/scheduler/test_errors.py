"""Errors of the scheduler core: what raises, what the message tells a user, and that a refused
call changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from acb_slurm.scheduler import (
    Gpu,
    Infeasible,
    InvalidRequest,
    Policy,
    PolicyView,
    Request,
    Scheduler,
    SchedulerError,
    UnknownRequest,
)

GiB = 1024**3


def two_gpus(policy: str) -> Scheduler:
    """Two 80 GiB GPUs; request `held` by c1 is granted, `waiting` by c2 waits."""
    scheduler = Scheduler([Gpu(i, 80 * GiB, str(i)) for i in range(2)], policy)
    scheduler.submit(Request("held", "c1", gpu_count=2 if policy == "gpu-affinity" else 1))
    if policy != "gpu-affinity":
        scheduler.submit(Request("other", "c1"))
    scheduler.submit(Request("waiting", "c2"))
    return scheduler


@dataclass(frozen=True)
class ErrorCase:
    name: str
    policy: str
    call: Callable[[Scheduler], object]
    error: type[Exception]
    message: str


ERROR_CASES = [
    ErrorCase(
        "zero GPUs is an invalid request",
        "simple",
        lambda s: s.submit(Request("r", "c", gpu_count=0)),
        InvalidRequest,
        "gpu_count must be >= 1, got 0",
    ),
    ErrorCase(
        "negative memory is an invalid request",
        "gpu-sharing",
        lambda s: s.submit(Request("r", "c", memory_bytes=-1)),
        InvalidRequest,
        "memory_bytes must be >= 0 (0 = whole GPU), got -1",
    ),
    ErrorCase(
        "a fractional GPU count is an invalid request",
        "simple",
        lambda s: s.submit(Request("r", "c", gpu_count=1.5)),  # type: ignore[arg-type]
        InvalidRequest,
        "gpu_count must be an int, got 1.5",
    ),
    ErrorCase(
        "an empty client id is an invalid request",
        "simple",
        lambda s: s.submit(Request("r", "")),
        InvalidRequest,
        "client_id must be a non-empty string",
    ),
    ErrorCase(
        "the id of a waiting request cannot be used again",
        "simple",
        lambda s: s.submit(Request("waiting", "c9")),
        InvalidRequest,
        "request id 'waiting' is already waiting; use a new id",
    ),
    ErrorCase(
        "the id of a granted request cannot be used again",
        "gpu-sharing",
        lambda s: s.submit(Request("held", "c9")),
        InvalidRequest,
        "request id 'held' is already granted; use a new id",
    ),
    ErrorCase(
        "more GPUs than the node has can never fit",
        "gpu-affinity",
        lambda s: s.submit(Request("r", "c", gpu_count=3)),
        Infeasible,
        "request 'r' asks for 3 GPUs, this node has 2",
    ),
    ErrorCase(
        "a multi-GPU request under simple can never fit and names the policy to use",
        "simple",
        lambda s: s.submit(Request("r", "c", gpu_count=2)),
        Infeasible,
        "policy simple grants one GPU per request: use gpu-affinity for multi-GPU requests",
    ),
    ErrorCase(
        "more memory than any GPU has can never fit",
        "gpu-sharing",
        lambda s: s.submit(Request("r", "c", memory_bytes=100 * GiB)),
        Infeasible,
        "asks for 100.0GiB per GPU, the largest GPU of this node has 80.0GiB",
    ),
    ErrorCase(
        "required GPUs that do not match the GPU count are an invalid request",
        "gpu-affinity",
        lambda s: s.submit(Request("r", "c", gpu_count=1, required_gpus=(0, 1))),
        InvalidRequest,
        "gpu_count is 1 but required_gpus names 2 GPU(s) [0, 1]; they must match",
    ),
    ErrorCase(
        "a GPU required twice is an invalid request",
        "gpu-affinity",
        lambda s: s.submit(Request("r", "c", gpu_count=2, required_gpus=(1, 1))),
        InvalidRequest,
        "required_gpus [1, 1] names a GPU more than once",
    ),
    ErrorCase(
        "a negative required GPU is an invalid request",
        "gpu-sharing",
        lambda s: s.submit(Request("r", "c", required_gpus=(-1,))),
        InvalidRequest,
        "required_gpus must be a tuple of GPU indices (ints >= 0), got (-1,)",
    ),
    ErrorCase(
        "required GPUs that are not a tuple of ints are an invalid request",
        "simple",
        lambda s: s.submit(Request("r", "c", required_gpus="0")),  # type: ignore[arg-type]
        InvalidRequest,
        "required_gpus must be a tuple of GPU indices (ints >= 0), got '0'",
    ),
    ErrorCase(
        "a required GPU the node does not have can never fit",
        "gpu-sharing",
        lambda s: s.submit(Request("r", "c", required_gpus=(2,))),
        Infeasible,
        "request 'r' requires GPU(s) [2], this node has GPUs 0..1",
    ),
    ErrorCase(
        "required GPUs beyond the node are named even when they outnumber its GPUs",
        "gpu-affinity",
        lambda s: s.submit(Request("r", "c", gpu_count=3, required_gpus=(4, 0, 3))),
        Infeasible,
        "requires GPU(s) [3, 4], this node has GPUs 0..1",
    ),
    ErrorCase(
        "two required GPUs under simple can never fit and name the policy to use",
        "simple",
        lambda s: s.submit(Request("r", "c", gpu_count=2, required_gpus=(1, 0))),
        Infeasible,
        "requires GPUs [0, 1]: policy simple grants one GPU per request: use gpu-affinity",
    ),
    ErrorCase(
        "more memory than a required GPU has can never fit",
        "gpu-sharing",
        lambda s: s.submit(Request("r", "c", memory_bytes=100 * GiB, required_gpus=(1,))),
        Infeasible,
        "requires GPU 1 with 100.0GiB, GPU 1 has 80.0GiB",
    ),
    ErrorCase(
        "releasing an unknown id is refused",
        "simple",
        lambda s: s.release("nope"),
        UnknownRequest,
        "no granted request with id 'nope'",
    ),
    ErrorCase(
        "releasing a waiting request says to withdraw it",
        "simple",
        lambda s: s.release("waiting"),
        UnknownRequest,
        "no granted request with id 'waiting' (it is waiting: withdraw it instead)",
    ),
    ErrorCase(
        "withdrawing a granted request says to release it",
        "gpu-affinity",
        lambda s: s.withdraw("held"),
        UnknownRequest,
        "no waiting request with id 'held' (it is granted: release it instead)",
    ),
    ErrorCase(
        "usage of an unknown id is refused",
        "gpu-sharing",
        lambda s: s.update_usage("nope", 0),
        UnknownRequest,
        "no waiting or granted request with id 'nope'",
    ),
    ErrorCase(
        "negative resident memory is refused",
        "gpu-sharing",
        lambda s: s.update_usage("held", -5),
        InvalidRequest,
        "resident_bytes must be >= 0, got -5",
    ),
]


def snapshot(scheduler: Scheduler) -> tuple[object, ...]:
    return (
        dict(scheduler.holdings),
        tuple(scheduler.queue),
        tuple(scheduler.promised_bytes(g.index) for g in scheduler.gpus),
        tuple(scheduler.bypass_count(r.request_id) for r in scheduler.queue),
    )


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.name for c in ERROR_CASES])
def test_error(case: ErrorCase) -> None:
    scheduler = two_gpus(case.policy)
    before = snapshot(scheduler)
    with pytest.raises(case.error) as raised:
        case.call(scheduler)
    assert case.message in str(raised.value)
    assert snapshot(scheduler) == before, "a refused call must change nothing"


def test_a_refused_submit_does_not_take_a_place_in_the_queue() -> None:
    scheduler = two_gpus("simple")
    with pytest.raises(Infeasible):
        scheduler.submit(Request("big", "c3", gpu_count=2))
    scheduler.submit(Request("later", "c3", priority=0))
    assert [r.request_id for r in scheduler.queue] == ["waiting", "later"]


def test_required_gpus_given_as_a_list_are_kept_as_a_tuple() -> None:
    request = Request("r", "c", gpu_count=2, required_gpus=[1, 0])  # type: ignore[arg-type]
    assert request.required_gpus == (1, 0)
    hash(request)
    scheduler = Scheduler([Gpu(i, 80 * GiB, str(i)) for i in range(2)], "gpu-affinity")
    (grant,) = scheduler.submit(request)
    assert grant.gpu_indices == (0, 1)


def test_a_required_gpu_smaller_than_asked_is_infeasible_though_another_is_big_enough() -> None:
    scheduler = Scheduler([Gpu(0, 80 * GiB, "0"), Gpu(1, 16 * GiB, "1")], "simple")
    with pytest.raises(Infeasible, match=r"requires GPU 1 with 40\.0GiB, GPU 1 has 16\.0GiB"):
        scheduler.submit(Request("r", "c", memory_bytes=40 * GiB, required_gpus=(1,)))
    with pytest.raises(Infeasible, match=r"requires GPU\(s\) \[0\], this node has no GPUs"):
        Scheduler([], "simple").submit(Request("r", "c", required_gpus=(0,)))


class IgnoresPins(Policy):
    """A faulty policy: places every request on the lowest free GPUs, pinned or not."""

    name = "ignores-pins"

    def place(self, request: Request, view: PolicyView) -> tuple[int, ...] | None:
        free = [g.index for g in view.gpus if not view.holders_of(g.index)]
        return tuple(free[: request.gpu_count]) if len(free) >= request.gpu_count else None


def test_a_policy_that_ignores_required_gpus_is_caught_as_a_bug() -> None:
    scheduler = Scheduler([Gpu(i, 80 * GiB, str(i)) for i in range(2)], IgnoresPins())
    with pytest.raises(SchedulerError, match=r"requires GPUs \[1\] \(a bug in the policy\)"):
        scheduler.submit(Request("r", "c", required_gpus=(1,)))


def test_waiters_compare_by_identity() -> None:
    from acb_slurm.scheduler.core import _Waiter

    request = Request("r", "c")
    assert _Waiter(request, 0) != _Waiter(request, 0)


def test_an_unknown_request_error_is_also_a_key_error_with_a_plain_message() -> None:
    error = UnknownRequest("no granted request with id 'x'")
    assert isinstance(error, KeyError)
    assert str(error) == "no granted request with id 'x'"


INVENTORY_CASES = [
    ("indices out of order", [Gpu(1, GiB, "1")], ValueError, "indices must be 0..n-1"),
    ("a GPU without memory", [Gpu(0, 0, "0")], ValueError, "memory_bytes=0; must be > 0"),
    ("not a Gpu", [{"index": 0}], TypeError, "not a Gpu"),
]


@pytest.mark.parametrize(
    ("gpus", "error", "message"),
    [case[1:] for case in INVENTORY_CASES],
    ids=[f"an inventory with {case[0]} is refused" for case in INVENTORY_CASES],
)
def test_bad_inventory(gpus: list[Gpu], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Scheduler(gpus)


@pytest.mark.parametrize("max_bypass", [-1, 1.5, True])
def test_a_bad_bypass_bound_is_refused(max_bypass: object) -> None:
    with pytest.raises(ValueError, match="max_bypass must be an integer >= 0"):
        Scheduler([Gpu(0, GiB, "0")], max_bypass=max_bypass)  # type: ignore[arg-type]


def test_a_node_without_gpus_answers_every_request_with_infeasible() -> None:
    with pytest.raises(Infeasible, match="asks for 1 GPU, this node has 0"):
        Scheduler([], "gpu-sharing").submit(Request("r", "c"))


def test_every_error_is_a_scheduler_error() -> None:
    for error in (InvalidRequest, Infeasible, UnknownRequest):
        assert issubclass(error, SchedulerError)


def test_gpu_views_refuse_an_index_outside_the_inventory() -> None:
    with pytest.raises(IndexError, match=r"no GPU 2: this node has GPUs 0\.\.1"):
        two_gpus("simple").holders_of(2)
