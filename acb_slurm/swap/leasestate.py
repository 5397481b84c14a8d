"""Automatic mode's lease state machine: named phases, explicit transitions, no torch.

`LeaseState` is the bookkeeping only: which phase the process is in, which lease it holds, which
leases the client said were lost, which yield is pending, which GPUs the process is bound to.
`AutoSwap` does the work around each transition (asking the lessor, onloading, offloading) with
its lock held; `lease_lost` and `request_yield` come from the client's session thread without it.

    from                  transition         to
    AWAY                  acquiring()        ACQUIRING
    ACQUIRING             acquiring()        ACQUIRING   the last acquire failed (no assigner)
    ACQUIRING             granted(lease)     ACQUIRING with the lease (unless already lost)
    ACQUIRING with lease  resident()         HOLDING     onloaded (or nothing to onload)
    HOLDING               resident()         HOLDING     a pending yield was no safe point
    HOLDING               releasing()        RELEASING   idle, a yield, swap_out, uninstall
    ACQUIRING with lease  releasing()        RELEASING   its onload failed: give it back
    RELEASING             refused()          HOLDING     the swap-out failed, data on the device
    RELEASING             released()         AWAY        the state is in host memory
    RELEASING             resident(), releasing()        a swap-out interrupted by a
                                                         BaseException (KeyboardInterrupt)
    any                   forget()           AWAY        the lease dropped, not given back
                                                         (uninstall, teardown, a forked child)

Every other transition raises `TransitionError` (a bug in automatic mode; all of them are listed
by tests/swap/test_leasestate.py): e.g. acquiring with a lease held, or releasing without one.

A lost lease (`lose`) is judged by phase: not the one held → `LostVerdict.NOT_HELD` (the state
is in host memory; the next device call asks for a new lease); after shutdown →
`LostVerdict.AFTER_EXIT`; while a grant is taken into use or a swap-out runs →
`LostVerdict.DEFERRED` (that step calls `lost_while_held` when it ends); HOLDING →
`LostVerdict.STOP` (the data sits on a GPU that may be someone else's: the process stops).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SwapLease:
    """What a grant gives automatic mode: its id and the devices to use."""

    lease_id: str
    device_ids: tuple[str, ...] = ()


class DeviceLessor(Protocol):
    """The client seam automatic mode needs: acquire/release one lease and report usage."""

    def acquire(self) -> SwapLease:
        """Block until a lease is granted."""
        ...

    def release(self, lease: SwapLease, *, yielded: bool = False) -> None:
        """Give `lease` back; `yielded` when it answers a YieldRequest (sends YieldDone)."""
        ...

    def report_usage(self, lease: SwapLease, resident_bytes: int) -> None:
        """Tell the assigner how many device bytes this process holds under `lease`."""
        ...

    def abandon(self) -> None:
        """After a failed release: end the session so that the assigner frees what it held."""
        ...


class Phase(enum.StrEnum):
    """Where the program stands: AWAY (no lease, storages in host memory) → ACQUIRING →
    HOLDING (lease held, storages resident) → RELEASING → AWAY."""

    AWAY = "away"
    ACQUIRING = "acquiring"
    HOLDING = "holding"
    RELEASING = "releasing"


class LostVerdict(enum.Enum):
    """What a lost lease means for the process (`LeaseState.lose`)."""

    NOT_HELD = "not-held"  # not the lease held: the state is in host memory, ask again later
    AFTER_EXIT = "after-exit"  # the program already ended (shutdown): nothing to stop
    DEFERRED = "deferred"  # a grant or swap-out is under way: it checks when it ends
    STOP = "stop"  # held with the state on the device: stop the process


class Pin(enum.Enum):
    """How a grant's GPUs relate to the GPUs the process is bound to (`LeaseState.pin`)."""

    NONE = "none"  # the grant names no GPU: nothing to bind
    FIRST = "first"  # the first grant: the process is bound to its GPUs from now on
    SAME = "same"  # a later grant of the same GPUs
    OTHER = "other"  # a later grant of other GPUs (a bug: the request was pinned)


class TransitionError(RuntimeError):
    """A transition the state machine does not have (a bug in automatic mode)."""


class LeaseState:
    """The phase, the lease held, lost leases, a pending yield and the GPU binding."""

    def __init__(self) -> None:
        self.phase = Phase.AWAY
        self.lease: SwapLease | None = None
        #: Lease ids the client said were lost (kept: a grant already lost is dropped at once).
        self.lost: set[str] = set()
        #: The lease id a YieldRequest named, until a safe point honours (or drops) it.
        self.yield_for: str | None = None
        #: The GPUs of the first grant (CUDA): every later grant must name them.
        self.pinned: tuple[str, ...] | None = None
        #: The program ended (shutdown): no lease is asked for again, a loss stops nothing.
        self.exiting = False

    def __repr__(self) -> str:
        lease = self.lease.lease_id if self.lease is not None else None
        return f"LeaseState({self.phase.value}, lease={lease}, yield_for={self.yield_for})"

    def _expect(self, event: str, *phases: Phase, lease: bool | None = None) -> None:
        if self.phase not in phases or (lease is not None and (self.lease is not None) != lease):
            raise TransitionError(f"{event} in {self!r}")

    # ---- transitions (AutoSwap's lock held) ----------------------------------------------------

    def acquiring(self) -> None:
        """A lease is about to be asked for (again, after an acquire that failed)."""
        self._expect("acquiring", Phase.AWAY, Phase.ACQUIRING, lease=False)
        self.phase = Phase.ACQUIRING

    def granted(self, lease: SwapLease) -> bool:
        """The lessor granted `lease`. False when it was already lost: it is not held (forget
        it and ask again)."""
        self._expect("granted", Phase.ACQUIRING, lease=False)
        self.lease = lease
        if lease.lease_id in self.lost:
            self.lease = None
            return False
        return True

    def resident(self) -> None:
        """The state is on the device under the lease held (after an onload, or with nothing
        to onload)."""
        self._expect("resident", Phase.ACQUIRING, Phase.HOLDING, Phase.RELEASING, lease=True)
        self.phase = Phase.HOLDING

    def releasing(self) -> None:
        """A swap-out and release start."""
        self._expect("releasing", Phase.HOLDING, Phase.ACQUIRING, Phase.RELEASING, lease=True)
        self.phase = Phase.RELEASING

    def refused(self) -> None:
        """The swap-out failed with the data still on the device: the lease is kept."""
        self._expect("refused", Phase.RELEASING, lease=True)
        self.phase = Phase.HOLDING

    def released(self) -> SwapLease:
        """The state is in host memory: the lease goes back (returned, to give to the lessor)."""
        self._expect("released", Phase.RELEASING, lease=True)
        lease, self.lease = self.lease, None
        self.phase = Phase.AWAY
        assert lease is not None
        return lease

    def forget(self) -> SwapLease | None:
        """Drop the lease without giving it back (its session ends with the process, or it is
        a forked child's copy); returns what was held."""
        lease, self.lease = self.lease, None
        self.phase = Phase.AWAY
        return lease

    def pin(self, device_ids: tuple[str, ...]) -> Pin:
        """Bind the process to the first grant's GPUs; say how a later grant matches them."""
        if not device_ids:
            return Pin.NONE
        if self.pinned is None:
            self.pinned = device_ids
            return Pin.FIRST
        return Pin.SAME if device_ids == self.pinned else Pin.OTHER

    # ---- events from other threads ---------------------------------------------------------------

    def lose(self, lease_id: str) -> LostVerdict:
        """The client says `lease_id` was lost. Recorded first: a grant or swap-out under way on
        another thread checks `lost_while_held` after changing the phase."""
        self.lost.add(lease_id)
        lease = self.lease
        if lease is None or lease.lease_id != lease_id:
            return LostVerdict.NOT_HELD
        if self.exiting:
            return LostVerdict.AFTER_EXIT
        if self.phase in (Phase.RELEASING, Phase.ACQUIRING):
            return LostVerdict.DEFERRED
        return LostVerdict.STOP

    def lost_while_held(self) -> str | None:
        """The id of the lease held if it was lost meanwhile (and the program still runs)."""
        lease = self.lease
        if lease is not None and lease.lease_id in self.lost and not self.exiting:
            return lease.lease_id
        return None

    def request_yield(self, lease_id: str) -> bool:
        """A YieldRequest for `lease_id`: pending until a safe point, if it is the lease held."""
        if self.lease is None or self.lease.lease_id != lease_id:
            return False
        self.yield_for = lease_id
        return True

    @property
    def yield_due(self) -> bool:
        """A pending yield names the lease held (at a safe point: release it)."""
        return self.lease is not None and self.lease.lease_id == self.yield_for
