"""The timeline picture: one row per worker with its GPU holdings (coloured by GPU; cross-hatched
while the GPU had other holders too) and waits (light, hatched), and below, over time, the busy
GPUs (a GPU with two holders is one busy GPU) with the shared ones marked; two runs side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from acb_slurm.report.events import Run
from acb_slurm.report.summary import (
    Summary,
    lease_steps,
    shared_intervals,
    sharing_steps,
    utilisation_steps,
)

WAIT_COLOUR = "#d9d9d9"
WAIT_EDGE = "#8c8c8c"
SHARED_HATCH = "xxxx"
SHARED_COLOUR = "#dd8452"


def _gpu_colours(keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
    tab10, dark2 = plt.get_cmap("tab10"), plt.get_cmap("Dark2")
    palette = [tab10(i) for i in range(10)] + [dark2(i) for i in range(8)]
    return {key: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, key in enumerate(keys)}


def _gpu_name(key: tuple[str, int], multi_node: bool) -> str:
    return f"GPU {key[0]}:{key[1]}" if multi_node else f"GPU {key[1]}"


def draw_timeline(runs: Sequence[Run], summaries: Sequence[Summary], path: Path) -> Path:
    """Write the timeline PNG of one or two runs to `path`."""
    rows = max((len(r.workers) for r in runs), default=1) or 1
    width = 9.0 * len(runs) if len(runs) > 1 else 12.0
    height = min(40.0, 1.6 + 0.32 * rows + 1.9)
    fig, axes = plt.subplots(
        2,
        len(runs),
        figsize=(width, height),
        squeeze=False,
        gridspec_kw={"height_ratios": [max(2.0, 0.32 * rows), 1.4]},
        sharex="col",
        layout="constrained",
    )
    span = max((r.window[1] - r.window[0] for r in runs), default=1.0) or 1.0
    for col, (run, summary) in enumerate(zip(runs, summaries, strict=True)):
        top, bottom = axes[0][col], axes[1][col]
        t0 = run.window[0]
        workers = run.workers
        row_of = {w: i for i, w in enumerate(workers)}
        keys = run.gpu_keys
        colours = _gpu_colours(keys)
        multi_node = len({k[0] for k in keys}) > 1

        for wait in run.waits:
            if wait.end <= wait.start:
                continue
            top.broken_barh(
                [(wait.start - t0, wait.end - wait.start)],
                (row_of[wait.worker] - 0.3, 0.6),
                facecolors=WAIT_COLOUR,
                edgecolors=WAIT_EDGE,
                hatch="////",
                linewidth=0.3,
            )
        shared = shared_intervals(run)
        any_shared = any(shared.values())
        for holding in run.holdings:
            n = max(1, len(holding.gpus))
            for i, g in enumerate(holding.gpus or (0,)):
                y = row_of[holding.worker] - 0.4 + 0.8 * i / n
                top.broken_barh(
                    [(holding.start - t0, max(holding.end - holding.start, span * 0.001))],
                    (y, 0.8 / n),
                    facecolors=colours.get((holding.node, g), "#333333"),
                    edgecolors="black",
                    linewidth=0.4,
                )
                # The part of the holding during which the GPU had other holders too.
                together = [
                    (max(s, holding.start) - t0, min(e, holding.end) - max(s, holding.start))
                    for s, e in shared.get((holding.node, g), ())
                    if s < holding.end and e > holding.start
                ]
                if together:
                    top.broken_barh(
                        together,
                        (y, 0.8 / n),
                        facecolors="none",
                        edgecolors="white",
                        hatch=SHARED_HATCH,
                        linewidth=0,
                    )
        top.set_yticks(range(len(workers)))
        top.set_yticklabels(workers, fontsize=8 if len(workers) < 24 else 6)
        top.set_ylim(len(workers) - 0.5, -0.5)
        top.grid(axis="x", alpha=0.3)
        top.set_title(
            f"{run.name}: policy {run.policy or '?'}, {summary.gpus} GPU(s), "
            f"{summary.workers} worker(s) — GPU busy {100 * summary.busy_fraction:.1f}%",
            fontsize=10,
        )
        if col == 0:
            top.set_ylabel("worker")
        handles = [
            Patch(facecolor=colours[k], edgecolor="black", label=_gpu_name(k, multi_node))
            for k in keys
        ]
        if any_shared:
            handles.append(
                Patch(
                    facecolor="#777777",
                    edgecolor="white",
                    hatch=SHARED_HATCH,
                    label="GPU shared (2+ holders)",
                )
            )
        handles.append(
            Patch(facecolor=WAIT_COLOUR, edgecolor=WAIT_EDGE, hatch="////", label="waiting")
        )
        top.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.85)

        times, counts = utilisation_steps(run)
        rel = [t - t0 for t in times]
        bottom.fill_between(
            rel, counts, step="post", color="#4c72b0", alpha=0.55, linewidth=0, label="busy GPUs"
        )
        bottom.step(rel, counts, where="post", color="#2a4a80", linewidth=0.8)
        if any_shared:
            shared_times, shared_counts = sharing_steps(run)
            bottom.fill_between(
                [t - t0 for t in shared_times],
                shared_counts,
                step="post",
                facecolor=SHARED_COLOUR,
                edgecolor="white",
                hatch=SHARED_HATCH,
                alpha=0.8,
                linewidth=0,
                label="of them shared (2+ holders)",
            )
        gpus = max(1, summary.gpus)
        lease_times, leases = lease_steps(run)
        top_y = max(gpus, *leases)
        if max(leases) > max(counts):  # leases shared a GPU (gpu-sharing): show how many
            bottom.step(
                [t - t0 for t in lease_times],
                leases,
                where="post",
                color="#c44e52",
                linestyle="--",
                linewidth=0.9,
                label="leases held",
            )
            if col == 0:
                bottom.set_ylabel("GPUs busy / leases")
        if any_shared or max(leases) > max(counts):
            bottom.legend(loc="upper left", fontsize=7, framealpha=0.85)
        bottom.set_ylim(0, top_y * 1.08)
        bottom.set_yticks(range(top_y + 1) if top_y <= 8 else [0, top_y // 2, top_y])
        bottom.axhline(gpus, color="grey", linestyle=":", linewidth=0.8)
        bottom.set_xlim(0, span * 1.01)
        bottom.set_xlabel("seconds since the first request")
        if col == 0 and not bottom.get_ylabel():
            bottom.set_ylabel("GPUs busy")
        bottom.grid(alpha=0.3)
        bottom.text(
            0.995,
            0.93,
            f"busy {100 * summary.busy_fraction:.1f}% of {gpus} GPU x {summary.window_s:.0f}s"
            + (f", shared {100 * summary.shared_fraction:.1f}%" if any_shared else ""),
            transform=bottom.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
