"""A bare `torch.UntypedStorage` (a byte buffer no tensor refers to, as serialisation and custom
allocators keep) filled through a temporary view, then kept alone across a CPU phase."""

import time

import torch

torch.manual_seed(0)
torch.set_num_threads(1)

storage = torch.UntypedStorage(4096)
fill = torch.empty(0, dtype=torch.uint8).set_(storage)
fill.copy_(torch.arange(4096) % 251)
del fill  # from here on no tensor refers to the storage
time.sleep(0.5)  # CPU phase
view = torch.empty(0, dtype=torch.uint8).set_(storage)
print("bytes sum", view.sum().item())
print("tolist sum", sum(storage.tolist()))
print("nbytes", storage.nbytes())
