"""The campaign worker with real processes, a real acb-assigner (virtual GPUs) and real gRPC:
contention, retries, resume, SIGKILL and SIGTERM, stale claims, shards, placeholders."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.campaign.store import ResultsStore, WorkerIdentity

from .conftest import Workers, runs, stage_command, write_campaign, write_fasta

pytestmark = pytest.mark.timeout(240)


def two_stages(**gpu: object) -> list[dict[str, object]]:
    return [
        {"name": "msa", "command": stage_command("msa", "--sleep", "0.2")},
        {
            "name": "predict",
            "device": "gpu",
            "memory": "60GiB",
            "command": stage_command("predict", "--sleep", "0.2"),
            **gpu,
        },
    ]


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_four_workers_on_one_gpu_finish_every_item_exactly_once(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 12)
    campaign = write_campaign(tmp_path, two_stages())
    gpu = assigner(gpus=1, policy="simple")
    for i in range(4):
        workers.start(campaign, f"w{i}", gpu.client_env())
    assert workers.wait_all() == [0, 0, 0, 0]

    results = tmp_path / "results"
    store = ResultsStore(results)
    done = store.done_records()
    assert sorted(done) == ids
    assert not store.failed_records()
    assert not list((results / "claims").iterdir())
    # Every stage of every item ran exactly once; cpu stages saw no GPU, gpu stages the lease's.
    counts = Counter((r["item"], r["stage"]) for r in runs(results))
    assert counts == Counter({(i, s): 1 for i in ids for s in ("msa", "predict")})
    for r in runs(results):
        assert r["cuda"] == ("" if r["stage"] == "msa" else "0")
    # Work was shared, and the event log shows one lease per item's gpu stage.
    assert len({d["worker"] for d in done.values()}) >= 2
    events = gpu.events()
    labels = Counter(e["label"] for e in events if e["event"] == "request")
    assert labels == Counter({f"{i}/predict": 1 for i in ids})
    grants = [e for e in events if e["event"] == "grant"]
    releases = [e for e in events if e["event"] == "release"]
    assert len(grants) == len(releases) == len(ids)
    # One GPU: holdings never overlap.
    spans = sorted(
        (g["ts"], next(r["ts"] for r in releases if r["lease"] == g["lease"])) for g in grants
    )
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end


def test_a_failing_item_is_retried_then_recorded_failed_and_never_stops_the_campaign(
    tmp_path: Path, workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 4)
    bad = ids[1]
    campaign = write_campaign(
        tmp_path,
        [
            {"name": "msa", "command": stage_command("msa")},
            {"name": "fold", "command": stage_command("fold", "--fail-item", bad)},
        ],
        retries=2,
    )
    workers.start(campaign, "w0")
    assert workers.wait_all() == [0]
    store = ResultsStore(tmp_path / "results")
    assert sorted(store.done_records()) == [i for i in ids if i != bad]
    failed = store.failed_records()
    assert list(failed) == [bad]
    assert failed[bad]["attempts"] == 3
    assert "stage fold exited with code 7" in failed[bad]["error"]
    log = Path(failed[bad]["log"])
    assert log.name == "attempt-3.log" and "failing on purpose" in log.read_text()
    # The msa stage finished in attempt 1; the retries resumed after it.
    stages = Counter(r["stage"] for r in runs(tmp_path / "results") if r["item"] == bad)
    assert stages == Counter({"msa": 1, "fold": 3})
    assert f"{bad} FAILED after 3 attempts" in workers.log("w0")

    # A rerun does not try a failed item again; reset-failed makes it eligible.
    workers.start(campaign, "w1")
    assert workers.wait_all() == [0, 0]
    assert stages == Counter(r["stage"] for r in runs(tmp_path / "results") if r["item"] == bad)
    reset = subprocess.run(
        [sys.executable, "-m", "acb_slurm.campaign.cli", "reset-failed", str(campaign)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert bad in reset.stdout
    assert not store.failed_records()


def test_a_transient_failure_succeeds_on_retry(tmp_path: Path, workers: Workers) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 2)
    campaign = write_campaign(
        tmp_path,
        [
            {"name": "msa", "command": stage_command("msa")},
            {"name": "fold", "command": stage_command("fold", "--fail-attempts", "1")},
        ],
        retries=1,
    )
    workers.start(campaign, "w0")
    assert workers.wait_all() == [0]
    done = ResultsStore(tmp_path / "results").done_records()
    assert sorted(done) == ids
    assert {d["attempt"] for d in done.values()} == {2}


def test_a_rerun_skips_finished_items(tmp_path: Path, workers: Workers) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 6)
    campaign = write_campaign(tmp_path, [{"name": "msa", "command": stage_command("msa")}])
    workers.start(campaign, "first", None, "--max-items", "2")
    assert workers.wait_all() == [0]
    store = ResultsStore(tmp_path / "results")
    first = store.done_records()
    assert len(first) == 2
    workers.start(campaign, "second")
    assert workers.wait_all() == [0, 0]
    done = store.done_records()
    assert sorted(done) == ids
    assert all(done[i] == first[i] for i in first)  # untouched
    assert Counter(r["item"] for r in runs(tmp_path / "results")) == Counter(dict.fromkeys(ids, 1))


def test_sigkill_mid_item_then_rerun_finishes_the_rest_without_redoing_finished_items(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 5)
    marker = tmp_path / "predict-started"
    stages = [
        {"name": "msa", "command": stage_command("msa")},
        {
            "name": "predict",
            "device": "gpu",
            "command": stage_command("predict", "--sleep", "1.5", "--marker", str(marker)),
        },
    ]
    campaign = write_campaign(tmp_path, stages)
    gpu = assigner(gpus=1)
    victim = workers.start(campaign, "victim", gpu.client_env())
    store = ResultsStore(tmp_path / "results")
    # Kill it while the third item holds the GPU.
    wait_for(
        lambda: marker.exists() and len(marker.read_text().splitlines()) >= 3,
        what="the third gpu stage",
    )
    killed_item, stage_pid = marker.read_text().splitlines()[2].split()
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    before = store.done_records()
    assert len(before) == 2 and killed_item not in before

    # The lease died with the worker, and the stage process died with it (no orphan on the GPU).
    wait_for(
        lambda: any(
            e["event"] == "release" and e.get("reason") == "disconnect" for e in gpu.events()
        ),
        what="the lease released on disconnect",
    )
    wait_for(lambda: not os.path.exists(f"/proc/{stage_pid}"), 10, "the stage process to die")

    rerun = workers.start(campaign, "rerun", gpu.client_env())
    assert rerun.wait(120) == 0
    done = store.done_records()
    assert sorted(done) == ids
    assert all(done[i] == before[i] for i in before)
    counts = Counter((r["item"], r["stage"]) for r in runs(tmp_path / "results"))
    for item in before:
        assert counts[(item, "predict")] == 1 and counts[(item, "msa")] == 1
    # The killed item's msa had finished: only its gpu stage ran again.
    assert counts[(killed_item, "msa")] == 1
    assert done[killed_item]["attempt"] == 2
    attempts = store.attempts(killed_item)
    assert [a["outcome"] for a in attempts] == ["crashed", "done"]
    assert f"took over {killed_item} from victim" in workers.log("rerun")


def test_sigterm_stops_the_stage_releases_the_claim_and_does_not_count_as_a_failure(
    tmp_path: Path, workers: Workers
) -> None:
    write_fasta(tmp_path / "items.fasta", 1)
    marker = tmp_path / "started"
    campaign = write_campaign(
        tmp_path,
        [
            {
                "name": "msa",
                "command": stage_command("msa", "--sleep", "60", "--marker", str(marker)),
            }
        ],
        retries=0,
    )
    proc = workers.start(campaign, "w0")
    wait_for(marker.exists, what="the stage to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    store = ResultsStore(tmp_path / "results")
    assert not list((tmp_path / "results" / "claims").iterdir())
    (attempt,) = store.attempts("prot000")
    assert attempt["outcome"] == "interrupted"
    assert "SIGTERM" in workers.log("w0")
    assert not store.failed_records()


def test_a_stale_claim_of_a_dead_worker_is_taken_over(tmp_path: Path, workers: Workers) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 2)
    campaign = write_campaign(tmp_path, [{"name": "msa", "command": stage_command("msa")}])
    store = ResultsStore(tmp_path / "results")
    store.create()
    # Above the kernel's largest pid (2**22), so no process has it.
    dead = WorkerIdentity("dead-worker", os.uname().nodename, 2**22 + 17, "1")
    assert store.try_claim(ids[0], dead) is not None
    workers.start(campaign, "w0")
    assert workers.wait_all() == [0]
    assert sorted(store.done_records()) == ids
    assert f"took over {ids[0]} from dead-worker" in workers.log("w0")


def test_a_live_claim_elsewhere_is_left_alone(tmp_path: Path, workers: Workers) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 2)
    campaign = write_campaign(tmp_path, [{"name": "msa", "command": stage_command("msa")}])
    store = ResultsStore(tmp_path / "results")
    store.create()
    remote = WorkerIdentity("remote", "another-host", 1234, "1")
    assert store.try_claim(ids[0], remote) is not None
    workers.start(campaign, "w0")
    assert workers.wait_all() == [0]
    assert sorted(store.done_records()) == [ids[1]]


def test_array_tasks_start_on_different_items_and_never_overlap(
    tmp_path: Path, workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 10)
    campaign = write_campaign(tmp_path, [{"name": "msa", "command": stage_command("msa")}])
    for task in (0, 1):
        env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task + 3), SLURM_ARRAY_TASK_COUNT="2")
        env["SLURM_ARRAY_TASK_MIN"] = "3"
        workers.start(campaign, f"task{task}", env, "--max-items", "1")
    assert workers.wait_all() == [0, 0]
    done = ResultsStore(tmp_path / "results").done_records()
    assert {d["array_task"]: i for i, d in done.items()} == {"0/2": ids[0], "1/2": ids[5]}
    for task in (0, 1):
        env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT="2")
        workers.start(campaign, f"task{task}-rest", env)
    workers.wait_all()
    assert Counter(r["item"] for r in runs(tmp_path / "results")) == Counter(dict.fromkeys(ids, 1))


def test_placeholders_reach_the_command_as_whole_arguments(
    tmp_path: Path, workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 1)
    nasty = "res 'q' \"dq\"; echo foo $(x)\nnl"
    campaign = write_campaign(
        tmp_path,
        [
            {
                "name": "msa",
                "command": stage_command("msa", "--x", "{item}", "--y", "len={length} {{lit}}"),
            }
        ],
        results=nasty,
    )
    workers.start(campaign, "w0")
    assert workers.wait_all() == [0]
    (run,) = runs(tmp_path / nasty)
    outdir = str(tmp_path / nasty / "items" / ids[0] / "out")
    seq_len = len(Path(tmp_path / "items.fasta").read_text().splitlines()[1])
    assert run["argv"] == ["msa", outdir, "--x", ids[0], "--y", f"len={seq_len} {{lit}}"]
    assert run["cwd"] == outdir


def test_an_unreachable_assigner_stops_the_worker_without_failing_items(
    tmp_path: Path, workers: Workers
) -> None:
    write_fasta(tmp_path / "items.fasta", 3)
    campaign = write_campaign(tmp_path, two_stages(), retries=0)
    env = dict(os.environ, ACB_ASSIGNER=f"unix:{tmp_path}/no-such.sock")
    proc = workers.start(campaign, "w0", env)
    assert proc.wait(60) == 1
    assert "cannot get a GPU lease" in workers.log("w0")
    store = ResultsStore(tmp_path / "results")
    assert not store.failed_records() and not store.done_records()
    assert not list((tmp_path / "results" / "claims").iterdir())


def test_status_shows_counts_failed_items_and_logs(tmp_path: Path, workers: Workers) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 3)
    campaign = write_campaign(
        tmp_path,
        [{"name": "msa", "command": stage_command("msa", "--fail-item", ids[2])}],
        retries=0,
    )
    workers.start(campaign, "w0")
    workers.wait_all()
    out = subprocess.run(
        [sys.executable, "-m", "acb_slurm.campaign.cli", "status", str(campaign)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "2/3 done, 1 failed, 0 running, 0 pending" in out
    assert f"{ids[2]}  after 1 attempts: stage msa exited with code 7" in out
    data = json.loads(
        subprocess.run(
            [sys.executable, "-m", "acb_slurm.campaign.cli", "status", str(campaign), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert (data["total"], data["done"], data["failed"]) == (3, 2, 1)
    assert data["failed_items"][0]["log"].endswith("attempt-1.log")


@pytest.mark.slow
def test_an_auto_stage_runs_under_acb_run_auto_and_leases_through_it(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 1)
    program = "import torch; x = torch.ones(8); print('sum', float((x * 2).sum()))"
    campaign = write_campaign(
        tmp_path,
        [
            {
                "name": "predict",
                "device": "gpu",
                "mode": "auto",
                "memory": "1GiB",
                "env": {"ACB_AUTO_DEVICE": "cpu"},
                "command": ["{python}", "-c", program],
            }
        ],
    )
    gpu = assigner(gpus=1)
    workers.start(campaign, "w0", gpu.client_env())
    assert workers.wait_all(180) == [0], workers.log("w0")
    done = ResultsStore(tmp_path / "results").done_records()
    assert done[ids[0]]["stages"]["predict"]["mode"] == "auto"
    log = (tmp_path / "results" / "items" / ids[0] / "logs" / "attempt-1.log").read_text()
    assert "sum 16.0" in log and "--auto" in log
    requests = [e for e in gpu.events() if e["event"] == "request"]
    assert requests and {e["label"] for e in requests} == {f"{ids[0]}/predict"}
    assert {e["worker"] for e in requests} == {"w0"}
    assert requests[0]["memory_bytes"] == 1024**3
