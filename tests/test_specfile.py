"""The spec-file machinery both spec files share (acb_slurm.specfile): YAML with line marks,
pydantic errors at file:line and field, and `acb-run` kept free of it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from acb_slurm.specfile.fields import reserved_env_name, whole
from acb_slurm.specfile.model import SpecModel, unknown_key, validate
from acb_slurm.specfile.problems import InvalidSpec, Problem
from acb_slurm.specfile.yamlfile import dotted, read_yaml


def read(text: str):  # type: ignore[no-untyped-def]
    document = read_yaml(textwrap.dedent(text), "f.yaml", what="f.yaml", depth_hint="shallow")
    assert document is not None
    return document


def test_values_keep_the_lines_of_values_and_keys() -> None:
    document = read(
        """\
        a:
          b: 1
        list:
          - x
          - {c: [1, 2]}
        """
    )
    assert document.data == {"a": {"b": 1}, "list": ("x", {"c": (1, 2)})}
    assert document.line(("a", "b")) == 2
    assert document.line(("list",), key=True) == 3
    assert document.line(("list",)) == 4  # the value starts on the next line
    assert document.line(("list", 1, "c", 1)) == 5
    assert document.line(("list", 1, "missing")) == 5  # the nearest enclosing value
    assert document.value(("list", 1, "c", 0)) == 1
    assert dotted(("list", 1, "c", 0)) == "list[1].c[0]"


def test_duplicate_and_non_string_keys_are_problems_not_exceptions() -> None:
    document = read("a: 1\n3: x\na: 2\n")
    assert document.data == {"a": 1}
    assert [str(p) for p in document.problems] == [
        "f.yaml:2: 3: keys must be strings (names of fields)",
        "f.yaml:3: a: duplicate key, given twice (first on line 1); keep one",
    ]


def test_base_60_numbers_stay_text() -> None:
    assert read("t: 10:30\nu: '7'\nv: 7\nw: 1:30.5\n").data == {
        "t": "10:30",
        "u": "7",
        "v": 7,
        "w": "1:30.5",
    }


def test_yaml_that_is_refused_raises_with_every_tag() -> None:
    with pytest.raises(InvalidSpec) as info:
        read("a: !!str x\nb: !x y\n")
    assert [(p.line, p.field) for p in info.value.problems] == [(1, "a"), (2, "b")]
    assert "f.yaml holds plain values only" in str(info.value)


class Inner(SpecModel):
    """A section."""

    count: whole(1, 5) = 1  # type: ignore[valid-type]


class Outer(SpecModel):
    """A document."""

    name: str
    inner: Inner = Inner()
    inners: tuple[Inner, ...] = ()


def test_pydantic_errors_become_problems_at_their_lines() -> None:
    document = read(
        """\
        nmae: x
        inner:
          count: 9
        inners:
          - count: yes
          - cuont: 2
        """
    )
    model, problems = validate(Outer, document)
    assert model is None
    assert [str(p) for p in problems] == [
        "f.yaml:1: name: is required but missing",
        "f.yaml:1: nmae: unknown key (did you mean 'name'?); valid keys: name, inner, inners",
        "f.yaml:3: inner.count: must be at most 5, got 9 (a whole number from 1 to 5)",
        "f.yaml:5: inners[0].count: expected a whole number, got a boolean (true)",
        "f.yaml:6: inners[1].cuont: unknown key (did you mean 'count'?); valid keys: count",
    ]


def test_a_valid_document_gives_the_model() -> None:
    model, problems = validate(Outer, read("name: x\ninner:\ninners: [{count: 2}]\n"))
    assert problems == []
    assert model == Outer(name="x", inners=(Inner(count=2),))


def test_unknown_key_long_form_lists_descriptions_and_defaults() -> None:
    message = unknown_key("cnt", Inner, long=True)
    assert message == "unknown key 'cnt' (did you mean 'count'?); valid keys: count (default 1)"


def test_reserved_env_names() -> None:
    assert reserved_env_name("UID") and reserved_env_name("BASH_ENV")
    assert reserved_env_name("UID", bash=False) is None
    assert reserved_env_name("CUDA_VISIBLE_DEVICES", bash=False)
    assert reserved_env_name("ACB_CAMPAIGN_STAGE", bash=False)
    assert reserved_env_name("ACB_IDLE_MS") is None


def test_problem_without_line_or_field() -> None:
    assert str(Problem("f", 0, "", "gone")) == "f: gone"
    assert str(Problem("f", 3, "a.b", "bad")) == "f:3: a.b: bad"


def test_acb_run_does_not_import_pydantic_or_the_spec_modules() -> None:
    # acb-run starts every worker: it must not pay for pydantic (nor for YAML and the specs).
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "acb_slurm.launcher.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert "acb_slurm.launcher.cli" in imported or "acb_slurm.launcher" in imported, imported
    heavy = [m for m in imported if m.split(".")[0] in ("pydantic", "pydantic_core", "yaml")]
    specs = [m for m in imported if m.startswith(("acb_slurm.specfile", "acb_slurm.slurm.spec"))]
    assert not heavy and not specs, heavy + specs


def test_the_defaults_module_imports_nothing() -> None:
    code = (
        "import sys, acb_slurm.defaults; print(sorted(m for m in sys.modules if 'pydantic' in m))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
