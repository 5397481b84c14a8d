"""Real allocation failures for the swap engine: an address-space limit (RLIMIT_AS) makes the
host copy of an offload, then the re-allocation of an onload, fail. Prints one JSON line."""

from __future__ import annotations

import json
import resource

import torch

from acb_slurm.swap import SwapEngine, SwapError, SwapState

MiB = 1024 * 1024


def vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def limit_address_space(extra: int | None) -> None:
    soft = resource.RLIM_INFINITY if extra is None else vm_size() + extra
    resource.setrlimit(resource.RLIMIT_AS, (soft, resource.RLIM_INFINITY))


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(*(torch.nn.Linear(2048, 2048) for _ in range(16)))  # 256 MiB
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 2048)).sum().backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    engine = SwapEngine("cpu")
    out: dict[str, object] = {}

    limit_address_space(64 * MiB)  # less than one host copy of the model
    try:
        engine.offload()
        out["offload_error"] = None
    except SwapError as exc:
        out["offload_error"] = str(exc)
    limit_address_space(None)
    out["state_after_failed_offload"] = engine.state.value
    out["intact_after_failed_offload"] = all(
        torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
    )

    engine.offload()
    limit_address_space(100 * MiB)  # room for a few storages, not for all of them
    try:
        engine.onload()
        out["onload_error"] = None
    except SwapError as exc:
        out["onload_error"] = str(exc)
    limit_address_space(None)
    out["state_after_failed_onload"] = engine.state.value
    out["empty_after_failed_onload"] = all(
        p.untyped_storage().nbytes() == 0 for p in model.parameters()
    )
    engine.onload()
    out["resident_at_end"] = engine.state is SwapState.RESIDENT
    out["intact_at_end"] = all(
        torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
