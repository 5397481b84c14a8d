"""A small DistributedDataParallel training run (gloo, CPU): the multi-node example of acb-slurm.

    torchrun --nproc-per-node 2 ddp_train.py --steps 20 --out params.pt

Each rank trains the same seeded model on its own shard of a seeded dataset; DDP averages the
gradients, so every rank ends with the same parameters, and a run with the same world size gives
the same parameters whatever the launcher (under `acb-run --gang` across nodes, or plain torchrun
on one machine). Rank 0 writes them to --out. It also prints where each rank ran.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", required=True, help="where rank 0 saves the final parameters")
    parser.add_argument(
        "--step-seconds", type=float, default=0.0, help="sleep this long in each step (a slow run)"
    )
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    inputs = torch.randn(args.steps, world, args.batch, 16, generator=data)
    targets = inputs.sum(dim=-1, keepdim=True).sin()
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(inputs[step, rank]), targets[step, rank])
        loss.backward()
        optimizer.step()
        time.sleep(args.step_seconds)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    devices = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    print(
        f"rank {rank}/{world} on {node} (GPUs {devices}): final loss {loss.item():.6f}", flush=True
    )
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out)
    # Every rank leaves together: a rank that tears gloo down while another still talks to it
    # can abort at exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
