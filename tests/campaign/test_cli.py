"""`acb-campaign` at its edge: errors become one message and exit code 1; help text."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from acb_slurm.campaign.cli import CAMPAIGN_ENV, app

runner = CliRunner()


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("worker", "status", "reset-failed", "check"):
        assert command in result.output


def test_no_campaign_file_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CAMPAIGN_ENV, raising=False)
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 1
    assert "no campaign file given" in result.output and CAMPAIGN_ENV in result.output
    assert "Traceback" not in result.output


def test_an_invalid_campaign_is_one_message_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("items: x.fasta\nresults: r\nstages: []\n")
    result = runner.invoke(app, ["worker", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1
    assert f"acb-campaign: error: {tmp_path / 'c.yaml'}:1: items:" in result.output
    assert "Traceback" not in result.output


def test_check_reads_the_campaign_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "s.fasta").write_text(">a\nMK\n>b\nMK\n")
    (tmp_path / "c.yaml").write_text(
        "items: s.fasta\nresults: r\nstages:\n"
        "  - {name: fold, device: gpu, memory: 20GiB, command: [fold, '{fasta}']}\n"
    )
    monkeypatch.setenv(CAMPAIGN_ENV, str(tmp_path / "c.yaml"))
    result = runner.invoke(app, ["check"])
    assert result.exit_code == 0, result.output
    assert "2 items" in result.output
    assert "stage fold [gpu (gate, 1 GPU, memory 20.0GiB)]" in result.output
