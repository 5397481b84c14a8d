"""Swap engine and automatic mode on a CUDA GPU, as ratios against baselines of the same run.

    python benchmarks/swap_gpu_bench.py [--gib 4] [--repeats 3] [--json OUT.json]

1. Pinned host<->device bandwidth: one large copy each way between a page-locked buffer and the
   device (best of the repeats): the ceiling a swap can reach.
2. Offload/onload of a model-like population of storages (sizes of a transformer's weights,
   gradients and Adam state, `--gib` in all): GB/s end to end (walk, copies, synchronisation,
   freeing) and as a fraction of (1). Target: >= 0.8. The first offload also pins the host
   buffer; it is reported apart.
3. Device memory returned to the driver: free memory after offload minus before, against the
   bytes moved, as torch.cuda.mem_get_info and as NVML sees it (the device's used memory, and
   this process's where the driver reports it); read after synchronize() and empty_cache().
4. Automatic mode overhead: training steps of a realistic model (a GPT-style stack) and of a
   launch-bound small one, with and without automatic mode (no swaps happen: idle interval
   larger than the run), as ratios.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from acb_slurm.swap.auto import AutoSwap
from acb_slurm.swap.engine import SwapEngine
from acb_slurm.swap.lessors import LocalLessor

GiB = 1024**3


def free_device_memory() -> int:
    """Free device bytes per the driver, once queued work finished and the cache is empty."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def nvml_used() -> tuple[int | None, int | None]:
    """(device used bytes, this process's used bytes) per NVML; None where unknown."""
    import os

    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None, None
    try:
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(
            uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        )
        used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        mine = [
            p.usedGpuMemory
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.pid == os.getpid()
        ]
        return used, (int(mine[0]) if mine and mine[0] else None)
    except (pynvml.NVMLError, AttributeError):  # no NVML device for this GPU, or no uuid
        return None, None
    finally:
        pynvml.nvmlShutdown()


def minus(a: int | None, b: int | None) -> int | None:
    return a - b if a is not None and b is not None else None


def timed_copy(dst: torch.Tensor, src: torch.Tensor) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def pinned_bandwidth(nbytes: int, repeats: int) -> tuple[float, float]:
    """GB/s of one host->device and one device->host copy of `nbytes` (pinned host memory)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    up = min(timed_copy(dev, host) for _ in range(repeats))
    down = min(timed_copy(host, dev) for _ in range(repeats))
    return nbytes / up / 1e9, nbytes / down / 1e9


def model_like_storages(total: int) -> list[torch.Tensor]:
    """Tensors sized like a transformer's: large matrices, some embeddings, many small vectors;
    each weight with a gradient and two Adam moments."""
    width = 4096
    out: list[torch.Tensor] = []
    used = 0
    layer = 0
    while used < total:
        shapes = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
        shapes += [(width,)] * 6 + [(4 * width,)]
        for shape in shapes:
            for _ in range(4):  # weight, grad, exp_avg, exp_avg_sq
                t = torch.empty(shape, device="cuda").normal_()
                out.append(t)
                used += t.numel() * 4
                if used >= total:
                    return out
        layer += 1
    return out


def swap_throughput(total: int, repeats: int, pinned: tuple[float, float]) -> dict[str, Any]:
    tensors = model_like_storages(total)
    checksums = [float(t.double().sum()) for t in tensors[:: max(1, len(tensors) // 64)]]
    engine = SwapEngine("cuda")
    free_before = free_device_memory()
    nvml_before = nvml_used()
    first = engine.offload()  # pins the host buffer too
    free_after = free_device_memory()
    nvml_after = nvml_used()
    engine.onload()
    offloads, onloads = [], []
    for _ in range(repeats):
        offloads.append(engine.offload())
        onloads.append(engine.onload())
    out = max(offloads, key=lambda s: s.gb_per_s)
    back = max(onloads, key=lambda s: s.gb_per_s)
    start = time.perf_counter()
    engine._find()
    walk = time.perf_counter() - start
    intact = checksums == [float(t.double().sum()) for t in tensors[:: max(1, len(tensors) // 64)]]
    result = {
        "storages": out.storages,
        "bytes": out.bytes,
        "first_offload_s": first.seconds,
        "offload_gbps": out.gb_per_s,
        "onload_gbps": back.gb_per_s,
        "offload_vs_pinned_d2h": out.gb_per_s / pinned[1],
        "onload_vs_pinned_h2d": back.gb_per_s / pinned[0],
        "walk_s": walk,
        "freed_on_device": free_after - free_before,
        "freed_vs_moved": (free_after - free_before) / first.bytes,
        "nvml_freed_device": minus(nvml_before[0], nvml_after[0]),
        "nvml_freed_process": minus(nvml_before[1], nvml_after[1]),
        "intact": intact,
    }
    del tensors
    engine.close()
    torch.cuda.empty_cache()
    return result


def gpt_training(
    layers: int, width: int, seq: int, batch: int, vocab: int = 32000
) -> Callable[[int], None]:
    torch.manual_seed(0)
    block = torch.nn.TransformerEncoderLayer(
        width, width // 64, 4 * width, batch_first=True, dropout=0.0, device="cuda"
    )
    model = torch.nn.Sequential(
        torch.nn.Embedding(vocab, width, device="cuda"),
        torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False),
        torch.nn.Linear(width, vocab, device="cuda"),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device="cuda")

    def run(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, vocab), tokens[:, 1:].reshape(-1)
            )
            loss.backward()
            opt.step()
        torch.cuda.synchronize()

    return run


def auto_overhead(repeats: int) -> dict[str, float]:
    cases = {
        "gpt 12x1024 seq 1024 b 8": (gpt_training(12, 1024, 1024, 8), 10),
        "small (launch-bound) 2x256 seq 64 b 4": (gpt_training(2, 256, 64, 4, vocab=1000), 50),
    }
    out: dict[str, float] = {}
    for name, (run, steps) in cases.items():
        run(2)  # warm-up (cuBLAS, allocator)
        plain, auto_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            run(steps)
            plain.append(time.perf_counter() - start)
            auto = AutoSwap(LocalLessor(), device="cuda", idle_ms=3_600_000)
            auto.install()
            try:
                start = time.perf_counter()
                run(steps)
                auto_times.append(time.perf_counter() - start)
            finally:
                auto.uninstall()
        out[name] = min(auto_times) / min(plain)
        out[name + " step_ms"] = min(plain) / steps * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gib", type=float, default=4.0, help="bytes of storages to swap")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("swap_gpu_bench: no CUDA device (run it on a GPU machine)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    results: dict[str, Any] = {"device": torch.cuda.get_device_name()}

    up, down = pinned_bandwidth(GiB, args.repeats + 2)
    torch.cuda.empty_cache()
    results["pinned_h2d_gbps"], results["pinned_d2h_gbps"] = up, down
    print(f"pinned bandwidth: host->device {up:.1f} GB/s, device->host {down:.1f} GB/s")

    swap = swap_throughput(int(args.gib * GiB), args.repeats, (up, down))
    results["swap"] = swap
    print(
        f"swap of {swap['bytes'] / GiB:.2f} GiB in {swap['storages']} storages: "
        f"offload {swap['offload_gbps']:.1f} GB/s ({swap['offload_vs_pinned_d2h']:.0%} of "
        f"pinned), onload {swap['onload_gbps']:.1f} GB/s ({swap['onload_vs_pinned_h2d']:.0%}); "
        f"first offload (pins the buffer) {swap['first_offload_s']:.2f} s; "
        f"walk {swap['walk_s'] * 1e3:.0f} ms; data intact: {swap['intact']}"
    )
    nvml = ", ".join(
        f"NVML {what} {swap[key] / GiB:.2f} GiB"
        for what, key in (("device", "nvml_freed_device"), ("process", "nvml_freed_process"))
        if swap[key] is not None
    )
    print(
        f"device memory given back to the driver: {swap['freed_on_device'] / GiB:.2f} GiB "
        f"({swap['freed_vs_moved']:.0%} of what was moved; mem_get_info); {nvml or 'no NVML'}"
    )

    overhead = auto_overhead(args.repeats)
    results["auto_overhead"] = overhead
    for name, value in overhead.items():
        if not name.endswith("step_ms"):
            print(
                f"auto mode, {name}: {value:.3f}x "
                f"(step {overhead[name + ' step_ms']:.1f} ms without it)"
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
