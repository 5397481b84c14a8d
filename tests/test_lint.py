"""The code stays as ruff and mypy want it: part of the test command, so CI keeps it so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize(
    "argv",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy", "acb_slurm"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_the_code_passes(argv: list[str]) -> None:
    tool = BIN / argv[0]
    assert tool.exists(), f"{argv[0]} is not installed beside {sys.executable}: scripts/setup"
    result = run(str(tool), *argv[1:])
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}{result.stderr}"
