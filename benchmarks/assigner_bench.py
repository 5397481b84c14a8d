"""Benchmark of the assigner daemon against a raw gRPC baseline measured in the same run.

Measures, over a Unix socket on this machine:
  * handoff latency: holder A calls Release → waiter B's blocked Allocate returns (A and B are
    two threads of this process with their own sessions; one perf_counter clock), p50/p99;
  * uncontended pair latency: one client's Allocate + Release round trip, p50/p99;
  * grant+release pairs per second with 1, 10 and 100 concurrent clients (each client its own
    session and thread, spread over worker processes: 1x1, 2x5, 4x25);
  * SIGKILL of a holder process → the waiting process has the GPU (CLOCK_MONOTONIC);
  * server CPU time per RPC (from /proc), the figure load from elsewhere disturbs least;
  * the baseline: a trivial echo servicer (grpc.aio, same kind of socket, same protobuf sizes),
    unary round-trip p50/p99 and calls/s with the same client layouts.
Ratios compare a handoff (one message in, one out) with one echo round trip, and an assigner
pair (two RPCs) with two echo round trips.

    .venv/bin/python benchmarks/assigner_bench.py [--gpus 4] [--seconds 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from acb_slurm._proto.acb.v1 import assigner_pb2 as pb
from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.client import Client

ECHO_METHOD = "/bench.Echo/Echo"
LAYOUTS = {1: (1, 1), 10: (2, 5), 100: (4, 25)}  # clients: (processes, threads each)


# ---- the baseline server and its client ----


async def _serve_echo(socket_path: str) -> None:
    async def echo(request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ReleaseReply()

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo,
                request_deserializer=pb.ReleaseRequest.FromString,
                response_serializer=pb.ReleaseReply.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


class EchoClient:
    """A sync client of the echo server, shaped like the assigner client's unary calls."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.call = self.channel.unary_unary(
            ECHO_METHOD,
            request_serializer=pb.ReleaseRequest.SerializeToString,
            response_deserializer=pb.ReleaseReply.FromString,
        )
        self.request = pb.ReleaseRequest(session_id="s1-abcdef", lease_id="l1-abcdef")

    def once(self) -> None:
        self.call(self.request, timeout=30)

    def close(self) -> None:
        self.channel.close()


# ---- load workers (run as subprocesses of this script) ----


def _load_worker(kind: str, target: str, threads: int, seconds: float) -> None:
    """Open `threads` clients, say ready, wait for 'go' on stdin, loop, print the count."""
    if kind == "assigner":
        clients: list[Any] = [Client(target=target, token="") for _ in range(threads)]
        for client in clients:
            client.session_id  # noqa: B018 - open the session before the clock starts

        def step(client: Any) -> None:
            client.release(client.allocate())
    else:
        clients = [EchoClient(target) for _ in range(threads)]
        for client in clients:
            client.once()

        def step(client: Any) -> None:
            client.once()

    print("ready", flush=True)
    sys.stdin.readline()
    counts = [0] * threads
    stop_at = time.perf_counter() + seconds

    def loop(i: int) -> None:
        client = clients[i]
        while time.perf_counter() < stop_at:
            step(client)
            counts[i] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(json.dumps({"count": sum(counts)}), flush=True)
    for client in clients:
        client.close()


def throughput(kind: str, target: str, clients: int, seconds: float) -> float:
    """Operations per second (pairs for the assigner, calls for echo) of `clients` clients."""
    processes, threads = LAYOUTS[clients]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--load-worker", kind, target, str(threads), str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    total = 0
    for proc in procs:
        assert proc.stdout is not None
        total += json.loads(proc.stdout.readline())["count"]
        proc.wait(timeout=60)
    return total / seconds


# ---- latencies ----


def cpu_seconds(pid: int) -> float:
    """User+system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def timed(fn: Callable[[], None], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def handoff_latencies(target: str, n: int) -> list[float]:
    """A holds the only free GPU, B waits; time from A's Release call to B's grant returning."""
    a, b, watcher = (Client(target=target, token="") for _ in range(3))
    holder, waiter = a, b
    lease = holder.allocate()
    samples = []
    for _ in range(n):
        got: dict[str, Any] = {}

        def wait(client: Client = waiter, got: dict[str, Any] = got) -> None:
            got["lease"] = client.allocate()
            got["t"] = time.perf_counter()

        thread = threading.Thread(target=wait)
        thread.start()
        while not watcher.status().self.queue:  # B's request is queued: start the clock
            pass
        t0 = time.perf_counter()
        holder.release(lease)
        thread.join()
        samples.append(got["t"] - t0)
        lease = got["lease"]
        holder, waiter = waiter, holder
    holder.release(lease)
    for client in (a, b, watcher):
        client.close()
    return samples


HOLDER = """
import time
from acb_slurm.client import on_device_begin
print(on_device_begin().lease_id, flush=True)
time.sleep(60)
"""
WAITER = """
import sys, time
from acb_slurm.client import Client
client = Client()
client.session_id
print("ready", flush=True)
client.allocate()
print(time.clock_gettime(time.CLOCK_MONOTONIC), flush=True)
"""


def kill_to_grant(assigner: AssignerProcess, n: int) -> list[float]:
    """SIGKILL a holder process while another waits: seconds until the waiter has the GPU
    (CLOCK_MONOTONIC, shared by the processes of this machine)."""
    samples = []
    for _ in range(n):
        env = assigner.client_env()
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER], env=env, stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None
        holder.stdout.readline()  # it holds the only GPU
        waiter = subprocess.Popen(
            [sys.executable, "-c", WAITER], env=env, stdout=subprocess.PIPE, text=True
        )
        assert waiter.stdout is not None
        waiter.stdout.readline()
        with Client(target=assigner.target, token="") as watcher:
            deadline = time.monotonic() + 60
            while not watcher.status().self.queue:  # the waiter's request is queued
                assert time.monotonic() < deadline, "the waiter never queued"
                time.sleep(0.001)
        t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
        holder.kill()
        granted = float(waiter.stdout.readline())
        samples.append(granted - t0)
        holder.wait()
        waiter.wait()
    return samples


# ---- main ----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=4, help="virtual GPUs for the throughput runs")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each load run")
    parser.add_argument("--handoffs", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=3000, help="round trips for the latencies")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the runs")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLed holders to time")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so no server outlives the benchmark.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work = tempfile.mkdtemp(prefix="acb-bench-")
    echo_socket = os.path.join(work, "echo.sock")
    echo = subprocess.Popen(
        [sys.executable, __file__, "--serve-echo", echo_socket], stdout=subprocess.PIPE, text=True
    )
    assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
    results: dict[str, Any] = {
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    rounds = max(1, args.rounds)
    try:
        baseline = EchoClient(f"unix:{echo_socket}")
        timed(baseline.once, 200)
        echo_lat: list[float] = []
        handoffs: list[float] = []
        pairs: list[float] = []
        echo_cpu = assigner_cpu = 0.0
        with (
            AssignerProcess(os.path.join(work, "one"), gpus=1) as one,
            Client(target=one.target, token="") as client,
        ):
            assert one.proc is not None
            client.release(client.allocate())
            # Baseline and assigner take turns, so that load from elsewhere hits both alike.
            for _ in range(rounds):
                cpu0 = cpu_seconds(echo.pid)
                echo_lat += timed(baseline.once, args.calls // rounds)
                echo_cpu += cpu_seconds(echo.pid) - cpu0
                cpu0 = cpu_seconds(one.proc.pid)
                pairs += timed(lambda: client.release(client.allocate()), args.calls // rounds)
                assigner_cpu += cpu_seconds(one.proc.pid) - cpu0
                handoffs += handoff_latencies(one.target, args.handoffs // rounds)
            kills = kill_to_grant(one, args.kills)
        baseline.close()
        results["echo_p50_us"], results["echo_p99_us"] = (x * 1e6 for x in percentiles(echo_lat))
        results["echo_server_cpu_us"] = echo_cpu / len(echo_lat) * 1e6
        results["pair_p50_us"], results["pair_p99_us"] = (x * 1e6 for x in percentiles(pairs))
        results["assigner_cpu_us_per_rpc"] = assigner_cpu / (2 * len(pairs)) * 1e6
        results["handoff_p50_us"], results["handoff_p99_us"] = (
            x * 1e6 for x in percentiles(handoffs)
        )
        results["handoff_mean_us"] = statistics.fmean(handoffs) * 1e6
        results["kill_to_grant_ms_max"] = max(kills) * 1e3
        results["kill_to_grant_ms_median"] = statistics.median(kills) * 1e3

        with AssignerProcess(os.path.join(work, "many"), gpus=args.gpus) as many:
            for clients in LAYOUTS:
                # Best of `rounds` alternating runs: the least disturbed run of each.
                results[f"pairs_per_s_{clients}"] = results[f"echo_calls_per_s_{clients}"] = 0.0
                for _ in range(rounds):
                    results[f"pairs_per_s_{clients}"] = max(
                        results[f"pairs_per_s_{clients}"],
                        throughput("assigner", many.target, clients, args.seconds),
                    )
                    results[f"echo_calls_per_s_{clients}"] = max(
                        results[f"echo_calls_per_s_{clients}"],
                        throughput("echo", f"unix:{echo_socket}", clients, args.seconds),
                    )
    finally:
        echo.terminate()
        echo.wait()
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    echo_pair_p50 = 2 * r["echo_p50_us"]
    echo_pair_p99 = 2 * r["echo_p99_us"]
    print(f"# {r['machine']}; Python {r['python']}, grpcio {r['grpcio']}; {r['date']}")
    print(
        f"baseline echo round trip     p50 {r['echo_p50_us']:8.1f} us  "
        f"p99 {r['echo_p99_us']:8.1f} us"
    )
    print(
        f"handoff (release -> grant)   p50 {r['handoff_p50_us']:8.1f} us  "
        f"p99 {r['handoff_p99_us']:8.1f} us   = {r['handoff_p50_us'] / r['echo_p50_us']:.2f}x / "
        f"{r['handoff_p99_us'] / r['echo_p99_us']:.2f}x one echo round trip"
    )
    print(
        f"pair (allocate+release)      p50 {r['pair_p50_us']:8.1f} us  "
        f"p99 {r['pair_p99_us']:8.1f} us   = {r['pair_p50_us'] / echo_pair_p50:.2f}x / "
        f"{r['pair_p99_us'] / echo_pair_p99:.2f}x two echo round trips"
    )
    print(
        f"SIGKILLed holder -> waiter granted: median {r['kill_to_grant_ms_median']:.1f} ms, "
        f"max {r['kill_to_grant_ms_max']:.1f} ms over {args.kills} kills"
    )
    print(
        f"server CPU per RPC: assigner {r['assigner_cpu_us_per_rpc']:.0f} us, echo "
        f"{r['echo_server_cpu_us']:.0f} us = "
        f"{r['assigner_cpu_us_per_rpc'] / r['echo_server_cpu_us']:.2f}x"
    )
    for clients, (procs, threads) in LAYOUTS.items():
        pairs = r[f"pairs_per_s_{clients}"]
        calls = r[f"echo_calls_per_s_{clients}"]
        print(
            f"{clients:3d} clients ({procs} proc x {threads} threads, {args.gpus} GPUs): "
            f"{pairs:8.0f} pairs/s  vs echo {calls:8.0f} calls/s = {calls / 2:8.0f} pairs/s "
            f"-> ratio {pairs / (calls / 2):.2f}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-echo":
        asyncio.run(_serve_echo(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--load-worker":
        _load_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    else:
        main()
