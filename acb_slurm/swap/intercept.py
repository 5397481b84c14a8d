"""What automatic mode changes in torch and threading to see the program's device calls, and
how it undoes it.

- `DeviceUseMode`, a `TorchFunctionMode`: every call the device-use decision picks runs inside
  the gate (`AutoSwap._enter`/`_exit`). While Dynamo traces it is transparent
  (``torch.compiler.is_compiling()`` first), so ``torch.compile`` builds the graphs it builds
  without automatic mode.
- Module regions: ``nn.Module.__call__`` is wrapped (`TorchHooks._module_region`). A module
  call that starts while the state is resident, the lease held and no yield pending counts
  itself in flight for its whole duration (as ``backward()`` does) and runs with the mode popped
  from its thread's stack, so the torch calls inside it cost what they cost without automatic
  mode; any other module call goes call by call through the mode. The price: an offload (idle
  or yield) waits for the outermost module call to end.
- Threads: the installing thread's stack gets the mode, and every thread started through
  `threading` afterwards pushes it before its ``run`` and pops it after (no thread ends with the
  mode on its stack). Threads of gRPC and of this package are left alone; a live thread the mode
  cannot see is reported by `TorchHooks.unguarded_threads` (the watchdog then refuses to
  offload).
- Entry points that read tensor memory outside torch calls: ``torch.save`` and ``torch.load``
  count as calls in flight and bring the state back only when the decision says they reach the
  device; what ``torch.compile`` returns, ``CUDAGraph.replay`` and TorchScript modules (their
  ``__call__`` and exported methods) run under `AutoSwap.hold()`; a TorchScript free function
  cannot be held, so while one exists offloads are refused (`AutoSwap._refusals`); on CUDA the
  first grant is taken before CUDA initialises (``CUDA_VISIBLE_DEVICES`` names its GPU).
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from acb_slurm.swap.auto import AutoSwap

_compiling = torch.compiler.is_compiling
#: Packages whose threads never touch the program's tensors (the client's session, gRPC's own).
_INTERNAL = frozenset(["grpc", "acb_slurm"])


class DeviceUseMode(TorchFunctionMode):
    """Runs every device call inside the gate, after making the device state resident."""

    def __init__(self, auto: AutoSwap):
        super().__init__()
        self._auto = auto

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        # While Dynamo traces, the mode is transparent (what it traces runs under hold()).
        if _compiling():
            return func(*args, **kwargs)
        auto = self._auto
        if auto._off or not auto._uses(func, args, kwargs):
            return func(*args, **kwargs)
        auto._enter()
        try:
            return func(*args, **kwargs)
        finally:
            auto._exit()


class HeldMethod:
    """A TorchScript method that runs under `AutoSwap.hold()`; everything else is the method's."""

    def __init__(self, method: Any, auto: AutoSwap):
        self._method, self._auto = method, auto

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._auto.hold():
            return self._method(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)


def mark_internal(thread: threading.Thread) -> threading.Thread:
    """A thread of automatic mode itself: its torch calls are not the program's."""
    thread._acb_internal = True  # type: ignore[attr-defined]
    return thread


class TorchHooks:
    """The mode on the threads' stacks and the patched entry points of one `AutoSwap`."""

    def __init__(self, auto: AutoSwap):
        self._auto = auto
        self.mode: DeviceUseMode | None = None
        #: Threads whose torch calls go through the mode.
        self.guarded: set[int] = set()
        #: Threads that never touch the program's tensors (the watchdog, gRPC's, the client's).
        self.internal: set[int] = set()
        self._patched: list[tuple[Any, str, Any]] = []

    @property
    def installed(self) -> bool:
        return self.mode is not None

    def install(self) -> None:
        """Push the mode on this thread and on every thread started from now on; wrap the
        entry points."""
        self.mode = DeviceUseMode(self._auto)
        self.mode.__enter__()
        self.guarded.add(threading.get_ident())
        self._guard_new_threads()
        self._wrap_entry_points()

    def uninstall(self) -> None:
        """Pop the mode if it is on top of this thread's stack (else it stays, and passes
        through: `AutoSwap._off`); put every patched attribute back."""
        if self.mode is not None:
            if torch.overrides._get_current_function_mode() is self.mode:
                self.mode.__exit__(None, None, None)
            self.mode = None
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()

    def patch(self, owner: Any, name: str, wrap: Callable[[Any], Any]) -> None:
        """Replace ``owner.name`` by ``wrap(owner.name)`` until `uninstall`."""
        original = getattr(owner, name)
        self._patched.append((owner, name, original))
        setattr(owner, name, wrap(original))

    # ---- threads ------------------------------------------------------------------------------

    def _guard_new_threads(self) -> None:
        """Threads started through `threading` push the mode before their ``run`` and pop it
        after (``Thread._bootstrap_inner`` is wrapped): a thread never ends with the mode on
        its stack, whose C++ destructor would need the GIL, which a thread ending while the
        interpreter finalises cannot have (std::terminate). Threads of gRPC and of this package
        never touch the program's tensors: they are left alone. Threads that run without the
        mode (started before installation, or by ``_thread``) are seen by the watchdog, which
        then refuses to offload: see `unguarded_threads`."""
        me = weakref.ref(self._auto)  # the patch outlives uninstall: do not keep `auto` alive

        def wrap(bootstrap: Callable[[threading.Thread], None]) -> Callable[..., None]:
            @functools.wraps(bootstrap)
            def bootstrap_inner(thread: threading.Thread) -> None:
                auto = me()
                mode = auto._hooks.guard_this_thread(thread) if auto is not None else None
                try:
                    bootstrap(thread)
                finally:
                    if mode is not None and torch.overrides._get_current_function_mode() is mode:
                        mode.__exit__(None, None, None)

            return bootstrap_inner

        self.patch(threading.Thread, "_bootstrap_inner", wrap)

    def guard_this_thread(self, thread: threading.Thread) -> DeviceUseMode | None:
        """In a thread starting: push the mode unless the thread is internal (or mode is off)."""
        auto = self._auto
        if auto._off or auto._passthrough:
            return None
        target = getattr(thread, "_target", None)
        owner = getattr(target, "__module__", None) or ""
        if getattr(thread, "_acb_internal", False) or owner.split(".")[0] in _INTERNAL:
            self.internal.add(threading.get_ident())
            return None
        mode = DeviceUseMode(auto)
        mode.__enter__()
        self.guarded.add(threading.get_ident())
        return mode

    def unguarded_threads(self) -> list[str]:
        """Live threads whose torch calls the mode does not see (besides internal ones)."""
        live = set(sys._current_frames())
        self.guarded &= live
        self.internal &= live
        names = {t.ident: t.name for t in threading.enumerate()}
        return [
            names.get(ident, f"thread {ident}") for ident in live - self.guarded - self.internal
        ]

    # ---- entry points that read tensor memory outside torch calls -------------------------------

    def _wrap_entry_points(self) -> None:
        auto = self._auto
        self.patch(torch, "save", self._held_if(auto._use.save))
        self.patch(torch, "load", self._held_if(auto._use.load))
        self.patch(torch, "compile", self._compile_held)
        self.patch(torch.nn.Module, "__call__", self._module_region)
        # TorchScript runs in C++ without torch function calls: a scripted module's __call__ and
        # its methods are held; a scripted or traced free function cannot be, so while one exists
        # offloads are refused (`_refusals`).
        self.patch(torch.jit.ScriptModule, "__call__", self._held)
        for maker in ("script", "trace", "trace_module", "load", "freeze"):
            self.patch(torch.jit, maker, self._watch_scripted)
        if auto.device.type == "cuda":
            self.patch(torch.cuda.CUDAGraph, "replay", self._held)
            self.patch(torch.cuda, "_lazy_init", self._before_cuda_init)

    def _module_region(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """``nn.Module.__call__`` as one call in flight, without the mode inside (a *region*).

        When the state is resident, the lease held and no yield pending (``not auto._slow``,
        read under ``_mutex``), and this thread's mode is on top of its stack, the module call
        counts itself in flight (as ``backward()`` does) and runs with the mode popped from this
        thread's stack: its torch calls go straight to torch, at the cost they have without
        automatic mode. Safe because the swap path acts only when nothing is in flight: until
        the region ends no offload or release can start, so every call inside it finds the state
        resident and the lease held. A lost lease still stops the process (the program holds
        the device). Anything else (Dynamo tracing, state away or a yield pending, another
        mode on top, a thread without the mode, a module call inside a region or inside the
        mode's handler) is the plain module call, every torch call in it going through the
        mode as before. Threads started inside a region push their own mode.

        Only a module whose state is on the managed device is a region (`on_device`): a module
        of a CPU phase (its parameters on the host) runs call by call, so the GPU still goes back
        while it runs. The price: a device module's call that starts while the state is
        resident keeps it resident until it returns, so an offload (idle or yield) waits for the
        outermost such call to end instead of the next gap between two torch calls inside it."""
        auto = self._auto
        stack_len = torch._C._len_torch_function_stack
        stack_at = torch._C._get_function_stack_at
        pop = torch._C._pop_torch_function_stack
        push = torch._C._push_on_torch_function_stack

        device_type = auto.device.type

        def on_device(module: Any) -> bool:
            """Whether the module keeps state on the managed device (its first parameter, else
            its first buffer, is there; on ``cpu`` every module). A module with none, or with
            its state elsewhere (a CPU phase written as modules), is no region: its torch calls
            go call by call, and the GPU can go back while it runs."""
            if device_type == "cpu":
                return True
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                return bool(tensor.device.type == device_type)
            return False

        @functools.wraps(call)
        def region_call(module: Any, *args: Any, **kwargs: Any) -> Any:
            if _compiling() or auto._slow:
                return call(module, *args, **kwargs)
            depth = stack_len()
            mode = stack_at(depth - 1) if depth else None
            if type(mode) is not DeviceUseMode or mode._auto is not auto:
                return call(module, *args, **kwargs)
            counted = False
            pop()  # the checks below read tensors: not through the mode
            try:  # one try from the pop on: the mode always goes back, a count always ends
                if on_device(module):
                    with auto._mutex:
                        if not (auto._slow or auto._off or auto._passthrough):
                            auto._active += 1
                            counted = True
                            auto._calls += 1
                if counted:
                    return call(module, *args, **kwargs)
            finally:
                push(mode)
                if counted:
                    auto._exit()
            return call(module, *args, **kwargs)  # not a region: call by call, through the mode

        return region_call

    def _watch_scripted(self, make: Callable[..., Any]) -> Callable[..., Any]:
        """What TorchScript makes: a module's exported methods (ScriptMethods kept in its
        instance dict) are held like ``__call__``; a free function cannot be held, so while one
        exists offloads are refused and said so once."""
        auto = self._auto

        @functools.wraps(make)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            made = make(*args, **kwargs)
            if isinstance(made, torch.jit.ScriptModule):
                for module in made.modules():
                    for name, value in list(vars(module).items()):
                        if isinstance(value, torch._C.ScriptMethod):
                            vars(module)[name] = HeldMethod(value, auto)
            elif isinstance(made, torch._C.ScriptFunction):
                auto._refusals.add(
                    f"TorchScript function {getattr(made, 'name', '?')!s} reads tensors outside "
                    "torch calls"
                )
            return made

        return wrapper

    def _held(self, func: Callable[..., Any]) -> Callable[..., Any]:
        auto = self._auto

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with auto.hold():
                return func(*args, **kwargs)

        return wrapper

    def _held_if(
        self, needed: Callable[[Sequence[Any], dict[str, Any]], bool]
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Like `_held`, except that the state is brought back only when `needed(args, kwargs)`.
        The call is counted in flight either way, so no swap-out can start in its middle (a
        slow ``torch.save`` must not see its storages go away half-written)."""
        auto = self._auto

        def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if auto._passthrough or auto._off:
                    return func(*args, **kwargs)
                auto._enter(resident=auto._slow and needed(args, kwargs))
                try:
                    return func(*args, **kwargs)
                finally:
                    auto._exit()

            return wrapper

        return wrap

    def _compile_held(self, compile_: Callable[..., Any]) -> Callable[..., Any]:
        """torch.compile whose results run under hold(): a compiled function is wrapped, a
        compiled module's class gets a held __call__ (once)."""

        @functools.wraps(compile_)
        def wrapper(model: Any = None, *args: Any, **kwargs: Any) -> Any:
            if model is None:  # @torch.compile(mode=...) : a decorator comes back
                decorate = compile_(None, *args, **kwargs)
                return lambda fn: self._hold_compiled(decorate(fn))
            return self._hold_compiled(compile_(model, *args, **kwargs))

        return wrapper

    def _hold_compiled(self, compiled: Any) -> Any:
        if isinstance(compiled, torch.nn.Module):
            cls = type(compiled)
            if not getattr(cls.__call__, "_acb_held", False):
                self.patch(cls, "__call__", self._held)
                cls.__call__._acb_held = True  # type: ignore[attr-defined]
            return compiled
        return self._held(compiled)

    def _before_cuda_init(self, init: Callable[[], None]) -> Callable[[], None]:
        """Acquire before CUDA initialises, so CUDA_VISIBLE_DEVICES names the granted GPU."""
        auto = self._auto

        @functools.wraps(init)
        def wrapper() -> None:
            if (
                not auto._passthrough
                and not torch.cuda.is_initialized()
                and auto._state.pinned is None
            ):
                with auto._mutex:
                    if auto._slow:
                        auto._make_resident()
            init()

        return wrapper
