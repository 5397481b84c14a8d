"""A gpu stage with `batch: N`: one process for several ready items, under one lease, with
claims, records, retries and resume still per item. Real workers, a real acb-assigner (virtual
GPUs), real stage processes; the gathering rules alone with a fake clock."""

from __future__ import annotations

import io
import json
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.campaign.batches import Batches, Ready
from acb_slurm.campaign.items import Item
from acb_slurm.campaign.spec import load_spec
from acb_slurm.campaign.stages import ItemRun
from acb_slurm.campaign.store import ClaimState, ResultsStore

from .conftest import Workers, proc_stat, runs, stage_command, write_campaign, write_fasta

pytestmark = pytest.mark.timeout(240)


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def batched(*extra: str, msa: tuple[str, ...] = (), **predict: Any) -> list[dict[str, Any]]:
    """msa (cpu, one item a process) then predict (gpu, batch 3: one process, its {outdir}
    argument repeated per item), done for an item when its predict.out exists."""
    return [
        {"name": "msa", "command": stage_command("msa", *msa)},
        {
            "name": "predict",
            "device": "gpu",
            "memory": "10GiB",
            "batch": 3,
            "outputs": ["predict.out"],
            "command": stage_command("predict", *extra),
            **predict,
        },
    ]


def processes(results: Path, stage: str = "predict") -> list[list[str]]:
    """The items of each process of `stage`, in the order they ran."""
    by_pid: dict[int, tuple[float, list[str]]] = {}
    for r in runs(results):
        if r["stage"] == stage:
            by_pid[r["pid"]] = (r["start"], r["items"])
    return [items for _, items in sorted(by_pid.values())]


def attempts(store: ResultsStore, item: str) -> list[str]:
    return [a["outcome"] for a in store.attempts(item)]


def test_a_batch_of_three_over_seven_items_runs_three_processes_with_per_item_records(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 7)
    stages = batched("--items-dir", "{items_dir}", item_link="*.jsonl")
    campaign = write_campaign(tmp_path, stages)
    gpu = assigner(gpus=1)
    workers.start(campaign, "w0", gpu.client_env())
    assert workers.wait_all() == [0], workers.log("w0")

    results = tmp_path / "results"
    store = ResultsStore(results)
    assert [len(p) for p in processes(results)] == [3, 3, 1]
    assert sorted(i for p in processes(results) for i in p) == ids
    # Every item has its own records: one attempt, done, its tombstone.
    done = store.done_records()
    assert sorted(done) == ids
    for item in ids:
        assert attempts(store, item) == ["done"]
        assert store.read_claim(item).state is ClaimState.DONE  # type: ignore[union-attr]
        batch = done[item]["stages"]["predict"]["batch"]
        assert batch == (1 if item == ids[-1] else 3)
    assert Counter(r["item"] for r in runs(results) if r["stage"] == "msa") == Counter(ids)
    # One process: each {outdir} argument once per item, the GPU of one lease, {items_dir} with
    # one symlink per item to its item_link, run in the batch's own directory.
    first = next(r for r in runs(results) if r["stage"] == "predict" and r["item"] == ids[0])
    outdirs = [str(results / "items" / i / "out") for i in first["items"]]
    assert first["argv"][1:4] == outdirs and first["cuda"] == "0"
    links = {f"{i}.jsonl": f"{d}/runs.jsonl" for i, d in zip(ids, outdirs, strict=False)}
    assert first["items_dir"] == links
    assert Path(first["cwd"]).parent == results / "batches"
    assert not list((results / "batches").iterdir())  # removed after each process
    # One lease per process, labelled with its items.
    requests = [e["label"] for e in gpu.events() if e["event"] == "request"]
    assert requests == [f"{','.join(p)}/predict" for p in processes(results)]
    # The process's output is in the log of each of its items.
    log = store.attempt_log(ids[1], 1).read_text()
    assert f"stage predict ran for {' '.join(ids[:3])}" in log
    assert "one process for 3 items" in log


def test_an_item_whose_output_is_missing_is_retried_alone_and_succeeds(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 3)
    campaign = write_campaign(tmp_path, batched("--no-output", ids[1]))
    gpu = assigner(gpus=1)
    workers.start(campaign, "w0", gpu.client_env())
    assert workers.wait_all() == [0], workers.log("w0")

    store = ResultsStore(tmp_path / "results")
    assert processes(tmp_path / "results") == [ids, [ids[1]]]
    done = store.done_records()
    assert sorted(done) == ids and not store.failed_records()
    assert {i: done[i]["attempt"] for i in ids} == {ids[0]: 1, ids[1]: 2, ids[2]: 1}
    assert attempts(store, ids[1]) == ["failed", "done"]
    (first,) = [a for a in store.attempts(ids[1]) if a["outcome"] == "failed"]
    assert f"left no {tmp_path}/results/items/{ids[1]}/out/predict.out" in first["error"]
    assert done[ids[1]]["stages"]["predict"]["batch"] == 1


def test_a_batch_process_that_crashes_fails_all_its_items_then_each_succeeds_on_retry(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 3)
    campaign = write_campaign(tmp_path, batched("--crash-attempts", "1"))
    gpu = assigner(gpus=1)
    workers.start(campaign, "w0", gpu.client_env())
    assert workers.wait_all() == [0], workers.log("w0")

    store = ResultsStore(tmp_path / "results")
    done = store.done_records()
    assert sorted(done) == ids and {d["attempt"] for d in done.values()} == {2}
    for item in ids:
        failed, ok = store.attempts(item)
        assert failed["outcome"] == "failed" and ok["outcome"] == "done"
        assert "killed by signal 9 (one process for 3 items" in failed["error"]
        assert "crashing on purpose" in Path(failed["log"]).read_text()
    # The crashed process left no record; each retry ran in a process of its own.
    assert processes(tmp_path / "results") == [[i] for i in ids]
    grants = [e for e in gpu.events() if e["event"] == "grant"]
    assert len(grants) == 4


def test_resume_after_a_killed_worker_runs_only_what_is_left_per_item(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 6)
    marker = tmp_path / "predict-started"
    stages = batched("--first-sleep", "60", "--marker", str(marker))
    campaign = write_campaign(tmp_path, stages)
    gpu = assigner(gpus=1)
    victim = workers.start(campaign, "victim", gpu.client_env())
    wait_for(marker.exists, what="the first batch to start")
    batch, pid = marker.read_text().split()
    assert batch.split(",") == ids[:3]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    wait_for(lambda: proc_stat(int(pid)) is None, 10, "the batch process to die with its worker")
    wait_for(
        lambda: any(
            e["event"] == "release" and e.get("reason") == "disconnect" for e in gpu.events()
        ),
        what="the lease released on disconnect",
    )

    write_campaign(tmp_path, batched())  # the same campaign, without the long first sleep
    rerun = workers.start(campaign, "rerun", gpu.client_env())
    assert rerun.wait(120) == 0, workers.log("rerun")
    store = ResultsStore(tmp_path / "results")
    done = store.done_records()
    assert sorted(done) == ids
    results = tmp_path / "results"
    msa = Counter(r["item"] for r in runs(results) if r["stage"] == "msa")
    assert msa == Counter(ids)  # the killed batch's items resumed at predict
    for item in ids[:3]:
        assert attempts(store, item) == ["crashed", "done"]
        assert done[item]["worker"] == "rerun"
    # The killed batch's items (attempt 2) and the rest form batches again.
    assert [sorted(p) for p in processes(results)] == [ids[:3], ids[3:]]
    # Its output stays where each item's log says, for a look at what it did.
    log = store.attempt_log(ids[0], 1).read_text()
    output = log.split("== its output: ", 1)[1].split(" ", 1)[0]
    assert Path(output).exists()


def test_a_stop_interrupts_the_waiting_items_and_releases_every_claim(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 4)
    marker = tmp_path / "msa-started"
    stages = batched(msa=("--slow-item", ids[2], "--marker", str(marker)))
    campaign = write_campaign(tmp_path, stages, retries=0)
    gpu = assigner(gpus=1)
    proc = workers.start(campaign, "w0", gpu.client_env())
    wait_for(lambda: marker.exists() and len(marker.read_text().splitlines()) == 3, what="msa 3")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    store = ResultsStore(tmp_path / "results")
    assert not list((tmp_path / "results" / "claims").iterdir())
    for item in ids[:3]:
        assert attempts(store, item) == ["interrupted"]
    assert not store.done_records() and not store.failed_records()
    assert not [e for e in gpu.events() if e["event"] == "request"]
    # Their msa stages are kept: a rerun resumes them at predict, as one batch.
    write_campaign(tmp_path, batched(), retries=0)  # the same, without the slow msa
    workers.start(campaign, "w1", gpu.client_env())
    assert workers.wait_all()[-1] == 0
    assert sorted(store.done_records()) == ids
    assert processes(tmp_path / "results") == [ids[:3], ids[3:]]


def steal_claim(store: ResultsStore, item: str) -> None:
    """Put another worker's live claim in place of ours, as a takeover does (another host, a
    fresh heartbeat: never stale here)."""
    path = store.claim_path(item)
    data = {"item": item, "worker": "thief", "host": "elsewhere", "pid": 1, "token": "theirs"}
    tmp = path.with_name(".stolen")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def test_a_lost_claim_in_a_batch_interrupts_its_other_items_without_costing_an_attempt(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 3)
    marker = tmp_path / "predict-started"
    stages = batched("--first-sleep", "60", "--marker", str(marker))
    # retries 0: an attempt lost to another item's claim would fail the item for good.
    campaign = write_campaign(tmp_path, stages, retries=0, heartbeat="1s")
    gpu = assigner(gpus=1)
    proc = workers.start(campaign, "w0", gpu.client_env())
    wait_for(marker.exists, what="the batch to start")
    batch, pid = marker.read_text().split()
    assert batch.split(",") == ids
    store = ResultsStore(tmp_path / "results")
    steal_claim(store, ids[1])
    wait_for(lambda: proc_stat(int(pid)) is None, 20, "the batch process to be killed")
    assert proc.wait(60) == 0, workers.log("w0")

    # The stolen item is dropped; the other two run again, in one process, and are done.
    assert not store.failed_records(), workers.log("w0")
    assert sorted(store.done_records()) == [ids[0], ids[2]]
    assert not store.attempts(ids[1])[-1].get("ended")  # nothing recorded for it
    for item in (ids[0], ids[2]):
        first, second = store.attempts(item)
        assert first["outcome"] == "interrupted" and second["outcome"] == "done"
        assert f"the claim on another item of its process was lost ({ids[1]})" in first["error"]
    assert processes(tmp_path / "results")[-1] == [ids[0], ids[2]]
    assert "1 lost to a takeover" in workers.log("w0")


def test_every_item_of_a_batch_records_its_result_before_any_goes_on(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 3)
    marker = tmp_path / "post-started"
    post = {"name": "post", "command": stage_command("post", "--marker", str(marker))}
    slow = {**post, "command": [*post["command"], "--slow-item", ids[0]]}
    campaign = write_campaign(tmp_path, [*batched(), slow])
    gpu = assigner(gpus=1)
    victim = workers.start(campaign, "victim", gpu.client_env())
    wait_for(marker.exists, what="the first item's next stage")
    assert marker.read_text().split()[0] == ids[0]
    # The first item is in its next stage: the batch's result is recorded for each item.
    store = ResultsStore(tmp_path / "results")
    assert [store.stage_done(i, "predict") for i in ids] == [True, True, True]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)

    write_campaign(tmp_path, [*batched(), post])  # the same, without the slow post
    rerun = workers.start(campaign, "rerun", gpu.client_env())
    assert rerun.wait(120) == 0, workers.log("rerun")
    assert sorted(store.done_records()) == ids
    assert processes(tmp_path / "results") == [ids]  # the batch ran once, its results kept


def test_a_stop_interrupts_every_item_even_when_one_cannot_be_recorded(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 4)
    marker = tmp_path / "msa-started"
    stages = batched(msa=("--slow-item", ids[2], "--marker", str(marker)))
    campaign = write_campaign(tmp_path, stages, retries=0)
    gpu = assigner(gpus=1)
    proc = workers.start(campaign, "w0", gpu.client_env())
    wait_for(lambda: marker.exists() and len(marker.read_text().splitlines()) == 3, what="msa 3")
    # ids[0] waits for its batch; its claim becomes unreadable (an OSError on every read).
    store = ResultsStore(tmp_path / "results")
    claim = store.claim_path(ids[0])
    claim.unlink()
    claim.mkdir()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM, workers.log("w0")
    log = workers.log("w0")
    assert "could not record an item in flight as interrupted: IsADirectoryError" in log
    # The others were interrupted and released all the same.
    for item in ids[1:3]:
        assert attempts(store, item) == ["interrupted"]
        assert not store.claim_path(item).exists()
    assert not store.done_records() and not store.failed_records()


# ---- when a batch runs (the gathering rules alone) ----


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ready(tmp_path: Path, name: str, alone: bool = False) -> Ready:
    item = Item(name, name, "MKV", tmp_path, 1)
    return Ready(ItemRun(item, 1, None, io.BytesIO()), alone)


def stage_of(tmp_path: Path, **predict: Any) -> Any:
    (tmp_path / "items.fasta").write_text(">a\nMKV\n")
    write_campaign(tmp_path, batched(**predict))
    return load_spec(tmp_path / "campaign.yaml").batched_stage


def names(batch: list[Any]) -> list[str]:
    return [w.ready.run.item.id for w in batch]


def test_a_batch_runs_when_full_and_an_item_after_a_failure_runs_alone(tmp_path: Path) -> None:
    clock = Clock()
    batches: Batches[str] = Batches(stage_of(tmp_path), clock)
    for name in "ab":
        batches.add(ready(tmp_path, name), name)
    assert batches.due() == [] and len(batches) == 2
    batches.add(ready(tmp_path, "r", alone=True), "r")
    assert names(batches.due()) == ["r"]  # alone first, at once
    batches.add(ready(tmp_path, "c"), "c")
    batches.add(ready(tmp_path, "d"), "d")
    assert names(batches.due()) == ["a", "b", "c"]
    assert names(batches.take_all()) == ["d"]  # the end of the queue: what waits
    assert len(batches) == 0 and batches.take_all() == []


def test_a_ready_item_waits_no_longer_than_batch_wait_by_the_time_items_take(
    tmp_path: Path,
) -> None:
    clock = Clock()
    batches: Batches[str] = Batches(stage_of(tmp_path, batch_wait="100s"), clock)
    batches.took_to_ready(30.0)
    batches.took_to_ready(50.0)
    assert batches.time_to_ready == 40.0
    batches.add(ready(tmp_path, "a"), "a")
    clock.now = 60.0
    assert batches.due() == []  # 60 + 40 = 100: another item fits in the time left
    clock.now = 61.0
    assert names(batches.due()) == ["a"]  # the next one would make "a" wait past 100 s


def test_no_batch_stage_keeps_one_process_per_item(tmp_path: Path, workers: Workers) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 2)
    stages = [{"name": "msa", "command": stage_command("msa"), "outputs": ["msa.out"]}]
    campaign = write_campaign(tmp_path, stages)
    workers.start(campaign, "w0")
    assert workers.wait_all() == [0]
    assert processes(tmp_path / "results", "msa") == [[i] for i in ids]
    assert Path(runs(tmp_path / "results")[0]["cwd"]).name == "out"


def test_an_item_link_that_matches_nothing_fails_that_item_without_a_lease(
    tmp_path: Path, assigner: Callable[..., AssignerProcess], workers: Workers
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 2)
    campaign = write_campaign(tmp_path, batched("{items_dir}", item_link="none.*"), retries=0)
    gpu = assigner(gpus=1)
    workers.start(campaign, "w0", gpu.client_env())
    assert workers.wait_all() == [0]
    failed = ResultsStore(tmp_path / "results").failed_records()
    assert sorted(failed) == ids
    assert "item_link" in failed[ids[0]]["error"] and "matched no path" in failed[ids[0]]["error"]
    assert not [e for e in gpu.events() if e["event"] == "request"]  # no GPU held for nothing
