"""Which torch calls use the managed device: automatic mode's device-use decision, pure.

Given a function, its arguments, the managed device and the default device, `DeviceUse` says
whether the call may read or create memory on the managed device. It reads its arguments (and
``torch.get_default_device()`` when the default device was not given) and changes nothing: no
torch state, no tensor, no lease. `uses_device` is the same decision as one function call, for
tests and tools; automatic mode keeps one `DeviceUse` per process (its hot path).

The rules (docs/ARCHITECTURE.md, "What automatic mode guarantees"):

- a metadata read (``.shape``, ``.grad``, ``size()``, ... : `METADATA_FUNCS`) is never device
  use, even while the storages are away;
- on ``cpu`` every other torch call is device use;
- elsewhere a call uses the device when a tensor on it is among its arguments (nested lists,
  tuples and dicts are scanned `SCAN_DEPTH` deep), an argument names the device (``"cuda:1"``,
  ``torch.device("cuda")``), a ``device=`` argument names it (a bare integer is a CUDA ordinal,
  as in torch; ``device=None`` is the default device), on CUDA ``Tensor.cuda`` and
  ``Tensor.to(0)``, or when it is a factory (no tensor and no ``device`` argument) and the default
  device is the managed one;
- ``torch.load`` may create tensors on the managed device unless ``map_location`` sends them
  elsewhere (`DeviceUse.load`); ``torch.save`` reads device memory when what it saves reaches a
  managed tensor or storage, by a bounded walk of its references (`DeviceUse.save`).
"""

from __future__ import annotations

import gc
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from acb_slurm.swap.engine import _inner_tensors

#: Calls that read a tensor's metadata, never its memory: they are not device use (no lease, no
#: onload), so a program may inspect its tensors while they are away.
METADATA_FUNCS: frozenset[Any] = frozenset(
    [
        *(
            getattr(torch.Tensor, name).__get__
            for name in (
                "shape", "dtype", "device", "grad", "grad_fn", "requires_grad", "is_leaf",
                "layout", "ndim", "is_cuda", "is_sparse", "is_quantized", "is_meta", "names",
                "data", "_version", "itemsize", "nbytes", "output_nr", "_base",
            )
            if hasattr(torch.Tensor, name)
        ),
        *(
            getattr(torch.Tensor, name)
            for name in (
                "size", "dim", "numel", "nelement", "ndimension", "__len__", "stride",
                "storage_offset", "is_contiguous", "element_size", "get_device",
                "is_floating_point", "is_complex", "requires_grad_", "retain_grad",
            )
            if hasattr(torch.Tensor, name)
        ),
    ]
)  # fmt: skip

#: Nested containers are scanned this deep (lists of lists of tensors, dicts of tensors).
SCAN_DEPTH = 3
#: How many objects torch.save's walk visits before it answers "yes" (holding needlessly is
#: safe; writing a storage that is away is not).
SAVE_WALK_BUDGET = 100_000
#: Values that hold no tensor (torch.save's walk stops at them).
_ATOMS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, range)
#: Pickled by name (none of their memory is written): torch.save's walk does not follow them.
_BY_NAME = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)

#: The decision's signature: (func, args, kwargs) -> whether the call uses the managed device.
Decision = Callable[[Callable[..., Any], Sequence[Any], dict[str, Any]], bool]


def names_device(value: Any, device_type: str) -> bool:
    """A device argument (``torch.device``, ``"cuda:0"``) naming `device_type`."""
    if isinstance(value, torch.device):
        return value.type == device_type
    return isinstance(value, str) and value.split(":", 1)[0] == device_type


def device_arg(value: Any, device_type: str) -> bool:
    """A value passed AS a device (``device=``, ``map_location``, ``.to(x)``): a bare integer
    is a CUDA ordinal, as torch reads it."""
    if type(value) is int:
        return device_type == "cuda"
    return names_device(value, device_type)


def _is_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda  # a C attribute; Tensor.device builds a new object on every read


def _default_device_type() -> str:
    return torch.get_default_device().type


class DeviceUse:
    """The device-use decision for one managed device type.

    `default_device` is where a factory without a device argument lands: None reads torch's
    current default device (``torch.get_default_device()``) when a call needs it."""

    __slots__ = ("default_type", "device_type", "every_call", "on_device")

    def __init__(
        self, device: str | torch.device, default_device: str | torch.device | None = None
    ):
        self.device_type: str = torch.device(device).type
        #: On ``cpu`` every torch call (metadata reads aside) is device use.
        self.every_call: bool = self.device_type == "cpu"
        device_type = self.device_type
        #: Whether a (plain) tensor lives on the managed device.
        self.on_device: Callable[[torch.Tensor], bool] = (
            _is_cuda if device_type == "cuda" else lambda t: t.device.type == device_type
        )
        if default_device is None:
            self.default_type: Callable[[], str] = _default_device_type
        else:
            default_type = torch.device(default_device).type
            self.default_type = lambda: default_type

    def __call__(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> bool:
        """Whether calling ``func(*args, **kwargs)`` uses the managed device."""
        return func not in METADATA_FUNCS and (self.every_call or self.touches(func, args, kwargs))

    def touches(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> bool:
        """Whether the arguments reach the managed device (the rule for every device type;
        `__call__` adds the metadata and ``cpu`` rules)."""
        device_type = self.device_type
        on_device = self.on_device
        saw_tensor = False
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if on_device(arg):
                    return True
                saw_tensor = True
            elif isinstance(arg, (list, tuple, dict)):
                found = self._scan(arg, SCAN_DEPTH)
                if found:
                    return True
                saw_tensor = saw_tensor or found is None
            elif names_device(arg, device_type):
                return True
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                if on_device(value):
                    return True
                saw_tensor = True
            elif name == "device":
                if device_arg(value, device_type) or (
                    value is None and self.default_type() == device_type
                ):
                    return True
            elif names_device(value, device_type) or (
                isinstance(value, (list, tuple, dict)) and self._scan(value, SCAN_DEPTH)
            ):
                return True
        if device_type == "cuda":
            if func is torch.Tensor.cuda:
                return True
            # t.to(0) / t.to(0, dtype): an integer ordinal right after the tensor is a device.
            if func is torch.Tensor.to and len(args) > 1 and type(args[1]) is int:
                return True
        # A factory with no tensor and no device argument lands on the default device.
        return not saw_tensor and "device" not in kwargs and self.default_type() == device_type

    def _scan(self, value: Any, depth: int) -> bool | None:
        """True: a tensor on the device or a device name inside `value` (nested containers);
        None: only other tensors seen; False: no tensor at all."""
        saw = False
        items = value.values() if isinstance(value, dict) else value
        for item in items:
            if isinstance(item, torch.Tensor):
                if self.on_device(item):
                    return True
                saw = True
            elif isinstance(item, (list, tuple, dict)):
                if depth > 1:
                    found = self._scan(item, depth - 1)
                    if found:
                        return True
                    saw = saw or found is None
            elif names_device(item, self.device_type):
                return True
        return None if saw else False

    def load(self, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        """Whether ``torch.load(*args, **kwargs)`` may create tensors on the managed device: yes
        unless ``map_location`` sends them elsewhere (a callable may send them anywhere)."""
        location = (
            kwargs["map_location"]
            if "map_location" in kwargs
            else (args[1] if len(args) > 1 else None)
        )
        if location is None or callable(location):
            return True
        if isinstance(location, dict):
            return any(device_arg(v, self.device_type) for v in location.values())
        return device_arg(location, self.device_type)

    def save(self, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        """Whether ``torch.save(*args, **kwargs)`` may read memory on the managed device (what
        it saves reaches a managed tensor or storage: `reaches`)."""
        if args:
            return self.reaches(args[0])
        return "obj" not in kwargs or self.reaches(kwargs["obj"])

    def reaches(self, obj: Any, budget: int = SAVE_WALK_BUDGET) -> bool:
        """Whether serialising `obj` may read memory on the managed device: a walk of what it
        references (containers, modules, plain attributes, optimizers, any object's state),
        bounded; past `budget` objects it answers yes. A wrapper subclass is looked through
        (its inner tensors count, not its placeholder storage). Types, modules and functions are
        pickled by name: not followed."""
        seen: set[int] = set()
        todo = [obj]
        while todo:
            item = todo.pop()
            if isinstance(item, torch.Tensor):
                inner = _inner_tensors(item)
                if inner is None:
                    if self.on_device(item):
                        return True
                else:
                    todo.extend(inner)
                    continue
            elif isinstance(item, torch.UntypedStorage):
                if item.device.type == self.device_type:
                    return True
                continue
            elif isinstance(item, (*_ATOMS, *_BY_NAME)):
                continue
            if id(item) in seen:
                continue
            seen.add(id(item))
            budget -= 1
            if budget < 0:
                return True
            todo.extend(gc.get_referents(item))
        return False


def uses_device(
    func: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    device: str | torch.device,
    default_device: str | torch.device = "cpu",
) -> bool:
    """Whether ``func(*args, **kwargs)`` uses `device` (the managed device) when factories land
    on `default_device`: the decision of `DeviceUse`, in one call."""
    return DeviceUse(device, default_device)(func, args, kwargs or {})


def never(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """The decision in a forked child: nothing is device use (it holds no lease)."""
    return False
