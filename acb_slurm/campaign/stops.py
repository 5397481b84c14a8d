"""Stop requests: SIGTERM, SIGINT and SIGHUP stop a campaign worker cleanly.

The first signal is forwarded to the running stage as SIGTERM (a later one as SIGKILL); the
worker checks `check()` between steps and stops there. While the worker waits for something that
does not return on its own (a GPU lease), the signal raises `WorkerStopped` at once.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType

from acb_slurm.campaign.errors import CampaignError
from acb_slurm.supervise import Supervised

#: The signals that stop a worker.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class WorkerStopped(CampaignError):
    """The worker was asked to stop (SIGTERM, SIGINT, SIGHUP)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class StopRequests:
    """Whether the worker was asked to stop, and by which signal."""

    def __init__(self, running_stage: Callable[[], Supervised | None] = lambda: None) -> None:
        self._running_stage = running_stage
        self.signum: int | None = None
        self._interruptible = False

    def install(self) -> None:
        """Handle the stop signals (main thread only)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        """A stop signal arrived (the signal handler)."""
        first = self.signum is None
        self.signum = signum
        child = self._running_stage()
        if child is not None:  # (kept until the stage starts; nothing once it has ended)
            child.send_signal(signal.SIGTERM if first else signal.SIGKILL)
        elif self._interruptible:
            raise WorkerStopped(signum)

    def check(self) -> None:
        """Raise WorkerStopped if a stop was asked for."""
        if self.signum is not None:
            raise WorkerStopped(self.signum)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Within: a stop signal raises WorkerStopped at once (in the main thread), unless a
        stage runs. A stop asked for before raises on entry."""
        self._interruptible = True
        try:
            self.check()
            yield
        finally:
            self._interruptible = False
