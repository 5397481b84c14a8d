"""Summary numbers of a run: GPU busy fraction, waits, handoffs.

Definitions (the tests compute them by hand the same way):
- window: first request (or grant) to last release of the run;
- busy fraction, per GPU-second: the seconds in which at least one lease held a GPU, summed
  over GPUs, over (GPUs x window). A GPU with two holders is one busy GPU, not two: holders of
  one GPU share its compute, so leases held are not GPU time used;
- shared fraction: the seconds in which two or more leases held a GPU, summed over GPUs, over
  (GPUs x window); most holders: the most leases that held one GPU at once;
- waits: request to grant of every granted request; p50/p99 interpolate linearly between ranks;
- handoff: a grant on a GPU whose previous holder was another client; handoff gap: release to
  that next grant, counted only when the next request was already waiting at the release.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from acb_slurm.report.events import Holding, Run


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def merge_intervals(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of intervals, sorted and disjoint."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True, slots=True)
class Summary:
    """The numbers of the summary table."""

    name: str
    policy: str
    gpus: int
    workers: int
    grants: int
    window_s: float
    busy_fraction: float
    busy_by_gpu: dict[str, float]
    wait_p50_s: float | None
    wait_p99_s: float | None
    wait_max_s: float | None
    withdrawn: int
    handoffs: int
    handoff_gap_p50_s: float | None
    mean_held_s: float | None
    shared_fraction: float = 0.0
    shared_by_gpu: dict[str, float] = field(default_factory=dict)
    max_holders: int = 0

    def as_dict(self) -> dict[str, object]:
        """Plain data (summary.json)."""
        return asdict(self)


def gpu_intervals(run: Run) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """Busy intervals (merged) of every GPU of the run."""
    by_gpu: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for h in run.holdings:
        for g in h.gpus:
            by_gpu[(h.node, g)].append((h.start, h.end))
    return {key: merge_intervals(by_gpu.get(key, [])) for key in run.gpu_keys}


def holder_counts(run: Run) -> dict[tuple[str, int], list[tuple[float, float, int]]]:
    """Per GPU of the run: (start, end, holders) of every span in which its number of holders
    was constant and above zero, in time order."""
    deltas: dict[tuple[str, int], dict[float, int]] = {key: {} for key in run.gpu_keys}
    for h in run.holdings:
        for g in h.gpus:
            changes = deltas.setdefault((h.node, g), {})
            changes[h.start] = changes.get(h.start, 0) + 1
            changes[h.end] = changes.get(h.end, 0) - 1
    spans: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
    for key, changes in deltas.items():
        level, previous, out = 0, 0.0, []
        for t in sorted(changes):
            if level > 0 and t > previous:
                out.append((previous, t, level))
            level += changes[t]
            previous = t
        spans[key] = out
    return spans


def shared_intervals(run: Run) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """Per GPU: the intervals (merged) in which two or more leases held it."""
    return {
        key: merge_intervals([(s, e) for s, e, n in spans if n >= 2])
        for key, spans in holder_counts(run).items()
    }


def _handoffs(run: Run) -> tuple[int, list[float]]:
    by_gpu: dict[tuple[str, int], list[Holding]] = defaultdict(list)
    for h in run.holdings:
        for g in h.gpus:
            by_gpu[(h.node, g)].append(h)
    count = 0
    gaps: list[float] = []
    for holdings in by_gpu.values():
        holdings.sort(key=lambda h: h.start)
        for prev, nxt in itertools.pairwise(holdings):
            if nxt.client == prev.client:
                continue
            count += 1
            requested = nxt.start - nxt.waited
            if requested <= prev.end and nxt.start >= prev.end:
                gaps.append(nxt.start - prev.end)
    return count, gaps


def summarize(run: Run) -> Summary:
    """The summary numbers of one run."""
    start, end = run.window
    window = max(0.0, end - start)
    intervals = gpu_intervals(run)
    busy_by_gpu: dict[str, float] = {}
    total_busy = 0.0
    for (node, index), spans in intervals.items():
        busy = sum(min(e, end) - max(s, start) for s, e in spans if e > start and s < end)
        total_busy += busy
        label = f"{node}:{index}" if node else str(index)
        busy_by_gpu[label] = busy / window if window > 0 else 0.0
    gpus = len(intervals)
    busy_fraction = total_busy / (gpus * window) if gpus and window > 0 else 0.0
    shared_by_gpu: dict[str, float] = {}
    total_shared = 0.0
    for (node, index), spans in shared_intervals(run).items():
        shared = sum(min(e, end) - max(s, start) for s, e in spans if e > start and s < end)
        total_shared += shared
        label = f"{node}:{index}" if node else str(index)
        shared_by_gpu[label] = shared / window if window > 0 else 0.0
    counts = [n for spans in holder_counts(run).values() for _, _, n in spans]
    granted = [w.waited for w in run.waits if w.outcome == "granted"]
    handoffs, gaps = _handoffs(run)
    held = [h.held for h in run.holdings]
    return Summary(
        name=run.name,
        policy=run.policy,
        gpus=gpus,
        workers=len(run.workers),
        grants=len(run.holdings),
        window_s=window,
        busy_fraction=busy_fraction,
        busy_by_gpu=busy_by_gpu,
        wait_p50_s=percentile(granted, 50),
        wait_p99_s=percentile(granted, 99),
        wait_max_s=max(granted) if granted else None,
        withdrawn=sum(1 for w in run.waits if w.outcome == "withdrawn"),
        handoffs=handoffs,
        handoff_gap_p50_s=percentile(gaps, 50),
        mean_held_s=sum(held) / len(held) if held else None,
        shared_fraction=total_shared / (gpus * window) if gpus and window > 0 else 0.0,
        shared_by_gpu=shared_by_gpu,
        max_holders=max(counts, default=0),
    )


def _step_function(run: Run, spans: Iterable[tuple[float, float]]) -> tuple[list[float], list[int]]:
    """(times, how many spans are open) as a step function from the run's first to last event."""
    deltas: dict[float, int] = defaultdict(int)
    for start, end in spans:
        deltas[start] += 1
        deltas[end] -= 1
    times, counts, level = [run.first_ts], [0], 0
    for t in sorted(deltas):
        level += deltas[t]
        times.append(t)
        counts.append(level)
    times.append(max(run.last_ts, times[-1]))
    counts.append(level)
    return times, counts


def utilisation_steps(run: Run) -> tuple[list[float], list[int]]:
    """(times, busy GPU count) as a step function from the run's first to last event."""
    return _step_function(run, (span for spans in gpu_intervals(run).values() for span in spans))


def sharing_steps(run: Run) -> tuple[list[float], list[int]]:
    """(times, GPUs held by two or more leases) as a step function."""
    return _step_function(run, (span for spans in shared_intervals(run).values() for span in spans))


def lease_steps(run: Run) -> tuple[list[float], list[int]]:
    """(times, leases held) as a step function: above the busy-GPU count when leases share GPUs."""
    return _step_function(run, ((h.start, h.end) for h in run.holdings))


def format_table(summaries: Sequence[Summary]) -> list[tuple[str, list[str]]]:
    """Rows (label, one value per run) of the summary table."""

    def secs(v: float | None) -> str:
        if v is None:
            return "-"
        if v >= 1.0:
            return f"{v:.2f}s"
        return f"{v * 1000:.0f}ms" if v >= 0.01 else f"{v * 1000:.2f}ms"

    rows: list[tuple[str, list[str]]] = [
        ("policy", [s.policy or "?" for s in summaries]),
        ("GPUs / workers", [f"{s.gpus} / {s.workers}" for s in summaries]),
        ("window", [secs(s.window_s) for s in summaries]),
        ("GPU busy fraction", [f"{100 * s.busy_fraction:.1f}%" for s in summaries]),
        ("GPU time shared", [f"{100 * s.shared_fraction:.1f}%" for s in summaries]),
        ("most holders of a GPU", [str(s.max_holders) for s in summaries]),
        ("grants", [str(s.grants) for s in summaries]),
        ("mean hold", [secs(s.mean_held_s) for s in summaries]),
        ("wait p50", [secs(s.wait_p50_s) for s in summaries]),
        ("wait p99", [secs(s.wait_p99_s) for s in summaries]),
        ("handoffs", [str(s.handoffs) for s in summaries]),
        ("handoff gap p50", [secs(s.handoff_gap_p50_s) for s in summaries]),
        ("withdrawn requests", [str(s.withdrawn) for s in summaries]),
    ]
    return rows


def render_table(summaries: Sequence[Summary | Mapping[str, Any]]) -> str:
    """The summary table as text, one column per run (summary.json's objects are accepted)."""
    known = {f.name for f in fields(Summary)}
    runs = [
        s if isinstance(s, Summary) else Summary(**{k: v for k, v in s.items() if k in known})
        for s in summaries
    ]
    rows = format_table(runs)
    width = max(len(label) for label, _ in rows)
    columns = [
        max(14, len(r.name), *(len(values[i]) for _, values in rows)) for i, r in enumerate(runs)
    ]
    lines = [
        " " * width + "  " + "  ".join(f"{r.name:>{w}}" for r, w in zip(runs, columns, strict=True))
    ]
    for label, values in rows:
        cells = "  ".join(f"{v:>{w}}" for v, w in zip(values, columns, strict=True))
        lines.append(f"{label:<{width}}  {cells}")
    return "\n".join(lines)


def format_holdings(run: Run) -> str:
    """Every lease of the run, in grant order: when (seconds since the first request), how long,
    who, which GPUs, and what for (the request's label)."""
    t0 = run.window[0]
    lines = [f"{'from':>9} {'to':>9} {'held':>8}  {'worker':<24} {'GPUs':<10} {'lease':<14} label"]
    for h in run.holdings:
        gpus = ",".join(f"{h.node}:{g}" if h.node else str(g) for g in h.gpus)
        note = "" if h.reason == "release" else f" ({h.reason})"
        lines.append(
            f"{h.start - t0:9.3f} {h.end - t0:9.3f} {h.held:8.3f}  {h.worker:<24} {gpus:<10} "
            f"{h.lease:<14} {h.label}{note}"
        )
    return "\n".join(lines)
