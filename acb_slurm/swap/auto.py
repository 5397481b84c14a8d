"""Automatic PyTorch mode: hold a GPU only while the program uses it, with no code change.

A `torch.overrides.TorchFunctionMode` sees every torch call (functions, tensor methods and
attributes, ``backward``, ``autograd.grad``) of the thread that installed it and of every thread
started through `threading` afterwards (pushed before the thread's ``run``, popped after). A
call that touches the managed device first makes sure the process holds a lease and its
storages are resident (acquire, then the backend's ``onload``). A watchdog thread notices when
no device call has run for the idle interval and then, between calls, synchronises, offloads and
releases. A `YieldRequest` from the assigner is honoured at the
next safe point: when no call is in flight, by the watchdog or by the next outermost call.

`AutoSwap` (this module) is the gate and the slow path that joins the parts, one concern each:

- `acb_slurm.swap.deviceuse`: which calls use the managed device (`DeviceUse`, pure: metadata
  reads, ``device=None``, nested arguments, ordinals, ``torch.load``'s ``map_location``,
  ``torch.save``'s reference walk);
- `acb_slurm.swap.intercept`: the mode on the threads' stacks and the patched entry points
  (``torch.save``/``load``/``compile``, TorchScript, ``CUDAGraph.replay``, CUDA's lazy init),
  installed and undone as one (`TorchHooks`);
- `acb_slurm.swap.watchdog`: the idle detection, yields at safe points, refusals and backoff;
- `acb_slurm.swap.leasestate`: the lease state machine (`LeaseState`: phases, transitions,
  lost leases, pending yields, the GPU binding), no torch.

THE GATE: every intercepted device call counts itself in flight (`_active`, under `_mutex`) for
its whole duration, in whichever thread it runs; the swap path holds `_mutex` and acts only when
nothing is in flight, so no tensor operation runs while its storage is away, and calls of
different threads still run concurrently (one lock held through every call would serialise them,
and deadlock a call that waits on another thread's torch work, as compile workers do). Code that
reads tensor memory outside torch calls runs under `AutoSwap.hold()`; a module call that starts
while the state is resident runs as one call in flight with the mode off its thread's stack
(a module region, `TorchHooks._module_region`: small-op programs then run at their plain
speed); ``torch.save`` (which streams storages, maybe into a slow file) and ``torch.load`` are
wrapped with it. A live thread the
mode cannot see (started before installation, or by ``_thread``) makes the watchdog refuse to
offload while it lives (said once, naming it). A numpy view of a tensor (possible only under the
``cpu`` device) reads memory behind the gate's back: it must not be kept across a CPU phase.

Why a TorchFunctionMode rather than a TorchDispatchMode: the dispatch mode also sees the kernels
autograd runs, but costs more per op and puts every op through Python with unwrapped arguments;
the function mode sees the Python entry points, which is where a program can be between two GPU
phases, and ``backward()`` is one call that stays in flight throughout. Overhead of both is
measured by ``benchmarks/swap_cpu_bench.py``.

CUDA graphs: while a CUDA graph's private pool exists the engine refuses to offload (see
`SwapEngine`): the lease is kept, the refusal said once, and the watchdog retries with
exponential backoff; ``ACB_SWAP_ALLOW_GRAPHS=1`` opts in for programs that re-capture after every
swap.

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
import logging
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from acb_slurm import env
from acb_slurm.exitcodes import ExitCode
from acb_slurm.swap.backend import DEFAULT_BACKEND, SwapBackend, create_backend
from acb_slurm.swap.deviceuse import METADATA_FUNCS, Decision, DeviceUse, never
from acb_slurm.swap.engine import SwapError, SwapState, SwapWarning
from acb_slurm.swap.intercept import TorchHooks, mark_internal
from acb_slurm.swap.leasestate import (
    DeviceLessor,
    LeaseState,
    LostVerdict,
    Phase,
    Pin,
    SwapLease,
)
from acb_slurm.swap.watchdog import MAX_RETRY_S, Watchdog, next_backoff
from acb_slurm.units import format_size

__all__ = [
    "DEFAULT_IDLE_MS",
    "DEFAULT_REPORT_S",
    "MAX_RETRY_S",
    "METADATA_FUNCS",
    "AutoModeError",
    "AutoStats",
    "AutoSwap",
    "DeviceLessor",
    "Phase",
    "SwapLease",
]

log = logging.getLogger(__name__)

#: Default idle interval before a swap-out, in milliseconds.
DEFAULT_IDLE_MS = env.DEFAULT_IDLE_MS
#: How often resident bytes are reported while a lease is held, in seconds.
DEFAULT_REPORT_S = 5.0


class AutoModeError(RuntimeError):
    """Automatic mode cannot go on (the message says why and what to do)."""


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


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


class AutoSwap:
    """Automatic mode for one process: the gate, the lease's slow path, and the parts it joins
    (`DeviceUse`, `TorchHooks`, `Watchdog`, `LeaseState`, the swap backend)."""

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
        self._calls = 0  # device calls started and ended (the watchdog compares samples)
        self.stats = AutoStats()
        self._state = LeaseState()
        self._slow = True  # fast-path flag: not resident, or a yield is pending
        # The device-use decision: `_uses` is the mode's (metadata, cpu, arguments), `_touches`
        # the argument rule alone. A forked child replaces both by `never`.
        self._use = DeviceUse(self.device)
        self._uses: Decision = self._use
        self._touches: Decision = self._use.touches
        self._passthrough = False  # a forked child: nothing is intercepted
        self._retry_s = 0.0  # backoff after a failed swap-out (0: none pending)
        self._hooks = TorchHooks(self)
        #: Threads that never touch program tensors (the watchdog's, gRPC's): the hooks' set.
        self._internal = self._hooks.internal
        self._watchdog = Watchdog(self)
        self._reported = -1
        self._off = False  # uninstalled: modes left on other threads' stacks pass through
        self._said: set[str] = set()  # refusals already reported (each is said once)
        self._refusals: set[str] = set()  # standing reasons not to offload at all

    # ---- state read by callers and tests ---------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """Where the program stands (`Phase`)."""
        return self._state.phase

    @property
    def _lease(self) -> SwapLease | None:
        return self._state.lease

    @property
    def holding(self) -> bool:
        return self._state.lease is not None

    @property
    def busy(self) -> bool:
        """A device call (or a hold()) is in flight in some thread."""
        return self._active > 0

    # ---- installation -----------------------------------------------------------------------

    def install(self) -> None:
        """Start intercepting the torch calls of this thread and of every thread started from
        now on, and start the watchdog."""
        if self._hooks.installed:
            raise AutoModeError("automatic mode is already installed in this process")
        self._hooks.install()
        self._off = False
        ident = self._watchdog.start()
        if ident is not None:
            self._internal.add(ident)
        me = weakref.ref(self)  # fork callbacks cannot be unregistered: do not keep self alive

        def in_child() -> None:
            auto = me()
            if auto is not None:
                auto._forked()

        os.register_at_fork(after_in_child=in_child)

    def _unguarded_threads(self) -> list[str]:
        """Live threads whose torch calls the mode does not see (besides the watchdog)."""
        return self._hooks.unguarded_threads()

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
        self._slow = False
        self._state.yield_for = None
        self._uses = self._touches = never
        self._watchdog.forget()
        self._state.forget()
        self._mutex = threading.RLock()  # the parent's may have been held by another thread
        self._active = 0

    def uninstall(self) -> None:
        """Stop intercepting: bring the storages back (acquiring a lease if they are away),
        release the lease, and leave the program's tensors as if automatic mode never ran.
        Call from the thread that installed."""
        if self._passthrough:  # a forked child holds nothing of its own
            return
        self._watchdog.stop()
        with self._mutex:
            if self.engine.state is SwapState.OFFLOADED:
                self._make_resident()
            self._off = True
            self._hooks.uninstall()
            if self._state.lease is not None:
                try:
                    self._state.releasing()
                    self._release(yielded=False)
                except Exception as exc:  # the session may be gone; the assigner frees it then
                    log.warning("releasing the lease failed: %s", exc)
            self._state.forget()
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
        self._watchdog.stop()
        with self._mutex:
            self._state.exiting = True
            self._slow = True

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
            if not self._active and self._state.yield_for is not None:
                self._watchdog.wake()  # a yield waited for the calls in flight: a safe point

    def request_yield(self, lease_id: str, reason: str = "") -> None:
        """Called from the client's thread on a YieldRequest: give the lease back at the next
        safe point (then ask again at the next device call)."""
        if self._passthrough or not self._state.request_yield(lease_id):
            log.debug("yield request for %s ignored: not held", lease_id)
            return
        log.info("yield requested for lease %s (%s)", lease_id, reason or "no reason given")
        self._slow = True
        self._watchdog.wake()

    def lease_lost(self, lease_id: str, reason: str = "") -> None:
        """Called from the client's thread when a lease is lost (its session ended: the
        assigner died or restarted, or dropped this process). Holding it, the program stops at
        once (`_stop_on_lost_lease`): its data is on a GPU another process may hold now. A
        swap-out in progress or a grant being taken into use decide on their own thread (they
        check `LeaseState.lost_while_held` after their step). With the state in host memory,
        nothing to do: the next device call asks for a new lease."""
        if self._passthrough or self._off:
            return
        verdict = self._state.lose(lease_id)
        if verdict is LostVerdict.NOT_HELD:
            log.warning(
                "lease %s was lost while the program's state was in host memory (%s); the next "
                "device call asks for a new one",
                lease_id,
                reason or "its session ended",
            )
        elif verdict is LostVerdict.AFTER_EXIT:
            log.warning("lease %s was lost after the program ended (%s)", lease_id, reason)
        elif verdict is LostVerdict.STOP:
            self._stop_on_lost_lease(lease_id, reason)
        # DEFERRED: that step, on its own thread, sees the loss when it ends

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
        flusher = mark_internal(threading.Thread(target=_flush_std_streams, daemon=True))
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

    # ---- the slow path (lock held) --------------------------------------------------------------

    def _make_resident(self) -> None:
        # The engine's own torch calls must not come back through the mode (hold() and the
        # CUDA-init hook call this outside __torch_function__, where the mode is active).
        with torch._C.DisableTorchFunction():
            self._make_resident_unhooked()

    def _make_resident_unhooked(self) -> None:
        state = self._state
        if state.exiting:
            self._resident_after_shutdown()
            return
        # A yield is a safe point only between calls: with a call in flight (an outer call of
        # this thread, or another thread's) the watchdog honours it once they end.
        if state.yield_for is not None and self._active == 0:
            if state.yield_due:
                self._leave("yield")
            state.yield_for = None
        while state.lease is None:
            state.acquiring()
            start = time.perf_counter()
            lease = self.lessor.acquire()
            self.stats.wait_seconds += time.perf_counter() - start
            self.stats.acquires += 1
            self._bind(lease)
            if not state.granted(lease):  # lost before it was used: ask again
                log.warning("lease %s was lost as it was granted; asking again", lease.lease_id)
                with contextlib.suppress(Exception):
                    self.lessor.release(lease)  # forgets it: nothing to give back
        onloaded: int | None = None
        if self.engine.state is SwapState.OFFLOADED:
            stats = self.engine.onload()  # on failure the lease stays held and the error surfaces
            self.stats.onloaded_bytes += stats.bytes
            self.stats.swap_seconds += stats.seconds
            onloaded = stats.bytes
            log.info("%s", stats)
        state.resident()
        self._slow = state.yield_for is not None
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
        self._state.forget()  # the session ends with the process: nothing to give back
        self._slow = False

    def _leave(self, reason: str) -> None:
        """Synchronise, offload and release (no-op without a lease)."""
        if self._state.lease is None:
            return
        with torch._C.DisableTorchFunction():
            self._leave_unhooked(reason)

    def _leave_unhooked(self, reason: str) -> None:
        self._state.releasing()
        if self.engine.state is SwapState.RESIDENT:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", SwapWarning)
                    stats = self.engine.offload()
            except Exception as exc:  # SwapError, or anything the engine did not foresee
                # The data is still on the device: keep the lease rather than lose it.
                self._state.refused()
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
        """After the phase became HOLDING: if the lease was lost meanwhile (`lease_lost` left it
        to this thread), stop the program."""
        lost = self._state.lost_while_held()
        if lost is not None:
            self._stop_on_lost_lease(lost, "its session ended")

    def _refuse(self, why: str) -> None:
        """A swap-out cannot be done safely now: keep the lease, back off, say so once."""
        self._check_lost()  # the lease was lost during the failed swap-out
        self.stats.failed_swaps += 1
        self._retry_s = next_backoff(self._retry_s, self.idle_s)
        self._say_once(
            logging.WARNING, "not releasing the GPU (%s): the lease is kept and retried later", why
        )

    def _release(self, *, yielded: bool) -> None:
        """Give the lease back (the state machine is RELEASING). If the release call fails the
        lease may still be held by the assigner; retrying is impossible (the client forgot it),
        so the session is ended, which makes the assigner release everything it held. Either
        way the lease is gone."""
        lease = self._state.released()
        self._slow = True
        self._reported = -1
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

    def _bind(self, lease: SwapLease) -> None:
        """CUDA: bind the process to the first grant's GPUs; later grants are pinned to them (the
        lessor sends `required_gpus`), so a mismatch is a bug."""
        if self.device.type != "cuda":
            return
        pinned = self._state.pinned
        pin = self._state.pin(lease.device_ids)
        if pin is Pin.FIRST:
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
        elif pin is Pin.OTHER:
            assert pinned is not None
            # Cannot happen: the lessor pins every later request to the first grant's GPUs, and
            # the assigner grants a pinned request exactly those. Fail loudly rather than run
            # with tensors on GPUs this lease does not cover.
            self.lessor.release(lease)
            raise AutoModeError(
                f"granted GPU(s) {','.join(lease.device_ids)} to a request pinned to "
                f"{','.join(pinned)} (where this process's tensors live): the lessor did "
                "not pin the request, or the assigner ignored the pin (a bug)"
            )

    def _report(self, *, force: bool = False, resident: int | None = None) -> None:
        lease = self._state.lease
        if lease is None:
            return
        if resident is None:
            resident = self._resident_bytes()
        if force or resident != self._reported:
            self._reported = resident
            try:
                self.lessor.report_usage(lease, resident)
            except Exception as exc:  # a usage report is advice; never fail the program on it
                log.warning("usage report failed: %s", exc)

    def _resident_bytes(self) -> int:
        """What this process holds on the device: the caching allocator's reservation on CUDA;
        elsewhere a walk of the storages (tens of ms, so only every `report_s`)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_reserved()) if torch.cuda.is_initialized() else 0
        return self.engine.resident_bytes()

    # ---- the device-use decision (acb_slurm.swap.deviceuse) --------------------------------------

    def _load_needs_device(self, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        """torch.load creates tensors on the managed device unless map_location sends them
        elsewhere (`DeviceUse.load`)."""
        return self._use.load(args, kwargs)

    def _reaches_device(self, obj: Any, budget: int = 100_000) -> bool:
        """Whether serialising `obj` may read memory on the managed device (`DeviceUse.reaches`)."""
        return self._use.reaches(obj, budget)

    def describe(self) -> str:
        s = self.stats
        return (
            f"{s.acquires} grants, {s.yields} yields, {format_size(s.offloaded_bytes)} offloaded, "
            f"{format_size(s.onloaded_bytes)} onloaded, {s.swap_seconds:.2f} s swapping, "
            f"{s.wait_seconds:.2f} s waiting"
        )
