"""Automatic PyTorch mode: hold a GPU only while the program uses it, with no code change.

A `torch.overrides.TorchFunctionMode` sees every torch call (functions, tensor methods and
attributes, ``backward``, ``autograd.grad``) of the thread that installed it and of every thread
started through `threading` afterwards (pushed before the thread's ``run``, popped after). A
call that touches the managed device first makes sure the process holds a lease and its
storages are resident (acquire, then the backend's ``onload``). A watchdog thread notices when
no device call has run for the idle interval and then, between calls, synchronises, offloads and
releases. A `YieldRequest` from the assigner is honoured at the
next safe point: when no call is in flight, by the watchdog or by the next outermost call.

THE GATE: every intercepted device call counts itself in flight (`_active`, under `_mutex`) for
its whole duration, in whichever thread it runs; the swap path holds `_mutex` and acts only when
nothing is in flight, so no tensor operation runs while its storage is away, and calls of
different threads still run concurrently (one lock held through every call would serialise them,
and deadlock a call that waits on another thread's torch work, as compile workers do). Code that
reads tensor memory outside torch calls runs under `AutoSwap.hold()`; ``torch.save`` (which
streams storages, maybe into a slow file) and ``torch.load`` are wrapped with it. A live thread the
mode cannot see (started before installation, or by ``_thread``) makes the watchdog refuse to
offload while it lives (said once, naming it). A numpy view of a tensor (possible only under the
``cpu`` device) reads memory behind the gate's back: it must not be kept across a CPU phase.

Why a TorchFunctionMode rather than a TorchDispatchMode: the dispatch mode also sees the kernels
autograd runs, but costs more per op and puts every op through Python with unwrapped arguments;
the function mode sees the Python entry points, which is where a program can be between two GPU
phases, and ``backward()`` is one call that stays in flight throughout. Overhead of both is
measured by ``benchmarks/swap_cpu_bench.py``.

What is not device use: reading a tensor's metadata (``.shape``, ``.dtype``, ``.device``,
``.grad``, ``size()``, ``numel()``, ``len()``, ... : `METADATA_FUNCS`) never takes the GPU, even
while the storages are away. ``torch.load`` brings the state back only when it may create
tensors on the managed device (no ``map_location``, or one naming it), ``torch.save`` only when
what it saves reaches a managed tensor or storage.

CUDA graphs and ``torch.compile``: while Dynamo traces, the mode is transparent (it checks
``torch.compiler.is_compiling()`` first), so compile builds the graphs it builds without
automatic mode. ``CUDAGraph.replay`` and every callable ``torch.compile`` returns (functions and
compiled modules) run under `AutoSwap.hold()`, so the watchdog cannot offload in the middle of
one. While a CUDA graph's private pool exists the engine refuses to offload (see `SwapEngine`):
the lease is kept, the refusal said once, and the watchdog retries with exponential backoff;
``ACB_SWAP_ALLOW_GRAPHS=1`` opts in for programs that re-capture after every swap.

A lost lease (the assigner died or restarted, or dropped this process as silent after a
SIGSTOP; the lessor calls `lease_lost`, from the client's session thread, at once): while the
program holds the device its data lives on a GPU that may already be another process's, and
cannot be saved safely, so the process says so in one line on stderr and exits at once with
`ExitCode.LEASE_LOST` (70, ``os._exit``: no exit handler runs). A swap-out in progress is let
finish (the state reaches host memory, and the release finds the lease already gone); if it
fails, the program is stopped the same way. With the state in host memory nothing is lost: the
next device call asks for a new lease (an error from that call if the assigner is gone).

Exit: `shutdown()` (run by the launcher after every exit handler of the program) only stops the
watchdog; the hooks stay, so exit handlers, finalizers and module teardown find their tensors.

Limits (documented, not silent): a compilation longer than the idle interval happens inside a
held call, so it is not idle; a forked child (DataLoader worker) inherits the mode but not the
lease, so all its calls, ``torch.save`` and ``torch.load`` included, pass straight through (it must
not use the managed device, which holds for DataLoader workers). On CUDA the process is bound to
the GPU of its first grant (tensors carry a device index), so ``CUDA_VISIBLE_DEVICES`` is set from
that grant before CUDA initialises and later grants must name the same GPU.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import gc
import logging
import os
import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.overrides import TorchFunctionMode

from acb_slurm import env
from acb_slurm.exitcodes import ExitCode
from acb_slurm.swap.backend import DEFAULT_BACKEND, SwapBackend, create_backend
from acb_slurm.swap.engine import SwapError, SwapState, SwapWarning, _inner_tensors
from acb_slurm.units import format_size

log = logging.getLogger(__name__)

#: Default idle interval before a swap-out, in milliseconds.
DEFAULT_IDLE_MS = env.DEFAULT_IDLE_MS
#: How often resident bytes are reported while a lease is held, in seconds.
DEFAULT_REPORT_S = 5.0
#: A failed swap-out is retried after idle/4, doubling up to this many seconds.
MAX_RETRY_S = 60.0

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


class AutoModeError(RuntimeError):
    """Automatic mode cannot go on (the message says why and what to do)."""


@dataclass(frozen=True)
class Lease:
    """What a grant gives automatic mode: its id and the devices to use."""

    lease_id: str
    device_ids: tuple[str, ...] = ()


class DeviceLessor(Protocol):
    """The client seam automatic mode needs: acquire/release one lease and report usage."""

    def acquire(self) -> Lease:
        """Block until a lease is granted."""
        ...

    def release(self, lease: Lease, *, yielded: bool = False) -> None:
        """Give `lease` back; `yielded` when it answers a YieldRequest (sends YieldDone)."""
        ...

    def report_usage(self, lease: Lease, resident_bytes: int) -> None:
        """Tell the assigner how many device bytes this process holds under `lease`."""
        ...

    def abandon(self) -> None:
        """After a failed release: end the session so that the assigner frees what it held."""
        ...


class Phase(enum.StrEnum):
    """Where the program stands: AWAY (no lease, storages in host memory) → ACQUIRING →
    HOLDING (lease held, storages resident) → RELEASING → AWAY."""

    AWAY = "away"
    ACQUIRING = "acquiring"
    HOLDING = "holding"
    RELEASING = "releasing"


@dataclass
class AutoStats:
    """Counters of one automatic-mode run (for logs, tests and benchmarks)."""

    acquires: int = 0
    releases: int = 0
    yields: int = 0
    offloaded_bytes: int = 0
    onloaded_bytes: int = 0
    swap_seconds: float = 0.0
    wait_seconds: float = 0.0
    failed_swaps: int = 0  # swap-outs refused by the engine (the lease was kept)
    failed_releases: int = 0  # release calls that failed (the session was ended instead)


class _DeviceUseMode(TorchFunctionMode):
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
        if _compiling() or func in METADATA_FUNCS:
            return func(*args, **kwargs)
        auto = self._auto
        if auto._off:
            return func(*args, **kwargs)
        if auto._every_call or auto._touches(func, args, kwargs):
            auto._enter()
            try:
                return func(*args, **kwargs)
            finally:
                auto._exit()
        return func(*args, **kwargs)


_compiling = torch.compiler.is_compiling
#: Packages whose threads never touch the program's tensors (the client's session, gRPC's own).
_INTERNAL = frozenset(["grpc", "acb_slurm"])


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _names_device(value: Any, device_type: str) -> bool:
    """A device argument (``torch.device``, ``"cuda:0"``) naming `device_type`."""
    if isinstance(value, torch.device):
        return value.type == device_type
    return isinstance(value, str) and value.split(":", 1)[0] == device_type


def _device_arg(value: Any, device_type: str) -> bool:
    """A value passed AS a device (``device=``, ``map_location``, ``.to(x)``): a bare integer
    is a CUDA ordinal, as torch reads it."""
    if type(value) is int:
        return device_type == "cuda"
    return _names_device(value, device_type)


def _is_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda  # a C attribute; Tensor.device builds a new object on every read


#: Nested containers are scanned this deep (lists of lists of tensors, dicts of tensors).
_SCAN_DEPTH = 3
#: Values that hold no tensor (torch.save's scan stops at them).
_ATOMS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, range)
#: Pickled by name (none of their memory is written): torch.save's scan does not follow them.
_BY_NAME = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)


class _HeldMethod:
    """A TorchScript method that runs under `AutoSwap.hold()`; everything else is the method's."""

    def __init__(self, method: Any, auto: AutoSwap):
        self._method, self._auto = method, auto

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._auto.hold():
            return self._method(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)


class AutoSwap:
    """Automatic mode for one process: hooks, watchdog, the one lock, and the swap engine."""

    def __init__(
        self,
        lessor: DeviceLessor,
        *,
        device: str = "cuda",
        idle_ms: float = DEFAULT_IDLE_MS,
        report_s: float = DEFAULT_REPORT_S,
        engine: SwapBackend | None = None,
        backend: str = DEFAULT_BACKEND,
        allow_graph_pools: bool = False,
    ):
        if idle_ms <= 0:
            raise ValueError(f"idle interval must be positive, got {idle_ms} ms")
        self.lessor = lessor
        self.device = torch.device(device)
        self.idle_s = idle_ms / 1000.0
        self.report_s = report_s
        self.engine: SwapBackend = engine or create_backend(
            backend, str(self.device), allow_graph_pools=allow_graph_pools
        )
        # The gate: `_active` counts device calls in flight in every thread; the swap path holds
        # `_mutex` and acts only when `_active` is 0, so no call runs while storages are away.
        self._mutex = threading.RLock()
        self._active = 0
        self.stats = AutoStats()
        self.phase = Phase.AWAY
        self._lease: Lease | None = None
        self._lost: set[str] = set()  # lease ids the lessor said were lost (`lease_lost`)
        self._pinned: tuple[str, ...] | None = None  # CUDA: the devices this process is bound to
        self._slow = True  # fast-path flag: not resident, or a yield is pending
        self._yield_for: str | None = None  # lease id a YieldRequest named
        self._calls = 0  # device calls started (the watchdog compares samples)
        self._every_call = self.device.type == "cpu"  # on cpu every torch call is device use
        device_type = self.device.type
        self._on_device: Callable[[torch.Tensor], bool] = (
            _is_cuda if device_type == "cuda" else lambda t: t.device.type == device_type
        )
        self._passthrough = False  # a forked child: nothing is intercepted
        self._retry_s = 0.0  # backoff after a failed swap-out (0: none pending)
        self._mode: _DeviceUseMode | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._patched: list[tuple[Any, str, Any]] = []
        self._reported = -1
        self._off = False  # uninstalled: modes left on other threads' stacks pass through
        self._exiting = False  # shutdown(): no lease is asked for again
        self._guarded: set[int] = set()  # threads whose torch calls go through the mode
        self._internal: set[int] = set()  # the watchdog: never touches program tensors
        self._said: set[str] = set()  # refusals already reported (each is said once)
        self._refusals: set[str] = set()  # standing reasons not to offload at all

    # ---- installation -----------------------------------------------------------------------

    def install(self) -> None:
        """Start intercepting the torch calls of this thread and of every thread started from
        now on, and start the watchdog."""
        if self._mode is not None:
            raise AutoModeError("automatic mode is already installed in this process")
        self._mode = _DeviceUseMode(self)
        self._mode.__enter__()
        self._guarded.add(threading.get_ident())
        self._guard_new_threads()
        self._wrap_entry_points()
        self._stop.clear()
        self._off = False
        watchdog = threading.Thread(target=self._watch, name="acb-auto-watchdog", daemon=True)
        watchdog._acb_internal = True  # type: ignore[attr-defined]
        watchdog.start()
        self._watchdog = watchdog
        if watchdog.ident is not None:
            self._internal.add(watchdog.ident)
        me = weakref.ref(self)  # fork callbacks cannot be unregistered: do not keep self alive

        def in_child() -> None:
            auto = me()
            if auto is not None:
                auto._forked()

        os.register_at_fork(after_in_child=in_child)

    def _guard_new_threads(self) -> None:
        """Threads started through `threading` push the mode before their ``run`` and pop it
        after (``Thread._bootstrap_inner`` is wrapped): a thread never ends with the mode on
        its stack, whose C++ destructor would need the GIL, which a thread ending while the
        interpreter finalises cannot have (std::terminate). Threads of gRPC and of this package
        never touch the program's tensors: they are left alone. Threads that run without the
        mode (started before installation, or by ``_thread``) are seen by the watchdog, which
        then refuses to offload: see `_unguarded_threads`."""
        me = weakref.ref(self)

        def wrap(bootstrap: Callable[[threading.Thread], None]) -> Callable[..., None]:
            @functools.wraps(bootstrap)
            def bootstrap_inner(thread: threading.Thread) -> None:
                auto = me()
                mode = auto._guard_this_thread(thread) if auto is not None else None
                try:
                    bootstrap(thread)
                finally:
                    if mode is not None and torch.overrides._get_current_function_mode() is mode:
                        mode.__exit__(None, None, None)

            return bootstrap_inner

        self._patch(threading.Thread, "_bootstrap_inner", wrap)

    def _guard_this_thread(self, thread: threading.Thread) -> _DeviceUseMode | None:
        if self._off or self._passthrough:
            return None
        target = getattr(thread, "_target", None)
        owner = getattr(target, "__module__", None) or ""
        if getattr(thread, "_acb_internal", False) or owner.split(".")[0] in _INTERNAL:
            self._internal.add(threading.get_ident())
            return None
        mode = _DeviceUseMode(self)
        mode.__enter__()
        self._guarded.add(threading.get_ident())
        return mode

    def _unguarded_threads(self) -> list[str]:
        """Live threads whose torch calls the mode does not see (besides the watchdog)."""
        live = set(sys._current_frames())
        self._guarded &= live
        self._internal &= live
        names = {t.ident: t.name for t in threading.enumerate()}
        return [
            names.get(ident, f"thread {ident}") for ident in live - self._guarded - self._internal
        ]

    def _say_once(self, level: int, message: str, *args: Any) -> None:
        """Log a refusal the first time; later repeats of the same message at debug level."""
        text = message % args if args else message
        log.log(level if text not in self._said else logging.DEBUG, "%s", text)
        self._said.add(text)

    def _forked(self) -> None:
        """In a forked child (DataLoader workers): no watchdog, no lease, no session of its own,
        so every call, hold() and the wrapped entry points included, passes straight through.
        The mode stays on the stack (it is the parent's)."""
        self._passthrough = True
        self._every_call = False
        self._slow = False
        self._yield_for = None
        self._touches = lambda func, args, kwargs: False  # type: ignore[method-assign]
        self._watchdog = None
        self._lease = None
        self._mutex = threading.RLock()  # the parent's may have been held by another thread
        self._active = 0

    def uninstall(self) -> None:
        """Stop intercepting: bring the storages back (acquiring a lease if they are away),
        release the lease, and leave the program's tensors as if automatic mode never ran.
        Call from the thread that installed."""
        if self._passthrough:  # a forked child holds nothing of its own
            return
        self._stop_watchdog()
        with self._mutex:
            if self.engine.state is SwapState.OFFLOADED:
                self._make_resident()
            self._off = True
            if self._mode is not None:
                # Pop it only if it is on top (else it stays, and passes through: `_off`).
                if torch.overrides._get_current_function_mode() is self._mode:
                    self._mode.__exit__(None, None, None)
                self._mode = None
            for owner, name, original in reversed(self._patched):
                setattr(owner, name, original)
            self._patched.clear()
            if self._lease is not None:
                try:
                    self._release(yielded=False)
                except Exception as exc:  # the session may be gone; the assigner frees it then
                    log.warning("releasing the lease failed: %s", exc)
            self.phase = Phase.AWAY
            self.engine.close()

    def shutdown(self) -> None:
        """At interpreter exit, after every exit handler and finalizer of the program: stop the
        watchdog and ask for no lease again; the caller then ends the session (which frees a
        lease still held). The hooks stay for what still runs (module teardown): resident state
        is used as it is; on ``cpu`` state that is away is brought back on first touch, on CUDA
        such a touch raises `AutoModeError` (the GPU is no longer held) rather than read freed
        memory."""
        if self._passthrough:
            return
        self._stop_watchdog()
        with self._mutex:
            self._exiting = True
            self._slow = True

    def _stop_watchdog(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join()
        self._watchdog = None

    def __enter__(self) -> AutoSwap:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    # ---- public controls ----------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """A region in which the device state stays resident (code reading tensor memory
        outside torch calls, e.g. streaming a checkpoint)."""
        if self._passthrough or self._off:
            yield
            return
        self._enter()
        try:
            yield
        finally:
            self._exit()

    def _enter(self, *, resident: bool = True) -> None:
        """A device call starts (any thread): make the state resident (with `resident`), then
        count the call in flight. The swap path cannot run until `_exit`."""
        with self._mutex:
            if resident and self._slow:
                self._make_resident()
            self._active += 1
            self._calls += 1

    def _exit(self) -> None:
        with self._mutex:
            self._active -= 1
            self._calls += 1
            if not self._active and self._yield_for is not None:
                self._wake.set()  # a yield waited for the calls in flight: now is a safe point

    @property
    def busy(self) -> bool:
        """A device call (or a hold()) is in flight in some thread."""
        return self._active > 0

    def request_yield(self, lease_id: str, reason: str = "") -> None:
        """Called from the client's thread on a YieldRequest: give the lease back at the next
        safe point (then ask again at the next device call)."""
        if self._passthrough or self._lease is None or self._lease.lease_id != lease_id:
            log.debug("yield request for %s ignored: not held", lease_id)
            return
        log.info("yield requested for lease %s (%s)", lease_id, reason or "no reason given")
        self._yield_for = lease_id
        self._slow = True
        self._wake.set()

    def lease_lost(self, lease_id: str, reason: str = "") -> None:
        """Called from the client's thread when a lease is lost (its session ended: the
        assigner died or restarted, or dropped this process). Holding it, the program stops at
        once (`_stop_on_lost_lease`): its data is on a GPU another process may hold now. A
        swap-out in progress or a grant being taken into use decide on their own thread (they
        check `_lost` after their step). With the state in host memory, nothing to do: the next
        device call asks for a new lease."""
        if self._passthrough or self._off:
            return
        self._lost.add(lease_id)  # first: the swap path checks it after changing `phase`
        lease = self._lease
        if lease is None or lease.lease_id != lease_id:
            log.warning(
                "lease %s was lost while the program's state was in host memory (%s); the next "
                "device call asks for a new one",
                lease_id,
                reason or "its session ended",
            )
            return
        if self._exiting:
            log.warning("lease %s was lost after the program ended (%s)", lease_id, reason)
            return
        if self.phase in (Phase.RELEASING, Phase.ACQUIRING):
            return  # that step, on its own thread, sees `_lost` when it ends
        self._stop_on_lost_lease(lease_id, reason)

    def _stop_on_lost_lease(self, lease_id: str, reason: str) -> None:
        """The lease the program holds the device under is gone: stop the process now (one
        line on stderr, exit `ExitCode.LEASE_LOST`). Its device data cannot be saved safely,
        and running on would use a GPU that may be another process's."""
        code = int(ExitCode.LEASE_LOST)
        message = (
            f"acb-run --auto: lease {lease_id} was lost while the program held the GPU "
            f"({reason or 'its session ended'}); stopping the program (exit {code}) rather than "
            "run on a GPU that may be another process's\n"
        )
        with contextlib.suppress(OSError):
            os.write(2, message.encode("utf-8", "replace"))
        # What the program printed so far, best effort: another thread may hold a stream's lock.
        flusher = threading.Thread(target=_flush_std_streams, daemon=True)
        flusher._acb_internal = True  # type: ignore[attr-defined]
        flusher.start()
        flusher.join(1.0)
        os._exit(code)

    def swap_out(self, reason: str = "manual") -> None:
        """Offload and release now, once no device call is in flight in any thread (it waits
        for them; never call it from inside one)."""
        while True:
            with self._mutex:
                if not self._active:
                    self._leave(reason)
                    return
            time.sleep(0.001)

    @property
    def holding(self) -> bool:
        return self._lease is not None

    # ---- the slow path (lock held) --------------------------------------------------------------

    def _make_resident(self) -> None:
        # The engine's own torch calls must not come back through the mode (hold() and the
        # CUDA-init hook call this outside __torch_function__, where the mode is active).
        with torch._C.DisableTorchFunction():
            self._make_resident_unhooked()

    def _make_resident_unhooked(self) -> None:
        if self._exiting:
            self._resident_after_shutdown()
            return
        # A yield is a safe point only between calls: with a call in flight (an outer call of
        # this thread, or another thread's) the watchdog honours it once they end.
        if self._yield_for is not None and self._active == 0:
            if self._lease is not None and self._lease.lease_id == self._yield_for:
                self._leave("yield")
            self._yield_for = None
        while self._lease is None:
            self.phase = Phase.ACQUIRING
            start = time.perf_counter()
            lease = self.lessor.acquire()
            self.stats.wait_seconds += time.perf_counter() - start
            self.stats.acquires += 1
            self._bind(lease)
            self._lease = lease
            if lease.lease_id in self._lost:  # lost before it was used: ask again
                log.warning("lease %s was lost as it was granted; asking again", lease.lease_id)
                self._lease = None
                with contextlib.suppress(Exception):
                    self.lessor.release(lease)  # forgets it: nothing to give back
        onloaded: int | None = None
        if self.engine.state is SwapState.OFFLOADED:
            stats = self.engine.onload()  # on failure the lease stays held and the error surfaces
            self.stats.onloaded_bytes += stats.bytes
            self.stats.swap_seconds += stats.seconds
            onloaded = stats.bytes
            log.info("%s", stats)
        self.phase = Phase.HOLDING
        self._slow = self._yield_for is not None
        self._check_lost()
        if self.device.type == "cuda":
            self._report(force=True)  # memory_reserved(): no walk
        elif onloaded is not None:
            self._report(force=True, resident=onloaded)
        # else (cpu, nothing onloaded): the watchdog reports within report_s; a walk per grant
        # would cost the program tens of ms on every first call after a grant.

    def _resident_after_shutdown(self) -> None:
        if self.engine.state is SwapState.OFFLOADED:
            if self.device.type != "cpu":
                raise AutoModeError(
                    "a tensor was used during interpreter teardown, after automatic mode gave "
                    f"the GPU back: its state is in host memory and {self.device} is not held"
                )
            self.engine.onload()  # host memory on both sides: no device to hold
        self._lease = None
        self._slow = False

    def _leave(self, reason: str) -> None:
        """Synchronise, offload and release (no-op without a lease)."""
        if self._lease is None:
            return
        with torch._C.DisableTorchFunction():
            self._leave_unhooked(reason)

    def _leave_unhooked(self, reason: str) -> None:
        self.phase = Phase.RELEASING
        if self.engine.state is SwapState.RESIDENT:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", SwapWarning)
                    stats = self.engine.offload()
            except Exception as exc:  # SwapError, or anything the engine did not foresee
                # The data is still on the device: keep the lease rather than lose it.
                self._refuse(str(exc) if isinstance(exc, SwapError) else repr(exc))
                return
            self._retry_s = 0.0
            for w in caught:
                log.warning("%s", w.message)
            self.stats.offloaded_bytes += stats.bytes
            self.stats.swap_seconds += stats.seconds
            log.info("%s (%s)", stats, reason)
        self._release(yielded=reason == "yield")

    def _check_lost(self) -> None:
        """After `phase` became HOLDING: if the lease was lost meanwhile (`lease_lost` left it
        to this thread), stop the program."""
        lease = self._lease
        if lease is not None and lease.lease_id in self._lost and not self._exiting:
            self._stop_on_lost_lease(lease.lease_id, "its session ended")

    def _refuse(self, why: str) -> None:
        """A swap-out cannot be done safely now: keep the lease, back off, say so once."""
        self.phase = Phase.HOLDING
        self._check_lost()  # the lease was lost during the failed swap-out
        self.stats.failed_swaps += 1
        self._retry_s = min(max(self._retry_s * 2, self.idle_s / 4), MAX_RETRY_S)
        self._say_once(
            logging.WARNING, "not releasing the GPU (%s): the lease is kept and retried later", why
        )

    def _release(self, *, yielded: bool) -> None:
        """Give the lease back. If the release call fails the lease may still be held by the
        assigner; retrying is impossible (the client forgot it), so the session is ended, which
        makes the assigner release everything it held. Either way the lease is gone."""
        lease, self._lease = self._lease, None
        self._slow = True
        self._reported = -1
        self.phase = Phase.AWAY
        assert lease is not None
        self.stats.releases += 1
        self.stats.yields += int(yielded)
        try:
            self.lessor.release(lease, yielded=yielded)
        except Exception as exc:
            self.stats.failed_releases += 1
            log.error(
                "releasing lease %s failed (%s): ending the session so that the assigner frees it",
                lease.lease_id,
                exc,
            )
            abandon = getattr(self.lessor, "abandon", None)
            if abandon is not None:
                abandon()

    def _bind(self, lease: Lease) -> None:
        """CUDA: bind the process to the first grant's GPUs; later grants are pinned to them (the
        lessor sends `required_gpus`), so a mismatch is a bug."""
        if self.device.type != "cuda" or not lease.device_ids:
            return
        if self._pinned is None:
            if torch.cuda.is_initialized():
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                if visible is not None and tuple(visible.split(",")) != lease.device_ids:
                    log.warning(
                        "CUDA was initialised before the first grant (CUDA_VISIBLE_DEVICES=%s); "
                        "the grant names %s",
                        visible,
                        ",".join(lease.device_ids),
                    )
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(lease.device_ids)
            self._pinned = lease.device_ids
        elif lease.device_ids != self._pinned:
            # Cannot happen: the lessor pins every later request to the first grant's GPUs, and
            # the assigner grants a pinned request exactly those. Fail loudly rather than run
            # with tensors on GPUs this lease does not cover.
            self.lessor.release(lease)
            raise AutoModeError(
                f"granted GPU(s) {','.join(lease.device_ids)} to a request pinned to "
                f"{','.join(self._pinned)} (where this process's tensors live): the lessor did "
                "not pin the request, or the assigner ignored the pin (a bug)"
            )

    def _report(self, *, force: bool = False, resident: int | None = None) -> None:
        if self._lease is None:
            return
        if resident is None:
            resident = self._resident_bytes()
        if force or resident != self._reported:
            self._reported = resident
            try:
                self.lessor.report_usage(self._lease, resident)
            except Exception as exc:  # a usage report is advice; never fail the program on it
                log.warning("usage report failed: %s", exc)

    def _resident_bytes(self) -> int:
        """What this process holds on the device: the caching allocator's reservation on CUDA;
        elsewhere a walk of the storages (tens of ms, so only every `report_s`)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_reserved()) if torch.cuda.is_initialized() else 0
        return self.engine.resident_bytes()

    # ---- which calls touch the device -----------------------------------------------------------

    def _touches(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> bool:
        device_type = self.device.type
        on_device = self._on_device
        saw_tensor = False
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if on_device(arg):
                    return True
                saw_tensor = True
            elif isinstance(arg, (list, tuple, dict)):
                found = self._scan(arg, _SCAN_DEPTH)
                if found:
                    return True
                saw_tensor = saw_tensor or found is None
            elif _names_device(arg, device_type):
                return True
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                if on_device(value):
                    return True
                saw_tensor = True
            elif name == "device":
                if _device_arg(value, device_type) or (
                    value is None and torch.get_default_device().type == device_type
                ):
                    return True
            elif _names_device(value, device_type) or (
                isinstance(value, (list, tuple, dict)) and self._scan(value, _SCAN_DEPTH)
            ):
                return True
        if device_type == "cuda":
            if func is torch.Tensor.cuda:
                return True
            # t.to(0) / t.to(0, dtype): an integer ordinal right after the tensor is a device.
            if func is torch.Tensor.to and len(args) > 1 and type(args[1]) is int:
                return True
        # A factory with no tensor and no device argument lands on the default device.
        return (
            not saw_tensor
            and "device" not in kwargs
            and torch.get_default_device().type == device_type
        )

    def _scan(self, value: Any, depth: int) -> bool | None:
        """True: a tensor on the device or a device name inside `value` (nested containers);
        None: only other tensors seen; False: no tensor at all."""
        saw = False
        items = value.values() if isinstance(value, dict) else value
        for item in items:
            if isinstance(item, torch.Tensor):
                if self._on_device(item):
                    return True
                saw = True
            elif isinstance(item, (list, tuple, dict)):
                if depth > 1:
                    found = self._scan(item, depth - 1)
                    if found:
                        return True
                    saw = saw or found is None
            elif _names_device(item, self.device.type):
                return True
        return None if saw else False

    def _load_needs_device(self, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        """torch.load creates tensors on the managed device unless map_location sends them
        elsewhere (a callable may send them anywhere: assume it might)."""
        location = (
            kwargs["map_location"]
            if "map_location" in kwargs
            else (args[1] if len(args) > 1 else None)
        )
        if location is None or callable(location):
            return True
        if isinstance(location, dict):
            return any(_device_arg(v, self.device.type) for v in location.values())
        return _device_arg(location, self.device.type)

    def _reaches_device(self, obj: Any, budget: int = 100_000) -> bool:
        """Whether serialising `obj` may read memory on the managed device: a walk of what it
        references (containers, modules, plain attributes, optimizers, any object's state),
        bounded; past the bound it answers yes (holding needlessly is safe, writing a storage
        that is away is not). Types, modules and functions are pickled by name: not followed."""
        seen: set[int] = set()
        todo = [obj]
        while todo:
            item = todo.pop()
            if isinstance(item, torch.Tensor):
                inner = _inner_tensors(item)
                if inner is None:
                    if self._on_device(item):
                        return True
                else:
                    todo.extend(inner)
                    continue
            elif isinstance(item, torch.UntypedStorage):
                if item.device.type == self.device.type:
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

    # ---- watchdog ---------------------------------------------------------------------------

    def _watch(self) -> None:
        tick = max(self.idle_s / 4, 0.005)
        seen, since = self._calls, time.monotonic()
        next_report = time.monotonic() + self.report_s
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._stop.is_set():
                return
            now = time.monotonic()
            if self._calls != seen:
                seen, since = self._calls, now
            if self._lease is None:
                continue
            yield_due = self._yield_for is not None
            if not yield_due and now - since < self.idle_s:
                if now >= next_report and self._mutex.acquire(blocking=False):
                    try:
                        with torch._C.DisableTorchFunction():
                            self._report()
                    finally:
                        self._mutex.release()
                    next_report = now + self.report_s
                continue
            if not yield_due and self._retry_s and now - since < self._retry_s:
                continue  # a swap-out failed: back off (idle/4, doubling, up to MAX_RETRY_S)
            # Between calls only: none in flight in any thread, and no slow path running.
            if not self._mutex.acquire(blocking=False):
                since = now
                continue
            try:
                if self._active:
                    since = now
                    continue
                if self._calls != seen:  # a call ran since the sample: not idle after all
                    seen, since = self._calls, time.monotonic()
                    if self._yield_for is None:
                        continue
                unguarded = self._unguarded_threads()
                if unguarded or self._refusals:
                    self._yield_for = None
                    self._refuse(
                        f"thread(s) {', '.join(sorted(unguarded))} started before automatic mode "
                        "and may touch tensors unseen"
                        if unguarded
                        else "; ".join(sorted(self._refusals))
                    )
                    since = time.monotonic()
                    continue
                if self._yield_for is not None:
                    if self._lease is not None and self._lease.lease_id == self._yield_for:
                        self._leave("yield")
                    self._yield_for = None
                else:
                    self._leave("idle")
                if self._retry_s:  # refused: measure the backoff from now
                    since = time.monotonic()
            except Exception:
                log.exception("automatic mode: swap-out failed; the lease is kept")
            finally:
                self._mutex.release()

    # ---- entry points that read tensor memory outside torch calls -------------------------------

    def _wrap_entry_points(self) -> None:
        self._patch(torch, "save", self._held_if(lambda a, k: self._reaches_device(a[0])))
        self._patch(torch, "load", self._held_if(self._load_needs_device))
        self._patch(torch, "compile", self._compile_held)
        # TorchScript runs in C++ without torch function calls: a scripted module's __call__ and
        # its methods are held; a scripted or traced free function cannot be, so while one exists
        # offloads are refused (`_refusals`).
        self._patch(torch.jit.ScriptModule, "__call__", self._held)
        for maker in ("script", "trace", "trace_module", "load", "freeze"):
            self._patch(torch.jit, maker, self._watch_scripted)
        if self.device.type == "cuda":
            self._patch(torch.cuda.CUDAGraph, "replay", self._held)
            self._patch(torch.cuda, "_lazy_init", self._before_cuda_init)

    def _watch_scripted(self, make: Callable[..., Any]) -> Callable[..., Any]:
        """What TorchScript makes: a module's exported methods (ScriptMethods kept in its
        instance dict) are held like ``__call__``; a free function cannot be held, so while one
        exists offloads are refused and said so once."""

        @functools.wraps(make)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            made = make(*args, **kwargs)
            if isinstance(made, torch.jit.ScriptModule):
                for module in made.modules():
                    for name, value in list(vars(module).items()):
                        if isinstance(value, torch._C.ScriptMethod):
                            vars(module)[name] = _HeldMethod(value, self)
            elif isinstance(made, torch._C.ScriptFunction):
                self._refusals.add(
                    f"TorchScript function {getattr(made, 'name', '?')!s} reads tensors outside "
                    "torch calls"
                )
            return made

        return wrapper

    def _patch(self, owner: Any, name: str, wrap: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        self._patched.append((owner, name, original))
        setattr(owner, name, wrap(original))

    def _held(self, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.hold():
                return func(*args, **kwargs)

        return wrapper

    def _held_if(
        self, needed: Callable[[Sequence[Any], dict[str, Any]], bool]
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Like `_held`, except that the state is brought back only when `needed(args, kwargs)`.
        The call is counted in flight either way, so no swap-out can start in its middle (a
        slow ``torch.save`` must not see its storages go away half-written)."""

        def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if self._passthrough or self._off:
                    return func(*args, **kwargs)
                self._enter(resident=self._slow and needed(args, kwargs))
                try:
                    return func(*args, **kwargs)
                finally:
                    self._exit()

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
                self._patch(cls, "__call__", self._held)
                cls.__call__._acb_held = True  # type: ignore[attr-defined]
            return compiled
        return self._held(compiled)

    def _before_cuda_init(self, init: Callable[[], None]) -> Callable[[], None]:
        """Acquire before CUDA initialises, so CUDA_VISIBLE_DEVICES names the granted GPU."""

        @functools.wraps(init)
        def wrapper() -> None:
            if not self._passthrough and not torch.cuda.is_initialized() and self._pinned is None:
                with self._mutex:
                    if self._slow:
                        self._make_resident()
            init()

        return wrapper

    def describe(self) -> str:
        s = self.stats
        return (
            f"{s.acquires} grants, {s.yields} yields, {format_size(s.offloaded_bytes)} offloaded, "
            f"{format_size(s.onloaded_bytes)} onloaded, {s.swap_seconds:.2f} s swapping, "
            f"{s.wait_seconds:.2f} s waiting"
        )
