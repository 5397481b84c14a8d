"""A per-channel quantized weight tensor (int8 inference) kept across a CPU phase, then
dequantized."""

import time

import torch

torch.manual_seed(0)
torch.set_num_threads(1)

w = torch.randn(16, 32)
scales = w.abs().amax(dim=1) / 127
zero_points = torch.zeros(16, dtype=torch.long)
q = torch.quantize_per_channel(w, scales, zero_points, axis=0, dtype=torch.qint8)
time.sleep(0.5)  # CPU phase
print("dequantized", repr(q.dequantize().sum().item()))
print("int repr", q.int_repr().sum().item())
print("scales", repr(q.q_per_channel_scales().sum().item()))
print("zero points", q.q_per_channel_zero_points().tolist())
