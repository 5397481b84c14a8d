"""A DTensor on a one-process gloo group (the single-rank case of a distributed training script),
kept across a CPU phase."""

import os
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

torch.manual_seed(0)
torch.set_num_threads(1)

with tempfile.TemporaryDirectory() as tmp:
    dist.init_process_group(
        "gloo", rank=0, world_size=1, init_method="file://" + os.path.join(tmp, "store")
    )
    mesh = DeviceMesh("cpu", [0])
    dt = distribute_tensor(torch.randn(32, 32), mesh, [Shard(0)])
    rep = distribute_tensor(torch.randn(32, 32), mesh, [Replicate()])
    time.sleep(0.5)  # CPU phase
    out = (dt @ rep).relu()
    print("full sum", repr(out.full_tensor().sum().item()))
    print("placements", out.placements)
    dist.destroy_process_group()
