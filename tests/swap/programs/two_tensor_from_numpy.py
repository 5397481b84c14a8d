"""A TwoTensor subclass next to a tensor that shares memory with a numpy array (`from_numpy`, as
data pipelines produce), both kept across a CPU phase."""

import time

import numpy as np
import torch
from torch.testing._internal.two_tensor import TwoTensor

torch.manual_seed(0)
torch.set_num_threads(1)

array = np.arange(4096, dtype=np.float32).reshape(64, 64)
from_np = torch.from_numpy(array)
t = TwoTensor(torch.randn(32, 32), torch.randn(32, 32))
time.sleep(0.5)  # CPU phase
out = (t * 2 + 1).sin()
print("a", repr(out.a.sum().item()))
print("b", repr(out.b.sum().item()))
print("numpy", repr((from_np * 2).sum().item()), repr(float(array.sum())))
array[0, 0] = 100.0  # the tensor still aliases the array
print("aliased", repr(from_np[0, 0].item()))
