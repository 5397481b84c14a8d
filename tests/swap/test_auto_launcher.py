"""`acb-run --auto --device cpu` as real processes against a real acb-assigner."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from acb_slurm import env
from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.exitcodes import ExitCode
from acb_slurm.launcher.auto import BOOT_DIR, AutoError, AutoSpec, child_environment

StartAssigner = Callable[..., AssignerProcess]
ACB_RUN = [sys.executable, "-m", "acb_slurm.launcher.cli"]
TRAIN = Path(__file__).parent / "data" / "train_small.py"
#: 4 GPU phases of 3 optimizer steps, separated by CPU phases of 1 s (idle interval 100 ms): long
#: enough that the two programs overlap even when one starts seconds after the other.
TRAIN_ARGS = ["4", "3", "1.0"]


def assert_same_training(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert torch.equal(mine["losses"], theirs["losses"])
    assert mine["model"].keys() == theirs["model"].keys()
    for name, value in mine["model"].items():
        assert torch.equal(value, theirs["model"][name]), name
    for key, state in mine["opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, theirs["opt"]["state"][key][name]), (key, name)


@pytest.mark.slow
def test_two_unmodified_programs_share_one_gpu_and_train_exactly_as_alone(
    start_assigner: StartAssigner, tmp_path: Path
) -> None:
    plain = subprocess.run(
        [sys.executable, str(TRAIN), str(tmp_path / "alone.pt"), *TRAIN_ARGS],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert plain.returncode == 0, plain.stderr
    assigner = start_assigner(gpus=1)
    environ = assigner.client_env()
    command = [*ACB_RUN, "--auto", "--device", "cpu", "--idle-ms", "100", "--"]
    workers = [
        subprocess.Popen(
            [*command, sys.executable, str(TRAIN), str(tmp_path / f"w{i}.pt"), *TRAIN_ARGS],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=240)
        assert worker.returncode == 0, output

    alone = torch.load(tmp_path / "alone.pt")
    for i in range(2):
        assert_same_training(torch.load(tmp_path / f"w{i}.pt"), alone)

    events = assigner.events()
    grants = [e for e in events if e["event"] == "grant"]
    by_client: dict[str, int] = {}
    for grant in grants:
        by_client[grant["client"]] = by_client.get(grant["client"], 0) + 1
    assert len(by_client) == 2 and min(by_client.values()) > 1, by_client
    order = [g["client"] for g in grants]
    switches = sum(1 for a, b in itertools.pairwise(order) if a != b)
    assert switches >= 2, f"the two programs did not alternate on the GPU: {order}"
    holder: str | None = None  # one GPU: a grant only ever follows the release of the previous
    for event in events:
        if event["event"] == "grant":
            assert holder is None, f"{event['lease']} granted while {holder} held the GPU"
            holder = event["lease"]
        elif event["event"] == "release" and event["lease"] == holder:
            holder = None


def test_the_program_runs_as_without_acb_run_and_its_children_are_left_alone(
    start_assigner: StartAssigner, tmp_path: Path
) -> None:
    script = tmp_path / "prog with space.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, subprocess, sys
            print("argv", sys.argv[1:], "main", __name__)
            print("auto-in-me", os.environ.get("ACB_AUTO"))
            probe = "import os; print(os.environ.get('ACB_AUTO'))"
            child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
            print("auto-in-child", child.stdout.strip())
            raise SystemExit(5)
            """
        )
    )
    assigner = start_assigner(gpus=1)
    proc = subprocess.run(
        [*ACB_RUN, "--auto", "--device", "cpu", "--", sys.executable, str(script), "a b", "'c"],
        env=assigner.client_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 5, proc.stderr
    assert "argv ['a b', \"'c\"] main __main__" in proc.stdout
    assert "auto-in-me None" in proc.stdout
    assert "auto-in-child None" in proc.stdout
    assert not [e for e in assigner.events() if e["event"] == "grant"], "no torch, no GPU"


def test_auto_without_an_assigner_says_how_to_point_at_one() -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ACB_")}
    proc = subprocess.run(
        [*ACB_RUN, "--auto", "--", sys.executable, "-c", "pass"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == ExitCode.ASSIGNER_UNAVAILABLE
    assert "ACB_ASSIGNER is not set" in proc.stderr


def test_child_environment_puts_the_boot_directory_first_and_the_settings_in_acb_auto() -> None:
    spec = AutoSpec(command=["python", "train.py"], device="cpu")
    out = child_environment(spec, {"PYTHONPATH": "/x", env.IDLE_MS: "250"})
    assert out["PYTHONPATH"].split(os.pathsep) == [str(BOOT_DIR), "/x"]
    assert (BOOT_DIR / "sitecustomize.py").is_file()
    assert '"idle_ms": 250.0' in out[env.AUTO] and '"label": "train.py"' in out[env.AUTO]
    assert '"device": "cpu"' in out[env.AUTO]


@pytest.mark.parametrize(
    ("spec", "environ", "message"),
    [
        (AutoSpec(["python", "x.py"]), {env.IDLE_MS: "soon"}, "not a number of milliseconds"),
        (AutoSpec(["python", "x.py"], idle_ms=0), {}, "must be positive"),
        (AutoSpec(["python", "x.py"], device="tpu"), {}, "cuda, cuda:N or cpu"),
    ],
    ids=["idle-env-not-a-number", "idle-zero", "unknown-device"],
)
def test_bad_settings_are_refused_with_the_reason(
    spec: AutoSpec, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(AutoError, match=message):
        child_environment(spec, environ)


def test_acb_run_auto_becomes_the_program(start_assigner: StartAssigner) -> None:
    """No parent stays behind (the program holds its own session): same pid, and a signal sent
    to acb-run's pid reaches the program itself."""
    assigner = start_assigner(gpus=1)
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    proc = subprocess.Popen(
        [*ACB_RUN, "--auto", "--device", "cpu", "--", sys.executable, "-c", code],
        env=assigner.client_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert int(proc.stdout.readline()) == proc.pid
    proc.terminate()
    assert proc.wait(timeout=30) == -15


def test_the_program_and_the_pythons_it_starts_see_the_environment_as_without_acb_run(
    start_assigner: StartAssigner, tmp_path: Path
) -> None:
    """The boot directory is for the program's own start: afterwards PYTHONPATH and sys.path are
    what they were, so the Pythons the program starts pay nothing for it."""
    assigner = start_assigner(gpus=1)
    program = (
        "import json, os, subprocess, sys\n"
        "child = subprocess.run([sys.executable, '-c', 'import sys; print(\"sitecustomize\" in "
        'sys.modules and sys.modules["sitecustomize"].__file__ or "")\'],\n'
        "    capture_output=True, text=True, check=True).stdout.strip()\n"
        "print(json.dumps([os.environ.get('PYTHONPATH'), sys.path[1:], 'ACB_AUTO' in os.environ,"
        " child]))\n"
    )
    for pythonpath in (None, str(tmp_path)):
        environ = assigner.client_env()
        plain_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if pythonpath is not None:
            environ["PYTHONPATH"] = plain_env["PYTHONPATH"] = pythonpath
        else:
            environ.pop("PYTHONPATH", None)
        runs = [
            subprocess.run(argv, env=e, capture_output=True, text=True, timeout=120, check=False)
            for argv, e in (
                ([sys.executable, "-c", program], plain_env),
                (
                    [*ACB_RUN, "--auto", "--device", "cpu", "--", sys.executable, "-c", program],
                    environ,
                ),
            )
        ]
        assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
        plain, auto = (r.stdout for r in runs)
        assert auto == plain, (pythonpath, plain, auto)
