"""Field types the spec files share: whole numbers, text, names, byte sizes, environment variables.

Each rule is `Annotated` metadata on pydantic's strict type: a validator whose ValueError says
what to write, and the JSON Schema that describes the same rule. The factories return that
metadata (a `Rules`), so a spec module declares its field types as real type aliases that type
checkers understand, e.g. `Positive: TypeAlias = Annotated[int, whole_number(1)]`.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeAlias

from annotated_types import GroupedMetadata
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    GetCoreSchemaHandler,
    PlainValidator,
    WithJsonSchema,
)
from pydantic_core import CoreSchema

from acb_slurm.specfile.model import describe
from acb_slurm.units import MIN_BARE_SIZE, parse_size, parse_written_size


class Rules(GroupedMetadata):
    """Several pieces of `Annotated` metadata given as one (pydantic unpacks them in order):
    `Annotated[int, Rules(a, b)]` validates like `Annotated[int, a, b]`."""

    __slots__ = ("_items",)

    def __init__(self, *items: Any) -> None:
        self._items = items

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __repr__(self) -> str:
        return f"Rules{self._items!r}"


def whole_number(minimum: int, maximum: int | None = None) -> Rules:
    """For `Annotated[int, ...]`: a whole number from `minimum` (to `maximum`); booleans are not
    numbers here."""
    span = f" (a whole number from {minimum} to {maximum})" if maximum is not None else ""

    def check(value: int) -> int:
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}{span}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum}, got {value}{span}")
        return value

    schema: dict[str, Any] = {"type": "integer", "minimum": minimum}
    if maximum is not None:
        schema["maximum"] = maximum
    return Rules(AfterValidator(check), WithJsonSchema(schema))


def whole(minimum: int, maximum: int | None = None) -> Any:
    """The type `Annotated[int, whole_number(minimum, maximum)]`, for annotations built at run
    time (a type checker cannot read a call as a type: declare aliases with `whole_number`)."""
    return Annotated[int, whole_number(minimum, maximum)]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


#: Text with something in it (not only spaces) and no NUL character.
NOT_BLANK = AfterValidator(_not_blank)
Text: TypeAlias = Annotated[
    str, NOT_BLANK, WithJsonSchema({"type": "string", "minLength": 1, "pattern": r"\S"})
]


def name_matching(pattern: str, allowed: str) -> Rules:
    """For `Annotated[str, ...]`: text whose whole value matches the regex `pattern`; `allowed`
    says what it allows."""

    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(f"{value!r} is not valid here: {allowed}")
        return value

    schema = {"type": "string", "minLength": 1, "pattern": f"^(?:{pattern})$"}
    return Rules(NOT_BLANK, AfterValidator(check), WithJsonSchema(schema))


def _at_least_one(items: Any) -> Any:
    if not items:
        raise ValueError("needs at least 1 entry")
    return items


def non_empty() -> Rules:
    """For `Annotated[tuple[X, ...], ...]`: a list that needs at least one entry."""
    return Rules(AfterValidator(_at_least_one), Field(json_schema_extra={"minItems": 1}))


# -- byte sizes ------------------------------------------------------------------------------

# Whole numbers >= 1048576 (MIN_BARE_SIZE) as a regex: 8 digits or more, or 7 digits from
# 1048576 up, digit by digit.
_AT_LEAST_1_MIB = (
    r"(?:[1-9]\d{7,}|[2-9]\d{6}|1[1-9]\d{5}|10[5-9]\d{4}|1049\d{3}|1048[6-9]\d{2}"
    r"|10485[89]\d|104857[6-9])"
)
_SIZE_SCHEMA: list[dict[str, Any]] = [
    {"type": "integer", "minimum": MIN_BARE_SIZE},
    {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([kKmMgGtT]([iI]?[bB])?|[bB])\s*$"},
    # A bare number of bytes, from 1 MiB (1048576) up.
    {"type": "string", "pattern": rf"^\s*0*{_AT_LEAST_1_MIB}(\.\d+)?\s*$"},
]


def byte_size(*, zero: str = "") -> Rules:
    """For `Annotated[int, ...]`: a byte size as people write it (80GiB, 512MiB, 16G), kept as
    bytes (units.py's rules: a number below 1 MiB without a unit is a missing unit). Zero is
    refused unless `zero` says what it means."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(f"expected a size (80GiB, 512MiB, 16G), got {describe(value)}")
        size = parse_size(value)  # ValueError names the accepted forms
        if size > 0:
            parse_written_size(value)  # a bare number below 1 MiB: a missing unit
        elif not zero:
            raise ValueError(f"must be more than zero bytes, got {value!r}")
        return size

    forms = [*_SIZE_SCHEMA, {"const": 0}, {"type": "string", "pattern": r"^\s*0+\s*$"}]
    schema = {"anyOf": forms if zero else _SIZE_SCHEMA}
    return Rules(PlainValidator(check), WithJsonSchema(schema))


# -- environment variables --------------------------------------------------------------------

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Bash's read-only and special variables: the batch script assigns a worker's env before `srun`,
# and bash refuses (UID: readonly variable) or ignores those.
BASH_SPECIAL = frozenset((
    "UID", "EUID", "PPID", "BASHOPTS", "SHELLOPTS", "BASHPID", "GROUPS", "FUNCNAME", "RANDOM",
    "SRANDOM", "SECONDS", "LINENO", "HISTCMD", "EPOCHSECONDS", "EPOCHREALTIME", "DIRSTACK",
    "PIPESTATUS",
))  # fmt: skip
# Set by the batch script, the prologue, acb-run, the campaign worker or Slurm for each worker
# and stage: a value from a spec file would be overwritten or, worse, point the worker at the
# wrong assigner or GPU. Tuning knobs (ACB_IDLE_MS, ACB_AUTO_LOG_LEVEL, ...) stay allowed.
MANAGED_ENV = frozenset((
    "ACB_WORKER", "ACB_ASSIGNER", "ACB_RUN_DIR", "ACB_JOB_ID", "ACB_TOKEN", "ACB_TOKEN_FILE",
    "ACB_SOCKET_DIR", "ACB_ASSIGNERS_CONFIG", "ACB_CAMPAIGN", "ACB_BIN", "ACB_LEASE_ID",
    "ACB_AUTO", "CUDA_VISIBLE_DEVICES",
))  # fmt: skip
_MANAGED_PREFIX = "ACB_CAMPAIGN"  # ACB_CAMPAIGN_ITEM, _STAGE, _ATTEMPT


def reserved_env_name(name: str, *, bash: bool = True) -> str | None:
    """Why an env name may not be set in a spec file, or None when it may (`bash`: the values
    are assigned by a bash script, so bash's special variables are refused too)."""
    if bash and (name in BASH_SPECIAL or name.startswith("BASH_")):
        return "is a read-only or special bash variable"
    if name in MANAGED_ENV or name.startswith(_MANAGED_PREFIX):
        return (
            "is set by acb-slurm for each worker (the batch script, acb-run, the campaign worker "
            "or Slurm)"
        )
    return None


def _env_name(*, bash: bool) -> Callable[[str], str]:
    def check(name: str) -> str:
        if not ENV_NAME.match(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        why = reserved_env_name(name, bash=bash)
        if why:
            raise ValueError(f"{name} {why}; it cannot be set here")
        return name

    return check


def _env_value(*, booleans: bool) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) and booleans:
            return "true" if value else "false"
        if value is None or isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"expected a string, got {describe(value)} (quote it: '...')")
        if "\x00" in str(value):
            raise ValueError("must not contain a NUL character")
        return str(value)

    return check


class _NamesAndValues:
    """Metadata for `dict[str, str]`: the same mapping with its keys validated as `name` and its
    values as `value` (both `Annotated[str, ...]` built at run time)."""

    __slots__ = ("name", "value")

    def __init__(self, name: Any, value: Any) -> None:
        self.name = name
        self.value = value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return handler.generate_schema(types.GenericAlias(dict, (self.name, self.value)))


def env_map(
    *, bash: bool, booleans: bool, value_check: Callable[[str], str] | None = None
) -> Rules:
    """For `Annotated[dict[str, str], ...]`: environment variables NAME: value; numbers are kept
    as text, `booleans` as true/false. `bash`: the values are assigned by a bash script (its
    special variables are refused)."""
    reserved: list[dict[str, Any]] = [{"enum": sorted(MANAGED_ENV)}, {"pattern": "^ACB_CAMPAIGN"}]
    if bash:
        reserved += [{"enum": sorted(BASH_SPECIAL)}, {"pattern": "^BASH_"}]
    values = ["string", "number", "boolean"] if booleans else ["string", "number"]
    schema = {
        "type": "object",
        "propertyNames": {"pattern": ENV_NAME.pattern, "not": {"anyOf": reserved}},
        "additionalProperties": {"type": values},
    }
    checks: list[Any] = [BeforeValidator(_env_value(booleans=booleans))]
    if value_check is not None:
        checks.append(AfterValidator(value_check))
    name = Annotated[str, AfterValidator(_env_name(bash=bash))]
    value = Annotated[str, Rules(*checks)]
    return Rules(_NamesAndValues(name, value), WithJsonSchema(schema))
