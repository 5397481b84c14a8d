"""The campaign file (YAML): items, stages, retries, results directory.

Validated once, here, into frozen dataclasses. Every error names the file, the line and the field
(PyYAML's compose-node marks), lists the valid keys for an unknown one, and says what to write.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from acb_slurm.campaign.errors import SpecError
from acb_slurm.units import parse_written_size

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
}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_RETRIES = 100


class Device(enum.StrEnum):
    """Where a stage computes: `cpu` never holds a GPU; `gpu` holds a lease while it runs."""

    CPU = "cpu"
    GPU = "gpu"


class GpuMode(enum.StrEnum):
    """How a gpu stage shares the GPU: `gate` holds a lease for the whole process (any
    framework, e.g. JAX); `auto` runs under `acb-run --auto` (PyTorch, swaps between uses)."""

    GATE = "gate"
    AUTO = "auto"


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of every item, run as an argv list (never through a shell)."""

    name: str
    command: tuple[str, ...]
    device: Device = Device.CPU
    mode: GpuMode = GpuMode.GATE
    gpus: int = 1
    memory_bytes: int = 0  # per-GPU estimate; 0 = the whole GPU
    priority: int = 0
    timeout_s: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    nice: int = 0  # CPU priority of the command (0..19); cpu stages default to 10


@dataclass(frozen=True, slots=True)
class CampaignSpec:
    """A validated campaign. Paths are absolute (relative ones are taken from the file's dir)."""

    path: Path
    name: str
    items: Path
    results: Path
    stages: tuple[Stage, ...]
    retries: int = 2
    heartbeat_s: float = 30.0
    stale_after_s: float = 600.0
    progress_interval_s: float = 60.0

    @property
    def campaign_dir(self) -> Path:
        """The directory of the campaign file ({campaign_dir})."""
        return self.path.parent

    @property
    def max_attempts(self) -> int:
        """Attempts an item gets before it is recorded as failed."""
        return self.retries + 1


_TOP_KEYS = {
    "name": "campaign name shown in progress lines (default: the file name)",
    "items": "a FASTA file or a directory of FASTA files (one sequence per item)",
    "results": "results directory (claims, records, logs, outputs)",
    "stages": "list of stages run in order for every item",
    "retries": f"how many times a failed item is retried (0..{MAX_RETRIES}, default 2)",
    "heartbeat": "how often a worker touches its claim (default 30s)",
    "stale_after": "a claim from another host without heartbeat this long is taken over "
    "(default 10m)",
    "progress_interval": "seconds between plain progress lines when stdout is not a terminal "
    "(default 60s)",
}
_STAGE_KEYS = {
    "name": "stage name (letters, digits, . _ -)",
    "command": "argv list; placeholders like {fasta} {item} {outdir} are substituted",
    "device": "cpu or gpu",
    "mode": "gpu stages: gate (lease for the whole process) or auto (acb-run --auto)",
    "memory": "gpu stages: per-GPU memory estimate, e.g. 16GiB (default: the whole GPU)",
    "gpus": "gpu stages: number of GPUs (default 1)",
    "priority": "gpu stages: lease priority, higher first (default 0)",
    "timeout": "seconds (or 30m, 2h) after which the stage is killed and the attempt fails",
    "env": "mapping of extra environment variables for the command",
    "nice": "CPU niceness of the command, 0..19 (default 10 for cpu stages, 0 for gpu stages, "
    "so a process holding a GPU is not slowed by other workers' CPU stages)",
}


class _Reader:
    """Turns compose nodes into values, raising SpecError with file, line and field."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, node: yaml.Node | None, field_name: str, message: str) -> SpecError:
        line = node.start_mark.line + 1 if node is not None else None
        return SpecError(self.path, line, field_name, message)

    def value(self, node: yaml.Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def mapping(
        self, node: yaml.Node, field_name: str, allowed: Mapping[str, str]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, field_name, f"must be a mapping with keys {sorted(allowed)}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            where = f"{field_name}.{key}" if field_name else str(key)
            if not isinstance(key, str) or key not in allowed:
                valid = ", ".join(f"{k} ({v})" for k, v in allowed.items())
                raise self.error(key_node, where, f"unknown key {key!r}; valid keys: {valid}")
            if key in out:
                raise self.error(
                    key_node,
                    where,
                    f"given twice (also on line {out[key][0].start_mark.line + 1}); keep one",
                )
            out[key] = (key_node, value_node)
        return out

    def string(self, node: yaml.Node, field_name: str) -> str:
        value = self.value(node)
        if not isinstance(value, str) or not value.strip():
            raise self.error(node, field_name, f"must be a non-empty string, got {value!r}")
        return value

    def integer(self, node: yaml.Node, field_name: str, lo: int, hi: int) -> int:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(
                node, field_name, f"must be an integer from {lo} to {hi}, got {value!r}"
            )
        return value

    def duration(self, node: yaml.Node, field_name: str) -> float:
        """A positive duration: a number of seconds or 30s, 5m, 2h."""
        value = self.value(node)
        if isinstance(value, bool):
            value = None
        seconds: float | None = None
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            match = _DURATION.match(value)
            if match:
                seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        if seconds is None or seconds <= 0:
            raise self.error(
                node,
                field_name,
                f"must be a positive duration (e.g. 30, 30s, 5m, 2h), got {value!r}",
            )
        return seconds


def check_placeholders(text: str) -> list[str]:
    """Placeholder names used in `text` that are not known (empty list when all are fine)."""
    bad = []
    for match in _PLACEHOLDER.finditer(text.replace("{{", "").replace("}}", "")):
        if match.group(1) not in PLACEHOLDERS:
            bad.append(match.group(1))
    return bad


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


def _stage(reader: _Reader, node: yaml.Node, index: int) -> Stage:
    where = f"stages[{index}]"
    if isinstance(node, yaml.MappingNode):
        # Name the stage in every error, even one found before its `name:` key is read.
        for key_node, value_node in node.value:
            if getattr(key_node, "value", None) == "name" and isinstance(
                value_node, yaml.ScalarNode
            ):
                where = f"stages[{index}] ({value_node.value})"
    keys = reader.mapping(node, where, _STAGE_KEYS)
    for required in ("name", "command"):
        if required not in keys:
            raise reader.error(node, f"{where}.{required}", f"missing; {_STAGE_KEYS[required]}")
    name = reader.string(keys["name"][1], f"{where}.name")
    if not _STAGE_NAME.match(name):
        raise reader.error(
            keys["name"][1],
            f"{where}.name",
            f"{name!r} is not a valid stage name: use letters, digits, '.', '_' or '-' "
            "(at most 64 characters)",
        )
    where = f"stages[{index}] ({name})"

    command_node = keys["command"][1]
    if not isinstance(command_node, yaml.SequenceNode) or not command_node.value:
        raise reader.error(
            command_node,
            f"{where}.command",
            "must be a non-empty list of arguments, e.g. [colabfold_search, '{fasta}', /db, "
            "'{outdir}/msa']; commands are never run through a shell",
        )
    command: list[str] = []
    for arg_node in command_node.value:
        arg = reader.value(arg_node)
        if isinstance(arg, bool) or not isinstance(arg, str | int | float):
            raise reader.error(
                arg_node, f"{where}.command", f"each argument must be a string, got {arg!r}"
            )
        arg = str(arg)
        bad = check_placeholders(arg)
        if bad:
            known = ", ".join("{" + k + "}" for k in PLACEHOLDERS)
            raise reader.error(
                arg_node,
                f"{where}.command",
                f"unknown placeholder {{{bad[0]}}} in {arg!r}; known: {known} "
                "(write {{ and }} for literal braces)",
            )
        command.append(arg)

    device = Device.CPU
    if "device" in keys:
        raw = reader.value(keys["device"][1])
        try:
            device = Device(raw)
        except ValueError:
            raise reader.error(
                keys["device"][1], f"{where}.device", f"must be cpu or gpu, got {raw!r}"
            ) from None

    gpu_only = ("mode", "memory", "gpus", "priority")
    if device is Device.CPU:
        for key in gpu_only:
            if key in keys:
                raise reader.error(
                    keys[key][0],
                    f"{where}.{key}",
                    f"only gpu stages take {key!r}, but device is cpu; add `device: gpu` or "
                    f"remove {key!r}",
                )

    mode = GpuMode.GATE
    if "mode" in keys:
        raw = reader.value(keys["mode"][1])
        try:
            mode = GpuMode(raw)
        except ValueError:
            raise reader.error(
                keys["mode"][1], f"{where}.mode", f"must be gate or auto, got {raw!r}"
            ) from None

    memory_bytes = 0
    if "memory" in keys:
        raw = reader.value(keys["memory"][1])
        try:
            memory_bytes = parse_written_size(raw)
        except (ValueError, TypeError) as exc:
            raise reader.error(keys["memory"][1], f"{where}.memory", str(exc)) from None

    gpus = reader.integer(keys["gpus"][1], f"{where}.gpus", 1, 64) if "gpus" in keys else 1
    if mode is GpuMode.AUTO and gpus > 1:
        raise reader.error(
            keys["gpus"][1],
            f"{where}.gpus",
            f"mode auto holds one GPU (acb-run --auto), but gpus is {gpus}; use mode gate for "
            "multi-GPU stages",
        )
    priority = (
        reader.integer(keys["priority"][1], f"{where}.priority", -1000, 1000)
        if "priority" in keys
        else 0
    )
    timeout = reader.duration(keys["timeout"][1], f"{where}.timeout") if "timeout" in keys else None

    default_nice = 10 if device is Device.CPU else 0
    nice = (
        reader.integer(keys["nice"][1], f"{where}.nice", 0, 19) if "nice" in keys else default_nice
    )

    env: dict[str, str] = {}
    if "env" in keys:
        env_node = keys["env"][1]
        if not isinstance(env_node, yaml.MappingNode):
            raise reader.error(env_node, f"{where}.env", "must be a mapping NAME: value")
        for key_node, value_node in env_node.value:
            key = reader.value(key_node)
            if not isinstance(key, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise reader.error(
                    key_node, f"{where}.env", f"{key!r} is not a valid environment variable name"
                )
            value = reader.value(value_node)
            if isinstance(value, bool):
                value = "true" if value else "false"
            if value is None or not isinstance(value, str | int | float):
                raise reader.error(
                    value_node, f"{where}.env.{key}", f"must be a string, got {value!r}"
                )
            value = str(value)
            bad = check_placeholders(value)
            if bad:
                raise reader.error(
                    value_node, f"{where}.env.{key}", f"unknown placeholder {{{bad[0]}}}"
                )
            env[key] = value

    return Stage(
        name=name,
        command=tuple(command),
        device=device,
        mode=mode,
        gpus=gpus,
        memory_bytes=memory_bytes,
        priority=priority,
        timeout_s=timeout,
        env=env,
        nice=nice,
    )


def load_spec(path: Path | str) -> CampaignSpec:
    """Read and validate a campaign file. Raises SpecError naming file, line and field."""
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(path, None, "", f"cannot read the campaign file: {exc.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise SpecError(path, line, "", f"not valid YAML: {exc}") from None
    if root is None:
        raise SpecError(
            path, None, "", "the campaign file is empty; it needs items, results, stages"
        )
    reader = _Reader(path)
    keys = reader.mapping(root, "", _TOP_KEYS)
    for required in ("items", "results", "stages"):
        if required not in keys:
            raise reader.error(root, required, f"missing; {_TOP_KEYS[required]}")

    base = path.parent
    items = base / Path(reader.string(keys["items"][1], "items")).expanduser()
    results = base / Path(reader.string(keys["results"][1], "results")).expanduser()
    if not items.exists():
        raise reader.error(
            keys["items"][1], "items", f"{items} does not exist; give a FASTA file or a directory"
        )

    stages_node = keys["stages"][1]
    if not isinstance(stages_node, yaml.SequenceNode) or not stages_node.value:
        raise reader.error(stages_node, "stages", "must be a non-empty list of stages")
    stages = tuple(_stage(reader, node, i) for i, node in enumerate(stages_node.value))
    seen: dict[str, int] = {}
    for i, stage in enumerate(stages):
        if stage.name in seen:
            raise reader.error(
                stages_node.value[i],
                f"stages[{i}].name",
                f"{stage.name!r} is also the name of stages[{seen[stage.name]}]; names must be "
                "unique",
            )
        seen[stage.name] = i

    name = reader.string(keys["name"][1], "name") if "name" in keys else path.stem
    retries = (
        reader.integer(keys["retries"][1], "retries", 0, MAX_RETRIES) if "retries" in keys else 2
    )
    heartbeat = reader.duration(keys["heartbeat"][1], "heartbeat") if "heartbeat" in keys else 30.0
    stale_after = (
        reader.duration(keys["stale_after"][1], "stale_after") if "stale_after" in keys else 600.0
    )
    if stale_after < 2 * heartbeat:
        node = keys["stale_after"][1] if "stale_after" in keys else keys["heartbeat"][1]
        raise reader.error(
            node,
            "stale_after",
            f"stale_after ({stale_after:g}s) must be at least twice heartbeat ({heartbeat:g}s), "
            "or live workers' claims would be taken over",
        )
    progress = (
        reader.duration(keys["progress_interval"][1], "progress_interval")
        if "progress_interval" in keys
        else 60.0
    )
    return CampaignSpec(
        path=path,
        name=name,
        items=items.resolve(),
        results=results.resolve(),
        stages=stages,
        retries=retries,
        heartbeat_s=heartbeat,
        stale_after_s=stale_after,
        progress_interval_s=progress,
    )
