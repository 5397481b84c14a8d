"""What automatic mode changes in torch and threading (`TorchHooks`), and that uninstall puts
every piece back. Real torch, managed device ``cpu``, leases from `LocalLessor`."""

from __future__ import annotations

import threading
from typing import Any

import torch

from acb_slurm.swap.auto import AutoSwap
from acb_slurm.swap.intercept import DeviceUseMode, mark_internal
from acb_slurm.swap.lessors import LocalLessor

PATCHED = [
    (torch, "save"),
    (torch, "load"),
    (torch, "compile"),
    (torch.nn.Module, "__call__"),
    (torch.jit.ScriptModule, "__call__"),
    (torch.jit, "script"),
    (torch.jit, "trace"),
    (torch.jit, "trace_module"),
    (torch.jit, "load"),
    (torch.jit, "freeze"),
    (threading.Thread, "_bootstrap_inner"),
]


def current_mode() -> Any:
    return torch.overrides._get_current_function_mode()


def test_install_patches_the_entry_points_and_uninstall_puts_each_back() -> None:
    before = {(owner, name): getattr(owner, name) for owner, name in PATCHED}
    mode_before = current_mode()
    auto = AutoSwap(LocalLessor(), device="cpu", idle_ms=3_600_000)
    auto.install()
    try:
        for owner, name in PATCHED:
            assert getattr(owner, name) is not before[owner, name], name
        assert isinstance(current_mode(), DeviceUseMode)
    finally:
        auto.uninstall()
    for owner, name in PATCHED:
        assert getattr(owner, name) is before[owner, name], name
    assert current_mode() is mode_before


def test_threads_started_after_installation_carry_the_mode_and_internal_ones_do_not() -> None:
    auto = AutoSwap(LocalLessor(), device="cpu", idle_ms=3_600_000)
    auto.install()
    seen: dict[str, Any] = {}

    def record(name: str) -> None:
        seen[name] = current_mode()

    try:
        program = threading.Thread(target=record, args=("program",))
        internal = mark_internal(threading.Thread(target=record, args=("internal",)))
        for thread in (program, internal):
            thread.start()
            thread.join()
        assert isinstance(seen["program"], DeviceUseMode)
        assert seen["internal"] is None
        assert auto._unguarded_threads() == []  # the watchdog is internal, the rest guarded
    finally:
        auto.uninstall()


def test_a_thread_from_before_installation_is_unguarded_while_it_lives() -> None:
    release = threading.Event()
    early = threading.Thread(target=release.wait, name="started-before")
    early.start()
    auto = AutoSwap(LocalLessor(), device="cpu", idle_ms=3_600_000)
    auto.install()
    try:
        assert "started-before" in auto._hooks.unguarded_threads()
        release.set()
        early.join()
        assert "started-before" not in auto._hooks.unguarded_threads()
    finally:
        release.set()
        auto.uninstall()
