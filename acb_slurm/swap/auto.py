"""Automatic PyTorch mode: hold a GPU only while the program uses it, with no code change.

A `torch.overrides.TorchFunctionMode` sees every torch call of the thread that installed it
(functions, tensor methods and attributes, ``backward``, ``autograd.grad``). A call that touches
the managed device first makes sure the process holds a lease and its storages are resident
(acquire, then `SwapEngine.onload`). A watchdog thread notices when no device call has run for
the idle interval and then, between two calls, synchronises, offloads and releases. A
`YieldRequest` from the assigner is honoured at the next safe point: the next device call on the
program's thread, or at once by the watchdog when the program is between calls.

ONE lock (`AutoSwap.lock`, re-entrant) is held by every intercepted device call for its whole
duration and by the swap/release path, so no tensor operation runs while its storage is away.
Code that reads tensor memory outside torch calls must run under `AutoSwap.hold()`;
``torch.save`` (which streams storages) and ``torch.load`` are wrapped with it. A numpy view of
a tensor (possible only under the ``cpu`` device) reads memory behind the lock's back: the test
programs do not keep one across a CPU phase.

Why a TorchFunctionMode rather than a TorchDispatchMode: the dispatch mode also sees the kernels
autograd runs, but costs more per op and puts every op through Python with unwrapped arguments;
the function mode sees the Python entry points, which is where a program can be between two GPU
phases, and ``backward()`` is one call that holds the lock throughout. Overhead of both is
measured by ``benchmarks/swap_cpu_bench.py``.

Limits (documented, not silent): modes are thread-local, so device work started from other
threads the program creates is not intercepted; ``torch.compile`` inlines the mode while
tracing, so compiled regions are not guaranteed to run under the lock, and a compilation longer
than the idle interval looks idle (use the manual API with swapping for compiled programs); a
forked child (DataLoader worker) inherits the mode but not the lease, so its calls pass through
untouched (it must not use the managed device, which holds for DataLoader workers).
On CUDA the process is bound to the GPU of its first grant (tensors carry a device index), so
``CUDA_VISIBLE_DEVICES`` is set from that grant before CUDA initialises and later grants must
name the same GPU.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.overrides import TorchFunctionMode

from acb_slurm.swap.engine import SwapEngine, SwapError, SwapState, SwapWarning
from acb_slurm.units import format_size

log = logging.getLogger(__name__)

#: Default idle interval before a swap-out, in milliseconds (see benchmarks/RESULTS.md: far above
#: the gaps between device calls of a training loop, small against a CPU phase of seconds).
DEFAULT_IDLE_MS = 500
#: How often resident bytes are reported while a lease is held, in seconds.
DEFAULT_REPORT_S = 5.0


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


class _DeviceUseMode(TorchFunctionMode):
    """Runs every device call under the lock, after making the device state resident."""

    def __init__(self, auto: AutoSwap):
        super().__init__()
        self._auto = auto

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        auto = self._auto
        if auto._every_call or auto._touches(func, args, kwargs):
            with auto.lock:
                auto._calls += 1
                if auto._slow:
                    auto._make_resident()
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _names_device(value: Any, device_type: str) -> bool:
    if isinstance(value, torch.device):
        return value.type == device_type
    return isinstance(value, str) and value.split(":", 1)[0] == device_type


class AutoSwap:
    """Automatic mode for one process: hooks, watchdog, the one lock, and the swap engine."""

    def __init__(
        self,
        lessor: DeviceLessor,
        *,
        device: str = "cuda",
        idle_ms: float = DEFAULT_IDLE_MS,
        report_s: float = DEFAULT_REPORT_S,
        engine: SwapEngine | None = None,
    ):
        if idle_ms <= 0:
            raise ValueError(f"idle interval must be positive, got {idle_ms} ms")
        self.lessor = lessor
        self.device = torch.device(device)
        self.idle_s = idle_ms / 1000.0
        self.report_s = report_s
        self.engine = engine or SwapEngine(self.device)
        self.lock = threading.RLock()
        self.stats = AutoStats()
        self.phase = Phase.AWAY
        self._lease: Lease | None = None
        self._pinned: tuple[str, ...] | None = None  # CUDA: the devices this process is bound to
        self._slow = True  # fast-path flag: not resident, or a yield is pending
        self._yield_for: str | None = None  # lease id a YieldRequest named
        self._calls = 0  # device calls started (the watchdog compares samples)
        self._every_call = self.device.type == "cpu"  # on cpu every torch call is device use
        self._mode: _DeviceUseMode | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._patched: list[tuple[Any, str, Any]] = []
        self._reported = -1

    # ---- installation -----------------------------------------------------------------------

    def install(self) -> None:
        """Start intercepting this thread's torch calls and start the watchdog."""
        if self._mode is not None:
            raise AutoModeError("automatic mode is already installed in this process")
        self._mode = _DeviceUseMode(self)
        self._mode.__enter__()
        self._wrap_entry_points()
        self._stop.clear()
        self._watchdog = threading.Thread(target=self._watch, name="acb-auto-watchdog", daemon=True)
        self._watchdog.start()
        me = weakref.ref(self)  # fork callbacks cannot be unregistered: do not keep self alive

        def in_child() -> None:
            auto = me()
            if auto is not None:
                auto._forked()

        os.register_at_fork(after_in_child=in_child)

    def _forked(self) -> None:
        """In a forked child (DataLoader workers): no watchdog, no lease, no session of its own,
        so its calls pass straight through. The mode stays on the stack (it is the parent's)."""
        self._every_call = False
        self._touches = lambda func, args, kwargs: False  # type: ignore[method-assign]
        self._watchdog = None
        self._lease = None
        self.lock = threading.RLock()  # the parent's may have been held by another thread

    def uninstall(self, *, restore: bool = True) -> None:
        """Stop intercepting; with `restore`, bring the storages back (else leave them away).

        The lease is released either way. Call from the thread that installed.
        """
        self._stop.set()
        self._wake.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        with self.lock:
            if self._mode is not None:
                self._mode.__exit__(None, None, None)
                self._mode = None
            for owner, name, original in reversed(self._patched):
                setattr(owner, name, original)
            self._patched.clear()
            if restore and self.engine.state is SwapState.OFFLOADED:
                self.engine.onload()
            if self._lease is not None:
                try:
                    self._release(yielded=False)
                except Exception as exc:  # the session may be gone; the assigner frees it then
                    log.warning("releasing the lease failed: %s", exc)
            self.phase = Phase.AWAY
            if restore:
                self.engine.close()

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
        with self.lock:
            self._calls += 1
            if self._slow:
                self._make_resident()
            yield
            self._calls += 1

    def request_yield(self, lease_id: str, reason: str = "") -> None:
        """Called from the client's thread on a YieldRequest: give the lease back at the next
        safe point (then ask again at the next device call)."""
        if self._lease is None or self._lease.lease_id != lease_id:
            log.debug("yield request for %s ignored: not held", lease_id)
            return
        log.info("yield requested for lease %s (%s)", lease_id, reason or "no reason given")
        self._yield_for = lease_id
        self._slow = True
        self._wake.set()

    def swap_out(self, reason: str = "manual") -> None:
        """Offload and release now (waits for the running device call to finish)."""
        with self.lock:
            self._leave(reason)

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
        if self._yield_for is not None:
            if self._lease is not None and self._lease.lease_id == self._yield_for:
                self._leave("yield")
            self._yield_for = None
        if self._lease is None:
            self.phase = Phase.ACQUIRING
            start = time.perf_counter()
            lease = self.lessor.acquire()
            self.stats.wait_seconds += time.perf_counter() - start
            self.stats.acquires += 1
            self._bind(lease)
            self._lease = lease
        if self.engine.state is SwapState.OFFLOADED:
            stats = self.engine.onload()  # on failure the lease stays held and the error surfaces
            self.stats.onloaded_bytes += stats.bytes
            self.stats.swap_seconds += stats.seconds
            log.info("%s", stats)
        self.phase = Phase.HOLDING
        self._slow = False
        self._report(force=True)

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
            except SwapError as exc:
                # The data is still on the device: keep the lease rather than lose it.
                self.phase = Phase.HOLDING
                log.error("cannot release the GPU (%s): keeping the lease", exc)
                return
            for w in caught:
                log.warning("%s", w.message)
            self.stats.offloaded_bytes += stats.bytes
            self.stats.swap_seconds += stats.seconds
            log.info("%s (%s)", stats, reason)
        self._release(yielded=reason == "yield")

    def _release(self, *, yielded: bool) -> None:
        lease, self._lease = self._lease, None
        self._slow = True
        self._reported = -1
        self.phase = Phase.AWAY
        assert lease is not None
        self.stats.releases += 1
        self.stats.yields += int(yielded)
        self.lessor.release(lease, yielded=yielded)

    def _bind(self, lease: Lease) -> None:
        """CUDA: bind the process to the first grant's GPUs; later grants must match."""
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
            self.lessor.release(lease)
            raise AutoModeError(
                f"granted GPU(s) {','.join(lease.device_ids)} but this process is bound to "
                f"{','.join(self._pinned)} (its tensors live there): run automatic mode with one "
                "GPU per node, or under the gpu-affinity policy"
            )

    def _report(self, *, force: bool = False) -> None:
        if self._lease is None:
            return
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
        # Tensor.is_cuda is a C attribute; Tensor.device builds a new object on every read.
        if device_type == "cuda":

            def on_device(t: torch.Tensor) -> bool:
                return t.is_cuda
        else:

            def on_device(t: torch.Tensor) -> bool:
                return t.device.type == device_type

        saw_tensor = False
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if on_device(arg):
                    return True
                saw_tensor = True
            elif isinstance(arg, (list, tuple)):
                for item in arg:
                    if isinstance(item, torch.Tensor):
                        if on_device(item):
                            return True
                        saw_tensor = True
            elif _names_device(arg, device_type):
                return True
        for value in kwargs.values():
            if isinstance(value, torch.Tensor):
                if on_device(value):
                    return True
                saw_tensor = True
            elif _names_device(value, device_type):
                return True
        if func is torch.Tensor.cuda and device_type == "cuda":
            return True
        # A factory with no tensor and no device argument lands on the default device.
        return (
            not saw_tensor
            and "device" not in kwargs
            and torch.get_default_device().type == device_type
        )

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
                if now >= next_report and self.lock.acquire(blocking=False):
                    try:
                        self._report()
                    finally:
                        self.lock.release()
                    next_report = now + self.report_s
                continue
            # Between two calls only: a call running now holds the lock.
            if not self.lock.acquire(blocking=False):
                since = now
                continue
            try:
                if self._calls != seen:  # a call ran since the sample: not idle after all
                    seen, since = self._calls, time.monotonic()
                    if self._yield_for is None:
                        continue
                if self._yield_for is not None:
                    if self._lease is not None and self._lease.lease_id == self._yield_for:
                        self._leave("yield")
                    self._yield_for = None
                else:
                    self._leave("idle")
            except Exception:
                log.exception("automatic mode: swap-out failed; the lease is kept")
            finally:
                self.lock.release()

    # ---- entry points that read tensor memory outside torch calls -------------------------------

    def _wrap_entry_points(self) -> None:
        for owner, name in ((torch, "save"), (torch, "load")):
            original = getattr(owner, name)
            self._patched.append((owner, name, original))
            setattr(owner, name, self._held(original))
        if self.device.type == "cuda":
            original = torch.cuda._lazy_init
            self._patched.append((torch.cuda, "_lazy_init", original))
            torch.cuda._lazy_init = self._before_cuda_init(original)

    def _held(self, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.hold():
                return func(*args, **kwargs)

        return wrapper

    def _before_cuda_init(self, init: Callable[[], None]) -> Callable[[], None]:
        """Acquire before CUDA initialises, so CUDA_VISIBLE_DEVICES names the granted GPU."""

        @functools.wraps(init)
        def wrapper() -> None:
            if not torch.cuda.is_initialized() and self._pinned is None:
                with self.lock:
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
