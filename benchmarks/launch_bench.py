"""Per-node launcher vs one srun step per worker, on the local two-node Slurm dev cluster.

    scripts/slurm-dev-cluster up --nodes 2 --gpus-per-node 2      # as root
    .venv/bin/python benchmarks/launch_bench.py --workers 64 128 256 512 --baseline-max 256

Each run is a real job of N gated workers (N/2 per node, 2 virtual GPUs per node, policy
simple, command `true`), started either

- `launcher`: as acb-sbatch renders it, one `acb-launch` step per node (one srun over both
  nodes) that starts the node's workers, each with its own session in the one process; or
- `per-step`: the baseline, a batch script with the same prologue and one
  `acb_worker NAME --node NODE --gate -- true &` per worker: one srun step, one slurmstepd
  and one `acb-run` Python per worker.

Measured per job: the time from the job's start (its run dir's first assigner `start` event,
and Slurm's StartTime, a whole second) to the last worker's `session` (registered) event in the
nodes' event logs; the job's wall time; the steps Slurm created (highest step id + 1, sampled
with `squeue -s`; the two assigner steps included) and the most at once; the machine's memory
in use at the peak above what it was before the job (MemAvailable, sampled every 0.2 s; the
machine is shared, so a few hundred MB are noise). A baseline whose memory would leave less
than --min-free-gib is cancelled and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

BIN = Path(sys.executable).parent
NODES = ("n1", "n2")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def job_record(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    return dict(part.split("=", 1) for part in out.split() if "=" in part)


@dataclass
class Sampler:
    """Steps (squeue -s) and memory of the machine while a job runs."""

    job_id: str
    min_free: int
    baseline_mem: int = field(default_factory=mem_available)
    max_step_id: int = -1
    most_steps: int = 0
    peak_used: int = 0
    cancelled_for_memory: bool = False

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            available = mem_available()
            self.peak_used = max(self.peak_used, self.baseline_mem - available)
            if available < self.min_free and not self.cancelled_for_memory:
                self.cancelled_for_memory = True
                subprocess.run(["scancel", self.job_id], check=False)
            out = subprocess.run(
                ["squeue", "-h", "-s", "-j", self.job_id, "-o", "%i"],
                capture_output=True,
                text=True,
            ).stdout.split()
            ids = [int(s.rsplit(".", 1)[1]) for s in out if s.rsplit(".", 1)[1].isdigit()]
            self.most_steps = max(self.most_steps, len(ids))
            if ids:
                self.max_step_id = max(self.max_step_id, *ids)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def launcher_job(workdir: Path, per_node: int) -> str:
    job = {
        "allocation": {
            "name": "acb-launch-bench",
            "partition": "acb",
            "nodes": 2,
            "gpus_per_node": 2,
            "time": "30:00",
            "output": "bench-%j.out",
        },
        "broker": {"policy": "simple", "virtual_gpus": 2, "startup_timeout": 60},
        "workers": [{"name": "w", "command": ["true"], "per_node": per_node}],
    }
    (workdir / "job.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
    out = subprocess.run(
        [str(BIN / "acb-sbatch"), "submit", "job.yaml"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split("submitted job ", 1)[1].split()[0]


def per_step_job(workdir: Path, per_node: int) -> str:
    script = workdir / "per-step.sh"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/bash
            #SBATCH --job-name=acb-launch-bench-baseline
            #SBATCH --partition=acb
            #SBATCH --nodes=2
            #SBATCH --gres=gpu:2
            #SBATCH --time=30:00
            #SBATCH --output=bench-%j.out
            set -uo pipefail
            eval "$({BIN}/acb-sbatch prologue --virtual-gpus 2 --startup-timeout 60)"
            pids=()
            for node in "${{ACB_NODES[@]}}"; do
                for ((i = 0; i < {per_node}; i++)); do
                    acb_worker "w-$node-$i" --node "$node" --gate -- true &
                    pids+=("$!")
                done
            done
            failed=0
            for pid in "${{pids[@]}}"; do wait "$pid" || failed=$((failed + 1)); done
            if ((failed)); then echo "acb: $failed worker(s) failed" >&2; exit 1; fi
            echo "acb: all ${{#pids[@]}} worker(s) finished" >&2
            """
        ),
        encoding="utf-8",
    )
    out = subprocess.run(
        ["sbatch", "--parsable", str(script)], cwd=workdir, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    return out.strip().split(";")[0]


def events(run_dir: Path, node: str) -> list[dict[str, Any]]:
    path = run_dir / node / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(variant: str, total: int, min_free: int) -> dict[str, Any]:
    per_node = total // len(NODES)
    with tempfile.TemporaryDirectory(prefix=f"acb-launch-bench-{variant}-") as tmp:
        workdir = Path(tmp)
        job_id = (launcher_job if variant == "launcher" else per_step_job)(workdir, per_node)
        sampler = Sampler(job_id, min_free)
        deadline = time.monotonic() + 1800
        while True:
            record = job_record(job_id)
            if record.get("JobState") in FINAL:
                break
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], check=False)
            time.sleep(0.5)
        sampler.stop()
        run_dir = workdir / "acb-runs" / job_id
        log = [e for node in NODES for e in events(run_dir, node)]
        starts = [e["ts"] for e in log if e["event"] == "start"]
        sessions = sorted(e["ts"] for e in log if e["event"] == "session")
        grants = [e for e in log if e["event"] == "grant"]
        output = (workdir / f"bench-{job_id}.out").read_text(errors="replace")
        slurm_start = datetime.fromisoformat(record["StartTime"]).timestamp()
        slurm_end = datetime.fromisoformat(record["EndTime"]).timestamp()
        return {
            "variant": variant,
            "workers": total,
            "job": job_id,
            "state": record["JobState"],
            "all_finished": f"all {total} worker(s) finished" in output,
            "cancelled_for_memory": sampler.cancelled_for_memory,
            "sessions": len(sessions),
            "grants": len(grants),
            "registered_after_assigners_s": (sessions[-1] - min(starts))
            if sessions and starts
            else None,
            "registered_after_job_start_s": (sessions[-1] - slurm_start) if sessions else None,
            "job_wall_s": slurm_end - slurm_start,
            "steps_created": sampler.max_step_id + 1,
            "most_steps_at_once": sampler.most_steps,
            "peak_memory_gib": sampler.peak_used / 2**30,
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[256, 512], help="workers per job")
    p.add_argument(
        "--baseline-max", type=int, default=256, help="largest job run with one step per worker"
    )
    p.add_argument(
        "--min-free-gib",
        type=float,
        default=4.0,
        help="cancel a job when the machine's available memory falls below this",
    )
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    rows = []
    for total in args.workers:
        variants = ["launcher"] + (["per-step"] if total <= args.baseline_max else [])
        for variant in variants:
            row = run_one(variant, total, int(args.min_free_gib * 2**30))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(
        "| workers | variant | state | registered after assigners start | after job start "
        "| job wall | steps created (most at once) | peak memory |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        reg = r["registered_after_assigners_s"]
        reg_job = r["registered_after_job_start_s"]
        state = r["state"] + (" (cancelled: memory)" if r["cancelled_for_memory"] else "")
        print(
            f"| {r['workers']} | {r['variant']} | {state}, {r['sessions']} sessions "
            f"| {'-' if reg is None else f'{reg:.1f} s'} "
            f"| {'-' if reg_job is None else f'{reg_job:.0f} s'} | {r['job_wall_s']:.0f} s "
            f"| {r['steps_created']} ({r['most_steps_at_once']}) "
            f"| {r['peak_memory_gib']:.2f} GiB |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root: the dev cluster's jobs run as root")
    main()
