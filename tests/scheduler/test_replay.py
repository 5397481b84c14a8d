"""Replaying a hand-written event log into the core: matching logs pass, altered ones are caught."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from acb_slurm.scheduler import ReplayMismatch, available_policies, replay

GiB = 1024**3

# One node, two 80 GiB GPUs, policy simple: four workers take turns, one withdraws after a
# deadline, one client disconnects while holding a GPU and waiting for another, a request of
# another node is interleaved, then the daemon shuts down.
LOG = Path(__file__).parent / "logs" / "two-gpus-simple.jsonl"


def events() -> list[dict[str, Any]]:
    return [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """One log line of node `n`, as the assigner writes it (fields the replay ignores left out)."""
    return {"ts": 0.0, "event": kind, "node": "n", **fields}


def start(policy: str, *memory: int) -> dict[str, Any]:
    gpus = [{"index": i, "device_id": str(i), "memory_bytes": m} for i, m in enumerate(memory)]
    return event("start", policy=policy, pid=1, gpus=gpus)


def request(lease: str, client: str, memory: int = 0) -> dict[str, Any]:
    return event(
        "request", lease=lease, client=client, gpu_count=1, memory_bytes=memory, priority=0
    )


def grant(lease: str, client: str, gpus: list[int], memory: int) -> dict[str, Any]:
    return event("grant", lease=lease, client=client, gpus=gpus, memory_bytes=memory)


def edited(position: int, **changes: Any) -> list[dict[str, Any]]:
    """The log with event `position` (counting from 1) changed."""
    log = events()
    log[position - 1] = {**log[position - 1], **changes}
    return log


def test_a_matching_log_replays_into_the_state_it_ended_in() -> None:
    scheduler = replay(events())
    assert scheduler.policy.name == "simple"
    assert [g.memory_bytes for g in scheduler.gpus] == [80 * GiB, 80 * GiB]
    # The shutdown releases end the run: the scheduler keeps what was held when it began.
    assert {rid: g.gpu_indices for rid, g in scheduler.holdings.items()} == {
        "L4": (0,),
        "L6": (1,),
    }
    assert scheduler.queue == ()


def test_a_grant_on_another_gpu_is_a_mismatch() -> None:
    with pytest.raises(ReplayMismatch, match=r"event 13 \(grant\).*lease 'L4' GPUs \[1\]"):
        replay(edited(13, gpus=[1]))


def test_a_grant_to_another_waiter_is_a_mismatch() -> None:
    with pytest.raises(ReplayMismatch, match="the scheduler granted lease 'L4'"):
        replay(edited(13, lease="L5"))


def test_a_grant_of_other_memory_is_a_mismatch() -> None:
    with pytest.raises(ReplayMismatch, match=r"\(1 bytes\)"):
        replay(edited(4, memory_bytes=1))


def test_a_grant_the_scheduler_never_made_is_a_mismatch() -> None:
    log = events()
    log.insert(8, {**log[3], "lease": "L3", "gpus": [0]})
    with pytest.raises(ReplayMismatch, match="the scheduler granted nothing at this point"):
        replay(log)


def test_a_grant_missing_from_the_log_is_a_mismatch() -> None:
    log = [e for e in events() if not (e["event"] == "grant" and e["lease"] == "L6")]
    with pytest.raises(ReplayMismatch, match=r"granted 'L6' on \[1\], the log never did"):
        replay(log)


# Recorded under gpu-affinity: c2 gets back GPU 1, where simple would take the lowest free GPU.
AFFINITY_LOG = [
    start("gpu-affinity", 80, 80),
    request("A", "c1"),
    grant("A", "c1", [0], 80),
    request("B", "c2"),
    grant("B", "c2", [1], 80),
    event("release", lease="A", client="c1", reason="release"),
    event("release", lease="B", client="c2", reason="release"),
    request("C", "c2"),
    grant("C", "c2", [1], 80),
]


def test_the_policy_of_the_start_event_is_used() -> None:
    assert replay(AFFINITY_LOG).policy.name == "gpu-affinity"


def test_another_policy_gives_other_grants() -> None:
    with pytest.raises(ReplayMismatch, match=r"event 9 \(grant\).*GPUs \[0\]"):
        replay(AFFINITY_LOG, policy="simple")


def test_a_disconnect_must_drop_the_leases_the_log_names() -> None:
    assert set(replay(edited(16, leases=["L2", "L5"])).holdings) == {"L4", "L6"}
    with pytest.raises(ReplayMismatch, match=r"releases leases \['L5'\], the scheduler released"):
        replay(edited(16, leases=["L5"]))


def test_an_event_the_scheduler_refuses_is_a_mismatch() -> None:
    with pytest.raises(ReplayMismatch, match=r"event 10 \(withdraw\).*no waiting request"):
        replay(edited(10, lease="L9"))


def test_events_of_the_chosen_node_only_are_replayed() -> None:
    log = events()
    other_start = {**log[0], "node": "n2"}
    other_grant = {**log[3], "node": "n2", "lease": "X1", "client": "x9"}
    merged = [log[0], other_start, *log[1:], other_grant]
    assert set(replay(merged).holdings) == {"L4", "L6"}
    assert set(replay(merged, node="n2").holdings) == {"X1"}


def test_a_log_without_a_start_is_refused() -> None:
    with pytest.raises(ReplayMismatch, match="comes before any `start` event"):
        replay(events()[1:])


def test_a_restarted_daemon_starts_a_fresh_scheduler() -> None:
    log = events()
    scheduler = replay([*log, *log])
    assert set(scheduler.holdings) == {"L4", "L6"}


def test_usage_events_re_charge_a_shared_holder() -> None:
    log = [
        start("gpu-sharing", 100),
        request("A", "a", memory=40),
        grant("A", "a", [0], 40),
        event("usage", lease="A", client="a", resident_bytes=90),
        request("B", "b", memory=30),
        event("usage", lease="A", client="a", resident_bytes=50),
        grant("B", "b", [0], 30),
    ]
    assert replay(log).promised_bytes(0) == 80
    # Without the report that A shrank back, B would not fit when the log says it was granted.
    with pytest.raises(ReplayMismatch, match=r"event 6 \(grant\).*granted nothing"):
        replay(log[:5] + log[6:])


def test_the_required_gpus_of_a_request_are_replayed() -> None:
    pinned = event(
        "request", lease="A", client="a", gpu_count=1, memory_bytes=0, priority=0, required_gpus=[1]
    )
    log = [start("simple", 80, 80), pinned, grant("A", "a", [1], 80)]
    assert replay(log).holdings["A"].gpu_indices == (1,)
    # Read without its pin, the request would have gone to the lowest free GPU.
    unpinned = {k: v for k, v in pinned.items() if k != "required_gpus"}
    with pytest.raises(ReplayMismatch, match=r"event 3 \(grant\).*granted lease 'A' GPUs \[0\]"):
        replay([log[0], unpinned, log[2]])


RECORDED = sorted((Path(__file__).parent / "logs").glob("recorded-*.jsonl"))


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    "path",
    RECORDED,
    ids=[f"a real assigner's {p.stem.removeprefix('recorded-')} log replays" for p in RECORDED],
)
def test_a_recorded_log_of_a_real_assigner_replays_exactly(path: Path) -> None:
    # Recorded by tests/scheduler/logs/record.py (re-run it when the event format changes).
    log = read(path)
    scheduler = replay(log)
    assert scheduler.policy.name == log[0]["policy"]
    grants = [e for e in log if e["event"] == "grant"]
    assert len(grants) == len([e for e in log if e["event"] == "request"]) > 10
    assert any(e["event"] == "disconnect" and e["leases"] for e in log), "no killed holder"
    # The same log with one grant moved to another GPU no longer replays.
    position = log.index(grants[-1]) + 1
    other = [(grants[-1]["gpus"][0] + 1) % len(log[0]["gpus"])]
    with pytest.raises(ReplayMismatch, match=f"event {position} "):
        replay([*log[: position - 1], {**grants[-1], "gpus": other}, *log[position:]])


def test_there_is_a_recorded_log_for_every_policy() -> None:
    recorded = {read(p)[0]["policy"] for p in RECORDED}
    assert recorded == {*available_policies(), "gpu-sharing:pack"}


def test_a_gpu_sharing_log_from_before_spreading_replays_as_gpu_sharing_pack() -> None:
    """gpu-sharing packed (best fit) before issue 12; its logs replay with the packing variant,
    and no longer with gpu-sharing itself, which now puts a request on an idle GPU first."""
    log = read(Path(__file__).parent / "logs" / "before-spread-gpu-sharing.jsonl")
    assert log[0]["policy"] == "gpu-sharing"
    scheduler = replay(log, policy="gpu-sharing:pack")
    assert scheduler.policy.name == "gpu-sharing:pack"
    with pytest.raises(ReplayMismatch, match="the scheduler granted"):
        replay(log)
