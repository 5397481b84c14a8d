"""torchrun across both nodes of a real Slurm job, as a gang, next to ordinary gated workers on
the same GPUs: the DDP run trains exactly what plain torchrun trains, and no GPU ever has a gang
rank and a worker at once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.launcher.test_gang_run import assert_trains_like_plain_torchrun

from .jobs import Cluster, assert_exclusive_holdings, events, job_output, submit_job, wait_job
from .test_e2e import gate_job

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
DDP = REPO / "examples" / "torchrun" / "ddp_train.py"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.mark.slow
def test_a_torchrun_gang_shares_the_job_with_workers_and_trains_like_plain_torchrun(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    record = tmp_path / "records"
    job = gate_job("gang-ddp", record, nodes=2, slurm_gpus=2, virtual_gpus=2, sleep=1.0)
    job["workers"][0]["per_gpu"] = 2  # single-GPU workers on every GPU of both nodes
    job["workers"].append(
        {
            "name": "ddp",
            "torchrun": {"nodes": 2, "nproc_per_node": 2, "gpus_per_proc": 1, "repeat": 2},
            "command": [
                sys.executable,
                str(DDP),
                "--steps",
                "10",
                "--out",
                str(tmp_path / "gang.pt"),
            ],
        }
    )
    job_id, run_dir = submit_job(job, tmp_path)
    state = wait_job(job_id, timeout=300)
    output = job_output(tmp_path, "gang-ddp", job_id)
    assert state["JobState"] == "COMPLETED", output
    # Both runs of the group, each over both nodes, 2 ranks per node, on the gang's GPUs.
    for run in ("r0", "r1"):
        assert f"ddp-{run}" in output, output
    assert output.count("rank 0/4 on n1") == 2 and output.count("rank 3/4 on n2") == 2, output
    logs = {node: events(run_dir, node) for node in ("n1", "n2")}
    for log in logs.values():
        assert_exclusive_holdings(log)  # a gang part and a worker never share a GPU
        parts = [e for e in log if e["event"] == "grant" and e["worker"].startswith("gang:")]
        assert len(parts) == 4, parts  # 2 GPUs x 2 runs
        workers = [e for e in log if e["event"] == "grant" and e["worker"].startswith("rec")]
        assert len(workers) == 4, workers  # 2 per GPU, both GPUs
    ends = [e for e in logs["n1"] if e["event"] == "gang_end"]
    assert [e["failed"] for e in ends] == [False, False], ends

    assert_trains_like_plain_torchrun(tmp_path / "gang.pt", steps=10)


@pytest.mark.slow
def test_a_killed_rank_ends_its_run_on_both_nodes_and_the_job_goes_on(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    """Rank 3 (on n2) is SIGKILLed early in run r0: r0 ends on both nodes at once (n2's member
    says how the rank died, n1's is stopped with 70), its GPUs go back, and run r1 and the
    workers still run."""
    record = tmp_path / "records"
    job = gate_job("gang-crash", record, nodes=2, slurm_gpus=2, virtual_gpus=2, sleep=0.5)
    crash = (
        f'if [ "$RANK" = 3 ] && [ ! -e {tmp_path}/crashed ]; then touch {tmp_path}/crashed; '
        f"sleep 1; kill -KILL $BASHPID; fi; "
        f"exec {sys.executable} {DDP} --steps 5 --out {tmp_path}/p.pt"
    )
    job["workers"].append(
        {
            "name": "ddp",
            "torchrun": {"nodes": 2, "nproc_per_node": 2, "gpus_per_proc": 1, "repeat": 2},
            "command": ["bash", "-c", crash],
        }
    )
    job_id, run_dir = submit_job(job, tmp_path)
    state = wait_job(job_id, timeout=300)
    output = job_output(tmp_path, "gang-crash", job_id)
    assert state["JobState"] == "FAILED", (state, output)  # one run failed: the job says so
    assert "worker ddp-r0 FAILED with exit code 137" in output, output
    assert "worker ddp-r1 finished" in output, output
    assert "was killed by SIGKILL: gang ddp-r0 ended on every node" in output, output
    assert "gang ddp-r0 ended while the command ran on node n1" in output, output
    assert output.count(" finished") == 17 and "1 of 18 worker(s) failed: ddp-r0=137" in output
    ends = [e for e in events(run_dir, "n1") if e["event"] == "gang_end"]
    assert [(e["gang"], e["failed"]) for e in ends] == [("ddp-r0", True), ("ddp-r1", False)]
    for node in ("n1", "n2"):
        log = events(run_dir, node)
        assert_exclusive_holdings(log)
        end = next(e["ts"] for e in ends if e["failed"])
        released = [
            e["ts"] for e in log if e["event"] == "release" and e.get("reason") == "gang-failed"
        ]
        assert len(released) == 2 and max(released) - end < 0.5, (node, released, end)
