"""Helpers of the real-Slurm tests: submit job.yaml files, wait for jobs, read event logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from acb_slurm.slurm.commands import parse_scontrol_record

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "scripts" / "slurm-dev-cluster"
BIN = Path(sys.executable).parent
ACB_SBATCH = str(BIN / "acb-sbatch")
RECORD_WORKER = str(Path(__file__).resolve().parent / "workers" / "record.py")
NODES = 2
GPUS_PER_NODE = 2
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    partition: str = "acb"


def acb_sbatch(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real acb-sbatch console script."""
    result = subprocess.run(
        [ACB_SBATCH, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    if check and result.returncode != 0:
        raise AssertionError(f"acb-sbatch {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def submit_job(job: dict[str, Any], workdir: Path) -> tuple[str, Path]:
    """Submit a job.yaml made from `job`; return (job id, run dir)."""
    spec = write_job(workdir / "job.yaml", job)
    out = acb_sbatch("submit", str(spec), cwd=workdir).stdout
    job_id = out.split("submitted job ", 1)[1].split()[0]
    run_dir = out.split("run dir: ", 1)[1].split("\n", 1)[0]
    return job_id, Path(run_dir)


def job_record(job_id: str) -> dict[str, str]:
    result = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    )
    return parse_scontrol_record(result.stdout)


def wait_job(job_id: str, timeout: float = 90.0) -> dict[str, str]:
    """Poll `scontrol show job` (no accounting here, so no sacct) until the job has ended."""
    deadline = time.monotonic() + timeout
    while True:
        record = job_record(job_id)
        if record.get("JobState") in FINAL_STATES:
            return record
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], check=False)
            raise AssertionError(f"job {job_id} still {record.get('JobState')} after {timeout}s")
        time.sleep(0.25)


def jobs_named(name: str) -> list[str]:
    """Ids of every job slurmctld knows under this name (finished ones stay for MinJobAge)."""
    result = subprocess.run(
        ["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.split()


def events(run_dir: Path, node: str) -> list[dict[str, Any]]:
    path = run_dir / node / "events.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def job_output(workdir: Path, name: str, job_id: str) -> str:
    path = workdir / f"{name}-{job_id}.out"
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else "(no output)"


def assert_exclusive_holdings(log: list[dict[str, Any]]) -> None:
    """On every GPU, grants and releases alternate: never two holders at once."""
    holder: dict[int, str] = {}
    for event in log:
        if event["event"] == "grant":
            for gpu in event["gpus"]:
                assert gpu not in holder, (
                    f"gpu {gpu} granted to {event['lease']} while held by {holder[gpu]}"
                )
                holder[gpu] = event["lease"]
        elif event["event"] == "release":
            for gpu in event["gpus"]:
                assert holder.get(gpu) == event["lease"], event
                del holder[gpu]
