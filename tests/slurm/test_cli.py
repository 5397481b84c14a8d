"""acb-sbatch's command line: help that teaches, one message and exit 1 on errors, 2 on usage."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from typer.testing import CliRunner

from acb_slurm.slurm.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_help_has_examples() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for text in ("acb-sbatch submit job.yaml", 'eval "$(acb-sbatch prologue', "per_gpu"):
        assert text in result.output
    for command in ("submit", "render", "prologue", "status", "cancel", "schema"):
        assert command in result.output
    assert "await-assigners" not in result.output  # internal to the prologue


def test_prologue_help_shows_usage_in_a_batch_script() -> None:
    result = runner.invoke(app, ["prologue", "--help"])
    assert result.exit_code == 0
    assert "node-env" in result.output
    assert "ACB_TOKEN_FILE" in result.output


def test_render_prints_the_script() -> None:
    result = runner.invoke(
        app, ["render", str(REPO / "examples/slurm/gate-virtual.yaml"), "--bin-dir", "/x/bin"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("#!/bin/bash\n")
    assert "/x/bin/acb-run --gate" in result.output


def test_render_default_bin_dir_is_the_running_python(tmp_path: Path) -> None:
    import sys

    result = runner.invoke(app, ["render", str(REPO / "examples/slurm/gate-virtual.yaml")])
    assert f"ACB_BIN={Path(sys.executable).parent}" in result.output


def test_invalid_spec_is_one_message_and_exit_1(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("allocation:\n  nodez: 1\nworkers:\n  - command: [x]\n", encoding="utf-8")
    result = runner.invoke(app, ["render", str(job)])
    assert result.exit_code == 1
    assert f"{job}:2: allocation.nodez: unknown key (did you mean 'nodes'?)" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_usage_error_exits_2() -> None:
    result = runner.invoke(app, ["render"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["prologue", "--virtual-gpus", "many"])
    assert result.exit_code == 2


def test_prologue_validates_like_job_yaml() -> None:
    result = runner.invoke(app, ["prologue", "--policy", "gpu-sharin"])
    assert result.exit_code == 1
    assert "--policy: unknown policy 'gpu-sharin' (did you mean 'gpu-sharing'?)" in result.output
    result = runner.invoke(app, ["prologue", "--virtual-gpus", "0"])
    assert result.exit_code == 1
    assert "--virtual-gpus: must be at least 1" in result.output


def test_prologue_prints_shell_for_eval() -> None:
    result = runner.invoke(
        app, ["prologue", "--virtual-gpus", "2", "--gpu-memory", "8GiB", "--bin-dir", "/b"]
    )
    assert result.exit_code == 0, result.output
    assert "acb_assigner_args=(--policy simple --virtual-gpus 2 --gpu-memory 8589934592)" in (
        result.output
    )
    assert "trap acb_stop_assigners EXIT" in result.output


def test_schema_is_valid_json_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    jsonschema.Draft202012Validator.check_schema(schema)


def test_status_without_run_dir_says_where_it_looked(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "42", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "assigners.json does not exist" in result.output
