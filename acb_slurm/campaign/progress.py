"""Campaign progress: counts, rate and ETA from the results directory, shown as one rewritten
line on a terminal and as a plain periodic line in batch logs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from acb_slurm.campaign.store import ResultsStore

RATE_WINDOW_S = 1800.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Where a campaign stands now."""

    total: int
    done: int
    failed: int
    running: int
    rate_per_hour: float | None
    eta_s: float | None

    @property
    def pending(self) -> int:
        """Items neither finished nor claimed."""
        return max(0, self.total - self.done - self.failed - self.running)


def rate_per_hour(done_times: list[float], now: float, since: float | None = None) -> float | None:
    """Items per hour. With `since` (when this worker started): finishes after it over the time
    since. Otherwise over the recent finishes (last 30 minutes), first to last."""
    if since is not None:
        elapsed = now - since
        count = sum(1 for t in done_times if t >= since)
        if count == 0 or elapsed <= 0:
            return None
        return count / elapsed * 3600.0
    recent = [t for t in done_times if t >= now - RATE_WINDOW_S]
    if len(recent) < 2 or recent[-1] <= recent[0]:
        return None
    return (len(recent) - 1) / (recent[-1] - recent[0]) * 3600.0


def snapshot(store: ResultsStore, item_ids: Iterable[str], since: float | None = None) -> Snapshot:
    """Counts of the campaign's items (ids outside `item_ids` are ignored), rate and ETA."""
    ids = set(item_ids)
    done, failed, claimed = store.counts()
    done &= ids
    failed &= ids
    running = (claimed & ids) - done - failed
    now = time.time()
    rate = rate_per_hour(store.done_times(), now, since)
    remaining = len(ids) - len(done) - len(failed)
    eta = remaining / rate * 3600.0 if rate and remaining > 0 else (0.0 if remaining == 0 else None)
    return Snapshot(len(ids), len(done), len(failed), len(running), rate, eta)


def format_duration(seconds: float | None) -> str:
    """Seconds as 42s, 3m05s or 2h07m ('?' when unknown)."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_snapshot(name: str, snap: Snapshot) -> str:
    """The one-line progress text."""
    rate = f"{snap.rate_per_hour:.1f}/h" if snap.rate_per_hour is not None else "?/h"
    pct = 100.0 * (snap.done + snap.failed) / snap.total if snap.total else 100.0
    return (
        f"{name}: {snap.done}/{snap.total} done, {snap.failed} failed, {snap.running} running, "
        f"{snap.pending} pending ({pct:.0f}%) | {rate} | ETA {format_duration(snap.eta_s)}"
    )


class ProgressDisplay:
    """Writes progress: on a terminal one line rewritten every second, otherwise a plain line
    every `interval_s` (batch logs). Messages (`say`) go above the live line.

    With `reporter_lock`, plain lines come from one worker only: the one holding that lock file
    (the workers of one job share a batch log; when the reporter exits, another takes over)."""

    def __init__(
        self,
        store: ResultsStore,
        item_ids: Iterable[str],
        name: str,
        *,
        stream: TextIO | None = None,
        interval_s: float = 60.0,
        tty: bool | None = None,
        enabled: bool = True,
        reporter_lock: Path | None = None,
    ) -> None:
        self.store = store
        self.item_ids = set(item_ids)
        self.name = name
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval_s = 1.0 if self.tty else interval_s
        self.enabled = enabled
        self.started = time.time()
        self._last = 0.0
        self._live = False
        self._lock = threading.Lock()
        self._reporter_lock = reporter_lock
        self._reporter_fd: int | None = None

    def _is_reporter(self) -> bool:
        if self.tty or self._reporter_lock is None:
            return True
        if self._reporter_fd is not None:
            return True
        try:
            fd = os.open(self._reporter_lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._reporter_fd = fd
        return True

    def say(self, message: str) -> None:
        """Print a message line (above the live line on a terminal)."""
        with self._lock:
            if self._live:
                self.stream.write("\r\033[K")
                self._live = False
            self.stream.write(message + "\n")
            self.stream.flush()

    def tick(self, force: bool = False) -> None:
        """Show progress if it is due (or `force`)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        if not self._is_reporter():
            return
        line = format_snapshot(self.name, snapshot(self.store, self.item_ids, self.started))
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K" + line)
                self._live = True
            else:
                self.stream.write(time.strftime("%H:%M:%S ") + line + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Show the last progress line and give up the reporter role."""
        if self.enabled:
            self.tick(force=True)
        with self._lock:
            if self._live:
                self.stream.write("\n")
                self.stream.flush()
                self._live = False
        if self._reporter_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._reporter_fd)
            self._reporter_fd = None
