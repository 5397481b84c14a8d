"""acb-sbatch's command line: help that teaches, one message and exit 1 on errors, 2 on usage."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
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
    assert "export ACB_BIN=/x/bin\n" in result.output
    assert '"$ACB_BIN/acb-launch" --plan' in result.output


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
    assert "trap 'acb_on_exit \"$@\"' EXIT" in result.output


def test_schema_is_valid_json_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    jsonschema.Draft202012Validator.check_schema(schema)


def test_status_without_run_dir_says_where_it_looked(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "42", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "assigners.json does not exist" in result.output


class _FakeSubmitter:
    """Stands in for sbatch: records what existed when it was called, answers a job id."""

    name = "fake"

    def __init__(self, job_id: str = "4242") -> None:
        self.job_id = job_id
        self.seen: list[Path] = []

    def submit(self, script: str, *, cwd: str) -> str:
        self.seen = sorted(p.relative_to(cwd) for p in Path(cwd).rglob("*") if p.is_dir())
        return self.job_id


def _job(tmp_path: Path, allocation: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(
        f"allocation: {allocation}\nbroker: {{virtual_gpus: 1}}\n"
        "workers: [{command: [x], mode: client}]\n",
        encoding="utf-8",
    )
    return job


def test_submit_creates_output_dirs_before_sbatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeSubmitter()
    monkeypatch.setattr("acb_slurm.slurm.cli.choose_submitter", lambda: fake)
    monkeypatch.chdir(tmp_path)
    job = _job(tmp_path, "{output: 'logs/out/%x-%j.out', error: 'errs/e/%j-err.txt'}")
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 0, result.output
    assert {Path("acb-runs"), Path("logs"), Path("logs/out"), Path("errs/e")} <= set(fake.seen)
    lines = result.output.splitlines()
    assert lines[0] == "submitted job 4242 (fake)"
    assert f"output:  {tmp_path}/logs/out/acb-job-4242.out" in lines
    assert (tmp_path / "acb-runs" / "4242" / "job.sh").is_file()


def test_submit_keeps_the_job_id_when_saving_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("acb_slurm.slurm.cli.choose_submitter", lambda: _FakeSubmitter("77"))
    monkeypatch.chdir(tmp_path)
    job = _job(tmp_path, "{name: j}")
    (tmp_path / "acb-runs").mkdir()
    (tmp_path / "acb-runs" / "77").write_text("a file where the run dir should go")
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 1
    assert result.output.startswith("submitted job 77 (fake)\n")
    assert "acb-sbatch: error: job 77 was submitted, but" in result.output
    assert "Traceback" not in result.output


def test_submit_refuses_before_sbatch_when_an_output_dir_cannot_be_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeSubmitter()
    monkeypatch.setattr("acb_slurm.slurm.cli.choose_submitter", lambda: fake)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("")
    job = _job(tmp_path, "{output: 'blocker/sub/%j.out'}")
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 1
    assert "nothing was submitted" in result.output
    assert "submitted job" not in result.output.replace("nothing was submitted", "")
    assert fake.seen == []


def _event(ts: float, event: str, **fields: object) -> str:
    return json.dumps({"ts": ts, "event": event, "node": "n1", **fields}) + "\n"


def _write_run(run_dir: Path, worker_pause: float) -> None:
    """A one-GPU run: workers a and b take turns; b waits `worker_pause` seconds."""
    gpu = [{"index": 0, "device_id": "0", "memory_bytes": 1}]
    common = {"gpu_count": 1, "memory_bytes": 0, "priority": 0}
    events = [
        _event(0.0, "start", policy="simple", pid=1, gpus=gpu),
        _event(1.0, "request", client="ca", worker="a", lease="L1", label="L1", **common),
        _event(1.0, "grant", client="ca", worker="a", lease="L1", gpus=[0], device_ids=["0"],
               memory_bytes=0, waited=0.0),
        _event(1.5, "request", client="cb", worker="b", lease="L2", label="L2", **common),
        _event(3.0, "release", client="ca", worker="a", lease="L1", gpus=[0], held=2.0,
               reason="release"),
        _event(3.0, "grant", client="cb", worker="b", lease="L2", gpus=[0], device_ids=["0"],
               memory_bytes=0, waited=worker_pause),
        _event(5.0, "release", client="cb", worker="b", lease="L2", gpus=[0], held=2.0,
               reason="release"),
        _event(6.0, "stop", reason="signal"),
    ]  # fmt: skip
    (run_dir / "n1").mkdir(parents=True)
    (run_dir / "n1" / "events.jsonl").write_text("".join(events), encoding="utf-8")


def test_report_compares_two_runs_with_comma_separated_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _write_run(tmp_path / "acb-runs" / "11", 1.5)
    _write_run(tmp_path / "acb-runs" / "12", 1.5)
    result = runner.invoke(
        app, ["report", "11", "--compare", "12", "--names", "shared,static", "--holdings"]
    )
    assert result.exit_code == 0, result.output
    assert "shared" in result.output and "static" in result.output
    assert "L1" in result.output and "L2" in result.output  # --holdings lists the leases
    assert f"timeline: {tmp_path}/acb-runs/11/report/timeline.png" in result.output
    summary = json.loads((tmp_path / "acb-runs/11/report/summary.json").read_text())
    assert [s["name"] for s in summary] == ["shared", "static"]
    # Repeating the option works too; a wrong count is one message and exit 1.
    again = runner.invoke(app, ["report", "11", "--compare", "12", "--names", "a", "--names", "b"])
    assert again.exit_code == 0, again.output
    wrong = runner.invoke(app, ["report", "11", "--compare", "12", "--names", "only-one"])
    assert wrong.exit_code == 1
    assert "2 run(s) but 1 name(s)" in wrong.output
