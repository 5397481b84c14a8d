"""A `weakref.finalize` callback reads a tensor at interpreter exit: cleanup code that logs a
last value when its owner goes away."""

import time
import weakref

import torch

torch.manual_seed(0)
torch.set_num_threads(1)


class Owner:
    pass


def callback(tensor: torch.Tensor) -> None:
    print("finalized", repr(tensor.sum().item()), repr(tensor.max().item()))


owner = Owner()  # alive until exit
finalizer = weakref.finalize(owner, callback, torch.randn(100, 100))
print("alive", finalizer.alive)
time.sleep(0.5)  # CPU phase
print("still alive", finalizer.alive)
