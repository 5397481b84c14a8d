"""job.yaml validation: every error kind names file:line and the field; the JSON Schema agrees."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from acb_slurm import defaults
from acb_slurm.slurm.errors import SpecError
from acb_slurm.slurm.spec import (
    Broker,
    JobSpec,
    check_value,
    json_schema,
    known_policies,
    load_spec,
    parse_slurm_time,
    parse_spec,
)
from acb_slurm.units import MIN_BARE_SIZE, parse_written_size

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
    assert spec.workers[0].env == {"OMP_NUM_THREADS": "4", "TAG": "x"}
    assert spec.gpus_per_node == 2
    assert spec.workers_per_node(spec.workers[0]) == 8


# Every error kind: (sentence, job.yaml, expected "file:line: field", words the message must have)
ERRORS = [
    (
        "a torchrun group over more nodes than the allocation has",
        """\
        allocation: {nodes: 2, gpus_per_node: 2}
        workers:
          - command: [python, train.py]
            torchrun:
              nodes: 3
              nproc_per_node: 2
        """,
        "job.yaml:5: workers[0].torchrun.nodes",
        ["workers[0].torchrun.nodes=3", "allocation.nodes=2"],
    ),
    (
        "a torchrun group needing more GPUs per node than a node has",
        """\
        allocation: {nodes: 2, gpus_per_node: 4}
        workers:
          - command: [python, train.py]
            torchrun:
              nodes: 2
              nproc_per_node: 3
              gpus_per_proc: 2
        """,
        "job.yaml:6: workers[0].torchrun.nproc_per_node",
        ["nproc_per_node=3", "gpus_per_proc=2", "6 GPU(s) per node", "the 4 GPU(s)"],
    ),
    (
        "a torchrun group with a mode",
        """\
        allocation: {gpus_per_node: 2}
        workers:
          - command: [python, train.py]
            torchrun: {nodes: 1, nproc_per_node: 2}
            mode: gate
        """,
        "job.yaml:5: workers[0].mode",
        ["workers[0].mode=gate makes no sense with workers[0].torchrun", "remove it"],
    ),
    (
        "a torchrun group with per_node",
        """\
        allocation: {gpus_per_node: 2}
        workers:
          - command: [python, train.py]
            per_node: 2
            torchrun: {nodes: 1, nproc_per_node: 2}
        """,
        "job.yaml:4: workers[0].per_node",
        ["workers[0].per_node=2 makes no sense with workers[0].torchrun"],
    ),
    (
        "a torchrun group without nproc_per_node",
        """\
        allocation: {gpus_per_node: 2}
        workers:
          - command: [python, train.py]
            torchrun: {nodes: 1}
        """,
        "job.yaml:4: workers[0].torchrun.nproc_per_node",
        ["required"],
    ),
    (
        "a torchrun group with an unknown key",
        """\
        allocation: {gpus_per_node: 2}
        workers:
          - command: [python, train.py]
            torchrun: {nodes: 1, nproc_per_node: 2, nnodes: 2}
        """,
        "job.yaml:4: workers[0].torchrun.nnodes",
        ["unknown key", "did you mean 'nodes'"],
    ),
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
    # values that become paths
    (
        "a job name with a slash would make the default output path a missing directory",
        """\
        allocation:
          name: fold/v2
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.name",
        ["'fold/v2' contains '/'", "%x", "acb-%x-%j.out", "use '-' or '_' instead"],
    ),
    (
        "a job name that is a directory of its own",
        """\
        allocation:
          name: ".."
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.name",
        ["'..' cannot be a job name", "%x"],
    ),
    (
        "an output path with the job id in a directory name",
        """\
        allocation:
          output: logs/%j/out.txt
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.output",
        [
            "'logs/%j/out.txt' puts %j in a directory name",
            "Slurm does not create directories",
            "logs/%x-%j.out",
        ],
    ),
    (
        "an error path with the array index in a directory name",
        """\
        allocation:
          error: "runs/%4a/%j.err"
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.error",
        ["puts %4a in a directory name"],
    ),
    (
        "a run root with a line break",
        """\
        broker:
          run_root: "runs\\nold"
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: broker.run_root",
        ["control character", "would break the path"],
    ),
    (
        "a worker directory with a tab",
        """\
        workers:
          - command: [x]
            mode: client
            workdir: "/scratch/\\tdata"
        """,
        "job.yaml:4: workers[0].workdir",
        ["control character"],
    ),
    # sizes without a unit
    (
        "a worker estimate without a unit is a missing unit, not 30 bytes",
        """\
        broker: {virtual_gpus: 1, worker_memory: 30}
        workers:
          - command: [x]
        """,
        "job.yaml:1: broker.worker_memory",
        ["30 has no unit", "30 bytes", "missing unit", "30GiB", "30MiB", "30B"],
    ),
    (
        "a quoted GPU memory without a unit",
        """\
        broker:
          virtual_gpus: 1
          gpu_memory: "1000"
        workers:
          - command: [x]
        """,
        "job.yaml:3: broker.gpu_memory",
        ["'1000' has no unit", "missing unit"],
    ),
    (
        "a size without a unit just below 1 MiB",
        """\
        broker:
          virtual_gpus: 1
          gpu_memory: 1048575
        workers:
          - command: [x]
        """,
        "job.yaml:3: broker.gpu_memory",
        ["1048575 has no unit", "below 1 MiB"],
    ),
    # extra options that acb-sbatch manages
    (
        "--wrap in extra: the batch script is acb-sbatch's",
        """\
        allocation:
          extra: [--wrap=hostname]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["'--wrap=hostname' is managed by acb-sbatch", "workers[].command"],
    ),
    (
        "--ntasks in extra",
        """\
        allocation:
          extra: [--ntasks=4]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["managed by job.yaml field allocation.ntasks_per_node"],
    ),
    (
        "-n in extra",
        """\
        allocation:
          extra: [-n4]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["'-n4' is managed by job.yaml field allocation.ntasks_per_node"],
    ),
    (
        "an abbreviated managed option in extra",
        """\
        allocation:
          extra: [--part=gpu]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["'--part=gpu' abbreviates --partition", "allocation.partition"],
    ),
    (
        "an abbreviation of several managed options in extra",
        """\
        allocation:
          extra: ["--nt 4"]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["abbreviates --ntasks or --ntasks-per-node", "allocation.ntasks_per_node"],
    ),
    (
        "--chdir in extra",
        """\
        allocation:
          extra: [--chdir=/scratch]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["'--chdir=/scratch' is managed by acb-sbatch", "workers[].workdir"],
    ),
    (
        "-D in extra",
        """\
        allocation:
          extra: [-D /scratch]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["'-D /scratch' is managed by acb-sbatch"],
    ),
    (
        "--test-only in extra",
        """\
        allocation:
          extra: [--test-only]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["acb-sbatch submit --test-only"],
    ),
    (
        "--parsable in extra",
        """\
        allocation:
          extra: [--parsable]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["'--parsable' is managed by acb-sbatch"],
    ),
    (
        "--wait in extra",
        """\
        allocation:
          extra: [-W]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["'-W' is managed by acb-sbatch", "wait until the job ends", "acb-sbatch status"],
    ),
    (
        "--gpus-per-task in extra",
        """\
        allocation:
          gpus_per_node: 1
          extra: [--gpus-per-task=1]
        workers:
          - command: [x]
        """,
        "job.yaml:3: allocation.extra[0]",
        ["managed by job.yaml field allocation.gpus_per_node"],
    ),
    (
        "--cpus-per-gpu in extra",
        """\
        allocation:
          extra: [--cpus-per-gpu=4]
        workers:
          - command: [x]
            mode: client
        """,
        "job.yaml:2: allocation.extra[0]",
        ["managed by job.yaml field allocation.cpus_per_task"],
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


def test_problems_of_every_kind_come_at_once_sorted_by_line() -> None:
    # A duplicate key (found while reading the YAML), type and range errors in two sections,
    # unknown keys with a close match, and a bad entry of a list: one run reports them all.
    found = problems_of(
        """\
        broker:
          policy: simpel
          startup_timeout: 0
        allocation:
          nodez: 2
          extra: [--qos=high, --nodes=2]
          gpus_per_node: many
        workers:
          - command: [x]
            env: {CUDA_VISIBLE_DEVICES: "0", "A B": x}
        broker:
          policy: simple
        """
    )
    assert [p.split(": ")[0:2] for p in found] == [
        ["job.yaml:2", "broker.policy"],
        ["job.yaml:3", "broker.startup_timeout"],
        ["job.yaml:5", "allocation.nodez"],
        ["job.yaml:6", "allocation.extra[1]"],
        ["job.yaml:7", "allocation.gpus_per_node"],
        ["job.yaml:10", "workers[0].env.A B"],
        ["job.yaml:10", "workers[0].env.CUDA_VISIBLE_DEVICES"],
        ["job.yaml:11", "broker"],
    ], found
    assert "did you mean 'simple'?" in found[0]
    assert "must be at least 1, got 0 (a whole number from 1 to 3600)" in found[1]
    assert "unknown key (did you mean 'nodes'?)" in found[2]
    assert "duplicate key" in found[-1] and "line 1" in found[-1]


def test_the_error_message_has_one_problem_per_line() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(
            "allocation: {nodes: 0, cpus_per_task: 0}\nworkers: [{command: [x]}]\n", "j.yaml"
        )
    assert str(info.value).splitlines() == [
        "j.yaml:1: allocation.cpus_per_task: must be at least 1, got 0",
        "j.yaml:1: allocation.nodes: must be at least 1, got 0",
    ]


def test_a_section_left_empty_takes_its_defaults() -> None:
    spec = parse_spec("allocation:\nbroker:\nworkers: [{command: [x], mode: client}]\n")
    assert spec.allocation.nodes == 1
    assert spec.broker.policy == defaults.POLICY
    assert spec.broker.startup_timeout == defaults.STARTUP_TIMEOUT_S


def test_defaults_are_written_once() -> None:
    # The schema's defaults are the models', which are acb_slurm.defaults'.
    broker = json_schema()["$defs"]["Broker"]["properties"]
    assert broker["policy"]["default"] == defaults.POLICY
    assert broker["startup_timeout"]["default"] == defaults.STARTUP_TIMEOUT_S
    assert defaults.VIRTUAL_GPU_MEMORY in broker["gpu_memory"]["description"]
    assert defaults.RUN_ROOT in broker["run_root"]["description"]
    from acb_slurm.slurm.render import PrologueOptions

    options = PrologueOptions()
    assert (options.policy, options.startup_timeout) == (
        defaults.POLICY,
        defaults.STARTUP_TIMEOUT_S,
    )
    assert options.context()["gpu_memory"] == parse_written_size(defaults.VIRTUAL_GPU_MEMORY)


def test_spec_objects_are_frozen() -> None:
    spec = parse_spec(MINIMAL)
    with pytest.raises(ValueError, match="frozen"):
        spec.allocation.nodes = 3  # type: ignore[misc]


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
    from acb_slurm.scheduler.policies import available_policies, policy_variants

    assert known_policies() == [*available_policies(), *policy_variants()]
    assert "gpu-sharing:pack" in known_policies()
    assert defaults.POLICY in known_policies()
    assert json_schema()["$defs"]["Broker"]["properties"]["policy"]["enum"] == known_policies()


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


JOB_FILES = sorted(
    [*EXAMPLES.glob("*.yaml"), *EXAMPLES.parent.glob("*/job*.yaml")],
    key=lambda p: (p.parent.name, p.name),
)


def test_every_example_job_file_is_found() -> None:
    names = {f"{p.parent.name}/{p.name}" for p in JOB_FILES}
    assert {"slurm/gate-virtual.yaml", "demo/job.yaml", "alphafold2/job.yaml"} <= names, names


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
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
            # other fields are outside a schema's reach, zero times match the format, --mem-per-*
            # is wrong only beside mem.
            "a duplicate key is refused with the first line",
            "a missing campaign file is named with where it was looked for",
            "a zero time limit is impossible",
            "broker.gpus more than the allocation's GPUs",
            "a gated worker in a job without GPUs",
            "a worker wanting more GPUs than a node has",
            "a worker estimate larger than a virtual GPU",
            "gpu_memory without virtual GPUs",
            "--mem-per-cpu in extra together with mem",
            "--mem-per-gpu in extra together with mem",
            "too many workers per node in all groups together",
            "a GPU type without GPUs",
            "a torchrun group over more nodes than the allocation has",
            "a torchrun group needing more GPUs per node than a node has",
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


def test_a_torchrun_group_is_typed_and_not_a_per_node_worker() -> None:
    text = textwrap.dedent(
        """\
        allocation: {nodes: 2, gpus_per_node: 2}
        workers:
          - name: train
            torchrun: {nodes: 2, nproc_per_node: 2}
            command: [python, train.py, --epochs, 3]
          - command: [x]
            per_node: 512
        """
    )
    spec = parse_spec(text)
    train = spec.workers[0]
    assert train.torchrun is not None
    assert (train.torchrun.nodes, train.torchrun.nproc_per_node) == (2, 2)
    assert (train.torchrun.gpus_per_proc, train.torchrun.repeat) == (1, 1)
    assert train.command == ("python", "train.py", "--epochs", "3")
    # Not counted among the 512 workers a node may have.
    assert spec.workers_per_node(train) == 0
    assert not list(validator().iter_errors(yaml.safe_load(text)))
    schema = json_schema()["$defs"]["Torchrun"]
    assert set(schema["required"]) == {"nodes", "nproc_per_node"}


def test_tuning_variables_stay_allowed_in_worker_env() -> None:
    spec = parse_spec(
        "workers: [{command: [x], mode: client, env: {ACB_IDLE_MS: 50, BASH: /bin/bash}}]\n"
    )
    assert dict(spec.workers[0].env) == {"ACB_IDLE_MS": "50", "BASH": "/bin/bash"}


def test_gpu_type_is_kept() -> None:
    spec = parse_spec("allocation: {gpus_per_node: 2, gpu_type: a100}\nworkers: [{command: [x]}]")
    assert spec.allocation.gpu_type == "a100"


# ---- YAML features job.yaml refuses: tags, alias bombs, self-containing and deep values -------

CLIENT_WORKER = "workers:\n  - command: [x]\n    mode: client\n"


@pytest.mark.parametrize(
    ("text", "where", "tag"),
    [
        (
            "workers: !!python/object/apply:os.system [{command: [x], mode: client}]\n",
            "job.yaml:1: workers",
            "'!!python/object/apply:os.system'",
        ),
        (
            "allocation:\n  nodes: !!python/object/apply:os.system 2\n" + CLIENT_WORKER,
            "job.yaml:2: allocation.nodes",
            "'!!python/object/apply:os.system'",
        ),
        (
            "allocation: !!python/object:acb.Evil\n  nodes: 2\n" + CLIENT_WORKER,
            "job.yaml:1: allocation",
            "'!!python/object:acb.Evil'",
        ),
        (
            "allocation:\n  name: !!str fold\n" + CLIENT_WORKER,
            "job.yaml:2: allocation.name",
            "'!!str'",
        ),
        (
            "allocation:\n  name: !mine fold\n" + CLIENT_WORKER,
            "job.yaml:2: allocation.name",
            "'!mine'",
        ),
        ("allocation:\n  name: ! fold\n" + CLIENT_WORKER, "job.yaml:2: allocation.name", "'!'"),
        (
            "workers:\n  - command: [x, !!binary aGk=]\n    mode: client\n",
            "job.yaml:2: workers[0].command[1]",
            "'!!binary'",
        ),
        (
            "workers:\n  - command: [x]\n    mode: client\n    env: {!!str A: b}\n",
            "job.yaml:4: workers[0].env",
            "'!!str'",
        ),
    ],
    ids=["sequence", "scalar", "mapping", "str", "local", "non-specific", "list item", "key"],
)
def test_yaml_tags_are_refused(text: str, where: str, tag: str) -> None:
    message = only_problem(text)
    assert message.startswith(f"{where}: YAML tag {tag} is not allowed"), message
    assert "plain values" in message and "quote it" in message, message


def test_every_tag_is_reported_at_once() -> None:
    found = problems_of("allocation:\n  name: !!str a\n  account: !x b\n" + CLIENT_WORKER)
    assert [p.split(": ")[0:2] for p in found] == [
        ["job.yaml:2", "allocation.name"],
        ["job.yaml:3", "allocation.account"],
    ]


def alias_bomb(levels: int, width: int) -> str:
    """A "billion laughs": each level an anchored list of `width` aliases of the level below."""
    lines = ["allocation:", "  extra:", "    - &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"    - &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n" + CLIENT_WORKER


def test_alias_bomb_is_refused_in_well_under_a_second(tmp_path: Path) -> None:
    # 9 levels of 9: 9**9 = 387 million values once expanded. Run in a child process with a
    # timeout, so that a regression fails this test instead of hanging the suite.
    job = tmp_path / "job.yaml"
    job.write_text(alias_bomb(9, 9), encoding="utf-8")
    code = (
        "import sys, time\n"
        "from acb_slurm.slurm.errors import SpecError\n"
        "from acb_slurm.slurm.spec import load_spec\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    load_spec(sys.argv[1])\n"
        "except SpecError as exc:\n"
        "    print(time.perf_counter() - start)\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(job)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    took, *message = done.stdout.splitlines()
    assert float(took) < 2.0, f"refusing the alias bomb took {took} s"
    text = "\n".join(message)
    assert f"{job}:7: allocation.extra[4][0]: YAML aliases (*name) expand to more than" in text, (
        text
    )
    assert "alias bomb" in text and "write the values out" in text, text


def test_alias_expansion_is_bounded_in_process() -> None:
    start = time.perf_counter()
    message = only_problem(alias_bomb(7, 10))
    assert time.perf_counter() - start < 2.0
    assert "YAML aliases (*name) expand to more than 10000 values" in message, message


def test_aliases_for_small_shared_values_still_work() -> None:
    spec = parse_spec(
        textwrap.dedent(
            """\
            workers:
              - command: &cmd [python, fold.py]
                mode: client
                env: &env {OMP_NUM_THREADS: 4, TAG: x}
              - command: *cmd
                mode: client
                name: other
                env: *env
            """
        )
    )
    assert spec.workers[1].command == ("python", "fold.py")
    assert dict(spec.workers[1].env) == {"OMP_NUM_THREADS": "4", "TAG": "x"}


def test_a_value_containing_itself_is_refused() -> None:
    message = only_problem(
        "workers:\n  - &w\n    command: [x]\n    mode: client\n    env: {A: *w}\n"
    )
    assert message.startswith("job.yaml:5: workers[0].env.A: the alias *w stands for a value"), (
        message
    )
    assert "contains itself" in message, message


def test_deep_nesting_is_refused_fast() -> None:
    start = time.perf_counter()
    message = only_problem("workers: " + "[" * 5000 + "]" * 5000 + "\n")
    assert time.perf_counter() - start < 2.0
    assert message.startswith("job.yaml:1: workers"), message
    assert "nested more than 32 levels deep" in message, message


def test_merge_keys_get_a_clear_message() -> None:
    message = only_problem(
        "workers:\n  - &w {command: [x], mode: client}\n  - <<: *w\n    name: b\n"
    )
    assert message.startswith("job.yaml:3: workers[1]: YAML merge keys (<<) are not supported"), (
        message
    )
    assert "write the fields out" in message, message


# ---- sizes, paths, names and extra options that stay allowed --------------------------------


@pytest.mark.parametrize(
    ("written", "size"),
    [
        (1048576, 1 << 20),
        ("1048576", 1 << 20),
        ("30B", 30),
        ("30 GiB", 30 << 30),
        ("1.5M", 1572864),
    ],
)
def test_sizes_with_a_unit_or_from_1_mib_stay_allowed(written: str | int, size: int) -> None:
    text = f"broker: {{virtual_gpus: 1, gpu_memory: {written!r}}}\nworkers: [{{command: [x]}}]\n"
    assert parse_spec(text).broker.gpu_memory == size
    assert not list(validator().iter_errors(yaml.safe_load(text)))


def test_size_without_a_unit_from_the_command_line_is_refused_too() -> None:
    with pytest.raises(SpecError) as info:
        check_value(Broker, "gpu_memory", "30", "--gpu-memory")
    message = str(info.value.problems[0])
    assert message.startswith("command line: --gpu-memory: '30' has no unit"), message


def test_parse_written_size_refuses_only_small_bare_numbers() -> None:
    assert parse_written_size("16GiB") == 16 << 30
    assert parse_written_size(0) == 0
    assert parse_written_size("2B") == 2
    assert parse_written_size(MIN_BARE_SIZE) == MIN_BARE_SIZE
    for bare in (30, "30", " 1.5 ", MIN_BARE_SIZE - 1):
        with pytest.raises(ValueError, match="missing unit"):
            parse_written_size(bare)


def test_names_and_paths_that_stay_allowed() -> None:
    spec = parse_spec(
        textwrap.dedent(
            """\
            allocation:
              name: fold v1.2_x
              output: "/scratch/%u/logs/%x-%j.out"
              error: "logs/100%%j/%j.err"
            broker:
              run_root: runs/../acb-runs
            workers:
              - command: [x]
                mode: client
                workdir: ./data dir
            """
        )
    )
    assert spec.allocation.name == "fold v1.2_x"
    assert spec.allocation.output == "/scratch/%u/logs/%x-%j.out"
    assert spec.allocation.error == "logs/100%%j/%j.err"


def test_home_is_expanded_in_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = parse_spec(
        textwrap.dedent(
            """\
            allocation: {output: ~/logs/%j.out, error: ~/logs/%j.err}
            broker: {run_root: ~/acb-runs}
            workers:
              - command: [x]
                mode: client
                workdir: ~/data
            """
        )
    )
    assert spec.allocation.output == f"{tmp_path}/logs/%j.out"
    assert spec.allocation.error == f"{tmp_path}/logs/%j.err"
    assert spec.broker.run_root == f"{tmp_path}/acb-runs"
    assert spec.workers[0].workdir == f"{tmp_path}/data"


@pytest.mark.parametrize(
    "flag",
    ["--qos=high", "--wait-all-nodes=1", "--nodelist=n1", "--array=1-3", "--exclusive", "-w n1",
     "--time-min=10", "--gres-flags=enforce-binding", "--mem-per-cpu=2G", "--ntasks-per-core=1"],
)  # fmt: skip
def test_extra_options_acb_sbatch_does_not_manage_stay_allowed(flag: str) -> None:
    text = f"allocation: {{extra: [{flag!r}]}}\nworkers: [{{command: [x], mode: client}}]\n"
    assert parse_spec(text).allocation.extra == (flag,)
    assert not list(validator().iter_errors(yaml.safe_load(text)))


def test_schema_command_still_prints_the_schema() -> None:
    from typer.testing import CliRunner

    from acb_slurm.slurm.cli import app

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    jsonschema.Draft202012Validator.check_schema(json.loads(result.output))
