"""A worker thread started after `import torch` computes on a shared tensor while the main thread
waits: a monitoring or prefetching thread beside the main loop."""

import threading
import time

import torch

torch.manual_seed(0)
torch.set_num_threads(1)

shared = torch.randn(64, 64)
weights = torch.randn(64, 64) / 8
results: list[torch.Tensor] = []


def work() -> None:
    x = shared
    for i in range(30):
        x = torch.tanh(x @ weights)
        # Two CPU phases inside the worker (the main thread sleeps too): the process goes idle.
        time.sleep(0.25 if i in (9, 19) else 0.02)
    results.append(x)


worker = threading.Thread(target=work)
worker.start()
time.sleep(0.6)  # CPU phase of the main thread while the worker computes
worker.join()
time.sleep(0.5)  # CPU phase with every tensor alive
print("worker", repr(results[0].sum().item()))
print("main", repr((shared @ weights).sum().item()))
