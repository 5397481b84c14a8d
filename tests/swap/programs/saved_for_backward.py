"""A forward pass whose loss (and the activations autograd saved for backward) is kept across a
CPU phase before `backward()`, as with gradient accumulation waiting on the next batch."""

import time

import torch

torch.manual_seed(0)
torch.set_num_threads(1)

model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
x = torch.randn(16, 32)
loss = (model(x) ** 2).mean()
time.sleep(0.5)  # CPU phase between forward and backward
loss.backward()
print("loss", repr(loss.item()))
for name, p in model.named_parameters():
    print(name, repr(p.grad.sum().item()), repr(p.grad.abs().sum().item()))
