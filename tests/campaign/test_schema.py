"""The campaign file's JSON Schema (`acb-campaign schema`): generated from the models that
validate the file, so the two agree on what is valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from acb_slurm.campaign.cli import app
from acb_slurm.campaign.spec import CampaignSpec, Stage, json_schema

try:  # a test extra, not a dependency: without it the schema is checked by its structure only
    import jsonschema
except ImportError:  # pragma: no cover
    jsonschema = None

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*/campaign*.yaml"))

VALID = """\
items: items.fasta
results: out
stages:
  - name: fold
    device: gpu
    memory: 20GiB
    timeout: 1:30:00
    env: {XLA_PYTHON_CLIENT_PREALLOCATE: false, N: 4, BASH_ENV: /x}
    command: [fold, "{fasta}", 3]
"""

# (sentence, a change to VALID that the schema must refuse)
INVALID = [
    ("an unknown key", ("results: out", "results: out\nretrys: 3")),
    ("an unknown stage key", ("device: gpu", "device: gpu\n    mdoe: gate")),
    ("a missing stages list", ("stages:", "stagez:")),
    ("a command as one string", ('[fold, "{fasta}", 3]', '"fold x"')),
    ("an empty command", ('[fold, "{fasta}", 3]', "[]")),
    ("a bad device", ("device: gpu", "device: tpu")),
    ("a stage name with a space", ("name: fold", "name: fold it")),
    ("retries out of range", ("results: out", "results: out\nretries: 1000")),
    ("a size without a unit", ("memory: 20GiB", "memory: 30")),
    ("a negative duration", ("timeout: 1:30:00", "timeout: -5")),
    ("a duration in weeks", ("timeout: 1:30:00", "timeout: 2w")),
    ("a reserved env name", ("N: 4", "CUDA_VISIBLE_DEVICES: '0'")),
    ("a campaign env name", ("N: 4", "ACB_CAMPAIGN_ITEM: x")),
    ("an env name that is none", ("N: 4", "'A-B': 4")),
    ("nice out of range", ("device: gpu", "device: gpu\n    nice: 20")),
    ("a batch below 1", ("device: gpu", "device: gpu\n    batch: 0")),
    ("outputs as one string", ("device: gpu", "device: gpu\n    outputs: x.pdb")),
]


def document(text: str) -> Any:
    return yaml.safe_load(text)


def errors(schema: dict[str, Any], value: Any) -> list[str]:
    assert jsonschema is not None
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(value)]


def test_the_schema_is_draft_2020_12_and_names_every_key() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"items", "results", "stages"}
    assert set(schema["properties"]) == {a.alias or n for n, a in CampaignSpec.model_fields.items()}
    stage = schema["$defs"]["Stage"]
    assert stage["additionalProperties"] is False
    assert set(stage["properties"]) == {a.alias or n for n, a in Stage.model_fields.items()}
    assert set(stage["required"]) == {"name", "command"}
    # defaults are the models' (written once, on the fields)
    assert (
        schema["properties"]["retries"]["default"] == CampaignSpec.model_fields["retries"].default
    )
    assert stage["properties"]["nice"]["default"] == 10
    if jsonschema is not None:
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.skipif(jsonschema is None, reason="jsonschema (a test extra) is not installed")
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_example_campaign_files_pass_the_schema(path: Path) -> None:
    assert not errors(json_schema(), document(path.read_text(encoding="utf-8")))


def test_there_are_example_campaign_files() -> None:
    assert {p.name for p in EXAMPLES} >= {"campaign.yaml", "campaign-synthetic.yaml"}


@pytest.mark.skipif(jsonschema is None, reason="jsonschema (a test extra) is not installed")
def test_a_valid_file_passes_the_schema_and_validation(tmp_path: Path) -> None:
    from acb_slurm.campaign.spec import load_spec

    assert not errors(json_schema(), document(VALID))
    (tmp_path / "items.fasta").write_text(">a\nMKV\n")
    (tmp_path / "c.yaml").write_text(VALID)
    assert load_spec(tmp_path / "c.yaml").stages[0].timeout_s == 5400.0


@pytest.mark.skipif(jsonschema is None, reason="jsonschema (a test extra) is not installed")
@pytest.mark.parametrize(("old", "new"), [c for _, c in INVALID], ids=[s for s, _ in INVALID])
def test_invalid_files_fail_both_the_schema_and_validation(
    tmp_path: Path, old: str, new: str
) -> None:
    from acb_slurm.campaign.errors import SpecError
    from acb_slurm.campaign.spec import load_spec

    assert old in VALID
    text = VALID.replace(old, new)
    assert errors(json_schema(), document(text)), "the schema accepted an invalid campaign file"
    (tmp_path / "items.fasta").write_text(">a\nMKV\n")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SpecError):
        load_spec(tmp_path / "c.yaml")


def test_the_schema_command_prints_the_schema() -> None:
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json_schema()
