"""The per-node launcher on the real local Slurm: one `acb-launch` step per node starts every
worker of its node; names, logs, exit statuses, signals, and the number of steps."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .jobs import (
    RECORD_WORKER,
    Cluster,
    assert_exclusive_holdings,
    events,
    job_output,
    records,
    submit_job,
    wait_job,
)
from .test_e2e import gate_job

pytestmark = pytest.mark.slurm

#: A worker that writes its name and pid, notes SIGUSR1 (and goes on) and SIGTERM (and exits 7
#: at once: Slurm signals every process of the step and the launcher forwards the signal too, so
#: a second SIGTERM may come while Python finalises, where the default action is back).
SIGNALLED = textwrap.dedent(
    """
    import json, os, signal, time
    out, name = os.environ["ACB_TEST_RECORD"], os.environ["ACB_WORKER"]
    def note(signum, frame):
        with open(os.path.join(out, name + ".signals"), "a") as fh:
            fh.write(signal.Signals(signum).name + "\\n")
        if signum == signal.SIGTERM:
            os._exit(7)
    signal.signal(signal.SIGUSR1, note)
    signal.signal(signal.SIGTERM, note)
    with open(os.path.join(out, name + ".json"), "w") as fh:
        json.dump({"worker": name, "pid": os.getpid()}, fh)
    time.sleep(120)
    """
)


class StepWatch:
    """Samples `squeue -s` of a job while it runs: the most steps seen at once, by name."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.most: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            result = subprocess.run(
                ["squeue", "-h", "-s", "-j", self.job_id, "-o", "%i %j"],
                capture_output=True,
                text=True,
            )
            steps = [
                line.split()[1]
                for line in result.stdout.splitlines()
                if len(line.split()) == 2 and not line.split()[0].endswith((".batch", ".extern"))
            ]
            if len(steps) > len(self.most):
                self.most = steps
            self._stop.wait(0.2)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        return sorted(self.most)


def test_several_workers_per_node_run_in_one_step_per_node(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    rec = tmp_path / "rec"
    job = gate_job("acb-launch", rec, nodes=2, slurm_gpus=2, virtual_gpus=2, sleep=2)
    job["workers"] = [
        {
            "name": "rec",
            "command": [sys.executable, RECORD_WORKER],
            "per_gpu": 2,
            "env": {"ACB_TEST_RECORD": str(rec), "ACB_TEST_SLEEP": "2"},
        },
        {
            "name": "bad",
            "command": [sys.executable, RECORD_WORKER],
            "env": {"ACB_TEST_RECORD": str(rec), "ACB_TEST_SLEEP": "0", "ACB_TEST_EXIT": "3"},
        },
        {"name": "say", "mode": "client", "command": 'echo "log line of $ACB_WORKER"'},
    ]
    job_id, run_dir = submit_job(job, tmp_path)
    watch = StepWatch(job_id)
    record = wait_job(job_id)
    steps = watch.stop()
    output = job_output(tmp_path, "acb-launch", job_id)
    assert record["JobState"] == "FAILED", output
    # One launcher step over both nodes, beside the two assigners' steps: not one per worker.
    assert steps == ["acb-assigner", "acb-assigner", "acb-launch"], steps
    for node in ("n1", "n2"):
        for i in range(4):
            assert f"acb: worker rec-{node}-{i} finished" in output
        assert f"acb: worker bad-{node}-0 FAILED with exit code 3" in output
        assert f"acb: worker say-{node}-0 finished" in output
        assert f"log line of say-{node}-0" in output  # a worker's output goes where it did
        log = events(run_dir, node)
        assert sorted(e["worker"] for e in log if e["event"] == "grant") == sorted(
            [*(f"rec-{node}-{i}" for i in range(4)), f"bad-{node}-0"]
        )
        assert len({e["pid"] for e in log if e["event"] == "session"}) == 1  # one launcher
        assert_exclusive_holdings(log)
        assert log[-1]["event"] == "stop"
        assert (run_dir / "launch" / f"{node}.codes").read_text().split() == [
            "0", "0", "0", "0", "3", "0",
        ]  # fmt: skip
    assert "2 of 12 worker(s) failed: bad-n1-0=3 bad-n2-0=3" in output
    seen = records(rec)
    assert sorted(r["worker"] for r in seen) == sorted(
        f"{g}-{n}-{i}" for n in ("n1", "n2") for g, k in (("rec", 4), ("bad", 1)) for i in range(k)
    )
    for worker in seen:
        assert worker["node"] == worker["worker"].split("-")[1]
        assert worker["cuda_visible_devices"] in ("0", "1")  # the grant's, not Slurm's "0,1"
        sockets = worker["acb"]["ACB_SOCKET_DIR"]
        assert worker["assigner"] == f"unix:{sockets}/{worker['node']}/assigner.sock"


def _launcher_pids(run_dir: Path) -> list[int]:
    result = subprocess.run(
        ["pgrep", "-f", f"acb-launch --plan {run_dir}/launch/workers.json"],
        capture_output=True,
        text=True,
    )
    pids = []
    for pid in result.stdout.split():  # the launchers, not srun (nor its helper) that has it too
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
        if Path(argv[0].decode()).name.startswith("python"):
            pids.append(int(pid))
    return pids


def _signals(rec: Path) -> dict[str, list[str]]:
    return {p.stem: p.read_text().split() for p in sorted(rec.glob("*.signals"))}


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _launch_step(job_id: str) -> str:
    result = subprocess.run(
        ["squeue", "-h", "-s", "-j", job_id, "-o", "%i %j"], capture_output=True, text=True
    )
    (step,) = [line.split()[0] for line in result.stdout.splitlines() if "acb-launch" in line]
    return step


def test_the_launchers_forward_signals_and_report_each_worker(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    rec = tmp_path / "rec"
    job = gate_job("acb-launch-sig", rec, nodes=2, slurm_gpus=2, virtual_gpus=2)
    job["workers"] = [
        {
            "name": "sig",
            "command": [sys.executable, "-c", SIGNALLED],
            "per_gpu": 1,
            "env": {"ACB_TEST_RECORD": str(rec)},
        },
        {
            "name": "cli",
            "mode": "client",
            "command": [sys.executable, "-c", SIGNALLED],
            "env": {"ACB_TEST_RECORD": str(rec)},
        },
    ]
    job_id, run_dir = submit_job(job, tmp_path)
    try:
        names = {f"{g}-{n}-{i}" for n in ("n1", "n2") for g, k in (("sig", 2), ("cli", 1))
                 for i in range(k)}  # fmt: skip
        _wait(lambda: {p.stem for p in rec.glob("*.json")} == names, 60, "every worker")
        launchers = _launcher_pids(run_dir)
        assert len(launchers) == 2, launchers  # one per node
        # SIGUSR1 to the two launcher processes only: they pass it to each worker's group.
        subprocess.run(["kill", "-USR1", *map(str, launchers)], check=True)
        _wait(lambda: set(_signals(rec)) == names, 20, "SIGUSR1 at every worker")
        # SIGTERM to the launcher step (Slurm signals its processes; the launchers forward it
        # too). The assigners keep running, so gated workers keep their leases to the end.
        subprocess.run(["scancel", "--signal=TERM", _launch_step(job_id)], check=True)
        record = wait_job(job_id)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    output = job_output(tmp_path, "acb-launch-sig", job_id)
    assert record["JobState"] == "FAILED", output
    signals = _signals(rec)
    for name in names:
        assert signals[name].count("SIGUSR1") == 1 and signals[name][0] == "SIGUSR1", signals
        assert "SIGTERM" in signals[name], (name, signals)
        assert f"acb: worker {name} FAILED with exit code 7" in output  # its own status
    assert "6 of 6 worker(s) failed" in output
    pids = [json.loads(p.read_text())["pid"] for p in rec.glob("*.json")]
    _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 15, "workers' end")
    for node in ("n1", "n2"):
        log = events(run_dir, node)
        assert not [e for e in log if e["event"] == "release" and e["reason"] != "release"], log
