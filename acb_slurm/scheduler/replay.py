"""Replay an assigner's event log into a fresh `Scheduler` and check it grants what the log says.

The core is a pure function of the calls it gets, so the `request`, `release`, `withdraw` and
`disconnect` events of one node's log, fed in order, must reproduce its `grant` events exactly
(same lease, same GPUs, same memory). Events are the decoded JSON lines (dicts); reading the file
is the caller's business.

How events map to calls:

* `start` gives the inventory and (unless `policy` is given) the policy. A second `start` of the
  same node (a restarted daemon) begins a fresh scheduler.
* `request` -> `submit` (with its `affinity_key` and `required_gpus`, when present);
  `release` -> `release`; `withdraw` -> `withdraw`; `disconnect` -> `disconnect` (its
  `leases`, when present, must be the leases the client held, or all it held and waited for).
  The per-lease `release`/`withdraw` lines with reason `disconnect` are covered by the
  `disconnect` event and skipped; `release` lines with reason `shutdown` end the replay of that
  daemon run (grants a shutdown would make are never committed).
* `usage` (`lease`, `resident_bytes`: a holder's measured memory, gpu-sharing) -> `update_usage`;
  a log without these events replays exactly only where no holder was re-charged.
* `withdraw` with reason `shutdown` and `stop` end the daemon run like a shutdown `release`.
* each `grant` must match the oldest grant the scheduler made that the log has not yet shown.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from acb_slurm import defaults
from acb_slurm.scheduler.core import Scheduler
from acb_slurm.scheduler.policies import Policy
from acb_slurm.scheduler.types import Gpu, Grant, Request, SchedulerError

__all__ = ["ReplayMismatch", "replay"]


class ReplayMismatch(SchedulerError):
    """The log and the scheduler disagree: a grant differs, is missing, or an event cannot apply."""


def replay(
    events: Iterable[Mapping[str, Any]],
    policy: str | Policy | None = None,
    *,
    max_bypass: int = 8,
    node: str | None = None,
) -> Scheduler:
    """Feed one node's events into a fresh Scheduler; return it in its final state.

    `policy` overrides the one the `start` event names. `node` picks a node in a merged log
    (default: the node of the first `start`). Raises `ReplayMismatch` naming the event (its
    position, counting from 1) where log and scheduler disagree.
    """
    scheduler: Scheduler | None = None
    expected: deque[Grant] = deque()
    stopped = False  # a shutdown began: the rest of this daemon run commits nothing new
    position = 0
    for position, event in enumerate(events, start=1):
        kind = event.get("event")
        if node is None and kind == "start":
            node = event.get("node")
        if node is not None and event.get("node", node) != node:
            continue
        where = f"event {position} ({kind})"
        if kind == "start":
            _check_all_shown(expected, where)
            try:
                scheduler = Scheduler(_inventory(event, where), _policy(policy, event), max_bypass)
            except (SchedulerError, ValueError, TypeError) as error:
                raise ReplayMismatch(f"{where}: cannot build the scheduler: {error}") from error
            stopped = False
            continue
        if kind == "stop":
            stopped = True
            continue
        if kind not in ("request", "grant", "release", "withdraw", "disconnect", "usage"):
            continue
        if scheduler is None:
            raise ReplayMismatch(f"{where}: comes before any `start` event of node {node!r}")
        if stopped:
            continue
        try:
            if kind == "grant":
                _match_grant(event, expected, where)
            elif kind == "request":
                expected.extend(scheduler.submit(_request(event, where)))
            elif kind == "release":
                reason = event.get("reason", "release")
                if reason == "shutdown":
                    stopped = True
                elif reason != "disconnect":
                    expected.extend(scheduler.release(_field(event, "lease", where)))
            elif kind == "withdraw":
                reason = event.get("reason", "cancelled")
                if reason == "shutdown":
                    stopped = True
                elif reason != "disconnect":
                    expected.extend(scheduler.withdraw(_field(event, "lease", where)))
            elif kind == "usage":
                resident = int(_field(event, "resident_bytes", where))
                expected.extend(scheduler.update_usage(_field(event, "lease", where), resident))
            else:
                client = _field(event, "client", where)
                held = sorted(r for r, g in scheduler.holdings.items() if g.client_id == client)
                dropped, grants = scheduler.disconnect(client)
                logged = event.get("leases")
                if logged is not None and sorted(logged) not in (held, sorted(dropped)):
                    raise ReplayMismatch(
                        f"{where}: the log releases leases {sorted(logged)}, "
                        f"the scheduler released {held}"
                    )
                expected.extend(grants)
        except ReplayMismatch:
            raise
        except SchedulerError as error:
            raise ReplayMismatch(f"{where}: the scheduler refused it: {error}") from error
    if scheduler is None:
        raise ReplayMismatch(f"no `start` event for node {node!r} in {position} events")
    _check_all_shown(expected, "the end of the log")
    return scheduler


def _field(event: Mapping[str, Any], name: str, where: str) -> Any:
    try:
        return event[name]
    except KeyError:
        raise ReplayMismatch(f"{where}: has no field {name!r}") from None


def _inventory(event: Mapping[str, Any], where: str) -> list[Gpu]:
    gpus = sorted(_field(event, "gpus", where), key=lambda g: int(g["index"]))
    return [
        Gpu(
            index=int(g["index"]),
            memory_bytes=int(g["memory_bytes"]),
            device_id=str(g.get("device_id", g["index"])),
            uuid=str(g.get("uuid", "")),
            name=str(g.get("name", "")),
        )
        for g in gpus
    ]


def _policy(policy: str | Policy | None, event: Mapping[str, Any]) -> str | Policy:
    if policy is not None:
        return policy
    return str(event.get("policy") or defaults.POLICY)


def _request(event: Mapping[str, Any], where: str) -> Request:
    return Request(
        request_id=str(_field(event, "lease", where)),
        client_id=str(_field(event, "client", where)),
        gpu_count=int(event.get("gpu_count", 1)),
        memory_bytes=int(event.get("memory_bytes", 0)),
        priority=int(event.get("priority", 0)),
        affinity_key=str(event.get("affinity_key", "")),
        required_gpus=tuple(int(i) for i in event.get("required_gpus") or ()),
    )


def _match_grant(event: Mapping[str, Any], expected: deque[Grant], where: str) -> None:
    lease = _field(event, "lease", where)
    gpus = tuple(int(i) for i in _field(event, "gpus", where))
    if not expected:
        raise ReplayMismatch(
            f"{where}: the log grants lease {lease!r} GPUs {list(gpus)}, "
            "the scheduler granted nothing at this point"
        )
    grant = expected.popleft()
    logged_memory = event.get("memory_bytes")
    if (
        grant.request_id != lease
        or grant.gpu_indices != gpus
        or (logged_memory is not None and int(logged_memory) != grant.memory_bytes)
    ):
        raise ReplayMismatch(
            f"{where}: the log grants lease {lease!r} GPUs {list(gpus)} "
            f"({logged_memory} bytes), the scheduler granted lease {grant.request_id!r} "
            f"GPUs {list(grant.gpu_indices)} ({grant.memory_bytes} bytes)"
        )


def _check_all_shown(expected: deque[Grant], where: str) -> None:
    if expected:
        missing = ", ".join(f"{g.request_id!r} on {list(g.gpu_indices)}" for g in expected)
        raise ReplayMismatch(f"at {where}: the scheduler granted {missing}, the log never did")
