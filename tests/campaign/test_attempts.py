"""Attempt records: typed, and written exactly as the runner always wrote them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from acb_slurm.campaign.attempts import Attempt, Outcome
from acb_slurm.campaign.store import ResultsStore, _write_json_atomic

TIMING = {"device": "gpu", "mode": "gate", "device_ids": ["0", "1"], "lease_wait_s": 0.25,
          "started": 1700000000.5, "wall_s": 1.25, "cpu_s": 0.5}  # fmt: skip


def _attempt(outcome: Outcome, **kw: Any) -> Attempt:
    return Attempt(
        attempt=2, item="prot001", worker="w0", host="node7", pid=4242,
        started=1700000000.125, outcome=outcome, log="/r/items/prot001/logs/attempt-2.log", **kw,
    )  # fmt: skip


def _disk_bytes(data: dict[str, Any]) -> str:
    """What the store writes for a record (json.dump, indent=1, sorted keys)."""
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_outcome_round_trips_through_json(outcome: Outcome) -> None:
    ended = None if outcome is Outcome.RUNNING else 1700000009.75
    error = None if outcome in (Outcome.RUNNING, Outcome.DONE) else f"why it {outcome}"
    record = _attempt(outcome, stages={"fold": TIMING}, ended=ended, error=error)
    text = _disk_bytes(record.to_json())
    back = Attempt.from_json(json.loads(text))
    assert back == record
    assert back.outcome is outcome
    assert _disk_bytes(back.to_json()) == text


def test_outcomes_are_exactly_those_written() -> None:
    assert [o.value for o in Outcome] == ["running", "done", "failed", "interrupted", "crashed"]
    assert [o for o in Outcome if not o.counts] == [Outcome.INTERRUPTED]


# Records as the runner wrote them before attempts were typed (dicts, json.dump'ed by the store).
OLD_RECORDS = {
    "running": {"attempt": 1, "item": "p", "worker": "w", "host": "h", "pid": 7,
                "started": 1.5, "outcome": "running", "log": "/l", "stages": {}},
    "done": {"attempt": 1, "item": "p", "worker": "w", "host": "h", "pid": 7, "started": 1.5,
             "outcome": "done", "log": "/l", "stages": {"a": TIMING, "b": {"device": "cpu"}},
             "ended": 9.25},
    "failed": {"attempt": 3, "item": "p", "worker": "w", "host": "h", "pid": 7, "started": 1.5,
               "outcome": "failed", "log": "/l", "stages": {}, "ended": 2.0,
               "error": "stage a exited with code 3"},
    "crashed": {"attempt": 1, "item": "p", "worker": "w", "host": "h", "pid": 7, "started": 1.5,
                "outcome": "crashed", "log": "/l", "stages": {},
                "error": "the worker running this attempt died"},
    "reset": {"attempt": 1, "item": "p", "worker": "w", "host": "h", "pid": 7, "started": 1.5,
              "outcome": "interrupted", "log": "/l", "stages": {}, "ended": 2.0,
              "error": "stage a exited with code 3", "reset": True},
    "unknown key": {"attempt": 1, "item": "p", "worker": "w", "host": "h", "pid": 7,
                    "started": 1.5, "outcome": "done", "log": "/l", "stages": {}, "ended": 2,
                    "from_a_later_version": {"x": [1, 2]}},
}  # fmt: skip


@pytest.mark.parametrize("name", list(OLD_RECORDS))
def test_records_on_disk_are_read_and_rewritten_byte_for_byte(name: str, tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    old = OLD_RECORDS[name]
    path = store.logs_dir("p") / f"attempt-{old['attempt']}.json"
    path.parent.mkdir(parents=True)
    _write_json_atomic(path, old)
    written = path.read_bytes()
    (record,) = store.attempt_records("p")
    store.write_attempt("p", record)
    assert path.read_bytes() == written
    assert store.attempts("p") == [old]


def test_the_running_record_and_its_ending_are_written_as_before(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.logs_dir("p").mkdir(parents=True)
    record = Attempt(attempt=1, item="p", worker="w", host="h", pid=7, started=1.5, log="/l")
    store.write_attempt("p", record)
    assert store.attempts("p") == [OLD_RECORDS["running"]]
    record = record.with_stage("a", TIMING).with_stage("b", {"device": "cpu"})
    store.write_attempt("p", record.ending(Outcome.DONE, 9.25))
    path = store.logs_dir("p") / "attempt-1.json"
    assert path.read_text() == _disk_bytes(OLD_RECORDS["done"])


def test_reset_failed_writes_what_it_always_wrote(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.create()
    store.logs_dir("p").mkdir(parents=True)
    failed = OLD_RECORDS["failed"]
    store.write_attempt("p", Attempt.from_json(failed))
    store.record_failed("p", {"item": "p", "attempts": 1})
    assert store.reset_failed() == ["p"]
    path = store.logs_dir("p") / "attempt-3.json"
    assert path.read_text() == _disk_bytes({**failed, "outcome": "interrupted", "reset": True})
    (record,) = store.attempt_records("p")
    assert record.reset and not record.counts


@pytest.mark.parametrize(
    "data",
    [
        {"outcome": "done"},
        {"attempt": 1},
        {"attempt": 1, "outcome": "exploded"},
        {"attempt": "1", "outcome": "done"},
        {"attempt": 1, "outcome": "done", "stages": []},
        {"attempt": 1, "outcome": "done", "error": 3},
    ],
)
def test_what_is_no_attempt_record_is_refused_and_left_out(
    data: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(ValueError):
        Attempt.from_json(data)
    store = ResultsStore(tmp_path)
    store.logs_dir("p").mkdir(parents=True)
    _write_json_atomic(store.logs_dir("p") / "attempt-1.json", data)
    assert store.attempt_records("p") == []
