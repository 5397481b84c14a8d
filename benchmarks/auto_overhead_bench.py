"""Per-call cost of automatic mode on a small-op training loop, against running it plainly.

    .venv/bin/python benchmarks/auto_overhead_bench.py [--repeats 9] [--steps 300] [--threads 1]

The loop is the one of pytorch/examples ``time_sequence_prediction``: two ``LSTMCell``s and a
``Linear`` over ``--steps`` time steps (11 torch calls a step, most of them ``dim()``), MSE, an
LBFGS step of 2 closures (forward, ``backward()``, ``item()``), then a ``no_grad`` prediction.
Every torch call is tiny, so what a call costs besides its kernel is most of the time.

Arms, run in one process, interleaved (the order rotates from one repetition to the next; each
arm is timed ``--repeats`` times and the median is printed):

- ``plain``: nothing installed;
- ``auto``: `AutoSwap` installed (``LocalLessor``, device ``cpu``, idle interval 1 h so that no
  swap happens inside the timing), as ``acb-run --auto --device cpu`` installs it;
- ``auto-per-call``: the same with ``nn.Module.__call__`` put back, so that every torch call
  goes through the gate one by one (automatic mode before module regions);
- ``bare-mode``: a `TorchFunctionMode` that only calls through (the floor of any mode).

Printed: the median of each arm in ms and its ratio to ``plain``, and the median of the ratios
paired within a repetition (steadier when other work loads the machine). ``--threads`` sets
torch's intra-op threads (1 by default: on a shared machine OpenMP's spinning threads make
timings swing by 2x).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from acb_slurm.swap.auto import AutoSwap
from acb_slurm.swap.lessors import LocalLessor


class Sequence(nn.Module):
    """time_sequence_prediction's model, as written there."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm1 = nn.LSTMCell(1, 51)
        self.lstm2 = nn.LSTMCell(51, 51)
        self.linear = nn.Linear(51, 1)

    def forward(self, input: torch.Tensor, future: int = 0) -> torch.Tensor:
        outputs = []
        h_t = torch.zeros(input.size(0), 51, dtype=torch.double)
        c_t = torch.zeros(input.size(0), 51, dtype=torch.double)
        h_t2 = torch.zeros(input.size(0), 51, dtype=torch.double)
        c_t2 = torch.zeros(input.size(0), 51, dtype=torch.double)
        output = h_t
        for input_t in input.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        for _ in range(future):
            h_t, c_t = self.lstm1(output, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        return torch.cat(outputs, dim=1)


def make_workload(steps: int) -> Callable[[], list[float]]:
    """One training step and one prediction; returns the losses (the same in every arm)."""
    x = torch.linspace(0, 20, steps + 1, dtype=torch.double)
    data = torch.stack([torch.sin(x + k) for k in range(6)])
    input, target = data[3:, :-1], data[3:, 1:]
    test_input = data[:3, :-1]

    def run() -> list[float]:
        torch.manual_seed(0)
        seq = Sequence().double()
        criterion = nn.MSELoss()
        optimizer = torch.optim.LBFGS(seq.parameters(), lr=0.8, max_iter=2)
        losses: list[float] = []

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = criterion(seq(input), target)
            losses.append(loss.item())
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            pred = seq(test_input, future=steps // 3)
            losses.append(float(pred.sum().item()))
        return losses

    return run


class BareMode(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def plain() -> Iterator[None]:
    yield


@contextlib.contextmanager
def auto(*, per_call: bool = False) -> Iterator[None]:
    module_call = nn.Module.__call__
    swap = AutoSwap(LocalLessor(), device="cpu", idle_ms=3_600_000)
    swap.install()
    if per_call:
        nn.Module.__call__ = module_call  # type: ignore[method-assign]
    try:
        yield
    finally:
        swap.uninstall()


@contextlib.contextmanager
def bare_mode() -> Iterator[None]:
    with BareMode():
        yield


ARMS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "plain": plain,
    "auto": auto,
    "auto-per-call": lambda: auto(per_call=True),
    "bare-mode": bare_mode,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each arm")
    parser.add_argument("--steps", type=int, default=300, help="time steps of the sequence")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.arms.split(",")
    if names[0] != "plain":
        parser.error("the first arm must be plain (ratios are against it)")
    run = make_workload(args.steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[float]] = {}
    for name in names:  # warm-up, and the results every arm must reproduce
        with ARMS[name]():
            results[name] = run()
    for i in range(args.repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            with ARMS[name]():
                start = time.perf_counter()
                out = run()
                times[name].append(time.perf_counter() - start)
            if out != results["plain"]:
                print(f"{name}: results differ from plain: {out} != {results['plain']}")
                return 1
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} time steps, "
        f"{args.repeats} runs of each arm; results identical in every arm"
    )
    base = statistics.median(times["plain"])
    print(f"{'arm':<14} {'median ms':>10} {'ratio':>7} {'paired':>7}")
    for name in names:
        med = statistics.median(times[name])
        paired = statistics.median(a / p for a, p in zip(times[name], times["plain"], strict=True))
        print(f"{name:<14} {med * 1000:10.1f} {med / base:7.3f} {paired:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
