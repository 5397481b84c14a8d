"""The campaign file (YAML): items, stages, retries, results directory.

Validated once, here, into frozen pydantic models (acb_slurm.specfile, the same machinery as
job.yaml): every problem is reported at once, each naming the file, the line and the field; an
unknown key gets a close match and the valid keys with what they mean; `json_schema` (printed by
`acb-campaign schema`) is generated from the same models. Each default is written once, on its
field.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeAlias

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainValidator,
    PrivateAttr,
    Strict,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.config import JsonDict

from acb_slurm.campaign.errors import SpecError
from acb_slurm.specfile import model as specmodel
from acb_slurm.specfile.fields import (
    Rules,
    Text,
    byte_size,
    env_map,
    name_matching,
    non_empty,
    whole_number,
)
from acb_slurm.specfile.model import SpecModel, describe
from acb_slurm.specfile.problems import InvalidSpec, Problem, sorted_problems
from acb_slurm.specfile.yamlfile import Document, Loc, dotted, read_yaml

#: Placeholders a command or env value may use, with what they become.
PLACEHOLDERS: Mapping[str, str] = {
    "item": "the item id (sanitised FASTA header)",
    "fasta": "path of a FASTA file holding only this item's sequence",
    "sequence": "the item's sequence",
    "length": "the item's sequence length",
    "outdir": "the item's output directory (created before the first stage)",
    "results": "the campaign's results directory",
    "campaign_dir": "the directory of the campaign file",
    "python": "the Python interpreter running the worker",
    "attempt": "the attempt number of this item (1, 2, ...)",
    "stage": "the stage name",
    "items_dir": "a directory with one symlink per item of the process, named after the item, "
    "to its item_link (a batch stage's items; made for the process, removed after it)",
}
#: The placeholders that name one item. In the command of a process for several items (a
#: batch), an argument that uses one is repeated once per item, each copy one argument.
PER_ITEM = frozenset({"item", "fasta", "sequence", "length", "outdir", "attempt"})
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
# 1:30 (90 s), 1:30:00 (5400 s): what YAML 1.1 reads as base-60 numbers, kept as text by the
# reader (acb_slurm.specfile.yamlfile) and read here with the same meaning.
_CLOCK = re.compile(r"^\s*(\d+(?::[0-5]?\d)+(?:\.\d+)?)\s*$")
MAX_RETRIES = 100
#: CPU niceness of cpu stages when the file does not say (gpu stages: 0).
CPU_STAGE_NICE = 10


class Device(enum.StrEnum):
    """Where a stage computes: `cpu` never holds a GPU; `gpu` holds a lease while it runs."""

    CPU = "cpu"
    GPU = "gpu"


class GpuMode(enum.StrEnum):
    """How a gpu stage shares the GPU: `gate` holds a lease for the whole process (any
    framework, e.g. JAX); `auto` runs under `acb-run --auto` (PyTorch, swaps between uses)."""

    GATE = "gate"
    AUTO = "auto"


def placeholders(text: str) -> list[str]:
    """The placeholder names `text` uses, in order (`{{` and `}}` are literal braces)."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(text.replace("{{", "").replace("}}", ""))]


def check_placeholders(text: str) -> list[str]:
    """Placeholder names used in `text` that are not known (empty list when all are fine)."""
    return [name for name in placeholders(text) if name not in PLACEHOLDERS]


def per_item(text: str) -> bool:
    """Whether `text` names one item (uses {item}, {outdir}, ...: see PER_ITEM)."""
    return not PER_ITEM.isdisjoint(placeholders(text))


def substitute(text: str, values: Mapping[str, str]) -> str:
    """Replace `{name}` placeholders in one argv element; `{{` and `}}` stand for braces.

    The result stays one argv element whatever the values contain: nothing is split or quoted.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("{{", i):
            out.append("{")
            i += 2
        elif text.startswith("}}", i):
            out.append("}")
            i += 2
        elif text[i] == "{":
            end = text.find("}", i)
            name = text[i + 1 : end] if end != -1 else ""
            if end == -1 or name not in values:
                raise KeyError(f"unknown placeholder in {text!r}")
            out.append(values[name])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Field types


def _known_placeholders(text: str) -> str:
    bad = check_placeholders(text)
    if bad:
        known = ", ".join("{" + k + "}" for k in PLACEHOLDERS)
        raise ValueError(
            f"unknown placeholder {{{bad[0]}}} in {text!r}; known: {known} "
            "(write {{ and }} for literal braces)"
        )
    return text


def _argument(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"each argument must be a string, got {describe(value)}")
    return str(value)


def _argv(value: Any) -> Any:
    if not isinstance(value, tuple | list) or not value:
        raise ValueError(
            "must be a non-empty list of arguments, e.g. [colabfold_search, '{fasta}', /db, "
            "'{outdir}/msa']; commands are never run through a shell"
        )
    return tuple(value)


Argument: TypeAlias = Annotated[
    str, BeforeValidator(_argument), AfterValidator(_known_placeholders)
]
Command: TypeAlias = Annotated[
    tuple[Argument, ...],
    BeforeValidator(_argv),
    WithJsonSchema({"type": "array", "minItems": 1, "items": {"type": ["string", "number"]}}),
]


def _duration(value: Any) -> float:
    """A positive duration: a number of seconds, 30s, 5m, 2h, or 1:30 (M:SS, H:MM:SS)."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        clock = _CLOCK.match(value)
        if match:
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        elif clock:
            seconds = 0.0
            for part in clock.group(1).split(":"):
                seconds = seconds * 60 + float(part)
    if seconds is None or seconds <= 0:
        raise ValueError(f"must be a positive duration (e.g. 30, 30s, 5m, 2h), got {value!r}")
    return seconds


Duration: TypeAlias = Annotated[
    float,
    PlainValidator(_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "string", "pattern": r"^\s*0*[1-9]\d*(\.\d+)?\s*(ms|s|m|min|h)?\s*$"},
                {"type": "string", "pattern": r"^\s*0*\.\d*[1-9]\d*\s*(ms|s|m|min|h)?\s*$"},
                {"type": "string", "pattern": r"^\s*\d+(:[0-5]?\d)+(\.\d+)?\s*$"},
            ]
        }
    ),
]


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {describe(value)}")
    return value


def _path_in_campaign_dir(*, must_exist: str = "") -> Rules:
    """For `Annotated[Path, ...]`: a path, relative ones taken from the campaign file's
    directory; kept absolute."""

    def check(value: Any, info: ValidationInfo) -> Path:
        base = Path((info.context or {}).get("base_dir") or Path.cwd())
        path = base / Path(_text(value)).expanduser()
        if must_exist and not path.exists():
            raise ValueError(f"{path} does not exist; {must_exist}")
        return path.resolve()

    schema = {"type": "string", "minLength": 1, "pattern": r"\S"}
    return Rules(PlainValidator(check), WithJsonSchema(schema))


StageName: TypeAlias = Annotated[
    str,
    name_matching(
        r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
        "letters, digits, '.', '_' or '-', at most 64 characters",
    ),
]
StageEnv: TypeAlias = Annotated[
    dict[str, str], env_map(bash=False, booleans=True, value_check=_known_placeholders)
]
Items: TypeAlias = Annotated[
    Path, _path_in_campaign_dir(must_exist="give a FASTA file or a directory")
]
Results: TypeAlias = Annotated[Path, _path_in_campaign_dir()]
GpuCount: TypeAlias = Annotated[int, whole_number(1, 64)]
Priority: TypeAlias = Annotated[int, whole_number(-1000, 1000)]
MAX_BATCH = 1024
BatchSize: TypeAlias = Annotated[int, whole_number(1, MAX_BATCH)]


def _patterns(value: Any) -> Any:
    if not isinstance(value, tuple | list):
        raise ValueError(
            f"must be a list of paths, e.g. ['{{outdir}}/ranked_0.pdb'], got {describe(value)}"
        )
    return tuple(value)


PathPatterns: TypeAlias = Annotated[
    tuple[Argument, ...],
    BeforeValidator(_patterns),
    WithJsonSchema({"type": "array", "items": {"type": ["string", "number"]}}),
]
Nice: TypeAlias = Annotated[int, whole_number(0, 19)]
Retries: TypeAlias = Annotated[int, whole_number(0, MAX_RETRIES)]
GpuMemory: TypeAlias = Annotated[int, byte_size(zero="the whole GPU")]


# ---------------------------------------------------------------------------------------------
# The models

#: Stage keys only gpu stages take.
GPU_ONLY = ("mode", "memory", "gpus", "priority", "batch", "batch_wait")
#: How long a ready item waits for its batch to fill when the file does not say.
BATCH_WAIT_S = 1800.0


class Stage(SpecModel):
    """One step of every item, run as an argv list (never through a shell)."""

    name: StageName = Field(description="stage name (letters, digits, . _ -)")
    command: Command = Field(
        description="argv list; placeholders like {fasta} {item} {outdir} are substituted"
    )
    device: Annotated[Device, Strict(False)] = Field(Device.CPU, description="cpu or gpu")
    mode: Annotated[GpuMode, Strict(False)] = Field(
        GpuMode.GATE,
        description="gpu stages: gate (lease for the whole process) or auto (acb-run --auto)",
    )
    memory_bytes: GpuMemory = Field(
        0,
        alias="memory",
        description="gpu stages: per-GPU memory estimate, e.g. 16GiB; 0 = the whole GPU",
    )
    gpus: GpuCount = Field(1, description="gpu stages: number of GPUs")
    priority: Priority = Field(0, description="gpu stages: lease priority, higher first")
    timeout_s: Duration | None = Field(
        None,
        alias="timeout",
        description="seconds (or 30m, 2h) after which the stage is killed and the attempt fails",
    )
    env: StageEnv = Field(
        default_factory=dict, description="mapping of extra environment variables for the command"
    )
    nice: Nice = Field(
        CPU_STAGE_NICE,
        description=f"CPU niceness of the command, 0..19 ({CPU_STAGE_NICE} for cpu stages, 0 "
        "for gpu stages, so a process holding a GPU is not slowed by other workers' CPU stages)",
    )
    batch: BatchSize = Field(
        1,
        description="gpu stages: how many ready items one process of this stage takes, under "
        "one lease (1 = a process per item), so that its start-up (imports, weights, "
        "compilation) is paid once per batch. A worker runs the earlier stages one item at a "
        "time; an item that is ready waits, claimed, until `batch` items are ready, no more "
        "can be claimed, or the first one would wait past batch_wait. In the command an "
        "argument with a per-item placeholder ({outdir}, {item}, {fasta}, {attempt}, "
        "{sequence}, {length}) is repeated once per item; {items_dir} is a directory of one "
        "symlink per item (see item_link). Each item is judged alone: done when the process "
        "exits 0 and its `outputs` exist; a failed process fails every item; an item whose "
        "attempt failed is retried in a process of its own. timeout is per item (n items: n "
        "times it); env may not use per-item placeholders",
    )
    batch_wait_s: Duration = Field(
        BATCH_WAIT_S,
        alias="batch_wait",
        description="gpu stages with batch above 1: the longest the first ready item of a batch "
        "waits for it to fill (seconds, or 30s, 5m, 2h): the worker runs the batch instead of "
        "the earlier stages of another item that, by their mean time so far, would end later",
    )
    item_link: Argument = Field(
        "{outdir}",
        description="what {items_dir} holds of each item: the path its symlink points to "
        "(per-item placeholders; a glob pattern must match exactly one path, e.g. "
        "'{outdir}/msa/*.a3m'; relative to {outdir}); the link is named after the item with "
        "the target's suffix (<item>.a3m)",
    )
    outputs: PathPatterns = Field(
        (),
        description="paths (glob patterns, per-item placeholders, relative to {outdir}) each "
        "item must have after this stage, e.g. ['{outdir}/ranked_0.pdb']; an item without "
        "them fails the stage (in a batch: that item alone)",
    )

    @model_validator(mode="before")
    @classmethod
    def _gpu_stages_run_at_nice_0(cls, data: Any) -> Any:
        if isinstance(data, dict) and "nice" not in data and data.get("device") == Device.GPU:
            return {**data, "nice": 0}
        return data


Stages: TypeAlias = Annotated[tuple[Stage, ...], non_empty()]


def _no_default(schema: JsonDict) -> None:
    """A field's JSON Schema without its default (one computed when the file is read)."""
    schema.pop("default", None)


class CampaignSpec(SpecModel):
    """A campaign file. Paths are absolute (relative ones are taken from the file's dir)."""

    name: Text = Field(
        "",
        description="campaign name shown in progress lines (default: the file name)",
        json_schema_extra=_no_default,
    )
    items: Items = Field(
        description="a FASTA file or a directory of FASTA files (one sequence per item)"
    )
    results: Results = Field(description="results directory (claims, records, logs, outputs)")
    stages: Stages = Field(description="list of stages run in order for every item")
    retries: Retries = Field(2, description="how many times a failed item is retried")
    heartbeat_s: Duration = Field(
        30.0,
        alias="heartbeat",
        description="how often a worker touches its claim (seconds, or 30s, 5m, 2h)",
    )
    stale_after_s: Duration = Field(
        600.0,
        alias="stale_after",
        description="a claim from another host without heartbeat this long is taken over",
    )
    progress_interval_s: Duration = Field(
        60.0,
        alias="progress_interval",
        description="seconds between plain progress lines when stdout is not a terminal",
    )
    _path: Path = PrivateAttr(default_factory=Path)

    @model_validator(mode="before")
    @classmethod
    def _name_defaults_to_the_file(cls, data: Any, info: ValidationInfo) -> Any:
        path = (info.context or {}).get("path")
        if isinstance(data, dict) and "name" not in data and path is not None:
            return {**data, "name": Path(path).stem}
        return data

    def model_post_init(self, context: Any) -> None:
        if isinstance(context, Mapping) and "path" in context:
            self._path = Path(context["path"])

    @property
    def path(self) -> Path:
        """The campaign file (absolute)."""
        return self._path

    @property
    def campaign_dir(self) -> Path:
        """The directory of the campaign file ({campaign_dir})."""
        return self.path.parent

    @property
    def max_attempts(self) -> int:
        """Attempts an item gets before it is recorded as failed."""
        return self.retries + 1

    @property
    def batched_stage(self) -> Stage | None:
        """The stage whose processes take several items (`batch` above 1), if any (at most
        one)."""
        return next((stage for stage in self.stages if stage.batch > 1), None)


def _cross_checks(spec: CampaignSpec) -> Iterator[tuple[Loc, str]]:
    """Checks that span fields: (where, message)."""
    seen: dict[str, int] = {}
    for i, stage in enumerate(spec.stages):
        given = {Stage.model_fields[f].alias or f for f in stage.model_fields_set}
        if stage.device is Device.CPU:
            for key in GPU_ONLY:
                if key in given:
                    yield (
                        ("stages", i, key),
                        f"only gpu stages take {key!r}, but device is cpu; add `device: gpu` or "
                        f"remove {key!r}",
                    )
        if stage.mode is GpuMode.AUTO and stage.gpus > 1:
            yield (
                ("stages", i, "gpus"),
                f"mode auto holds one GPU (acb-run --auto), but gpus is {stage.gpus}; use mode "
                "gate for multi-GPU stages",
            )
        yield from _batch_checks(i, stage, given)
        if stage.name in seen:
            yield (
                ("stages", i, "name"),
                f"{stage.name!r} is also the name of stages[{seen[stage.name]}]; names must be "
                "unique",
            )
        seen.setdefault(stage.name, i)
    batched = [i for i, stage in enumerate(spec.stages) if stage.batch > 1]
    for i in batched[1:]:
        yield (
            ("stages", i, "batch"),
            f"only one stage may batch, but stages[{batched[0]}] ({spec.stages[batched[0]].name}) "
            "does too; set batch on the stage whose start-up costs the most",
        )
    if spec.stale_after_s < 2 * spec.heartbeat_s:
        key = "stale_after" if "stale_after_s" in spec.model_fields_set else "heartbeat"
        yield (
            (key,),
            f"stale_after ({spec.stale_after_s:g}s) must be at least twice heartbeat "
            f"({spec.heartbeat_s:g}s), or live workers' claims would be taken over",
        )


def _batch_checks(i: int, stage: Stage, given: set[str]) -> Iterator[tuple[Loc, str]]:
    """A batch stage's env is one per process, and per-item paths name one item."""
    if stage.batch > 1:
        for name, value in stage.env.items():
            if per_item(value):
                yield (
                    ("stages", i, "env", name),
                    f"{value!r} names one item, but one process of this stage runs up to "
                    f"{stage.batch} items (batch: {stage.batch}) with one environment; use the "
                    "placeholder in a command argument (repeated once per item)",
                )
    for key, patterns in (("item_link", (stage.item_link,)), ("outputs", stage.outputs)):
        if key in given and any("items_dir" in placeholders(p) for p in patterns):
            yield (
                ("stages", i, key),
                f"{key} names a path of one item; {{items_dir}} is the process's, removed after it",
            )


def _labeller(document: Document) -> specmodel.Labeller:
    """Fields as messages name them: a stage by index and name (stages[1] (predict).mode), a
    command argument by its command (the line says which argument)."""

    def label(loc: Loc) -> str:
        if len(loc) < 3 or loc[0] != "stages" or not isinstance(loc[1], int):
            return dotted(loc)
        rest = loc[2:]
        if rest[0] == "name":
            return dotted(loc)
        if rest[0] == "command":
            rest = rest[:1]
        name = document.value(("stages", loc[1], "name"))
        named = f"stages[{loc[1]}]" + (f" ({name})" if isinstance(name, str) and name else "")
        return named + "." + dotted(rest)

    return label


def load_spec(path: Path | str) -> CampaignSpec:
    """Read and validate a campaign file. SpecError names file, line and field of every problem."""
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(path, None, "", f"cannot read the campaign file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(path, None, "", f"not UTF-8 text: {exc}") from None
    try:
        document = read_yaml(
            text,
            str(path),
            what="a campaign file",
            depth_hint="a campaign file needs at most 4 (stages[0].env.NAME)",
        )
    except InvalidSpec as exc:
        raise SpecError.of(exc.problems) from None
    if document is None:
        raise SpecError(
            path, None, "", "the campaign file is empty; it needs items, results, stages"
        )
    label = _labeller(document)
    context = {"base_dir": path.parent, "path": path}
    spec, problems = specmodel.validate(
        CampaignSpec, document, context=context, label=label, long_keys=True
    )
    if spec is not None:
        problems = sorted_problems(
            Problem(str(path), document.line(loc, key=True), label(loc), message)
            for loc, message in _cross_checks(spec)
        )
    if spec is None or problems:
        raise SpecError.of(problems)
    return spec


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a campaign file, from the models validation uses."""
    return specmodel.json_schema(
        CampaignSpec,
        schema_id="https://acb-slurm.invalid/schema/campaign.json",
        title="acb-slurm campaign file",
    )
