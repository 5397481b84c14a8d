"""The job.yaml spec: typed sections, line-precise validation and its JSON Schema, one definition.

Each section is a frozen dataclass whose fields carry a `Kind` (how a YAML value is checked and
converted, and what JSON Schema describes it) and a one-line doc. `load_spec` walks the composed
YAML node tree, so every problem names the file, the line and the dotted field; `json_schema`
walks the same dataclass fields, so validation and schema cannot drift apart. Checks that span
several fields (a worker asking for more GPUs than a node has, ...) live in `_cross_checks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from acb_slurm.slurm.errors import Problem, SpecError
from acb_slurm.units import MIN_BARE_SIZE, parse_size, parse_written_size

#: Kept in sync with acb_slurm.scheduler's registry; used only when it cannot be imported.
FALLBACK_POLICIES = ("gpu-affinity", "gpu-sharing", "simple")

WORKER_MODES = ("gate", "auto", "client")

#: Workers sharing one GPU: beyond this the turns are so short that waiting dominates.
MAX_WORKERS_PER_GPU = 64
#: Worker steps on one node, all groups together: each is an srun process on the batch node and
#: a slurmstepd on its node.
MAX_WORKERS_PER_NODE = 512


def known_policies() -> list[str]:
    """Policy names the assigner accepts: the scheduler registry's, else the fallback list."""
    try:
        from acb_slurm.scheduler import available_policies
    except ImportError:
        return list(FALLBACK_POLICIES)
    return list(available_policies())


# ---------------------------------------------------------------------------------------------
# YAML with positions


@dataclass(slots=True)
class Node:
    """A YAML value with its 1-based line: scalars hold Python values, mappings/sequences Nodes."""

    value: Any
    line: int
    kind: str  # "scalar", "mapping", "sequence"
    keys: dict[str, int] = field(default_factory=dict)  # mapping: key -> line of the key
    raw: str = ""  # scalar: the text as written (YAML 1.1 reads 10:30 as the integer 630)


#: Values that YAML aliases (*name) may add to a job.yaml, all aliases together: plenty to share a
#: command or an env mapping between worker groups, far too few for an alias bomb ("billion
#: laughs": nested anchors that expand to billions of values).
MAX_ALIAS_VALUES = 10_000
#: Nesting a job.yaml may have (its own fields are at most 5 levels deep); deeper is refused
#: before it reaches Python's recursion limit.
MAX_YAML_DEPTH = 32

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _tag_as_written(tag: str) -> str:
    """A resolved tag as people write it: tag:yaml.org,2002:str -> !!str."""
    prefix = "tag:yaml.org,2002:"
    return "!!" + tag[len(prefix) :] if tag.startswith(prefix) else tag


class _Loader(yaml.SafeLoader):
    """SafeLoader whose composer refuses YAML tags, merge keys, values that contain themselves
    and deep nesting, and bounds how many values aliases may add (all with file, line, field).

    Tags are refused rather than dropped: job.yaml holds plain values, and a tag (`!!python/...`)
    would otherwise be ignored silently and the tagged value used. Aliases are counted as they
    are composed, by the size of what they stand for, so an alias bomb is refused after a few
    thousand values instead of being expanded.
    """

    def __init__(self, text: str, file: str) -> None:
        super().__init__(text)
        self.file = file
        self.problems: list[Problem] = []
        self.fields: list[str] = []  # the dotted field of each node being composed
        self.open_anchors: set[str] = set()  # anchors of the nodes being composed
        self.alias_values = 0
        self.sizes: dict[int, int] = {}  # id(node) -> values it stands for, expanded

    def field_of(self, parent: yaml.Node | None, index: Any) -> str:
        """The dotted field of the child `index` of `parent` (PyYAML's compose_node arguments:
        a mapping's key node for its value, None for the key itself, an int in a sequence)."""
        here = self.fields[-1] if self.fields else ""
        if isinstance(parent, yaml.SequenceNode):
            return f"{here}[{index}]"
        if isinstance(parent, yaml.MappingNode) and isinstance(index, yaml.ScalarNode):
            return f"{here}.{index.value}" if here else str(index.value)
        return here

    def size(self, node: yaml.Node) -> int:
        """How many values `node` stands for once every alias in it is expanded."""
        known = self.sizes.get(id(node))
        if known is not None:
            return known
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(self.size(k) + self.size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(self.size(n) for n in node.value)
        else:
            total = 1
        self.sizes[id(node)] = total
        return total

    def refuse(self, line: int, field: str, message: str) -> SpecError:
        return SpecError([*self.problems, Problem(self.file, line, field, message)])

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        field = self.field_of(parent, index)
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.open_anchors:
                raise self.refuse(
                    line,
                    field,
                    f"the alias *{event.anchor} stands for a value that contains it, and a value "
                    "that contains itself never ends; write the value out",
                )
            node = super().compose_node(parent, index)
            size = self.size(node)
            self.alias_values += size
            if self.alias_values > MAX_ALIAS_VALUES:
                raise self.refuse(
                    line,
                    field,
                    f"YAML aliases (*name) expand to more than {MAX_ALIAS_VALUES} values here "
                    f"(*{event.anchor} alone stands for {size}): refusing what looks like an "
                    "alias bomb; write the values out, or use aliases for small shared values only",
                )
            return node
        if len(self.fields) >= MAX_YAML_DEPTH:
            raise self.refuse(
                line,
                field,
                f"nested more than {MAX_YAML_DEPTH} levels deep; a job.yaml needs at most 5 "
                "(workers[0].env.NAME): look for unclosed or stray brackets",
            )
        tag = getattr(event, "tag", None)
        if tag is not None:
            self.problems.append(
                Problem(
                    self.file,
                    line,
                    field,
                    f"YAML tag {_tag_as_written(tag)!r} is not allowed: job.yaml holds plain "
                    "values only; remove the tag (quote it, '...', if the value must stay text)",
                )
            )
        anchor = getattr(event, "anchor", None)
        self.fields.append(field)
        if anchor is not None:
            self.open_anchors.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self.fields.pop()
            if anchor is not None:
                self.open_anchors.discard(anchor)
        if isinstance(parent, yaml.MappingNode) and index is None and node.tag == _MERGE_TAG:
            self.problems.append(
                Problem(
                    self.file,
                    line,
                    field,
                    "YAML merge keys (<<) are not supported in job.yaml: write the fields out (an "
                    "alias can still stand for a whole value, e.g. env: *common)",
                )
            )
        return node


def _compose(text: str, file: str) -> Node | None:
    """Parse YAML text into Nodes keeping line numbers (PyYAML's compose marks)."""
    loader = _Loader(text, file)
    try:
        root = loader.get_single_node()
        if loader.problems:
            raise SpecError(loader.problems)
        if root is None:
            return None
        return _to_node(loader, root, file)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise SpecError([Problem(file, line, "", f"not valid YAML: {what}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([Problem(file, 0, "", f"not valid YAML: {exc}")]) from None
    finally:
        loader.dispose()


def _to_node(loader: yaml.SafeLoader, node: yaml.Node, file: str) -> Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        items: dict[str, Node] = {}
        keys: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise SpecError(
                    [Problem(file, key_line, str(key), "keys must be strings (names of fields)")]
                )
            if key in items:
                raise SpecError(
                    [
                        Problem(
                            file, key_line, key, f"duplicate key (first given on line {keys[key]})"
                        )
                    ]
                )
            items[key] = _to_node(loader, value_node, file)
            keys[key] = key_line
        return Node(items, line, "mapping", keys)
    if isinstance(node, yaml.SequenceNode):
        return Node([_to_node(loader, n, file) for n in node.value], line, "sequence")
    return Node(loader.construct_object(node, deep=True), line, "scalar", raw=str(node.value))


def _plain(node: Node) -> Any:
    """The plain Python value of a Node (for error messages)."""
    if node.kind == "mapping":
        return {k: _plain(v) for k, v in node.value.items()}
    if node.kind == "sequence":
        return [_plain(v) for v in node.value]
    return node.value


class _Collector:
    """Accumulates problems so that one run reports all of them, not only the first."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def add(self, line: int, path: str, message: str) -> None:
        self.problems.append(Problem(self.file, line, path, message))


class _Invalid(Exception):
    """Raised by a Kind: the message says what was expected."""


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"a number ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Kinds: how one field is checked and described


class Kind:
    """How a field's YAML value is checked, converted, and described in JSON Schema."""

    def convert(self, node: Node, path: str, out: _Collector, ctx: _Context) -> Any:
        if node.kind != "scalar":
            raise _Invalid(f"expected {self.expected()}, got {_describe(_plain(node))}")
        return self.scalar(node.value, ctx)

    def scalar(self, value: Any, ctx: _Context) -> Any:
        raise NotImplementedError

    def expected(self) -> str:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class _Context:
    """What conversion needs beyond the value: the directory relative paths start from."""

    base_dir: Path


# Values that end up on an #SBATCH line: sbatch reads them with its own (double-quote) rules,
# which cannot carry a double quote, a backslash or a line break.
_SBATCH_SAFE = re.compile(r'^[^"\\\x00-\x1f\x7f]+$')
_SBATCH_SAFE_JSON = '^[^"\\\\\\u0000-\\u001f\\u007f]+$'


# Control characters (line breaks, tabs, ...): valid in a file name, but no one means them there,
# and the shell lines and logs that print a path break on them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NO_CONTROL_JSON = "^[^\\u0000-\\u001f\\u007f]*$"


@dataclass(frozen=True)
class Str(Kind):
    """A non-empty string; `sbatch_line` forbids what an #SBATCH line cannot carry; `file_name`
    (where the value goes into file names, in words) forbids '/' and the names '.' and '..'."""

    sbatch_line: bool = False
    pattern: str | None = None  # a regex the whole value must match
    pattern_doc: str = ""  # what the pattern allows, in words
    file_name: str = ""

    def scalar(self, value: Any, ctx: _Context) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected {self.expected()}, got {_describe(value)}")
        if not value.strip():
            raise _Invalid("must not be empty")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise _Invalid(f"{value!r} is not valid here: {self.pattern_doc}")
        if "\x00" in value:
            raise _Invalid("must not contain a NUL character")
        if self.sbatch_line and not _SBATCH_SAFE.match(value):
            raise _Invalid(
                f"{value!r} cannot go on an #SBATCH line: no double quotes, backslashes or "
                "line breaks"
            )
        if self.file_name and "/" in value:
            raise _Invalid(
                f"{value!r} contains '/': {self.file_name}, where '/' would start a directory "
                "that does not exist, and the job would fail without any output; use '-' or '_' "
                "instead"
            )
        if self.file_name and value.strip() in (".", ".."):
            raise _Invalid(
                f"{value!r} cannot be a job name: {self.file_name}, where {value.strip()!r} names "
                "a directory, not a file; choose another name"
            )
        return value

    def expected(self) -> str:
        return "a string"

    def schema(self) -> dict[str, Any]:
        if self.pattern is not None:
            return {"type": "string", "minLength": 1, "pattern": f"^(?:{self.pattern})$"}
        if not self.sbatch_line and not self.file_name:
            return {"type": "string", "minLength": 1, "pattern": r"\S"}
        patterns: list[dict[str, Any]] = [{"pattern": r"\S"}]
        if self.sbatch_line:
            patterns.append({"pattern": _SBATCH_SAFE_JSON})
        if self.file_name:
            patterns.append({"pattern": "^[^/]*$"})
            patterns.append({"not": {"pattern": r"^\s*\.\.?\s*$"}})
        return {"type": "string", "minLength": 1, "allOf": patterns}


# Slurm's filename patterns that differ between jobs, steps, tasks or nodes (%j, %3a, ...; %%
# is a literal %): in a directory of an --output path they name a directory that cannot exist
# yet, and Slurm does not create directories. (%u and %x are fixed at submission: such a
# directory can be made beforehand.)
_PER_JOB_DIR = re.compile(r"^(?:[^%]|%%)*?(%[0-9]*[AabJjNnst])[^/]*/")


@dataclass(frozen=True)
class PathStr(Str):
    """A path: a leading ~ is expanded (sbatch, srun and quoted shell words do not do it), control
    characters are refused; `slurm_pattern` (--output/--error) keeps per-job %-patterns out of
    directory names."""

    slurm_pattern: bool = False

    def scalar(self, value: Any, ctx: _Context) -> str:
        text = super().scalar(value, ctx)
        if _CONTROL.search(text):
            raise _Invalid(
                f"{text!r} contains a control character (a line break, tab, ...) that would "
                "break the path it becomes; remove it"
            )
        if self.slurm_pattern:
            per_job = _PER_JOB_DIR.match(text)
            if per_job:
                raise _Invalid(
                    f"{text!r} puts {per_job.group(1)} in a directory name: Slurm does not create "
                    "directories and acb-sbatch can only create the fixed part before it, so the "
                    "job would fail without any output; keep such %-patterns in the file name "
                    "(e.g. logs/%x-%j.out)"
                )
        return os.path.expanduser(text) if text.startswith("~") else text

    def schema(self) -> dict[str, Any]:
        out = super().schema()
        patterns = out.pop("allOf", [])
        if "pattern" in out:
            patterns.append({"pattern": out.pop("pattern")})
        if not self.sbatch_line:  # the #SBATCH pattern already has no control characters
            patterns.append({"pattern": _NO_CONTROL_JSON})
        if self.slurm_pattern:
            patterns.append({"not": {"pattern": _PER_JOB_DIR.pattern}})
        return {**out, "allOf": patterns}


@dataclass(frozen=True)
class Int(Kind):
    """A whole number within bounds (booleans are not numbers here)."""

    minimum: int = 0
    maximum: int | None = None

    def scalar(self, value: Any, ctx: _Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected {self.expected()}, got {_describe(value)}")
        if value < self.minimum:
            raise _Invalid(f"must be at least {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise _Invalid(f"must be at most {self.maximum}, got {value}")
        return value

    def expected(self) -> str:
        return f"a whole number >= {self.minimum}"

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer", "minimum": self.minimum}
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


@dataclass(frozen=True)
class Choice(Kind):
    """One of a list of names; `choices` is called so registries can grow at run time."""

    choices: Callable[[], Sequence[str]]
    what: str = "value"

    def scalar(self, value: Any, ctx: _Context) -> str:
        known = list(self.choices())
        if not isinstance(value, str):
            raise _Invalid(f"expected one of {', '.join(known)}, got {_describe(value)}")
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _Invalid(f"unknown {self.what} {value!r}{hint}; known: {', '.join(known)}")
        return value

    def expected(self) -> str:
        return f"one of {', '.join(self.choices())}"

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.choices())}


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


@dataclass(frozen=True)
class SlurmTime(Kind):
    """A time limit in one of Slurm's formats; kept as written, zero refused."""

    def convert(self, node: Node, path: str, out: _Collector, ctx: _Context) -> Any:
        if node.kind == "scalar" and isinstance(node.value, int) and ":" in node.raw:
            return self.scalar(node.raw, ctx)  # 10:30 unquoted: YAML 1.1 made it 630
        return super().convert(node, path, out, ctx)

    def scalar(self, value: Any, ctx: _Context) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _Invalid(f"expected {self.expected()}, got {_describe(value)}")
        try:
            seconds = parse_slurm_time(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        if seconds == 0:
            raise _Invalid(f"{value!r} is a time limit of zero; a job needs at least a minute")
        return str(value).strip()

    def expected(self) -> str:
        return "a Slurm time (MM, HH:MM:SS, D-HH:MM:SS or UNLIMITED)"

    def schema(self) -> dict[str, Any]:
        forms = "|".join(p.pattern[1:-1] for p, _ in _TIME_FORMS)
        return {
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {
                    "type": "string",
                    "pattern": f"^(?:{forms}|[Uu][Nn][Ll][Ii][Mm][Ii][Tt][Ee][Dd]|"
                    "[Ii][Nn][Ff][Ii][Nn][Ii][Tt][Ee])$",
                },
            ]
        }


_SLURM_MEM = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)


@dataclass(frozen=True)
class SlurmMem(Kind):
    """Slurm's --mem: a number of megabytes, or with a K/M/G/T suffix."""

    def scalar(self, value: Any, ctx: _Context) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _Invalid(f"expected {self.expected()}, got {_describe(value)}")
        match = _SLURM_MEM.match(str(value).strip())
        if not match:
            raise _Invalid(
                f"{value!r} is not a Slurm memory size; write megabytes (4000) or a number with "
                "K, M, G or T (16G)"
            )
        if int(match.group(1)) == 0:
            raise _Invalid(
                "0 asks Slurm for all of a node's memory; write that explicitly with "
                "extra: ['--mem=0'] if you mean it"
            )
        return str(value).strip().upper()

    def expected(self) -> str:
        return "a Slurm memory size (16G, 4000, 512M)"

    def schema(self) -> dict[str, Any]:
        return {
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {"type": "string", "pattern": "^[0-9]*[1-9][0-9]*[KMGTkmgt]?$"},
            ]
        }


@dataclass(frozen=True)
class ByteSize(Kind):
    """A byte size as people write it (80GiB, 512MiB, 16G); stored as bytes."""

    def scalar(self, value: Any, ctx: _Context) -> int:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _Invalid(f"expected {self.expected()}, got {_describe(value)}")
        try:
            size = parse_size(value)
            if size > 0:
                parse_written_size(value)  # a bare number below 1 MiB: a missing unit
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        if size <= 0:
            raise _Invalid(f"must be more than zero bytes, got {value!r}")
        return size

    def expected(self) -> str:
        return "a size (80GiB, 512MiB, 16G)"

    def schema(self) -> dict[str, Any]:
        return {
            "anyOf": [
                {"type": "integer", "minimum": MIN_BARE_SIZE},
                {
                    "type": "string",
                    "pattern": r"^\s*\d+(\.\d+)?\s*([kKmMgGtT]([iI]?[bB])?|[bB])\s*$",
                },
                # A bare number of bytes, from 1 MiB (1048576) up.
                {"type": "string", "pattern": rf"^\s*0*{_AT_LEAST_1_MIB}(\.\d+)?\s*$"},
            ]
        }


# Whole numbers >= 1048576 (MIN_BARE_SIZE) as a regex: 8 digits or more, or 7 digits from
# 1048576 up, digit by digit.
_AT_LEAST_1_MIB = (
    r"(?:[1-9]\d{7,}|[2-9]\d{6}|1[1-9]\d{5}|10[5-9]\d{4}|1049\d{3}|1048[6-9]\d{2}"
    r"|10485[89]\d|104857[6-9])"
)


@dataclass(frozen=True)
class StrList(Kind):
    """A list of strings; `sbatch_flag` requires each to be one sbatch option (-x or --x=v)."""

    sbatch_flag: bool = False

    def convert(self, node: Node, path: str, out: _Collector, ctx: _Context) -> Any:
        if node.kind != "sequence":
            raise _Invalid(f"expected a list of strings, got {_describe(_plain(node))}")
        items: list[str] = []
        for i, item in enumerate(node.value):
            where = f"{path}[{i}]"
            if item.kind != "scalar" or not isinstance(item.value, str) or not item.value:
                out.add(item.line, where, f"expected a string, got {_describe(_plain(item))}")
                continue
            if self.sbatch_flag:
                if not item.value.startswith("-"):
                    out.add(item.line, where, f"{item.value!r} is not an sbatch option (-x, --x=v)")
                    continue
                if not _SBATCH_SAFE.match(item.value):
                    out.add(
                        item.line,
                        where,
                        f"{item.value!r} cannot go on an #SBATCH line: no double quotes, "
                        "backslashes or line breaks",
                    )
                    continue
            items.append(item.value)
        return tuple(items)

    def expected(self) -> str:
        return "a list of strings"

    def schema(self) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "string", "minLength": 1}
        if self.sbatch_flag:
            patterns = [{"pattern": "^-"}, {"pattern": _SBATCH_SAFE_JSON},
                        {"not": {"pattern": _managed_flags_json_pattern()}}]  # fmt: skip
            item = {"type": "string", "allOf": patterns}
        return {"type": "array", "items": item}


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Names a worker's env may not set. Bash's read-only and special variables: the batch script
# assigns env before `srun`, and bash refuses (UID: readonly variable) or ignores those.
_BASH_SPECIAL = frozenset((
    "UID", "EUID", "PPID", "BASHOPTS", "SHELLOPTS", "BASHPID", "GROUPS", "FUNCNAME", "RANDOM",
    "SRANDOM", "SECONDS", "LINENO", "HISTCMD", "EPOCHSECONDS", "EPOCHREALTIME", "DIRSTACK",
    "PIPESTATUS",
))  # fmt: skip
# Set by the batch script, the prologue, acb-run or Slurm for each worker: a value from job.yaml
# would be overwritten or, worse, point the worker at the wrong assigner or GPU. Tuning knobs
# (ACB_IDLE_MS, ACB_AUTO_LOG_LEVEL, ...) stay allowed.
_MANAGED_ENV = frozenset((
    "ACB_WORKER", "ACB_ASSIGNER", "ACB_RUN_DIR", "ACB_JOB_ID", "ACB_TOKEN", "ACB_TOKEN_FILE",
    "ACB_SOCKET_DIR", "ACB_ASSIGNERS_CONFIG", "ACB_CAMPAIGN", "ACB_BIN", "ACB_LEASE_ID",
    "ACB_AUTO", "CUDA_VISIBLE_DEVICES",
))  # fmt: skip


def reserved_env_name(name: str) -> str | None:
    """Why a worker env name may not be used, or None when it may."""
    if name in _BASH_SPECIAL or name.startswith("BASH_"):
        return "is a read-only or special bash variable"
    if name in _MANAGED_ENV or name.startswith("ACB_CAMPAIGN"):
        return "is set by acb-slurm for each worker (the batch script, acb-run or Slurm)"
    return None


@dataclass(frozen=True)
class EnvMap(Kind):
    """Environment variables: NAME -> string value (numbers are accepted and kept as text)."""

    def convert(self, node: Node, path: str, out: _Collector, ctx: _Context) -> Any:
        if node.kind != "mapping":
            raise _Invalid(f"expected a mapping NAME: value, got {_describe(_plain(node))}")
        env: dict[str, str] = {}
        for name, value in node.value.items():
            where = f"{path}.{name}"
            line = node.keys[name]
            if not _ENV_NAME.match(name):
                out.add(line, where, f"{name!r} is not an environment variable name")
                continue
            why = reserved_env_name(name)
            if why:
                out.add(line, where, f"{name} {why}; it cannot be set here")
                continue
            if value.kind != "scalar" or value.value is None or isinstance(value.value, bool):
                out.add(
                    value.line,
                    where,
                    f"expected a string, got {_describe(_plain(value))} (quote it: '...')",
                )
                continue
            if not isinstance(value.value, (str, int, float)):
                out.add(value.line, where, f"expected a string, got {_describe(value.value)}")
                continue
            text = str(value.value)
            if "\x00" in text:
                out.add(value.line, where, "must not contain a NUL character")
                continue
            env[name] = text
        return tuple(env.items())

    def expected(self) -> str:
        return "a mapping NAME: value"

    def schema(self) -> dict[str, Any]:
        reserved = [{"enum": sorted(_BASH_SPECIAL | _MANAGED_ENV)}, {"pattern": "^BASH_"},
                    {"pattern": "^ACB_CAMPAIGN"}]  # fmt: skip
        return {
            "type": "object",
            "propertyNames": {"pattern": _ENV_NAME.pattern, "not": {"anyOf": reserved}},
            "additionalProperties": {"type": ["string", "number"]},
        }


@dataclass(frozen=True)
class Command(Kind):
    """A command: a list of argv (run as is) or a string (a bash command line)."""

    def convert(self, node: Node, path: str, out: _Collector, ctx: _Context) -> Any:
        if node.kind == "scalar":
            if not isinstance(node.value, str) or not node.value.strip():
                raise _Invalid(f"expected {self.expected()}, got {_describe(node.value)}")
            if "\x00" in node.value:
                raise _Invalid("must not contain a NUL character")
            return node.value
        if node.kind != "sequence" or not node.value:
            raise _Invalid(f"expected {self.expected()}, got {_describe(_plain(node))}")
        argv: list[str] = []
        for i, item in enumerate(node.value):
            value = item.value if item.kind == "scalar" else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str) or (i == 0 and not value):
                out.add(item.line, f"{path}[{i}]", f"expected a string, got {_describe(value)}")
                continue
            if "\x00" in value:
                out.add(item.line, f"{path}[{i}]", "must not contain a NUL character")
                continue
            argv.append(value)
        return tuple(argv)

    def expected(self) -> str:
        return "a list of arguments or a command line string"

    def schema(self) -> dict[str, Any]:
        return {
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


@dataclass(frozen=True)
class ExistingPath(Kind):
    """A path to an existing file, relative to the job.yaml's directory; stored absolute."""

    def scalar(self, value: Any, ctx: _Context) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _Invalid(f"expected {self.expected()}, got {_describe(value)}")
        path = Path(os.path.expanduser(value))
        resolved = path if path.is_absolute() else ctx.base_dir / path
        if not resolved.is_file():
            raise _Invalid(f"{value!r} does not exist (looked for {resolved})")
        return str(resolved.resolve())

    def expected(self) -> str:
        return "a path to a file"

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": 1}


@dataclass(frozen=True)
class Section(Kind):
    """A mapping whose keys are the fields of a dataclass."""

    cls: type

    def convert(self, node: Node, path: str, out: _Collector, ctx: _Context) -> Any:
        if node.kind != "mapping":
            raise _Invalid(
                f"expected a mapping of {self.cls.__name__} fields, got {_describe(_plain(node))}"
            )
        return _build(self.cls, node, path, out, ctx)

    def expected(self) -> str:
        return "a mapping"

    def schema(self) -> dict[str, Any]:
        return _section_schema(self.cls)


@dataclass(frozen=True)
class ListOf(Kind):
    """A list of sections, each validated on its own."""

    item: Section
    min_items: int = 1

    def convert(self, node: Node, path: str, out: _Collector, ctx: _Context) -> Any:
        if node.kind != "sequence":
            raise _Invalid(f"expected a list, got {_describe(_plain(node))}")
        if len(node.value) < self.min_items:
            raise _Invalid(
                f"needs at least {self.min_items} entr{'y' if self.min_items == 1 else 'ies'}"
            )
        items = []
        for i, item in enumerate(node.value):
            where = f"{path}[{i}]"
            try:
                items.append(self.item.convert(item, where, out, ctx))
            except _Invalid as exc:
                out.add(item.line, where, str(exc))
        return tuple(items)

    def expected(self) -> str:
        return "a list"

    def schema(self) -> dict[str, Any]:
        return {"type": "array", "minItems": self.min_items, "items": self.item.schema()}


# ---------------------------------------------------------------------------------------------
# The sections


def spec_field(
    kind: Kind,
    doc: str,
    default: Any = None,
    *,
    required: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field that validation and the JSON Schema both read."""
    nullable = default is None and factory is None and not required
    meta = {"kind": kind, "doc": doc, "required": required, "nullable": nullable}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for defaults")
    if required:
        return field(metadata=meta)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Allocation:
    """What to ask Slurm for: one line of `#SBATCH` per field that is set."""

    name: str = spec_field(
        Str(
            sbatch_line=True,
            file_name="the job name is %x in allocation.output (default "
            "acb-%x-%j.out) and so part of a file name",
        ),
        "job name (--job-name); no '/': it is part of the output file's name (%x)",
        "acb-job",
    )
    partition: str | None = spec_field(Str(sbatch_line=True), "partition (--partition)")
    account: str | None = spec_field(Str(sbatch_line=True), "account to charge (--account)")
    nodes: int = spec_field(Int(1), "number of nodes (--nodes); one assigner runs on each", 1)
    ntasks_per_node: int = spec_field(Int(1), "tasks per node (--ntasks-per-node)", 1)
    cpus_per_task: int = spec_field(Int(1), "CPUs per task (--cpus-per-task)", 1)
    gpus_per_node: int = spec_field(Int(0), "GPUs per node (--gres=gpu:N); 0 for none", 0)
    gpu_type: str | None = spec_field(
        Str(pattern=r"[A-Za-z0-9][A-Za-z0-9._-]*", pattern_doc="letters, digits, '.', '_', '-'"),
        "GPU type for sites with typed GRES (--gres=gpu:TYPE:N), e.g. a100",
    )
    mem: str | None = spec_field(SlurmMem(), "memory per node (--mem), e.g. 64G")
    time: str | None = spec_field(SlurmTime(), "time limit (--time), e.g. 1-00:00:00")
    output: str | None = spec_field(
        PathStr(sbatch_line=True, slurm_pattern=True),
        "stdout file (--output); %j is the job id, %x the job name (not in directory names)",
        "acb-%x-%j.out",
    )
    error: str | None = spec_field(
        PathStr(sbatch_line=True, slurm_pattern=True), "stderr file (--error); default: output"
    )
    extra: tuple[str, ...] = spec_field(
        StrList(sbatch_flag=True), "more sbatch options, one per entry, e.g. --qos=high", ()
    )


@dataclass(frozen=True)
class Broker:
    """The per-node assigner: which policy, which GPUs, how long to wait for it."""

    policy: str = spec_field(Choice(known_policies, "policy"), "scheduling policy", "simple")
    gpus: int | None = spec_field(
        Int(1), "GPUs of each node the assigner may hand out; default all of gpus_per_node"
    )
    worker_memory: int | None = spec_field(
        ByteSize(), "estimated GPU memory of one worker (acb-run --memory), e.g. 10GiB"
    )
    virtual_gpus: int | None = spec_field(
        Int(1), "pretend each node has this many GPUs (machines without GPUs, tests)"
    )
    gpu_memory: int | None = spec_field(
        ByteSize(), "memory of each virtual GPU, e.g. 80GiB (with virtual_gpus); default 80GiB"
    )
    startup_timeout: int = spec_field(
        Int(1, 3600), "seconds to wait for every node's assigner to be ready", 60
    )
    time_slice: int = spec_field(
        Int(0, 86400),
        "seconds a holder keeps a GPU while others wait before it is asked to yield "
        "(acb-assigner --time-slice; auto-mode workers yield, gated ones finish); 0 = never",
        0,
    )
    run_root: str | None = spec_field(
        PathStr(),
        "directory under which the job's run dir <run_root>/<job id> is made; "
        "relative to the submit dir; default acb-runs",
    )


@dataclass(frozen=True)
class WorkerGroup:
    """Workers started by the batch script, each its own `srun` step under `acb-run`."""

    command: str | tuple[str, ...] = spec_field(
        Command(), "argv list (run as is) or a string (run by bash -c)", required=True
    )
    name: str = spec_field(Str(), "name prefix; each worker is <name>-<node>-<i>", "worker")
    per_node: int | None = spec_field(
        Int(1, MAX_WORKERS_PER_NODE), "workers on each node (default 1)"
    )
    per_gpu: int | None = spec_field(Int(1, MAX_WORKERS_PER_GPU), "workers per GPU of each node")
    mode: str = spec_field(
        Choice(lambda: WORKER_MODES, "mode"),
        "gate: acb-run --gate; auto: acb-run --auto (PyTorch); client: the command talks to the "
        "assigner itself",
        "gate",
    )
    gpus: int = spec_field(Int(1), "GPUs each worker holds at once (acb-run --gpus)", 1)
    env: tuple[tuple[str, str], ...] = spec_field(EnvMap(), "environment variables", ())
    workdir: str | None = spec_field(PathStr(), "working directory (default: the submit dir)")


@dataclass(frozen=True)
class JobSpec:
    """A whole job.yaml."""

    workers: tuple[WorkerGroup, ...] = spec_field(
        ListOf(Section(WorkerGroup)), "worker groups", required=True
    )
    # spec_field(factory=...) is a default_factory; ruff cannot see through the wrapper.
    allocation: Allocation = spec_field(  # noqa: RUF009
        Section(Allocation), "the Slurm allocation", factory=Allocation
    )
    broker: Broker = spec_field(  # noqa: RUF009
        Section(Broker), "the per-node GPU assigner", factory=Broker
    )
    campaign: str | None = spec_field(
        ExistingPath(), "campaign file read by acb-campaign workers (exported as ACB_CAMPAIGN)"
    )
    source: str = field(default="<memory>", metadata={"internal": True})

    # -- derived values used by rendering --------------------------------------------------

    @property
    def gpus_per_node(self) -> int:
        """GPUs each node's assigner hands out."""
        if self.broker.virtual_gpus:
            return self.broker.virtual_gpus
        return self.broker.gpus or self.allocation.gpus_per_node

    def workers_per_node(self, group: WorkerGroup) -> int:
        if group.per_gpu is not None:
            return group.per_gpu * self.gpus_per_node
        return group.per_node or 1


# Exclusive field pairs of a section: at most one of them may be given.
_EXCLUSIVE: dict[type, tuple[tuple[str, str], ...]] = {WorkerGroup: (("per_node", "per_gpu"),)}

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


def _spec_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _given(node: Node, key: str) -> bool:
    value = node.value.get(key)
    return value is not None and not (value.kind == "scalar" and value.value is None)


def _build(cls: type, node: Node, path: str, out: _Collector, ctx: _Context) -> Any:
    fields = {f.name: f for f in _spec_fields(cls)}
    values: dict[str, Any] = {}
    prefix = f"{path}." if path else ""
    for key, value_node in node.value.items():
        line = node.keys[key]
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.add(line, f"{prefix}{key}", f"unknown key{hint}; valid keys: {', '.join(fields)}")
            continue
        f = fields[key]
        if value_node.kind == "scalar" and value_node.value is None:
            if isinstance(f.metadata["kind"], Section):
                continue  # an empty section: its defaults
            if f.metadata["nullable"]:
                values[key] = None
            else:
                out.add(line, f"{prefix}{key}", f"needs a value ({f.metadata['kind'].expected()})")
            continue
        try:
            values[key] = f.metadata["kind"].convert(value_node, f"{prefix}{key}", out, ctx)
        except _Invalid as exc:
            out.add(value_node.line, f"{prefix}{key}", str(exc))
    missing = [n for n, f in fields.items() if f.metadata["required"] and n not in node.value]
    for name in missing:
        out.add(node.line, f"{prefix}{name}", f"is required ({fields[name].metadata['doc']})")
    for a, b in _EXCLUSIVE.get(cls, ()):
        if _given(node, a) and _given(node, b):
            out.add(
                node.keys[b],
                f"{prefix}{b}",
                f"give {prefix}{a} or {prefix}{b}, not both "
                f"({a}={_plain(node.value[a])}, {b}={_plain(node.value[b])})",
            )
    if missing or any(n not in values and n in node.value for n in fields):
        return None  # problems already recorded; the caller will raise
    return cls(**values)


def _cross_checks(spec: JobSpec, root: Node, out: _Collector) -> None:
    """Checks that span fields; each names both fields and their values."""

    def line_of(*keys: str | int) -> int:
        node = root
        line = root.line
        for key in keys:
            if node.kind == "mapping" and isinstance(key, str) and key in node.value:
                line = node.keys[key]
                node = node.value[key]
            elif node.kind == "sequence" and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.line
            else:
                break
        return line

    alloc, broker = spec.allocation, spec.broker
    if broker.gpus is not None and broker.virtual_gpus is None:
        if alloc.gpus_per_node == 0:
            out.add(
                line_of("broker", "gpus"),
                "broker.gpus",
                f"broker.gpus={broker.gpus} but allocation.gpus_per_node=0: ask Slurm for GPUs "
                "or use broker.virtual_gpus",
            )
        elif broker.gpus > alloc.gpus_per_node:
            out.add(
                line_of("broker", "gpus"),
                "broker.gpus",
                f"broker.gpus={broker.gpus} is more than allocation.gpus_per_node="
                f"{alloc.gpus_per_node}: the assigner can only hand out GPUs Slurm gave the job",
            )
    if broker.gpus is not None and broker.virtual_gpus is not None:
        out.add(
            line_of("broker", "gpus"),
            "broker.gpus",
            f"broker.gpus={broker.gpus} and broker.virtual_gpus={broker.virtual_gpus} contradict "
            "each other: virtual GPUs replace real ones; keep one",
        )
    if broker.gpu_memory is not None and broker.virtual_gpus is None:
        out.add(
            line_of("broker", "gpu_memory"),
            "broker.gpu_memory",
            "broker.gpu_memory is only used with broker.virtual_gpus (real GPUs report their own "
            "memory); set broker.virtual_gpus or remove it",
        )
    gpu_memory = broker.gpu_memory or parse_size("80GiB")
    if broker.virtual_gpus and broker.worker_memory and broker.worker_memory > gpu_memory:
        out.add(
            line_of("broker", "worker_memory"),
            "broker.worker_memory",
            f"broker.worker_memory={broker.worker_memory} bytes is more than broker.gpu_memory="
            f"{gpu_memory} bytes: no worker could ever be granted a GPU",
        )
    gpus = spec.gpus_per_node
    for i, group in enumerate(spec.workers):
        where = f"workers[{i}]"
        if group.mode in ("gate", "auto") and gpus == 0:
            out.add(
                line_of("workers", i, "mode"),
                f"{where}.mode",
                f"{where}.mode={group.mode} needs GPUs but allocation.gpus_per_node=0 and "
                "broker.virtual_gpus is not set",
            )
        if group.per_gpu is not None and gpus == 0:
            out.add(
                line_of("workers", i, "per_gpu"),
                f"{where}.per_gpu",
                f"{where}.per_gpu={group.per_gpu} but the job has no GPUs "
                "(allocation.gpus_per_node=0, no broker.virtual_gpus)",
            )
        if gpus and group.gpus > gpus:
            out.add(
                line_of("workers", i, "gpus"),
                f"{where}.gpus",
                f"{where}.gpus={group.gpus} is more than the {gpus} GPU(s) a node's assigner "
                "has (allocation.gpus_per_node / broker.virtual_gpus / broker.gpus)",
            )
        if group.mode != "gate" and group.gpus != 1:
            out.add(
                line_of("workers", i, "gpus"),
                f"{where}.gpus",
                f"{where}.gpus={group.gpus} only applies to mode=gate, not mode={group.mode}",
            )
    for i, flag in enumerate(alloc.extra):
        name = sbatch_flag_name(flag)
        managed = managed_flag_problem(flag)
        if managed:
            out.add(line_of("allocation", "extra", i), f"allocation.extra[{i}]", managed)
        elif (name in _MEM_FLAGS or _abbreviated(name, _MEM_FLAGS)) and alloc.mem is not None:
            out.add(
                line_of("allocation", "extra", i),
                f"allocation.extra[{i}]",
                f"allocation.extra[{i}]={flag!r} and allocation.mem={alloc.mem} contradict each "
                "other: Slurm takes only one of --mem, --mem-per-cpu and --mem-per-gpu; keep one",
            )
    if alloc.gpu_type is not None and alloc.gpus_per_node == 0:
        out.add(
            line_of("allocation", "gpu_type"),
            "allocation.gpu_type",
            f"allocation.gpu_type={alloc.gpu_type} but allocation.gpus_per_node=0: a GPU type "
            "needs GPUs; set allocation.gpus_per_node",
        )
    total = sum(spec.workers_per_node(g) for g in spec.workers)
    if total > MAX_WORKERS_PER_NODE:
        counts = ", ".join(
            f"workers[{i}].{'per_gpu' if g.per_gpu is not None else 'per_node'}="
            f"{g.per_gpu if g.per_gpu is not None else (g.per_node or 1)}"
            for i, g in enumerate(spec.workers)
        )
        out.add(
            line_of("workers"),
            "workers",
            f"{total} workers per node ({counts}, with {gpus} GPU(s) per node) is more than "
            f"{MAX_WORKERS_PER_NODE}: each is an srun step; use fewer or an acb-campaign",
        )


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
    root = _compose(text, file)
    out = _Collector(file)
    if root is None:
        raise SpecError([Problem(file, 1, "", "is empty; it needs at least `workers:`")])
    if root.kind != "mapping":
        raise SpecError(
            [
                Problem(
                    file,
                    root.line,
                    "",
                    "must be a mapping of sections "
                    f"(allocation, broker, workers, campaign), got {_describe(_plain(root))}",
                )
            ]
        )
    ctx = _Context(base_dir or Path.cwd())
    spec = _build(JobSpec, root, "", out, ctx)
    if spec is not None and not out.problems:
        spec = dataclasses.replace(spec, source=file)
        _cross_checks(spec, root, out)
    if out.problems or spec is None:
        raise SpecError(sorted(out.problems, key=lambda p: (p.line, p.field)))
    return spec


# ---------------------------------------------------------------------------------------------
# JSON Schema


def _section_schema(cls: type) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required = []
    for f in _spec_fields(cls):
        kind: Kind = f.metadata["kind"]
        sub = kind.schema()
        if f.metadata["nullable"]:
            sub = {"anyOf": [sub, {"type": "null"}]}
        sub = {"description": f.metadata["doc"], **sub}
        if f.default is not dataclasses.MISSING and f.default is not None:
            default = f.default
            if dataclasses.is_dataclass(default):
                default = None
            elif isinstance(default, tuple):
                default = [list(x) if isinstance(x, tuple) else x for x in default]
            if default is not None:
                sub["default"] = default
        props[f.name] = sub
        if f.metadata["required"]:
            required.append(f.name)
    out: dict[str, Any] = {
        "type": "object",
        "description": (cls.__doc__ or "").strip(),
        "additionalProperties": False,
        "properties": props,
    }
    if required:
        out["required"] = required
    exclusive = _EXCLUSIVE.get(cls, ())
    if exclusive:
        out["allOf"] = [
            {
                "not": {
                    "required": [a, b],
                    "properties": {a: {"type": "integer"}, b: {"type": "integer"}},
                }
            }
            for a, b in exclusive
        ]
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of job.yaml, from the same fields validation uses."""
    schema = _section_schema(JobSpec)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://acb-slurm.invalid/schema/job.json",
        "title": "acb-slurm job.yaml",
        **schema,
    }


def command_argv(command: str | Sequence[str]) -> list[str]:
    """The argv a worker command runs as: a list as is, a string through `bash -c`."""
    if isinstance(command, str):
        return ["bash", "-c", command]
    return list(command)


def check_value(cls: type, name: str, value: Any, label: str, base_dir: Path | None = None) -> Any:
    """Validate one value as field `name` of section `cls` (command-line options use the same
    rules as job.yaml); SpecError names `label` (e.g. the option) when it is wrong."""
    f = next(f for f in _spec_fields(cls) if f.name == name)
    out = _Collector("command line")
    ctx = _Context(base_dir or Path.cwd())
    try:
        result = f.metadata["kind"].convert(Node(value, 0, "scalar"), label, out, ctx)
    except _Invalid as exc:
        out.add(0, label, str(exc))
        result = None
    if out.problems:
        raise SpecError(out.problems)
    return result
