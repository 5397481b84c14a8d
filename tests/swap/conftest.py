"""Real acb-assigner processes (virtual GPUs) started per test and stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from acb_slurm.assigner.testing import AssignerProcess


@pytest.fixture
def start_assigner(tmp_path: Path) -> Iterator[Callable[..., AssignerProcess]]:
    """Start `acb-assigner` with the given options; every one started is stopped afterwards."""
    started: list[AssignerProcess] = []

    def start(**options: Any) -> AssignerProcess:
        process = AssignerProcess(tmp_path, name=f"assigner{len(started)}", **options)
        started.append(process)
        return process.start()

    yield start
    for process in reversed(started):
        process.terminate()
