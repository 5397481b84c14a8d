"""What TLS adds to a grant over TCP (the path a process on another node takes to an assigner).

Two real `acb-assigner` processes, both listening on TCP at `--host` (default 127.0.0.1): one
with the job's TLS material (mutual TLS, `acb_slurm.tls`), one with `--insecure-tcp`. In the same
run, alternating between them round by round, the real client (`acb_slurm.client.Client`)
measures:
  * a grant round trip: Allocate + Release of one GPU on an open session, p50/p99;
  * a session open: a new Client, its channel, the TCP connection (and TLS handshake) and the
    Session stream's registration, p50/p99: what a new process pays once;
and, for reference, the same pair over the TLS assigner's Unix socket (what a local worker pays).
It prints TLS ÷ plaintext for each. A real network adds the same round-trip time to both sides,
so on loopback the ratio is the upper bound of TLS's relative cost.

    .venv/bin/python benchmarks/tls_grant_bench.py [--pairs 500] [--rounds 4] [--opens 40]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from acb_slurm import env, tls
from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.client import Client

TOKEN = "bench-token"


@contextmanager
def client_env(tls_dir: str | None) -> Iterator[None]:
    """ACB_TLS_DIR (TLS) or ACB_INSECURE_TCP=1 (plaintext) while a session opens."""
    saved = {k: os.environ.get(k) for k in (env.TLS_DIR, env.INSECURE_TCP)}
    os.environ.pop(env.TLS_DIR, None)
    os.environ.pop(env.INSECURE_TCP, None)
    if tls_dir is None:
        os.environ[env.INSECURE_TCP] = "1"
    else:
        os.environ[env.TLS_DIR] = tls_dir
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def open_client(target: str, tls_dir: str | None) -> Client:
    with client_env(tls_dir):
        client = Client(target=target, token=TOKEN, connect_timeout=10)
        client.session_id  # noqa: B018 - opens the session (and the connection) now
    return client


def pairs(client: Client, n: int) -> list[float]:
    """n Allocate + Release round trips, in microseconds each."""
    out = []
    for _ in range(n):
        start = time.perf_counter_ns()
        client.release(client.allocate(timeout=30))
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


def opens(target: str, tls_dir: str | None, n: int) -> list[float]:
    """n session opens from a new Client each (channel, connection, handshake, Register), µs."""
    out = []
    for _ in range(n):
        with client_env(tls_dir):
            client = Client(target=target, token=TOKEN, connect_timeout=10)
            start = time.perf_counter_ns()
            client.session_id  # noqa: B018
            out.append((time.perf_counter_ns() - start) / 1000)
        client.close()
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def line(name: str, values: list[float]) -> str:
    return f"{name:<34} p50 {pct(values, 0.5):8.0f} µs   p99 {pct(values, 0.99):8.0f} µs"


def alternate(rounds: int, runs: dict[str, Callable[[], list[float]]]) -> dict[str, list[float]]:
    """Run each measurement once per round, the order flipped every round."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            results[name].extend(runs[name]())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=500, help="grant round trips per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--opens", type=int, default=40, help="session opens per round")
    parser.add_argument("--host", default="127.0.0.1", help="address both assigners listen on")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="acb-tls-bench-") as scratch:
        material = tls.init(Path(scratch) / "tls", job="bench")
        secure = AssignerProcess(
            Path(scratch) / "secure", gpus=1, token=TOKEN, tcp=f"{args.host}:0",
            tls_dir=material.directory, name="tls",
        )  # fmt: skip
        plain = AssignerProcess(
            Path(scratch) / "plain", gpus=1, token=TOKEN, tcp=f"{args.host}:0",
            insecure_tcp=True, name="plain",
        )  # fmt: skip
        with secure, plain:
            assert secure.tcp and plain.tcp and secure.ready["tls"] and not plain.ready["tls"]
            tls_client = open_client(secure.tcp, material.directory)
            plain_client = open_client(plain.tcp, None)
            unix_client = open_client(secure.target, None)
            for client in (tls_client, plain_client, unix_client):
                pairs(client, 50)  # warm-up: first calls, allocator, caches
            grant = alternate(
                args.rounds,
                {
                    "tcp+tls": lambda: pairs(tls_client, args.pairs),
                    "tcp": lambda: pairs(plain_client, args.pairs),
                    "unix": lambda: pairs(unix_client, args.pairs),
                },
            )
            for client in (tls_client, plain_client, unix_client):
                client.close()
            session = alternate(
                args.rounds,
                {
                    "tcp+tls": lambda: opens(secure.tcp or "", material.directory, args.opens),
                    "tcp": lambda: opens(plain.tcp or "", None, args.opens),
                },
            )

    print(
        f"{platform.node()} · {os.cpu_count()} CPUs · load {os.getloadavg()[0]:.1f} · Python "
        f"{platform.python_version()} · grpcio {grpc.__version__} · TCP on {args.host} · "
        f"{args.rounds} rounds x {args.pairs} pairs, {args.opens} opens"
    )
    print(line("grant (Allocate+Release), TCP+TLS", grant["tcp+tls"]))
    print(line("grant (Allocate+Release), TCP", grant["tcp"]))
    print(line("grant (Allocate+Release), Unix", grant["unix"]))
    print(line("session open, TCP+TLS", session["tcp+tls"]))
    print(line("session open, TCP", session["tcp"]))
    for name, values in (("grant", grant), ("session open", session)):
        for q in (0.5, 0.99):
            ratio = pct(values["tcp+tls"], q) / pct(values["tcp"], q)
            print(f"TLS ÷ plaintext, {name} p{round(q * 100)}: {ratio:.2f}x")
    mean_extra = statistics.mean(grant["tcp+tls"]) - statistics.mean(grant["tcp"])
    print(f"TLS adds to a grant (mean): {mean_extra:.0f} µs")


if __name__ == "__main__":
    sys.exit(main())
