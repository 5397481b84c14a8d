"""Running one stage process: for one item, or for a batch of items (`batch` above 1).

A cpu stage sees no GPU (CUDA_VISIBLE_DEVICES=""). A gpu stage in `gate` mode holds a lease from
the node's assigner exactly while its command runs (CUDA_VISIBLE_DEVICES = the lease's device
ids); in `auto` mode it runs under `acb-run --auto`. A gate stage whose lease is lost while it
runs is killed at once, its whole process group with SIGKILL ("lease lost", a failed stage).

A process for several items (a batch) is one command under one lease: an argument with a per-item
placeholder is repeated once per item, `{items_dir}` is a directory of one symlink per item, and
it runs in a directory of its own under `results/batches/`, its output in `output.log` there,
copied into every item's attempt log when it ends (the directory is then removed). What it did is
judged per item: a process that failed (exit status, signal, timeout, lost lease) failed every
item; one that exited 0 failed only the items whose `outputs` are missing; an item whose claim
was lost is dropped (its process is killed: the claim's new holder runs the item), and the
process's other items are interrupted (`StageInterrupted`: their attempts do not count, they run
again).

Stages are started and supervised by `acb_slurm.supervise` (the exec wrapper `_deathwrap`, never
`preexec_fn`: the worker has threads): in their own process group, guarded, with PR_SET_PDEATHSIG
so that they die with their worker, and with their niceness.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from acb_slurm import _deathwrap as deathwrap
from acb_slurm import env as acb_env
from acb_slurm.campaign.attempts import StageTiming
from acb_slurm.campaign.claims import ClaimKeeper, ClaimLost
from acb_slurm.campaign.errors import CampaignError, StageFailed, StageInterrupted
from acb_slurm.campaign.gpu import ClientLeaseProvider, HeldLease, LeaseProvider
from acb_slurm.campaign.items import Item
from acb_slurm.campaign.spec import (
    PER_ITEM,
    CampaignSpec,
    Device,
    GpuMode,
    Stage,
    per_item,
    placeholders,
    substitute,
)
from acb_slurm.campaign.stops import StopRequests, WorkerStopped
from acb_slurm.campaign.store import Claim, ResultsStore
from acb_slurm.launcher import acb_run_argv, acb_run_path
from acb_slurm.supervise import Result, Supervised

#: Set for every stage command: which item, stage and attempt it runs for (for a process of
#: several items: their ids and attempts, space-separated, in the order of its arguments).
ITEM_ENV = acb_env.CAMPAIGN_ITEM
STAGE_ENV = acb_env.CAMPAIGN_STAGE
ATTEMPT_ENV = acb_env.CAMPAIGN_ATTEMPT

#: Run by `python -S -I` before every stage command: death signal and niceness, then exec.
STAGE_WRAPPER = Path(deathwrap.WRAPPER)
#: Its exit status when the command cannot be started.
CANNOT_START = deathwrap.CANNOT_START

#: The worker forks stage processes that exec at once, so gRPC's fork handlers are not needed
#: (they only log "Other threads are currently calling into gRPC, skipping fork() handlers").
_GRPC_FORK_ENV = "GRPC_ENABLE_FORK_SUPPORT"
#: Lease labels name the items up to this length (the assigner keeps 256 bytes).
_LABEL_CHARS = 200


def acb_run_command() -> str:
    """Path of `acb-run`: beside this Python (a venv) or on PATH."""
    try:
        return acb_run_path()
    except FileNotFoundError:
        raise CampaignError(
            "acb-run not found beside the Python interpreter or on PATH; install acb-slurm in "
            "the environment that runs the workers"
        ) from None


@dataclass(frozen=True, slots=True)
class ItemRun:
    """One item's part in a stage process: the item, its attempt, the claim this worker holds
    on it (None where no claim is kept) and the attempt's log."""

    item: Item
    attempt: int
    claim: Claim | None
    log: IO[bytes]


#: What a stage process did for one of its items: the stage's timing, why it failed for it,
#: that the item's claim was lost, or that the process was killed for another item's lost claim.
StageResult = StageTiming | StageFailed | ClaimLost | StageInterrupted


class StageRunner:
    """Runs the stage processes of one worker, one at a time; `child` is the process running now
    (signalled on a stop request, killed when a claim of `running` is lost)."""

    def __init__(
        self,
        spec: CampaignSpec,
        store: ResultsStore,
        worker: str,
        *,
        stops: StopRequests,
        claims: ClaimKeeper,
        leases: LeaseProvider | None = None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.worker = worker
        self.stops = stops
        self.claims = claims
        self.leases = leases
        self.child: Supervised | None = None
        self.running: tuple[ItemRun, ...] = ()  # the items of `child`
        self.own_grpc_fork_env = _GRPC_FORK_ENV not in os.environ
        if self.own_grpc_fork_env:
            os.environ[_GRPC_FORK_ENV] = "false"

    def runs_for(self, claim: Claim) -> bool:
        """Whether the process running now works on the item of `claim`."""
        return any(run.claim is claim for run in self.running)

    def run_one(self, stage: Stage, run: ItemRun) -> StageTiming:
        """Run `stage` for one item: its timing, or StageFailed, ClaimLost, WorkerStopped,
        CampaignError (no lease to be had)."""
        (result,) = self.run(stage, [run])
        if isinstance(result, Exception):
            raise result
        return result

    def run(self, stage: Stage, runs: Sequence[ItemRun]) -> list[StageResult]:
        """Run `stage` as one process for `runs` (one item, or a batch): what it did for each,
        in order. Raises WorkerStopped, or CampaignError when no lease can be had."""
        results: dict[int, StageResult] = {}
        members = {i: (run, self._values(stage, run)) for i, run in enumerate(runs)}
        with _Place(self.store, stage, len(runs)) as place:
            for i, (run, values) in list(members.items()):
                failure = place.link(run.item, values)
                if failure is not None:
                    run.log.write(f"== {failure}\n".encode())
                    results[i] = failure
                    del members[i]
            if members:
                done = self._leased(stage, list(members.values()), place)
                results.update(zip(members, done, strict=True))
        return [results[i] for i in range(len(runs))]

    def _leased(
        self, stage: Stage, members: list[tuple[ItemRun, dict[str, str]]], place: _Place
    ) -> list[StageResult]:
        """The process for `members`, under a lease for a gate stage."""
        runs = [run for run, _ in members]
        timing: StageTiming = {"device": stage.device.value}
        if stage.device is Device.GPU:
            timing["mode"] = stage.mode.value
        if stage.device is not Device.GPU or stage.mode is not GpuMode.GATE:
            return self._claimed(stage, members, place, timing, None)
        lease = self._acquire(stage, _label(stage, runs), runs)
        try:
            timing["device_ids"] = list(lease.device_ids)
            timing["lease_wait_s"] = round(lease.waited_s, 4)
            return self._claimed(stage, members, place, timing, lease)
        finally:
            try:
                lease.release()
            except Exception as exc:
                # The session is gone (assigner restarted or unreachable): the assigner dropped
                # the lease with it, so there is nothing left to give back.
                _note(runs, f"== stage {stage.name}: releasing the lease failed: {exc}\n")

    def _claimed(
        self,
        stage: Stage,
        members: list[tuple[ItemRun, dict[str, str]]],
        place: _Place,
        timing: StageTiming,
        lease: HeldLease | None,
    ) -> list[StageResult]:
        """The process for the members still ours (a gpu stage may have waited long for its
        lease); ClaimLost for the others."""
        lost = {
            id(run)
            for run, _ in members
            if run.claim is not None and not self.claims.still_held(run.claim)
        }
        ours = [(run, values) for run, values in members if id(run) not in lost]
        done = iter(self._process(stage, ours, place, timing, lease) if ours else [])
        return [ClaimLost(run.item.id) if id(run) in lost else next(done) for run, _ in members]

    def _values(self, stage: Stage, run: ItemRun) -> dict[str, str]:
        """The placeholders' values for one item (all but {items_dir}, the process's)."""
        item = run.item
        return {
            "item": item.id,
            "fasta": str(self.store.item_dir(item.id) / "input.fasta"),
            "sequence": item.sequence,
            "length": str(len(item.sequence)),
            "outdir": str(self.store.outdir(item.id)),
            "results": str(self.spec.results),
            "campaign_dir": str(self.spec.campaign_dir),
            "python": sys.executable,
            "attempt": str(run.attempt),
            "stage": stage.name,
        }

    def _process(
        self,
        stage: Stage,
        members: Sequence[tuple[ItemRun, dict[str, str]]],
        place: _Place,
        timing: StageTiming,
        lease: HeldLease | None,
    ) -> list[StageResult]:
        """One process for `members` (each item's run and placeholder values)."""
        runs = [run for run, _ in members]
        argv, env = self._command(stage, members, place)
        if stage.device is Device.CPU:
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif stage.mode is GpuMode.AUTO:
            env[acb_env.WORKER] = self.worker
            argv = acb_run_argv(
                "auto",
                argv,
                label=_label(stage, runs),
                priority=stage.priority,
                memory=stage.memory_bytes,
                program=acb_run_command(),
            )
        elif lease is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(lease.device_ids)
        if stage.batch > 1:
            timing = timing | {"batch": len(runs)}
        try:
            result, lost_lease = self._supervise(stage, argv, env, runs, place, lease)
        except StageFailed as exc:  # it could not start
            return [StageFailed(str(exc)) for _ in runs]
        lost = [run for run in runs if run.claim is not None and self.claims.is_lost(run.claim)]
        failure: StageFailed | StageInterrupted | None
        if result.killed == "claim lost":
            # Killed for the lost claim of another of its items: not these items' fault.
            failure = StageInterrupted(
                f"stage {stage.name} was killed: the claim on another item of its process was "
                f"lost ({_ids(lost)}); this attempt does not count, the item runs again"
                f" (one process for {len(runs)} items: {_ids(runs)})"
            )
        else:
            failure = _failure(stage, result, lost_lease, runs)
        if len(lost) < len(runs):
            self.stops.check()
        process: StageTiming = {
            "started": round(result.started, 4),
            "wall_s": round(result.wall_s, 4),
            "cpu_s": round(result.cpu_s, 4),
        }
        out: list[StageResult] = []
        for run, values in members:
            if run in lost:
                out.append(ClaimLost(run.item.id))
            elif failure is not None:
                out.append(type(failure)(str(failure)))  # one each: each item raises its own
            else:
                missing = _missing_output(stage, run, values)
                out.append(timing | process if missing is None else missing)
        return out

    def _command(
        self, stage: Stage, members: Sequence[tuple[ItemRun, dict[str, str]]], place: _Place
    ) -> tuple[list[str], dict[str, str]]:
        """The argv and environment of a process for `members`: an argument that names one
        item is repeated once per item (once for one item)."""
        each = [values | {"items_dir": str(place.items_dir)} for _, values in members]
        shared = {k: v for k, v in each[0].items() if k not in PER_ITEM}
        argv: list[str] = []
        for arg in stage.command:
            if per_item(arg):
                argv.extend(substitute(arg, values) for values in each)
            else:
                argv.append(substitute(arg, shared))
        env = dict(os.environ)
        if self.own_grpc_fork_env:
            env.pop(_GRPC_FORK_ENV, None)
        # A batch stage's env names no item (the spec refuses it); one item's process may.
        values = each[0] if len(members) == 1 else shared
        env.update({k: substitute(v, values) for k, v in stage.env.items()})
        env[ITEM_ENV] = " ".join(run.item.id for run, _ in members)
        env[STAGE_ENV] = stage.name
        env[ATTEMPT_ENV] = " ".join(str(run.attempt) for run, _ in members)
        return argv, env

    def _acquire(self, stage: Stage, label: str, runs: Sequence[ItemRun]) -> HeldLease:
        if self.leases is None:
            self.leases = ClientLeaseProvider()
        _note(runs, f"== stage {stage.name}: waiting for {stage.gpus} GPU(s)\n")
        try:
            with self.stops.interruptible():
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

    def _supervise(
        self,
        stage: Stage,
        argv: list[str],
        env: dict[str, str],
        runs: Sequence[ItemRun],
        place: _Place,
        lease: HeldLease | None,
    ) -> tuple[Result, str | None]:
        """Start the process and wait for it; how it ended, and the lost lease's reason if the
        lease was lost while it ran."""
        what = f"one process for {len(runs)} items ({_ids(runs)}), " if len(runs) > 1 else ""
        _note(
            runs,
            f"== stage {stage.name} on {socket.gethostname()} by {self.worker}: {what}{argv!r}\n",
        )
        if place.output is not None:
            _note(runs, f"== its output: {place.output.name} (copied here when it ends)\n")
        timeout = None if stage.timeout_s is None else stage.timeout_s * len(runs)
        # Through the exec wrapper (death signal, niceness), in its own process group, which a
        # guard kills if this worker is killed outright (acb_slurm.supervise).
        child = Supervised(
            argv,
            env,
            session=True,
            timeout=timeout,
            nice=stage.nice,
            name="acb-campaign",
            cwd=place.cwd(runs),
            stdin=subprocess.DEVNULL,
            stdout=place.output or runs[0].log,
            stderr=subprocess.STDOUT,
        )
        lost_lease: list[str] = []

        def lease_lost(reason: str) -> None:
            # On the client's session thread: the GPUs may be another process's already.
            lost_lease.append(reason)
            child.kill("lease lost")

        self.child, self.running = child, tuple(runs)
        if any(run.claim is not None and self.claims.is_lost(run.claim) for run in runs):
            child.kill("claim lost")  # the ticker found one lost before the stage was ours
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
            self.child, self.running = None, ()
            if forget is not None:
                forget()
            place.copy_output(runs)
        _note(runs, f"== stage {stage.name}: exit {result.returncode} after {result.wall_s:.2f}s\n")
        return result, lost_lease[0] if lost_lease else None


class _Place:
    """Where a stage process runs and writes. One item's process: in the item's output
    directory, its output in the attempt's log. A batch's: in a directory of its own
    (`results/batches/<stage>-<random>/`), its output in `output.log` there. `{items_dir}` (made
    only when the stage uses it) holds one symlink per item to its `item_link`."""

    def __init__(self, store: ResultsStore, stage: Stage, count: int) -> None:
        self.store, self.stage = store, stage
        self.uses_items_dir = any(
            "items_dir" in placeholders(text) for text in (*stage.command, *stage.env.values())
        )
        self.shared = count > 1  # a batch: a directory and an output file of its own
        self.directory: Path | None = None
        self.items_dir = Path()
        self.output: IO[bytes] | None = None

    def __enter__(self) -> _Place:
        if not (self.shared or self.uses_items_dir):
            return self
        batches = self.store.root / "batches"
        batches.mkdir(exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix=f"{self.stage.name}-", dir=batches))
        self.items_dir = self.directory / "items"
        self.items_dir.mkdir()
        if self.shared:
            self.output = open(self.directory / "output.log", "ab", buffering=0)
        return self

    def cwd(self, runs: Sequence[ItemRun]) -> Path:
        """The process's working directory."""
        if self.shared and self.directory is not None:
            return self.directory
        return self.store.outdir(runs[0].item.id)

    def link(self, item: Item, values: Mapping[str, str]) -> StageFailed | None:
        """Put the item's symlink into {items_dir} (when the stage uses it); why it cannot be
        made (its item_link matches no path, or several), or None."""
        if not self.uses_items_dir:
            return None
        pattern = self.stage.item_link
        found = _glob(pattern, values, self.store.outdir(item.id))
        if len(found) != 1:
            what = "no path" if not found else f"{len(found)} paths"
            return StageFailed(
                f"stage {self.stage.name}: item_link {substitute(pattern, values)} matched "
                f"{what} for item {item.id} (it needs exactly one)"
            )
        target = Path(found[0])
        (self.items_dir / f"{item.id}{target.suffix}").symlink_to(target.absolute())
        return None

    def copy_output(self, runs: Sequence[ItemRun]) -> None:
        """Append the batch process's output to each item's log."""
        if self.output is None:
            return
        self.output.flush()
        for run in runs:
            with open(self.output.name, "rb") as fh:
                run.log.write(b"== output of the process:\n")
                shutil.copyfileobj(fh, run.log)

    def __exit__(self, *exc: object) -> None:
        if self.output is not None:
            self.output.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def _missing_output(stage: Stage, run: ItemRun, values: Mapping[str, str]) -> StageFailed | None:
    """Why the item's `outputs` are not all there, or None."""
    outdir = Path(values["outdir"])
    for pattern in stage.outputs:
        if not _glob(pattern, values, outdir):
            return StageFailed(
                f"stage {stage.name} left no {outdir / substitute(pattern, values)} for item "
                f"{run.item.id} (its outputs)"
            )
    return None


def _glob(pattern: str, values: Mapping[str, str], base: Path) -> list[str]:
    """Paths matching `pattern` with `values` substituted (taken literally: a `[` in a results
    path is no glob), relative to `base`."""
    text = substitute(pattern, {k: glob.escape(v) for k, v in values.items()})
    return sorted(glob.glob(os.path.join(glob.escape(str(base)), text)))


def _failure(
    stage: Stage, result: Result, lost_lease: str | None, runs: Sequence[ItemRun]
) -> StageFailed | None:
    """Why the process failed its items, or None when it exited 0."""
    batch = f" (one process for {len(runs)} items: {_ids(runs)})" if len(runs) > 1 else ""
    if result.killed == "lease lost":
        return StageFailed(
            f"stage {stage.name}: lease lost while it ran ({lost_lease}); the stage was "
            "killed (SIGKILL to its process group) rather than run on GPUs another process "
            f"may hold now{batch}"
        )
    if result.timed_out:
        limit = (stage.timeout_s or 0) * len(runs)
        per = f" ({stage.timeout_s:g}s per item)" if len(runs) > 1 and stage.timeout_s else ""
        return StageFailed(
            f"stage {stage.name} timed out after {limit:g}s{per} (killed); raise its timeout "
            f"in the campaign file if that is too short{batch}"
        )
    rc = result.returncode
    if rc == 0:
        return None
    how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
    if rc == CANNOT_START:
        how += " (command not found or not executable? see the log)"
    return StageFailed(f"stage {stage.name} {how}{batch}")


def _ids(runs: Sequence[ItemRun]) -> str:
    return ", ".join(run.item.id for run in runs)


def _label(stage: Stage, runs: Sequence[ItemRun]) -> str:
    """The lease's label: the items (or the first and how many more) and the stage."""
    ids = ",".join(run.item.id for run in runs)
    if len(ids) > _LABEL_CHARS:
        ids = f"{runs[0].item.id}+{len(runs) - 1}"
    return f"{ids}/{stage.name}"


def _note(runs: Sequence[ItemRun], line: str) -> None:
    """A line in the log of every item of a process."""
    for run in runs:
        run.log.write(line.encode())
