"""Campaign fixtures: FASTA files, campaign files, real acb-assigner processes and real workers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.campaign.store import proc_stat_fields

STAGE = Path(__file__).with_name("stage.py")
AMINO = "ACDEFGHIKLMNPQRSTVWY"


def write_fasta(path: Path, count: int, seed: int = 0, prefix: str = "prot") -> list[str]:
    """Write `count` random sequences; returns their ids."""
    rng = random.Random(seed)
    ids = [f"{prefix}{i:03d}" for i in range(count)]
    with open(path, "w", encoding="utf-8") as fh:
        for item_id in ids:
            seq = "".join(rng.choice(AMINO) for _ in range(rng.randint(30, 90)))
            fh.write(f">{item_id} synthetic test protein\n{seq}\n")
    return ids


def stage_command(name: str, *extra: str) -> list[str]:
    """argv of the test stage (tests/campaign/stage.py) as a campaign command."""
    return ["{python}", "-S", str(STAGE), name, "{outdir}", *extra]


def write_campaign(directory: Path, stages: list[dict[str, Any]], **top: Any) -> Path:
    """A campaign file in `directory` (items.fasta and results/ beside it unless given)."""
    data: dict[str, Any] = {"items": "items.fasta", "results": "results", **top, "stages": stages}
    path = directory / "campaign.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def runs(results: Path) -> list[dict[str, Any]]:
    """Every stage run recorded by stage.py, over all items."""
    out: list[dict[str, Any]] = []
    for path in sorted((results / "items").glob("*/out/runs.jsonl")):
        out.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return out


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 = state, 1 = ppid, 2 = pgrp,
    3 = session, 16 = nice), or None when the process is gone or a zombie."""
    fields = proc_stat_fields(pid)
    return None if not fields or fields[0] in ("Z", "X") else fields


def other_host_prefix(hostname: str) -> list[str] | None:
    """A command prefix that runs a program, in place, with its own host name (a UTS namespace),
    so that a worker looks like one on another node; None where namespaces are not allowed."""
    rename = ["sh", "-c", 'hostname "$0" && exec "$@"', hostname]
    for unshare in (["unshare", "--uts"], ["unshare", "--user", "--map-root-user", "--uts"]):
        try:
            probe = subprocess.run(
                [*unshare, *rename, "hostname"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if probe.returncode == 0 and probe.stdout.strip() == hostname:
            return [*unshare, *rename]
    return None


@pytest.fixture
def assigner(tmp_path: Path) -> Iterator[Callable[..., AssignerProcess]]:
    """Start a real acb-assigner (virtual GPUs); every one started is stopped afterwards."""
    started: list[AssignerProcess] = []

    def start(**options: Any) -> AssignerProcess:
        process = AssignerProcess(tmp_path / "assigner", name=f"a{len(started)}", **options)
        started.append(process)
        return process.start()

    yield start
    for process in reversed(started):
        process.terminate()


class Workers:
    """Real `acb-campaign worker` processes; all are killed at teardown if still running."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self,
        campaign: Path,
        name: str,
        env: dict[str, str] | None = None,
        *args: str,
        prefix: Sequence[str] = (),
    ) -> subprocess.Popen[str]:
        """Start a worker; `prefix` runs it through a command that execs it (same pid)."""
        environ = dict(env if env is not None else os.environ)
        environ["ACB_WORKER"] = name
        log = open(self.tmp_path / f"{name}.log", "a", encoding="utf-8")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "acb_slurm.campaign.cli",
                "worker",
                str(campaign),
                *args,
            ],
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(encoding="utf-8")

    def wait_all(self, timeout: float = 120.0) -> list[int]:
        return [p.wait(timeout=timeout) for p in self.procs]

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    yield pool
    pool.cleanup()
