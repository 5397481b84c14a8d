"""A small training program that knows nothing of acb-slurm: GPU phases of a few optimizer steps
separated by CPU phases (sleeps). Saves its losses and final weights to the path in argv[1].

    python train_small.py OUT.pt [PHASES] [STEPS_PER_PHASE] [CPU_PHASE_SECONDS]
"""

import sys
import time

import torch

out = sys.argv[1]
phases = int(sys.argv[2]) if len(sys.argv) > 2 else 3
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
cpu_seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5

torch.manual_seed(0)
torch.set_num_threads(1)
device = "cuda" if torch.cuda.is_available() else "cpu"

embed = torch.nn.Embedding(50, 32)
model = torch.nn.Sequential(
    torch.nn.Linear(32, 64),
    torch.nn.GELU(),
    torch.nn.LayerNorm(64),
    torch.nn.Linear(64, 32),
    torch.nn.Linear(32, 50, bias=False),
)
model[-1].weight = embed.weight  # tied input and output weights
model.to(device)
embed.to(device)
opt = torch.optim.Adam(model.parameters(), lr=3e-3)  # includes the tied embedding weight
tokens = torch.randint(0, 50, (64, 9), device=device)
losses = []

for _phase in range(phases):
    for _step in range(steps):
        opt.zero_grad()
        logits = model(embed(tokens[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    time.sleep(cpu_seconds)  # a CPU phase: no torch call at all

state = {"losses": torch.stack(losses).cpu(), "model": model.state_dict(), "opt": opt.state_dict()}
torch.save(state, out)
print(f"done: {len(losses)} steps, last loss {losses[-1].item():.6f}")
