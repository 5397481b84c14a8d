"""Pydantic models of spec files: validation with every error at once, at file:line and field.

A spec section is a `SpecModel` (strict types, unknown keys refused, frozen). `validate` runs
pydantic over a `Document`'s plain values and turns each pydantic error into a `Problem`: the
location pydantic reports becomes a line (from the Document's marks) and a dotted field, and the
error becomes a sentence that says what was expected and what was given (a close match for an
unknown key, the valid keys, the field's description for a missing one). Validators raise
ValueError with their own sentence, which is used as it is.

`json_schema` writes a model's JSON Schema (draft 2020-12) and `check_field` validates one value
as one field (command-line options use the same rules as the file).
"""

from __future__ import annotations

import difflib
import enum
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticUndefined

from acb_slurm.specfile.problems import Problem, sorted_problems
from acb_slurm.specfile.yamlfile import Document, Loc, dotted

M = TypeVar("M", bound="SpecModel")


class SpecModel(BaseModel):
    """A section of a spec file: strict types, unknown keys refused, immutable once valid.

    A section that is written but left empty (`broker:`) takes its defaults.
    """

    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, validate_by_alias=True, validate_by_name=False
    )

    @classmethod
    def fields_by_key(cls) -> dict[str, FieldInfo]:
        """The keys the section takes (field aliases where given), with their fields."""
        return {f.alias or name: f for name, f in cls.model_fields.items()}

    @classmethod
    @functools.cache
    def section_keys(cls) -> frozenset[str]:
        """The keys whose values are sections (models) themselves."""
        return frozenset(k for k in cls.fields_by_key() if model_at(cls, (k,)) is not None)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_take_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        sections = cls.section_keys()
        return {k: v for k, v in data.items() if not (v is None and k in sections)}


def describe(value: Any) -> str:
    """A value as messages name it: a string ('x'), a number (3), a list, ..."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list | tuple):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def one_of(names: Sequence[str]) -> str:
    """Choices in a message: 'a or b', 'a, b, c'."""
    return " or ".join(names) if len(names) == 2 else ", ".join(names)


def unknown_choice(what: str, value: Any, known: Sequence[str]) -> str:
    """The message for a value that is not one of `known` names, with a close match."""
    close = difflib.get_close_matches(value, known, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {value!r}{hint}; known: {one_of(known)}"


def _key_doc(key: str, field: FieldInfo) -> str:
    """A key with what it means and its default: retries (how many ...; default 2)."""
    words = [field.description] if field.description else []
    default = field.default
    if default not in (PydanticUndefined, None, "") and not isinstance(default, BaseModel):
        if isinstance(default, float) and default.is_integer():
            default = int(default)
        words.append(f"default {default}")
    return f"{key} ({'; '.join(words)})" if words else key


def unknown_key(key: str, model: type[SpecModel], *, long: bool) -> str:
    """The message for a key `model` does not take: a close match and the valid keys (`long`:
    each with its description and default)."""
    keys = model.fields_by_key()
    close = difflib.get_close_matches(key, list(keys), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if long:
        valid = ", ".join(_key_doc(k, f) for k, f in keys.items())
        return f"unknown key {key!r}{hint}; valid keys: {valid}"
    return f"unknown key{hint}; valid keys: {', '.join(keys)}"


# -- where a location leads in a model --------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """The model or item type inside Annotated[...], X | None and tuple[X, ...]."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def model_at(root: type[SpecModel], loc: Loc) -> type[SpecModel] | None:
    """The section model found at `loc` under `root` (None when `loc` leads elsewhere)."""
    current: Any = root
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            if typing.get_origin(current) is not tuple:
                return None
            current = typing.get_args(current)[0]
        elif isinstance(current, type) and issubclass(current, SpecModel):
            field = current.fields_by_key().get(part)
            if field is None:
                return None
            current = field.annotation
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, SpecModel) else None


# -- pydantic errors as sentences ------------------------------------------------------------

_TYPE_WORDS = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "string_type": "a string",
    "bool_type": "true or false",
    "float_type": "a number",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a mapping",
    "path_type": "a path",
}


def _sentence(error: Mapping[str, Any], root: type[SpecModel], long: bool) -> str:
    kind = error["type"]
    loc = tuple(error["loc"])
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "extra_forbidden":
        model = model_at(root, loc[:-1])
        if model is not None:
            return unknown_key(str(loc[-1]), model, long=long)
        return "unknown key"
    if kind == "missing":
        model = model_at(root, loc[:-1])
        field = model.fields_by_key().get(str(loc[-1])) if model is not None else None
        doc = f" ({field.description})" if field is not None and field.description else ""
        return f"is required but missing{doc}"
    if kind in ("model_type", "model_attributes_type"):
        model = model_at(root, loc)
        keys = f" with keys {', '.join(model.fields_by_key())}" if model is not None else ""
        return f"must be a mapping{keys}, got {describe(value)}"
    if kind in ("literal_error", "enum"):
        known = [str(getattr(k, "value", k)) for k in _expected(root, loc)]
        if known:
            return unknown_choice(str(loc[-1]) if loc else "value", value, known)
        return f"must be {ctx.get('expected', 'one of the known values')}, got {value!r}"
    if kind == "too_short":
        least = ctx.get("min_length", 1)
        return f"needs at least {least} entr{'y' if least == 1 else 'ies'}"
    if kind in _TYPE_WORDS:
        return f"expected {_TYPE_WORDS[kind]}, got {describe(value)}"
    return str(error["msg"])


def _expected(root: type[SpecModel], loc: Loc) -> list[Any]:
    """The allowed values of a Literal or Enum field at `loc`."""
    model = model_at(root, loc[:-1])
    field = model.fields_by_key().get(str(loc[-1])) if model is not None and loc else None
    if field is None:
        return []
    annotation = _unwrap(field.annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return list(annotation)
    return []


Labeller = Callable[[Loc], str]


def problems_of(
    exc: ValidationError,
    document: Document,
    root: type[SpecModel],
    *,
    label: Labeller = dotted,
    long_keys: bool = False,
) -> list[Problem]:
    """Each pydantic error as a Problem at the line its location was written on."""
    out = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            line = document.line(loc, key=True)
        elif error["type"] == "missing":
            line = document.line(loc[:-1])
        elif loc and loc[-1] == "[key]":
            loc = loc[:-1]
            line = document.line(loc, key=True)
        else:
            line = document.line(loc)
        out.append(Problem(document.file, line, label(loc), _sentence(error, root, long_keys)))
    return out


def validate(
    model: type[M],
    document: Document,
    *,
    context: Mapping[str, Any] | None = None,
    label: Labeller = dotted,
    long_keys: bool = False,
) -> tuple[M | None, list[Problem]]:
    """Validate a Document as `model`: the model (None if invalid) and every problem found,
    the Document's own (duplicate keys) included, sorted by line."""
    problems = list(document.problems)
    try:
        result: M | None = model.model_validate(document.data, context=dict(context or {}))
    except ValidationError as exc:
        problems += problems_of(exc, document, model, label=label, long_keys=long_keys)
        result = None
    return (result if not problems else None), sorted_problems(problems)


def check_field(
    model: type[SpecModel],
    name: str,
    value: Any,
    label: str,
    *,
    file: str = "command line",
    base_dir: Path | None = None,
) -> tuple[Any, list[Problem]]:
    """Validate one value as field `name` of `model`, the rules of the file applied to, e.g., a
    command-line option: the value and the problems, each named `label` (the option)."""
    field = model.model_fields[name]
    annotation: Any = field.annotation
    if field.metadata:
        annotation = Annotated[annotation, *field.metadata]
    adapter: TypeAdapter[Any] = TypeAdapter(annotation, config=ConfigDict(strict=True))
    try:
        return adapter.validate_python(value, context={"base_dir": base_dir or Path.cwd()}), []
    except ValidationError as exc:
        document = Document(file, value)
        out = []
        for problem in problems_of(exc, document, model):
            out.append(Problem(file, 0, label, problem.message))
        return None, out


# -- JSON Schema ------------------------------------------------------------------------------


class _Schema(GenerateJsonSchema):
    """Pydantic's JSON Schema without a title on every field (the description says it)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def json_schema(model: type[SpecModel], *, schema_id: str, title: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a spec file whose root is `model`."""
    schema = model.model_json_schema(by_alias=True, schema_generator=_Schema)
    schema.pop("title", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": schema_id,
        "title": title,
        **schema,
    }
