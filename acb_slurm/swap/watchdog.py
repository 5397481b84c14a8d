"""Automatic mode's watchdog: the thread that gives the device back between calls.

Every tick (idle/4, at least 5 ms) it samples `AutoSwap`'s call counter. When no device call
has started or ended for the idle interval, or a yield is pending, it takes the lock without
waiting and, only when no call is in flight in any thread, offloads and releases
(`AutoSwap._leave`). It refuses while a live thread the mode cannot see exists or a standing
reason holds (a TorchScript free function): the lease is kept and the refusal said once. A
failed swap-out is retried with exponential backoff (`next_backoff`). While a lease is held and
the program is busy it reports resident bytes every `AutoSwap.report_s` (less often when a
report is slow: `REPORT_COST_FACTOR`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import torch

from acb_slurm.swap.intercept import mark_internal

if TYPE_CHECKING:
    from acb_slurm.swap.auto import AutoSwap

log = logging.getLogger("acb_slurm.swap.auto")

#: A failed swap-out is retried after idle/4, doubling up to this many seconds.
MAX_RETRY_S = 60.0
#: A usage report that took t seconds is followed by the next one no sooner than this many times
#: t later (and never sooner than `AutoSwap.report_s`): at most ~2% of the time is spent walking.
REPORT_COST_FACTOR = 50.0


def next_backoff(retry_s: float, idle_s: float) -> float:
    """The wait before the next swap-out after one more failure (`retry_s`: the last wait,
    0 for none): idle/4, then doubling, at most `MAX_RETRY_S`."""
    return min(max(retry_s * 2, idle_s / 4), MAX_RETRY_S)


class Watchdog:
    """One `AutoSwap`'s watchdog thread (`start`, `wake`, `stop`)."""

    def __init__(self, auto: AutoSwap):
        self._auto = auto
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> int | None:
        """Start the thread; returns its ident."""
        self._stop.clear()
        thread = threading.Thread(target=self._run, name="acb-auto-watchdog", daemon=True)
        mark_internal(thread)
        thread.start()
        self.thread = thread
        return thread.ident

    def wake(self) -> None:
        """Look now (a yield became due at a safe point)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread and wait for it (unless called from it)."""
        self._stop.set()
        self._wake.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        self.thread = None

    def forget(self) -> None:
        """In a forked child: the thread is the parent's."""
        self.thread = None

    def _run(self) -> None:
        auto = self._auto
        state = auto._state
        tick = max(auto.idle_s / 4, 0.005)
        seen, since = auto._calls, time.monotonic()
        next_report = time.monotonic() + auto.report_s
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._stop.is_set():
                return
            now = time.monotonic()
            if auto._calls != seen:
                seen, since = auto._calls, now
            if state.lease is None:
                continue
            yield_due = state.yield_for is not None
            if not yield_due and now - since < auto.idle_s:
                if now >= next_report and auto._mutex.acquire(blocking=False):
                    try:
                        with torch._C.DisableTorchFunction():
                            auto._report()
                    finally:
                        auto._mutex.release()
                    # On cpu a report walks the heap (autograd graphs included) under the lock,
                    # which the program's calls wait for: keep walks to a small share of time.
                    spent = time.monotonic() - now
                    next_report = now + max(auto.report_s, REPORT_COST_FACTOR * spent)
                continue
            if not yield_due and auto._retry_s and now - since < auto._retry_s:
                continue  # a swap-out failed: back off (idle/4, doubling, up to MAX_RETRY_S)
            # Between calls only: none in flight in any thread, and no slow path running.
            if not auto._mutex.acquire(blocking=False):
                since = now
                continue
            try:
                if auto._active:
                    since = now
                    continue
                if auto._calls != seen:  # a call ran since the sample: not idle after all
                    seen, since = auto._calls, time.monotonic()
                    if state.yield_for is None:
                        continue
                unguarded = auto._unguarded_threads()
                if unguarded or auto._refusals:
                    state.yield_for = None
                    auto._refuse(
                        f"thread(s) {', '.join(sorted(unguarded))} started before automatic mode "
                        "and may touch tensors unseen"
                        if unguarded
                        else "; ".join(sorted(auto._refusals))
                    )
                    since = time.monotonic()
                    continue
                if state.yield_for is not None:
                    if state.yield_due:
                        auto._leave("yield")
                    state.yield_for = None
                else:
                    auto._leave("idle")
                if auto._retry_s:  # refused: measure the backoff from now
                    since = time.monotonic()
            except Exception:
                log.exception("automatic mode: swap-out failed; the lease is kept")
            finally:
                auto._mutex.release()
