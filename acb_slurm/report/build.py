"""`build_report`: read the logs, summarise, draw, and write PNG, HTML and summary JSON."""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from acb_slurm.report.events import EventLogError, Run, build_run, find_event_logs
from acb_slurm.report.summary import Summary, format_table, summarize


@dataclass(frozen=True, slots=True)
class ReportPaths:
    """The files a report consists of."""

    png: Path
    html: Path
    summary: Path  # JSON: one summary object per run


def _default_names(given: Sequence[Sequence[Path]]) -> list[str]:
    """A run is named after the directory given (a job's run dir: its job id), or after the
    directory of the log file given."""
    names = []
    for paths in given:
        first = Path(paths[0])
        names.append(first.name if first.is_dir() else first.parent.name or "run")
    if len(names) == 2 and names[0] == names[1]:
        names = ["run", "compare"]
    return names


def render_html(runs: Sequence[Run], summaries: Sequence[Summary], png: Path, title: str) -> str:
    """A self-contained page: the PNG embedded as base64, the summary table, the sources."""
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    esc = html.escape
    head = "".join(f"<th>{esc(s.name)}</th>" for s in summaries)
    body = "".join(
        "<tr><th>" + esc(label) + "</th>" + "".join(f"<td>{esc(v)}</td>" for v in values) + "</tr>"
        for label, values in format_table(summaries)
    )
    sources = "".join(
        f"<li>{esc(run.name)}: "
        + ", ".join(f"<code>{esc(str(p))}</code>" for p in run.sources)
        + "</li>"
        for run in runs
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }}
thead th {{ background: #f0f0f0; }} tbody th {{ text-align: left; font-weight: normal; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>One row per worker: coloured bars are GPU holdings (colour = GPU), cross-hatched where the GPU
had other holders at the same time; grey hatched bars are waits for a GPU. Below: how many GPUs
were busy over time, and how many of them were shared by two or more holders.</p>
<img alt="GPU timeline" src="data:image/png;base64,{image}">
<h2>Summary</h2>
<table><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>
<p>GPU busy fraction, per GPU-second: the seconds in which at least one lease held a GPU, summed
over GPUs, over GPUs x window (first request to last release). A GPU with two holders counts as
one busy GPU: its holders share its compute. GPU time shared: the seconds in which two or more
leases held a GPU, over the same; most holders: the most leases on one GPU at once. Waits:
request to grant. Handoff: a GPU passing to another client; its gap is release to the next grant
when that request was already waiting.</p>
<h2>Sources</h2><ul>{sources}</ul>
<p><small>generated {esc(time.strftime("%Y-%m-%d %H:%M:%S"))}</small></p>
</body></html>
"""


def build_report(
    event_logs: list[Path],
    out_dir: Path,
    compare: list[Path] | None = None,
    *,
    names: Sequence[str] | None = None,
    title: str = "acb-slurm GPU timeline",
) -> ReportPaths:
    """Write `timeline.png`, `report.html` and `summary.json` into `out_dir`.

    `event_logs` are the logs of one run (one per node; directories are searched for
    `events*.jsonl`); `compare`, when given, is a second run drawn beside it (e.g. static vs
    shared). `names` labels the runs (default: the logs' directory names).
    """
    from acb_slurm.report.timeline import draw_timeline

    groups = [find_event_logs(event_logs)]
    if compare:
        groups.append(find_event_logs(compare))
    for group, given in zip(groups, [event_logs, compare or []], strict=False):
        if not group:
            raise EventLogError(
                f"no event logs found in {', '.join(str(p) for p in given)} "
                "(expected files named events*.jsonl)"
            )
    labels = list(names) if names else _default_names([event_logs, *([compare] if compare else [])])
    if len(labels) != len(groups):
        raise ValueError(f"{len(groups)} run(s) but {len(labels)} name(s): {labels}")
    runs = [build_run(g, n) for g, n in zip(groups, labels, strict=True)]
    summaries = [summarize(r) for r in runs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = draw_timeline(runs, summaries, out_dir / "timeline.png")
    page = out_dir / "report.html"
    page.write_text(render_html(runs, summaries, png, title), encoding="utf-8")
    summary = out_dir / "summary.json"
    summary.write_text(
        json.dumps([s.as_dict() for s in summaries], indent=1) + "\n", encoding="utf-8"
    )
    return ReportPaths(png=png, html=page, summary=summary)
