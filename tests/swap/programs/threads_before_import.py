"""A thread started BEFORE `import torch` (a logger or heartbeat thread set up first) imports torch
itself and computes once the main thread has made its tensors."""

import threading
import time

ready = threading.Event()
results: list[float] = []


def work() -> None:
    ready.wait()
    import torch

    x = shared
    for i in range(20):
        x = torch.tanh(x @ weights)
        time.sleep(0.25 if i == 9 else 0.02)
    results.append(x.sum().item())


worker = threading.Thread(target=work)
worker.start()
time.sleep(0.05)

import torch  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(1)
shared = torch.randn(64, 64)
weights = torch.randn(64, 64) / 8
time.sleep(0.5)  # CPU phase: the worker still waits, every tensor is alive
ready.set()
worker.join()
time.sleep(0.3)  # CPU phase after the worker is done
print("worker", repr(results[0]))
print("main", repr((shared @ weights).sum().item()))
