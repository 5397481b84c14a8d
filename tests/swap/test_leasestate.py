"""Automatic mode's lease state machine (`LeaseState`) on its own: every transition of every phase,
lost leases, yields and the GPU binding, without torch calls or a lessor."""

from __future__ import annotations

import pytest

from acb_slurm.swap.leasestate import (
    LeaseState,
    LostVerdict,
    Phase,
    Pin,
    SwapLease,
    TransitionError,
)
from acb_slurm.swap.watchdog import MAX_RETRY_S, next_backoff

A, B = SwapLease("a", ("0",)), SwapLease("b", ("1",))

#: The states the machine can be in: (phase, lease held). ACQUIRING with a lease is a grant
#: whose onload has not finished (or failed).
STATES = {
    "away": (Phase.AWAY, None),
    "acquiring": (Phase.ACQUIRING, None),
    "granted": (Phase.ACQUIRING, A),
    "holding": (Phase.HOLDING, A),
    "releasing": (Phase.RELEASING, A),
}


def state_in(name: str) -> LeaseState:
    state = LeaseState()
    state.phase, state.lease = STATES[name]
    return state


def grant_a(state: LeaseState) -> object:
    return state.granted(A)


EVENTS = {
    "acquiring": LeaseState.acquiring,
    "granted": grant_a,
    "resident": LeaseState.resident,
    "releasing": LeaseState.releasing,
    "refused": LeaseState.refused,
    "released": LeaseState.released,
    "forget": LeaseState.forget,
}

#: (state, event) → the state after it; absent: TransitionError, and nothing changes.
TRANSITIONS = {
    ("away", "acquiring"): "acquiring",
    ("away", "forget"): "away",
    ("acquiring", "acquiring"): "acquiring",  # the last acquire failed (no assigner): again
    ("acquiring", "granted"): "granted",
    ("acquiring", "forget"): "away",
    ("granted", "resident"): "holding",
    ("granted", "releasing"): "releasing",  # the onload failed: give the lease back
    ("granted", "forget"): "away",
    ("holding", "resident"): "holding",  # resident again (a yield that was not a safe point)
    ("holding", "releasing"): "releasing",
    ("holding", "forget"): "away",
    ("releasing", "resident"): "holding",  # a swap-out interrupted (KeyboardInterrupt)
    ("releasing", "releasing"): "releasing",
    ("releasing", "refused"): "holding",
    ("releasing", "released"): "away",
    ("releasing", "forget"): "away",
}


def name_of(state: LeaseState) -> str:
    return next(n for n, s in STATES.items() if s == (state.phase, state.lease))


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("start", STATES)
def test_every_transition_of_every_state(start: str, event: str) -> None:
    state = state_in(start)
    expected = TRANSITIONS.get((start, event))
    if expected is None:
        with pytest.raises(TransitionError, match=event):
            EVENTS[event](state)
        assert name_of(state) == start
    else:
        EVENTS[event](state)
        assert name_of(state) == expected


def test_a_lease_s_life_and_what_released_and_forget_hand_back() -> None:
    state = LeaseState()
    assert state.phase is Phase.AWAY and state.lease is None
    state.acquiring()
    assert state.granted(A)
    state.resident()
    state.releasing()
    assert state.released() is A
    assert state.phase is Phase.AWAY and state.lease is None
    state.acquiring()
    state.granted(B)
    assert state.forget() is B and state.forget() is None


def test_a_grant_lost_before_it_is_used_is_dropped_and_asked_again() -> None:
    state = LeaseState()
    state.acquiring()
    assert state.lose("a") is LostVerdict.NOT_HELD  # the session ended as it granted
    assert not state.granted(A)
    assert state.lease is None and state.phase is Phase.ACQUIRING
    state.acquiring()
    assert state.granted(B)
    state.resident()
    assert state.lost_while_held() is None


@pytest.mark.parametrize(
    ("start", "lost", "exiting", "verdict"),
    [
        ("away", "a", False, LostVerdict.NOT_HELD),
        ("acquiring", "a", False, LostVerdict.NOT_HELD),
        ("holding", "b", False, LostVerdict.NOT_HELD),  # an older lease
        ("holding", "a", True, LostVerdict.AFTER_EXIT),
        ("releasing", "a", True, LostVerdict.AFTER_EXIT),
        ("granted", "a", False, LostVerdict.DEFERRED),
        ("releasing", "a", False, LostVerdict.DEFERRED),
        ("holding", "a", False, LostVerdict.STOP),
    ],
)
def test_a_lost_lease_is_judged_by_the_phase(
    start: str, lost: str, exiting: bool, verdict: LostVerdict
) -> None:
    state = state_in(start)
    state.exiting = exiting
    assert state.lose(lost) is verdict
    assert lost in state.lost  # recorded in any case
    assert name_of(state) == start  # judging changes no phase


def test_a_loss_deferred_during_a_grant_is_seen_once_resident() -> None:
    state = state_in("granted")
    assert state.lose("a") is LostVerdict.DEFERRED
    state.resident()
    assert state.lost_while_held() == "a"  # the slow path stops the program here
    state.exiting = True
    assert state.lost_while_held() is None


def test_a_loss_deferred_during_a_swap_out() -> None:
    refused = state_in("releasing")
    assert refused.lose("a") is LostVerdict.DEFERRED
    refused.refused()  # the data is still on the device: the program must stop
    assert refused.lost_while_held() == "a"
    done = state_in("releasing")
    done.lose("a")
    done.released()  # the state reached host memory: nothing lost
    assert done.lost_while_held() is None and done.phase is Phase.AWAY


def test_a_yield_is_pending_only_for_the_lease_held() -> None:
    state = state_in("away")
    assert not state.request_yield("a") and state.yield_for is None
    state = state_in("holding")
    assert not state.request_yield("b") and not state.yield_due
    assert state.request_yield("a") and state.yield_for == "a" and state.yield_due
    state.releasing()
    state.released()
    assert state.yield_for == "a" and not state.yield_due  # a later lease is not the one named


def test_the_process_is_bound_to_its_first_grant_s_gpus() -> None:
    state = LeaseState()
    assert state.pin(()) is Pin.NONE and state.pinned is None
    assert state.pin(("2", "3")) is Pin.FIRST and state.pinned == ("2", "3")
    assert state.pin(("2", "3")) is Pin.SAME
    assert state.pin(("1",)) is Pin.OTHER and state.pinned == ("2", "3")


def test_failed_swap_outs_back_off_from_idle_over_4_doubling_to_a_bound() -> None:
    waits, wait = [], 0.0
    for _ in range(14):
        wait = next_backoff(wait, idle_s=0.04)
        waits.append(wait)
    assert waits[:4] == [0.01, 0.02, 0.04, 0.08]
    assert waits[-1] == MAX_RETRY_S and max(waits) == MAX_RETRY_S
