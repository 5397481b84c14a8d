"""The device-use decision as a pure function: a table of calls and what automatic mode decides.

Nothing here installs automatic mode or runs the calls: `uses_device` and `DeviceUse` only read
their arguments. Tensors live on ``cpu`` and ``meta`` (no GPU needed); where a tensor must be ON
the managed device, the managed device is ``meta`` (the rule is the same for every device type
but ``cpu``, on which every call is device use, and ``cuda``, which adds ordinals, ``.cuda()``
and ``.to(0)``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.testing._internal.two_tensor import TwoTensor

from acb_slurm.swap.auto import AutoSwap
from acb_slurm.swap.deviceuse import METADATA_FUNCS, SCAN_DEPTH, DeviceUse, uses_device
from acb_slurm.swap.lessors import LocalLessor


def cpu(*shape: int) -> torch.Tensor:
    return torch.ones(*shape or (2,))


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape or (2,), device="meta")


def nested(value: Any, depth: int) -> Any:
    """`value` inside `depth` levels of lists."""
    for _ in range(depth):
        value = [value]
    return value


@dataclass
class Row:
    id: str
    func: Callable[..., Any]
    args: Callable[[], tuple[Any, ...]]  # built lazily: tensors per test
    expected: bool
    kwargs: Callable[[], dict[str, Any]] = field(default=dict)
    device: str = "cuda"  # the managed device
    default: str = "cpu"  # where a factory without a device lands


def row(
    id: str,
    func: Callable[..., Any],
    args: Callable[[], tuple[Any, ...]],
    expected: bool,
    kwargs: Callable[[], dict[str, Any]] = dict,
    *,
    device: str = "cuda",
    default: str = "cpu",
) -> Any:
    return pytest.param(Row(id, func, args, expected, kwargs, device, default), id=id)


shape_of = getattr(torch.Tensor, "shape").__get__  # noqa: B009 (the descriptor's getter)
grad_of = getattr(torch.Tensor, "grad").__get__  # noqa: B009

TABLE = [
    # -- metadata reads are never device use, whatever the device -------------------------------
    row("metadata-shape-cpu", shape_of, lambda: (cpu(),), False, device="cpu"),
    row("metadata-grad-cpu", grad_of, lambda: (cpu(),), False, device="cpu"),
    row("metadata-size-cpu", torch.Tensor.size, lambda: (cpu(),), False, device="cpu"),
    row("metadata-numel-managed", torch.Tensor.numel, lambda: (meta(),), False, device="meta"),
    row("metadata-len-managed", torch.Tensor.__len__, lambda: (meta(),), False, device="meta"),
    # -- on cpu every other torch call is device use --------------------------------------------
    row("cpu-op", torch.add, lambda: (cpu(), 1), True, device="cpu"),
    row("cpu-meta-factory", torch.zeros, lambda: (3,), True, lambda: {"device": "meta"},
        device="cpu"),
    row("cpu-sum", torch.Tensor.sum, lambda: (meta(),), True, device="cpu"),
    # -- cuda: calls on CPU tensors are CPU phases ----------------------------------------------
    row("cuda-cpu-op", torch.add, lambda: (cpu(), 1), False),
    row("cuda-cpu-matmul", torch.matmul, lambda: (cpu(2, 2), cpu(2, 2)), False),
    row("cuda-to-cpu", torch.Tensor.to, lambda: (cpu(), "cpu"), False),
    row("cuda-cat-cpu", torch.cat, lambda: ([cpu(), cpu()],), False),
    row("cuda-cat-dim", torch.cat, lambda: ([cpu()],), False, lambda: {"dim": 0}),
    row("cuda-pad-ints", torch.nn.functional.pad, lambda: (cpu(), [1, 1]), False),
    # -- cuda: moving to the device --------------------------------------------------------------
    row("to-cuda", torch.Tensor.to, lambda: (cpu(), "cuda"), True),
    row("to-cuda-1", torch.Tensor.to, lambda: (cpu(), "cuda:1"), True),
    row("to-device-object", torch.Tensor.to, lambda: (cpu(), torch.device("cuda", 0)), True),
    row("to-device-kwarg", torch.Tensor.to, lambda: (cpu(),),
        True, lambda: {"device": torch.device("cuda", 1)}),
    row("to-ordinal", torch.Tensor.to, lambda: (cpu(), 0), True),
    row("to-ordinal-dtype", torch.Tensor.to, lambda: (cpu(), 0, torch.float16), True),
    row("to-ordinal-kwarg", torch.Tensor.to, lambda: (cpu(),), True, lambda: {"device": 1}),
    row("to-dtype", torch.Tensor.to, lambda: (cpu(), torch.float16), False),
    row("cuda()", torch.Tensor.cuda, lambda: (cpu(),), True),
    row("add-int-is-no-ordinal", torch.add, lambda: (cpu(), 0), False),
    row("to-ordinal-on-meta", torch.Tensor.to, lambda: (cpu(), 0), False, device="meta"),
    # -- factories ---------------------------------------------------------------------------------
    row("factory-cuda", torch.zeros, lambda: (3,), True, lambda: {"device": "cuda:0"}),
    row("factory-cpu", torch.zeros, lambda: (3,), False, lambda: {"device": "cpu"}),
    row("factory-ordinal", torch.zeros, lambda: (3,), True, lambda: {"device": 0}),
    row("tensor-cuda", torch.tensor, lambda: ([1.0],), True, lambda: {"device": "cuda"}),
    row("factory-default-cpu", torch.empty, lambda: ((3, 3),), False),
    row("factory-default-cuda", torch.empty, lambda: ((3, 3),), True, default="cuda"),
    row("factory-none-default-cpu", torch.empty, lambda: ((3, 3),), False,
        lambda: {"device": None, "dtype": None}),
    row("factory-none-default-managed", torch.empty, lambda: ((3, 3),), True,
        lambda: {"device": None, "dtype": None}, device="meta", default="meta"),
    row("factory-explicit-cpu-default-cuda", torch.empty, lambda: (3,), False,
        lambda: {"device": "cpu"}, default="cuda"),
    row("op-on-cpu-tensor-default-cuda", torch.add, lambda: (cpu(), 1), False, default="cuda"),
    row("cat-cpu-default-cuda", torch.cat, lambda: ([cpu()],), False, default="cuda"),
    # -- tensors on the managed device, nested arguments -------------------------------------------
    row("managed-tensor", torch.add, lambda: (meta(), 1), True, device="meta"),
    row("managed-tensor-kwarg", torch.add, lambda: (cpu(),), True, lambda: {"other": meta()},
        device="meta"),
    row("other-device-tensor", torch.add, lambda: (cpu(), 1), False, device="meta"),
    row("nested-list", torch.cat, lambda: ([[cpu()], [meta()]],), True, device="meta"),
    row("nested-dict-kwarg", torch.Tensor.add, lambda: (cpu(),), True,
        lambda: {"x": {"a": [meta()]}}, device="meta"),
    row("nested-at-scan-depth", torch.cat, lambda: (nested(meta(), SCAN_DEPTH),), True,
        device="meta"),
    row("nested-past-scan-depth", torch.cat, lambda: (nested(meta(), SCAN_DEPTH + 1),), False,
        device="meta"),
    row("device-name-in-list", torch.Tensor.to, lambda: (cpu(), ["meta"]), True, device="meta"),
    row("cpu-tensors-deep-no-factory", torch.cat, lambda: ([[cpu()], [cpu()]],), False,
        default="cuda"),
]  # fmt: skip


@pytest.mark.parametrize("case", TABLE)
def test_which_calls_use_the_managed_device(case: Row) -> None:
    args, kwargs = case.args(), case.kwargs()
    decided = uses_device(case.func, args, kwargs, device=case.device, default_device=case.default)
    assert decided is case.expected


@pytest.mark.parametrize("case", [p for p in TABLE if p.values[0].default == "cpu"])
def test_automatic_mode_decides_by_the_same_table(case: Row) -> None:
    """AutoSwap's hot path (`_uses`) is the same decision (torch's default device is cpu)."""
    assert torch.get_default_device().type == "cpu"
    auto = AutoSwap(LocalLessor(), device=case.device)
    assert auto._uses(case.func, case.args(), case.kwargs()) is case.expected


def explode(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the decision called the function")


def test_deciding_runs_and_changes_nothing() -> None:
    x = torch.ones(4)
    version, default = x._version, torch.get_default_device()
    for device in ("cpu", "cuda", "meta"):
        for default_device in ("cpu", "meta"):
            uses_device(explode, (x, [x, {"k": x}]), {"device": None}, device=device,
                        default_device=default_device)  # fmt: skip
    assert x._version == version and torch.equal(x, torch.ones(4))
    assert torch.get_default_device() == default


def test_device_none_reads_torch_s_default_device_when_not_given() -> None:
    decide = DeviceUse("meta")  # default_device=None: torch's, read per call
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        assert decide(torch.empty, ((3, 3),), {"device": None, "dtype": None})
        assert decide(torch.empty, ((3, 3),), {})
    finally:
        torch.set_default_device(previous)
    assert not decide(torch.empty, ((3, 3),), {"device": None})
    assert not decide(torch.empty, ((3, 3),), {})


def test_the_metadata_set_holds_reads_and_no_computation() -> None:
    assert torch.Tensor.size in METADATA_FUNCS and shape_of in METADATA_FUNCS
    assert torch.Tensor.sum not in METADATA_FUNCS and torch.Tensor.to not in METADATA_FUNCS
    assert torch.Tensor.item not in METADATA_FUNCS  # reads memory


# ---- torch.load: map_location -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("f",), {}, True),  # no map_location: tensors go back where they were saved
        (("f",), {"map_location": None}, True),
        (("f",), {"map_location": "cuda"}, True),
        (("f",), {"map_location": "cuda:0"}, True),
        (("f",), {"map_location": 0}, True),  # an ordinal
        (("f",), {"map_location": torch.device("cuda")}, True),
        (("f",), {"map_location": {"cpu": "cuda:0"}}, True),
        (("f",), {"map_location": lambda storage, where: storage}, True),  # may go anywhere
        (("f", lambda storage, where: storage), {}, True),
        (("f",), {"map_location": "cpu"}, False),
        (("f",), {"map_location": torch.device("cpu")}, False),
        (("f",), {"map_location": {"cuda:0": "cpu"}}, False),
        (("f", "cpu"), {}, False),  # positional map_location
    ],
    ids=[
        "none", "none-kwarg", "cuda-name", "cuda:0", "ordinal", "device", "dict-to-cuda",
        "callable", "callable-positional", "cpu", "cpu-device", "dict-to-cpu", "cpu-positional",
    ],
)  # fmt: skip
def test_load_uses_the_device_unless_map_location_sends_it_elsewhere(
    args: tuple[Any, ...], kwargs: dict[str, Any], expected: bool
) -> None:
    assert DeviceUse("cuda").load(args, kwargs) is expected


# ---- torch.save: a bounded walk of what is saved -----------------------------------------------


class Plain:
    """Any object: torch.save pickles its __dict__."""

    def __init__(self, **attrs: Any):
        self.__dict__.update(attrs)


class Cached(torch.nn.Module):
    """A module keeping a tensor as a plain attribute (neither parameter nor buffer)."""

    def __init__(self, cache: torch.Tensor):
        super().__init__()
        self.cache = cache


GLOBAL_TENSOR = torch.ones(3)


def reads_a_global() -> torch.Tensor:
    return GLOBAL_TENSOR


def looped() -> list[Any]:
    loop: list[Any] = [1, "a"]
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: {"step": 3, "names": ["a", "b"], "dtype": torch.float32}, False),
        (lambda: {"state": [{"w": cpu()}]}, True),
        (lambda: meta(), False),  # another device
        (lambda: [meta(), (meta(), {"x": meta()})], False),
        (lambda: torch.nn.Linear(2, 2), True),  # parameters
        (lambda: torch.nn.Linear(2, 2, device="meta"), False),
        (lambda: Cached(cpu()), True),  # a module's plain attribute
        (lambda: Plain(inner=Plain(t=cpu())), True),  # any object's state
        (lambda: Plain(t=meta()), False),
        (lambda: torch.optim.SGD([torch.nn.Parameter(cpu())], lr=0.1), True),
        (lambda: cpu().untyped_storage(), True),  # a bare storage
        (lambda: torch.UntypedStorage(8, device="meta"), False),
        (lambda: TwoTensor(cpu(), cpu()), True),  # a wrapper subclass: its inner tensors
        (lambda: reads_a_global, False),  # pickled by name: its globals are not saved
        (lambda: torch.nn.Linear, False),  # a class: by name
        (lambda: torch, False),  # a module: by name
        (lambda: looped(), False),  # a cycle ends
    ],
    ids=[
        "plain-values", "nested-tensor", "other-device", "other-device-nested", "module",
        "module-elsewhere", "module-plain-attribute", "object-state", "object-elsewhere",
        "optimizer", "storage", "storage-elsewhere", "two-tensor", "function-by-name",
        "class-by-name", "module-by-name", "cycle",
    ],
)  # fmt: skip
def test_save_uses_the_device_when_what_it_saves_reaches_it(
    make: Callable[[], Any], expected: bool
) -> None:
    decide = DeviceUse("cpu")
    obj = make()
    assert decide.reaches(obj) is expected
    assert decide.save((obj, io.BytesIO()), {}) is expected
    assert decide.save((), {"obj": obj, "f": io.BytesIO()}) is expected  # obj by keyword


def test_save_walk_past_its_budget_answers_yes() -> None:
    """Holding needlessly is safe; writing a storage that is away is not."""
    many = [Plain(n=i) for i in range(50)]
    assert not DeviceUse("cpu").reaches(many)
    assert DeviceUse("cpu").reaches(many, budget=10)
