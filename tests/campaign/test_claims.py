"""The claim keeper: a heartbeat that keeps a claim fresh and finds it lost; stop requests."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from acb_slurm.campaign.claims import ClaimKeeper, ClaimLost
from acb_slurm.campaign.stops import StopRequests, WorkerStopped
from acb_slurm.campaign.store import Claim, ClaimState, ResultsStore, WorkerIdentity
from acb_slurm.supervise import Supervised


def _wait_for(condition: threading.Event, timeout: float = 5.0) -> bool:
    return condition.wait(timeout)


def _store(tmp_path: Path) -> ResultsStore:
    store = ResultsStore(tmp_path / "results")
    store.create()
    return store


def test_the_heartbeat_keeps_the_claim_fresh(tmp_path: Path) -> None:
    store = _store(tmp_path)
    claim = store.try_claim("a", WorkerIdentity.current("me"))
    assert claim is not None
    old = time.time() - 1000
    os.utime(claim.path, (old, old))
    ticks = threading.Event()
    with ClaimKeeper(store, 0.05, tick_s=0.02, on_tick=ticks.set) as keeper:
        keeper.hold(claim)
        deadline = time.monotonic() + 5
        while claim.path.stat().st_mtime < old + 500 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert claim.path.stat().st_mtime > old + 500
        assert ticks.is_set()
        keeper.ensure(claim)  # still ours
        assert not keeper.is_lost(claim)


def test_a_claim_taken_over_is_found_lost(tmp_path: Path) -> None:
    store = _store(tmp_path)
    claim = store.try_claim("a", WorkerIdentity.current("me"))
    assert claim is not None
    found: list[Claim] = []
    lost = threading.Event()

    def on_lost(which: Claim) -> None:
        found.append(which)
        lost.set()

    with ClaimKeeper(store, 0.05, tick_s=0.02, on_lost=on_lost) as keeper:
        keeper.hold(claim)
        # What a takeover does: the stale claim goes, another worker's takes its place.
        claim.path.unlink()
        assert store.try_claim("a", WorkerIdentity("other", "elsewhere", 1, None)) is not None
        assert _wait_for(lost)
        assert found == [claim]
        assert keeper.is_lost(claim)
        with pytest.raises(ClaimLost) as exc:
            keeper.ensure(claim)
        assert exc.value.item_id == "a"
        time.sleep(0.2)
        assert found == [claim]  # reported once
        # The next claim starts afresh.
        second = store.try_claim("b", WorkerIdentity.current("me"))
        assert second is not None
        keeper.hold(second)
        assert not keeper.is_lost(second)
        keeper.ensure(second)


def test_several_claims_are_kept_and_only_the_one_taken_over_is_lost(tmp_path: Path) -> None:
    """Items waiting for their batch stay claimed: every claim held beats; a takeover of one
    is reported for that one alone."""
    store = _store(tmp_path)
    me = WorkerIdentity.current("me")
    claims = [store.try_claim(name, me) for name in "abc"]
    assert all(c is not None for c in claims)
    a, b, c = claims  # type: ignore[misc]
    old = time.time() - 1000
    for claim in claims:
        os.utime(claim.path, (old, old))  # type: ignore[union-attr]
    found: list[Claim] = []
    with ClaimKeeper(store, 0.05, tick_s=0.02, on_lost=found.append) as keeper:
        for claim in claims:
            keeper.hold(claim)  # type: ignore[arg-type]
        assert keeper.held == (a, b, c)
        b.path.unlink()  # type: ignore[union-attr]
        assert store.try_claim("b", WorkerIdentity("other", "elsewhere", 1, None)) is not None
        deadline = time.monotonic() + 5
        while not found and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert found == [b]
        assert keeper.is_lost(b) and not keeper.is_lost(a) and not keeper.is_lost(c)
        assert not keeper.still_held(b) and keeper.still_held(a)
        for claim in (a, c):
            assert claim.path.stat().st_mtime > old + 500  # type: ignore[union-attr]
        keeper.drop(a)
        assert keeper.held == (b, c)


def test_a_claim_found_lost_before_a_write_stays_lost(tmp_path: Path) -> None:
    store = _store(tmp_path)
    claim = store.try_claim("a", WorkerIdentity.current("me"))
    assert claim is not None
    keeper = ClaimKeeper(store, 3600)  # no ticker: ensure() alone finds it
    keeper.hold(claim)
    claim.path.unlink()
    with pytest.raises(ClaimLost):
        keeper.ensure(claim)
    assert store.try_claim("a", WorkerIdentity.current("me")) is not None  # ours again, but
    with pytest.raises(ClaimLost):  # a lost claim is not picked up again
        keeper.ensure(claim)


def test_a_finished_item_is_not_taken_for_a_lost_claim(tmp_path: Path) -> None:
    store = _store(tmp_path)
    me = WorkerIdentity.current("me")
    claim = store.try_claim("a", me)
    assert claim is not None
    lost = threading.Event()
    with ClaimKeeper(store, 0.02, tick_s=0.01, on_lost=lambda _: lost.set()) as keeper:
        keeper.hold(claim)
        time.sleep(0.1)
        keeper.drop(claim)
        store.finish(claim, ClaimState.DONE, me)  # the tombstone is no claim of ours any more
        assert not _wait_for(lost, 0.3)
        assert keeper.held == () and not keeper.is_lost(claim)


def test_a_stop_signal_is_checked_between_steps_and_forwarded_to_the_stage() -> None:
    child = Supervised([sys.executable, "-c", "import time; time.sleep(60)"], session=True)
    stops = StopRequests(lambda: child)
    stops.check()
    child.start()
    try:
        stops.handle(signal.SIGTERM)
        result = child.wait()
    finally:
        child.kill()
    assert result.returncode == -signal.SIGTERM
    with pytest.raises(WorkerStopped) as exc:
        stops.check()
    assert exc.value.signum == signal.SIGTERM
    assert str(exc.value) == "stopped by SIGTERM"


def test_a_stop_signal_interrupts_a_wait_at_once() -> None:
    stops = StopRequests()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    stops.install()
    try:
        stops.check()  # nothing asked yet
        with pytest.raises(WorkerStopped) as exc, stops.interruptible():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler raises here
        assert exc.value.signum == signal.SIGHUP
        with pytest.raises(WorkerStopped), stops.interruptible():  # asked before: at once
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
