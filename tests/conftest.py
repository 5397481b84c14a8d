"""Shared test set-up: markers that skip what this machine cannot run; real assigner processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from acb_slurm.assigner.testing import AssignerProcess


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def start_assigner(tmp_path: Path) -> Iterator[Callable[..., AssignerProcess]]:
    """Start a real `acb-assigner` with these options; each one started is stopped after."""
    started: list[AssignerProcess] = []

    def start(**options: Any) -> AssignerProcess:
        process = AssignerProcess(tmp_path, name=f"assigner{len(started)}", **options)
        started.append(process)
        return process.start()

    yield start
    for process in reversed(started):
        process.terminate()
