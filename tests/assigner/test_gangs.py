"""Gangs over real assigners: a controller and an executor (mutual TLS on loopback), members
as real clients (threads, or processes where their death is the point)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from acb_slurm.assigner.testing import AssignerProcess, start_pool, wait_for
from acb_slurm.assigner.testing import events_of as of
from acb_slurm.client import (
    AssignerError,
    Client,
    GangAborted,
    GangLease,
    GrantImpossible,
    InvalidGpuRequest,
    LeaseLost,
)
from acb_slurm.report.events import build_run
from acb_slurm.slurm.runtime import format_status

TOKEN = "job-token"
StartAssigner = Callable[..., AssignerProcess]


@pytest.fixture
def pool(start_assigner: StartAssigner, tmp_path: Path) -> tuple[AssignerProcess, AssignerProcess]:
    """Controller n1 and executor n2, 2 virtual GPUs each, joined."""
    return start_pool(start_assigner, tmp_path, TOKEN)


@pytest.fixture
def threads() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as pool:
        yield pool


def client(assigner: AssignerProcess, worker: str = "") -> Client:
    return Client(target=assigner.target, token=TOKEN, worker=worker)


def join(
    threads: ThreadPoolExecutor, member: Client, gang: str, node: str, **kw: Any
) -> Future[GangLease]:
    kw.setdefault("node_count", 2)
    kw.setdefault("timeout", 20)
    return threads.submit(member.join_gang, gang, node=node, **kw)


def gang_leases(assigner: AssignerProcess) -> list[Any]:
    """The leases on a node that hold gang parts."""
    with client(assigner) as probe:
        return [x for x in probe.status().self.leases if x.client.worker.startswith("gang:")]


def test_a_gang_is_granted_on_every_node_at_once(
    pool: tuple[AssignerProcess, AssignerProcess], threads: ThreadPoolExecutor
) -> None:
    n1, n2 = pool
    with client(n1, "a") as a, client(n1, "b") as b:
        first = join(threads, a, "train-r0", "n2", gpus_per_node=2)
        time.sleep(0.3)
        assert not first.done(), "granted before every member joined"
        with client(n1) as probe:
            (waiting,) = probe.status().gangs
            assert (waiting.state, list(waiting.members)) == ("collecting", ["n2"])
        second = join(threads, b, "train-r0", "n1", gpus_per_node=2)
        on_n2, on_n1 = first.result(10), second.result(10)
        # Ranks follow the pool's node order (the controller first); both see the same parts.
        assert (on_n1.node_rank, on_n2.node_rank) == (0, 1)
        assert on_n1.parts == on_n2.parts
        assert [(p.node, p.gpu_indices) for p in on_n1.parts] == [("n1", (0, 1)), ("n2", (0, 1))]
        assert on_n2.device_ids == ("0", "1") and on_n2.node == "n2"
        assert on_n1.master_addr == on_n2.master_addr == "127.0.0.1"
        assert on_n1.master_port == on_n2.master_port > 0
        # Each node holds its part as leases of worker gang:<name>.
        assert len(gang_leases(n1)) == 2 and len(gang_leases(n2)) == 2
        with client(n1) as probe:
            reply = probe.status()
            (granted,) = reply.gangs
            assert granted.state == "granted" and len(granted.parts) == 2
            shown = format_status([("n1", reply)])
            assert "train-r0: granted" in shown and "n1 gpu 0,1, n2 gpu 0,1" in shown
        a.leave_gang(on_n2, 0)
        wait_for(lambda: not gang_leases(n2), what="n2's part to go back")
        assert len(gang_leases(n1)) == 2  # the other member still runs
        b.release(on_n1)  # release() of a gang lease leaves it with status 0
        wait_for(lambda: not gang_leases(n1), what="n1's part to go back")
        with client(n1) as probe:
            assert not probe.status().gangs
    assert of(n1.events(), "gang_end", gang="train-r0", failed=False)
    # The report shows the gang as one row holding GPUs on both nodes.
    run = build_run([n1.event_log, n2.event_log])
    held = {(h.node, h.gpus) for h in run.holdings if h.worker == "gang:train-r0"}
    assert held == {("n1", (0,)), ("n1", (1,)), ("n2", (0,)), ("n2", (1,))}
    assert run.workers.count("gang:train-r0") == 1


def test_a_part_waits_for_local_holders_and_local_work_backfills_meanwhile(
    pool: tuple[AssignerProcess, AssignerProcess], threads: ThreadPoolExecutor
) -> None:
    n1, n2 = pool
    with (
        client(n2, "local-1") as local1,
        client(n2, "local-2") as local2,
        client(n2, "late") as late,
        client(n1) as a,
        client(n1) as b,
    ):
        held1, held2 = local1.allocate(timeout=5), local2.allocate(timeout=5)
        on_n1 = join(threads, a, "g", "n1")
        on_n2 = join(threads, b, "g", "n2")
        wait_for(lambda: len(gang_leases(n1)) == 1, what="n1's part")
        time.sleep(0.3)
        assert not on_n1.done() and not on_n2.done(), "granted while n2's GPUs were busy"
        # A local request queued after the part is served after it, on the GPU freed next.
        later = threads.submit(late.allocate, timeout=20)
        local1.release(held1)
        grant = on_n2.result(10)
        assert grant.gpu_indices == held1.gpu_indices
        on_n1.result(10)
        time.sleep(0.2)
        assert not later.done(), "a local request went ahead of the gang's part"
        local2.release(held2)
        assert later.result(10).gpu_indices == held2.gpu_indices
        a.leave_gang(on_n1.result(), 0)
        b.leave_gang(grant, 0)


def test_a_failed_member_ends_the_gang_on_every_node_within_a_second(
    pool: tuple[AssignerProcess, AssignerProcess], threads: ThreadPoolExecutor
) -> None:
    n1, n2 = pool
    with client(n1) as a, client(n1) as b:
        lost = threading.Event()
        told: list[LeaseLost] = []

        def on_lost(lease: Any, error: LeaseLost) -> None:
            told.append(error)
            lost.set()

        b.on_lease_lost(on_lost)
        on_n1, on_n2 = join(threads, a, "g", "n1"), join(threads, b, "g", "n2")
        mine, other = on_n1.result(10), on_n2.result(10)
        started = time.monotonic()
        a.leave_gang(mine, 3, "rank 0 died")
        assert lost.wait(1.0), "the other member was not told within 1 s"
        wait_for(lambda: not gang_leases(n1) and not gang_leases(n2), timeout=1.0)
        assert time.monotonic() - started < 1.5
        assert "exit status 3" in str(told[0]) and "rank 0 died" in str(told[0])
        with pytest.raises(LeaseLost):
            b.leave_gang(other, 0)
    assert of(n1.events(), "gang_end", gang="g", failed=True)


MEMBER = """
import sys, time
from acb_slurm.client import Client
with Client(target=sys.argv[1], token="job-token") as c:
    lease = c.join_gang("g", 2, node=sys.argv[2], timeout=30)
    print("granted", flush=True)
    time.sleep(60)
"""


def test_a_dead_member_process_ends_the_gang(
    pool: tuple[AssignerProcess, AssignerProcess], threads: ThreadPoolExecutor
) -> None:
    n1, n2 = pool
    member = subprocess.Popen(
        [sys.executable, "-c", MEMBER, n1.target, "n2"], stdout=subprocess.PIPE, text=True
    )
    try:
        with client(n1) as a:
            lost = threading.Event()
            a.on_lease_lost(lambda lease, error: lost.set())
            mine = join(threads, a, "g", "n1").result(15)
            assert member.stdout is not None and member.stdout.readline() == "granted\n"
            member.send_signal(signal.SIGKILL)
            assert lost.wait(2.0)
            wait_for(lambda: not gang_leases(n1) and not gang_leases(n2), timeout=2.0)
            with pytest.raises(LeaseLost, match="session closed"):
                a.leave_gang(mine, 0)
    finally:
        member.kill()
        member.wait()


def test_a_member_that_dies_before_the_grant_aborts_the_others(
    pool: tuple[AssignerProcess, AssignerProcess], threads: ThreadPoolExecutor
) -> None:
    n1, _ = pool
    with client(n1) as a, client(n1) as b:
        waiting = join(threads, a, "g", "n1", node_count=3)
        join(threads, b, "g", "n2", node_count=3)
        with client(n1) as probe:
            wait_for(lambda: [sorted(g.members) for g in probe.status().gangs] == [["n1", "n2"]])
        b.close()
        with pytest.raises(GangAborted, match="member on node n2 ended"):
            waiting.result(5)


def test_an_executor_that_dies_fails_its_gangs_and_the_job_goes_on(
    pool: tuple[AssignerProcess, AssignerProcess], threads: ThreadPoolExecutor
) -> None:
    n1, n2 = pool
    with client(n1) as a, client(n1) as b:
        lost = threading.Event()
        reasons: list[str] = []
        a.on_lease_lost(lambda lease, error: (reasons.append(error.reason), lost.set()))
        on_n1, on_n2 = join(threads, a, "g", "n1"), join(threads, b, "g", "n2")
        mine, _ = on_n1.result(10), on_n2.result(10)
        n2.kill()
        assert lost.wait(20), "the controller did not notice the executor's death"
        assert reasons == ["node n2's assigner went away"]
        wait_for(lambda: not gang_leases(n1), timeout=2.0)
        with pytest.raises(LeaseLost):
            a.leave_gang(mine, 0)
        # The rest of the job goes on: a one-node gang and local work on the controller.
        alone = a.join_gang("solo", 1, node="n1", gpus_per_node=2, timeout=10)
        a.leave_gang(alone, 0)


def test_a_dead_controller_ends_the_members_and_frees_the_executors(
    pool: tuple[AssignerProcess, AssignerProcess], threads: ThreadPoolExecutor
) -> None:
    n1, n2 = pool
    with client(n1) as a, client(n1) as b:
        lost = threading.Event()
        b.on_lease_lost(lambda lease, error: lost.set())
        join(threads, a, "g", "n1")
        join(threads, b, "g", "n2").result(10)
        assert len(gang_leases(n2)) == 1
        n1.kill()
        assert lost.wait(5), "the member was not told that the controller died"
        wait_for(lambda: not gang_leases(n2), timeout=5, what="n2 to drop its part")
        with client(n2) as local:  # n2 goes on serving its own workers, on both GPUs
            leases = [local.allocate(timeout=5), local.allocate(timeout=5)]
            assert sorted(x.gpu_indices for x in leases) == [(0,), (1,)]


def test_two_gangs_that_each_need_most_of_the_pool_both_finish(
    pool: tuple[AssignerProcess, AssignerProcess], threads: ThreadPoolExecutor
) -> None:
    """Interleaved joins of two gangs that each need every GPU: one is granted whole, the other
    waits holding nothing, then gets everything."""
    n1, _ = pool
    members = {(g, n): client(n1, f"{g}-{n}") for g in "AB" for n in ("n1", "n2")}
    try:
        futures = {
            key: join(threads, members[key], key[0], key[1], gpus_per_node=2, timeout=30)
            for key in [("A", "n1"), ("B", "n2"), ("B", "n1"), ("A", "n2")]
        }
        done = 0
        for _ in range(2):
            granted = wait_for(
                lambda: [k for k, f in futures.items() if f.done()], what="a gang's grant"
            )
            gangs = {g for g, _ in granted}
            assert len(gangs) == 1, f"two gangs hold GPUs at once: {granted}"
            (gang,) = gangs
            for key in [(gang, "n1"), (gang, "n2")]:
                members[key].leave_gang(futures.pop(key).result(10), 0)
            done += 1
        assert done == 2 and not futures
    finally:
        for member in members.values():
            member.close()


def test_members_that_disagree_or_cannot_fit_are_refused(
    pool: tuple[AssignerProcess, AssignerProcess], threads: ThreadPoolExecutor
) -> None:
    n1, n2 = pool
    with client(n1) as a, client(n1) as b, client(n1) as c, client(n2) as on_executor:
        first = join(threads, a, "g", "n1")
        with client(n1) as probe:
            wait_for(lambda: probe.status().gangs)
        with pytest.raises(InvalidGpuRequest, match="every member must ask the same"):
            b.join_gang("g", 2, gpus_per_node=2, node="n2", timeout=5)
        with pytest.raises(GrantImpossible, match="already has a member on node"):
            b.join_gang("g", 2, node="n1", timeout=5)
        with pytest.raises(GrantImpossible, match="has 2"):
            c.join_gang("big", 2, gpus_per_node=3, node="n1", timeout=5)
        with pytest.raises(GrantImpossible, match="executor"):
            on_executor.join_gang("g", 2, node="n2", timeout=5)
        b.join_gang("g", 2, node="n2", timeout=10)
        first.result(10)


def test_a_member_on_a_node_outside_the_pool_waits_and_status_says_why(
    pool: tuple[AssignerProcess, AssignerProcess], threads: ThreadPoolExecutor
) -> None:
    n1, _ = pool
    with client(n1) as a, client(n1) as probe:
        stray = join(threads, a, "g", "n9", node_count=1, timeout=2)
        wait_for(lambda: probe.status().gangs, what="the gang")
        shown = format_status([("n1", probe.status())])
        assert "waiting for the assigner of node(s) n9 to join the controller" in shown, shown
        with pytest.raises(TimeoutError, match="not granted within 2s"):
            stray.result(10)
        wait_for(lambda: not probe.status().gangs, what="the gang to fail with its member")


def test_a_controller_that_stops_with_a_gang_granted_and_one_waiting_stops_cleanly(
    pool: tuple[AssignerProcess, AssignerProcess], threads: ThreadPoolExecutor
) -> None:
    n1, n2 = pool
    with client(n1) as a, client(n1) as b, client(n1) as c, client(n1) as d:
        first = [join(threads, m, "A", node, gpus_per_node=2) for m, node in ((a, "n1"), (b, "n2"))]
        [f.result(10) for f in first]
        waiting = [
            join(threads, m, "B", node, gpus_per_node=2) for m, node in ((c, "n1"), (d, "n2"))
        ]
        with client(n1) as probe:
            wait_for(lambda: {g.gang: g.state for g in probe.status().gangs}.get("B") == "waiting")
        assert n1.terminate() == 0, n1.stderr_text()
        for future in waiting:
            with pytest.raises(AssignerError):  # aborted, or the session ended first
                future.result(10)
    assert of(n1.events(), "stop"), n1.stderr_text()
    # (gRPC may log the cancelled JoinGang coroutines; nothing of the daemon's own failed.)
    assert "acb_slurm/assigner" not in n1.stderr_text(), n1.stderr_text()
    wait_for(lambda: not gang_leases(n2), timeout=10, what="n2 to drop A's parts")
