"""The job.yaml spec: pydantic models that validate it, line by line, and write its JSON Schema.

Each section is a `SpecModel` (acb_slurm.specfile: strict types, unknown keys refused, frozen)
whose fields carry their rule (an Annotated type below or in acb_slurm.specfile.fields) and a
one-line description. `parse_spec` reads the YAML with the line of every value, validates it and
reports every problem at once, each naming the file, the line and the dotted field; `json_schema`
is generated from the same models, so validation and schema cannot drift apart. Checks that span
several fields (a worker asking for more GPUs than a node has, ...) live in `_cross_checks`.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue

from acb_slurm import defaults
from acb_slurm.slurm.errors import Problem, SpecError
from acb_slurm.specfile import model as specmodel
from acb_slurm.specfile.fields import (
    NOT_BLANK,
    Text,
    byte_size,
    env_map,
    name_matching,
    non_empty,
    reserved_env_name,
    whole_number,
)
from acb_slurm.specfile.model import SpecModel, describe, unknown_choice
from acb_slurm.specfile.problems import InvalidSpec, sorted_problems
from acb_slurm.specfile.yamlfile import Loc, dotted, read_yaml
from acb_slurm.units import parse_size

__all__ = [
    "MAX_WORKERS_PER_GPU",
    "MAX_WORKERS_PER_NODE",
    "WORKER_MODES",
    "Allocation",
    "Broker",
    "JobSpec",
    "Torchrun",
    "WorkerGroup",
    "check_value",
    "command_argv",
    "json_schema",
    "known_policies",
    "load_spec",
    "managed_flag_problem",
    "parse_slurm_time",
    "parse_spec",
    "reserved_env_name",
    "sbatch_flag_name",
]

WorkerMode = Literal["gate", "auto", "client"]
WORKER_MODES: tuple[str, ...] = typing.get_args(WorkerMode)

#: Workers sharing one GPU: beyond this the turns are so short that waiting dominates.
MAX_WORKERS_PER_GPU = 64
#: Workers on one node, all groups together: each is a thread and a session of the node's
#: launcher (acb-launch) and a process of its own.
MAX_WORKERS_PER_NODE = 512

_STRICT = ConfigDict(strict=True)


def known_policies() -> list[str]:
    """Policy names the assigner accepts: the scheduler registry's, then their variants
    (`gpu-sharing:pack`)."""
    from acb_slurm.scheduler.policies import available_policies, policy_variants

    return [*available_policies(), *policy_variants()]


# ---------------------------------------------------------------------------------------------
# Text that goes on an #SBATCH line or into a path

# Values that end up on an #SBATCH line: sbatch reads them with its own (double-quote) rules,
# which cannot carry a double quote, a backslash or a line break.
_SBATCH_SAFE = re.compile(r'^[^"\\\x00-\x1f\x7f]+$')
_SBATCH_SAFE_JSON = '^[^"\\\\\\u0000-\\u001f\\u007f]+$'
# Control characters (line breaks, tabs, ...): valid in a file name, but no one means them there,
# and the shell lines and logs that print a path break on them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NO_CONTROL_JSON = "^[^\\u0000-\\u001f\\u007f]*$"
# Slurm's filename patterns that differ between jobs, steps, tasks or nodes (%j, %3a, ...; %%
# is a literal %): in a directory of an --output path they name a directory that cannot exist
# yet, and Slurm does not create directories. (%u and %x are fixed at submission: such a
# directory can be made beforehand.)
_PER_JOB_DIR = re.compile(r"^(?:[^%]|%%)*?(%[0-9]*[AabJjNnst])[^/]*/")
_JOB_NAME_IN_FILES = (
    "the job name is %x in allocation.output (default acb-%x-%j.out) and so part of a file name"
)


def _sbatch_line(value: str) -> str:
    if not _SBATCH_SAFE.match(value):
        raise ValueError(
            f"{value!r} cannot go on an #SBATCH line: no double quotes, backslashes or line breaks"
        )
    return value


def _file_name(value: str) -> str:
    if "/" in value:
        raise ValueError(
            f"{value!r} contains '/': {_JOB_NAME_IN_FILES}, where '/' would start a directory "
            "that does not exist, and the job would fail without any output; use '-' or '_' "
            "instead"
        )
    if value.strip() in (".", ".."):
        raise ValueError(
            f"{value!r} cannot be a job name: {_JOB_NAME_IN_FILES}, where {value.strip()!r} "
            "names a directory, not a file; choose another name"
        )
    return value


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(
            f"{value!r} contains a control character (a line break, tab, ...) that would break "
            "the path it becomes; remove it"
        )
    return value


def _slurm_pattern(value: str) -> str:
    per_job = _PER_JOB_DIR.match(value)
    if per_job:
        raise ValueError(
            f"{value!r} puts {per_job.group(1)} in a directory name: Slurm does not create "
            "directories and acb-sbatch can only create the fixed part before it, so the job "
            "would fail without any output; keep such %-patterns in the file name "
            "(e.g. logs/%x-%j.out)"
        )
    return value


def _expand_home(value: str) -> str:
    """A leading ~ expanded: sbatch, srun and quoted shell words do not do it."""
    return os.path.expanduser(value) if value.startswith("~") else value


def _all_of(*patterns: dict[str, Any]) -> WithJsonSchema:
    return WithJsonSchema(
        {"type": "string", "minLength": 1, "allOf": [{"pattern": r"\S"}, *patterns]}
    )


_SBATCH_JSON = {"pattern": _SBATCH_SAFE_JSON}
_PER_JOB_JSON = {"not": {"pattern": _PER_JOB_DIR.pattern}}

SbatchText: TypeAlias = Annotated[
    str, NOT_BLANK, AfterValidator(_sbatch_line), _all_of(_SBATCH_JSON)
]
JobName: TypeAlias = Annotated[
    str,
    NOT_BLANK,
    AfterValidator(_sbatch_line),
    AfterValidator(_file_name),
    _all_of(_SBATCH_JSON, {"pattern": "^[^/]*$"}, {"not": {"pattern": r"^\s*\.\.?\s*$"}}),
]
#: --output/--error: #SBATCH-safe, per-job %-patterns only in the file name; ~ expanded.
LogPath: TypeAlias = Annotated[
    str,
    NOT_BLANK,
    AfterValidator(_sbatch_line),
    AfterValidator(_slurm_pattern),
    AfterValidator(_expand_home),
    _all_of(_SBATCH_JSON, _PER_JOB_JSON),
]
#: A directory: no control characters; ~ expanded.
DirPath: TypeAlias = Annotated[
    str,
    NOT_BLANK,
    AfterValidator(_no_control),
    AfterValidator(_expand_home),
    _all_of({"pattern": _NO_CONTROL_JSON}),
]


def _existing_file(value: str, info: ValidationInfo) -> str:
    """A path to an existing file, relative to the job.yaml's directory; kept absolute."""
    path = Path(os.path.expanduser(value))
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    resolved = path if path.is_absolute() else base / path
    if not resolved.is_file():
        raise ValueError(f"{value!r} does not exist (looked for {resolved})")
    return str(resolved.resolve())


ExistingFile: TypeAlias = Annotated[
    str,
    NOT_BLANK,
    AfterValidator(_existing_file),
    WithJsonSchema({"type": "string", "minLength": 1}),
]


# ---------------------------------------------------------------------------------------------
# Slurm's own formats: time limits and --mem

# Slurm's time formats (parse_time.c time_str2secs): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM,
# D-HH:MM:SS, and INFINITE/UNLIMITED.
_TIME_FORMS = (
    (re.compile(r"^(\d+)$"), ("minutes",)),
    (re.compile(r"^(\d+):(\d+)$"), ("minutes", "seconds")),
    (re.compile(r"^(\d+):(\d+):(\d+)$"), ("hours", "minutes", "seconds")),
    (re.compile(r"^(\d+)-(\d+)$"), ("days", "hours")),
    (re.compile(r"^(\d+)-(\d+):(\d+)$"), ("days", "hours", "minutes")),
    (re.compile(r"^(\d+)-(\d+):(\d+):(\d+)$"), ("days", "hours", "minutes", "seconds")),
)
_UNLIMITED = ("unlimited", "infinite")
_SECONDS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}


def parse_slurm_time(text: str | int) -> int | None:
    """Seconds of a Slurm time limit, None for UNLIMITED; ValueError naming the forms otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise ValueError(f"not a Slurm time: {text!r}")
    stripped = text.strip()
    if stripped.lower() in _UNLIMITED:
        return None
    for pattern, units in _TIME_FORMS:
        match = pattern.match(stripped)
        if match:
            return sum(int(g) * _SECONDS[u] for g, u in zip(match.groups(), units, strict=True))
    raise ValueError(
        f"{text!r} is not a time Slurm understands; write MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
        "D-HH:MM:SS or UNLIMITED (e.g. 90, 1:30:00, 2-12)"
    )


def _slurm_time(value: Any) -> str:
    """A time limit in one of Slurm's formats; kept as written, zero refused."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(
            f"expected a Slurm time (MM, HH:MM:SS, D-HH:MM:SS or UNLIMITED), got {describe(value)}"
        )
    if parse_slurm_time(value) == 0:
        raise ValueError(f"{value!r} is a time limit of zero; a job needs at least a minute")
    return str(value).strip()


_TIME_JSON = "|".join(p.pattern[1:-1] for p, _ in _TIME_FORMS)
SlurmTime: TypeAlias = Annotated[
    str,
    PlainValidator(_slurm_time),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {
                    "type": "string",
                    "pattern": f"^(?:{_TIME_JSON}|[Uu][Nn][Ll][Ii][Mm][Ii][Tt][Ee][Dd]|"
                    "[Ii][Nn][Ff][Ii][Nn][Ii][Tt][Ee])$",
                },
            ]
        }
    ),
]

_SLURM_MEM = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)


def _slurm_mem(value: Any) -> str:
    """Slurm's --mem: a number of megabytes, or with a K/M/G/T suffix."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a Slurm memory size (16G, 4000, 512M), got {describe(value)}")
    match = _SLURM_MEM.match(str(value).strip())
    if not match:
        raise ValueError(
            f"{value!r} is not a Slurm memory size; write megabytes (4000) or a number with K, "
            "M, G or T (16G)"
        )
    if int(match.group(1)) == 0:
        raise ValueError(
            "0 asks Slurm for all of a node's memory; write that explicitly with "
            "extra: ['--mem=0'] if you mean it"
        )
    return str(value).strip().upper()


SlurmMem: TypeAlias = Annotated[
    str,
    PlainValidator(_slurm_mem),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {"type": "string", "pattern": "^[0-9]*[1-9][0-9]*[KMGTkmgt]?$"},
            ]
        }
    ),
]


# ---------------------------------------------------------------------------------------------
# sbatch options in allocation.extra

# sbatch options that a job.yaml field already sets (the batch script's #SBATCH lines, or the
# GPUs and CPUs they imply): `extra` may not repeat or contradict them.
_MANAGED_FLAGS = {
    "-J": "allocation.name", "--job-name": "allocation.name",
    "-p": "allocation.partition", "--partition": "allocation.partition",
    "-A": "allocation.account", "--account": "allocation.account",
    "-N": "allocation.nodes", "--nodes": "allocation.nodes",
    "--ntasks-per-node": "allocation.ntasks_per_node",
    "-n": "allocation.ntasks_per_node", "--ntasks": "allocation.ntasks_per_node",
    "-c": "allocation.cpus_per_task", "--cpus-per-task": "allocation.cpus_per_task",
    "--cpus-per-gpu": "allocation.cpus_per_task",
    "--gres": "allocation.gpus_per_node", "--gpus-per-node": "allocation.gpus_per_node",
    "-G": "allocation.gpus_per_node", "--gpus": "allocation.gpus_per_node",
    "--gpus-per-task": "allocation.gpus_per_node",
    "--gpus-per-socket": "allocation.gpus_per_node",
    "--mem": "allocation.mem", "-t": "allocation.time", "--time": "allocation.time",
    "-o": "allocation.output", "--output": "allocation.output",
    "-e": "allocation.error", "--error": "allocation.error",
}  # fmt: skip

# sbatch options that acb-sbatch itself owns (it writes the script, runs sbatch, reads its answer
# and prepares the directories the job writes to): why each is refused, and what to do instead.
_ACB_SBATCH_FLAGS = {
    "--wrap": "it writes the batch script itself; put the command in workers[].command",
    "-D": "the job starts in the directory acb-sbatch runs in, which is where acb-sbatch creates "
    "the output and error directories and says the output is; run acb-sbatch from the "
    "directory the job should start in, or set workers[].workdir for where the workers run",
    "--parsable": "acb-sbatch submit already passes it to read the job id; remove it",
    "--test-only": "acb-sbatch submit would find no job id in sbatch's answer; use "
    "acb-sbatch submit --test-only",
    "-W": "it would make sbatch, and so acb-sbatch submit, wait until the job ends; remove it "
    "and follow the job with acb-sbatch status <job id>",
}
_ACB_SBATCH_FLAGS["--chdir"] = _ACB_SBATCH_FLAGS["-D"]
_ACB_SBATCH_FLAGS["--wait"] = _ACB_SBATCH_FLAGS["-W"]

# Memory options that Slurm takes only one of: --mem, --mem-per-cpu, --mem-per-gpu.
_MEM_FLAGS = ("--mem-per-cpu", "--mem-per-gpu")

# Long options `extra` may not give, for abbreviations (sbatch, like getopt_long, reads --part
# as --partition). Each exact name that is also a prefix of another (--ntasks, --gpus, --mem,
# --wait) is refused itself; no option of sbatch's is a prefix of these and allowed.
_REFUSED_LONG = sorted(f for f in (*_MANAGED_FLAGS, *_ACB_SBATCH_FLAGS) if f.startswith("--"))


def sbatch_flag_name(flag: str) -> str:
    """The option name of one `extra` entry: --nodes=3, --nodes 3 -> --nodes; -N2, -N 2 -> -N."""
    if flag.startswith("--"):
        return re.split(r"[=\s]", flag, maxsplit=1)[0]
    return flag[:2]


def _abbreviated(name: str, options: Sequence[str]) -> list[str]:
    """The long options that `name` (--part) is an abbreviation of, itself excluded."""
    if not name.startswith("--") or len(name) < 3 or name in options:
        return []
    return [o for o in options if o.startswith(name)]


def managed_flag_problem(flag: str) -> str | None:
    """Why an `extra` entry may not be given (it is an option that a job.yaml field or acb-sbatch
    manages, in full or abbreviated), or None when it may."""
    name = sbatch_flag_name(flag)
    if name in _MANAGED_FLAGS:
        field = _MANAGED_FLAGS[name]
        return f"{flag!r} is managed by job.yaml field {field}; set {field} instead"
    if name in _ACB_SBATCH_FLAGS:
        return f"{flag!r} is managed by acb-sbatch: {_ACB_SBATCH_FLAGS[name]}"
    full = _abbreviated(name, _REFUSED_LONG)
    if not full:
        return None
    fields = list(dict.fromkeys(_MANAGED_FLAGS[f] for f in full if f in _MANAGED_FLAGS))
    reasons = [_ACB_SBATCH_FLAGS[f] for f in full if f in _ACB_SBATCH_FLAGS]
    instead = [f"set {' or '.join(fields)} instead"] if fields else []
    return (
        f"{flag!r} abbreviates {' or '.join(full)} (sbatch reads unambiguous abbreviations), "
        f"which {'are' if len(full) > 1 else 'is'} managed by "
        f"{' and '.join(w for w, by in (('job.yaml', fields), ('acb-sbatch', reasons)) if by)}: "
        + "; ".join([*instead, *reasons])
        + "; write the option out in full if you meant another"
    )


def _sbatch_flag(flag: str) -> str:
    """One sbatch option (-x, --x=v) that no job.yaml field and not acb-sbatch manages."""
    if not flag:
        raise ValueError("must not be empty")
    if not flag.startswith("-"):
        raise ValueError(f"{flag!r} is not an sbatch option (-x, --x=v)")
    _sbatch_line(flag)
    managed = managed_flag_problem(flag)
    if managed:
        raise ValueError(managed)
    return flag


def _prefixes_regex(word: str) -> str:
    """A regex matching every non-empty prefix of `word`: abc -> a(?:b(?:c)?)?."""
    out = ""
    for ch in reversed(word):
        out = f"{re.escape(ch)}(?:{out})?" if out else re.escape(ch)
    return out


def _managed_flags_json_pattern() -> str:
    """The JSON Schema pattern of `extra` entries that managed_flag_problem refuses."""
    shorts = "".join(sorted(f[1] for f in (*_MANAGED_FLAGS, *_ACB_SBATCH_FLAGS) if len(f) == 2))
    longs = "|".join(_prefixes_regex(f[2:]) for f in _REFUSED_LONG)
    return rf"^(?:-[{shorts}]|--(?:{longs})(?:[=\s]|$))"


SbatchFlag: TypeAlias = Annotated[
    str,
    AfterValidator(_sbatch_flag),
    WithJsonSchema(
        {
            "type": "string",
            "allOf": [
                {"pattern": "^-"},
                _SBATCH_JSON,
                {"not": {"pattern": _managed_flags_json_pattern()}},
            ],
        }
    ),
]


# ---------------------------------------------------------------------------------------------
# Worker commands and policies


def _argument(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # numbers in an argv list are meant as text
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


_ARGV: TypeAdapter[tuple[str, ...]] = TypeAdapter(
    tuple[Annotated[str, BeforeValidator(_argument)], ...], config=_STRICT
)
_COMMAND_EXPECTED = "expected a list of arguments or a command line string"


def _command(value: Any) -> str | tuple[str, ...]:
    """A command: a list of argv (run as is) or a string (a bash command line)."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{_COMMAND_EXPECTED}, got {describe(value)}")
        if "\x00" in value:
            raise ValueError("must not contain a NUL character")
        return value
    if not isinstance(value, tuple | list) or not value:
        raise ValueError(f"{_COMMAND_EXPECTED}, got {describe(value)}")
    argv = _ARGV.validate_python(tuple(value))  # errors name the argument: command[1]
    if not argv[0]:
        raise ValueError("the program (the first argument) must not be empty")
    return argv


Command: TypeAlias = Annotated[
    str | tuple[str, ...],
    PlainValidator(_command),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, "pattern": r"\S"},
                {
                    "type": "array",
                    "minItems": 1,
                    "prefixItems": [{"type": "string", "minLength": 1}],
                    "items": {"type": ["string", "number"]},
                },
            ]
        }
    ),
]


def command_argv(command: str | Sequence[str]) -> list[str]:
    """The argv a worker command runs as: a list as is, a string through `bash -c`."""
    if isinstance(command, str):
        return ["bash", "-c", command]
    return list(command)


def _policy(value: str) -> str:
    known = known_policies()
    if value not in known:
        raise ValueError(unknown_choice("policy", value, known))
    return value


class _PolicyNames:
    """JSON Schema of a policy: the names registered when the schema is written."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> JsonSchemaValue:
        return {"type": "string", "enum": known_policies()}


PolicyName: TypeAlias = Annotated[str, AfterValidator(_policy), _PolicyNames()]


# ---------------------------------------------------------------------------------------------
# The sections

Positive: TypeAlias = Annotated[int, whole_number(1)]
NonNegative: TypeAlias = Annotated[int, whole_number(0)]
GpuType: TypeAlias = Annotated[
    str, name_matching(r"[A-Za-z0-9][A-Za-z0-9._-]*", "letters, digits, '.', '_', '-'")
]
ByteSize: TypeAlias = Annotated[int, byte_size()]
StartupTimeout: TypeAlias = Annotated[int, whole_number(1, 3600)]
TimeSlice: TypeAlias = Annotated[int, whole_number(0, 86400)]
WorkersPerNode: TypeAlias = Annotated[int, whole_number(1, MAX_WORKERS_PER_NODE)]
WorkersPerGpu: TypeAlias = Annotated[int, whole_number(1, MAX_WORKERS_PER_GPU)]
WorkerEnv: TypeAlias = Annotated[dict[str, str], env_map(bash=True, booleans=False)]


class Allocation(SpecModel):
    """What to ask Slurm for: one line of `#SBATCH` per field that is set."""

    name: JobName = Field(
        "acb-job",
        description="job name (--job-name); no '/': it is part of the output file's name (%x)",
    )
    partition: SbatchText | None = Field(None, description="partition (--partition)")
    account: SbatchText | None = Field(None, description="account to charge (--account)")
    nodes: Positive = Field(1, description="number of nodes (--nodes); one assigner runs on each")
    ntasks_per_node: Positive = Field(1, description="tasks per node (--ntasks-per-node)")
    cpus_per_task: Positive = Field(1, description="CPUs per task (--cpus-per-task)")
    gpus_per_node: NonNegative = Field(0, description="GPUs per node (--gres=gpu:N); 0 for none")
    gpu_type: GpuType | None = Field(
        None, description="GPU type for sites with typed GRES (--gres=gpu:TYPE:N), e.g. a100"
    )
    mem: SlurmMem | None = Field(None, description="memory per node (--mem), e.g. 64G")
    time: SlurmTime | None = Field(None, description="time limit (--time), e.g. 1-00:00:00")
    output: LogPath | None = Field(
        "acb-%x-%j.out",
        description="stdout file (--output); %j is the job id, %x the job name (not in "
        "directory names)",
    )
    error: LogPath | None = Field(None, description="stderr file (--error); default: output")
    extra: tuple[SbatchFlag, ...] = Field(
        (), description="more sbatch options, one per entry, e.g. --qos=high"
    )


class Broker(SpecModel):
    """The per-node assigner: which policy, which GPUs, how long to wait for it."""

    policy: PolicyName = Field(defaults.POLICY, description="scheduling policy")
    gpus: Positive | None = Field(
        None,
        description="GPUs of each node the assigner may hand out; default all of gpus_per_node",
    )
    worker_memory: ByteSize | None = Field(
        None, description="estimated GPU memory of one worker (acb-run --memory), e.g. 10GiB"
    )
    virtual_gpus: Positive | None = Field(
        None, description="pretend each node has this many GPUs (machines without GPUs, tests)"
    )
    gpu_memory: ByteSize | None = Field(
        None,
        description="memory of each virtual GPU, e.g. 80GiB (with virtual_gpus); default "
        f"{defaults.VIRTUAL_GPU_MEMORY}",
    )
    startup_timeout: StartupTimeout = Field(
        defaults.STARTUP_TIMEOUT_S,
        description="seconds to wait for every node's assigner to be ready",
    )
    time_slice: TimeSlice = Field(
        0,
        description="seconds a holder keeps a GPU while others wait before it is asked to yield "
        "(acb-assigner --time-slice; auto-mode workers yield, gated ones finish); 0 = never",
    )
    run_root: DirPath | None = Field(
        None,
        description="directory under which the job's run dir <run_root>/<job id> is made; "
        f"relative to the submit dir; default {defaults.RUN_ROOT}",
    )


class Torchrun(SpecModel):
    """A distributed PyTorch run: one `torchrun` per node over `nodes` nodes, as one gang."""

    nodes: Positive = Field(
        description="nodes the run spans (at most allocation.nodes); their GPUs are granted "
        "all at once by the job's controller assigner"
    )
    nproc_per_node: Positive = Field(description="processes torchrun starts on each node")
    gpus_per_proc: Positive = Field(1, description="GPUs of each process")
    repeat: Positive = Field(1, description="runs of the command, one after the other")


#: Fields of a worker group that a torchrun group does not take (the JSON Schema of WorkerGroup
#: lists them too).
_NOT_WITH_TORCHRUN = ("per_node", "per_gpu", "mode", "gpus")


class WorkerGroup(SpecModel):
    """Workers started by the batch script (the per-node launcher `acb-launch` starts each
    node's), or one torchrun gang over several nodes (`torchrun`)."""

    model_config = ConfigDict(
        # per_node and per_gpu exclude each other, torchrun excludes both, mode and gpus
        # (checked in _cross_checks).
        json_schema_extra={
            "allOf": [
                {
                    "not": {
                        "required": ["per_node", "per_gpu"],
                        "properties": {
                            "per_node": {"type": "integer"},
                            "per_gpu": {"type": "integer"},
                        },
                    }
                },
                {"not": {"required": ["torchrun", "per_node"]}},
                {"not": {"required": ["torchrun", "per_gpu"]}},
                {"not": {"required": ["torchrun", "mode"]}},
                {"not": {"required": ["torchrun", "gpus"]}},
            ]
        }
    )

    command: Command = Field(description="argv list (run as is) or a string (run by bash -c)")
    name: Text = Field("worker", description="name prefix; each worker is <name>-<node>-<i>")
    per_node: WorkersPerNode | None = Field(None, description="workers on each node (default 1)")
    per_gpu: WorkersPerGpu | None = Field(None, description="workers per GPU of each node")
    mode: WorkerMode = Field(
        "gate",
        description="gate: acb-run --gate; auto: acb-run --auto (PyTorch); client: the command "
        "talks to the assigner itself",
    )
    gpus: Positive = Field(1, description="GPUs each worker holds at once (acb-run --gpus)")
    env: WorkerEnv = Field(default_factory=dict, description="environment variables")
    workdir: DirPath | None = Field(None, description="working directory (default: the submit dir)")
    torchrun: Torchrun | None = Field(
        None,
        description="run the command under torchrun on `nodes` nodes as one gang, instead of "
        "per-node workers (no per_node, per_gpu, mode or gpus then)",
    )


Workers: TypeAlias = Annotated[tuple[WorkerGroup, ...], non_empty()]


class JobSpec(SpecModel):
    """A whole job.yaml."""

    workers: Workers = Field(description="worker groups")
    allocation: Allocation = Field(default_factory=Allocation, description="the Slurm allocation")
    broker: Broker = Field(default_factory=Broker, description="the per-node GPU assigner")
    campaign: ExistingFile | None = Field(
        None,
        description="campaign file read by acb-campaign workers (exported as ACB_CAMPAIGN)",
    )
    _source: str = PrivateAttr("<memory>")

    def model_post_init(self, context: Any) -> None:
        if isinstance(context, Mapping) and "source" in context:
            self._source = str(context["source"])

    # -- derived values used by rendering --------------------------------------------------

    @property
    def source(self) -> str:
        """The file the spec was read from."""
        return self._source

    @property
    def gpus_per_node(self) -> int:
        """GPUs each node's assigner hands out."""
        if self.broker.virtual_gpus:
            return self.broker.virtual_gpus
        return self.broker.gpus or self.allocation.gpus_per_node

    def workers_per_node(self, group: WorkerGroup) -> int:
        """Workers of a group on each node (0 for a torchrun group: it is no per-node worker)."""
        if group.torchrun is not None:
            return 0
        if group.per_gpu is not None:
            return group.per_gpu * self.gpus_per_node
        return group.per_node or 1


# ---------------------------------------------------------------------------------------------
# Checks that span fields


def _cross_checks(spec: JobSpec) -> Iterator[tuple[Loc, str]]:
    """Checks that span fields: (where, message); each message names both fields and values."""
    alloc, broker = spec.allocation, spec.broker
    if broker.gpus is not None and broker.virtual_gpus is None:
        if alloc.gpus_per_node == 0:
            yield (
                ("broker", "gpus"),
                f"broker.gpus={broker.gpus} but allocation.gpus_per_node=0: ask Slurm for GPUs "
                "or use broker.virtual_gpus",
            )
        elif broker.gpus > alloc.gpus_per_node:
            yield (
                ("broker", "gpus"),
                f"broker.gpus={broker.gpus} is more than allocation.gpus_per_node="
                f"{alloc.gpus_per_node}: the assigner can only hand out GPUs Slurm gave the job",
            )
    if broker.gpus is not None and broker.virtual_gpus is not None:
        yield (
            ("broker", "gpus"),
            f"broker.gpus={broker.gpus} and broker.virtual_gpus={broker.virtual_gpus} contradict "
            "each other: virtual GPUs replace real ones; keep one",
        )
    if broker.gpu_memory is not None and broker.virtual_gpus is None:
        yield (
            ("broker", "gpu_memory"),
            "broker.gpu_memory is only used with broker.virtual_gpus (real GPUs report their own "
            "memory); set broker.virtual_gpus or remove it",
        )
    gpu_memory = broker.gpu_memory or parse_size(defaults.VIRTUAL_GPU_MEMORY)
    if broker.virtual_gpus and broker.worker_memory and broker.worker_memory > gpu_memory:
        yield (
            ("broker", "worker_memory"),
            f"broker.worker_memory={broker.worker_memory} bytes is more than broker.gpu_memory="
            f"{gpu_memory} bytes: no worker could ever be granted a GPU",
        )
    gpus = spec.gpus_per_node
    for i, group in enumerate(spec.workers):
        where = f"workers[{i}]"
        if group.torchrun is not None:
            yield from _torchrun_checks(spec, i, group, group.torchrun)
            continue
        if group.per_node is not None and group.per_gpu is not None:
            yield (
                ("workers", i, "per_gpu"),
                f"give {where}.per_node or {where}.per_gpu, not both "
                f"(per_node={group.per_node}, per_gpu={group.per_gpu})",
            )
        if group.mode in ("gate", "auto") and gpus == 0:
            yield (
                ("workers", i, "mode"),
                f"{where}.mode={group.mode} needs GPUs but allocation.gpus_per_node=0 and "
                "broker.virtual_gpus is not set",
            )
        if group.per_gpu is not None and gpus == 0:
            yield (
                ("workers", i, "per_gpu"),
                f"{where}.per_gpu={group.per_gpu} but the job has no GPUs "
                "(allocation.gpus_per_node=0, no broker.virtual_gpus)",
            )
        if gpus and group.gpus > gpus:
            yield (
                ("workers", i, "gpus"),
                f"{where}.gpus={group.gpus} is more than the {gpus} GPU(s) a node's assigner "
                "has (allocation.gpus_per_node / broker.virtual_gpus / broker.gpus)",
            )
        if group.mode != "gate" and group.gpus != 1:
            yield (
                ("workers", i, "gpus"),
                f"{where}.gpus={group.gpus} only applies to mode=gate, not mode={group.mode}",
            )
    for i, flag in enumerate(alloc.extra):
        name = sbatch_flag_name(flag)
        if (name in _MEM_FLAGS or _abbreviated(name, _MEM_FLAGS)) and alloc.mem is not None:
            yield (
                ("allocation", "extra", i),
                f"allocation.extra[{i}]={flag!r} and allocation.mem={alloc.mem} contradict each "
                "other: Slurm takes only one of --mem, --mem-per-cpu and --mem-per-gpu; keep one",
            )
    if alloc.gpu_type is not None and alloc.gpus_per_node == 0:
        yield (
            ("allocation", "gpu_type"),
            f"allocation.gpu_type={alloc.gpu_type} but allocation.gpus_per_node=0: a GPU type "
            "needs GPUs; set allocation.gpus_per_node",
        )
    total = sum(spec.workers_per_node(g) for g in spec.workers)
    if total > MAX_WORKERS_PER_NODE:
        counts = ", ".join(
            f"workers[{i}].{'per_gpu' if g.per_gpu is not None else 'per_node'}="
            f"{g.per_gpu if g.per_gpu is not None else (g.per_node or 1)}"
            for i, g in enumerate(spec.workers)
            if g.torchrun is None
        )
        yield (
            ("workers",),
            f"{total} workers per node ({counts}, with {gpus} GPU(s) per node) is more than "
            f"{MAX_WORKERS_PER_NODE}: each is a process (and a session with the assigner) "
            "of the node's launcher; use fewer or an acb-campaign",
        )


def _torchrun_checks(
    spec: JobSpec, i: int, group: WorkerGroup, run: Torchrun
) -> Iterator[tuple[Loc, str]]:
    """A torchrun group: it fits the allocation, and takes no per-node worker fields."""
    where = f"workers[{i}]"
    for name in _NOT_WITH_TORCHRUN:
        if name in group.model_fields_set:
            yield (
                ("workers", i, name),
                f"{where}.{name}={getattr(group, name)} makes no sense with {where}.torchrun "
                "(one gang of torchrun.nodes nodes x torchrun.nproc_per_node processes, each "
                "holding torchrun.gpus_per_proc GPUs for the whole run); remove it",
            )
    nodes = spec.allocation.nodes
    if run.nodes > nodes:
        yield (
            ("workers", i, "torchrun", "nodes"),
            f"{where}.torchrun.nodes={run.nodes} is more than allocation.nodes={nodes}",
        )
    gpus = spec.gpus_per_node
    need = run.nproc_per_node * run.gpus_per_proc
    if need > gpus:
        yield (
            ("workers", i, "torchrun", "nproc_per_node"),
            f"{where}.torchrun.nproc_per_node={run.nproc_per_node} x "
            f"torchrun.gpus_per_proc={run.gpus_per_proc} = {need} GPU(s) per node is more than "
            f"the {gpus} GPU(s) a node's assigner has (allocation.gpus_per_node / "
            "broker.virtual_gpus / broker.gpus)",
        )


# ---------------------------------------------------------------------------------------------
# Reading a job.yaml


def load_spec(path: str | os.PathLike[str]) -> JobSpec:
    """Read and validate a job.yaml; SpecError lists every problem with file:line and field."""
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([Problem(file, 0, "", f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise SpecError([Problem(file, 0, "", f"not UTF-8 text: {exc}")]) from None
    return parse_spec(text, file, base_dir=Path(file).resolve().parent)


def parse_spec(text: str, file: str = "<job.yaml>", base_dir: Path | None = None) -> JobSpec:
    """Validate job.yaml text; `file` names it in messages, `base_dir` anchors relative paths."""
    try:
        document = read_yaml(
            text,
            file,
            what="job.yaml",
            depth_hint="a job.yaml needs at most 5 (workers[0].env.NAME)",
        )
    except InvalidSpec as exc:
        raise SpecError(exc.problems) from None
    if document is None:
        raise SpecError([Problem(file, 1, "", "is empty; it needs at least `workers:`")])
    context = {"base_dir": base_dir or Path.cwd(), "source": file}
    spec, problems = specmodel.validate(JobSpec, document, context=context)
    if spec is not None:
        problems = sorted_problems(
            Problem(file, document.line(loc, key=True), dotted(loc), message)
            for loc, message in _cross_checks(spec)
        )
    if spec is None or problems:
        raise SpecError(problems)
    return spec


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of job.yaml, from the models validation uses."""
    return specmodel.json_schema(
        JobSpec, schema_id="https://acb-slurm.invalid/schema/job.json", title="acb-slurm job.yaml"
    )


def check_value(
    cls: type[SpecModel], name: str, value: Any, label: str, base_dir: Path | None = None
) -> Any:
    """Validate one value as field `name` of section `cls` (command-line options use the same
    rules as job.yaml); SpecError names `label` (e.g. the option) when it is wrong."""
    result, problems = specmodel.check_field(cls, name, value, label, base_dir=base_dir)
    if problems:
        raise SpecError(problems)
    return result
