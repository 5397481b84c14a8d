"""A tensor subclass with two inner tensors (torch's own TwoTensor, the pattern of wrapper
subclasses such as float8 or DTensor) kept across a CPU phase, then computed on."""

import time

import torch
from torch.testing._internal.two_tensor import TwoTensor

torch.manual_seed(0)
torch.set_num_threads(1)

t = TwoTensor(torch.randn(32, 32), torch.randn(32, 32))
time.sleep(0.5)  # CPU phase
out = (t * 2 + 1).sin()
print("a", repr(out.a.sum().item()))
print("b", repr(out.b.sum().item()))
print("type", type(out).__name__)
