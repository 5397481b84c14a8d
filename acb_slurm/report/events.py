"""Read assigner event logs (JSON lines, docs/ARCHITECTURE.md) into holdings and waits.

A holding is a `grant` paired with its `release` (same node and lease); a wait is a `request`
paired with its `grant` or `withdraw`. A lease never released (the log ends first) is held until
the last event of the log. Several logs of one run (one per node) are merged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class EventLogError(ValueError):
    """An event log cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Holding:
    """One lease held on GPUs from `start` to `end`."""

    node: str
    worker: str
    client: str
    lease: str
    gpus: tuple[int, ...]
    device_ids: tuple[str, ...]
    start: float
    end: float
    waited: float
    label: str = ""
    reason: str = "release"  # release reason, or "open" when the log ended first

    @property
    def held(self) -> float:
        """Seconds held."""
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Wait:
    """A request queued from `start` until granted or withdrawn at `end`."""

    node: str
    worker: str
    client: str
    lease: str
    start: float
    end: float
    outcome: str  # "granted", "withdrawn" or "open"

    @property
    def waited(self) -> float:
        """Seconds waited."""
        return self.end - self.start


@dataclass
class Run:
    """Everything a report needs from the event logs of one run."""

    name: str
    sources: list[Path]
    policy: str = ""
    gpus: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    holdings: list[Holding] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)
    first_ts: float = 0.0
    last_ts: float = 0.0

    @property
    def workers(self) -> list[str]:
        """Worker names in order of their first request or grant."""
        seen: dict[str, float] = {}
        for w in self.waits:
            seen[w.worker] = min(seen.get(w.worker, w.start), w.start)
        for h in self.holdings:
            seen[h.worker] = min(seen.get(h.worker, h.start), h.start)
        return sorted(seen, key=lambda k: (seen[k], k))

    @property
    def gpu_keys(self) -> list[tuple[str, int]]:
        """(node, gpu index) of every GPU of the run, sorted."""
        keys = set(self.gpus)
        for h in self.holdings:
            keys.update((h.node, g) for g in h.gpus)
        return sorted(keys)

    @property
    def window(self) -> tuple[float, float]:
        """From the first request or grant to the last release: the time the GPUs were wanted."""
        starts = [w.start for w in self.waits] + [h.start for h in self.holdings]
        ends = [h.end for h in self.holdings] + [w.end for w in self.waits]
        if not starts:
            return (self.first_ts, self.last_ts)
        return (min(starts), max(ends))


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of one log file, in file order. Blank lines are skipped; a broken last line (a
    log still being written) is ignored; any other broken line is an error."""
    events: list[dict[str, Any]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EventLogError(f"{path}: cannot read the event log: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise EventLogError(f"{path}:{number}: not a JSON object: {line[:80]!r}") from None
        if not isinstance(event, dict) or "ts" not in event or "event" not in event:
            raise EventLogError(f"{path}:{number}: an event needs 'ts' and 'event': {line[:80]!r}")
        events.append(event)
    return events


def _worker(event: dict[str, Any]) -> str:
    return str(event.get("worker") or event.get("client") or "?")


def build_run(paths: Sequence[Path], name: str | None = None) -> Run:
    """Merge the logs of one run and pair its events into holdings and waits."""
    events: list[dict[str, Any]] = []
    for path in paths:
        events.extend(read_events(path))
    events.sort(key=lambda e: float(e["ts"]))
    run = Run(name=name or (Path(paths[0]).parent.name if paths else "run"), sources=list(paths))
    if not events:
        return run
    run.first_ts = float(events[0]["ts"])
    run.last_ts = float(events[-1]["ts"])

    requests: dict[tuple[str, str], dict[str, Any]] = {}
    grants: dict[tuple[str, str], dict[str, Any]] = {}
    for e in events:
        kind = e["event"]
        node = str(e.get("node", ""))
        key = (node, str(e.get("lease", "")))
        ts = float(e["ts"])
        if kind == "start":
            run.policy = str(e.get("policy", run.policy))
            for gpu in e.get("gpus", []) or []:
                run.gpus[(node, int(gpu.get("index", 0)))] = dict(gpu)
        elif kind == "request":
            requests[key] = e
        elif kind == "grant":
            grants[key] = e
            req = requests.pop(key, None)
            waited = float(e.get("waited", ts - float(req["ts"]) if req else 0.0))
            run.waits.append(
                Wait(node, _worker(e), str(e.get("client", "")), key[1], ts - waited, ts, "granted")
            )
            if req is not None and "label" in req:
                e = {**e, "label": req["label"]}
                grants[key] = e
        elif kind == "withdraw":
            req = requests.pop(key, None)
            if req is not None:
                run.waits.append(
                    Wait(
                        node,
                        _worker(e),
                        str(e.get("client", "")),
                        key[1],
                        float(req["ts"]),
                        ts,
                        "withdrawn",
                    )
                )
        elif kind == "release":
            grant = grants.pop(key, None)
            if grant is not None:
                run.holdings.append(_holding(grant, ts, str(e.get("reason", "release"))))
    for grant in grants.values():
        run.holdings.append(_holding(grant, run.last_ts, "open"))
    for key, req in requests.items():
        run.waits.append(
            Wait(
                key[0],
                _worker(req),
                str(req.get("client", "")),
                key[1],
                float(req["ts"]),
                run.last_ts,
                "open",
            )
        )
    run.holdings.sort(key=lambda h: (h.start, h.node, h.gpus))
    run.waits.sort(key=lambda w: (w.start, w.node))
    return run


def _holding(grant: dict[str, Any], end: float, reason: str) -> Holding:
    return Holding(
        node=str(grant.get("node", "")),
        worker=_worker(grant),
        client=str(grant.get("client", "")),
        lease=str(grant.get("lease", "")),
        gpus=tuple(int(g) for g in grant.get("gpus", []) or []),
        device_ids=tuple(str(d) for d in grant.get("device_ids", []) or []),
        start=float(grant["ts"]),
        end=end,
        waited=float(grant.get("waited", 0.0)),
        label=str(grant.get("label", "")),
        reason=reason,
    )


def find_event_logs(paths: Iterable[Path]) -> list[Path]:
    """Expand directories to the event logs inside them (`**/events*.jsonl`)."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found.extend(sorted(path.rglob("events*.jsonl")))
        else:
            found.append(path)
    return found
