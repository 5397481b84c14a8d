"""A demo worker: three rounds of a CPU phase, then a GPU phase on a GPU lent by the assigner.

Run by scripts/demo under Slurm (examples/demo/job.yaml); it uses the manual API, so the GPU is
held only inside `with on_device()`.
"""

import os
import time

from acb_slurm import on_device

worker = os.environ.get("ACB_WORKER", "worker")
for round_ in range(1, 4):
    time.sleep(1.5)  # the CPU phase: no GPU held
    with on_device(timeout=120) as lease:
        started = time.monotonic()
        time.sleep(0.5)  # the GPU phase
        print(
            f"{worker}: round {round_}: GPU {','.join(lease.device_ids)} on {lease.node}, "
            f"waited {lease.waited_seconds:.2f}s, held {time.monotonic() - started:.2f}s",
            flush=True,
        )
print(f"{worker}: done", flush=True)
