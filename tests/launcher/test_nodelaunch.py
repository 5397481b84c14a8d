"""`acb-launch`, the per-node launcher, as a real process against a real acb-assigner: one
process starts many workers, each with its own session; signals, lost leases and a killed
launcher reach each worker's whole process group."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from acb_slurm import env
from acb_slurm.assigner.testing import AssignerProcess, wait_for
from acb_slurm.exitcodes import ExitCode
from acb_slurm.launcher.nodelaunch import GroupPlan, NodeLauncher, Plan, plan_for_node

StartAssigner = Callable[..., AssignerProcess]
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "acb-launch")
ACB_LAUNCH = (
    [_SCRIPT]
    if os.access(_SCRIPT, os.X_OK)
    else [sys.executable, "-m", "acb_slurm.launcher.nodelaunch"]
)

#: A worker that records what it saw, starts a grandchild, and records the signals it gets
#: (SIGUSR1: noted, it goes on; SIGTERM: noted, exit 7). ACB_TEST_HOLD: seconds to run.
WORKER = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    out = os.environ["ACB_TEST_DIR"]
    name = os.environ["ACB_WORKER"]
    got = []
    def note(signum, frame):
        got.append(signal.Signals(signum).name)
        with open(os.path.join(out, name + ".signals"), "w") as fh:
            fh.write(" ".join(got))
        if signum == signal.SIGTERM:
            sys.exit(7)
    signal.signal(signal.SIGUSR1, note)
    signal.signal(signal.SIGTERM, note)
    grandchild = subprocess.Popen(["sleep", "300"])
    with open(os.path.join(out, name + ".json"), "w") as fh:
        json.dump({"worker": name, "pid": os.getpid(), "grandchild": grandchild.pid,
                   "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "lease": os.environ.get("ACB_LEASE_ID"), "cwd": os.getcwd(),
                   "extra": os.environ.get("EXTRA")}, fh)
    deadline = time.time() + float(os.environ.get("ACB_TEST_HOLD", "0"))
    while time.time() < deadline:
        time.sleep(0.02)
    sys.exit(int(os.environ.get("ACB_TEST_EXIT", "0")))
    """
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def launch(
    assigner: AssignerProcess,
    tmp_path: Path,
    groups: list[GroupPlan],
    **environ: str,
) -> subprocess.Popen[str]:
    plan = tmp_path / "workers.json"
    plan.write_text(Plan(tuple(groups)).to_json(), encoding="utf-8")
    (tmp_path / "out").mkdir(exist_ok=True)
    return subprocess.Popen(
        [*ACB_LAUNCH, "--plan", str(plan), "--report", str(tmp_path / "report"), "--node", "n7"],
        env=assigner.client_env(ACB_TEST_DIR=str(tmp_path / "out"), **environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker(name: str, count: int, *, mode: str = "gate", **env: str) -> GroupPlan:
    return GroupPlan(
        name=name,
        count=count,
        command=(sys.executable, "-c", WORKER),
        mode=mode,
        run_options=("--gpus", "1") if mode == "gate" else (),
        env=env,
    )


def records(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """What each started worker wrote (in tmp_path/out)."""
    return {
        p.stem: json.loads(p.read_text(encoding="utf-8"))
        for p in sorted((tmp_path / "out").glob("*.json"))
    }


def codes(tmp_path: Path) -> list[int]:
    return [int(x) for x in (tmp_path / "report" / "n7.codes").read_text().split()]


def test_one_launcher_runs_every_worker_with_its_own_session_name_and_status(
    start_assigner: StartAssigner, tmp_path: Path
) -> None:
    assigner = start_assigner(gpus=2)
    groups = [
        worker("fold", 4, EXTRA="x y"),
        worker("bad", 1, ACB_TEST_EXIT="3"),
        worker("plain", 2, mode="client"),
    ]
    proc = launch(assigner, tmp_path, groups)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err  # one worker failed
    assert codes(tmp_path) == [0, 0, 0, 0, 3, 0, 0]
    assert "acb-launch: n7: 6 of 7 worker(s) exited 0" in err
    seen = records(tmp_path)
    names = [f"fold-n7-{i}" for i in range(4)] + ["bad-n7-0", "plain-n7-0", "plain-n7-1"]
    assert sorted(seen) == sorted(names)
    assert seen["fold-n7-0"]["extra"] == "x y"
    events = assigner.events()
    sessions = [e for e in events if e["event"] == "session"]
    # One session per gated worker, named for it, all from the one launcher process.
    assert sorted(e["worker"] for e in sessions) == sorted(names[:5])
    assert len({e["pid"] for e in sessions}) == 1
    grants = {e["lease"]: e for e in events if e["event"] == "grant"}
    for name in names[:5]:
        record = seen[name]
        grant = grants[record["lease"]]
        assert grant["worker"] == name
        assert record["cuda"] == ",".join(grant["device_ids"])
    assert seen["plain-n7-0"]["cuda"] is None and seen["plain-n7-0"]["lease"] is None
    assert [e["event"] for e in events].count("release") == 5


def test_signals_go_to_every_started_worker_and_stop_the_waiting_ones(
    start_assigner: StartAssigner, tmp_path: Path
) -> None:
    assigner = start_assigner(gpus=2)
    # Two GPUs, three gated workers: one waits for a GPU; the client worker runs at once.
    proc = launch(
        assigner, tmp_path, [worker("w", 3), worker("c", 1, mode="client")], ACB_TEST_HOLD="60"
    )
    try:
        wait_for(lambda: len(records(tmp_path)) == 3, 60, "three started workers")
        started = records(tmp_path)
        proc.send_signal(signal.SIGUSR1)  # to the launcher alone
        wait_for(
            lambda: all((tmp_path / "out" / f"{n}.signals").exists() for n in started),
            10,
            "SIGUSR1 at every started worker",
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    waiting = ({"w-n7-0", "w-n7-1", "w-n7-2"} - set(started)).pop()
    assert proc.returncode == 1, err
    for name in started:
        assert (tmp_path / "out" / f"{name}.signals").read_text() == "SIGUSR1 SIGTERM"
        assert not alive(started[name]["grandchild"]), "a worker's child outlived it"
    by_name = dict(zip(["w-n7-0", "w-n7-1", "w-n7-2", "c-n7-0"], codes(tmp_path), strict=True))
    assert by_name[waiting] == 128 + signal.SIGTERM
    assert all(by_name[name] == 7 for name in started)  # the workers' own exit status
    assert f"acb-launch: worker {waiting}: stopped by SIGTERM before it started" in err
    assert not (tmp_path / "out" / f"{waiting}.json").exists()
    events = assigner.events()
    assert any(e["event"] == "withdraw" and e["worker"] == waiting for e in events), events


def test_a_lost_lease_kills_each_gated_worker_and_ends_it_with_70(
    start_assigner: StartAssigner, tmp_path: Path
) -> None:
    assigner = start_assigner(gpus=2)
    proc = launch(
        assigner, tmp_path, [worker("w", 2), worker("c", 1, mode="client")], ACB_TEST_HOLD="3"
    )
    try:
        wait_for(lambda: len(records(tmp_path)) == 3, 60, "three started workers")
        seen = records(tmp_path)
        assigner.kill()  # every lease is void: the gated workers must stop at once
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert codes(tmp_path) == [ExitCode.LEASE_LOST, ExitCode.LEASE_LOST, 0], err
    for name in ("w-n7-0", "w-n7-1"):
        assert f"acb-launch: worker {name}: lease l-" in err
        assert not alive(seen[name]["pid"]) and not alive(seen[name]["grandchild"])
        assert not (tmp_path / "out" / f"{name}.signals").exists()  # SIGKILL, no polite signal
    assert "was lost while the command ran" in err


def test_a_killed_launcher_takes_every_worker_group_with_it(
    start_assigner: StartAssigner, tmp_path: Path
) -> None:
    assigner = start_assigner(gpus=2)
    proc = launch(assigner, tmp_path, [worker("w", 2), worker("c", 2, mode="client")],
                  ACB_TEST_HOLD="60")  # fmt: skip
    try:
        wait_for(lambda: len(records(tmp_path)) == 4, 60, "four started workers")
        seen = records(tmp_path)
        proc.kill()  # no chance to clean up: the death signal and the shared guard act
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    pids = [pid for r in seen.values() for pid in (r["pid"], r["grandchild"])]
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)], "a worker outlived its launcher"


def test_the_argv_form_and_the_help(start_assigner: StartAssigner, tmp_path: Path) -> None:
    assigner = start_assigner(gpus=1)
    (tmp_path / "out").mkdir()
    environ = assigner.client_env(ACB_TEST_DIR=str(tmp_path / "out"))
    result = subprocess.run(
        [*ACB_LAUNCH, "--name", "g", "--count", "2", "--gate", "--run-option=--label",
         "--run-option=fold", "--node", "n7", "--", sys.executable, "-c", WORKER],
        env=environ, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(records(tmp_path)) == ["g-n7-0", "g-n7-1"]
    assert {e["label"] for e in assigner.events() if e["event"] == "request"} == {"fold"}
    wrong = subprocess.run(
        [*ACB_LAUNCH, "--name", "g", "--count", "1", "--run-option=--idle-ms=5", "--", "true"],
        env=environ, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert wrong.returncode == ExitCode.USAGE
    assert "--idle-ms: not an option of --gate" in wrong.stderr
    shown = subprocess.run([*ACB_LAUNCH, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    for words in ("ONE srun step per node", "<group>-<node>-<i>", "70", "--run-option"):
        assert words in shown.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{}", "not an acb-launch plan"),
        ('{"version": 1, "groups": []}', "no worker groups"),
        ('{"version": 1, "groups": [{"name": "x", "count": 1, "command": []}]}', "no command"),
        (
            '{"version": 1, "groups": [{"name": "x", "count": 1, "mode": "turbo", '
            '"command": ["y"]}]}',
            "mode 'turbo' is not one of gate, auto, client",
        ),
    ],
)
def test_a_wrong_plan_is_refused_before_anything_starts(
    tmp_path: Path, text: str, message: str
) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(text)
    result = subprocess.run(
        [*ACB_LAUNCH, "--plan", str(plan)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == ExitCode.USAGE
    assert message in result.stderr


AUTO_PROGRAM = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from acb_slurm.launcher import auto
    x = torch.ones(4, device="cpu") * 2   # a device call: automatic mode asks for the GPU
    with open(os.path.join(os.environ["ACB_TEST_DIR"], os.environ["ACB_WORKER"] + ".json"),
              "w") as fh:
        json.dump({"installed": len(auto._installed), "auto_env": "ACB_AUTO" in os.environ,
                   "sum": float(x.sum())}, fh)
    """
)


def test_an_auto_worker_runs_its_program_in_automatic_mode_without_acb_run(
    start_assigner: StartAssigner, tmp_path: Path
) -> None:
    assigner = start_assigner(gpus=1)
    group = GroupPlan(
        name="auto",
        count=2,
        command=(sys.executable, "-c", AUTO_PROGRAM),
        mode="auto",
        run_options=("--device", "cpu", "--label", "train"),
    )
    proc = launch(assigner, tmp_path, [group])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    seen = records(tmp_path)
    assert sorted(seen) == ["auto-n7-0", "auto-n7-1"]
    for record in seen.values():
        assert record == {"installed": 1, "auto_env": False, "sum": 8.0}
    events = assigner.events()
    # Each program holds its own session (its own pid), named for its worker, labelled.
    sessions = {e["worker"]: e["pid"] for e in events if e["event"] == "session"}
    assert sorted(sessions) == ["auto-n7-0", "auto-n7-1"]
    assert len(set(sessions.values())) == 2 and proc.pid not in sessions.values()
    assert {e["label"] for e in events if e["event"] == "request"} == {"train"}


# ---- the launcher in this process (its main thread: the signals are its own) ----


def in_process(
    monkeypatch: pytest.MonkeyPatch, groups: list[GroupPlan], environ: dict[str, str]
) -> NodeLauncher:
    """A launcher for `groups` on node n7, run in this process (its clients read the session's
    token and TLS settings from os.environ)."""
    for name in (env.TOKEN, env.TOKEN_FILE, env.TLS_DIR, env.ASSIGNER):
        if name in environ:
            monkeypatch.setenv(name, environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    return NodeLauncher(plan_for_node(Plan(tuple(groups)), "n7", environ))


def in_thread(action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def test_a_worker_whose_wake_up_finds_the_pipe_full_still_ends_the_launcher(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    group = GroupPlan(name="c", count=2, command=("true",), mode="client")
    launcher = in_process(monkeypatch, [group], dict(os.environ))
    real_write = os.write
    refused: list[bytes] = []

    def write(fd: int, data: bytes) -> int:  # the first worker's wake-up finds it full
        if fd == launcher._wake_w and data == b"d" and not refused:
            refused.append(data)
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    # Without a count of its own, the launcher would wait for that byte forever: give it one
    # after 15 s, so that the test ends either way.
    rescue = threading.Timer(15, lambda: real_write(launcher._wake_w, b"d"))
    rescue.start()
    began = time.monotonic()
    try:
        code = launcher.run()
    finally:
        rescue.cancel()
    assert refused and code == 0
    assert time.monotonic() - began < 10, "the launcher waited for a wake-up that was lost"


def test_a_launcher_that_fails_leaves_no_wake_up_to_a_reused_descriptor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    group = GroupPlan(name="c", count=1, command=("true",), mode="client")
    launcher = in_process(monkeypatch, [group], dict(os.environ))
    (worker_run,) = launcher.workers
    go = threading.Event()
    real_run = launcher._run

    def run_then_wait(worker: Any) -> int:  # the worker ends once the test says so
        code = real_run(worker)
        go.wait(30)
        return code

    def deliver(signum: int) -> None:
        raise RuntimeError("the main loop failed")

    errors: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    monkeypatch.setattr(launcher, "_run", run_then_wait)
    monkeypatch.setattr(launcher, "_deliver", deliver)

    def signal_once_started() -> None:
        wait_for(lambda: worker_run.started is not None, 30, "the worker's command")
        os.kill(os.getpid(), signal.SIGUSR1)

    in_thread(signal_once_started)
    with pytest.raises(RuntimeError, match="the main loop failed"):
        launcher.run()
    read_end, write_end = os.pipe()  # the lowest free descriptors: likely the launcher's
    try:
        os.set_blocking(read_end, False)
        go.set()
        for thread in threading.enumerate():
            if thread.name.startswith("acb-worker-"):
                thread.join(30)
        assert worker_run.code is not None  # (0, or killed by the guard the launcher closed)
        with pytest.raises(BlockingIOError):
            os.read(read_end, 16)  # nothing written to a descriptor of someone else's
        assert not errors, errors  # nor to a closed one
    finally:
        os.close(read_end)
        os.close(write_end)


SIGNAL_TIMES = textwrap.dedent(
    """
    import os, signal, sys, time
    path = os.path.join(os.environ["ACB_TEST_DIR"], os.environ["ACB_WORKER"] + ".times")
    def note(signum, frame):
        with open(path, "a") as fh:
            fh.write(f"{signal.Signals(signum).name} {time.time()}\\n")
        if signum == signal.SIGUSR1:
            sys.exit(0)
    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGUSR1, note)
    open(path + ".ready", "w").close()
    time.sleep(60)
    sys.exit(3)
    """
)


def test_closing_the_clients_of_many_waiting_workers_does_not_hold_up_signals(
    monkeypatch: pytest.MonkeyPatch, start_assigner: StartAssigner, tmp_path: Path
) -> None:
    from acb_slurm.client.session import Client

    assigner = start_assigner(gpus=1)
    out = tmp_path / "out"
    out.mkdir()
    # One gated worker runs, four wait for the GPU; a client worker notes when signals come.
    groups = [
        worker("w", 5, ACB_TEST_HOLD="60"),
        GroupPlan(name="t", count=1, command=(sys.executable, "-c", SIGNAL_TIMES), mode="client"),
    ]
    launcher = in_process(monkeypatch, groups, assigner.client_env(ACB_TEST_DIR=str(out)))
    real_close = Client.close

    def slow_close(self: Client) -> None:  # a close that waits for its session thread
        time.sleep(1.5)
        real_close(self)

    monkeypatch.setattr(Client, "close", slow_close)

    late: list[BaseException] = []

    def stop() -> None:
        try:
            wait_for((out / "t-n7-0.times.ready").exists, 60, "the client worker")
            wait_for(lambda: len(records(tmp_path)) == 1, 60, "the gated worker that runs")
            wait_for(
                lambda: sum(e["event"] == "request" for e in assigner.events()) == 5,
                60,
                "five requests",
            )
        except BaseException as exc:  # the signals still go: the launcher must not hang
            late.append(exc)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGUSR1)

    in_thread(stop)
    assert launcher.run() == 1
    assert not late, late
    codes = {w.name: w.code for w in launcher.workers}
    assert sorted(codes.values()) == [0, 7, *[128 + signal.SIGTERM] * 4], codes
    times = dict(line.split() for line in (out / "t-n7-0.times").read_text().splitlines())
    # Four closes of 1.5 s one after the other in the main thread would hold SIGUSR1 6 s.
    assert float(times["SIGUSR1"]) - float(times["SIGTERM"]) < 1.5, times
