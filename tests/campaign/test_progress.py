"""Progress: counts, rate and ETA; a rewritten line on a terminal, plain lines in batch logs."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from acb_slurm.campaign.progress import ProgressDisplay, rate_per_hour, snapshot
from acb_slurm.campaign.store import ResultsStore, WorkerIdentity


def store_with(tmp_path: Path, done: int, failed: int, running: int) -> ResultsStore:
    store = ResultsStore(tmp_path)
    store.create()
    for i in range(done):
        store.record_done(f"d{i}", {})
    for i in range(failed):
        store.record_failed(f"f{i}", {})
    for i in range(running):
        store.try_claim(f"r{i}", WorkerIdentity.current("w"))
    return store


IDS = [f"d{i}" for i in range(4)] + ["f0"] + ["r0", "r1"] + ["p0", "p1", "p2"]


def test_snapshot_counts_only_the_campaigns_items(tmp_path: Path) -> None:
    store = store_with(tmp_path, 4, 1, 2)
    store.record_done("not-in-campaign", {})
    snap = snapshot(store, IDS)
    assert (snap.total, snap.done, snap.failed, snap.running, snap.pending) == (10, 4, 1, 2, 3)
    assert snap.rate_per_hour is not None and snap.eta_s is not None


def test_rate_over_recent_finishes_or_since_the_worker_started() -> None:
    now = 10_000.0
    assert rate_per_hour([now - 30, now - 20, now - 10], now) == pytest.approx(2 / 20 * 3600)
    assert rate_per_hour([now - 30, now - 20, now - 10], now, since=now - 60) == pytest.approx(
        3 / 60 * 3600
    )
    assert rate_per_hour([now - 10], now) is None


def test_a_terminal_gets_one_rewritten_line(tmp_path: Path) -> None:
    out = io.StringIO()
    display = ProgressDisplay(store_with(tmp_path, 4, 1, 2), IDS, "demo", stream=out, tty=True)
    display.tick()
    display.say("w0: d0 done")
    display.close()
    text = out.getvalue()
    assert text.startswith("\r\x1b[Kdemo: 4/10 done, 1 failed, 2 running, 3 pending (50%)")
    assert "\r\x1b[Kw0: d0 done\n" in text
    assert text.endswith("\n")


def test_a_batch_log_gets_plain_lines_from_one_worker_of_the_job(tmp_path: Path) -> None:
    store = store_with(tmp_path, 4, 1, 2)
    lock = tmp_path / ".progress-1.lock"
    first, second = io.StringIO(), io.StringIO()
    a = ProgressDisplay(
        store, IDS, "demo", stream=first, tty=False, interval_s=0.01, reporter_lock=lock
    )
    b = ProgressDisplay(
        store, IDS, "demo", stream=second, tty=False, interval_s=0.01, reporter_lock=lock
    )
    a.tick()
    time.sleep(0.02)
    b.tick()
    assert "demo: 4/10 done" in first.getvalue() and "\r" not in first.getvalue()
    assert time.strftime("%H:") in first.getvalue()
    a.close()
    b.close()  # the reporter has gone: this one takes over and writes the last line
    assert second.getvalue().count("demo: 4/10 done") == 1
