"""Benchmark: what a long queue of waiters that cannot be placed costs the scheduler core.

The scene (2 GPUs of 80 GiB, policy simple, max_bypass 8): a holder keeps GPU 0; N waiters
(default 5,000, one client) are pinned to GPU 0 (`required_gpus=(0,)`, as swapping workers are),
so none can be placed; a probe client asks for one GPU at priority 1, gets GPU 1 and gives it back,
again and again. Measured per call (perf_counter):

  * submit of each of the N waiters (total, mean, p99);
  * the probe's grant latency (its submit, which returns its grant) and its submit+release pair,
    p50/p99, with 0 waiters and with N waiters, in alternating rounds; the ratio with/without;
  * withdraw of each of the N waiters (total, mean, p99).

A second scene (default 1,000 waiters) gives every waiter a shape of its own: under gpu-sharing,
each asks its own memory (1 GiB + i bytes), still pinned to GPU 0. Without shapes to share, a
release still need not try them: none of their GPUs was freed.

The probe asks at priority 1 because at equal priority it would go past every waiter, and after
`max_bypass` such grants the first waiter holds a reservation and the probe waits for GPU 0, as
designed (FIFO with bounded backfill); a higher-priority probe is served first by the rules, so
all it measures is what the queue costs.

Both cores run on the same scene, in alternation: `new` (acb_slurm.scheduler, waiters indexed by
shape) and `reference` (tests/scheduler/reference_core.py, the core before: every call walks the
queue). With `--assigner`, the same scene also runs through real acb-assigner processes over gRPC
(one per core; the waiters are Allocate calls in flight on one session, the probe a
`Client.allocate(priority=1)` + `release`). The waiters' Allocate calls go out 500 at a time,
each batch once the previous one has queued: sent in one burst, about 2,000 of 5,000 end
CANCELLED in gRPC before they reach the daemon.

    .venv/bin/python benchmarks/scheduler_queue_bench.py [--waiters 5000] [--probes 2000]
        [--rounds 2] [--distinct-waiters 1000] [--distinct-probes 400] [--cores new,reference]
        [--assigner] [--assigner-waiters 5000] [--assigner-probes 1000] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from acb_slurm.scheduler import Gpu, Request
from acb_slurm.scheduler import Scheduler as NewScheduler

GiB = 1024**3
ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "scheduler" / "reference_core.py"


def reference_scheduler() -> type:
    spec = importlib.util.spec_from_file_location("acb_reference_core", REFERENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Scheduler  # type: ignore[no-any-return]


# Allocate calls sent at once through gRPC before waiting for them to queue: in one burst of
# 5,000 about 2,000 ended CANCELLED before they reached the daemon.
BATCH = 500

# Runs acb-assigner with its scheduler swapped for the reference core (the "before").
REFERENCE_LAUNCHER = """\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("acb_reference_core", {path!r})
module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
import acb_slurm.scheduler, acb_slurm.scheduler.core
acb_slurm.scheduler.Scheduler = acb_slurm.scheduler.core.Scheduler = module.Scheduler
from acb_slurm.assigner.cli import main
main()
"""


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def us(seconds: float) -> float:
    return seconds * 1e6


# ---- the pure core ----


def core_round(
    make: Callable[..., Any], waiters: int, probes: int, distinct: bool = False
) -> dict[str, list[float]]:
    """One round: idle probes, N submits, busy probes, N withdraws. Seconds per call.
    `distinct`: under gpu-sharing, each waiter asks its own memory (each its own shape)."""
    policy = "gpu-sharing" if distinct else "simple"
    scheduler = make([Gpu(i, 80 * GiB, str(i)) for i in range(2)], policy, 8)
    (held,) = scheduler.submit(Request("holder", "h"))
    assert held.gpu_indices == (0,), held
    out: dict[str, list[float]] = {
        "idle_grant": [],
        "idle_pair": [],
        "busy_grant": [],
        "busy_pair": [],
        "submit": [],
        "withdraw": [],
    }
    clock = time.perf_counter

    def probe(kind: str, n: int, start: int) -> None:
        grants_out, pairs_out = out[f"{kind}_grant"], out[f"{kind}_pair"]
        for i in range(start, start + n):
            rid = f"p{i}"
            t0 = clock()
            grants = scheduler.submit(Request(rid, "probe", priority=1))
            t1 = clock()
            scheduler.release(rid)
            t2 = clock()
            assert grants and grants[0].request_id == rid and grants[0].gpu_indices == (1,)
            grants_out.append(t1 - t0)
            pairs_out.append(t2 - t0)

    probe("idle", probes, 0)
    submits = out["submit"]
    for i in range(waiters):
        memory = GiB + i if distinct else 0
        request = Request(f"w{i}", "flood", memory_bytes=memory, required_gpus=(0,))
        t0 = clock()
        grants = scheduler.submit(request)
        submits.append(clock() - t0)
        assert not grants
    assert len(scheduler.queue) == waiters
    probe("busy", probes, probes)
    withdraws = out["withdraw"]
    for i in range(waiters):
        t0 = clock()
        grants = scheduler.withdraw(f"w{i}")
        withdraws.append(clock() - t0)
        assert not grants
    assert not scheduler.queue
    return out


def core_figures(
    cores: dict[str, Callable[..., Any]], waiters: int, probes: int, rounds: int, distinct: bool
) -> dict[str, Any]:
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in cores}
    for _ in range(rounds):
        for name, make in cores.items():  # alternating, so load from elsewhere hits both alike
            gc.collect()
            for key, values in core_round(make, waiters, probes // rounds, distinct).items():
                samples[name].setdefault(key, []).extend(values)
    figures: dict[str, Any] = {}
    for name, s in samples.items():
        f: dict[str, float] = {}
        for key in ("submit", "withdraw"):
            f[f"{key}_total_s"] = sum(s[key]) / rounds
            f[f"{key}_mean_us"] = us(statistics.fmean(s[key]))
            f[f"{key}_p99_us"] = us(percentiles(s[key])[1])
        for key in ("idle_grant", "idle_pair", "busy_grant", "busy_pair"):
            p50, p99 = percentiles(s[key])
            f[f"{key}_p50_us"], f[f"{key}_p99_us"] = us(p50), us(p99)
        f["grant_p99_ratio"] = f["busy_grant_p99_us"] / f["idle_grant_p99_us"]
        f["pair_p99_ratio"] = f["busy_pair_p99_us"] / f["idle_pair_p99_us"]
        figures[name] = f
    return figures


def report_core(figures: dict[str, Any], n: int, title: str) -> None:
    print(f"## pure core: {n} {title}")
    for name, f in figures.items():
        print(f"[{name}]")
        for key in ("submit", "withdraw"):
            print(
                f"  {key:8s} of {n} waiters: {f[f'{key}_total_s']:8.3f} s in all, "
                f"mean {f[f'{key}_mean_us']:8.1f} us, p99 {f[f'{key}_p99_us']:8.1f} us"
            )
        for key, what in (("grant", "grant (submit)"), ("pair", "submit+release")):
            print(
                f"  probe {what:15s} p50/p99 idle {f[f'idle_{key}_p50_us']:7.1f} / "
                f"{f[f'idle_{key}_p99_us']:7.1f} us, with {n} waiting "
                f"{f[f'busy_{key}_p50_us']:8.1f} / {f[f'busy_{key}_p99_us']:8.1f} us "
                f"-> p99 ratio {f[f'{key}_p99_ratio']:.2f}x"
            )


# ---- through a real acb-assigner ----


class RawSession:
    """A session opened on the wire, its Session stream kept open, for Allocate calls left in
    flight (the client library's `allocate` blocks until granted)."""

    def __init__(self, target: str) -> None:
        import grpc

        from acb_slurm._proto.acb.v1 import assigner_pb2 as pb
        from acb_slurm._proto.acb.v1 import assigner_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.AssignerStub(self.channel)
        self.outgoing: queue.SimpleQueue[Any] = queue.SimpleQueue()
        identity = pb.ClientIdentity(
            client_id=f"bench-flood-{os.getpid()}",
            worker="flood",
            pid=os.getpid(),
            hostname=socket.gethostname(),
        )

        def messages() -> Iterator[Any]:
            yield pb.ClientMessage(register=identity)
            while (message := self.outgoing.get()) is not None:
                yield message

        self.call = self.stub.Session(messages())
        registered = next(self.call).registered
        self.session_id = registered.session_id
        self.session_key = getattr(registered, "session_key", "")  # where the daemon has one

    def allocate(self, **fields: Any) -> Any:
        """An Allocate call in flight (a grpc future)."""
        if self.session_key:
            fields["session_key"] = self.session_key
        request = self.pb.AllocRequest(session_id=self.session_id, **fields)
        return self.stub.Allocate.future(request)

    def close(self) -> None:
        self.outgoing.put(None)
        self.call.cancel()
        self.channel.close()


def assigner_round(core: str, args: argparse.Namespace, directory: str) -> dict[str, list[float]]:
    """One round against a fresh daemon: idle probes, queue the waiters, busy probes, cancel
    them. A fresh daemon each round: calls cancelled in one round were seen to keep the next
    from getting as many calls in flight."""
    import grpc

    from acb_slurm.assigner.testing import AssignerProcess, assigner_command
    from acb_slurm.client import Client

    assigner = AssignerProcess(directory, gpus=2, name=core)
    if core == "reference":  # the same daemon, its scheduler swapped for the reference core
        launcher = REFERENCE_LAUNCHER.format(path=str(REFERENCE))
        command = assigner_command()
        assigner.args = [sys.executable, "-c", launcher, *assigner.args[len(command) :]]
    kinds = ("idle_grant", "busy_grant", "idle_pair", "busy_pair", "submit_all", "withdraw_all")
    out: dict[str, list[float]] = {kind: [] for kind in kinds}
    with (
        assigner,
        Client(target=assigner.target, token="") as holder,
        Client(target=assigner.target, token="") as probe,
    ):
        flood = RawSession(assigner.target)
        held = holder.allocate()
        assert list(held.gpu_indices) == [0], held

        def waiting() -> int:
            node = probe.status(timeout=300).self  # the reference daemon can be busy long
            return len(node.queue) + getattr(node, "queue_omitted", 0)

        def probes(kind: str) -> None:
            for _ in range(args.assigner_probes // max(1, args.rounds)):
                t0 = time.perf_counter()
                lease = probe.allocate(priority=1)
                t1 = time.perf_counter()
                probe.release(lease)
                t2 = time.perf_counter()
                assert list(lease.gpu_indices) == [1], lease
                out[f"{kind}_grant"].append(t1 - t0)
                out[f"{kind}_pair"].append(t2 - t0)

        waiters = args.assigner_waiters
        probes("idle")
        t0 = time.perf_counter()
        calls: list[Any] = []
        while len(calls) < waiters:  # in batches: a burst of thousands is partly cancelled
            batch = min(BATCH, waiters - len(calls))
            calls += [flood.allocate(gpu_count=1, required_gpu_indices=[0]) for _ in range(batch)]
            sent = len(calls)
            wait_for_queue(waiting, lambda n, sent=sent: n >= sent, f"{sent} waiters")
        out["submit_all"].append(time.perf_counter() - t0)
        probes("busy")
        t0 = time.perf_counter()
        for call in calls:
            call.cancel()
        wait_for_queue(waiting, lambda n: n == 0, "an empty queue")
        out["withdraw_all"].append(time.perf_counter() - t0)
        for call in calls:
            try:
                call.result(timeout=10)
            except grpc.FutureCancelledError:
                pass
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.CANCELLED, exc
        flood.close()
        holder.release(held)
    return out


def assigner_figures(names: list[str], args: argparse.Namespace, work: str) -> dict[str, Any]:
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for n in range(max(1, args.rounds)):
        for name in names:  # alternating, so load from elsewhere hits both alike
            directory = os.path.join(work, f"{name}-{n}")
            for key, values in assigner_round(name, args, directory).items():
                samples[name].setdefault(key, []).extend(values)
    figures: dict[str, Any] = {}
    for name, s in samples.items():
        f: dict[str, Any] = {
            "submit_all_s": statistics.fmean(s.pop("submit_all")),
            "withdraw_all_s": statistics.fmean(s.pop("withdraw_all")),
        }
        for key, values in s.items():
            p50, p99 = percentiles(values)
            f[f"{key}_p50_us"], f[f"{key}_p99_us"] = us(p50), us(p99)
        f["grant_p99_ratio"] = f["busy_grant_p99_us"] / f["idle_grant_p99_us"]
        f["pair_p99_ratio"] = f["busy_pair_p99_us"] / f["idle_pair_p99_us"]
        figures[name] = f
    return figures


def wait_for_queue(waiting: Callable[[], int], done: Callable[[int], bool], what: str) -> None:
    """Poll the assigner's queue length until `done`; fail when it stops moving for 20 s."""
    last, since = -1, time.monotonic()
    while not done(n := waiting()):
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 20:
            raise RuntimeError(f"waiting for {what}: the assigner's queue stays at {n}")
        time.sleep(0.05)


def report_assigner(figures: dict[str, Any], args: argparse.Namespace) -> None:
    n = args.assigner_waiters
    print(f"## acb-assigner over gRPC: {n} Allocate calls pinned to the held GPU in flight")
    for name, f in figures.items():
        print(
            f"[{name}] {n} Allocates queued in {f['submit_all_s']:.2f} s, "
            f"all cancelled and withdrawn in {f['withdraw_all_s']:.2f} s"
        )
        for key, what in (("grant", "allocate"), ("pair", "allocate+release")):
            print(
                f"  probe {what:16s} p50/p99 idle {f[f'idle_{key}_p50_us']:7.0f} / "
                f"{f[f'idle_{key}_p99_us']:7.0f} us, with {n} waiting "
                f"{f[f'busy_{key}_p50_us']:8.0f} / {f[f'busy_{key}_p99_us']:8.0f} us "
                f"-> p99 ratio {f[f'{key}_p99_ratio']:.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--waiters", type=int, default=5000)
    parser.add_argument("--probes", type=int, default=2000, help="core probes per setting")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the settings")
    parser.add_argument("--cores", default="new,reference", help="comma-separated: new,reference")
    parser.add_argument(
        "--distinct-waiters", type=int, default=1000, help="waiters of distinct shapes (0: skip)"
    )
    parser.add_argument("--distinct-probes", type=int, default=400)
    parser.add_argument("--assigner", action="store_true", help="also through acb-assigner")
    parser.add_argument("--assigner-probes", type=int, default=1000, help="gRPC probes per setting")
    parser.add_argument(
        "--assigner-waiters", type=int, default=5000, help="Allocate calls in flight"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    known = {"new": lambda: NewScheduler, "reference": reference_scheduler}
    names = [c.strip() for c in args.cores.split(",") if c.strip()]
    unknown = [c for c in names if c not in known]
    if unknown:
        parser.error(f"unknown core(s) {unknown}; known: {sorted(known)}")
    cores = {name: known[name]() for name in names}
    results: dict[str, Any] = {
        "machine": f"{platform.node()}: {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(args),
    }
    print(
        f"# {results['machine']}; Python {results['python']}; {results['date']}; "
        f"load average {results['load_average'][0]:.1f}"
    )
    rounds = max(1, args.rounds)
    results["core"] = core_figures(cores, args.waiters, args.probes, rounds, distinct=False)
    title = "waiters pinned to a held GPU (simple), probe at priority 1 on the free GPU"
    report_core(results["core"], args.waiters, title)
    if args.distinct_waiters > 0:
        n, probes = args.distinct_waiters, args.distinct_probes
        results["core_distinct"] = core_figures(cores, n, probes, rounds, distinct=True)
        title = "waiters pinned to a held GPU, each its own shape (gpu-sharing, memory 1 GiB + i)"
        report_core(results["core_distinct"], n, title)
    if args.assigner:
        work = tempfile.mkdtemp(prefix="acb-qbench-")
        try:
            results["assigner"] = assigner_figures(names, args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report_assigner(results["assigner"], args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
