"""CUDA cases of the swap engine, one per fresh process (device memory measured without the
leftovers of other tests). `python cuda_cases.py CASE` prints one JSON line.

Deterministic algorithms are switched on before CUDA starts, so two runs of the same training
on the same GPU are bit-for-bit equal (embedding backward otherwise uses atomics).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch

from acb_slurm.swap.auto import AutoSwap, Phase
from acb_slurm.swap.engine import SwapEngine, SwapError, SwapState, SwapWarning
from acb_slurm.swap.lessors import LocalLessor

torch.use_deterministic_algorithms(True)
GiB = 1024**3
CASES: dict[str, Callable[[], dict[str, Any]]] = {}


def case(func: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    CASES[func.__name__] = func
    return func


class Run:
    """A tied-weight model with Adam on cuda, and tensors in plain variables."""

    def __init__(self, width: int = 1024, vocab: int = 8192, seed: int = 0):
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width, device="cuda")
        self.body = torch.nn.Sequential(
            *(torch.nn.Linear(width, width, device="cuda") for _ in range(8))
        )
        self.head = torch.nn.Linear(width, vocab, bias=False, device="cuda")
        self.head.weight = self.embed.weight
        self.params = [*self.embed.parameters(), *self.body.parameters()]
        self.opt = torch.optim.Adam(self.params, lr=1e-3)
        self.tokens = torch.randint(0, vocab, (8, 65), device="cuda")
        self.view = self.embed.weight[:16]
        self.losses: list[torch.Tensor] = []

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.opt.zero_grad()
            h = self.body(self.embed(self.tokens[:, :-1]))
            logits = self.head(h)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), self.tokens[:, 1:].reshape(-1)
            )
            loss.backward()
            self.opt.step()
            self.losses.append(loss.detach())

    def tensors(self) -> list[torch.Tensor]:
        out = [*self.params, self.tokens, self.view, *self.losses]
        out += [p.grad for p in self.params if p.grad is not None]
        for state in self.opt.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_cuda]
        return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.detach().cpu(), y.detach().cpu()) for x, y in zip(a, b, strict=True)
    )


def free_device_memory() -> int:
    """Free bytes as the driver sees them, after the caching allocator gave back what it
    could and every queued kernel finished."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def nvml_used() -> dict[str, int | None]:
    """Device memory in use per NVML: the whole device, and this process (None where the
    driver does not say, e.g. in some containers)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {"device": None, "process": None}
    try:
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(
            uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        )
        device = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        mine = [
            p.usedGpuMemory
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.pid == os.getpid()
        ]
        return {"device": device, "process": int(mine[0]) if mine and mine[0] else None}
    except (pynvml.NVMLError, AttributeError):  # no NVML device for this GPU, or no uuid
        return {"device": None, "process": None}
    finally:
        pynvml.nvmlShutdown()


def contexts() -> list[int]:
    """CUDA devices with a primary context in this process (offload must not create any)."""
    has = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if has is None:
        return []
    return [i for i in range(torch.cuda.device_count()) if has(i)]


@case
def training_bit_for_bit() -> dict[str, Any]:
    # Reference values on the host: the engine moves every cuda storage of the process, so a
    # reference kept on the device would be swapped (and corrupted) alike.
    reference = Run()
    reference.train(6)
    ref_params = [p.detach().cpu() for p in reference.params]
    ref_losses = [x.cpu() for x in reference.losses]
    del reference

    run = Run()
    run.train(3)
    ids = [id(t) for t in run.tensors()]
    program_bytes = sum(
        {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in run.tensors()}.values()
    )
    contexts_before = contexts()
    free_before = free_device_memory()
    nvml_before = nvml_used()
    engine = SwapEngine("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SwapWarning)
        out = engine.offload()
    free_after = free_device_memory()
    nvml_after = nvml_used()
    empty = all(t.untyped_storage().nbytes() == 0 for t in run.tensors())
    reserved_after = torch.cuda.memory_reserved()
    pinned = engine._host is not None and engine._host.is_pinned()
    back = engine.onload()
    identity_kept = [id(t) for t in run.tensors()] == ids
    run.train(3)
    process_before, process_after = nvml_before["process"], nvml_after["process"]
    return {
        "moved": out.bytes,
        "program_bytes": program_bytes,
        "freed_on_device": free_after - free_before,
        "nvml_freed_device": (nvml_before["device"] or 0) - (nvml_after["device"] or 0),
        "nvml_freed_process": (
            process_before - process_after
            if process_before is not None and process_after is not None
            else None
        ),
        "contexts_before": contexts_before,
        "contexts_after": contexts(),
        "reserved_after_offload": reserved_after,
        "all_empty": empty,
        "pinned_host_buffer": pinned,
        "onloaded": back.bytes,
        "identity_kept": identity_kept,
        "losses_equal": same(run.losses, ref_losses),
        "params_equal": same([p.detach() for p in run.params], ref_params),
        "warnings": [str(w.message) for w in caught],
    }


def capture_double(graph_input: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A graph computing graph_input * 2 (its input lives outside the graph's pool)."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph_input.mul(2)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        graph_output = graph_input * 2
    return graph, graph_output


def replays_right(
    graph: torch.cuda.CUDAGraph, graph_input: torch.Tensor, out: torch.Tensor
) -> bool:
    graph_input.normal_()
    graph.replay()
    torch.cuda.synchronize()
    return torch.equal(out, graph_input * 2)


@case
def unmovable_memory_is_reported() -> dict[str, Any]:
    keep = torch.randn(1 << 20, device="cuda")
    alias = torch.from_dlpack(torch.randn(1 << 18, device="cuda"))  # storage not resizable
    engine = SwapEngine("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SwapWarning)
        out = engine.offload()
    result: dict[str, Any] = {
        "warnings": [str(w.message) for w in caught],
        "skipped_bytes": out.skipped_bytes,
        "alias_kept": alias.untyped_storage().nbytes() == (1 << 18) * 4,
        "moved_plain": keep.untyped_storage().nbytes() == 0,
    }
    engine.onload()
    return result


@case
def cuda_graphs_block_offload_unless_allowed() -> dict[str, Any]:
    keep = torch.randn(1 << 20, device="cuda")
    graph_input = torch.randn(1 << 16, device="cuda")
    graph, graph_output = capture_double(graph_input)
    result: dict[str, Any] = {"replays_before": replays_right(graph, graph_input, graph_output)}

    engine = SwapEngine("cuda")  # default: refuse, move nothing
    try:
        engine.offload()
        result["refused"] = None
    except SwapError as exc:
        result["refused"] = str(exc)
    result["state_after_refusal"] = engine.state.value
    result["nothing_moved"] = keep.untyped_storage().nbytes() == (1 << 20) * 4
    result["replays_after_refusal"] = replays_right(graph, graph_input, graph_output)

    allowed = SwapEngine("cuda", allow_graph_pools=True)  # opted in: the program re-captures
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SwapWarning)
        out = allowed.offload()
    result["warnings"] = [str(w.message) for w in caught]
    result["skipped_bytes"] = out.skipped_bytes
    result["graph_output_kept"] = graph_output.untyped_storage().nbytes() > 0
    result["input_moved"] = graph_input.untyped_storage().nbytes() == 0
    allowed.onload()
    graph, graph_output = capture_double(graph_input)  # re-captured after the swap
    result["replays_after_recapture"] = replays_right(graph, graph_input, graph_output)

    # Automatic mode: replay runs under hold(); the watchdog's swap-out is refused (graph pools
    # exist), so the lease is kept and retried with backoff, and replays stay right.
    lessor = LocalLessor()
    auto = AutoSwap(lessor, device="cuda", idle_ms=50)
    auto.install()
    try:
        rights = [replays_right(graph, graph_input, graph_output) for _ in range(3)]
        time.sleep(1.0)
        rights.append(replays_right(graph, graph_input, graph_output))
        result["auto_replays_right"] = all(rights)
        result["auto_failed_swaps"] = auto.stats.failed_swaps
        result["auto_holding"] = auto.holding and auto.engine.state is SwapState.RESIDENT
        result["auto_released"] = lessor.released
    finally:
        auto.uninstall()
    return result


@case
def failed_onload_keeps_host_copies() -> dict[str, Any]:
    """Fill the device after offload so that onload runs out of memory, then free and retry."""
    run = Run(width=2048)
    run.train(1)
    before = [p.detach().cpu() for p in run.params]
    engine = SwapEngine("cuda")
    out = engine.offload()
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(free - out.bytes // 2, 1), dtype=torch.uint8, device="cuda")
    try:
        engine.onload()
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    state_after_failure = engine.state.value
    del hog
    torch.cuda.empty_cache()
    engine.onload()
    after = [p.detach().cpu() for p in run.params]
    return {
        "error": error,
        "state_after_failure": state_after_failure,
        "intact": same(before, after),
    }


@case
def auto_mode_releases_memory_when_idle() -> dict[str, Any]:
    reference = Run()
    reference.train(4)
    ref_losses = [x.cpu() for x in reference.losses]
    del reference
    torch.cuda.empty_cache()

    lessor = LocalLessor(device_ids=())
    auto = AutoSwap(lessor, device="cuda", idle_ms=100)
    auto.install()
    try:
        run = Run()
        run.train(2)
        deadline = time.monotonic() + 30
        while auto.phase is not Phase.AWAY and time.monotonic() < deadline:
            time.sleep(0.02)
        away = auto.phase is Phase.AWAY
        reserved_while_away = torch.cuda.memory_reserved()
        run.train(2)
        result = {
            "went_away": away,
            "reserved_while_away": reserved_while_away,
            "acquired": lessor.acquired,
            "released": lessor.released,
            "losses_equal": same(run.losses, ref_losses),
            "usage_reported": max(lessor.usage, default=0),
            "offloaded": auto.stats.offloaded_bytes,
        }
    finally:
        auto.uninstall()
    return result


@case
def what_a_program_holds_moves_on_cuda() -> dict[str, Any]:
    """Wrapper subclasses, sparse components and tensors saved for backward, on CUDA: moved (free
    device memory rises by what moved), placeholders never copied, values intact after onload."""
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(0)
    mib = 1 << 18  # float32 elements in 1 MiB
    two = TwoTensor(torch.randn(16 * mib, device="cuda"), torch.randn(16 * mib, device="cuda"))
    jagged = torch.nested.nested_tensor(
        [torch.randn(1024, 1024, device="cuda"), torch.randn(2048, 1024, device="cuda")],
        layout=torch.jagged,
    )
    csr = torch.randn(2048, 2048, device="cuda").relu().to_sparse_csr()
    w = torch.randn(2048, 2048, device="cuda", requires_grad=True)
    loss = torch.tanh(w @ w).exp().sum()  # the graph holds two 16 MiB results
    expected = [(two.a + two.b).cpu(), jagged.values().cpu(), csr.to_dense().cpu()]
    expected_grad = torch.autograd.grad(torch.tanh(w @ w).exp().sum(), w)[0].cpu()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free_before = free_device_memory()
    engine = SwapEngine("cuda")
    out = engine.offload()
    freed = free_device_memory() - free_before
    engine.onload()
    loss.backward()
    got = [(two.a + two.b).cpu(), jagged.values().cpu(), csr.to_dense().cpu()]
    return {
        "moved": out.bytes,
        "freed_on_device": freed,
        "values_equal": all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)),
        "grad_equal": torch.equal(w.grad.cpu(), expected_grad),
    }


if __name__ == "__main__":
    print(json.dumps(CASES[sys.argv[1]]()))
