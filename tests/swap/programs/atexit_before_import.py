"""An exit handler registered BEFORE `import torch` reads a tensor at interpreter exit: a summary
or checkpoint-on-exit hook set up at the top of a script."""

import atexit
import time


def report() -> None:
    print("at exit", repr(state.sum().item()), repr(state[3, 5].item()))


atexit.register(report)

import torch  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(1)
state = torch.randn(128, 128)
print("start", repr(state.sum().item()))
time.sleep(0.5)  # CPU phase: the tensor stays alive until exit
