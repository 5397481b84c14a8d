"""Scenario tables for each policy: a sequence of calls and the grants each must return.

A step is `(command, expected)`. Commands:

    submit ID by CLIENT [gpus=N] [mem=SIZE] [prio=P] [key=K] [req=I,J]
                                                      -> grants, e.g. "a@0 b@1,2"
                                                         (req: the required GPUs; gpus=
                                                         defaults to their number)
    release ID | withdraw ID | usage ID SIZE          -> grants
    disconnect CLIENT                                 -> "dropped ids | grants"
    queue                                             -> waiting ids in service order
    holders GPU                                       -> ids holding the GPU
    promised GPU                                      -> promised bytes, as a size
    bypassed ID                                       -> the waiter's bypass count
    remembered                                        -> affinity keys remembered, e.g. "w1@0"
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from acb_slurm.scheduler import Gpu, Grant, Request, Scheduler
from acb_slurm.units import format_size, parse_size


@dataclass(frozen=True)
class Scenario:
    name: str
    policy: str
    gpus: str  # comma-separated GPU memory sizes, e.g. "80GiB,80GiB"
    steps: list[tuple[str, str]]
    max_bypass: int = 8


def make_scheduler(gpus: str, policy: str, max_bypass: int = 8) -> Scheduler:
    """A scheduler over GPUs written as "80GiB,40GiB" (index = position)."""
    inventory = [
        Gpu(index=i, memory_bytes=parse_size(size), device_id=str(i))
        for i, size in enumerate(gpus.split(","))
    ]
    return Scheduler(inventory, policy, max_bypass)


def show(grants: list[Grant]) -> str:
    return " ".join(f"{g.request_id}@{','.join(map(str, g.gpu_indices))}" for g in grants)


def run(scheduler: Scheduler, command: str) -> str:
    """Apply one table command and describe its answer as the tables write it."""
    verb, *args = command.split()
    if verb == "submit":
        request_id, by, client, *options = args
        assert by == "by", f"write 'submit ID by CLIENT ...', got {command!r}"
        fields = dict(option.split("=", 1) for option in options)
        required = tuple(int(i) for i in fields.pop("req", "").split(",") if i)
        request = Request(
            request_id=request_id,
            client_id=client,
            gpu_count=int(fields.pop("gpus", len(required) or 1)),
            memory_bytes=parse_size(fields.pop("mem", 0)),
            priority=int(fields.pop("prio", 0)),
            affinity_key=fields.pop("key", ""),
            required_gpus=required,
        )
        assert not fields, f"unknown options {sorted(fields)} in {command!r}"
        return show(scheduler.submit(request))
    if verb == "release":
        return show(scheduler.release(args[0]))
    if verb == "withdraw":
        return show(scheduler.withdraw(args[0]))
    if verb == "usage":
        return show(scheduler.update_usage(args[0], parse_size(args[1])))
    if verb == "disconnect":
        dropped, grants = scheduler.disconnect(args[0])
        return f"{' '.join(dropped)} | {show(grants)}".strip()
    if verb == "queue":
        return " ".join(r.request_id for r in scheduler.queue)
    if verb == "holders":
        return " ".join(scheduler.holders_of(int(args[0])))
    if verb == "promised":
        return format_size(scheduler.promised_bytes(int(args[0])))
    if verb == "bypassed":
        return str(scheduler.bypass_count(args[0]))
    if verb == "remembered":
        memory = scheduler.affinity_memory
        return " ".join(f"{k}@{','.join(map(str, memory[k]))}" for k in sorted(memory))
    raise AssertionError(f"unknown table command {command!r}")


SCENARIOS = [
    # ---- simple ------------------------------------------------------------------------------
    Scenario(
        "the first requests take the free GPUs in index order",
        "simple",
        "80GiB,80GiB",
        [("submit a by c1", "a@0"), ("submit b by c2", "b@1"), ("submit c by c3", "")],
    ),
    Scenario(
        "a released GPU goes to the oldest waiter",
        "simple",
        "80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2", ""),
            ("submit c by c3", ""),
            ("queue", "b c"),
            ("release a", "b@0"),
            ("release b", "c@0"),
            ("queue", ""),
        ],
    ),
    Scenario(
        "a higher priority is served before earlier arrivals",
        "simple",
        "80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2", ""),
            ("submit c by c3 prio=5", ""),
            ("queue", "c b"),
            ("release a", "c@0"),
        ],
    ),
    Scenario(
        "simple gives a whole GPU even to a request with a memory estimate",
        "simple",
        "80GiB,80GiB",
        [
            ("submit a by c1 mem=10GiB", "a@0"),
            ("submit b by c2 mem=10GiB", "b@1"),
            ("promised 0", "80.0GiB"),
            ("submit c by c3 mem=10GiB", ""),
        ],
    ),
    Scenario(
        "a withdrawn waiter leaves the queue and is never granted",
        "simple",
        "80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2", ""),
            ("submit c by c3", ""),
            ("withdraw b", ""),
            ("queue", "c"),
            ("release a", "c@0"),
        ],
    ),
    Scenario(
        "a disconnect frees the client's GPUs and drops its waits",
        "simple",
        "80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c1", ""),
            ("submit c by c2", ""),
            ("disconnect c1", "a b | c@0"),
            ("queue", ""),
            ("disconnect nobody", "|"),
        ],
    ),
    Scenario(
        "simple never gives a GPU smaller than the memory asked",
        "simple",
        "16GiB,80GiB",
        [("submit a by c1 mem=40GiB", "a@1"), ("submit b by c2 mem=40GiB", "")],
    ),
    Scenario(
        "simple backfills a small GPU past a waiter that needs a large one",
        "simple",
        "16GiB,80GiB",
        [
            ("submit a by c1 mem=40GiB", "a@1"),
            ("submit b by c2 mem=40GiB", ""),
            ("submit c by c3", "c@0"),
            ("bypassed b", "1"),
            ("release a", "b@1"),
        ],
    ),
    Scenario(
        "a pinned request waits for its GPU while another one is free",
        "simple",
        "80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2", "b@1"),
            ("submit c by c3 req=1", ""),
            ("release a", ""),
            ("holders 0", ""),
            ("queue", "c"),
            ("release b", "c@1"),
        ],
    ),
    Scenario(
        "a pinned request takes its free GPU even when a lower one is free",
        "simple",
        "80GiB,80GiB,80GiB",
        [("submit a by c1 req=2", "a@2"), ("submit b by c2", "b@0"), ("submit c by c3", "c@1")],
    ),
    Scenario(
        "others backfill past a pinned waiter until it holds a reservation",
        "simple",
        "80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2", "b@1"),
            ("submit c by c3 req=1", ""),
            ("release a", ""),
            ("submit d by c4", "d@0"),
            ("bypassed c", "1"),
            ("release d", ""),
            ("submit e by c5", ""),
            ("queue", "c e"),
            ("release b", "c@1 e@0"),
        ],
        max_bypass=1,
    ),
    Scenario(
        "pinned waiters of the same size but other GPUs are not skipped as one shape",
        "simple",
        "80GiB,80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2", "b@1"),
            ("submit c by c3", "c@2"),
            ("submit d by c4 req=0", ""),
            ("submit e by c5 req=1", ""),
            ("submit f by c6 req=1", ""),
            ("submit g by c7", ""),
            ("release b", "e@1"),
            ("queue", "d f g"),
            ("release c", "g@2"),
            ("release a", "d@0"),
        ],
    ),
    # ---- gpu-sharing -------------------------------------------------------------------------
    Scenario(
        "requests share a GPU while their promises fit its memory",
        "gpu-sharing",
        "80GiB",
        [
            ("submit a by c1 mem=30GiB", "a@0"),
            ("submit b by c2 mem=30GiB", "b@0"),
            ("promised 0", "60.0GiB"),
            ("submit c by c3 mem=30GiB", ""),
            ("holders 0", "a b"),
            ("release a", "c@0"),
            ("holders 0", "b c"),
        ],
    ),
    Scenario(
        "a promise exactly filling the GPU is granted",
        "gpu-sharing",
        "80GiB",
        [("submit a by c1 mem=50GiB", "a@0"), ("submit b by c2 mem=30GiB", "b@0")],
    ),
    Scenario(
        "a whole-GPU request waits for an empty GPU and smaller ones backfill",
        "gpu-sharing",
        "80GiB",
        [
            ("submit a by c1 mem=30GiB", "a@0"),
            ("submit b by c2", ""),
            ("submit c by c3 mem=10GiB", "c@0"),
            ("bypassed b", "1"),
            ("release a", ""),
            ("release c", "b@0"),
            ("promised 0", "80.0GiB"),
            ("submit d by c4 mem=1GiB", ""),
        ],
    ),
    Scenario(
        "two GPUs: shared requests spread over both before any shares one",
        "gpu-sharing",
        "80GiB,80GiB",
        [
            ("submit a by c1 mem=30GiB", "a@0"),
            ("submit b by c2 mem=30GiB", "b@1"),
            ("submit c by c3 mem=30GiB", "c@0"),
            ("submit d by c4 mem=30GiB", "d@1"),
            ("submit e by c5 mem=30GiB", ""),
            ("release b", "e@1"),
            ("release a", ""),
            ("release c", ""),
            ("submit f by c6 mem=30GiB", "f@0"),
            ("holders 0", "f"),
            ("holders 1", "d e"),
        ],
    ),
    Scenario(
        "two GPUs: promises with no unit (bytes) still spread, one lease per GPU at a time",
        "gpu-sharing",
        "80GiB,80GiB",
        [
            ("submit a by c1 mem=30", "a@0"),
            ("submit b by c2 mem=30", "b@1"),
            ("submit c by c3 mem=30", "c@0"),
            ("submit d by c4 mem=30", "d@1"),
            ("submit e by c5 mem=30", "e@0"),
            ("holders 0", "a c e"),
            ("holders 1", "b d"),
        ],
    ),
    Scenario(
        "a shared request joins the held GPU with the fewest holders",
        "gpu-sharing",
        "80GiB,80GiB",
        [
            ("submit a by c1 mem=10GiB", "a@0"),
            ("submit b by c2 mem=10GiB", "b@1"),
            ("submit c by c3 mem=10GiB", "c@0"),
            ("release b", ""),
            ("submit d by c4 mem=10GiB", "d@1"),
            ("submit e by c5 mem=10GiB", "e@1"),
            ("submit f by c6 mem=10GiB", "f@0"),
        ],
    ),
    Scenario(
        "an idle GPU wins over a held one even where best fit would share",
        "gpu-sharing",
        "80GiB,80GiB",
        [
            ("submit a by c1 mem=60GiB", "a@0"),
            ("submit b by c2 mem=10GiB", "b@1"),
            ("submit c by c3 mem=70GiB", "c@1"),
            ("submit d by c4 mem=70GiB", ""),
        ],
    ),
    Scenario(
        "among idle GPUs the smallest that fits, among held ones the fewest holders",
        "gpu-sharing",
        "80GiB,40GiB",
        [
            ("submit a by c1 mem=10GiB", "a@1"),
            ("submit b by c2 mem=10GiB", "b@0"),
            ("submit c by c3 mem=50GiB", "c@0"),
            ("submit d by c4 mem=10GiB", "d@1"),
        ],
    ),
    Scenario(
        "a multi-GPU shared request takes idle GPUs first",
        "gpu-sharing",
        "80GiB,80GiB,80GiB",
        [
            ("submit a by c1 mem=10GiB", "a@0"),
            ("submit b by c2 gpus=2 mem=10GiB", "b@1,2"),
            ("submit c by c3 gpus=2 mem=10GiB", "c@0,1"),
        ],
    ),
    Scenario(
        "a whole-GPU waiter behind spread shared holders reserves and the GPUs drain for it",
        "gpu-sharing",
        "80GiB,80GiB",
        [
            ("submit a by c1 mem=10GiB", "a@0"),
            ("submit b by c2 mem=10GiB", "b@1"),
            ("submit c by c3", ""),
            ("submit d by c4 mem=10GiB", "d@0"),
            ("submit e by c5 mem=10GiB", "e@1"),
            ("bypassed c", "2"),
            ("submit f by c6 mem=10GiB", ""),
            ("release a", ""),
            ("release d", "c@0 f@1"),
        ],
        max_bypass=2,
    ),
    Scenario(
        "gpu-sharing:pack: best fit puts a small request on the fuller GPU, the empty one whole",
        "gpu-sharing:pack",
        "80GiB,80GiB",
        [
            ("submit a by c1 mem=60GiB", "a@0"),
            ("submit b by c2 mem=10GiB", "b@0"),
            ("submit c by c3 mem=70GiB", "c@1"),
        ],
    ),
    Scenario(
        "gpu-sharing:pack: shared requests stack on one GPU, a whole-GPU request gets the other",
        "gpu-sharing:pack",
        "80GiB,80GiB",
        [
            ("submit a by c1 mem=30GiB", "a@0"),
            ("submit b by c2 mem=30GiB", "b@0"),
            ("submit c by c3", "c@1"),
            ("submit d by c4 mem=30GiB", ""),
            ("release a", "d@0"),
        ],
    ),
    Scenario(
        "a whole-GPU request takes an empty GPU, never a shared one",
        "gpu-sharing",
        "80GiB,80GiB",
        [
            ("submit a by c1 mem=10GiB", "a@0"),
            ("submit b by c2", "b@1"),
            ("submit c by c3 mem=10GiB", "c@0"),
        ],
    ),
    Scenario(
        "an exclusive request takes the smallest empty GPU",
        "gpu-sharing",
        "80GiB,40GiB",
        [("submit a by c1", "a@1"), ("submit b by c2", "b@0")],
    ),
    Scenario(
        "gpu-sharing refuses a request no GPU has room for right now",
        "gpu-sharing",
        "40GiB,40GiB",
        [
            ("submit a by c1 mem=30GiB", "a@0"),
            ("submit b by c2 mem=30GiB", "b@1"),
            ("submit c by c3 mem=20GiB", ""),
            ("submit d by c4 mem=10GiB", "d@0"),
            ("queue", "c"),
        ],
    ),
    Scenario(
        "a holder resident beyond its promise tightens the GPU and shrinking back makes room",
        "gpu-sharing",
        "80GiB",
        [
            ("submit a by c1 mem=40GiB", "a@0"),
            ("usage a 70GiB", ""),
            ("promised 0", "70.0GiB"),
            ("submit b by c2 mem=20GiB", ""),
            ("usage a 10GiB", "b@0"),
            ("promised 0", "60.0GiB"),
        ],
    ),
    Scenario(
        "usage of an exclusive holder or a waiter changes nothing",
        "gpu-sharing",
        "80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2 mem=10GiB", ""),
            ("usage a 5GiB", ""),
            ("usage b 5GiB", ""),
            ("promised 0", "80.0GiB"),
        ],
    ),
    Scenario(
        "a multi-GPU shared request needs room on enough GPUs at once",
        "gpu-sharing",
        "80GiB,80GiB,80GiB",
        [
            ("submit a by c1 mem=70GiB", "a@0"),
            ("submit b by c2 gpus=3 mem=20GiB", ""),
            ("submit c by c3 gpus=2 mem=20GiB", "c@1,2"),
            ("release a", "b@0,1,2"),
            ("promised 1", "40.0GiB"),
        ],
    ),
    Scenario(
        "a pinned shared request joins its GPU even where best fit would put it elsewhere",
        "gpu-sharing",
        "80GiB,80GiB",
        [
            ("submit a by c1 mem=60GiB", "a@0"),
            ("submit b by c2 mem=10GiB req=1", "b@1"),
            ("submit c by c3 mem=10GiB", "c@0"),
            ("promised 1", "10.0GiB"),
        ],
    ),
    Scenario(
        "a pinned shared request waits for room on its GPU while another GPU is empty",
        "gpu-sharing",
        "80GiB,80GiB",
        [
            ("submit a by c1 mem=70GiB", "a@0"),
            ("submit b by c2 mem=20GiB req=0", ""),
            ("submit c by c3 mem=20GiB", "c@1"),
            ("bypassed b", "1"),
            ("release c", ""),
            ("release a", "b@0"),
            ("promised 0", "20.0GiB"),
        ],
    ),
    Scenario(
        "a pinned whole-GPU request waits for its GPU to empty",
        "gpu-sharing",
        "80GiB,40GiB",
        [
            ("submit a by c1 mem=10GiB", "a@1"),
            ("submit b by c2 req=1", ""),
            ("submit c by c3 mem=10GiB", "c@0"),
            ("submit d by c4 mem=10GiB req=1", "d@1"),
            ("release c", ""),
            ("release a", ""),
            ("release d", "b@1"),
            ("promised 1", "40.0GiB"),
        ],
    ),
    Scenario(
        "pinned shared waiters of one size are placed by their own GPU's room",
        "gpu-sharing",
        "80GiB,80GiB",
        [
            ("submit a by c1 mem=70GiB req=0", "a@0"),
            ("submit b by c2 mem=70GiB req=1", "b@1"),
            ("submit c by c3 mem=30GiB req=0", ""),
            ("submit d by c4 mem=30GiB req=1", ""),
            ("release b", "d@1"),
            ("queue", "c"),
        ],
    ),
    # ---- gpu-affinity ------------------------------------------------------------------------
    Scenario(
        "a client gets back the GPUs it held last",
        "gpu-affinity",
        "80GiB,80GiB,80GiB,80GiB",
        [
            ("submit a by c1 gpus=2", "a@0,1"),
            ("submit b by c2 gpus=2", "b@2,3"),
            ("release a", ""),
            ("release b", ""),
            ("submit c by c2 gpus=2", "c@2,3"),
            ("submit d by c1 gpus=2", "d@0,1"),
        ],
    ),
    Scenario(
        "a new client avoids the GPUs another client held last",
        "gpu-affinity",
        "80GiB,80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("release a", ""),
            ("submit b by c2", "b@1"),
            ("submit c by c1", "c@0"),
        ],
    ),
    Scenario(
        "a client asking for more GPUs than before takes its free last GPUs first",
        "gpu-affinity",
        "80GiB,80GiB,80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2", "b@1"),
            ("submit c by c3", "c@2"),
            ("release a", ""),
            ("release c", ""),
            ("submit d by c3 gpus=2", "d@2,3"),
        ],
    ),
    Scenario(
        "a disconnected client's last GPUs are forgotten",
        "gpu-affinity",
        "80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("release a", ""),
            ("disconnect c1", "|"),
            ("submit b by c2", "b@0"),
        ],
    ),
    Scenario(
        "a worker that reconnects under its affinity key gets its last GPU back",
        "gpu-affinity",
        "80GiB,80GiB,80GiB,80GiB",
        [
            ("submit a by s1 key=w1", "a@0"),
            ("release a", ""),
            ("disconnect s1", "|"),
            ("submit b by s2 key=w2", "b@1"),
            ("submit c by s3 key=w1", "c@0"),
            ("remembered", "w1@0 w2@1"),
        ],
    ),
    Scenario(
        "a disconnected key is forgotten once another key was granted its GPUs",
        "gpu-affinity",
        "80GiB,80GiB",
        [
            ("submit a by s1 key=w1", "a@0"),
            ("submit b by s2 key=w2", "b@1"),
            ("release a", ""),
            ("disconnect s1", "|"),
            ("submit c by s3 key=w3", "c@0"),
            ("remembered", "w2@1 w3@0"),
            ("release b", ""),
            ("submit d by s4 key=w1", "d@1"),
        ],
    ),
    Scenario(
        "a key stays remembered while one of its clients is connected",
        "gpu-affinity",
        "80GiB,80GiB",
        [
            ("submit a by s1 key=w1", "a@0"),
            ("release a", ""),
            ("submit b by s2 key=w2", "b@1"),
            ("release b", ""),
            ("submit c by s3 key=w3 gpus=2", "c@0,1"),
            ("remembered", "w1@0 w2@1 w3@0,1"),
            ("disconnect s1", "|"),
            ("remembered", "w2@1 w3@0,1"),
        ],
    ),
    Scenario(
        "a client without a key is remembered under its own id until it disconnects",
        "gpu-affinity",
        "80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("release a", ""),
            ("remembered", "c1@0"),
            ("disconnect c1", "|"),
            ("remembered", ""),
        ],
    ),
    Scenario(
        "a pinned request waits for its last GPU although another one is free",
        "gpu-affinity",
        "80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("release a", ""),
            ("submit b by c2 req=0", "b@0"),
            ("submit c by c1 req=0", ""),
            ("holders 1", ""),
            ("release b", "c@0"),
        ],
    ),
    Scenario(
        "a pinned multi-GPU request gets exactly its GPUs and is remembered on them",
        "gpu-affinity",
        "80GiB,80GiB,80GiB,80GiB",
        [
            ("submit a by c1 gpus=2", "a@0,1"),
            ("release a", ""),
            ("submit b by c1 req=3,1", "b@1,3"),
            ("remembered", "c1@1,3"),
            ("submit c by c2 req=2,3", ""),
            ("submit d by c3 gpus=2", "d@0,2"),
            ("release b", ""),
            ("release d", "c@2,3"),
        ],
    ),
    Scenario(
        "a small request backfills past a blocked multi-GPU one",
        "gpu-affinity",
        "80GiB,80GiB,80GiB,80GiB",
        [
            ("submit a by c1 gpus=3", "a@0,1,2"),
            ("submit b by c2 gpus=2", ""),
            ("submit c by c3", "c@3"),
            ("bypassed b", "1"),
            ("release a", "b@0,1"),
        ],
    ),
    Scenario(
        "backfill stops once a waiter has been bypassed max_bypass times",
        "gpu-affinity",
        "80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2 gpus=2", ""),
            ("submit c by c3", "c@1"),
            ("release c", ""),
            ("submit d by c4", "d@1"),
            ("bypassed b", "2"),
            ("release d", ""),
            ("submit e by c5", ""),
            ("queue", "b e"),
            ("release a", "b@0,1"),
            ("release b", "e@0"),
        ],
        max_bypass=2,
    ),
    Scenario(
        "the bypass bound reached inside one pass stops the rest of that pass",
        "gpu-affinity",
        "80GiB,80GiB,80GiB,80GiB",
        [
            ("submit a by c1 gpus=3", "a@0,1,2"),
            ("submit b by c2 gpus=4", ""),
            ("submit c by c3", "c@3"),
            ("submit d by c4", ""),
            ("submit e by c5", ""),
            ("release a", "d@0"),
            ("bypassed b", "2"),
            ("queue", "b e"),
            ("release c", ""),
            ("release d", "b@0,1,2,3"),
        ],
        max_bypass=2,
    ),
    Scenario(
        "max_bypass 0 serves strictly in order",
        "gpu-affinity",
        "80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2 gpus=2", ""),
            ("submit c by c3", ""),
            ("release a", "b@0,1"),
        ],
        max_bypass=0,
    ),
    Scenario(
        "a higher priority still goes before a reserved waiter",
        "gpu-affinity",
        "80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2 gpus=2", ""),
            ("submit c by c3", ""),
            ("submit d by c4 prio=1", "d@1"),
            ("queue", "b c"),
        ],
        max_bypass=0,
    ),
    Scenario(
        "withdrawing a reserved waiter lets the queue move",
        "gpu-affinity",
        "80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2 gpus=2", ""),
            ("submit c by c3", ""),
            ("withdraw b", "c@1"),
        ],
        max_bypass=0,
    ),
    Scenario(
        "a disconnect of a reserved waiter's client lets the queue move",
        "gpu-affinity",
        "80GiB,80GiB",
        [
            ("submit a by c1", "a@0"),
            ("submit b by c2 gpus=2", ""),
            ("submit c by c3", ""),
            ("disconnect c2", "b | c@1"),
        ],
        max_bypass=0,
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario: Scenario) -> None:
    scheduler = make_scheduler(scenario.gpus, scenario.policy, scenario.max_bypass)
    for number, (command, expected) in enumerate(scenario.steps, start=1):
        got = run(scheduler, command)
        assert got == expected, f"step {number} `{command}`: expected {expected!r}, got {got!r}"
