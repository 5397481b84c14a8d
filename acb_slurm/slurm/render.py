"""Rendering: a validated JobSpec (or prologue options) -> batch script text, a pure function.

Templates are jinja2 files (`batch.sh.j2`, `prologue.sh.j2`) searched first in a user template
directory (`--template-dir` or ACB_TEMPLATE_DIR), then in the project's. StrictUndefined makes a
missing variable an error; `shquote` (shlex.quote) is applied to every value that reaches the shell.
Template comments are written {## ... ##} because `{#` occurs in bash (`${#array[@]}`).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from acb_slurm import defaults, env
from acb_slurm.launcher import acb_run_argv
from acb_slurm.launcher.nodelaunch import GroupPlan, Plan
from acb_slurm.slurm.errors import RenderError
from acb_slurm.slurm.spec import JobSpec, WorkerGroup, command_argv
from acb_slurm.units import parse_size

#: Environment variable naming a directory searched for templates before the project's.
TEMPLATE_DIR_ENV = env.TEMPLATE_DIR
DEFAULT_GPU_MEMORY = defaults.VIRTUAL_GPU_MEMORY


def project_template_dirs() -> list[Path]:
    """Where the packaged templates live: inside the package when installed, else the repo's."""
    here = Path(__file__).resolve()
    candidates = [
        here.parent.parent / "templates" / "sbatch",
        here.parents[2] / "templates" / "sbatch",
    ]
    return [p for p in candidates if (p / "batch.sh.j2").is_file()]


def default_bin_dir() -> str:
    """The bin directory of the Python running acb-sbatch: acb-assigner and acb-run live there."""
    return str(Path(sys.executable).parent)


_SBATCH_BARE = re.compile(r"^[A-Za-z0-9._%/:@+,=-]+$")


def sbatch_value(value: object) -> str:
    """A value for an #SBATCH line: bare when plain, else in double quotes (sbatch's own rule)."""
    text = str(value)
    if _SBATCH_BARE.match(text):
        return text
    if '"' in text or "\\" in text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise RenderError(f"{text!r} cannot go on an #SBATCH line (double quote, backslash or "
                          "control character)")  # fmt: skip
    return f'"{text}"'


def make_environment(template_dir: str | os.PathLike[str] | None = None) -> jinja2.Environment:
    """A jinja2 Environment: user dir (argument or ACB_TEMPLATE_DIR) first, then the project's."""
    search: list[str] = []
    user_dir = template_dir or os.environ.get(TEMPLATE_DIR_ENV) or None
    if user_dir:
        if not Path(user_dir).is_dir():
            raise RenderError(f"template directory {user_dir} does not exist")
        search.append(os.fspath(user_dir))
    project = project_template_dirs()
    if not project:
        raise RenderError(
            "the packaged templates (templates/sbatch/batch.sh.j2) are missing: reinstall acb-slurm"
        )
    search.extend(os.fspath(p) for p in project)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        # `{#` starts bash's ${#array[@]}; template comments are {## ... ##} instead.
        comment_start_string="{##",
        comment_end_string="##}",
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )
    env.filters["shquote"] = lambda v: shlex.quote(str(v))
    env.filters["sbatch_value"] = sbatch_value
    return env


@dataclass(frozen=True)
class PrologueOptions:
    """What the prologue needs to know: the broker's settings and where tools live."""

    policy: str = defaults.POLICY
    virtual_gpus: int | None = None
    gpu_memory: int | None = None
    assigner_gpus: int | None = None
    gpu_type: str | None = None
    startup_timeout: int = defaults.STARTUP_TIMEOUT_S
    time_slice: int = 0
    run_root: str | None = None
    campaign: str | None = None
    bin_dir: str = ""

    def context(self) -> dict[str, Any]:
        return {
            "bin_dir": self.bin_dir or default_bin_dir(),
            "policy": self.policy,
            "virtual_gpus": self.virtual_gpus,
            "gpu_memory": self.gpu_memory
            if self.gpu_memory is not None
            else parse_size(DEFAULT_GPU_MEMORY),
            "assigner_gpus": self.assigner_gpus,
            "gres_prefix": f"gpu:{self.gpu_type}:" if self.gpu_type else "gpu:",
            "startup_timeout": self.startup_timeout,
            "time_slice": self.time_slice,
            "run_root": self.run_root or defaults.RUN_ROOT,
            "campaign": self.campaign,
        }


def prologue_options(spec: JobSpec, bin_dir: str = "") -> PrologueOptions:
    """The prologue settings a job.yaml asks for."""
    broker, alloc = spec.broker, spec.allocation
    assigner_gpus = None
    if broker.virtual_gpus is None:
        assigner_gpus = broker.gpus or alloc.gpus_per_node or None
    return PrologueOptions(
        policy=broker.policy,
        virtual_gpus=broker.virtual_gpus,
        gpu_memory=broker.gpu_memory,
        assigner_gpus=assigner_gpus,
        gpu_type=alloc.gpu_type,
        startup_timeout=broker.startup_timeout,
        time_slice=broker.time_slice,
        run_root=broker.run_root,
        campaign=spec.campaign,
        bin_dir=bin_dir,
    )


def _run_options(spec: JobSpec, group: WorkerGroup) -> list[str]:
    """The acb-run options of a group's workers (what follows ``acb-run --MODE``)."""
    if group.mode == "gate":
        argv = acb_run_argv("gate", gpus=group.gpus, memory=spec.broker.worker_memory, program="")
    elif group.mode == "auto":
        argv = acb_run_argv("auto", program="")
    else:
        return []
    return argv[2:-1]  # without the program, the mode and the closing `--`


def _worker_context(spec: JobSpec, index: int, group: WorkerGroup) -> dict[str, Any]:
    run = group.torchrun
    return {
        "index": index,
        "name": group.name,
        "count": spec.workers_per_node(group),
        "mode": group.mode,
        "env": list(group.env.items()),
        "workdir": group.workdir,
        "run_options": _run_options(spec, group),
        "argv": command_argv(group.command),
        "torchrun": None
        if run is None
        else {
            "nodes": run.nodes,
            "nproc_per_node": run.nproc_per_node,
            "gpus": run.nproc_per_node * run.gpus_per_proc,
            "repeat": run.repeat,
        },
    }


def launch_plan(spec: JobSpec) -> Plan:
    """What each node's `acb-launch` runs: every group of per-node workers (torchrun groups are
    steps of their own)."""
    return Plan(
        tuple(
            GroupPlan(
                name=group.name,
                count=spec.workers_per_node(group),
                command=tuple(command_argv(group.command)),
                mode=group.mode,
                run_options=tuple(_run_options(spec, group)),
                env=dict(group.env),
                workdir=group.workdir,
            )
            for group in spec.workers
            if group.torchrun is None
        ),
        array_task_in_names=True,
    )


def render_batch(
    spec: JobSpec, *, bin_dir: str = "", template_dir: str | os.PathLike[str] | None = None
) -> str:
    """The whole batch script of a job."""
    options = prologue_options(spec, bin_dir)
    context = options.context()
    context.update(
        source=spec.source,
        alloc=spec.allocation,
        # The same GRES as the node's assigner (broker.gpus may be fewer than the allocation's),
        # so that a GPU index means the same device to the assigner and to its workers.
        worker_gpus=options.assigner_gpus or spec.allocation.gpus_per_node or None,
        workers=[_worker_context(spec, i, g) for i, g in enumerate(spec.workers)],
    )
    plan = launch_plan(spec)
    context["plan"] = plan.to_json() if plan.groups else ""
    return _render("batch.sh.j2", context, template_dir)


def render_prologue(
    options: PrologueOptions, *, template_dir: str | os.PathLike[str] | None = None
) -> str:
    """The prologue alone, for `eval "$(acb-sbatch prologue ...)"` in an existing batch script."""
    return _render("prologue.sh.j2", options.context(), template_dir)


def _render(name: str, context: dict[str, Any], template_dir: str | os.PathLike[str] | None) -> str:
    env = make_environment(template_dir)
    try:
        return env.get_template(name).render(**context)
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"template {exc.name} not found in {env.loader.searchpath}") from None  # type: ignore[union-attr]
    except jinja2.UndefinedError as exc:
        raise RenderError(f"template {name}: {exc.message}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(f"template {exc.filename}:{exc.lineno}: {exc.message}") from None
