"""A small MLP run through `torch.compile` (aot_eager backend) for a few steps with CPU phases
between them, as in an evaluation loop that waits for data."""

import time

import torch
import torch._dynamo.utils

torch.manual_seed(0)
torch.set_num_threads(1)

model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
compiled = torch.compile(model, backend="aot_eager")
x = torch.randn(8, 16)
for step in range(3):
    with torch.no_grad():
        out = compiled(x + step)
    print("step", step, repr(out.sum().item()))
    time.sleep(0.3)  # CPU phase
print("unique_graphs", torch._dynamo.utils.counters["stats"]["unique_graphs"])
