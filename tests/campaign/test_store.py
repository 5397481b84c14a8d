"""Claims in the results directory: exclusive under contention of real processes, and stale
claims of dead workers taken over exactly once."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from acb_slurm.campaign.store import (
    ClaimInfo,
    ClaimState,
    ResultsStore,
    WorkerIdentity,
    process_start_time,
)

ITEMS = [f"item{i:03d}" for i in range(60)]


def _claim_all(root: str, name: str, start_at: float, out: str) -> None:
    """In a separate process: wait for the common start, then try to claim every item."""
    store = ResultsStore(Path(root))
    me = WorkerIdentity.current(name)
    while time.time() < start_at:
        pass
    won = [item for item in ITEMS if store.try_claim(item, me) is not None]
    Path(out).write_text(json.dumps(won))


def _take_over(root: str, name: str, start_at: float, out: str) -> None:
    store = ResultsStore(Path(root))
    me = WorkerIdentity.current(name)
    # What every process judged stale: the ghost's claim, as the parent read it before the race.
    seen = ClaimInfo(**json.loads((Path(root) / "seen.json").read_text()))
    while time.time() < start_at:
        pass
    claim = store.take_over(seen, me)
    Path(out).write_text(json.dumps(claim is not None))


def _run_processes(target, root: Path, count: int) -> list:  # type: ignore[no-untyped-def]
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 2.0
    outs = [root / f"out{i}.json" for i in range(count)]
    procs = [
        ctx.Process(target=target, args=(str(root), f"w{i}", start_at, str(outs[i])))
        for i in range(count)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return [json.loads(o.read_text()) for o in outs]


def test_concurrent_processes_never_claim_the_same_item(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.create()
    won = _run_processes(_claim_all, tmp_path, 6)
    all_won = [item for w in won for item in w]
    assert sorted(all_won) == ITEMS  # every item exactly once
    assert sum(1 for w in won if w) >= 1


def test_a_stale_claim_is_taken_over_by_exactly_one_of_many(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.create()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    ghost = WorkerIdentity("ghost", os.uname().nodename, int(dead.stdout), "1")
    assert store.try_claim("item000", ghost) is not None
    seen = store.read_claim("item000")
    assert seen is not None and store.is_stale(seen)
    (tmp_path / "seen.json").write_text(json.dumps(dataclasses.asdict(seen)))
    results = _run_processes(_take_over, tmp_path, 5)
    assert results.count(True) == 1
    info = store.read_claim("item000")
    assert info is not None and info.data["worker"] != "ghost"


def test_liveness_same_host_by_pid_elsewhere_by_heartbeat(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path, stale_after_s=60)
    store.create()
    host = os.uname().nodename
    me = WorkerIdentity.current("me")
    assert store.try_claim("alive", me) is not None
    old = time.time() - 3600
    os.utime(store.claim_path("alive"), (old, old))
    info = store.read_claim("alive")
    assert info is not None and not store.is_stale(info)  # our pid runs: old mtime is fine

    reused = WorkerIdentity("reused", host, os.getpid(), "not-our-start-time")
    assert store.try_claim("reused", reused) is not None
    info = store.read_claim("reused")
    assert info is not None and store.is_stale(info)  # same pid, another process

    remote = WorkerIdentity("remote", "some-other-host", 12345, "1")
    claim = store.try_claim("remote", remote)
    assert claim is not None
    info = store.read_claim("remote")
    assert info is not None and not store.is_stale(info)  # fresh heartbeat
    os.utime(claim.path, (old, old))
    info = store.read_claim("remote")
    assert info is not None and store.is_stale(info)  # no heartbeat for an hour


def test_a_live_claim_is_not_taken_over(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.create()
    me = WorkerIdentity.current("me")
    claim = store.try_claim("x", me)
    assert claim is not None
    info = store.read_claim("x")
    assert info is not None
    assert store.take_over(info, WorkerIdentity.current("other")) is None
    assert store.still_mine(claim)


def test_done_is_published_once(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.create()
    assert store.record_done("x", {"by": 1})
    assert not store.record_done("x", {"by": 2})
    assert json.loads(store.done_path("x").read_text()) == {"by": 1}
    assert process_start_time(os.getpid()) is not None


def test_a_finished_items_claim_stays_as_a_tombstone_nobody_claims_or_takes_over(
    tmp_path: Path,
) -> None:
    store = ResultsStore(tmp_path, stale_after_s=1)
    store.create()
    me = WorkerIdentity.current("me")
    claim = store.try_claim("x", me)
    assert claim is not None
    assert store.record_done("x", {"by": "me"})
    store.finish(claim, ClaimState.DONE, me)
    info = store.read_claim("x")
    assert info is not None and info.finished and info.state is ClaimState.DONE
    assert not store.still_mine(claim) and not store.heartbeat(claim)

    # Another node whose NFS client still caches "done/x.json does not exist": the O_EXCL create
    # of the claim fails all the same, and the tombstone is neither stale nor taken over, even
    # long after, and even when its worker is gone.
    store.done_path("x").rename(tmp_path / "hidden.json")
    assert not store.is_finished("x")
    other = WorkerIdentity("other", "another-host", 1, "1")
    assert store.try_claim("x", other) is None
    old = time.time() - 3600
    os.utime(store.claim_path("x"), (old, old))
    ghost_tombstone = store.read_claim("x")
    assert ghost_tombstone is not None and not store.is_stale(ghost_tombstone)
    assert store.take_over(ghost_tombstone, other) is None
    assert store.read_claim("x") == ghost_tombstone

    # A released (unfinished) claim is gone, so the item can be claimed again.
    claim_y = store.try_claim("y", me)
    assert claim_y is not None
    store.release(claim_y)
    assert store.read_claim("y") is None and store.try_claim("y", other) is not None


def test_reset_failed_removes_the_failed_tombstone_but_never_a_done_one(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.create()
    me = WorkerIdentity.current("me")
    for item, state in (("bad", ClaimState.FAILED), ("good", ClaimState.DONE)):
        claim = store.try_claim(item, me)
        assert claim is not None
        record = store.record_failed if state is ClaimState.FAILED else store.record_done
        assert record(item, {"item": item})
        store.finish(claim, state, me)
    # A failed record of an item that is also done (a stale failed record): its tombstone stays.
    assert store.record_failed("good", {"item": "good"})
    assert store.reset_failed() == ["bad", "good"]
    assert store.read_claim("bad") is None
    assert store.try_claim("bad", me) is not None
    done = store.read_claim("good")
    assert done is not None and done.state is ClaimState.DONE
    assert store.try_claim("good", me) is None
