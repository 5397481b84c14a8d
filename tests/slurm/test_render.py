"""Rendering: golden files, every script passes bash -n and shellcheck, hostile values stay quoted.

Re-record the golden files after an intended template change:
    ACB_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/slurm/test_render.py
"""

from __future__ import annotations

import json
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


TORCHRUN_JOB = textwrap.dedent(
    """\
    allocation: {nodes: 2, gpus_per_node: 2, cpus_per_task: 4}
    workers:
      - name: fold
        command: [python, fold.py]
        per_gpu: 2
      - name: train
        torchrun: {nodes: 2, nproc_per_node: 1, gpus_per_proc: 2, repeat: 3}
        command: [python, train.py, --epochs, "3", "it's"]
        env: {NCCL_DEBUG: INFO}
        workdir: /tmp/train dir
      - name: shell
        mode: client
        per_node: 1
        command: "echo hi"
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
    "torchrun": lambda: render_batch(parse_spec(TORCHRUN_JOB, "torchrun.yaml"), bin_dir=BIN),
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


def _plan(script: str, tmp_path: Path) -> dict[str, object]:
    """The launch plan as the batch script writes it: its printf line, run by bash."""
    (line,) = [x for x in script.splitlines() if x.startswith("printf '%s\\n' ")]
    out = tmp_path / "launch"
    out.mkdir(exist_ok=True)
    subprocess.run(["bash", "-c", line], env={"acb_launch_dir": str(out)}, check=True)
    plan: dict[str, object] = json.loads((out / "workers.json").read_text(encoding="utf-8"))
    return plan


def test_hostile_values_reach_the_launcher_unchanged(tmp_path: Path) -> None:
    script = CASES["hostile"]()
    plan = _plan(script, tmp_path)
    gated, shell = plan["groups"]  # type: ignore[misc]
    assert gated["name"] == 'w\'$(id)`id`;\n"x"'
    assert gated["command"] == ["/bin/echo", "it's", "$(id)", "`id`", "a;b", "multi\nline", '"q"']
    assert gated["env"] == {"HOSTILE": "$(id) `id` 'x' \"y\" ; \n next"}
    assert gated["workdir"] == "/tmp/work 'dir'"
    assert gated["count"] == 2 and gated["mode"] == "gate"
    assert shell["command"] == ["bash", "-c", 'echo "$ACB_WORKER" > out.txt']
    assert shell["mode"] == "client" and shell["run_options"] == []
    # Nothing hostile appears unquoted: the plan and the names sit inside single quotes.
    assert "acb_group='w'\"'\"'$(id)`id`;" in script
    assert "ACB_RUN_ROOT='/tmp/runs; $(x)'" in script


def test_every_value_goes_through_shquote_in_the_templates() -> None:
    """Every {{ expression }} in the templates ends in a quoting filter or is a number."""
    numeric = {"alloc.nodes", "alloc.ntasks_per_node", "alloc.cpus_per_task",
               "alloc.gpus_per_node", "alloc.mem", "alloc.time", "group.count", "worker_gpus",
               "loop.index0", "group.mode", "name", "group.index", "offset.value",
               "group.torchrun.nodes", "group.torchrun.nproc_per_node", "group.torchrun.gpus",
               "group.torchrun.repeat"}  # fmt: skip
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


def test_time_slice_reaches_every_assigner_and_is_off_by_default() -> None:
    job = "allocation: {nodes: 2, gpus_per_node: 1}\nworkers: [{command: [x], mode: auto}]\n"
    assert "--time-slice" not in render_batch(parse_spec(job), bin_dir=BIN)
    sliced = render_batch(parse_spec(job + "broker: {time_slice: 30}\n"), bin_dir=BIN)
    assert "acb_assigner_args=(--policy simple --time-slice 30" in sliced


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


def _srun_lines(script: str) -> list[str]:
    """Each srun command, its continuation lines joined."""
    joined = script.replace("\\\n", " ")
    command = re.compile(r'\s*(\S+=\S+\s+)*(srun|"\$acb_srun") ')
    return [line.strip() for line in joined.splitlines() if command.match(line)]


def test_steps_ask_for_their_cpus_explicitly() -> None:
    spec = parse_spec(
        "allocation: {nodes: 2, gpus_per_node: 2, cpus_per_task: 6}\n"
        "workers: [{command: [x], per_gpu: 2}]\n"
    )
    lines = _srun_lines(render_batch(spec, bin_dir=BIN))
    assigners = [line for line in lines if "--job-name=acb-assigner" in line]
    workers = [line for line in lines if "acb-launch" in line]
    assert len(assigners) == 2 and len(workers) == 1, lines
    assert all("--cpus-per-task=1 " in line for line in assigners)
    assert "--cpus-per-task=6 " in workers[0]


def test_fewer_broker_gpus_give_assigner_and_workers_the_same_gres() -> None:
    spec = parse_spec(
        "allocation: {gpus_per_node: 4}\nbroker: {gpus: 2}\nworkers: [{command: [x], per_gpu: 2}]\n"
    )
    script = render_batch(spec, bin_dir=BIN)
    assert "#SBATCH --gres=gpu:4\n" in script
    assert "acb_assigner_gres=(--gres=gpu:2)" in script
    workers = [line for line in _srun_lines(script) if "acb-launch" in line]
    assert workers and all(" --gres=gpu:2 " in line for line in workers), workers
    assert "--gres=gpu:4 " not in " ".join(workers)


def test_gpu_type_reaches_every_gres() -> None:
    spec = parse_spec(
        "allocation: {gpus_per_node: 2, gpu_type: a100}\nworkers: [{command: [x], per_gpu: 2}]\n"
    )
    script = render_batch(spec, bin_dir=BIN)
    assert "#SBATCH --gres=gpu:a100:2\n" in script
    assert "acb_assigner_gres=(--gres=gpu:a100:2)" in script
    workers = [line for line in _srun_lines(script) if "acb-launch" in line]
    assert all(" --gres=gpu:a100:2 " in line for line in workers), workers


def _run_prologue_part(
    tmp_path: Path, script: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run the prologue up to the first srun, with Slurm's commands faked."""
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    (fake / "scontrol").write_text('#!/bin/bash\necho "$NODE"\n')
    (fake / "srun").write_text("#!/bin/bash\nexit 1\n")
    (fake / "acb-assigner").write_text('#!/bin/bash\n[[ $1 == tls-init ]] && mkdir -p "$2"\n')
    for tool in ("scontrol", "srun", "acb-assigner"):
        (fake / tool).chmod(0o755)
    head = script.split("# The first node's assigner is the controller")[0]
    head = head.replace(f"export ACB_BIN={BIN}\n", f"export ACB_BIN={fake}\n")
    head += 'echo "SOCKETS=$ACB_SOCKET_DIR"\ntrap - EXIT\n'
    full_env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_JOB_ID": "77",
                "SLURM_JOB_NODELIST": "x", **env}  # fmt: skip
    return subprocess.run(["bash", "-c", head], capture_output=True, text=True, env=full_env)


def test_prologue_moves_an_earlier_run_aside(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    old = root / "77"
    (old / "n1").mkdir(parents=True)
    (old / "n1" / "events.jsonl").write_text('{"event": "start"}\n')
    (old / "job.sh").write_text("# the job\n")
    script = render_prologue(PrologueOptions(virtual_gpus=1, run_root=str(root), bin_dir=BIN))
    result = _run_prologue_part(tmp_path, script, {"NODE": "n1"})
    assert result.returncode == 0, result.stderr
    assert "held an earlier run" in result.stderr
    moved = [p for p in root.iterdir() if p.name.startswith("77.old-")]
    assert len(moved) == 1
    assert (moved[0] / "n1" / "events.jsonl").exists()
    assert not (old / "n1" / "events.jsonl").exists()
    assert (old / "job.sh").read_text() == "# the job\n"
    assert (old / "token").exists()


def test_prologue_checks_the_whole_socket_path(tmp_path: Path) -> None:
    script = render_prologue(PrologueOptions(virtual_gpus=1, run_root=str(tmp_path), bin_dir=BIN))
    result = _run_prologue_part(tmp_path, script, {"NODE": "n1"})
    assert f"SOCKETS={tmp_path}/77" in result.stdout, result.stderr
    # A node name long enough to push <run dir>/<node>/assigner.sock past 107 bytes.
    node = "n" * (107 - len(f"{tmp_path}/77/") - len("/assigner.sock") + 1)
    result = _run_prologue_part(tmp_path, script, {"NODE": node})
    assert "SOCKETS=/tmp/acb-" in result.stdout, result.stderr
    result = _run_prologue_part(tmp_path, script, {"NODE": "n" * 100})
    assert result.returncode == 1
    assert "longer than 107 bytes" in result.stderr


def test_prologue_exports_bin_on_path() -> None:
    script = render_prologue(PrologueOptions(bin_dir=BIN))
    assert f'export ACB_BIN={BIN}\nexport PATH="$ACB_BIN:$PATH"\n' in script
    assert "Traps: EXIT runs the script's own EXIT handler" in script


def test_assigner_task_brackets_ipv6_and_drops_stale_ready_file() -> None:
    script = render_prologue(PrologueOptions(bin_dir=BIN))
    task = script.split("acb_assigner_task='", 1)[1].split("'\n", 1)[0]
    assert 'rm -f "$dir/ready.json"' in task
    snippet = task.split("addr=${addr:-0.0.0.0}", 1)[1].split("rm -f", 1)[0]
    for given, wanted in (("::1", "[::1]"), ("10.0.0.1", "10.0.0.1"), ("[fe80::1]", "[fe80::1]")):
        out = subprocess.run(
            ["bash", "-c", f"addr={given}\n{snippet}\nprintf %s \"$addr\""],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert out.stdout == wanted


def test_prologue_keeps_a_fresh_run_dir_that_holds_only_the_submitted_script(
    tmp_path: Path,
) -> None:
    root = tmp_path / "runs"
    (root / "77").mkdir(parents=True)
    (root / "77" / "job.sh").write_text("# the job\n")
    script = render_prologue(PrologueOptions(virtual_gpus=1, run_root=str(root), bin_dir=BIN))
    result = _run_prologue_part(tmp_path, script, {"NODE": "n1"})
    assert result.returncode == 0, result.stderr
    assert "earlier run" not in result.stderr
    assert sorted(p.name for p in root.iterdir()) == ["77"]


# ---- the per-node launcher and torchrun groups -------------------------------------------------


def test_every_per_node_group_runs_in_one_launcher_step() -> None:
    lines = _srun_lines(CASES["torchrun"]())
    launch = [" ".join(line.split()) for line in lines if "acb-launch" in line]
    assert len(launch) == 1, lines
    nodes = '--nodes="${#ACB_NODES[@]}" --ntasks="${#ACB_NODES[@]}" --ntasks-per-node=1'
    assert nodes in launch[0]
    assert "--kill-on-bad-exit=0" in launch[0] and "--overlap" in launch[0]
    assert '"$ACB_RUN_DIR/node-env" "$ACB_BIN/acb-launch" --plan' in launch[0]
    workers = [line for line in lines if "acb-assigner" not in line]
    assert not [line for line in workers if "acb-run" in line and "--gang" not in line], workers


def test_the_plan_lists_the_per_node_groups_with_their_acb_run_options(tmp_path: Path) -> None:
    plan = _plan(CASES["torchrun"](), tmp_path)
    assert plan["array_task_in_names"] is True
    groups = plan["groups"]
    assert [(g["name"], g["count"], g["mode"]) for g in groups] == [  # type: ignore[attr-defined]
        ("fold", 4, "gate"),
        ("shell", 1, "client"),
    ]
    assert groups[0]["run_options"] == ["--gpus", "1"]  # type: ignore[index]
    spec = parse_spec(
        "allocation: {gpus_per_node: 1}\nbroker: {worker_memory: 2GiB}\n"
        "workers: [{command: [x], gpus: 1}, {command: [y], mode: auto}]\n"
    )
    plan = _plan(render_batch(spec, bin_dir=BIN), tmp_path)
    assert [g["run_options"] for g in plan["groups"]] == [  # type: ignore[attr-defined]
        ["--gpus", "1", "--memory", str(2 << 30)],
        [],
    ]


def test_a_torchrun_group_is_one_step_over_its_nodes_per_run() -> None:
    script = CASES["torchrun"]()
    (line,) = [x for x in _srun_lines(script) if "--gang" in x]
    assert line.startswith("NCCL_DEBUG=INFO ACB_WORKER=")
    argv = shlex.split(line.split(" srun ", 1)[1])
    assert argv[:6] == [
        "--overlap", "--export=ALL", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
        "--cpus-per-task=4",
    ]  # fmt: skip
    assert "--chdir=/tmp/train dir" in argv and "--gres=gpu:2" in argv
    run = argv[argv.index("$ACB_RUN_DIR/node-env") + 1 :]
    assert run == [
        "$ACB_BIN/acb-run", "--gang", "${acb_gang}r$acb_r", "--gang-nodes", "2", "--gpus", "2",
        "--", "$ACB_BIN/torchrun", "--no-python", "--nproc-per-node", "1", "--max-restarts", "0",
        "python", "train.py", "--epochs", "3", "it's",
    ]  # fmt: skip
    # acb-run --gang gives torchrun its nodes, rank and master through PET_* variables.
    for flag in ("--nnodes", "--node-rank", "--node_rank", "--master-addr", "--master-port"):
        assert flag not in line
    assert "for ((acb_r = 0; acb_r < 3; acb_r++)); do" in script


def _report_part(script: str) -> str:
    return "\n" + script.split("# ---- wait for every step, then report", 1)[1].split("\n", 1)[1]


@pytest.mark.parametrize(
    ("array_task", "gang"), [("", "train-r"), ("7", "train-a7-r")], ids=["job", "array-task"]
)
def test_the_report_names_every_worker_and_run_with_its_exit_status(
    tmp_path: Path, array_task: str, gang: str
) -> None:
    """The end of the batch script, run by bash on the launchers' and runs' status files: n1's
    launcher reported, n2's did not (killed: its step exited 137)."""
    launch = tmp_path / "launch"
    launch.mkdir()
    fold = [0, 0, 3, 0]  # fold-n1-2 failed with 3
    (launch / "n1.codes").write_text("".join(f"{c}\n" for c in [*fold, 0]))
    (launch / "torchrun-1.codes").write_text("0\n70\n")  # the third run never ended
    head = (
        "ACB_NODES=(n1 n2)\n"
        f"acb_launch_dir={shlex.quote(str(launch))}\n"
        "(exit 137) & acb_launch_pid=$!\n"
        "acb_run_pids=()\n"
    )
    result = subprocess.run(
        ["bash", "-c", head + _report_part(CASES["torchrun"]())],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "SLURM_ARRAY_TASK_ID": array_task},
    )
    assert result.returncode == 1
    task = f"a{array_task}-" if array_task else ""
    lines = result.stderr.splitlines()
    assert lines[0] == "acb: acb-launch on n2 reported no exit status (its step exited 137); " + (
        "its workers count as failed"
    )
    assert f"acb: worker fold-{task}n1-1 finished" in lines
    assert f"acb: worker fold-{task}n1-2 FAILED with exit code 3" in lines
    assert f"acb: worker shell-{task}n1-0 finished" in lines
    assert f"acb: worker fold-{task}n2-3 FAILED with exit code 137" in lines
    assert f"acb: worker {gang}0 finished" in lines
    assert f"acb: worker {gang}1 FAILED with exit code 70" in lines
    assert f"acb: worker {gang}2 FAILED with exit code 1" in lines
    # Every worker once, in order: group, node, index; then the torchrun runs.
    workers = [line.split()[2] for line in lines if line.startswith("acb: worker ")]
    assert workers == [
        *(f"fold-{task}{n}-{i}" for n in ("n1", "n2") for i in range(4)),
        *(f"shell-{task}{n}-0" for n in ("n1", "n2")),
        *(f"{gang}{r}" for r in range(3)),
    ]
    assert lines[-1].startswith("acb: 8 of 13 worker(s) failed: ")
    assert f"fold-{task}n1-2=3 " in lines[-1]
