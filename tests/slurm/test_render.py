"""Rendering: golden files, every script passes bash -n and shellcheck, hostile values stay quoted.

Re-record the golden files after an intended template change:
    ACB_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/slurm/test_render.py
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from acb_slurm.slurm.errors import RenderError
from acb_slurm.slurm.render import (
    PrologueOptions,
    make_environment,
    render_batch,
    render_prologue,
    sbatch_value,
)
from acb_slurm.slurm.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
BIN = "/opt/acb/bin"

HOSTILE_VALUES = [
    "it's",
    'say "hi"',
    "$(touch /tmp/acb-pwned)",
    "`touch /tmp/acb-pwned`",
    "a; rm -rf /tmp/acb-pwned",
    "line one\nline two",
    "${HOME} $HOME \\n",
    "--not-a-flag",
    "*",
    "",
]

HOSTILE_JOB = textwrap.dedent(
    """\
    allocation:
      name: "name with spaces; $(x) `y` 'q'"
      gpus_per_node: 1
      output: "/tmp/out dir/%x-%j.out"
    broker:
      virtual_gpus: 1
      gpu_memory: 8GiB
      run_root: "/tmp/runs; $(x)"
    workers:
      - name: "w'$(id)`id`;\\n\\"x\\""
        command: ["/bin/echo", "it's", "$(id)", "`id`", "a;b", "multi\\nline", "\\"q\\""]
        per_gpu: 2
        workdir: "/tmp/work 'dir'"
        env:
          HOSTILE: "$(id) `id` 'x' \\"y\\" ; \\n next"
      - name: shell
        command: "echo \\"$ACB_WORKER\\" > out.txt"
        mode: client
    """
)


def _example(name: str) -> str:
    return (REPO / "examples" / "slurm" / name).read_text(encoding="utf-8")


CASES = {
    "gate-virtual": lambda: render_batch(
        parse_spec(_example("gate-virtual.yaml"), "examples/slurm/gate-virtual.yaml"), bin_dir=BIN
    ),
    "two-nodes": lambda: render_batch(
        parse_spec(_example("two-nodes.yaml"), "examples/slurm/two-nodes.yaml"), bin_dir=BIN
    ),
    "real-gpus": lambda: render_batch(
        parse_spec(_example("real-gpus.yaml"), "examples/slurm/real-gpus.yaml"), bin_dir=BIN
    ),
    "hostile": lambda: render_batch(parse_spec(HOSTILE_JOB, "hostile.yaml"), bin_dir=BIN),
    "auto-mode": lambda: render_batch(
        parse_spec(
            "allocation: {gpus_per_node: 2, account: lab, partition: gpu, mem: 16G,"
            " error: err-%j.txt, extra: ['--qos=high', '--comment=two words']}\n"
            "broker: {policy: gpu-affinity, gpus: 1, run_root: /scratch/acb}\n"
            "workers: [{command: [python, train.py], mode: auto, per_node: 3}]\n",
            "auto.yaml",
        ),
        bin_dir=BIN,
    ),
    "prologue": lambda: render_prologue(PrologueOptions(bin_dir=BIN)),
    "prologue-virtual": lambda: render_prologue(
        PrologueOptions(policy="gpu-sharing", virtual_gpus=2, gpu_memory=8 << 30, bin_dir=BIN)
    ),
}


@pytest.fixture(params=sorted(CASES))
def rendered(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param, CASES[request.param]()


def test_matches_golden_file(rendered: tuple[str, str]) -> None:
    name, text = rendered
    golden = GOLDEN / f"{name}.sh"
    if os.environ.get("ACB_RECORD_GOLDEN") == "1":
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), (
        f"no golden file {golden}; record it with ACB_RECORD_GOLDEN=1 .venv/bin/python -m pytest "
        "tests/slurm/test_render.py"
    )
    expected = golden.read_text(encoding="utf-8")
    assert text == expected, (
        f"rendering of {name!r} differs from {golden}. If the template change is intended, "
        "re-record with: ACB_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/slurm/test_render.py"
        " and review the diff"
    )


def test_passes_bash_n(rendered: tuple[str, str], tmp_path: Path) -> None:
    name, text = rendered
    script = tmp_path / f"{name}.sh"
    script.write_text(text, encoding="utf-8")
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_passes_shellcheck(rendered: tuple[str, str], tmp_path: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (scripts/slurm-dev-cluster up installs it)")
    name, text = rendered
    script = tmp_path / f"{name}.sh"
    if name.startswith("prologue"):
        text = "#!/bin/bash\n" + text  # printed for eval inside a batch script
    script.write_text(text, encoding="utf-8")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _worker_command_lines(script: str) -> list[list[str]]:
    """The argv of each worker's srun line, as bash would split it."""
    found = re.findall(r'--nodelist="\$acb_node".*? \\\n\s*(.*?) &\n', script, flags=re.DOTALL)
    return [shlex.split(command) for command in found]


def test_hostile_values_reach_the_shell_quoted() -> None:
    script = CASES["hostile"]()
    argv = _worker_command_lines(script)
    assert argv[0][-7:] == ["/bin/echo", "it's", "$(id)", "`id`", "a;b", "multi\nline", '"q"']
    assert argv[1] == ["bash", "-c", 'echo "$ACB_WORKER" > out.txt']
    # Nothing hostile appears unquoted: every occurrence sits inside single quotes.
    assert "HOSTILE='$(id) `id` '\"'\"'x'\"'\"' \"y\" ; \n next'" in script
    assert "--chdir='/tmp/work '\"'\"'dir'\"'\"''" in script
    assert "ACB_RUN_ROOT='/tmp/runs; $(x)'" in script


def test_every_value_goes_through_shquote_in_the_templates() -> None:
    """Every {{ expression }} in the templates ends in a quoting filter or is a number."""
    numeric = {"alloc.nodes", "alloc.ntasks_per_node", "alloc.cpus_per_task",
               "alloc.gpus_per_node", "alloc.mem", "alloc.time", "group.count", "worker_gpus",
               "loop.index0", "group.mode", "name"}  # fmt: skip
    for template in (REPO / "templates" / "sbatch").glob("*.j2"):
        for expr in re.findall(r"{{(.*?)}}", template.read_text(encoding="utf-8")):
            expr = expr.strip()
            if "|" in expr:
                assert expr.rsplit("|", 1)[1].strip().startswith(("shquote", "sbatch_value",
                                                                  "replace")), expr  # fmt: skip
            else:
                assert expr in numeric or expr.startswith('" "'), (template.name, expr)


def test_validated_fields_that_skip_shquote_are_plain() -> None:
    """alloc.mem/time and env names are printed bare: validation keeps them to safe characters."""
    spec = parse_spec(
        "allocation: {mem: 16g, time: '1-2:00:00', gpus_per_node: 1}\n"
        "workers: [{command: [x], env: {GOOD_NAME: v}}]\n"
    )
    script = render_batch(spec, bin_dir=BIN)
    assert "#SBATCH --mem=16G" in script
    assert "#SBATCH --time=1-2:00:00" in script


def test_campaign_is_exported_quoted(tmp_path: Path) -> None:
    campaign = tmp_path / "my campaign's.yaml"
    campaign.write_text("items: []\n", encoding="utf-8")
    spec = parse_spec(
        'campaign: "my campaign\'s.yaml"\nworkers: [{command: [acb-campaign], mode: client}]\n',
        "job.yaml",
        base_dir=tmp_path,
    )
    script = render_batch(spec, bin_dir=BIN)
    assert f"export ACB_CAMPAIGN={shlex.quote(str(campaign.resolve()))}" in script


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_shquote_filter_round_trips_through_bash(value: str) -> None:
    env = make_environment()
    line = env.from_string("printf '%s' {{ v | shquote }}").render(v=value)
    result = subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=True)
    assert result.stdout == value


def test_sbatch_value_quotes_or_refuses() -> None:
    assert sbatch_value("acb-%x-%j.out") == "acb-%x-%j.out"
    assert sbatch_value("two words") == '"two words"'
    with pytest.raises(RenderError, match="#SBATCH"):
        sbatch_value('a "quoted" name')


def test_user_template_dir_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "batch.sh.j2").write_text(
        "#!/bin/bash\n# site header\n{% include 'prologue.sh.j2' %}\n"
        "echo {{ alloc.name | shquote }}\n"
    )
    spec = parse_spec(_example("gate-virtual.yaml"), "job.yaml")
    text = render_batch(spec, bin_dir=BIN, template_dir=tmp_path)
    assert text.startswith("#!/bin/bash\n# site header\n")
    assert "acb-slurm prologue" in text  # the packaged prologue is still found
    monkeypatch.setenv("ACB_TEMPLATE_DIR", str(tmp_path))
    assert render_batch(spec, bin_dir=BIN) == text


def test_template_errors_are_clear(tmp_path: Path) -> None:
    (tmp_path / "batch.sh.j2").write_text("{{ no_such_variable }}\n")
    spec = parse_spec(_example("gate-virtual.yaml"), "job.yaml")
    with pytest.raises(RenderError, match="no_such_variable"):
        render_batch(spec, bin_dir=BIN, template_dir=tmp_path)
    with pytest.raises(RenderError, match="does not exist"):
        render_batch(spec, bin_dir=BIN, template_dir=tmp_path / "missing")
