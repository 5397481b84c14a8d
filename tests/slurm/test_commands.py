"""Parsers of Slurm's output, on output recorded from a real Slurm 22.05 (tests/slurm/data/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from acb_slurm.slurm.commands import (
    parse_exit_code,
    parse_hostnames,
    parse_sbatch_parsable,
    parse_scontrol_record,
    parse_slurm_version,
    parse_test_only,
    run_slurm,
)
from acb_slurm.slurm.errors import AcbSlurmError, SlurmError
from acb_slurm.slurm.submit import (
    CliSubmitter,
    Submitter,
    available_submitters,
    get_submitter,
    register_submitter,
)

DATA = Path(__file__).resolve().parent / "data"


def recorded(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def test_sbatch_parsable() -> None:
    assert parse_sbatch_parsable(recorded("sbatch-parsable.txt")) == "7"
    assert parse_sbatch_parsable("123;cluster\n") == "123"
    with pytest.raises(SlurmError, match="squeue --me"):
        parse_sbatch_parsable("sbatch: error: something\n")


def test_slurm_version() -> None:
    assert parse_slurm_version(recorded("sbatch-version.txt")) == (22, 5)
    assert parse_slurm_version("slurm 23.11.1\n") == (23, 11)
    with pytest.raises(SlurmError):
        parse_slurm_version("no version here")


def test_hostnames() -> None:
    assert parse_hostnames(recorded("scontrol-show-hostnames.txt")) == ["n1", "n2"]


def test_scontrol_show_job_records() -> None:
    done = parse_scontrol_record(recorded("scontrol-show-job-completed.txt"))
    assert done["JobId"] == "6"
    assert done["JobState"] == "COMPLETED"
    assert parse_exit_code(done["ExitCode"]) == (0, 0)
    assert done["AllocNode:Sid"].startswith("localhost:")
    failed = parse_scontrol_record(recorded("scontrol-show-job-failed.txt"))
    assert failed["JobState"] == "FAILED"
    assert failed["Reason"] == "NonZeroExitCode"
    assert parse_exit_code(failed["ExitCode"]) == (3, 0)
    pending = parse_scontrol_record(recorded("scontrol-show-job-pending.txt"))
    assert pending["JobState"] == "PENDING"
    assert pending["StartTime"] == "Unknown"


def test_scontrol_show_node_keeps_values_with_spaces() -> None:
    node = parse_scontrol_record(recorded("scontrol-show-node.txt"))
    assert node["NodeAddr"] == "127.0.0.1"
    assert node["Gres"] == "gpu:2"
    assert node["OS"].startswith("Linux ") and "#1 SMP" in node["OS"]


def test_test_only_answer() -> None:
    answer = parse_test_only(recorded("sbatch-test-only.stderr.txt"))
    assert answer["nodes"] == "n1"
    assert answer["processors"] == "1"
    with pytest.raises(SlurmError, match="test-only"):
        parse_test_only(recorded("sbatch-bad-partition.stderr.txt"))


def test_run_slurm_quotes_the_failure() -> None:
    with pytest.raises(SlurmError) as info:
        run_slurm(
            ["bash", "-c", "echo 'sbatch: error: Invalid partition name specified' >&2; exit 1"]
        )
    message = str(info.value)
    assert "exit 1" in message
    assert "Invalid partition name specified" in message


def test_run_slurm_missing_command_says_what_to_do() -> None:
    with pytest.raises(SlurmError, match="slurm-dev-cluster up"):
        run_slurm(["acb-no-such-slurm-command"])


def test_run_slurm_timeout() -> None:
    with pytest.raises(SlurmError, match="did not answer"):
        run_slurm(["sleep", "5"], timeout=0.2)


def test_submitter_registry() -> None:
    assert {"cli", "pyslurm"} <= set(available_submitters())
    assert isinstance(get_submitter("cli"), CliSubmitter)
    with pytest.raises(AcbSlurmError, match="known: cli, pyslurm"):
        get_submitter("qsub")

    class Duplicate(Submitter):
        name = "cli"

        def submit(self, script: str, *, cwd: str) -> str:
            raise NotImplementedError

    with pytest.raises(ValueError, match="already registered"):
        register_submitter(Duplicate)


def test_pyslurm_is_refused_unless_it_matches() -> None:
    try:
        import pyslurm  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(AcbSlurmError, match="pyslurm is not installed"):
            get_submitter("pyslurm")
    else:  # pragma: no cover - depends on the machine
        pytest.skip("pyslurm is installed here; its match is checked against sbatch --version")
