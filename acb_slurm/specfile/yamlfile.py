"""YAML with line marks: plain values for validation, and where each value and key was written.

PyYAML's composer keeps a mark (line) on every node; `read_yaml` turns the node tree into plain
Python values (mappings as dicts, sequences as tuples, so that frozen models accept them as they
are) and records the line of every value and of every mapping key by its location, the tuple of
keys and indexes that pydantic reports errors under: ("workers", 0, "env", "NAME").

The composer is hardened, since spec files come from people and from other programs: YAML tags
are refused (not silently dropped), merge keys are refused, a value that contains itself is
refused, nesting is bounded, and aliases may add at most MAX_ALIAS_VALUES values ("billion
laughs" alias bombs are refused after a few thousand values instead of being expanded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from acb_slurm.specfile.problems import InvalidSpec, Problem

#: Values that YAML aliases (*name) may add to a spec file, all aliases together: plenty to share
#: a command or an env mapping between entries, far too few for an alias bomb ("billion laughs":
#: nested anchors that expand to billions of values).
MAX_ALIAS_VALUES = 10_000
#: Nesting a spec file may have (job.yaml's own fields are at most 5 levels deep); deeper is
#: refused before it reaches Python's recursion limit.
MAX_YAML_DEPTH = 32

Loc = tuple[str | int, ...]

_MERGE_TAG = "tag:yaml.org,2002:merge"
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def dotted(loc: Loc) -> str:
    """A location as people read it: ("workers", 0, "env", "A") -> workers[0].env.A."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass(frozen=True)
class Document:
    """A spec file's plain values, with the line of each value and key by location."""

    file: str
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)  # location -> line of the value
    key_lines: dict[Loc, int] = field(default_factory=dict)  # location -> line of its key
    problems: list[Problem] = field(default_factory=list)  # duplicate keys, non-string keys

    def line(self, loc: Loc, *, key: bool = False) -> int:
        """The line of the value at `loc` (of its key, with key=True, when it has one); for a
        location that was not written, the line of the nearest enclosing value."""
        loc = tuple(loc)
        if key and loc in self.key_lines:
            return self.key_lines[loc]
        while loc not in self.lines and loc:
            loc = loc[:-1]
        return self.lines.get(loc, 0)

    def value(self, loc: Loc) -> Any:
        """The plain value at `loc`, or None when there is none."""
        value = self.data
        for part in loc:
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                return None
        return value


def _tag_as_written(tag: str) -> str:
    """A resolved tag as people write it: tag:yaml.org,2002:str -> !!str."""
    prefix = "tag:yaml.org,2002:"
    return "!!" + tag[len(prefix) :] if tag.startswith(prefix) else tag


class _Loader(yaml.SafeLoader):
    """SafeLoader whose composer refuses YAML tags, merge keys, values that contain themselves
    and deep nesting, and bounds how many values aliases may add (all with file, line, field).

    Tags are refused rather than dropped: spec files hold plain values, and a tag (`!!python/...`)
    would otherwise be ignored silently and the tagged value used. Aliases are counted as they
    are composed, by the size of what they stand for, so an alias bomb is refused after a few
    thousand values instead of being expanded.
    """

    def __init__(self, text: str, file: str, what: str, depth_hint: str) -> None:
        super().__init__(text)
        self.file = file
        self.what = what
        self.depth_hint = depth_hint
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

    def refuse(self, line: int, field: str, message: str) -> InvalidSpec:
        return InvalidSpec([*self.problems, Problem(self.file, line, field, message)])

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
                f"nested more than {MAX_YAML_DEPTH} levels deep; {self.depth_hint}: look for "
                "unclosed or stray brackets",
            )
        tag = getattr(event, "tag", None)
        if tag is not None:
            self.problems.append(
                Problem(
                    self.file,
                    line,
                    field,
                    f"YAML tag {_tag_as_written(tag)!r} is not allowed: {self.what} holds plain "
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
                    f"YAML merge keys (<<) are not supported in {self.what}: write the fields out "
                    "(an alias can still stand for a whole value, e.g. env: *common)",
                )
            )
        return node


class _Builder:
    """Turns composed nodes into plain values, recording lines; collects key problems."""

    def __init__(self, loader: _Loader, file: str) -> None:
        self.loader = loader
        self.file = file
        self.lines: dict[Loc, int] = {}
        self.key_lines: dict[Loc, int] = {}
        self.problems: list[Problem] = []

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines[loc] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self.scalar(key_node)
                key_line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    where = dotted((*loc, str(key)))
                    message = "keys must be strings (names of fields)"
                    self.problems.append(Problem(self.file, key_line, where, message))
                    continue
                if key in out:
                    first = self.key_lines[(*loc, key)]
                    message = f"duplicate key, given twice (first on line {first}); keep one"
                    self.problems.append(Problem(self.file, key_line, dotted((*loc, key)), message))
                    continue
                self.key_lines[(*loc, key)] = key_line
                out[key] = self.build(value_node, (*loc, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return tuple(self.build(n, (*loc, i)) for i, n in enumerate(node.value))
        return self.scalar(node)

    def scalar(self, node: yaml.Node) -> Any:
        # YAML 1.1 reads 10:30 as the sexagesimal number 630; YAML 1.2 and people read text
        # (a Slurm time, a duration), so it is kept as written.
        if node.tag in _NUMBER_TAGS and ":" in str(node.value):
            return str(node.value)
        return self.loader.construct_object(node, deep=True)


def read_yaml(text: str, file: str, *, what: str, depth_hint: str) -> Document | None:
    """Parse YAML text into a Document (None for an empty one).

    `what` names the kind of file in messages ("job.yaml"); `depth_hint` says how deep such a
    file goes. Raises InvalidSpec for text that is not YAML or uses what spec files refuse (tags,
    merge keys, alias bombs, deep nesting); duplicate and non-string keys are left in the
    Document's problems, so that they are reported with the validation's.
    """
    loader = _Loader(text, file, what, depth_hint)
    try:
        root = loader.get_single_node()
        if loader.problems:
            raise InvalidSpec(loader.problems)
        if root is None:
            return None
        builder = _Builder(loader, file)
        data = builder.build(root, ())
        return Document(file, data, builder.lines, builder.key_lines, builder.problems)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        what_went_wrong = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise InvalidSpec([Problem(file, line, "", f"not valid YAML: {what_went_wrong}")]) from None
    except yaml.YAMLError as exc:
        raise InvalidSpec([Problem(file, 0, "", f"not valid YAML: {exc}")]) from None
    finally:
        loader.dispose()
