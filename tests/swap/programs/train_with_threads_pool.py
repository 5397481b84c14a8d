"""A training loop whose batches are preprocessed by a 2-worker ThreadPoolExecutor in parallel
with the optimizer steps, with CPU phases between epochs (evaluation, logging)."""

import time
from concurrent.futures import ThreadPoolExecutor

import torch

torch.manual_seed(0)
torch.set_num_threads(1)

raw = [torch.randn(32, 16) for _ in range(6)]
targets = [torch.randn(32, 1) for _ in range(6)]
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def preprocess(batch: torch.Tensor) -> torch.Tensor:
    time.sleep(0.01)
    return (batch - batch.mean(dim=0)) / (batch.std(dim=0) + 1e-5)


with ThreadPoolExecutor(max_workers=2) as pool:
    for epoch in range(3):
        total = 0.0
        for x, y in zip(pool.map(preprocess, raw), targets, strict=True):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item()
        print("epoch", epoch, repr(total))
        time.sleep(0.3)  # CPU phase between epochs
for name, p in model.named_parameters():
    print(name, repr(p.sum().item()))
