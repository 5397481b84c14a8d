"""The prologue's helpers against real acb-assigner processes (no Slurm): wait, config, status."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from acb_slurm import tls
from acb_slurm.slurm import runtime
from acb_slurm.slurm.errors import JobStateError

BIN = Path(sys.executable).parent


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    (folder / "token").write_text(secrets.token_hex(16))
    (folder / "token").chmod(0o600)  # the assigner refuses a token others can read
    tls.init(folder / tls.RUN_DIR_NAME)  # as the prologue does: TCP between nodes is TLS
    return folder


def start_assigner(run_dir: Path, node: str, *extra: str) -> subprocess.Popen[bytes]:
    folder = run_dir / node
    folder.mkdir(mode=0o700, exist_ok=True)
    log = open(folder / "assigner.log", "wb")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        [
            str(BIN / "acb-assigner"),
            "--socket",
            str(folder / "assigner.sock"),
            "--tcp",
            "127.0.0.1:0",
            "--virtual-gpus",
            "2",
            "--gpu-memory",
            "8GiB",
            "--event-log",
            str(folder / "events.jsonl"),
            "--ready-file",
            str(folder / "ready.json"),
            "--token-file",
            str(run_dir / "token"),
            "--tls-dir",
            str(run_dir / tls.RUN_DIR_NAME),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "SLURMD_NODENAME": node},
    )


@pytest.fixture
def assigners(run_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [start_assigner(run_dir, "n1")]
    yield procs
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=20)


def test_await_write_config_and_status(run_dir: Path, assigners: list) -> None:
    token = str(run_dir / "token")
    entries = runtime.await_assigners(
        run_dir, ["n1"], timeout=60, watch_pid=assigners[0].pid, token_file=token
    )
    (entry,) = entries
    assert entry.name == "n1" and entry.role == "controller"
    assert entry.address == "127.0.0.1" and entry.port > 0
    assert entry.tcp == f"127.0.0.1:{entry.port}"
    config_path = run_dir / runtime.CONFIG_NAME
    runtime.write_config(
        config_path, entries, run_dir=run_dir, job_id="77", token_file=token, policy="simple"
    )
    assert config_path.stat().st_mode & 0o777 == 0o600
    config = runtime.read_config(run_dir)
    assert config["nodes"][0]["socket"] == str(run_dir / "n1" / "assigner.sock")
    assert json.loads(config_path.read_text())["controller"] == entry.tcp

    answers = runtime.query_status(config)
    (node, reply), *_ = answers
    assert node == "n1" and not isinstance(reply, str)
    text = runtime.format_status(answers)
    assert "gpu 0 [0] 8.0GiB: free" in text
    assert "gpu 1 [1] 8.0GiB: free" in text
    assert "waiting: nobody" in text

    # From another node (no socket to use): over TCP, with the run dir's TLS material.
    remote = {**config, "nodes": [{**config["nodes"][0], "socket": ""}]}
    (_, reply), *_ = runtime.query_status(remote)
    assert not isinstance(reply, str), reply
    assert reply.self.address == entry.tcp
    (run_dir / tls.RUN_DIR_NAME).rename(run_dir / "elsewhere")
    (_, refused), *_ = runtime.query_status(remote)
    assert isinstance(refused, str) and "over TCP without TLS" in refused


def test_status_with_a_wrong_token_says_so(run_dir: Path, assigners: list) -> None:
    entries = runtime.await_assigners(
        run_dir, ["n1"], timeout=60, token_file=str(run_dir / "token")
    )
    wrong = run_dir / "wrong-token"
    wrong.write_text("not-the-token")
    config = runtime.write_config(
        run_dir / runtime.CONFIG_NAME, entries, run_dir=run_dir, job_id="1",
        token_file=str(wrong), policy="simple",
    )  # fmt: skip
    (_, answer), *_ = runtime.query_status(config)
    assert isinstance(answer, str) and "UNAUTHENTICATED" in answer
    assert "NOT ANSWERING" in runtime.format_status(runtime.query_status(config))


def test_a_dead_assigner_fails_fast_with_its_log(run_dir: Path) -> None:
    proc = start_assigner(run_dir, "n1", "--policy", "no-such-policy")
    proc.wait(timeout=30)
    with pytest.raises(JobStateError) as info:
        runtime.await_assigners(run_dir, ["n1"], timeout=60, watch_pid=proc.pid)
    message = str(info.value)
    assert "n1: its srun step exited" in message
    assert "no-such-policy" in message  # the assigner's own words, from assigner.log


def test_a_missing_node_times_out_clearly(run_dir: Path) -> None:
    with pytest.raises(JobStateError, match=r"(?s)n9: not ready after 1s.*does not exist"):
        runtime.await_assigners(run_dir, ["n9"], timeout=1)


def test_read_config_of_a_job_that_has_not_started(run_dir: Path) -> None:
    with pytest.raises(JobStateError, match="has not started its assigners"):
        runtime.read_config(run_dir)


def _fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/bash\n" + script)
    (fake / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")


def test_find_run_dir_of_a_forgotten_job_points_to_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _fake_scontrol(
        tmp_path, monkeypatch,
        'echo "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1\n',
    )  # fmt: skip
    with pytest.raises(JobStateError, match=r"no longer knows job 99.*pass --run-dir"):
        runtime.find_run_dir("99")


def test_find_run_dir_of_array_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "submit"
    (work / "acb-runs" / "120_3").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    _fake_scontrol(
        tmp_path, monkeypatch,
        f'echo "JobId=123 ArrayJobId=120 ArrayTaskId=3 JobName=x WorkDir={work}"\n',
    )  # fmt: skip
    assert runtime.find_run_dir("123") == work / "acb-runs" / "120_3"
    assert runtime.find_run_dir("120_3") == work / "acb-runs" / "120_3"
    monkeypatch.chdir(work)
    assert runtime.find_run_dir("120_3") == Path.cwd() / "acb-runs" / "120_3"
    with pytest.raises(JobStateError, match="not a Slurm job id"):
        runtime.find_run_dir("../x")
