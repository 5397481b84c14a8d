"""The swap engine and automatic mode on a real CUDA device (skipped without one).

Each case runs in a fresh process (tests/swap/data/cuda_cases.py) so that device memory is
measured without what other tests left behind, and the effect is measured, not the call: free
device memory (torch.cuda.mem_get_info) must really rise after an offload.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cuda
CASES = Path(__file__).parent / "data" / "cuda_cases.py"


def run_case(name: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(CASES), name],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_training_continues_bit_for_bit_and_device_memory_goes_back_to_the_driver() -> None:
    result = run_case("training_bit_for_bit")
    assert result["all_empty"], "a storage of the program is still on the device"
    assert result["identity_kept"]
    assert result["pinned_host_buffer"]
    # Storages dropped between offload and onload (garbage the collector found meanwhile) are
    # not brought back; everything the program holds is.
    assert result["program_bytes"] <= result["onloaded"] <= result["moved"], result
    # Free memory as the driver sees it rose by (nearly) what was moved: empty_cache gave it back.
    assert result["freed_on_device"] >= 0.9 * result["moved"], result
    if result["nvml_freed_device"]:  # NVML agrees (the device-wide figure: other processes too)
        assert result["nvml_freed_device"] >= 0.9 * result["moved"], result
    if result["nvml_freed_process"] is not None:
        assert result["nvml_freed_process"] >= 0.9 * result["moved"], result
    # Offload synchronised only devices that already had a context: it created none.
    assert result["contexts_after"] == result["contexts_before"], result
    assert result["losses_equal"] and result["params_equal"]


def test_memory_the_engine_cannot_move_is_reported_not_hidden() -> None:
    result = run_case("unmovable_memory_is_reported")
    assert result["moved_plain"]
    assert result["alias_kept"]
    text = " ".join(result["warnings"])
    assert "not resizable" in text, result["warnings"]
    assert result["skipped_bytes"] >= (1 << 18) * 4


def test_cuda_graphs_refuse_offload_unless_allowed_and_replay_right_after() -> None:
    result = run_case("cuda_graphs_block_offload_unless_allowed")
    assert result["replays_before"]
    assert result["refused"] and "CUDA graph" in result["refused"], result
    assert result["state_after_refusal"] == "resident" and result["nothing_moved"]
    assert result["replays_after_refusal"]
    assert "CUDA graph" in " ".join(result["warnings"]), result["warnings"]
    assert result["graph_output_kept"] and result["input_moved"]
    assert result["replays_after_recapture"]
    assert result["auto_replays_right"] and result["auto_holding"], result
    assert result["auto_failed_swaps"] >= 1 and result["auto_released"] == 0, result


def test_an_onload_that_runs_out_of_device_memory_loses_nothing() -> None:
    result = run_case("failed_onload_keeps_host_copies")
    assert result["error"] and "nothing was lost" in result["error"]
    assert result["state_after_failure"] == "offloaded"
    assert result["intact"]


def test_automatic_mode_frees_the_device_while_idle_and_trains_on_exactly() -> None:
    result = run_case("auto_mode_releases_memory_when_idle")
    assert result["went_away"]
    # What stays reserved is reported by a SwapWarning; it must be small next to what moved.
    assert result["reserved_while_away"] <= max(32 << 20, result["offloaded"] // 20), result
    assert result["acquired"] >= 2 and result["released"] >= 1
    assert result["losses_equal"]
    assert result["usage_reported"] > 0


def test_wrapper_subclasses_sparse_components_and_saved_tensors_move_on_cuda() -> None:
    result = run_case("what_a_program_holds_moves_on_cuda")
    assert result["moved"] >= 4 * 16 * (1 << 20), result  # both TwoTensor halves, the graph's
    assert result["freed_on_device"] >= 0.9 * result["moved"], result
    assert result["values_equal"] and result["grad_equal"], result
