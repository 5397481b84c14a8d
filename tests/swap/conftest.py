"""Automatic mode in this process shares it with what earlier tests left running."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from acb_slurm.swap.auto import AutoSwap


@pytest.fixture(autouse=True)
def threads_of_earlier_tests_are_not_the_program_s(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[None]:
    """Threads alive before a test (gRPC channels of other tests' clients, in a full run) never
    touch its tensors: they do not count as unseen threads that block offloads. Threads a test
    starts itself still do."""
    earlier = {t.ident for t in threading.enumerate()} - {threading.main_thread().ident}
    unguarded = AutoSwap._unguarded_threads

    def ignoring_earlier(self: AutoSwap) -> list[str]:
        self._internal |= {ident for ident in earlier if ident is not None}
        return unguarded(self)

    monkeypatch.setattr(AutoSwap, "_unguarded_threads", ignoring_earlier)
    yield
