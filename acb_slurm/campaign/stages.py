"""Running one stage of one item: its command line and environment, its GPU lease, its process.

A cpu stage sees no GPU (CUDA_VISIBLE_DEVICES=""). A gpu stage in `gate` mode holds a lease from
the node's assigner exactly while its command runs (CUDA_VISIBLE_DEVICES = the lease's device
ids); in `auto` mode it runs under `acb-run --auto`. A gate stage whose lease is lost while it
runs is killed at once, its whole process group with SIGKILL ("lease lost", a failed stage).

Stages are started and supervised by `acb_slurm.supervise` (the exec wrapper `_deathwrap`, never
`preexec_fn`: the worker has threads): in their own process group, guarded, with PR_SET_PDEATHSIG
so that they die with their worker, and with their niceness.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO

from acb_slurm import _deathwrap as deathwrap
from acb_slurm import env as acb_env
from acb_slurm.campaign.attempts import StageTiming
from acb_slurm.campaign.claims import ClaimKeeper, ClaimLost
from acb_slurm.campaign.errors import CampaignError, StageFailed
from acb_slurm.campaign.gpu import ClientLeaseProvider, HeldLease, LeaseProvider
from acb_slurm.campaign.items import Item
from acb_slurm.campaign.spec import CampaignSpec, Device, GpuMode, Stage, substitute
from acb_slurm.campaign.stops import StopRequests, WorkerStopped
from acb_slurm.campaign.store import ResultsStore
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

#: The worker forks stage processes that exec at once, so gRPC's fork handlers are not needed
#: (they only log "Other threads are currently calling into gRPC, skipping fork() handlers").
_GRPC_FORK_ENV = "GRPC_ENABLE_FORK_SUPPORT"


def acb_run_command() -> str:
    """Path of `acb-run`: beside this Python (a venv) or on PATH."""
    try:
        return acb_run_path()
    except FileNotFoundError:
        raise CampaignError(
            "acb-run not found beside the Python interpreter or on PATH; install acb-slurm in "
            "the environment that runs the workers"
        ) from None


class StageRunner:
    """Runs the stages of one worker, one at a time; `child` is the stage process running now
    (signalled on a stop request, killed when the claim is lost)."""

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
        self.own_grpc_fork_env = _GRPC_FORK_ENV not in os.environ
        if self.own_grpc_fork_env:
            os.environ[_GRPC_FORK_ENV] = "false"

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

    def run(self, item: Item, stage: Stage, attempt: int, log: IO[bytes]) -> StageTiming:
        """Run `stage` of `item` (attempt `attempt`), its output to `log`; its timing, or
        StageFailed, ClaimLost, WorkerStopped, CampaignError (no lease to be had)."""
        values = self._values(item, stage, attempt)
        argv = [substitute(arg, values) for arg in stage.command]
        env = dict(os.environ)
        if self.own_grpc_fork_env:
            env.pop(_GRPC_FORK_ENV, None)
        env.update({k: substitute(v, values) for k, v in stage.env.items()})
        env[ITEM_ENV] = item.id
        env[STAGE_ENV] = stage.name
        env[ATTEMPT_ENV] = str(attempt)
        label = f"{item.id}/{stage.name}"
        timing: StageTiming = {"device": stage.device.value}

        if stage.device is Device.CPU:
            env["CUDA_VISIBLE_DEVICES"] = ""
            return timing | self._run_process(stage, argv, env, item, log)

        if stage.mode is GpuMode.AUTO:
            env[acb_env.WORKER] = self.worker
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

    def _run_process(
        self,
        stage: Stage,
        argv: list[str],
        env: dict[str, str],
        item: Item,
        log: IO[bytes],
        lease: HeldLease | None = None,
    ) -> StageTiming:
        log.write(
            f"== stage {stage.name} on {socket.gethostname()} by {self.worker}: {argv!r}\n".encode()
        )
        claim = self.claims.current
        if claim is not None:
            self.claims.ensure(claim)  # a gpu stage may have waited long for its lease
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

        self.child = child
        if claim is not None and self.claims.is_lost(claim):
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
            self.child = None
            if forget is not None:
                forget()
        rc = result.returncode
        log.write(f"== stage {stage.name}: exit {rc} after {result.wall_s:.2f}s\n".encode())
        if claim is not None and self.claims.is_lost(claim):
            raise ClaimLost(claim.item_id)
        self.stops.check()
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
