"""Interception overhead of automatic mode on CPU, as ratios against the same loop without it.

    .venv/bin/python benchmarks/swap_cpu_bench.py [--repeats 25] [--threads 1] [--quick]

Cases: a worst case of many tiny ops, and realistic training steps (an MLP and a transformer
block with Adam). Each case runs without hooks, under automatic mode managing ``cpu`` (every call
goes through the lock), under automatic mode managing ``cuda`` with CPU tensors (the argument
scan of a machine with a GPU, no lock), and under a no-op TorchDispatchMode (the alternative
hook). Times are CPU seconds of the calling thread (torch runs on one intra-op thread), so that
other processes on a shared machine do not count; runs are interleaved and the fastest of the
repeats is kept. The per-call cost is derived from the tiny-op case; multiplied by the
number of torch calls per run it gives a second, less load-sensitive estimate for each case.
Also printed: the gaps between device calls of the realistic loop (what the idle interval must
stay above) and the cost of one offload/onload round trip (what an idle interval must be worth).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from acb_slurm.swap.auto import AutoSwap
from acb_slurm.swap.engine import SwapEngine
from acb_slurm.swap.lessors import LocalLessor


class NoopDispatch(TorchDispatchMode):
    """The cheapest possible TorchDispatchMode: what the alternative hook would cost at least."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


class Auto(AbstractContextManager[None]):
    """Automatic mode with a lessor that grants at once and an idle interval that never fires."""

    def __init__(self, device: str):
        self.auto = AutoSwap(LocalLessor(), device=device, idle_ms=3_600_000)

    def __enter__(self) -> None:
        self.auto.install()

    def __exit__(self, *exc: object) -> None:
        self.auto.uninstall()


def tiny_ops(steps: int) -> Callable[[], None]:
    x = torch.zeros(16)

    def run() -> None:
        for _ in range(steps):
            x.add_(1.0).mul_(0.5)

    return run


def mlp_training(
    steps: int, width: int = 1024, depth: int = 4, batch: int = 64
) -> Callable[[], None]:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, width), torch.randn(batch, width)

    def run() -> None:
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    return run


def transformer_training(
    steps: int, d_model: int = 256, heads: int = 4, seq: int = 128, batch: int = 8
) -> Callable[[], None]:
    torch.manual_seed(0)
    block = torch.nn.TransformerEncoderLayer(
        d_model, heads, dim_feedforward=4 * d_model, batch_first=True, dropout=0.0
    )
    opt = torch.optim.Adam(block.parameters(), lr=1e-4)
    x = torch.randn(batch, seq, d_model)

    def run() -> None:
        for _ in range(steps):
            opt.zero_grad()
            block(x).pow(2).mean().backward()
            opt.step()

    return run


HOOKS: dict[str, Callable[[], AbstractContextManager[Any]]] = {
    "none": nullcontext,
    "auto(cpu)": lambda: Auto("cpu"),
    "auto(cuda), cpu tensors": lambda: Auto("cuda"),
    "noop TorchDispatchMode": NoopDispatch,
}


def measure(work: Callable[[], None], repeats: int) -> dict[str, float]:
    """Fastest thread CPU seconds per run of `work` under each hook, runs interleaved."""
    times: dict[str, list[float]] = {name: [] for name in HOOKS}
    for hook in HOOKS.values():  # warm up every path once
        with hook():
            work()
    for _ in range(repeats):
        for name, hook in HOOKS.items():
            with hook():
                start = time.thread_time()
                work()
                times[name].append(time.thread_time() - start)
    return {name: min(values) for name, values in times.items()}


def call_gaps(work: Callable[[], None]) -> list[float]:
    """Gaps between consecutive torch calls of `work` (seconds), seen from a TorchFunctionMode."""
    from torch.overrides import TorchFunctionMode

    stamps: list[float] = []

    class Stamp(TorchFunctionMode):
        def __torch_function__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            stamps.append(time.perf_counter())
            out = func(*args, **(kwargs or {}))
            stamps.append(time.perf_counter())
            return out

    with Stamp():
        work()
    return [b - a for a, b in zip(stamps[1::2], stamps[2::2], strict=False)]


def swap_round_trip(megabytes: int) -> tuple[float, float, float]:
    """Seconds of one offload and one onload of `megabytes` of tensors, and of the walk alone."""
    data = [torch.randn(megabytes * 1024 * 1024 // 4 // 8) for _ in range(8)]
    engine = SwapEngine("cpu")
    start = time.perf_counter()
    engine._find()
    walk = time.perf_counter() - start
    out = engine.offload()
    back = engine.onload()
    del data
    return out.seconds, back.seconds, walk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0
    torch.set_num_threads(args.threads)
    tiny_steps = int(20000 * scale)
    cases = {
        "tiny ops (2 x 16 floats, in place)": tiny_ops(tiny_steps),
        "MLP 4x1024, batch 64, Adam": mlp_training(2),
        "transformer block d=256 seq=128 b=8, Adam": transformer_training(2),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {args.repeats}")
    header = "  ".join(f"{name:>24}" for name in HOOKS)
    print(f"{'case':44} {header}  {'calls':>7}  derived auto(cpu), auto(cuda)")
    per_call: dict[str, float] = {}
    for case, work in cases.items():
        calls = len(call_gaps(work)) + 1
        result = measure(work, args.repeats)
        base = result["none"]
        if not per_call:  # the tiny-op case: overhead per intercepted call
            per_call = {name: (result[name] - base) / calls for name in HOOKS}
        derived = [
            1 + per_call[name] * calls / base for name in ("auto(cpu)", "auto(cuda), cpu tensors")
        ]
        cells = [f"{base * 1e3:20.2f} ms"] + [
            f"{result[name] / base:23.3f}x" for name in list(HOOKS)[1:]
        ]
        print(
            f"{case:44} "
            + "  ".join(cells)
            + f"  {calls:7d}  "
            + ", ".join(f"{d:.4f}x" for d in derived)
        )
    print(
        "overhead per intercepted call: "
        + ", ".join(f"{name} {v * 1e6:.2f} us" for name, v in per_call.items() if name != "none")
    )

    gaps = sorted(call_gaps(mlp_training(3)))
    pct = {p: gaps[min(len(gaps) - 1, int(p / 100 * len(gaps)))] for p in (50, 99, 100)}
    print(
        "gaps between torch calls, MLP loop: "
        + ", ".join(f"p{p} {v * 1e3:.3f} ms" for p, v in pct.items())
        + f" ({len(gaps)} gaps)"
    )
    for mb in (64, 512):
        out, back, walk = swap_round_trip(mb)
        print(
            f"swap round trip {mb} MiB on cpu: offload {out * 1e3:.0f} ms "
            f"(walk {walk * 1e3:.0f} ms), onload {back * 1e3:.0f} ms"
        )


if __name__ == "__main__":
    main()
