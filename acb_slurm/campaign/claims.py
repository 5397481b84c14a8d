"""Keeping the claims a worker holds alive, and noticing when one is lost.

A worker holds the claim of the item it runs, and of the items that wait for their batch (a
stage with `batch` above 1). `ClaimKeeper`'s ticker thread touches each every `heartbeat_s` (its
mtime is the heartbeat others judge staleness by) and, when the heartbeat finds a claim no
longer ours (taken over as stale after this worker was stopped, e.g. by SIGSTOP or
`scontrol suspend`, or cut off from the shared file system longer than `stale_after`), marks it
lost and calls `on_lost` (the worker kills the stage). The worker checks with `ensure()` before
every write that only the claim's holder may make, which is a heartbeat too.

The same thread calls `on_tick` every tick (the worker's progress display).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

from acb_slurm.campaign.store import Claim, ResultsStore


class ClaimLost(Exception):
    """This worker's claim on the item it runs is gone (taken over as stale): drop the item."""

    def __init__(self, item_id: str) -> None:
        self.item_id = item_id
        super().__init__(f"lost the claim on {item_id}")


class ClaimKeeper:
    """The claims this worker holds now: their heartbeat, and whether each is lost."""

    def __init__(
        self,
        store: ResultsStore,
        heartbeat_s: float,
        *,
        on_lost: Callable[[Claim], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        tick_s: float = 1.0,
        name: str = "campaign-ticker",
    ) -> None:
        self.store = store
        self.heartbeat_s = heartbeat_s
        self.tick_s = tick_s
        self._on_lost = on_lost
        self._on_tick = on_tick
        self._claims: dict[Claim, None] = {}  # held, in the order taken
        # The claims found lost (by the heartbeat or a check before a write).
        self._lost: set[Claim] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ---- the claims held now ----

    @property
    def held(self) -> tuple[Claim, ...]:
        """The claims being kept alive now, in the order taken."""
        return tuple(self._claims)

    def hold(self, claim: Claim) -> None:
        """Keep `claim` alive from now on (the worker starts to run its item)."""
        self._claims[claim] = None

    def drop(self, claim: Claim) -> None:
        """Stop keeping `claim` alive: its item is finished (its claim becomes a tombstone,
        which the heartbeat must not take for a lost claim) or given up."""
        self._claims.pop(claim, None)

    def is_lost(self, claim: Claim) -> bool:
        """Whether `claim` was found lost."""
        return claim in self._lost

    def ensure(self, claim: Claim) -> None:
        """Raise ClaimLost unless `claim` is still in place; called before every write that only
        the claim's holder may make. It is also a heartbeat: a worker that was stopped refreshes
        its claim here before anyone can judge it stale."""
        if claim in self._lost or not self.store.heartbeat(claim):
            self._lost.add(claim)
            raise ClaimLost(claim.item_id)

    def still_held(self, claim: Claim) -> bool:
        """`ensure` as a question: False (and the claim marked lost) when it is gone."""
        try:
            self.ensure(claim)
        except ClaimLost:
            return False
        return True

    # ---- the ticker ----

    def start(self) -> None:
        """Start the ticker thread."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the ticker thread and wait for it (at most `timeout` seconds)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def __enter__(self) -> ClaimKeeper:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(self.tick_s):
            now = time.monotonic()
            if now - last_beat >= self.heartbeat_s and self._claims:
                last_beat = now
                self.beat()
            if self._on_tick is not None:
                with contextlib.suppress(OSError):
                    self._on_tick()

    def beat(self) -> bool:
        """One heartbeat of every claim held now; False when one was found lost just now (then
        `on_lost` has been called for it)."""
        fine = True
        for claim in self.held:
            with contextlib.suppress(OSError):
                if self.store.heartbeat(claim):
                    continue
                if claim not in self._claims or claim in self._lost:
                    continue  # just finished (a tombstone) meanwhile, or already known lost
                self._lost.add(claim)
                fine = False
                if self._on_lost is not None:
                    self._on_lost(claim)
        return fine
