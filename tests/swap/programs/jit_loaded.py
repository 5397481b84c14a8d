"""A TorchScript module scripted, saved and loaded back (a deployed model), used before and after
a CPU phase."""

import os
import tempfile
import time

import torch

torch.manual_seed(0)
torch.set_num_threads(1)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)
        self.register_buffer("scale", torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * self.scale


scripted = torch.jit.script(Net())
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "net.pt")
    torch.jit.save(scripted, path)
    loaded = torch.jit.load(path)
x = torch.randn(4, 16)
print("before", repr(loaded(x).sum().item()))
time.sleep(0.5)  # CPU phase
print("after", repr(loaded(x).sum().item()))
print("same as scripted", torch.equal(loaded(x), scripted(x)))
