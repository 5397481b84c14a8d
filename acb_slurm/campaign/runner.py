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

Stages are started and supervised by `acb_slurm.supervise` (the exec wrapper `_deathwrap`, never
`preexec_fn`: the worker has threads): in their own process group, guarded, with PR_SET_PDEATHSIG
so that they die with their worker, and with their niceness.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO

from acb_slurm import _deathwrap as deathwrap
from acb_slurm import env as acb_env
from acb_slurm.campaign.errors import CampaignError, StageFailed
from acb_slurm.campaign.gpu import ClientLeaseProvider, HeldLease, LeaseProvider
from acb_slurm.campaign.items import Item, read_items
from acb_slurm.campaign.progress import ProgressDisplay
from acb_slurm.campaign.spec import CampaignSpec, Device, GpuMode, Stage, substitute
from acb_slurm.campaign.store import Claim, ClaimState, Outcome, ResultsStore, WorkerIdentity
from acb_slurm.launcher import acb_run_argv, acb_run_path
from acb_slurm.supervise import Supervised

#: Set for every stage command: which item, stage and attempt it runs for.
ITEM_ENV = acb_env.CAMPAIGN_ITEM
STAGE_ENV = acb_env.CAMPAIGN_STAGE
ATTEMPT_ENV = acb_env.CAMPAIGN_ATTEMPT

#: Run by `python -S -I` before every stage command: death signal and niceness, then exec.
STAGE_WRAPPER = Path(deathwrap.WRAPPER)
#: Its exit status when the command cannot be started.
CANNOT_START = deathwrap.CANNOT_START


_LOST_LINE = (
    b"== the claim was taken over (this worker was stopped or cut off longer than stale_after): "
    b"stage killed, item dropped, nothing recorded by this worker\n"
)


class ClaimLost(Exception):
    """This worker's claim on the item it runs is gone (taken over as stale): drop the item."""

    def __init__(self, item_id: str) -> None:
        self.item_id = item_id
        super().__init__(f"lost the claim on {item_id}")


class ItemResult(enum.StrEnum):
    """What a worker did with a claimed item."""

    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # already finished when we got the claim
    INTERRUPTED = "interrupted"
    LOST = "lost"  # our claim was taken over: dropped, the new holder runs it


class WorkerStopped(CampaignError):
    """The worker was asked to stop (SIGTERM, SIGINT, SIGHUP)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


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


def acb_run_command() -> str:
    """Path of `acb-run`: beside this Python (a venv) or on PATH."""
    try:
        return acb_run_path()
    except FileNotFoundError:
        raise CampaignError(
            "acb-run not found beside the Python interpreter or on PATH; install acb-slurm in "
            "the environment that runs the workers"
        ) from None


#: The worker forks stage processes that exec at once, so gRPC's fork handlers are not needed
#: (they only log "Other threads are currently calling into gRPC, skipping fork() handlers").
_GRPC_FORK_ENV = "GRPC_ENABLE_FORK_SUPPORT"


class Worker:
    """One campaign worker process. `run()` loops until no item is left to claim."""

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
        self.leases = leases
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
        self._claim: Claim | None = None
        # Set (by the heartbeat or a check before a write) to the claim found lost.
        self._lost_claim: Claim | None = None
        self._child: Supervised | None = None  # the running stage
        self._acquiring = False
        self._stop_signal: int | None = None
        self._ticker_stop = threading.Event()
        self._own_grpc_fork_env = _GRPC_FORK_ENV not in os.environ
        if self._own_grpc_fork_env:
            os.environ[_GRPC_FORK_ENV] = "false"

    # ---- signals ----

    def install_signal_handlers(self) -> None:
        """SIGTERM, SIGINT and SIGHUP stop the worker cleanly (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        first = self._stop_signal is None
        self._stop_signal = signum
        child = self._child
        if child is not None:  # (kept until the stage starts; nothing once it has ended)
            child.send_signal(signal.SIGTERM if first else signal.SIGKILL)
        elif self._acquiring:
            raise WorkerStopped(signum)

    def _check_stop(self) -> None:
        if self._stop_signal is not None:
            raise WorkerStopped(self._stop_signal)

    # ---- the loop ----

    def run(self) -> WorkerSummary:
        """Claim and process items until none is left (or --max-items, or a signal)."""
        self.store.create()
        ticker = threading.Thread(target=self._tick, name="campaign-ticker", daemon=True)
        ticker.start()
        self.display.say(
            f"{self.name}: campaign {self.spec.name}: {len(self.items)} items, stages "
            f"{', '.join(s.name for s in self.spec.stages)}; results in {self.spec.results}"
            + (f"; array task {self.array_task.label}" if self.array_task.label else "")
        )
        try:
            while self._wants_more():
                self._check_stop()
                claimed = self._claim_next()
                if claimed is None:
                    break
                item, claim = claimed
                self._lost_claim = None
                self._claim = claim
                try:
                    result = self._process(item, claim)
                finally:
                    self._claim = None
                getattr(self.summary, result.value).append(item.id)
        except WorkerStopped as exc:
            self.summary.stopped_by = exc.signum
            self.display.say(f"{self.name}: {exc}; claim released, the item stays for others")
        finally:
            self._ticker_stop.set()
            ticker.join(timeout=5)
            self.display.close()
        self.display.say(
            f"{self.name}: finished: {len(self.summary.done)} done, "
            f"{len(self.summary.failed)} failed, {len(self.summary.skipped)} skipped"
            + (f", {len(self.summary.lost)} lost to a takeover" if self.summary.lost else "")
        )
        return self.summary

    def _wants_more(self) -> bool:
        """False once --max-items items have been finished (done or failed) by this worker."""
        finished = len(self.summary.done) + len(self.summary.failed)
        return self.max_items is None or finished < self.max_items

    def _tick(self) -> None:
        """Background: heartbeat the current claim and show progress."""
        last_beat = time.monotonic()
        while not self._ticker_stop.wait(1.0):
            now = time.monotonic()
            claim = self._claim
            if claim is not None and now - last_beat >= self.spec.heartbeat_s:
                last_beat = now
                with contextlib.suppress(OSError):
                    if (
                        not self.store.heartbeat(claim)
                        and self._claim is claim  # not just finished (tombstone) meanwhile
                        and self._lost_claim is not claim
                    ):
                        # The stage is killed now; the main thread drops the item at its next
                        # check (_run_process).
                        self._lost_claim = claim
                        child = self._child
                        if child is not None and self._claim is claim:
                            child.kill("claim lost")
                        self.display.say(
                            f"{self.name}: lost the claim on {claim.item_id} (taken over as "
                            "stale: this worker was stopped or cut off longer than stale_after); "
                            "killing its stage and dropping the item"
                        )
            with contextlib.suppress(OSError):
                self.display.tick()

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
        self._claim = None
        self.store.finish(claim, state, self.me)

    def _ensure_claim(self, claim: Claim) -> None:
        """Raise ClaimLost unless our claim is still in place; called before every write that
        only the claim's holder may make. It is also a heartbeat: a worker that was stopped
        refreshes its claim here before anyone can judge it stale."""
        if self._lost_claim is claim or not self.store.heartbeat(claim):
            self._lost_claim = claim
            raise ClaimLost(claim.item_id)

    # ---- one item ----

    def _process(self, item: Item, claim: Claim) -> ItemResult:
        try:
            return self._process_claimed(item, claim)
        except ClaimLost:
            self.display.say(
                f"{self.name}: {item.id} dropped: its claim was taken over by "
                f"{self._holder(item.id)}; nothing recorded by this worker"
            )
            return ItemResult.LOST

    def _holder(self, item_id: str) -> str:
        info = self.store.read_claim(item_id)
        if info is None:
            return "another worker"
        return f"{info.data.get('worker', '?')} on {info.data.get('host', '?')}"

    def _process_claimed(self, item: Item, claim: Claim) -> ItemResult:
        store = self.store
        store.prepare_item(item)
        previous = store.attempts(item.id)
        for record in previous:
            if record.get("outcome") == Outcome.RUNNING:
                # We hold the claim, so whoever ran this attempt is gone: it crashed.
                record["outcome"] = "crashed"
                record["error"] = "the worker running this attempt died"
                store.write_attempt(item.id, int(record["attempt"]), record)
        counted = [r for r in previous if r.get("outcome") != Outcome.INTERRUPTED]
        attempt = max((int(r.get("attempt", 0)) for r in previous), default=0) + 1
        while True:
            if len(counted) >= self.spec.max_attempts:
                last = counted[-1]
                self._ensure_claim(claim)
                store.record_failed(
                    item.id,
                    {
                        "item": item.id,
                        "attempts": len(counted),
                        "error": last.get("error", "unknown"),
                        "log": last.get("log", ""),
                        "worker": self.name,
                        "failed_at": time.time(),
                    },
                )
                self._finish(claim, ClaimState.FAILED)
                self._finished.add(item.id)
                self.display.say(
                    f"{self.name}: {item.id} FAILED after {len(counted)} attempts: "
                    f"{last.get('error')} (log: {last.get('log')})"
                )
                return ItemResult.FAILED
            try:
                record = self._attempt(item, claim, attempt)
            except CampaignError:
                store.release(claim)
                self.summary.interrupted.append(item.id)
                raise
            if record["outcome"] == Outcome.DONE:
                self._ensure_claim(claim)
                stages = record["stages"]
                published = store.record_done(
                    item.id,
                    {
                        "item": item.id,
                        "worker": self.name,
                        "host": self.me.host,
                        "pid": self.me.pid,
                        "array_task": self.array_task.label,
                        "attempt": attempt,
                        "started": record["started"],
                        "finished": record["ended"],
                        "stages": stages,
                    },
                )
                self._finish(claim, ClaimState.DONE)
                self._finished.add(item.id)
                if not published:
                    return ItemResult.SKIPPED
                took = record["ended"] - record["started"]
                self.display.say(f"{self.name}: {item.id} done in {took:.1f}s (attempt {attempt})")
                return ItemResult.DONE
            counted.append(record)
            self.display.say(
                f"{self.name}: {item.id} attempt {attempt} failed: {record['error']}"
                + ("; retrying" if len(counted) < self.spec.max_attempts else "")
            )
            attempt += 1

    def _attempt(self, item: Item, claim: Claim, attempt: int) -> dict[str, Any]:
        store = self.store
        log_path = store.attempt_log(item.id, attempt)
        record: dict[str, Any] = {
            "attempt": attempt,
            "item": item.id,
            "worker": self.name,
            "host": self.me.host,
            "pid": self.me.pid,
            "started": time.time(),
            "outcome": Outcome.RUNNING.value,
            "log": str(log_path),
            "stages": {},
        }
        self._ensure_claim(claim)
        store.write_attempt(item.id, attempt, record)
        lost = False
        with open(log_path, "ab", buffering=0) as log:
            try:
                for stage in self.spec.stages:
                    self._check_stop()
                    if store.stage_done(item.id, stage.name):
                        log.write(f"== stage {stage.name}: done in an earlier attempt\n".encode())
                        continue
                    self._ensure_claim(claim)
                    store.write_state(
                        item.id,
                        {
                            "stage": stage.name,
                            "attempt": attempt,
                            "worker": self.name,
                            "since": time.time(),
                        },
                    )
                    timing = self._run_stage(item, stage, attempt, log)
                    self._ensure_claim(claim)
                    record["stages"][stage.name] = timing
                    store.mark_stage_done(item.id, stage.name, timing)
                record["outcome"] = Outcome.DONE.value
            except ClaimLost:
                lost = True
                log.write(_LOST_LINE)
                raise
            except StageFailed as exc:
                record["outcome"] = Outcome.FAILED.value
                record["error"] = str(exc)
                log.write(f"== {exc}\n".encode())
            except CampaignError as exc:
                # Stopped by a signal, or the set-up is broken (no assigner): not the item's
                # fault, so the attempt does not count against its retries.
                record["outcome"] = Outcome.INTERRUPTED.value
                record["error"] = str(exc)
                log.write(f"== {exc}\n".encode())
                raise
            finally:
                if not lost:
                    # A failed or interrupted attempt is recorded only by the claim's holder too.
                    try:
                        self._ensure_claim(claim)
                    except ClaimLost:
                        log.write(_LOST_LINE)
                        raise
                    record["ended"] = time.time()
                    store.write_attempt(item.id, attempt, record)
        return record

    def _values(self, item: Item, stage: Stage, attempt: int) -> dict[str, str]:
        store = self.store
        return {
            "item": item.id,
            "fasta": str(store.item_dir(item.id) / "input.fasta"),
            "sequence": item.sequence,
            "length": str(len(item.sequence)),
            "outdir": str(store.outdir(item.id)),
            "results": str(self.spec.results),
            "campaign_dir": str(self.spec.campaign_dir),
            "python": sys.executable,
            "attempt": str(attempt),
            "stage": stage.name,
        }

    def _run_stage(self, item: Item, stage: Stage, attempt: int, log: IO[bytes]) -> dict[str, Any]:
        values = self._values(item, stage, attempt)
        argv = [substitute(arg, values) for arg in stage.command]
        env = dict(os.environ)
        if self._own_grpc_fork_env:
            env.pop(_GRPC_FORK_ENV, None)
        env.update({k: substitute(v, values) for k, v in stage.env.items()})
        env[ITEM_ENV] = item.id
        env[STAGE_ENV] = stage.name
        env[ATTEMPT_ENV] = str(attempt)
        label = f"{item.id}/{stage.name}"
        timing: dict[str, Any] = {"device": stage.device.value}

        if stage.device is Device.CPU:
            env["CUDA_VISIBLE_DEVICES"] = ""
            return timing | self._run_process(stage, argv, env, item, log)

        if stage.mode is GpuMode.AUTO:
            env[acb_env.WORKER] = self.name
            argv = acb_run_argv(
                "auto",
                argv,
                label=label,
                priority=stage.priority,
                memory=stage.memory_bytes,
                program=acb_run_command(),
            )
            timing["mode"] = "auto"
            return timing | self._run_process(stage, argv, env, item, log)

        timing["mode"] = "gate"
        lease = self._acquire(stage, label, log)
        try:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(lease.device_ids)
            timing["device_ids"] = list(lease.device_ids)
            timing["lease_wait_s"] = round(lease.waited_s, 4)
            result = self._run_process(stage, argv, env, item, log, lease)
        finally:
            try:
                lease.release()
            except Exception as exc:
                # The session is gone (assigner restarted or unreachable): the assigner dropped
                # the lease with it, so there is nothing left to give back.
                log.write(f"== stage {stage.name}: releasing the lease failed: {exc}\n".encode())
        return timing | result

    def _acquire(self, stage: Stage, label: str, log: IO[bytes]) -> HeldLease:
        if self.leases is None:
            self.leases = ClientLeaseProvider()
        log.write(f"== stage {stage.name}: waiting for {stage.gpus} GPU(s)\n".encode())
        self._acquiring = True
        try:
            self._check_stop()
            return self.leases.acquire(
                gpus=stage.gpus,
                memory_bytes=stage.memory_bytes,
                priority=stage.priority,
                label=label,
            )
        except WorkerStopped:
            raise
        except Exception as exc:
            # The assigner cannot be reached or can never grant this: a problem of the set-up,
            # not of the item, so the worker stops instead of failing every item in turn.
            raise CampaignError(
                f"stage {stage.name}: cannot get a GPU lease from the assigner: {exc}"
            ) from exc
        finally:
            self._acquiring = False

    def _run_process(
        self,
        stage: Stage,
        argv: list[str],
        env: dict[str, str],
        item: Item,
        log: IO[bytes],
        lease: HeldLease | None = None,
    ) -> dict[str, Any]:
        log.write(
            f"== stage {stage.name} on {socket.gethostname()} by {self.name}: {argv!r}\n".encode()
        )
        claim = self._claim
        if claim is not None:
            self._ensure_claim(claim)  # a gpu stage may have waited long for its lease
        # Through the exec wrapper (death signal, niceness), in its own process group, which a
        # guard kills if this worker is killed outright (acb_slurm.supervise).
        child = Supervised(
            argv,
            env,
            session=True,
            timeout=stage.timeout_s,
            nice=stage.nice,
            name="acb-campaign",
            cwd=self.store.outdir(item.id),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        lost_lease: list[str] = []

        def lease_lost(reason: str) -> None:
            # On the client's session thread: the GPUs may be another process's already.
            lost_lease.append(reason)
            child.kill("lease lost")

        self._child = child
        if claim is not None and self._lost_claim is claim:
            child.kill("claim lost")  # the ticker found it lost before the stage was ours
        forget = lease.on_lost(lease_lost) if lease is not None else None
        try:
            try:
                child.start()
            except OSError as exc:
                raise StageFailed(
                    f"stage {stage.name} could not start {argv[0]!r}: {exc}"
                ) from None
            result = child.wait()
        finally:
            self._child = None
            if forget is not None:
                forget()
        rc = result.returncode
        log.write(f"== stage {stage.name}: exit {rc} after {result.wall_s:.2f}s\n".encode())
        if claim is not None and self._lost_claim is claim:
            raise ClaimLost(claim.item_id)
        self._check_stop()
        if result.killed == "lease lost":
            raise StageFailed(
                f"stage {stage.name}: lease lost while it ran ({lost_lease[0]}); the stage was "
                "killed (SIGKILL to its process group) rather than run on GPUs another process "
                "may hold now"
            )
        if result.timed_out:
            raise StageFailed(
                f"stage {stage.name} timed out after {stage.timeout_s:g}s (killed); raise its "
                "timeout in the campaign file if that is too short"
            )
        if rc != 0:
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            if rc == CANNOT_START:
                how += " (command not found or not executable? see the log)"
            raise StageFailed(f"stage {stage.name} {how}")
        return {
            "started": round(result.started, 4),
            "wall_s": round(result.wall_s, 4),
            "cpu_s": round(result.cpu_s, 4),
        }
