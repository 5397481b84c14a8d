"""The campaign file: valid files load into typed objects; invalid ones name file, line, field."""

from __future__ import annotations

from pathlib import Path

import pytest

from acb_slurm.campaign.errors import SpecError
from acb_slurm.campaign.spec import Device, GpuMode, load_spec, substitute

GOOD = """\
name: screen
items: items.fasta
results: out
retries: 3
heartbeat: 10s
stale_after: 2m
stages:
  - name: msa
    command: [colabfold_search, "{fasta}", /db, "{outdir}/msa"]
  - name: predict
    device: gpu
    mode: gate
    memory: 16GiB
    timeout: 1h
    env: {XLA_PYTHON_CLIENT_PREALLOCATE: false, TAG: "{item}"}
    command: [colabfold_batch, "{outdir}/msa", "{outdir}/pred"]
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "items.fasta").write_text(">a\nMKV\n")
    path = tmp_path / "campaign.yaml"
    path.write_text(text)
    return path


def test_a_valid_file_loads_into_typed_stages(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.name == "screen"
    assert spec.items == (tmp_path / "items.fasta").resolve()
    assert spec.results == (tmp_path / "out").resolve()
    assert spec.retries == 3 and spec.max_attempts == 4
    assert spec.heartbeat_s == 10.0 and spec.stale_after_s == 120.0
    msa, predict = spec.stages
    assert msa.device is Device.CPU and msa.command[1] == "{fasta}"
    assert predict.device is Device.GPU and predict.mode is GpuMode.GATE
    assert predict.memory_bytes == 16 * 1024**3
    assert predict.timeout_s == 3600.0
    assert predict.env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TAG": "{item}"}


@pytest.mark.parametrize(
    ("sentence", "text", "line", "field", "words"),
    [
        (
            "an unknown top-level key is named with the valid keys",
            GOOD.replace("retries: 3", "retrys: 3"),
            4,
            "retrys",
            ["unknown key 'retrys'", "retries ("],
        ),
        (
            "an unknown stage key names the stage",
            GOOD.replace("    mode: gate", "    mdoe: gate"),
            12,
            "stages[1] (predict).mdoe",
            ["unknown key", "mode ("],
        ),
        (
            "a command given as one string is refused: never through a shell",
            GOOD.replace(
                '[colabfold_search, "{fasta}", /db, "{outdir}/msa"]', '"colabfold_search x"'
            ),
            9,
            "stages[0] (msa).command",
            ["list of arguments", "never run through a shell"],
        ),
        (
            "an unknown placeholder lists the known ones",
            GOOD.replace('"{outdir}/pred"', '"{outdri}/pred"'),
            16,
            "stages[1] (predict).command",
            ["{outdri}", "{outdir}", "{fasta}"],
        ),
        (
            "a gpu-only key on a cpu stage says how to fix it",
            GOOD.replace("  - name: msa\n", "  - name: msa\n    memory: 1GiB\n"),
            9,
            "stages[0] (msa).memory",
            ["device: gpu"],
        ),
        (
            "a bad device",
            GOOD.replace("device: gpu", "device: tpu"),
            11,
            "stages[1] (predict).device",
            ["cpu or gpu", "'tpu'"],
        ),
        (
            "a bad mode",
            GOOD.replace("mode: gate", "mode: swap"),
            12,
            "stages[1] (predict).mode",
            ["gate or auto"],
        ),
        (
            "a bad memory size",
            GOOD.replace("memory: 16GiB", "memory: lots"),
            13,
            "stages[1] (predict).memory",
            ["80GiB"],
        ),
        (
            "a memory size without a unit is refused as a missing unit",
            GOOD.replace("memory: 16GiB", "memory: 30"),
            13,
            "stages[1] (predict).memory",
            ["no unit", "30GiB"],
        ),
        (
            "auto mode with several GPUs names both fields",
            GOOD.replace("mode: gate", "mode: auto\n    gpus: 2"),
            13,
            "stages[1] (predict).gpus",
            ["mode auto", "gpus is 2"],
        ),
        (
            "retries are bounded",
            GOOD.replace("retries: 3", "retries: 1000"),
            4,
            "retries",
            ["0 to 100"],
        ),
        (
            "stale_after must exceed twice the heartbeat: both values named",
            GOOD.replace("stale_after: 2m", "stale_after: 15s"),
            6,
            "stale_after",
            ["15s", "10s", "heartbeat"],
        ),
        (
            "duplicate stage names",
            GOOD.replace("name: predict", "name: msa"),
            10,
            "stages[1].name",
            ["unique"],
        ),
        (
            "a missing items file",
            GOOD.replace("items: items.fasta", "items: nowhere.fasta"),
            2,
            "items",
            ["does not exist"],
        ),
        (
            "a missing stages list",
            GOOD.split("stages:")[0],
            1,
            "stages",
            ["missing"],
        ),
        (
            "batch on a cpu stage",
            GOOD.replace(
                "    command: [colabfold_search", "    batch: 4\n    command: [colabfold_search"
            ),
            9,
            "stages[0] (msa).batch",
            ["only gpu stages take 'batch'", "device is cpu"],
        ),
        (
            "a batch below 1",
            GOOD.replace("mode: gate", "mode: gate\n    batch: 0"),
            13,
            "stages[1] (predict).batch",
            ["at least 1", "1 to 1024"],
        ),
        (
            "a batch stage's env may not name one item: one environment per process",
            GOOD.replace("mode: gate", "mode: gate\n    batch: 4"),
            16,
            "stages[1] (predict).env.TAG",
            ["names one item", "batch: 4", "command argument"],
        ),
        (
            "outputs are a list of paths",
            GOOD.replace("mode: gate", "mode: gate\n    outputs: ranked_0.pdb"),
            13,
            "stages[1] (predict).outputs",
            ["list of paths"],
        ),
        (
            "a duplicated key",
            GOOD.replace("retries: 3", "retries: 3\nretries: 4"),
            5,
            "retries",
            ["given twice", "line 4"],
        ),
    ],
)
def test_errors_name_file_line_and_field(
    tmp_path: Path, sentence: str, text: str, line: int, field: str, words: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    error = info.value
    assert error.path == path
    assert error.line == line, str(error)
    assert error.field == field, str(error)
    message = str(error)
    assert message.startswith(f"{path}:{line}: {field}: ")
    for word in words:
        assert word in message, message


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "items: [unclosed\nresults: x\n")
    with pytest.raises(SpecError, match=r"campaign.yaml:\d+: not valid YAML"):
        load_spec(path)


def test_substitution_keeps_each_argument_whole() -> None:
    values = {"outdir": "/r/it's a dir; rm -rf ~", "item": "p1"}
    assert substitute("{outdir}", values) == values["outdir"]
    assert substitute("--out={outdir}/x", values) == f"--out={values['outdir']}/x"
    assert substitute("{{literal}} {item}", values) == "{literal} p1"
    with pytest.raises(KeyError):
        substitute("{nope}", values)


def test_every_problem_is_reported_at_once_sorted_by_line(tmp_path: Path) -> None:
    text = (
        GOOD.replace("retries: 3", "retrys: 3")
        .replace("device: gpu", "device: gpux")
        .replace("memory: 16GiB", "memory: 30")
        .replace('"{outdir}/pred"', '"{outdri}/pred"')
        + "heartbeat: 5s\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    error = info.value
    assert [(p.line, p.field) for p in error.problems] == [
        (4, "retrys"),
        (11, "stages[1] (predict).device"),
        (13, "stages[1] (predict).memory"),
        (16, "stages[1] (predict).command"),
        (17, "heartbeat"),
    ], str(error)
    # the error itself is the first problem; its message has one line per problem
    assert (error.line, error.field) == (4, "retrys")
    lines = str(error).splitlines()
    assert len(lines) == 5 and all(line.startswith(f"{path}:") for line in lines), lines
    assert "duplicate key, given twice (first on line 5)" in lines[-1]


def test_an_unknown_key_gets_a_close_match_and_the_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, GOOD.replace("    mode: gate", "    mdoe: gate")))
    message = info.value.message
    assert message.startswith("unknown key 'mdoe' (did you mean 'mode'?); valid keys: name ("), (
        message
    )
    # each valid key with what it means and its default, written once on the model
    assert "gpus (gpu stages: number of GPUs; default 1)" in message, message


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("CUDA_VISIBLE_DEVICES", "set by acb-slurm for each worker"),
        ("ACB_CAMPAIGN_ITEM", "set by acb-slurm for each worker"),
        ("ACB_ASSIGNER", "set by acb-slurm for each worker"),
        ("ACB_LEASE_ID", "set by acb-slurm for each worker"),
        ("BAD-NAME", "not an environment variable name"),
    ],
)
def test_stage_env_names_are_checked_against_the_reserved_ones(
    tmp_path: Path, name: str, why: str
) -> None:
    text = GOOD.replace('TAG: "{item}"', f'TAG: "{{item}}", "{name}": x')
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    error = info.value
    assert (error.line, error.field) == (15, f"stages[1] (predict).env.{name}"), str(error)
    assert why in error.message, error.message
    assert len(error.problems) == 1, str(error)


def test_stage_env_takes_tuning_and_bash_variables(tmp_path: Path) -> None:
    # Stage commands are not run by bash: its variables may be set (BASH_ENV is a real use).
    text = GOOD.replace('TAG: "{item}"', 'TAG: "{item}", ACB_IDLE_MS: 50, BASH_ENV: /x')
    stage = load_spec(write(tmp_path, text)).stages[1]
    assert stage.env["ACB_IDLE_MS"] == "50" and stage.env["BASH_ENV"] == "/x"


def test_defaults_fill_what_the_file_leaves_out(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "items: items.fasta\nresults: out\nstages:\n  - {name: a, command: [x]}\n"
        "  - {name: b, device: gpu, command: [y]}\n",
    )
    spec = load_spec(path)
    assert spec.name == "campaign"  # the file's name
    assert (spec.retries, spec.heartbeat_s, spec.stale_after_s, spec.progress_interval_s) == (
        2,
        30.0,
        600.0,
        60.0,
    )
    cpu, gpu = spec.stages
    assert (cpu.nice, gpu.nice) == (10, 0)
    assert (gpu.mode, gpu.gpus, gpu.memory_bytes, gpu.priority, gpu.timeout_s) == (
        GpuMode.GATE,
        1,
        0,
        0,
        None,
    )


def test_yaml_tags_are_refused_in_campaign_files_too(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("results: out", "results: !!python/name:os.system out"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert (info.value.line, info.value.field) == (3, "results")
    assert "YAML tag '!!python/name:os.system' is not allowed" in info.value.message


@pytest.mark.parametrize(
    ("written", "seconds"), [("1:30", 90.0), ("1:30:00", 5400.0), ("90", 90.0)]
)
def test_durations_with_colons_keep_their_meaning(
    tmp_path: Path, written: str, seconds: float
) -> None:
    # YAML 1.1 reads 1:30 as the base-60 number 90; the reader keeps it as text, and a duration
    # reads it the same way, quoted or not.
    for text in (written, f'"{written}"'):
        spec = load_spec(write(tmp_path, GOOD.replace("timeout: 1h", f"timeout: {text}")))
        assert spec.stages[1].timeout_s == seconds, text


BATCHED = """\
items: items.fasta
results: out
stages:
  - name: msa
    command: [search, "{fasta}", "{outdir}/msa"]
  - name: predict
    device: gpu
    batch: 8
    batch_wait: 10m
    item_link: "{outdir}/msa/*.a3m"
    command: [colabfold_batch, "{items_dir}", "{results}/predictions", --tag, "{item}"]
    outputs: ["{results}/predictions/{item}.done.txt"]
"""


def test_a_batch_stage_loads_with_its_fields_and_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BATCHED))
    msa, predict = spec.stages
    assert spec.batched_stage is predict
    assert (predict.batch, predict.batch_wait_s) == (8, 600.0)
    assert predict.item_link == "{outdir}/msa/*.a3m"
    assert predict.outputs == ("{results}/predictions/{item}.done.txt",)
    assert (msa.batch, msa.batch_wait_s, msa.item_link, msa.outputs) == (1, 1800.0, "{outdir}", ())
    one = load_spec(write(tmp_path, BATCHED.replace("batch: 8", "batch: 1")))
    assert one.batched_stage is None  # batch 1: a process per item, as without the key


def test_only_one_stage_may_batch(tmp_path: Path) -> None:
    text = (
        BATCHED
        + """\
  - name: relax
    device: gpu
    batch: 2
    command: [relax, "{outdir}"]
"""
    )
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    assert info.value.line == 15 and info.value.field == "stages[2] (relax).batch"
    assert "only one stage may batch" in str(info.value) and "stages[1] (predict)" in str(
        info.value
    )


def test_the_process_directory_is_no_path_of_an_item(tmp_path: Path) -> None:
    text = BATCHED.replace('"{outdir}/msa/*.a3m"', '"{items_dir}/x"')
    with pytest.raises(SpecError, match=r"item_link: item_link names a path of one item"):
        load_spec(write(tmp_path, text))
