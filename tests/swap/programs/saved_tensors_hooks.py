"""The same forward/CPU phase/backward with identity `saved_tensors_hooks` around the forward, the
mechanism activation-offloading and checkpointing libraries use."""

import time

import torch

torch.manual_seed(0)
torch.set_num_threads(1)

packed: list[int] = []


def pack(t: torch.Tensor) -> torch.Tensor:
    packed.append(t.numel())
    return t


def unpack(t: torch.Tensor) -> torch.Tensor:
    return t


model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
x = torch.randn(16, 32)
with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
    loss = (model(x) ** 2).mean()
time.sleep(0.5)  # CPU phase between forward and backward
loss.backward()
print("loss", repr(loss.item()))
print("packed", len(packed) > 0)
for name, p in model.named_parameters():
    print(name, repr(p.grad.sum().item()), repr(p.grad.abs().sum().item()))
