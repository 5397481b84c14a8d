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
    assert result["onloaded"] == result["moved"] > 0
    # Free memory as the driver sees it rose by (nearly) what was moved: empty_cache gave it back.
    assert result["freed_on_device"] >= 0.9 * result["moved"], result
    assert result["losses_equal"] and result["params_equal"]


def test_memory_the_engine_cannot_move_is_reported_not_hidden() -> None:
    result = run_case("unmovable_memory_is_reported")
    assert result["moved_plain"]
    assert result["alias_kept"] and result["graph_output_kept"]
    text = " ".join(result["warnings"])
    assert "not resizable" in text and "CUDA graph" in text, result["warnings"]
    assert result["skipped_bytes"] >= (1 << 18) * 4


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
