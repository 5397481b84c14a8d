"""The campaign worker: claim an item, run its stages, record the outcome, repeat.

A gpu stage in `gate` mode holds a lease from the node's assigner exactly while its command runs
(CUDA_VISIBLE_DEVICES = the lease's device ids); in `auto` mode it runs under `acb-run --auto`.
A cpu stage sees no GPU (CUDA_VISIBLE_DEVICES=""). A failed item is retried up to `retries`
times, resuming after the stages already finished, then recorded as failed; it never stops the
campaign. SIGTERM/SIGINT stop the worker cleanly: the running stage gets the signal, the attempt
is recorded as interrupted (it does not count as a failure) and the claim is released.

A worker that finds its claim lost (taken over as stale after the worker was stopped, e.g. by
SIGSTOP or `scontrol suspend`, or cut off from the shared file system for longer than
`stale_after`) kills its stage's process group and drops the item: it writes no stage marker,
attempt record, done or failed record for it, as the worker that took it over owns them now.

A gate stage whose lease is lost while it runs (the assigner died or restarted, or dropped this
worker as silent) is killed at once, its whole process group with SIGKILL: its GPUs may already
be another process's. The attempt is recorded failed ("lease lost"), as any failed stage.

A stage with `batch` above 1 runs one process for several items (`batches`): an item's run
pauses at that stage, still claimed, until its batch runs; the process's result for it resumes
it. Each item keeps its own attempts, records, retries and resume; a stop request or a broken
set-up interrupts every item in flight, each recorded as such. Every item of a batch records its
result of the batched stage before any of them goes on to its later stages, so that what the
process did for each survives a stop or a crash during those. A batch process killed because the
claim on one of its items was lost interrupts its other items: their attempts do not count, and
they run again.

The worker is the loop; its parts are: `stops` (stop signals), `claims` (the claims' heartbeat
and their loss), `store` (the results directory), `attempts` (typed attempt records), `stages`
(one stage process: command, lease, process supervised by `acb_slurm.supervise`) and `batches`
(the items waiting for the batched stage, and when it runs).

An item's run is a generator (`ItemSteps`): it runs the item's stages and records, and yields
where the item waits for its batch (`Ready`); the worker sends it the process's result for the
item (a timing) or throws the failure in (StageFailed, StageInterrupted, ClaimLost,
WorkerStopped), which it handles as it would a stage it ran itself. Once it has recorded a
timing it yields again (None, `Step.PAUSED`) and goes on to its later stages when resumed.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import socket
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from acb_slurm import env as acb_env
from acb_slurm.campaign.attempts import Attempt, Outcome, StageTiming
from acb_slurm.campaign.batches import Batches, Ready, Waiting
from acb_slurm.campaign.claims import ClaimKeeper, ClaimLost
from acb_slurm.campaign.errors import CampaignError, StageFailed, StageInterrupted
from acb_slurm.campaign.gpu import LeaseProvider
from acb_slurm.campaign.items import Item, read_items
from acb_slurm.campaign.progress import ProgressDisplay
from acb_slurm.campaign.spec import CampaignSpec, Stage
from acb_slurm.campaign.stages import (
    ATTEMPT_ENV,
    CANNOT_START,
    ITEM_ENV,
    STAGE_ENV,
    STAGE_WRAPPER,
    ItemRun,
    StageResult,
    StageRunner,
    acb_run_command,
)
from acb_slurm.campaign.stops import StopRequests, WorkerStopped
from acb_slurm.campaign.store import Claim, ClaimState, ResultsStore, WorkerIdentity

__all__ = [
    # the stages' environment and wrapper, re-exported from `stages`
    "ATTEMPT_ENV",
    "CANNOT_START",
    "ITEM_ENV",
    "STAGE_ENV",
    "STAGE_WRAPPER",
    "ArrayTask",
    "ItemResult",
    "Worker",
    "WorkerSummary",
    "acb_run_command",
    "shard_order",
]

_LOST_LINE = (
    b"== the claim was taken over (this worker was stopped or cut off longer than stale_after): "
    b"stage killed, item dropped, nothing recorded by this worker\n"
)


class ItemResult(enum.StrEnum):
    """What a worker did with a claimed item."""

    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # already finished when we got the claim
    INTERRUPTED = "interrupted"
    LOST = "lost"  # our claim was taken over: dropped, the new holder runs it


#: One item's run: yields where the item waits for its batch (Ready), is sent the batched
#: stage's timing for it (or has the failure thrown in), yields None once it has recorded that
#: timing (resumed with None for its later stages), returns what became of the item.
ItemSteps = Generator[Ready | None, StageTiming | None, ItemResult]


class Step(enum.Enum):
    """Where an item's run stopped when the worker resumed it."""

    WAITS = "waits"  # for its batch (added to `batches`)
    PAUSED = "paused"  # it recorded its batched stage's result; resume it for its later stages
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class ArrayTask:
    """This worker's Slurm array task (index from 0) and the number of tasks."""

    index: int = 0
    count: int = 1

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ArrayTask:
        """The array task from SLURM_ARRAY_TASK_ID/COUNT/MIN/STEP (one task outside arrays)."""
        env = os.environ if environ is None else environ
        try:
            task = int(env["SLURM_ARRAY_TASK_ID"])
            count = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
            low = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = max(1, int(env.get("SLURM_ARRAY_TASK_STEP", "1")))
        except (KeyError, ValueError):
            return cls()
        count = max(1, count)
        return cls(((task - low) // step) % count, count)

    @property
    def label(self) -> str:
        """'index/count' in an array, '' otherwise (shown in records and logs)."""
        return f"{self.index}/{self.count}" if self.count > 1 else ""


def shard_order(items: Sequence[Item], task: ArrayTask) -> list[Item]:
    """The order a worker tries items in: the list rotated to this array task's shard, so tasks
    start on different items and, once their shard is done, help with the others'."""
    if not items:
        return []
    offset = task.index * len(items) // task.count
    return [*items[offset:], *items[:offset]]


@dataclass
class WorkerSummary:
    """What one worker did."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    took_over: list[str] = field(default_factory=list)
    stopped_by: int | None = None

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal that stopped the worker."""
        return 128 + self.stopped_by if self.stopped_by else 0


class Worker:
    """One campaign worker process. `run()` loops until no item is left to claim.

    It orchestrates: stop requests (`StopRequests`), the claim's heartbeat (`ClaimKeeper`), the
    results directory (`ResultsStore`), typed attempt records (`Attempt`), GPU leases
    (`LeaseProvider`) and the stage processes (`Supervised`)."""

    def __init__(
        self,
        spec: CampaignSpec,
        *,
        name: str | None = None,
        array_task: ArrayTask | None = None,
        leases: LeaseProvider | None = None,
        max_items: int | None = None,
        stream: TextIO | None = None,
        progress: bool = True,
        tty: bool | None = None,
    ) -> None:
        self.spec = spec
        self.name = name or acb_env.worker_name()
        self.array_task = array_task or ArrayTask.from_env()
        self.max_items = max_items
        self.store = ResultsStore(spec.results, spec.stale_after_s)
        self.me = WorkerIdentity.current(self.name, self.array_task.label)
        self.items = read_items(spec.items)
        self.order = shard_order(self.items, self.array_task)
        self.display = ProgressDisplay(
            self.store,
            (i.id for i in self.items),
            spec.name,
            stream=stream,
            interval_s=spec.progress_interval_s,
            tty=tty,
            enabled=progress,
            reporter_lock=spec.results
            / f".progress-{os.environ.get('SLURM_JOB_ID') or socket.gethostname()}.lock",
        )
        self.summary = WorkerSummary()
        self._finished: set[str] = set()
        self._in_flight: set[ItemSteps] = set()  # claimed items whose run has not ended
        batched = spec.batched_stage
        self.batches: Batches[ItemSteps] | None = None if batched is None else Batches(batched)
        self.stops = StopRequests(lambda: self.stages.child)
        self.claims = ClaimKeeper(
            self.store, spec.heartbeat_s, on_lost=self._claim_lost, on_tick=self.display.tick
        )
        self.stages = StageRunner(
            spec, self.store, self.name, stops=self.stops, claims=self.claims, leases=leases
        )

    def install_signal_handlers(self) -> None:
        """SIGTERM, SIGINT and SIGHUP stop the worker cleanly (main thread only)."""
        self.stops.install()

    # ---- the loop ----

    def run(self) -> WorkerSummary:
        """Claim and process items until none is left (or --max-items, or a signal)."""
        self.store.create()
        self.claims.start()
        self.display.say(
            f"{self.name}: campaign {self.spec.name}: {len(self.items)} items, stages "
            f"{', '.join(s.name for s in self.spec.stages)}; results in {self.spec.results}"
            + (f"; array task {self.array_task.label}" if self.array_task.label else "")
        )
        try:
            self._loop()
        except CampaignError as exc:
            # Stopped, or the set-up is broken: every item in flight is interrupted (recorded
            # so, its claim released), then the worker stops.
            if isinstance(exc, WorkerStopped):
                self.summary.stopped_by = exc.signum
            self._interrupt_in_flight(exc)
            if not isinstance(exc, WorkerStopped):
                raise
            self.display.say(f"{self.name}: {exc}; claims released, the items stay for others")
        finally:
            self.claims.stop()
            self.display.close()
        self.display.say(
            f"{self.name}: finished: {len(self.summary.done)} done, "
            f"{len(self.summary.failed)} failed, {len(self.summary.skipped)} skipped"
            + (f", {len(self.summary.lost)} lost to a takeover" if self.summary.lost else "")
        )
        return self.summary

    def _loop(self) -> None:
        batches = self.batches
        while True:
            self.stops.check()
            due = batches.due() if batches is not None else []
            if due:
                self._run_batch(due)
                continue
            claimed = self._claim_next() if self._wants_more() else None
            if claimed is not None:
                self._start(*claimed)
            elif batches:  # nothing more to claim: never wait for a batch that cannot fill
                self._run_batch(batches.take_all())
            else:
                return

    def _wants_more(self) -> bool:
        """False once --max-items items have been finished (done or failed) by this worker, or
        are in flight."""
        finished = len(self.summary.done) + len(self.summary.failed)
        return self.max_items is None or finished + len(self._in_flight) < self.max_items

    def _start(self, item: Item, claim: Claim) -> None:
        """Run a claimed item until it ends or waits for its batch."""
        self.claims.hold(claim)
        steps = self._process(item, claim)
        self._in_flight.add(steps)
        began = time.monotonic()
        if self._advance(steps) is Step.WAITS and self.batches is not None:
            self.batches.took_to_ready(time.monotonic() - began)

    def _run_batch(self, batch: list[Waiting[ItemSteps]]) -> None:
        """One process of the batched stage for the items of `batch`, then each item on: every
        item that the process did its part for records it first (a stage marker, so that a stop or
        a crash in the later stages of one item does not lose the others' results), then each
        item goes on (its later stages, or its failure: a retry, a record)."""
        assert self.batches is not None
        results = self.stages.run(self.batches.stage, [w.ready.run for w in batch])
        done = {
            id(waiting): self._advance(waiting.resume, result)
            for waiting, result in zip(batch, results, strict=True)
            if not isinstance(result, Exception)
        }
        for waiting, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                self._advance(waiting.resume, result)
            elif done[id(waiting)] is Step.PAUSED:
                self._advance(waiting.resume)

    def _advance(self, steps: ItemSteps, result: StageResult | CampaignError | None = None) -> Step:
        """Resume an item's run (with its batched stage's result, if any) until it waits for its
        next batch, pauses after recording its batched stage's result, or ends. An error it ends
        with is raised."""
        try:
            ready = steps.throw(result) if isinstance(result, Exception) else steps.send(result)
        except StopIteration:
            self._in_flight.discard(steps)
            return Step.ENDED
        except BaseException:
            self._in_flight.discard(steps)
            raise
        if ready is None:
            return Step.PAUSED
        assert self.batches is not None  # only a batched stage yields
        self.batches.add(ready, steps)
        return Step.WAITS

    def _interrupt_in_flight(self, exc: CampaignError) -> None:
        """Throw `exc` (a fresh copy for each) into every item still in flight (waiting for its
        batch, paused after it, or whose batch stopped): each records its attempt interrupted
        and releases its claim. An item that cannot (an error of the file system) is said and
        left: the others are interrupted all the same."""
        for steps in list(self._in_flight):
            try:
                self._advance(steps, _fresh(exc))
            except CampaignError:
                pass  # what it was told, handed back
            except Exception as error:
                self._in_flight.discard(steps)
                self.display.say(
                    f"{self.name}: could not record an item in flight as interrupted: "
                    f"{type(error).__name__}: {error}"
                )
            finally:
                try:
                    steps.close()
                except Exception as error:
                    self.display.say(f"{self.name}: closing an item's run failed: {error}")

    def _claim_lost(self, claim: Claim) -> None:
        """On the ticker thread: the heartbeat found `claim` lost. Its stage is killed now; the
        main thread drops the item at its next check (the other items of a batch process killed
        so are interrupted: `StageInterrupted`, an attempt that does not count)."""
        child = self.stages.child
        if child is not None and self.stages.runs_for(claim):
            child.kill("claim lost")
        self.display.say(
            f"{self.name}: lost the claim on {claim.item_id} (taken over as "
            "stale: this worker was stopped or cut off longer than stale_after); "
            "killing its stage and dropping the item"
        )

    def _claim_next(self) -> tuple[Item, Claim] | None:
        for item in self.order:
            if item.id in self._finished:
                continue
            if self.store.is_finished(item.id):
                self._finished.add(item.id)
                continue
            claim = self.store.try_claim(item.id, self.me)
            if claim is None:
                info = self.store.read_claim(item.id)
                if info is None:
                    claim = self.store.try_claim(item.id, self.me)
                elif info.finished:
                    # A tombstone: finished, even if its done/failed record is not visible here
                    # yet (NFS caches negative lookups).
                    self._finished.add(item.id)
                    continue
                elif self.store.is_stale(info):
                    claim = self.store.take_over(info, self.me)
                    if claim is not None:
                        holder = info.data.get("worker", "?")
                        self.display.say(
                            f"{self.name}: took over {item.id} from {holder} "
                            f"(pid {info.data.get('pid', '?')} on {info.data.get('host', '?')} "
                            "is gone)"
                        )
                        self.summary.took_over.append(item.id)
                if claim is None:
                    continue
            state = self.store.finished_state(item.id)
            if state is not None:
                # Finished by a worker that died before leaving its tombstone: leave it now.
                self.store.finish(claim, state, self.me)
                self._finished.add(item.id)
                continue
            return item, claim
        return None

    def _finish(self, claim: Claim, state: ClaimState) -> None:
        """Leave the finished item's tombstone; the heartbeat stops first, so that it does not
        take the tombstone for a lost claim."""
        self.claims.drop(claim)
        self.store.finish(claim, state, self.me)

    # ---- one item ----

    def _process(self, item: Item, claim: Claim) -> ItemSteps:
        try:
            result = yield from self._process_claimed(item, claim)
        except ClaimLost:
            self.display.say(
                f"{self.name}: {item.id} dropped: its claim was taken over by "
                f"{self._holder(item.id)}; nothing recorded by this worker"
            )
            result = ItemResult.LOST
        finally:
            self.claims.drop(claim)
        getattr(self.summary, result.value).append(item.id)
        return result

    def _holder(self, item_id: str) -> str:
        info = self.store.read_claim(item_id)
        if info is None:
            return "another worker"
        return f"{info.data.get('worker', '?')} on {info.data.get('host', '?')}"

    def _process_claimed(self, item: Item, claim: Claim) -> ItemSteps:
        store = self.store
        store.prepare_item(item)
        previous = store.attempt_records(item.id)
        for i, record in enumerate(previous):
            if record.outcome is Outcome.RUNNING:
                # We hold the claim, so whoever ran this attempt is gone: it crashed.
                previous[i] = record = dataclasses.replace(
                    record, outcome=Outcome.CRASHED, error="the worker running this attempt died"
                )
                store.write_attempt(item.id, record)
        counted = [r for r in previous if r.counts]
        attempt = max((r.attempt for r in previous), default=0) + 1
        while True:
            if len(counted) >= self.spec.max_attempts:
                return self._record_failed(item, claim, counted)
            # After a failed attempt the item's batched stage runs in a process of its own.
            alone = bool(counted) and counted[-1].outcome is Outcome.FAILED
            try:
                record = yield from self._attempt(item, claim, attempt, alone)
            except CampaignError:
                self.summary.interrupted.append(item.id)
                store.release(claim)
                raise
            if record.outcome is Outcome.DONE:
                return self._record_done(item, claim, record)
            if record.outcome is Outcome.INTERRUPTED:
                # Its batch process was killed for another item's lost claim: not counted.
                self.display.say(
                    f"{self.name}: {item.id} attempt {attempt} interrupted: {record.error}"
                )
                attempt += 1
                continue
            counted.append(record)
            self.display.say(
                f"{self.name}: {item.id} attempt {attempt} failed: {record.error}"
                + ("; retrying" if len(counted) < self.spec.max_attempts else "")
            )
            attempt += 1

    def _record_failed(self, item: Item, claim: Claim, counted: list[Attempt]) -> ItemResult:
        last = counted[-1]
        self.claims.ensure(claim)
        self.store.record_failed(
            item.id,
            {
                "item": item.id,
                "attempts": len(counted),
                "error": "unknown" if last.error is None else last.error,
                "log": last.log,
                "worker": self.name,
                "failed_at": time.time(),
            },
        )
        self._finish(claim, ClaimState.FAILED)
        self._finished.add(item.id)
        self.display.say(
            f"{self.name}: {item.id} FAILED after {len(counted)} attempts: "
            f"{last.error} (log: {last.log})"
        )
        return ItemResult.FAILED

    def _record_done(self, item: Item, claim: Claim, record: Attempt) -> ItemResult:
        self.claims.ensure(claim)
        assert record.ended is not None  # an attempt that ended
        published = self.store.record_done(
            item.id,
            {
                "item": item.id,
                "worker": self.name,
                "host": self.me.host,
                "pid": self.me.pid,
                "array_task": self.array_task.label,
                "attempt": record.attempt,
                "started": record.started,
                "finished": record.ended,
                "stages": {name: dict(timing) for name, timing in record.stages.items()},
            },
        )
        self._finish(claim, ClaimState.DONE)
        self._finished.add(item.id)
        if not published:
            return ItemResult.SKIPPED
        took = record.ended - record.started
        self.display.say(f"{self.name}: {item.id} done in {took:.1f}s (attempt {record.attempt})")
        return ItemResult.DONE

    def _attempt(
        self, item: Item, claim: Claim, attempt: int, alone: bool
    ) -> Generator[Ready | None, StageTiming | None, Attempt]:
        store = self.store
        log_path = store.attempt_log(item.id, attempt)
        record = Attempt(
            attempt=attempt,
            item=item.id,
            worker=self.name,
            host=self.me.host,
            pid=self.me.pid,
            started=time.time(),
            log=str(log_path),
        )
        self.claims.ensure(claim)
        store.write_attempt(item.id, record)
        outcome, error = Outcome.RUNNING, None
        lost = False
        with open(log_path, "ab", buffering=0) as log:
            try:
                for stage in self.spec.stages:
                    self.stops.check()
                    if store.stage_done(item.id, stage.name):
                        log.write(f"== stage {stage.name}: done in an earlier attempt\n".encode())
                        continue
                    self.claims.ensure(claim)
                    store.write_state(
                        item.id,
                        {
                            "stage": stage.name,
                            "attempt": attempt,
                            "worker": self.name,
                            "since": time.time(),
                        },
                    )
                    timing = yield from self._run_stage(
                        stage, ItemRun(item, attempt, claim, log), alone
                    )
                    self.claims.ensure(claim)
                    record = record.with_stage(stage.name, timing)
                    store.mark_stage_done(item.id, stage.name, timing)
                    if self._batched(stage):
                        # Recorded: the worker records its batch's other items before any of
                        # them goes on to its later stages.
                        yield None
                outcome = Outcome.DONE
            except ClaimLost:
                lost = True
                log.write(_LOST_LINE)
                raise
            except StageFailed as exc:
                outcome, error = Outcome.FAILED, str(exc)
                log.write(f"== {exc}\n".encode())
            except StageInterrupted as exc:
                outcome, error = Outcome.INTERRUPTED, str(exc)
                log.write(f"== {exc}\n".encode())
            except CampaignError as exc:
                # Stopped by a signal, or the set-up is broken (no assigner): not the item's
                # fault, so the attempt does not count against its retries.
                outcome, error = Outcome.INTERRUPTED, str(exc)
                log.write(f"== {exc}\n".encode())
                raise
            finally:
                if not lost:
                    # A failed or interrupted attempt is recorded only by the claim's holder too.
                    try:
                        self.claims.ensure(claim)
                    except ClaimLost:
                        log.write(_LOST_LINE)
                        raise
                    record = record.ending(outcome, time.time(), error)
                    store.write_attempt(item.id, record)
        return record

    def _batched(self, stage: Stage) -> bool:
        """Whether `stage` is the batched stage (its items wait for their batch)."""
        return self.batches is not None and stage is self.batches.stage

    def _run_stage(
        self, stage: Stage, run: ItemRun, alone: bool
    ) -> Generator[Ready | None, StageTiming | None, StageTiming]:
        """Run one stage of the item: here, or (the batched stage) by waiting for its batch:
        the worker sends the process's timing for the item, or throws its failure in."""
        if not self._batched(stage):
            return self.stages.run_one(stage, run)
        timing = yield Ready(run, alone)
        assert timing is not None
        return timing


def _fresh(exc: CampaignError) -> CampaignError:
    """A new exception saying what `exc` says, for one item's run: one object thrown into
    several generators would gather all their tracebacks."""
    if isinstance(exc, WorkerStopped):
        return WorkerStopped(exc.signum)
    return CampaignError(str(exc))
