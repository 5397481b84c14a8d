"""Campaigns on the real local Slurm (scripts/slurm-dev-cluster): four workers on one GPU, a
worker killed mid-item, and a job array of two tasks sharing one results directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from acb_slurm.campaign.store import ResultsStore

from .conftest import runs, stage_command, write_campaign, write_fasta

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "scripts" / "slurm-dev-cluster"
BIN = Path(sys.executable).parent
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """The dev cluster, started (2 nodes x 2 GPUs, the shape other suites use) if not up."""
    if os.geteuid() != 0:
        pytest.skip("real-Slurm tests need root: scripts/slurm-dev-cluster starts slurmd")
    was_up = subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode == 0
    if not was_up:
        up = subprocess.run(
            [str(CLUSTER), "up", "--nodes", "2", "--gpus-per-node", "2"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        again = subprocess.run([str(CLUSTER), "status"], capture_output=True)
        if up.returncode != 0 and again.returncode != 0:
            pytest.fail(f"scripts/slurm-dev-cluster up failed:\n{up.stdout}\n{up.stderr}")
    yield
    if not was_up:
        subprocess.run([str(CLUSTER), "down"], capture_output=True, timeout=120)


def job_yaml(workdir: Path, campaign: Path, name: str, per_gpu: int = 4, **allocation: Any) -> Path:
    job = {
        "allocation": {
            "name": name,
            "partition": "acb",
            "nodes": 1,
            "gpus_per_node": 1,
            "time": "10:00",
            "output": f"{name}-%j.out",
            **allocation,
        },
        "broker": {"policy": "simple", "virtual_gpus": 1, "gpu_memory": "80GiB"},
        "campaign": str(campaign),
        "workers": [
            {
                "name": "fold",
                "mode": "client",
                "command": [str(BIN / "acb-campaign"), "worker"],
                "per_gpu": per_gpu,
            }
        ],
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


SUBMITTED: list[str] = []


@pytest.fixture(autouse=True)
def cancel_leftover_jobs() -> Iterator[None]:
    """A test that fails while its job runs must not leave the job behind."""
    yield
    while SUBMITTED:
        subprocess.run(["scancel", SUBMITTED.pop()], capture_output=True, check=False)


def submit(job: Path, workdir: Path) -> str:
    out = subprocess.run(
        [str(BIN / "acb-sbatch"), "submit", str(job)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.split("submitted job ", 1)[1].split()[0]
    SUBMITTED.append(job_id)
    return job_id


def job_states(job_id: str) -> dict[str, str]:
    """State of every job (array task) of `job_id`, by its own job id."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    states = {}
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        states[fields["JobId"]] = fields["JobState"]
    return states


def wait_job(job_id: str, workdir: Path, timeout: float = 420.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        states = job_states(job_id)
        if states and all(s in FINAL for s in states.values()):
            return states
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], check=False)
            outputs = "\n".join(p.read_text() for p in workdir.glob("*.out"))
            raise AssertionError(f"job {job_id} not finished after {timeout}s: {states}\n{outputs}")
        time.sleep(0.5)


def event_logs(workdir: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for path in sorted(workdir.glob("acb-runs/*/*/events.jsonl")):
        events.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    return events


def outputs(workdir: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()}" for p in sorted(workdir.glob("*.out")))


def gpu_stages(sleep: str) -> list[dict[str, Any]]:
    return [
        {"name": "msa", "command": stage_command("msa", "--sleep", "0.3")},
        {
            "name": "predict",
            "device": "gpu",
            "memory": "60GiB",
            "command": stage_command("predict", "--sleep", sleep),
        },
    ]


def test_four_workers_share_one_gpu_and_finish_every_item_exactly_once(
    cluster: None, tmp_path: Path
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 24)
    campaign = write_campaign(tmp_path, gpu_stages("0.2"), progress_interval=5)
    job_id = submit(job_yaml(tmp_path, campaign, "camp"), tmp_path)
    states = wait_job(job_id, tmp_path)
    assert set(states.values()) == {"COMPLETED"}, outputs(tmp_path)

    store = ResultsStore(tmp_path / "results")
    done = store.done_records()
    assert sorted(done) == ids, outputs(tmp_path)
    counts = Counter((r["item"], r["stage"]) for r in runs(tmp_path / "results"))
    assert counts == Counter({(i, s): 1 for i in ids for s in ("msa", "predict")})
    assert len({d["worker"] for d in done.values()}) == 4
    # The assigner's event log agrees: one lease per item, never two holders of the GPU.
    events = event_logs(tmp_path)
    labels = Counter(e["label"] for e in events if e["event"] == "request")
    assert labels == Counter({f"{i}/predict": 1 for i in ids})
    holder: str | None = None
    for e in events:
        if e["event"] == "grant":
            assert holder is None, f"{e['lease']} granted while {holder} holds the GPU"
            holder = e["lease"]
        elif e["event"] == "release":
            assert holder == e["lease"]
            holder = None
    assert "af2" not in outputs(tmp_path)  # nothing of the examples leaks in
    # One worker of the job writes the periodic progress line; the last says all are done.
    assert "campaign: 24/24 done, 0 failed, 0 running, 0 pending" in outputs(tmp_path)


def test_a_worker_killed_mid_item_then_a_rerun_finishes_the_rest_without_redoing(
    cluster: None, tmp_path: Path
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 20)
    campaign = write_campaign(tmp_path, gpu_stages("0.6"))
    job_id = submit(job_yaml(tmp_path, campaign, "kill", per_gpu=1), tmp_path)
    store = ResultsStore(tmp_path / "results")

    # Once some items are done, SIGKILL the job's only worker in its GPU stage (its claim names
    # its pid): the job ends with the campaign unfinished.
    deadline = time.monotonic() + 300  # the job may queue behind other suites' jobs
    victim: dict[str, Any] | None = None
    while victim is None:
        assert time.monotonic() < deadline, outputs(tmp_path)
        if len(store.done_records()) >= 3:
            for claim in (tmp_path / "results" / "claims").glob("*.claim"):
                state = store.read_state(claim.stem) or {}
                data = json.loads(claim.read_text() or "{}")
                live = data.get("state") == "running"  # not a finished item's tombstone
                if live and state.get("stage") == "predict" and data.get("pid"):
                    victim = data
                    break
        time.sleep(0.05)
    os.kill(victim["pid"], signal.SIGKILL)
    assert set(wait_job(job_id, tmp_path).values()) == {"FAILED"}, outputs(tmp_path)
    before = store.done_records()
    assert 3 <= len(before) < len(ids) and victim["item"] not in before
    # The lease died with the worker: the assigner released it on disconnect.
    releases = [e for e in event_logs(tmp_path) if e["event"] == "release"]
    assert releases[-1]["reason"] == "disconnect"

    # The rerun takes the dead worker's claim over and finishes the rest, redoing nothing.
    rerun = submit(job_yaml(tmp_path, campaign, "rerun"), tmp_path)
    assert set(wait_job(rerun, tmp_path).values()) == {"COMPLETED"}, outputs(tmp_path)
    done = store.done_records()
    assert sorted(done) == ids
    assert all(done[i] == before[i] for i in before)
    assert [a["outcome"] for a in store.attempts(victim["item"])] == ["crashed", "done"]
    assert f"took over {victim['item']} from {victim['worker']}" in outputs(tmp_path)
    # Every stage of every item recorded exactly one run: the killed stage died with its worker
    # (it records only when it finishes) and ran once more after the takeover; the msa stage of
    # the killed item had finished and was not run again.
    counts = Counter((r["item"], r["stage"]) for r in runs(tmp_path / "results"))
    assert counts == Counter({(i, s): 1 for i in ids for s in ("msa", "predict")})


def test_a_job_array_of_two_tasks_splits_the_items_without_overlap(
    cluster: None, tmp_path: Path
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 20)
    campaign = write_campaign(tmp_path, gpu_stages("0.2"))
    job = job_yaml(tmp_path, campaign, "array", extra=["--array=0-1"])
    job_id = submit(job, tmp_path)
    states = wait_job(job_id, tmp_path)
    assert len(states) == 2 and set(states.values()) == {"COMPLETED"}, outputs(tmp_path)

    done = ResultsStore(tmp_path / "results").done_records()
    assert sorted(done) == ids
    counts = Counter((r["item"], r["stage"]) for r in runs(tmp_path / "results"))
    assert counts == Counter({(i, s): 1 for i in ids for s in ("msa", "predict")})
    by_task = Counter(d["array_task"] for d in done.values())
    assert set(by_task) == {"0/2", "1/2"}, by_task
    # Each task's assigner logged only its own items, and no item was leased twice.
    logs = sorted(tmp_path.glob("acb-runs/*/*/events.jsonl"))
    assert len(logs) == 2
    labels = Counter(e["label"] for e in event_logs(tmp_path) if e["event"] == "request")
    assert labels == Counter({f"{i}/predict": 1 for i in ids})
