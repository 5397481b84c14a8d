"""job.yaml validation: every error kind names file:line and the field; the JSON Schema agrees."""

from __future__ import annotations

import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from acb_slurm.slurm.errors import SpecError
from acb_slurm.slurm.spec import (
    FALLBACK_POLICIES,
    JobSpec,
    json_schema,
    known_policies,
    load_spec,
    parse_slurm_time,
    parse_spec,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "slurm"

MINIMAL = """\
allocation:
  gpus_per_node: 1
workers:
  - command: [python, work.py]
"""


def problems_of(text: str, base_dir: Path | None = None) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(textwrap.dedent(text), "job.yaml", base_dir=base_dir)
    return [str(p) for p in info.value.problems]


def only_problem(text: str, base_dir: Path | None = None) -> str:
    found = problems_of(text, base_dir)
    assert len(found) == 1, found
    return found[0]


def test_minimal_spec_gets_defaults() -> None:
    spec = parse_spec(MINIMAL, "job.yaml")
    assert isinstance(spec, JobSpec)
    assert spec.workers[0].command == ("python", "work.py")
    assert spec.workers[0].mode == "gate"
    assert spec.allocation.nodes == 1
    assert spec.broker.policy == "simple"
    assert spec.source == "job.yaml"


def test_full_spec_is_typed() -> None:
    spec = parse_spec(
        textwrap.dedent(
            """\
            allocation:
              name: fold
              partition: gpu
              account: proj
              nodes: 2
              ntasks_per_node: 1
              cpus_per_task: 8
              gpus_per_node: 2
              mem: 64G
              time: 1-12:00:00
              output: logs/%x-%j.out
              extra: [--qos=high]
            broker:
              policy: gpu-sharing
              gpus: 2
              worker_memory: 20GiB
              startup_timeout: 30
            workers:
              - name: fold
                command: "python fold.py --db /data"
                per_gpu: 4
                env: {OMP_NUM_THREADS: 4, TAG: x}
                workdir: /scratch
            """
        ),
        "job.yaml",
    )
    assert spec.allocation.mem == "64G"
    assert spec.allocation.time == "1-12:00:00"
    assert spec.broker.worker_memory == 20 * 1024**3
    assert spec.workers[0].env == (("OMP_NUM_THREADS", "4"), ("TAG", "x"))
    assert spec.gpus_per_node == 2
    assert spec.workers_per_node(spec.workers[0]) == 8


# Every error kind: (sentence, job.yaml, expected "file:line: field", words the message must have)
ERRORS = [
    (
        "an unknown key lists the valid ones and suggests a close match",
        """\
        allocation:
          partiton: gpu
        workers:
          - command: [x]
        """,
        "job.yaml:2: allocation.partiton",
        ["unknown key", "did you mean 'partition'", "valid keys: name, partition"],
    ),
    (
        "a negative time slice is refused",
        """\
        broker:
          time_slice: -5
        workers:
          - command: [x]
        """,
        "job.yaml:2: broker.time_slice",
        ["must be at least 0, got -5"],
    ),
    (
        "a missing required section is named",
        """\
        allocation:
          nodes: 1
        """,
        "job.yaml:1: workers",
        ["is required"],
    ),
    (
        "a wrong type says what was expected and what was given",
        """\
        allocation:
          nodes: two
        workers:
          - command: [x]
        """,
        "job.yaml:2: allocation.nodes",
        ["expected a whole number", "'two'"],
    ),
    (
        "a boolean is not a number",
        """\
        allocation:
          gpus_per_node: yes
        workers:
          - command: [x]
        """,
        "job.yaml:2: allocation.gpus_per_node",
        ["expected a whole number", "boolean"],
    ),
    (
        "a negative count is impossible",
        """\
        allocation:
          gpus_per_node: -1
        workers:
          - command: [x]
        """,
        "job.yaml:2: allocation.gpus_per_node",
        ["at least 0", "-1"],
    ),
    (
        "zero nodes is impossible",
        """\
        allocation:
          nodes: 0
        workers:
          - command: [x]
        """,
        "job.yaml:2: allocation.nodes",
        ["at least 1"],
    ),
    (
        "a time Slurm would not parse lists Slurm's formats",
        """\
        allocation:
          time: "1:2:3:4"
        workers:
          - command: [x]
        """,
        "job.yaml:2: allocation.time",
        ["not a time Slurm understands", "D-HH:MM:SS", "UNLIMITED"],
    ),
    (
        "a zero time limit is impossible",
        """\
        allocation:
          time: "0:00"
        workers:
          - command: [x]
        """,
        "job.yaml:2: allocation.time",
        ["zero"],
    ),
    (
        "a memory size Slurm would not parse",
        """\
        allocation:
          mem: 16 GB
        workers:
          - command: [x]
        """,
        "job.yaml:2: allocation.mem",
        ["not a Slurm memory size"],
    ),
    (
        "an unknown policy lists the known ones",
        """\
        broker:
          policy: gpu-shareing
        workers:
          - command: [x]
        """,
        "job.yaml:2: broker.policy",
        ["unknown policy 'gpu-shareing'", "did you mean 'gpu-sharing'", "simple"],
    ),
    (
        "a bad byte size names the accepted forms",
        """\
        broker:
          worker_memory: lots
        workers:
          - command: [x]
        """,
        "job.yaml:2: broker.worker_memory",
        ["not a size", "80GiB"],
    ),
    (
        "an unknown worker mode lists the modes",
        """\
        workers:
          - command: [x]
            mode: turbo
        """,
        "job.yaml:3: workers[0].mode",
        ["unknown mode 'turbo'", "gate, auto, client"],
    ),
    (
        "per_node and per_gpu together name both values",
        """\
        allocation: {gpus_per_node: 1}
        workers:
          - command: [x]
            per_node: 2
            per_gpu: 3
        """,
        "job.yaml:5: workers[0].per_gpu",
        ["not both", "per_node=2", "per_gpu=3"],
    ),
    (
        "an empty command is refused",
        """\
        workers:
          - command: []
        """,
        "job.yaml:2: workers[0].command",
        ["expected a list of arguments or a command line string"],
    ),
    (
        "an environment variable name must be one",
        """\
        workers:
          - command: [x]
            env: {"BAD-NAME": x}
        """,
        "job.yaml:3: workers[0].env.BAD-NAME",
        ["not an environment variable name"],
    ),
    (
        "a value an #SBATCH line cannot carry",
        """\
        allocation:
          name: 'say "hi"'
        workers:
          - command: [x]
        """,
        "job.yaml:2: allocation.name",
        ["#SBATCH line"],
    ),
    (
        "an extra sbatch flag must look like one",
        """\
        allocation:
          extra: [qos=high]
        workers:
          - command: [x]
        """,
        "job.yaml:2: allocation.extra[0]",
        ["not an sbatch option"],
    ),
    (
        "a duplicate key is refused with the first line",
        """\
        workers:
          - command: [x]
        workers:
          - command: [y]
        """,
        "job.yaml:3: workers",
        ["duplicate key", "line 1"],
    ),
    (
        "a missing campaign file is named with where it was looked for",
        """\
        campaign: nowhere/campaign.yaml
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:1: campaign",
        ["does not exist", "nowhere/campaign.yaml"],
    ),
    # cross-field errors: both fields and both values
    (
        "broker.gpus more than the allocation's GPUs",
        """\
        allocation: {gpus_per_node: 2}
        broker: {gpus: 4}
        workers:
          - command: [x]
        """,
        "job.yaml:2: broker.gpus",
        ["broker.gpus=4", "allocation.gpus_per_node=2"],
    ),
    (
        "a gated worker in a job without GPUs",
        """\
        workers:
          - command: [x]
            mode: gate
        """,
        "job.yaml:3: workers[0].mode",
        ["workers[0].mode=gate", "allocation.gpus_per_node=0", "virtual_gpus"],
    ),
    (
        "a worker wanting more GPUs than a node has",
        """\
        allocation: {gpus_per_node: 2}
        workers:
          - command: [x]
            gpus: 3
        """,
        "job.yaml:4: workers[0].gpus",
        ["workers[0].gpus=3", "2 GPU(s)"],
    ),
    (
        "a worker estimate larger than a virtual GPU",
        """\
        broker: {virtual_gpus: 1, gpu_memory: 8GiB, worker_memory: 16GiB}
        workers:
          - command: [x]
        """,
        "job.yaml:1: broker.worker_memory",
        ["broker.worker_memory=17179869184", "broker.gpu_memory=8589934592"],
    ),
    (
        "gpu_memory without virtual GPUs",
        """\
        allocation: {gpus_per_node: 1}
        broker: {gpu_memory: 8GiB}
        workers:
          - command: [x]
        """,
        "job.yaml:2: broker.gpu_memory",
        ["only used with broker.virtual_gpus"],
    ),
    (
        "an extra flag repeating a field",
        """\
        allocation:
          gpus_per_node: 1
          extra:
            - --qos=high
            - --time=10
        workers:
          - command: [x]
        """,
        "job.yaml:5: allocation.extra[1]",
        ["'--time=10' is managed by job.yaml field allocation.time"],
    ),
    (
        "an extra flag in short form repeating a field",
        """\
        allocation:
          extra: [--qos=high, -N2]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[1]",
        ["'-N2' is managed by job.yaml field allocation.nodes"],
    ),
    (
        "an extra short flag with a space repeating a field",
        """\
        allocation:
          extra: [-t 5]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["'-t 5' is managed by job.yaml field allocation.time"],
    ),
    (
        "an extra long flag with a space repeating a field",
        """\
        allocation:
          extra: ["--nodes 3"]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["'--nodes 3' is managed by job.yaml field allocation.nodes"],
    ),
    (
        "an extra --gpus beside gpus_per_node",
        """\
        allocation:
          extra: [--gpus=2]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["allocation.gpus_per_node"],
    ),
    (
        "--mem-per-cpu in extra together with mem",
        """\
        allocation:
          mem: 16G
          extra: [--mem-per-cpu=2G]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:3: allocation.extra[0]",
        ["allocation.extra[0]='--mem-per-cpu=2G'", "allocation.mem=16G", "only one"],
    ),
    (
        "--mem-per-gpu in extra together with mem",
        """\
        allocation:
          mem: 16G
          extra: ["--mem-per-gpu 8G"]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:3: allocation.extra[0]",
        ["--mem-per-gpu 8G", "allocation.mem=16G"],
    ),
    (
        "more workers per GPU than the cap",
        """\
        allocation: {gpus_per_node: 1}
        workers:
          - command: [x]
            per_gpu: 65
        """,
        "job.yaml:4: workers[0].per_gpu",
        ["at most 64", "65"],
    ),
    (
        "more workers per node than the cap",
        """\
        allocation: {gpus_per_node: 1}
        workers:
          - command: [x]
            per_node: 513
        """,
        "job.yaml:4: workers[0].per_node",
        ["at most 512", "513"],
    ),
    (
        "too many workers per node in all groups together",
        """\
        allocation: {gpus_per_node: 8}
        workers:
          - command: [x]
            per_gpu: 64
          - command: [y]
            per_node: 2
        """,
        "job.yaml:2: workers",
        ["514 workers per node", "workers[0].per_gpu=64", "workers[1].per_node=2", "8 GPU(s)"],
    ),
    (
        "a read-only bash variable in a worker's env",
        """\
        workers:
          - command: [x]
            env: {UID: "1000"}
        """,
        "job.yaml:3: workers[0].env.UID",
        ["read-only or special bash variable"],
    ),
    (
        "a BASH_ variable in a worker's env",
        """\
        workers:
          - command: [x]
            env: {BASH_ENV: /x}
        """,
        "job.yaml:3: workers[0].env.BASH_ENV",
        ["read-only or special bash variable"],
    ),
    (
        "a variable the batch script sets in a worker's env",
        """\
        workers:
          - command: [x]
            env: {CUDA_VISIBLE_DEVICES: "0"}
        """,
        "job.yaml:3: workers[0].env.CUDA_VISIBLE_DEVICES",
        ["set by acb-slurm for each worker"],
    ),
    (
        "ACB_ASSIGNER in a worker's env",
        """\
        workers:
          - command: [x]
            env: {ACB_ASSIGNER: "unix:/x"}
        """,
        "job.yaml:3: workers[0].env.ACB_ASSIGNER",
        ["set by acb-slurm for each worker"],
    ),
    (
        "a GPU type that cannot be one",
        """\
        allocation:
          gpus_per_node: 1
          gpu_type: "a100 x"
        workers:
          - command: [x]
        """,
        "job.yaml:3: allocation.gpu_type",
        ["'a100 x' is not valid here"],
    ),
    (
        "a GPU type without GPUs",
        """\
        allocation:
          gpu_type: a100
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.gpu_type",
        ["allocation.gpu_type=a100", "allocation.gpus_per_node=0"],
    ),
]


@pytest.mark.parametrize(
    ("text", "where", "words"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_error_names_file_line_field(
    text: str, where: str, words: list[str], tmp_path: Path
) -> None:
    message = only_problem(text, base_dir=tmp_path)
    assert message.startswith(where + ": "), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_all_problems_are_reported_at_once() -> None:
    found = problems_of(
        """\
        allocation:
          nodes: -2
          tme: 10
        workers:
          - command: [x]
            modee: gate
        """
    )
    assert [p.split(": ")[0:2] for p in found] == [
        ["job.yaml:2", "allocation.nodes"],
        ["job.yaml:3", "allocation.tme"],
        ["job.yaml:6", "workers[0].modee"],
    ]


def test_unknown_section_is_named_and_the_missing_one_too() -> None:
    found = problems_of("worker:\n  - command: [x]\n")
    assert found[0].startswith("job.yaml:1: worker: unknown key (did you mean 'workers'?)")
    assert found[1].startswith("job.yaml:1: workers: is required")


def test_unquoted_times_keep_their_slurm_meaning() -> None:
    # YAML 1.1 reads 10:30 as the sexagesimal integer 630; Slurm means 10 min 30 s.
    spec = parse_spec("allocation: {time: 10:30, gpus_per_node: 1}\nworkers: [{command: [x]}]")
    assert spec.allocation.time == "10:30"
    spec = parse_spec("allocation: {time: 90, gpus_per_node: 1}\nworkers: [{command: [x]}]")
    assert spec.allocation.time == "90"


def test_yaml_syntax_error_has_a_line() -> None:
    message = only_problem("workers:\n  - command: [x\n  - foo: ]\n")
    assert message.startswith("job.yaml:3: not valid YAML"), message


def test_empty_and_non_mapping_documents() -> None:
    assert "is empty" in only_problem("")
    assert "must be a mapping" in only_problem("- a\n- b\n")


def test_load_spec_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "my job.yaml"
    path.write_text("workers:\n  - command: [x]\n    per_node: 0\n", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value.problems[0]).startswith(f"{path}:3: workers[0].per_node: ")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_campaign_is_resolved_relative_to_the_job_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("items: []\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text("campaign: c.yaml\nworkers:\n  - command: [x]\n    mode: client\n")
    assert load_spec(job).campaign == str((tmp_path / "c.yaml").resolve())


SLURM_TIMES = [
    ("90", 90 * 60),
    (90, 90 * 60),
    ("10:30", 10 * 60 + 30),
    ("1:00:00", 3600),
    ("2-0", 2 * 86400),
    ("2-12", 2 * 86400 + 12 * 3600),
    ("1-2:30", 86400 + 2 * 3600 + 30 * 60),
    ("1-02:03:04", 86400 + 2 * 3600 + 3 * 60 + 4),
    ("UNLIMITED", None),
    ("infinite", None),
]


@pytest.mark.parametrize(("text", "seconds"), SLURM_TIMES)
def test_slurm_time_formats(text: str | int, seconds: int | None) -> None:
    assert parse_slurm_time(text) == seconds


@pytest.mark.parametrize("text", ["", "1:2:3:4", "1-2-3", "a", "1h", "-5", "1-", ":30", "1.5"])
def test_slurm_time_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="MM:SS"):
        parse_slurm_time(text)


def test_policies_come_from_the_scheduler_registry() -> None:
    assert sorted(known_policies()) == sorted(FALLBACK_POLICIES)


# ---- the JSON Schema is derived from the same fields ----------------------------------------


def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_schema_is_draft_2020_12() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"workers", "allocation", "broker", "campaign"}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_pass_both_validation_and_schema(path: Path) -> None:
    load_spec(path)
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = list(validator().iter_errors(document))
    assert not errors, [e.message for e in errors]


@pytest.mark.parametrize(
    "text",
    [
        e[1]
        for e in ERRORS
        if e[0]
        not in (
            # Only the Python validator can see these: duplicates vanish in safe_load, files and
            # other fields are outside a schema's reach, zero times match the format.
            "a duplicate key is refused with the first line",
            "a missing campaign file is named with where it was looked for",
            "a zero time limit is impossible",
            "broker.gpus more than the allocation's GPUs",
            "a gated worker in a job without GPUs",
            "a worker wanting more GPUs than a node has",
            "a worker estimate larger than a virtual GPU",
            "gpu_memory without virtual GPUs",
            "an extra flag repeating a field",
            "an extra flag in short form repeating a field",
            "an extra short flag with a space repeating a field",
            "an extra long flag with a space repeating a field",
            "an extra --gpus beside gpus_per_node",
            "--mem-per-cpu in extra together with mem",
            "--mem-per-gpu in extra together with mem",
            "too many workers per node in all groups together",
            "a GPU type without GPUs",
        )
    ],
)
def test_invalid_specs_fail_the_schema_too(text: str) -> None:
    document = yaml.safe_load(textwrap.dedent(text))
    assert list(validator().iter_errors(document)), "the schema accepted an invalid job.yaml"


def test_valid_inline_specs_pass_the_schema() -> None:
    for text in (
        MINIMAL,
        "allocation: {time: UNLIMITED, mem: 4000}\nworkers: [{command: 'echo hi', mode: client}]",
        "broker: {virtual_gpus: 2, gpu_memory: 8GiB}\nworkers: [{command: [a, 1], per_gpu: 2}]",
    ):
        assert not list(validator().iter_errors(yaml.safe_load(text))), text


def test_tuning_variables_stay_allowed_in_worker_env() -> None:
    spec = parse_spec(
        "workers: [{command: [x], mode: client, env: {ACB_IDLE_MS: 50, BASH: /bin/bash}}]\n"
    )
    assert dict(spec.workers[0].env) == {"ACB_IDLE_MS": "50", "BASH": "/bin/bash"}


def test_gpu_type_is_kept() -> None:
    spec = parse_spec("allocation: {gpus_per_node: 2, gpu_type: a100}\nworkers: [{command: [x]}]")
    assert spec.allocation.gpu_type == "a100"
