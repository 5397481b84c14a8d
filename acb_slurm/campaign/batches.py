"""Items that wait for their batch: when a worker runs a batched stage, and for which items.

A stage with `batch: N` (at most one per campaign) runs one process for several items, so that
its start-up under the lease is paid once per batch. The worker runs the earlier stages of each
item it claims one item at a time, as always; an item that reaches the batched stage waits here,
still claimed (the worker's `ClaimKeeper` keeps its heartbeat), its attempt open. The batch runs
(`due`) when

- N items wait: the batch is full;
- the first waiting item would wait past `batch_wait`: the next item's earlier stages take, by
  the mean time this worker has taken to make an item ready, longer than it has left; or
- no more items can be claimed (the end of the queue, or --max-items): the worker then runs
  what waits (`take_all`), and never waits for a batch that cannot fill.

An item whose previous attempt failed waits for nobody: it runs in a process of its own (a batch
of one), so that an item that breaks its process fails only itself the second time, and an
item of a failed batch is retried without the others.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from acb_slurm.campaign.spec import Stage
from acb_slurm.campaign.stages import ItemRun

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ready:
    """An item at the batched stage: its part in the process, and whether it must run alone
    (its previous attempt failed)."""

    run: ItemRun
    alone: bool = False


@dataclass(frozen=True, slots=True)
class Waiting(Generic[T]):
    """A ready item waiting for its batch, with what the worker resumes it by (`resume`), and
    since when (time.monotonic())."""

    ready: Ready
    resume: T
    since: float = field(default_factory=time.monotonic)


class Batches(Generic[T]):
    """The items waiting for the batched stage of one worker. `T` is what the worker resumes an
    item by once its process has run."""

    def __init__(self, stage: Stage, clock: Callable[[], float] = time.monotonic) -> None:
        self.stage = stage
        self.size = stage.batch
        self.wait_s = stage.batch_wait_s
        self._clock = clock
        self._waiting: list[Waiting[T]] = []
        self._alone: deque[Waiting[T]] = deque()
        self._ready_times: list[float] = []

    def __len__(self) -> int:
        return len(self._waiting) + len(self._alone)

    def add(self, ready: Ready, resume: T) -> None:
        """An item reached the batched stage."""
        waiting = Waiting(ready, resume, self._clock())
        (self._alone if ready.alone else self._waiting).append(waiting)

    def took_to_ready(self, seconds: float) -> None:
        """A claimed item took `seconds` to reach the batched stage (its earlier stages)."""
        self._ready_times.append(seconds)

    @property
    def time_to_ready(self) -> float:
        """The mean time an item took to reach the batched stage (0 before the first)."""
        times = self._ready_times
        return sum(times) / len(times) if times else 0.0

    def due(self) -> list[Waiting[T]]:
        """The items to run in one process now, or [] to make another item ready first: an item
        that runs alone, a full batch, or a batch whose first item would otherwise wait too
        long."""
        if self._alone:
            return [self._alone.popleft()]
        if len(self._waiting) >= self.size:
            return self._take(self.size)
        if self._waiting:
            waited = self._clock() - self._waiting[0].since
            if waited + self.time_to_ready > self.wait_s:
                return self._take(self.size)
        return []

    def take_all(self) -> list[Waiting[T]]:
        """What waits, for one process (no more items to wait for): an item that runs alone
        first, else up to a batch."""
        return self.due() or self._take(self.size)

    def _take(self, count: int) -> list[Waiting[T]]:
        taken, self._waiting = self._waiting[:count], self._waiting[count:]
        return taken
