"""End to end against the real local Slurm: real sbatch/srun, real assigners, real acb-run.

Job state comes from `scontrol show job` while the job is recent (the dev cluster has no
accounting, so no sacct); the job's output file and each node's event log give the details.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .jobs import (
    ACB_SBATCH,
    BIN,
    CLUSTER,
    RECORD_WORKER,
    REPO,
    Cluster,
    acb_sbatch,
    assert_exclusive_holdings,
    events,
    job_output,
    jobs_named,
    records,
    submit_job,
    wait_job,
    write_job,
)
from .test_render import CASES, HOSTILE_VALUES

pytestmark = pytest.mark.slurm


def gate_job(
    name: str,
    record_dir: Path,
    *,
    nodes: int = 1,
    slurm_gpus: int = 1,
    virtual_gpus: int = 1,
    workers: list[dict[str, Any]] | None = None,
    sleep: float = 0.3,
) -> dict[str, Any]:
    """A job whose workers (tests/slurm/workers/record.py) record what they saw."""
    record_dir.mkdir(exist_ok=True)
    return {
        "allocation": {
            "name": name,
            "partition": "acb",
            "nodes": nodes,
            "gpus_per_node": slurm_gpus,
            "time": "5:00",
            "output": f"{name}-%j.out",
        },
        "broker": {
            "policy": "simple",
            "virtual_gpus": virtual_gpus,
            "gpu_memory": "8GiB",
            "worker_memory": "1GiB",
            "startup_timeout": 30,
        },
        "workers": workers
        or [
            {
                "name": "rec",
                "command": [sys.executable, RECORD_WORKER],
                "per_gpu": 4,
                "env": {"ACB_TEST_RECORD": str(record_dir), "ACB_TEST_SLEEP": str(sleep)},
            }
        ],
    }


def test_sbatch_test_only_accepts_every_rendered_script(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    for name, render in sorted(CASES.items()):
        text = render()
        if name.startswith("prologue"):
            text = "#!/bin/bash\n" + text
        # The examples name their own partitions and sizes; the dev cluster has partition acb.
        result = subprocess.run(
            [
                "sbatch",
                "--test-only",
                "--partition=acb",
                "--mem=1000",
                "--cpus-per-task=1",
                "--account=",
                f"--output={tmp_path}/%j.out",
            ],
            input=text,
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert result.returncode == 0 and "to start at" in result.stderr, (name, result.stderr)
    result = acb_sbatch(
        "submit", "--test-only", str(REPO / "examples/slurm/gate-virtual.yaml"), cwd=tmp_path
    )
    assert "nothing was submitted" in result.stdout


def test_one_gpu_four_gated_workers_take_turns(slurm_cluster: Cluster, tmp_path: Path) -> None:
    # Slurm gives each worker step 2 (fake) GPUs, CUDA_VISIBLE_DEVICES=0,1; the broker hands
    # out one (virtual) GPU, so a worker that sees "0" saw what acb-run set from its grant.
    job = gate_job("acb-gate", tmp_path / "rec", slurm_gpus=2, virtual_gpus=1)
    # Sites that default to --export=NONE: every srun step of the script still gets ACB_*.
    job["allocation"]["extra"] = ["--export=NONE"]
    job_id, run_dir = submit_job(job, tmp_path)
    record = wait_job(job_id)
    output = job_output(tmp_path, "acb-gate", job_id)
    assert record["JobState"] == "COMPLETED", output
    assert "all 4 worker(s) finished" in output

    log = events(run_dir, "n1")
    grants = [e for e in log if e["event"] == "grant"]
    assert len(grants) == 4
    assert_exclusive_holdings(log)
    assert log[-1]["event"] == "stop"  # the assigner was stopped cleanly at the end
    seen = records(tmp_path / "rec")
    assert len(seen) == 4
    granted = {g["worker"]: g["device_ids"] for g in grants}
    for worker in seen:
        assert granted[worker["worker"]] == ["0"]
        assert worker["cuda_visible_devices"] == "0"
        sockets = worker["acb"]["ACB_SOCKET_DIR"]
        assert sockets in (str(run_dir), f"/tmp/acb-0-{job_id}")  # long run dirs: /tmp
        assert worker["assigner"] == f"unix:{sockets}/n1/assigner.sock"
        assert worker["acb"]["ACB_JOB_ID"] == job_id
        assert worker["acb"]["ACB_RUN_DIR"] == str(run_dir)
    assert sorted(w["worker"] for w in seen) == [f"rec-n1-{i}" for i in range(4)]
    # The run dir is private, the token and the config are 0600.
    assert run_dir.stat().st_mode & 0o777 == 0o700
    assert (run_dir / "token").stat().st_mode & 0o777 == 0o600
    assert (run_dir / "assigners.json").stat().st_mode & 0o777 == 0o600
    assert (run_dir / "job.sh").exists()


def test_two_nodes_each_served_by_its_own_assigner(slurm_cluster: Cluster, tmp_path: Path) -> None:
    job = gate_job("acb-two", tmp_path / "rec", nodes=2, slurm_gpus=2, virtual_gpus=1)
    job["workers"][0]["per_gpu"] = 2
    job_id, run_dir = submit_job(job, tmp_path)
    record = wait_job(job_id)
    output = job_output(tmp_path, "acb-two", job_id)
    assert record["JobState"] == "COMPLETED", output

    import json

    config = json.loads((run_dir / "assigners.json").read_text())
    assert [n["name"] for n in config["nodes"]] == ["n1", "n2"]
    assert [n["role"] for n in config["nodes"]] == ["controller", "executor"]
    assert len({n["port"] for n in config["nodes"]}) == 2  # one address, distinct ports
    assert config["controller"] == config["nodes"][0]["tcp"]
    for node in ("n1", "n2"):
        log = events(run_dir, node)
        assert {e["node"] for e in log} == {node}
        served = sorted(e["worker"] for e in log if e["event"] == "grant")
        assert served == [f"rec-{node}-0", f"rec-{node}-1"], log
        assert_exclusive_holdings(log)
    for worker in records(tmp_path / "rec"):
        assert worker["worker"].split("-")[1] == worker["node"]
        assert worker["cuda_visible_devices"] == "0"  # the grant's, not Slurm's "0,1"
        sockets = worker["acb"]["ACB_SOCKET_DIR"]
        assert worker["assigner"] == f"unix:{sockets}/{worker['node']}/assigner.sock"


def test_existing_batch_script_with_eval_prologue(slurm_cluster: Cluster, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    script = tmp_path / "existing.sh"
    script.write_text(
        f"""#!/bin/bash
#SBATCH --job-name=acb-existing
#SBATCH --partition=acb
#SBATCH --nodes=1
#SBATCH --output={tmp_path}/existing-%j.out
set -euo pipefail
eval "$({ACB_SBATCH} prologue --virtual-gpus 1 --gpu-memory 8GiB --startup-timeout 30)"
export ACB_TEST_RECORD={rec}
pids=()
for i in 0 1 2; do
    ACB_WORKER="mine-$i" srun --overlap --nodes=1 --ntasks=1 "$ACB_RUN_DIR/node-env" \\
        {BIN}/acb-run --gate -- {sys.executable} {RECORD_WORKER} &
    pids+=("$!")
done
for pid in "${{pids[@]}}"; do wait "$pid"; done
echo "existing script done"
""",
        encoding="utf-8",
    )
    result = subprocess.run(
        ["sbatch", "--parsable", str(script)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    record = wait_job(job_id)
    output = (tmp_path / f"existing-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED", output
    assert "existing script done" in output
    log = events(tmp_path / "acb-runs" / job_id, "n1")
    assert sorted(e["worker"] for e in log if e["event"] == "grant") == [
        "mine-0",
        "mine-1",
        "mine-2",
    ]
    assert_exclusive_holdings(log)
    assert len(records(rec)) == 3


def test_a_crashing_worker_does_not_stop_the_others(slurm_cluster: Cluster, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    job = gate_job("acb-crash", rec)
    job["workers"] = [
        {
            "name": "good",
            "command": [sys.executable, RECORD_WORKER],
            "per_node": 3,
            "env": {"ACB_TEST_RECORD": str(rec)},
        },
        {
            "name": "bad",
            "command": [sys.executable, RECORD_WORKER],
            "per_node": 1,
            "env": {"ACB_TEST_RECORD": str(rec), "ACB_TEST_EXIT": "3"},
        },
    ]
    job_id, run_dir = submit_job(job, tmp_path)
    record = wait_job(job_id)
    output = job_output(tmp_path, "acb-crash", job_id)
    assert record["JobState"] == "FAILED", output
    assert record["ExitCode"] == "1:0"
    assert "worker bad-n1-0 FAILED with exit code 3" in output
    assert "1 of 4 worker(s) failed: bad-n1-0=3" in output
    assert sorted(r["worker"] for r in records(rec)) == [
        "bad-n1-0", "good-n1-0", "good-n1-1", "good-n1-2",
    ]  # fmt: skip
    assert events(run_dir, "n1")[-1]["event"] == "stop"


def test_hostile_input_runs_as_literal_text(slurm_cluster: Cluster, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    canary = tmp_path / "pwned"
    args = [v.replace("/tmp/acb-pwned", str(canary)) for v in HOSTILE_VALUES]
    hostile_env = f"$(touch {canary}) `touch {canary}` 'x' \"y\" ; touch {canary}\nnext"
    job = gate_job("acb-hostile", rec)
    # A long run dir with quotes and $(): the sockets then go to /tmp (108-byte socket paths).
    run_root = tmp_path / f"runs 'q' $(touch {canary}) `touch {canary}` ; x"
    job["broker"]["run_root"] = str(run_root)
    job["workers"] = [
        {
            "name": f"w'$(touch {canary})`touch {canary}`; x",
            "command": [sys.executable, RECORD_WORKER, *args],
            "per_node": 1,
            "workdir": str(tmp_path),
            "env": {"ACB_TEST_RECORD": str(rec), "HOSTILE": hostile_env},
        },
        {
            "name": "shell",
            "mode": "client",
            "command": f"printf '%s' \"$ACB_WORKER\" > {tmp_path}/shell-name.txt",
        },
    ]
    job_id, run_dir = submit_job(job, tmp_path)
    assert run_dir == run_root / job_id
    record = wait_job(job_id)
    output = job_output(tmp_path, "acb-hostile", job_id)
    assert record["JobState"] == "COMPLETED", output
    assert len([e for e in events(run_dir, "n1") if e["event"] == "grant"]) == 1
    (seen,) = records(rec)
    assert seen["assigner"] == f"unix:/tmp/acb-0-{job_id}/n1/assigner.sock"
    assert seen["argv"] == args
    assert seen["hostile"] == hostile_env
    assert seen["worker"] == f"w'$(touch {canary})`touch {canary}`; x-n1-0"
    assert (tmp_path / "shell-name.txt").read_text() == "shell-n1-0"
    assert not canary.exists(), "a hostile value was executed"


def test_an_assigner_that_cannot_start_fails_the_job_clearly(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("acb-sbatch", "acb-run"):
        (bin_dir / tool).symlink_to(BIN / tool)
    broken = bin_dir / "acb-assigner"
    # It still makes the job's TLS material (`tls-init`), then fails to start.
    broken.write_text(
        f'#!/bin/bash\nif [[ $1 == tls-init ]]; then exec {BIN}/acb-assigner "$@"; fi\n'
        "echo 'acb-assigner: cannot open the GPU inventory' >&2\nexit 3\n"
    )
    broken.chmod(0o755)
    job = gate_job("acb-broken", tmp_path / "rec")
    spec = write_job(tmp_path / "job.yaml", job)
    out = acb_sbatch("submit", "--bin-dir", str(bin_dir), str(spec), cwd=tmp_path).stdout
    job_id = out.split("submitted job ", 1)[1].split()[0]
    record = wait_job(job_id)
    output = job_output(tmp_path, "acb-broken", job_id)
    assert record["JobState"] == "FAILED", output
    assert "n1: its srun step exited" in output
    assert "acb-assigner: cannot open the GPU inventory" in output
    assert "the controller assigner on n1 did not start" in output
    assert records(tmp_path / "rec") == []  # no worker ran


def test_dev_cluster_up_is_idempotent(slurm_cluster: Cluster) -> None:
    again = subprocess.run(
        [str(CLUSTER), "up", "--nodes", str(slurm_cluster.nodes), "--gpus-per-node",
         str(slurm_cluster.gpus_per_node)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "already up: 2 node(s) x 2 GPU(s)" in again.stdout
    status = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True)
    assert status.returncode == 0
    assert "slurmd n2 running" in status.stdout
    assert "gpu:2" in status.stdout


def test_invalid_job_yaml_submits_nothing(slurm_cluster: Cluster, tmp_path: Path) -> None:
    name = f"acb-invalid-{os.getpid()}-{time.time_ns()}"
    job = gate_job(name, tmp_path / "rec")
    job["allocation"]["time"] = "1:2:3:4"
    spec = write_job(tmp_path / "job.yaml", job)
    result = acb_sbatch("submit", str(spec), cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert f"{spec}:6: allocation.time: '1:2:3:4' is not a time" in result.stderr
    assert "Traceback" not in result.stderr
    assert jobs_named(name) == []
    assert not (tmp_path / "acb-runs").exists()
    # The same job, made valid, is submitted under that name: the check above can see it.
    job["allocation"]["time"] = "1:00"
    job["workers"][0]["env"]["ACB_TEST_SLEEP"] = "0"
    job_id, _ = submit_job(job, tmp_path)
    assert jobs_named(name) == [job_id]
    wait_job(job_id)


def test_status_while_running_then_cancel(slurm_cluster: Cluster, tmp_path: Path) -> None:
    job = gate_job("acb-status", tmp_path / "rec", sleep=30)
    job["workers"][0]["per_gpu"] = 2
    job_id, run_dir = submit_job(job, tmp_path)
    deadline = time.monotonic() + 60
    while True:
        log = events(run_dir, "n1") if (run_dir / "n1" / "events.jsonl").exists() else []
        if (
            any(e["event"] == "request" for e in log[1:])
            and len([e for e in log if e["event"] == "request"]) == 2
        ):
            break
        assert time.monotonic() < deadline, job_output(tmp_path, "acb-status", job_id)
        time.sleep(0.25)
    result = acb_sbatch("status", job_id, cwd=tmp_path)
    assert "node n1 (standalone" in result.stdout or "node n1 (controller" in result.stdout
    assert "gpu 0 [0]" in result.stdout
    holder = next(e["worker"] for e in events(run_dir, "n1") if e["event"] == "grant")
    assert holder in result.stdout
    assert "waiting: rec-n1-" in result.stdout

    result = acb_sbatch("cancel", job_id, cwd=tmp_path)
    assert f"cancelled job {job_id}" in result.stdout
    record = wait_job(job_id)
    assert record["JobState"] == "CANCELLED"


def test_workers_get_the_allocations_cpus_and_logs_go_to_new_dirs(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    """Worker steps pass --cpus-per-task themselves (srun of Slurm 22.05-23.02 does not inherit
    it; this cluster's steps would get the job's CPUs anyway, so test_render checks the flag and
    this checks that Slurm takes it). The output file's directory does not exist before
    `submit`, which creates it."""
    seen = tmp_path / "seen"
    seen.mkdir()
    job = gate_job("acb-cpus", seen)
    job["allocation"]["cpus_per_task"] = 2
    job["allocation"]["output"] = "logs/new/%x-%j.out"
    job["workers"] = [
        {
            "name": "cpu",
            "mode": "client",
            "per_node": 2,
            "command": f'echo "$SLURM_CPUS_PER_TASK" > {seen}/"$ACB_WORKER"',
        }
    ]
    job_id, _ = submit_job(job, tmp_path)
    record = wait_job(job_id)
    output = (tmp_path / "logs" / "new" / f"acb-cpus-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED", output
    assert {p.name: p.read_text().strip() for p in seen.iterdir()} == {
        "cpu-n1-0": "2", "cpu-n1-1": "2",
    }  # fmt: skip
