"""The node's GPU inventory: declared virtual GPUs, or the real ones NVML sees.

For real GPUs, `CUDA_VISIBLE_DEVICES` decides which ones the assigner hands out and how clients
name them: each entry (an index such as "3", or a UUID such as "GPU-8a1c...") becomes one
inventory GPU whose `device_id` is the entry exactly as given, so a client that puts the granted
device ids into its own `CUDA_VISIBLE_DEVICES` sees exactly the GPUs it was granted.
Indices are resolved in NVML's (PCI bus) order, which is CUDA's order under
`CUDA_DEVICE_ORDER=PCI_BUS_ID`, the setting Slurm's GPU binding assumes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from acb_slurm.assigner.errors import AssignerStartError
from acb_slurm.scheduler.types import Gpu


def virtual_inventory(count: int, memory_bytes: int) -> list[Gpu]:
    """`count` identical GPUs that exist only in the assigner (machines without a GPU, tests)."""
    if count < 1:
        raise AssignerStartError(f"--virtual-gpus must be at least 1, got {count}", exit_code=2)
    if memory_bytes <= 0:
        raise AssignerStartError(
            f"--gpu-memory must be a positive size such as 80GiB, got {memory_bytes} bytes",
            exit_code=2,
        )
    return [
        Gpu(
            index=i,
            memory_bytes=memory_bytes,
            device_id=str(i),
            uuid=f"virtual-{i}",
            name="virtual",
        )
        for i in range(count)
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_visible_devices(value: str | None) -> list[str] | None:
    """Entries of CUDA_VISIBLE_DEVICES; None when it is unset (all GPUs are visible)."""
    if value is None:
        return None
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def nvml_inventory(environ: Mapping[str, str] | None = None) -> list[Gpu]:
    """The GPUs NVML reports, restricted to and named by CUDA_VISIBLE_DEVICES when it is set."""
    env = os.environ if environ is None else environ
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        raise AssignerStartError(
            "nvidia-ml-py (pynvml) is not installed; install it, or declare GPUs with "
            "--virtual-gpus N --gpu-memory 80GiB"
        ) from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise AssignerStartError(
            f"no NVIDIA driver reachable through NVML ({exc}); on a machine without GPUs "
            "declare virtual ones with --virtual-gpus N --gpu-memory 80GiB"
        ) from exc
    try:
        physical = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            physical.append(
                Gpu(
                    index=i,
                    memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    device_id=str(i),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                )
            )
    except pynvml.NVMLError as exc:
        raise AssignerStartError(f"NVML failed while listing GPUs: {exc}") from exc
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    return select_visible(physical, env.get("CUDA_VISIBLE_DEVICES"))


def select_visible(physical: list[Gpu], cuda_visible_devices: str | None) -> list[Gpu]:
    """The inventory CUDA_VISIBLE_DEVICES makes of the node's GPUs (all of them when unset)."""
    visible = parse_visible_devices(cuda_visible_devices)
    if visible is None:
        chosen = [(str(gpu.index), gpu) for gpu in physical]
    else:
        chosen = [(entry, _resolve(entry, physical)) for entry in visible]
    if not chosen:
        raise AssignerStartError(
            f"no GPU to hand out: NVML found {len(physical)} GPU(s), "
            f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}; "
            "without GPUs, declare virtual ones with --virtual-gpus N --gpu-memory 80GiB"
        )
    seen = [gpu.uuid for _, gpu in chosen]
    if len(set(seen)) != len(seen):
        raise AssignerStartError(
            f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} names the same GPU twice"
        )
    return [replace(gpu, index=i, device_id=entry) for i, (entry, gpu) in enumerate(chosen)]


def _resolve(entry: str, physical: list[Gpu]) -> Gpu:
    """One CUDA_VISIBLE_DEVICES entry → the NVML device it names (index or UUID prefix)."""
    if entry.isdigit():
        index = int(entry)
        if index >= len(physical):
            raise AssignerStartError(
                f"CUDA_VISIBLE_DEVICES names GPU {index} but NVML sees only {len(physical)} GPU(s)"
            )
        return physical[index]
    matches = [gpu for gpu in physical if gpu.uuid.startswith(entry)]
    if len(matches) != 1:
        known = ", ".join(gpu.uuid for gpu in physical) or "none"
        what = "no GPU" if not matches else "several GPUs"
        raise AssignerStartError(
            f"CUDA_VISIBLE_DEVICES entry {entry!r} matches {what}; NVML's GPUs: {known}"
        )
    return matches[0]


def describe(gpus: list[Gpu]) -> list[dict[str, Any]]:
    """The inventory as the event log's `start` line lists it."""
    return [
        {"index": g.index, "device_id": g.device_id, "memory_bytes": g.memory_bytes} for g in gpus
    ]
