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
from acb_slurm.campaign.runner import STAGE_WRAPPER
from acb_slurm.campaign.store import ClaimState, ResultsStore, WorkerIdentity

from .conftest import (
    Workers,
    other_host_prefix,
    proc_stat,
    runs,
    stage_command,
    write_campaign,
    write_fasta,
)

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
    # Every finished item's claim stays, as a tombstone.
    tombstones = {p.stem: store.read_claim(p.stem) for p in (results / "claims").iterdir()}
    assert sorted(tombstones) == ids
    assert all(t is not None and t.state is ClaimState.DONE for t in tombstones.values())
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
    assert store.read_claim(bad) is None  # its tombstone went with the failed record


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


def test_a_finished_item_is_not_run_again_where_its_done_record_is_not_visible(
    tmp_path: Path, workers: Workers
) -> None:
    """On NFS another node may cache that done/<item>.json does not exist; the claim's tombstone
    keeps it from running the item again. Here the records are hidden from the second worker."""
    ids = write_fasta(tmp_path / "items.fasta", 3)
    campaign = write_campaign(tmp_path, [{"name": "msa", "command": stage_command("msa")}])
    workers.start(campaign, "first")
    assert workers.wait_all() == [0]
    results = tmp_path / "results"
    (results / "done").rename(tmp_path / "done-hidden")
    (results / "done").mkdir()
    workers.start(campaign, "second")
    assert workers.wait_all() == [0, 0]
    assert Counter(r["item"] for r in runs(results)) == Counter(dict.fromkeys(ids, 1))
    assert "0 done, 0 failed, 0 skipped" in workers.log("second")
    assert not list((results / "done").iterdir())


def test_an_item_whose_worker_died_after_publishing_done_is_not_run_again(
    tmp_path: Path, workers: Workers
) -> None:
    """The worker died between its done record and its tombstone: its done record still stops
    every rerun."""
    ids = write_fasta(tmp_path / "items.fasta", 2)
    campaign = write_campaign(tmp_path, [{"name": "msa", "command": stage_command("msa")}])
    store = ResultsStore(tmp_path / "results")
    store.create()
    dead = WorkerIdentity("dead-worker", os.uname().nodename, 2**22 + 17, "1")
    assert store.try_claim(ids[0], dead) is not None
    assert store.record_done(ids[0], {"item": ids[0], "worker": "dead-worker"})
    workers.start(campaign, "w0")
    assert workers.wait_all() == [0]
    assert [r["item"] for r in runs(tmp_path / "results")] == [ids[1]]
    assert store.done_records()[ids[0]]["worker"] == "dead-worker"


@pytest.mark.parametrize(
    ("first_sleep", "case"),
    [("30", "stage still running when the worker resumes"), ("0.5", "stage ended while stopped")],
)
def test_a_stopped_worker_whose_claim_was_taken_over_drops_the_item_and_records_nothing(
    tmp_path: Path, workers: Workers, first_sleep: str, case: str
) -> None:
    """SIGSTOP (as `scontrol suspend` does) a worker on "another node" longer than stale_after,
    let a second worker take its item over, SIGCONT it: it kills its stage if still running and
    writes nothing for the item (no stage marker, attempt record, done or failed record)."""
    prefix = other_host_prefix("node-b")
    if prefix is None:
        pytest.skip("needs a UTS namespace (unshare) to run a worker under another host name")
    (item,) = write_fasta(tmp_path / "items.fasta", 1)
    marker = tmp_path / "started"
    # Attempt 1 (the stopped worker) sleeps first_sleep; attempt 2 (the taker) 6 s.
    msa = stage_command(
        "msa", "--first-sleep", first_sleep, "--sleep", "6", "--marker", str(marker)
    )
    campaign = write_campaign(
        tmp_path,
        [{"name": "msa", "command": msa}, {"name": "fold", "command": stage_command("fold")}],
        heartbeat="1s",
        stale_after="2s",
    )
    store = ResultsStore(tmp_path / "results")
    victim = workers.start(campaign, "victim", prefix=prefix)
    wait_for(
        lambda: marker.exists() and bool(marker.read_text().strip()), what="the victim's stage"
    )
    victim_stage = int(marker.read_text().split()[1])
    victim.send_signal(signal.SIGSTOP)
    try:
        claim = store.read_claim(item)
        assert claim is not None and claim.data["host"] == "node-b"
        wait_for(
            lambda: time.time() - store.claim_path(item).stat().st_mtime > 3,
            what="the stopped worker's claim to go stale",
        )
        taker = workers.start(campaign, "taker")
        wait_for(lambda: len(marker.read_text().splitlines()) >= 2, what="the taker's stage")
        assert not store.stage_done(item, "msa")
    finally:
        victim.send_signal(signal.SIGCONT)
    # The victim gives the item up at once, while the taker's stage still runs.
    wait_for(lambda: "dropped" in workers.log("victim"), 10, "the victim to drop the item")
    assert proc_stat(victim_stage) is None, case
    assert not store.stage_done(item, "msa"), case
    assert victim.wait(30) == 0 and taker.wait(60) == 0

    done = store.done_records()[item]
    assert (done["worker"], done["attempt"]) == ("taker", 2)
    assert [a["outcome"] for a in store.attempts(item)] == ["crashed", "done"]
    assert store.attempts(item)[0]["worker"] == "victim"
    assert not store.failed_records()
    tombstone = store.read_claim(item)
    assert tombstone is not None and tombstone.state is ClaimState.DONE
    assert tombstone.data["worker"] == "taker"
    # The victim ran nothing after its claim was lost: its msa either was killed (no record) or
    # had ended while it was stopped; its fold never started.
    stages = Counter((r["stage"], r["attempt"]) for r in runs(tmp_path / "results"))
    assert stages[("msa", 2)] == stages[("fold", 2)] == 1
    assert stages[("fold", 1)] == 0
    assert stages[("msa", 1)] == (0 if first_sleep == "30" else 1)
    log = workers.log("victim")
    assert f"{item} dropped: its claim was taken over by taker" in log
    assert "0 done, 0 failed, 0 skipped, 1 lost to a takeover" in log
    assert (
        "nothing recorded by this worker"
        in (tmp_path / "results" / "items" / item / "logs" / "attempt-1.log").read_text()
    )


def test_a_stage_runs_niced_in_its_own_session_and_dies_with_its_sigkilled_worker(
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
    )
    worker = workers.start(campaign, "w0")
    wait_for(lambda: marker.exists() and bool(marker.read_text().strip()), what="the stage")
    pid = int(marker.read_text().split()[1])
    stat = proc_stat(pid)
    assert stat is not None
    # The wrapper exec'd the command in place: the stage is the worker's own child, leads its
    # session, and runs at the cpu stages' niceness.
    assert int(stat[1]) == worker.pid
    assert int(stat[3]) == pid and int(stat[2]) == pid
    assert int(stat[16]) == 10
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    try:
        wait_for(lambda: proc_stat(pid) is None, 10, "the stage to die with its worker")
    finally:
        if proc_stat(pid) is not None:  # the test failed: leave no orphan behind
            os.kill(pid, signal.SIGKILL)


def test_a_command_that_cannot_start_fails_its_item(tmp_path: Path, workers: Workers) -> None:
    (item,) = write_fasta(tmp_path / "items.fasta", 1)
    campaign = write_campaign(
        tmp_path, [{"name": "msa", "command": ["no-such-command-acb", "{fasta}"]}], retries=0
    )
    workers.start(campaign, "w0")
    assert workers.wait_all() == [0]
    failed = ResultsStore(tmp_path / "results").failed_records()[item]
    assert "exited with code 127 (command not found" in failed["error"]
    assert "cannot start 'no-such-command-acb'" in Path(failed["log"]).read_text()


def test_the_stage_wrapper_does_not_start_a_stage_whose_worker_is_gone(tmp_path: Path) -> None:
    """Between the worker's fork and the wrapper's prctl the worker may die: the wrapper then
    has another parent than the pid it was given and does not exec the command."""
    flag = tmp_path / "ran"
    wrapper = [sys.executable, "-S", "-I", str(STAGE_WRAPPER)]
    gone = subprocess.run([*wrapper, "1", "0", "--", "touch", str(flag)], timeout=30)
    assert gone.returncode == 137 and not flag.exists()  # as if SIGKILLed with its worker
    ours = subprocess.run(
        [
            *wrapper,
            str(os.getpid()),
            "5",
            "--",
            "sh",
            "-c",
            f"cut -d' ' -f19 /proc/$$/stat >{flag}",
        ],
        timeout=30,
    )
    assert ours.returncode == 0 and flag.read_text().strip() == "5"


def test_what_a_stage_started_dies_with_its_sigkilled_worker(
    tmp_path: Path, workers: Workers
) -> None:
    """The death signal reaches the stage's first process only; the guard of its process group
    takes the rest (a script's own children, as run_alphafold.sh starts them)."""
    write_fasta(tmp_path / "items.fasta", 1)
    marker = tmp_path / "grandchild"
    script = f"sleep 300 & echo $! > '{marker}'; wait"
    campaign = write_campaign(tmp_path, [{"name": "msa", "command": ["sh", "-c", script]}])
    worker = workers.start(campaign, "w0")
    wait_for(lambda: marker.exists() and bool(marker.read_text().strip()), what="the stage")
    grandchild = int(marker.read_text())
    assert proc_stat(grandchild) is not None
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    try:
        wait_for(lambda: proc_stat(grandchild) is None, 10, "the stage's child to die")
    finally:
        if proc_stat(grandchild) is not None:
            os.kill(grandchild, signal.SIGKILL)


def test_a_gate_stage_whose_lease_is_lost_is_killed_and_its_attempt_fails(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    """The assigner dies while a gate stage holds its lease: the GPU may be anyone's now, so the
    stage's whole process group is killed at once (as acb-run's command is), the attempt is
    recorded failed with the reason, and the worker goes on (here: nothing left, exit 0)."""
    write_fasta(tmp_path / "items.fasta", 1)
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $$ $! > '{pids}.tmp' && mv '{pids}.tmp' '{pids}'; wait"
    stages = [{"name": "predict", "device": "gpu", "command": ["sh", "-c", script]}]
    campaign = write_campaign(tmp_path, stages, retries=0)
    gpu = assigner(gpus=1)
    worker = workers.start(campaign, "w0", gpu.client_env())
    wait_for(lambda: pids.exists(), what="the gate stage to start")
    stage, grandchild = (int(pid) for pid in pids.read_text().split())
    try:
        killed_at = time.monotonic()
        gpu.kill()
        wait_for(
            lambda: proc_stat(stage) is None and proc_stat(grandchild) is None,
            10,
            "the stage's group to be killed",
        )
        took = time.monotonic() - killed_at
    finally:
        for pid in (stage, grandchild):
            if proc_stat(pid) is not None:
                os.kill(pid, signal.SIGKILL)
    assert took < 2.0, f"the stage ran {took:.2f}s on a lost lease"
    assert worker.wait(60) == 0, workers.log("w0")
    store = ResultsStore(tmp_path / "results")
    (attempt,) = store.attempts("prot000")
    assert attempt["outcome"] == "failed"
    assert "lease lost" in attempt["error"] and "killed" in attempt["error"]
    failed = store.failed_records()
    assert list(failed) == ["prot000"] and "lease lost" in failed["prot000"]["error"]
    assert "lease lost" in workers.log("w0")
