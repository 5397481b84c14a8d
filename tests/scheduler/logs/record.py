"""Re-record the real event logs the replay tests check (recorded-*.jsonl in this folder).

Runs a real acb-assigner per policy with virtual GPUs, real client processes contending for them
(some pinned, as a swapping process is, to the GPUs of their first grant) and one holder killed
with SIGKILL (a disconnect), then copies each event log here:

    .venv/bin/python tests/scheduler/logs/record.py [POLICY ...]   # default: all

`before-spread-gpu-sharing.jsonl` is the gpu-sharing log recorded before placement spread over
idle GPUs (issue 12); it is kept, not re-recorded: it replays under `gpu-sharing:pack`.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from acb_slurm.assigner.testing import AssignerProcess

HERE = Path(__file__).parent

WORKER = """
import sys, time
from acb_slurm.client import on_device
rounds, hold, gpus, mem = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pin = sys.argv[5] == "pin"  # later rounds come back to the GPUs of the first grant
required = None
for _ in range(rounds):
    with on_device(
        gpus=gpus, memory=None if mem == "0" else mem, label="contend", required_gpus=required
    ) as lease:
        time.sleep(hold)
    if pin and required is None:
        required = lease.gpu_indices
    time.sleep(0.005)
"""

HOLDER = """
import time
from acb_slurm.client import on_device_begin
on_device_begin(label="holder")
time.sleep(600)
"""


def wait(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no progress in {timeout}s")
        time.sleep(0.05)


def record(name: str, policy: str, gpus: int, workers: list[tuple[int, str, str]]) -> None:
    """Run one contention under `policy`; `workers` are (GPU count, memory or "0", "pin" or
    "any") triples."""
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory() as directory:
        assigner = AssignerProcess(directory, gpus=gpus, policy=policy, gpu_memory="40GiB")
        assigner.start()
        try:
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLDER],
                env=assigner.client_env(ACB_WORKER="holder"),
                stdout=subprocess.DEVNULL,
                text=True,
            )
            procs.append(holder)
            wait(lambda: any(e["event"] == "grant" for e in assigner.events()))
            for i, (count, memory, pin) in enumerate(workers):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", WORKER, "3", "0.02", str(count), memory, pin],
                        env=assigner.client_env(ACB_WORKER=f"w{i}"),
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
            time.sleep(0.3)
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            for proc in procs[1:]:
                _, err = proc.communicate(timeout=120)
                if proc.returncode != 0:
                    raise RuntimeError(f"a worker failed: {err[-2000:]}")
        finally:
            assigner.terminate()
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        shutil.copy(assigner.event_log, HERE / name)
    print(f"recorded {HERE / name}")


SHARING = [
    (1, "10GiB", "pin"),
    (1, "30GiB", "any"),
    (1, "0", "pin"),
    (1, "20GiB", "any"),
    (2, "10GiB", "any"),
]


def main() -> None:
    """Record every log, or only those of the policies named on the command line."""
    runs: dict[str, Callable[[], None]] = {
        "simple": lambda: record(
            "recorded-simple.jsonl", "simple", 2, [(1, "0", "any")] * 3 + [(1, "0", "pin")] * 2
        ),
        "gpu-sharing": lambda: record("recorded-gpu-sharing.jsonl", "gpu-sharing", 2, SHARING),
        "gpu-sharing:pack": lambda: record(
            "recorded-gpu-sharing-pack.jsonl", "gpu-sharing:pack", 2, SHARING
        ),
        "gpu-affinity": lambda: record(
            "recorded-gpu-affinity.jsonl",
            "gpu-affinity",
            3,
            [(2, "0", "pin"), (1, "0", "any"), (3, "0", "any"), (1, "0", "pin")],
        ),
    }
    for policy in sys.argv[1:] or runs:
        runs[policy]()


if __name__ == "__main__":
    main()
