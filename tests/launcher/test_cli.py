"""`acb-run`'s command line: how it is read, what it refuses, and that it stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from acb_slurm import env
from acb_slurm.exitcodes import ExitCode
from acb_slurm.launcher import cli
from acb_slurm.launcher.cli import Launch

READ = [
    (["--gate", "--", "python", "x.py"], Launch("gate", ["python", "x.py"])),
    (["--mode", "gate", "--", "true"], Launch("gate", ["true"])),
    (["--mode=auto", "--", "python"], Launch("auto", ["python"])),
    (
        ["--auto", "--", "python", "train.py", "--lr", "0.1"],
        Launch("auto", ["python", "train.py", "--lr", "0.1"]),
    ),
    # The command starts at its first word: its own flags are its own.
    (
        ["--gate", "python", "x.py", "--gpus", "3"],
        Launch("gate", ["python", "x.py", "--gpus", "3"]),
    ),
    (
        ["--gate", "--gpus", "2", "--memory", "20GiB", "--", "python", "fold.py"],
        Launch("gate", ["python", "fold.py"], gpus=2, memory="20GiB"),
    ),
    (
        ["--gate", "--gpus=2", "--priority", "-3", "--timeout", "1e3", "--", "true"],
        Launch("gate", ["true"], gpus=2, priority=-3, timeout=1000.0),
    ),
    (
        ["--auto", "--idle-ms=.5", "--device=cuda:1", "--label", "", "--", "python"],
        Launch("auto", ["python"], idle_ms=0.5, device="cuda:1"),
    ),
    (["--auto", "--", "--", "x"], Launch("auto", ["--", "x"])),  # the command may contain --
]


@pytest.mark.parametrize(("argv", "expected"), READ, ids=[" ".join(a) for a, _ in READ])
def test_a_command_line_is_read_into_a_launch(argv: list[str], expected: Launch) -> None:
    assert cli.read(argv) == expected


MISTAKES = [
    (["--", "true"], "pick a mode"),
    (["true"], "pick a mode"),
    (["--gate"], "no command to run"),
    (["--gate", "--"], "no command to run"),
    (["--gate", "--auto", "--", "true"], "not allowed with"),
    (["--mode", "gate", "--auto", "--", "true"], "not allowed with"),
    (["--mode", "tpu", "--", "true"], "invalid choice"),
    (["--auto", "--gpus", "2", "--", "true"], "--gpus: not an option of --auto"),
    (["--auto", "--timeout", "5", "--", "true"], "--timeout: not an option of --auto"),
    (["--gate", "--idle-ms", "5", "--device", "cpu", "--", "true"], "--idle-ms, --device"),
    (["--gate", "--gpus", "x", "--", "true"], "invalid int value: 'x'"),
    (["--gate", "--gpus"], "expected one argument"),
    (["--gate", "--unknown", "--", "true"], "unrecognized arguments: --unknown"),
    (["--gate", "--gpu", "2", "--", "true"], "unrecognized arguments: --gpu"),  # no abbreviations
]


@pytest.mark.parametrize(("argv", "message"), MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_mistake_is_a_usage_error_that_says_what_is_wrong(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.read(argv)
    assert exited.value.code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert message in err
    assert "acb-run" in err


def test_help_lists_the_exit_statuses_and_the_flags_of_each_mode(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.read(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for code in ExitCode:
        assert f"{code:3d}  " in out
    assert "--gate and --gang" in out and "--auto only" in out and "--gang only" in out
    assert "--mode {gate,auto}" in out


def test_a_bad_memory_size_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.launch(Launch("gate", ["true"], memory="lots"))
    assert exited.value.code == ExitCode.USAGE
    assert "--memory" in capsys.readouterr().err


def test_a_plain_auto_launch_imports_neither_typer_nor_grpc_nor_torch() -> None:
    # acb-run --auto only prepares the program's environment and execs it: torch there cost
    # 1.7 s of CPU per run, typer and pydantic 0.19 s, gRPC 60 ms.
    probe = (
        "import json, os, sys\n"
        "def execve(path, args, environ):\n"
        "    heavy = ('typer', 'pydantic', 'grpc', 'google.protobuf', 'torch', 'yaml')\n"
        "    print(json.dumps([args, [m for m in heavy if m in sys.modules]]), flush=True)\n"
        "    os._exit(0)\n"
        "os.execve = execve\n"
        "from acb_slurm.launcher import cli\n"
        "cli.main(['--auto', '--device', 'cpu', '--', sys.executable, '-c', 'pass'])\n"
    )
    environ = {env.ASSIGNER: "unix:/nonexistent/assigner.sock", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    args, heavy = json.loads(result.stdout.strip().splitlines()[-1])
    assert args == [sys.executable, "-c", "pass"]
    assert heavy == []


def test_the_exec_wrapper_and_acb_run_agree_on_cannot_start() -> None:
    from acb_slurm import _deathwrap

    assert ExitCode.CANNOT_START == _deathwrap.CANNOT_START
