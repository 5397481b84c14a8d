"""Attempt records: what `items/<item>/logs/attempt-<n>.json` says about one try of an item.

A record is written when the attempt starts (`running`) and rewritten when it ends (`done`,
`failed` or `interrupted`). A worker that claims an item whose last attempt still says `running`
knows that attempt's worker died: it rewrites it as `crashed`. `reset-failed` turns counted
attempts into `interrupted` ones (with `reset: true`) so that they no longer count.

The JSON is the record's on-disk format: `Attempt.to_json()` writes exactly the keys the runner
always wrote (`error` and `ended` only once set, `reset` only when true), and keys this version
does not know are kept through a read and rewrite.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Outcome(enum.StrEnum):
    """How an attempt ended. running → done | failed | interrupted; a `running` attempt whose
    worker died is rewritten as crashed. Every outcome but interrupted counts against retries."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # stopped by a signal or a broken set-up; not the item's fault
    CRASHED = "crashed"  # its worker died while it ran

    @property
    def counts(self) -> bool:
        """Whether an attempt that ended so counts against the item's retries."""
        return self is not Outcome.INTERRUPTED


#: A stage's timing in an attempt record: device, mode, device ids, lease wait, started, wall_s,
#: cpu_s (as `_run_stage` returns it).
StageTiming = dict[str, Any]

_KNOWN = frozenset(
    {
        "attempt",
        "item",
        "worker",
        "host",
        "pid",
        "started",
        "outcome",
        "log",
        "stages",
        "error",
        "ended",
        "reset",
    }
)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of one item, as recorded in its attempt-<n>.json."""

    attempt: int
    item: str
    worker: str
    host: str
    pid: int
    started: float
    outcome: Outcome = Outcome.RUNNING
    log: str = ""
    stages: Mapping[str, StageTiming] = field(default_factory=dict)
    error: str | None = None
    ended: float | None = None
    reset: bool = False  # made uncounted by `reset-failed`
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys of other versions, kept

    @property
    def counts(self) -> bool:
        """Whether this attempt counts against the item's retries."""
        return self.outcome.counts

    def ending(self, outcome: Outcome, ended: float, error: str | None = None) -> Attempt:
        """This attempt ended with `outcome` at `ended` (with `error` unless done)."""
        return dataclasses.replace(self, outcome=outcome, ended=ended, error=error)

    def with_stage(self, name: str, timing: StageTiming) -> Attempt:
        """This attempt with one more finished stage."""
        return dataclasses.replace(self, stages={**self.stages, name: timing})

    def to_json(self) -> dict[str, Any]:
        """The record as written to attempt-<n>.json."""
        data: dict[str, Any] = dict(self.extra)
        data.update(
            {
                "attempt": self.attempt,
                "item": self.item,
                "worker": self.worker,
                "host": self.host,
                "pid": self.pid,
                "started": self.started,
                "outcome": self.outcome.value,
                "log": self.log,
                "stages": {name: dict(timing) for name, timing in self.stages.items()},
            }
        )
        if self.error is not None:
            data["error"] = self.error
        if self.ended is not None:
            data["ended"] = self.ended
        if self.reset:
            data["reset"] = True
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Attempt:
        """A record read from attempt-<n>.json; ValueError when it is not one (no int
        `attempt`, an unknown `outcome`, a field of the wrong type)."""
        try:
            attempt = data["attempt"]
            outcome = Outcome(data["outcome"])
        except KeyError as exc:
            raise ValueError(f"attempt record without {exc.args[0]!r}") from None
        if not isinstance(attempt, int) or isinstance(attempt, bool):
            raise ValueError(f"attempt record with attempt {attempt!r}")
        stages = data.get("stages", {})
        if not isinstance(stages, dict) or not all(isinstance(t, dict) for t in stages.values()):
            raise ValueError("attempt record with malformed stages")
        error = data.get("error")
        ended = data.get("ended")
        started = data.get("started", 0.0)
        pid = data.get("pid", 0)
        for key, value, types in (
            ("item", data.get("item", ""), (str,)),
            ("worker", data.get("worker", ""), (str,)),
            ("host", data.get("host", ""), (str,)),
            ("log", data.get("log", ""), (str,)),
            ("pid", pid, (int,)),
            ("started", started, (int, float)),
            ("error", error, (str, type(None))),
            ("ended", ended, (int, float, type(None))),
        ):
            if not isinstance(value, types) or isinstance(value, bool):
                raise ValueError(f"attempt record with {key} {value!r}")
        return cls(
            attempt=attempt,
            item=data.get("item", ""),
            worker=data.get("worker", ""),
            host=data.get("host", ""),
            pid=pid,
            started=started,
            outcome=outcome,
            log=data.get("log", ""),
            stages={name: dict(timing) for name, timing in stages.items()},
            error=error,
            ended=ended,
            reset=data.get("reset") is True,
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )
