"""What a gang grant costs next to a single local grant, in the same run.

Two real `acb-assigner` processes on this machine: the controller (node n1) and an executor
(node n2) joined to it over mutual TLS, 2 virtual GPUs each. Round by round, alternating, the real
client (`acb_slurm.client.Client`, sessions already open) measures:
  * local: Allocate + Release of one GPU at n2's assigner over its Unix socket (what a worker
    pays for a grant on its own node);
  * gang: two members (threads), one per node, join a new gang of 1 GPU per node at the
    controller over TCP+TLS, from the first join to the moment both are granted, then both leave.
    A gang grant is: the planner's decision, n1 taking its part locally and n2 taking its part on
    the controller's command (a round trip on the executor link), and the reply to both members.
It prints p50/p95 of each and gang ÷ local.

    .venv/bin/python benchmarks/gang_grant_bench.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from acb_slurm import env
from acb_slurm.assigner.testing import AssignerProcess, start_pool, wait_for
from acb_slurm.client import Client, GangLease

TOKEN = "bench-token"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def both_join(m1: Client, m2: Client, gang: str) -> tuple[GangLease, GangLease]:
    """Members on n1 and n2 join `gang` at once; returns when both are granted."""
    got: list[GangLease] = []
    other = threading.Thread(
        target=lambda: got.append(m2.join_gang(gang, 2, node="n2", timeout=10))
    )
    other.start()
    mine = m1.join_gang(gang, 2, node="n1", timeout=10)
    other.join()
    return mine, got[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="acb-gang-bench-") as tmp:

        def start(**options: object) -> AssignerProcess:
            return AssignerProcess(Path(tmp), name=str(options["node"]), **options).start()  # type: ignore[arg-type]

        n1, n2 = start_pool(start, tmp, TOKEN)
        os.environ[env.TLS_DIR] = n1.tls_dir or ""
        try:
            assert n1.tcp is not None
            with (
                Client(target=n2.target, token=TOKEN) as local,
                Client(target=n1.tcp, token=TOKEN) as m1,
                Client(target=n1.tcp, token=TOKEN) as m2,
            ):
                wait_for(lambda: local.status().role == "executor" and m1.status().executors)
                local_s, gang_s = [], []
                for round_ in range(args.rounds + 10):  # the first 10 warm up
                    start = time.perf_counter()
                    local.release(local.allocate(timeout=10))
                    local_time = time.perf_counter() - start

                    start = time.perf_counter()
                    on_n1, on_n2 = both_join(m1, m2, f"g{round_}")
                    gang_time = time.perf_counter() - start
                    m1.leave_gang(on_n1, 0)
                    m2.leave_gang(on_n2, 0)
                    if round_ >= 10:
                        local_s.append(local_time)
                        gang_s.append(gang_time)
        finally:
            n2.terminate()
            n1.terminate()
    print(
        f"# gang grant vs local grant: {args.rounds} rounds, {platform.node()}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    print(f"{'':24}{'p50 ms':>10}{'p95 ms':>10}{'mean ms':>10}")
    for name, values in (("local grant (unix)", local_s), ("gang grant, 2 nodes", gang_s)):
        print(
            f"{name:24}{1000 * pct(values, 0.5):10.2f}{1000 * pct(values, 0.95):10.2f}"
            f"{1000 * statistics.mean(values):10.2f}"
        )
    print(f"gang / local (p50): {pct(gang_s, 0.5) / pct(local_s, 0.5):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
