"""The report: summary numbers of a hand-computed event log, and the PNG, HTML and JSON files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from acb_slurm.report import build_report, build_run, summarize
from acb_slurm.report.events import EventLogError
from acb_slurm.report.summary import (
    format_holdings,
    lease_steps,
    percentile,
    render_table,
    sharing_steps,
    utilisation_steps,
)


def ev(ts: float, event: str, **fields: Any) -> dict[str, Any]:
    return {"ts": ts, "event": event, "node": "n1", **fields}


def req(ts: float, worker: str, lease: str) -> dict[str, Any]:
    return ev(
        ts,
        "request",
        client=f"c-{worker}",
        worker=worker,
        lease=lease,
        gpu_count=1,
        memory_bytes=0,
        priority=0,
        label=f"{lease}/predict",
    )


def grant(ts: float, worker: str, lease: str, gpu: int, waited: float) -> dict[str, Any]:
    return ev(
        ts,
        "grant",
        client=f"c-{worker}",
        worker=worker,
        lease=lease,
        gpus=[gpu],
        device_ids=[str(gpu)],
        memory_bytes=0,
        waited=waited,
    )


def release(ts: float, worker: str, lease: str, gpu: int) -> dict[str, Any]:
    return ev(
        ts,
        "release",
        client=f"c-{worker}",
        worker=worker,
        lease=lease,
        gpus=[gpu],
        held=0.0,
        reason="release",
    )


#: Two GPUs, three workers. By hand: window 100..110 s; GPU 0 busy 4 + 2 + 1.5 = 7.5 s, GPU 1
#: busy 8 s, so 15.5 / 20 = 77.5%; granted waits 0, 3.5, 0, 1.5; handoffs a->b and b->a on GPU 0
#: with gaps 0.5 s and 0 s; b's second request is withdrawn.
LOG = [
    ev(
        99.0,
        "start",
        policy="simple",
        pid=1,
        gpus=[
            {"index": 0, "device_id": "0", "memory_bytes": 1},
            {"index": 1, "device_id": "1", "memory_bytes": 1},
        ],
    ),
    req(100.0, "a", "L1"),
    grant(100.0, "a", "L1", 0, 0.0),
    req(101.0, "b", "L2"),
    req(102.0, "c", "L3"),
    grant(102.0, "c", "L3", 1, 0.0),
    release(104.0, "a", "L1", 0),
    grant(104.5, "b", "L2", 0, 3.5),
    req(105.0, "a", "L4"),
    release(106.5, "b", "L2", 0),
    grant(106.5, "a", "L4", 0, 1.5),
    req(107.0, "b", "L5"),
    release(108.0, "a", "L4", 0),
    ev(109.0, "withdraw", client="c-b", worker="b", lease="L5", reason="deadline"),
    release(110.0, "c", "L3", 1),
    ev(111.0, "stop", reason="signal"),
]


def write_log(path: Path, events: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def test_summary_numbers_match_the_hand_computed_log(tmp_path: Path) -> None:
    run = build_run([write_log(tmp_path / "run" / "events.jsonl", LOG)])
    s = summarize(run)
    assert s.policy == "simple"
    assert (s.gpus, s.workers, s.grants, s.withdrawn) == (2, 3, 4, 1)
    assert s.window_s == pytest.approx(10.0)
    assert s.busy_by_gpu == {"n1:0": pytest.approx(0.75), "n1:1": pytest.approx(0.8)}
    assert s.busy_fraction == pytest.approx(0.775)
    assert s.wait_p50_s == pytest.approx(0.75)  # sorted 0, 0, 1.5, 3.5: halfway 0 and 1.5
    assert s.wait_p99_s == pytest.approx(1.5 + 2.0 * 0.97)
    assert s.wait_max_s == pytest.approx(3.5)
    assert s.handoffs == 2
    assert s.handoff_gap_p50_s == pytest.approx(0.25)
    assert s.mean_held_s == pytest.approx(15.5 / 4)
    assert run.workers == ["a", "b", "c"]
    assert [h.label for h in run.holdings] == [
        "L1/predict",
        "L3/predict",
        "L2/predict",
        "L4/predict",
    ]


def test_a_lease_never_released_is_held_to_the_end_of_the_log(tmp_path: Path) -> None:
    events = [req(0.0, "a", "L1"), grant(0.0, "a", "L1", 0, 0.0), ev(10.0, "stop", reason="x")]
    run = build_run([write_log(tmp_path / "events.jsonl", events)])
    (holding,) = run.holdings
    assert (holding.end, holding.reason) == (10.0, "open")


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_build_report_writes_png_html_and_summary_for_two_runs(tmp_path: Path) -> None:
    shared = write_log(tmp_path / "shared" / "events.jsonl", LOG)
    static_log = [
        LOG[0],
        req(100.0, "a", "S1"),
        grant(100.0, "a", "S1", 0, 0.0),
        release(102.0, "a", "S1", 0),
        req(100.0, "b", "S2"),
        grant(100.0, "b", "S2", 1, 0.0),
        release(110.0, "b", "S2", 1),
    ]
    static = write_log(tmp_path / "static" / "events.jsonl", static_log)
    paths = build_report([static], tmp_path / "out", [shared.parent])
    png = paths.png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = paths.html.read_text()
    assert "data:image/png;base64," in page
    assert "<th>static</th><th>shared</th>" in page
    assert "77.5%" in page and "60.0%" in page
    summaries = json.loads(paths.summary.read_text())
    assert [s["name"] for s in summaries] == ["static", "shared"]
    assert summaries[0]["busy_fraction"] == pytest.approx(0.6)


def test_python_m_report_prints_the_table(tmp_path: Path) -> None:
    log = write_log(tmp_path / "job" / "node1" / "events.jsonl", LOG)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "acb_slurm.report",
            str(log.parent.parent),
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "GPU busy fraction" in out and "77.5%" in out
    assert (tmp_path / "r" / "report.html").exists()
    missing = subprocess.run(
        [sys.executable, "-m", "acb_slurm.report", str(tmp_path / "empty-dir-none")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_a_broken_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"ts": 1, "event": "start"}\nnot json\n{"ts": 2, "event": "stop"}\n')
    with pytest.raises(EventLogError, match=r"events.jsonl:2"):
        build_run([path])
    path.write_text('{"ts": 1, "event": "start"}\n{"ts": 2, "ev')  # a log still being written
    assert build_run([path]).first_ts == 1.0


def test_leases_sharing_a_gpu_count_it_busy_once(tmp_path: Path) -> None:
    events = [
        req(0.0, "a", "L1"), grant(0.0, "a", "L1", 0, 0.0),
        req(1.0, "b", "L2"), grant(1.0, "b", "L2", 0, 0.0),
        release(2.0, "a", "L1", 0), release(4.0, "b", "L2", 0),
    ]  # fmt: skip
    run = build_run([write_log(tmp_path / "events.jsonl", events)])
    assert summarize(run).busy_fraction == pytest.approx(1.0)
    assert max(utilisation_steps(run)[1]) == 1
    assert max(lease_steps(run)[1]) == 2


def test_the_text_table_and_the_holdings_list(tmp_path: Path) -> None:
    run = build_run([write_log(tmp_path / "run" / "events.jsonl", LOG)])
    summary = summarize(run)
    table = render_table([summary.as_dict(), {**summary.as_dict(), "name": "again", "x": 1}])
    lines = table.splitlines()
    assert lines[0].split() == ["run", "again"]
    assert any(line.startswith("GPU busy fraction") and line.count("77.5%") == 2 for line in lines)
    holdings = format_holdings(run).splitlines()
    assert len(holdings) == 1 + 4
    assert holdings[1].split()[:6] == ["0.000", "4.000", "4.000", "a", "n1:0", "L1"]
    assert holdings[1].endswith("L1/predict")


#: Two GPUs: a and b share GPU 0 from 1 to 3 (and c joins them from 2 to 3: three holders); d
#: holds GPU 1 alone from 0 to 2. Window 0..4: GPU 0 busy 0..4 (4 s), GPU 1 busy 0..2 (2 s);
#: GPU 0 shared 1..3 (2 s), GPU 1 never.
SHARED_LOG = [
    req(0.0, "a", "A"), grant(0.0, "a", "A", 0, 0.0),
    req(0.0, "d", "D"), grant(0.0, "d", "D", 1, 0.0),
    req(1.0, "b", "B"), grant(1.0, "b", "B", 0, 0.0),
    req(2.0, "c", "C"), grant(2.0, "c", "C", 0, 0.0),
    release(2.0, "d", "D", 1),
    release(3.0, "a", "A", 0), release(3.0, "c", "C", 0),
    release(4.0, "b", "B", 0),
]  # fmt: skip


def test_busy_is_per_gpu_second_and_shared_time_is_its_own_figure(tmp_path: Path) -> None:
    run = build_run([write_log(tmp_path / "run" / "events.jsonl", SHARED_LOG)])
    s = summarize(run)
    assert s.window_s == pytest.approx(4.0)
    assert s.busy_by_gpu == {"n1:0": pytest.approx(1.0), "n1:1": pytest.approx(0.5)}
    assert s.busy_fraction == pytest.approx(6.0 / 8.0)  # not 4 leases' 9 lease-seconds
    assert s.shared_by_gpu == {"n1:0": pytest.approx(0.5), "n1:1": 0.0}
    assert s.shared_fraction == pytest.approx(2.0 / 8.0)
    assert s.max_holders == 3
    times, shared = sharing_steps(run)
    assert [(t, n) for t, n in zip(times, shared, strict=True) if 0 < t < 4] == [
        (1.0, 1),
        (3.0, 0),
    ]
    assert max(utilisation_steps(run)[1]) == 2 and max(lease_steps(run)[1]) == 3
    table = render_table([s])
    assert "GPU time shared" in table and "25.0%" in table
    assert any(line.startswith("most holders of a GPU") and line.endswith("3") for line in
               table.splitlines())  # fmt: skip


def test_the_report_of_a_shared_run_marks_the_shared_gpus(tmp_path: Path) -> None:
    shared = write_log(tmp_path / "shared" / "events.jsonl", SHARED_LOG)
    alone = write_log(tmp_path / "alone" / "events.jsonl", LOG)
    paths = build_report([alone], tmp_path / "out", [shared])
    page = paths.html.read_text()
    assert "GPU time shared" in page and "counts as\none busy GPU" in page
    summaries = json.loads(paths.summary.read_text())
    assert [s["shared_fraction"] for s in summaries] == [0.0, pytest.approx(0.25)]
    assert paths.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A summary.json written before these figures existed still renders.
    old = {k: v for k, v in summaries[0].items() if k not in ("shared_fraction", "max_holders")}
    assert "GPU time shared" in render_table([old])
