"""A jagged nested tensor (variable-length sequences, as in batched NLP inputs) kept across a CPU
phase, then computed on."""

import time

import torch

torch.manual_seed(0)
torch.set_num_threads(1)

nt = torch.nested.nested_tensor(
    [torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8)], layout=torch.jagged
)
time.sleep(0.5)  # CPU phase
out = nt.sin()
print("values", repr(out.values().sum().item()))
print("offsets", out.offsets().tolist())
print("per item", [repr(t.sum().item()) for t in out.unbind()])
