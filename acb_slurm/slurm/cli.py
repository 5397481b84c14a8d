"""`acb-sbatch`: validate a job.yaml, render its batch script, submit it, watch and cancel the job.

Commands are thin: they call spec/render/submit/runtime and print. The Slurm layer's errors
(AcbSlurmError) are caught once here and become one message on stderr and exit code 1; usage
errors exit 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from acb_slurm import defaults
from acb_slurm.slurm import runtime
from acb_slurm.slurm.commands import cancel_job
from acb_slurm.slurm.errors import AcbSlurmError
from acb_slurm.slurm.render import (
    PrologueOptions,
    default_bin_dir,
    render_batch,
    render_prologue,
)
from acb_slurm.slurm.spec import (
    Broker,
    JobSpec,
    check_value,
    json_schema,
    known_policies,
    load_spec,
)
from acb_slurm.slurm.submit import available_submitters, choose_submitter, get_submitter

HELP = """\
Run GPU-sharing jobs on Slurm: one GPU assigner per node, workers that take turns on the GPUs.

\b
A job.yaml says what to ask Slurm for and which workers to run:
\b
    allocation: {partition: gpu, nodes: 1, gpus_per_node: 1, time: "2:00:00"}
    broker: {policy: simple, worker_memory: 20GiB}
    workers:
      - command: [python, fold.py]
        per_gpu: 8          # 8 workers take turns on each GPU
\b
Examples:
    acb-sbatch render job.yaml            # print the batch script, submit nothing
    acb-sbatch submit job.yaml            # validate, submit, print job id and paths
    acb-sbatch status 1234                # who holds which GPU, who waits
    acb-sbatch cancel 1234
    acb-sbatch report 1234                # timeline PNG + HTML of who held which GPU when
    acb-sbatch report 1234 --compare 1200 --names shared,static
    acb-sbatch schema > job.schema.json   # JSON Schema of job.yaml for editors
In an existing batch script:
    eval "$(acb-sbatch prologue --policy simple)"
"""

app = typer.Typer(
    help=HELP, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    rich_markup_mode=None,
)  # fmt: skip

TemplateDir = Annotated[
    str | None,
    typer.Option(
        "--template-dir",
        envvar="ACB_TEMPLATE_DIR",
        help="Directory searched for batch.sh.j2/prologue.sh.j2 before the packaged templates.",
    ),
]
BinDir = Annotated[
    str | None,
    typer.Option(
        "--bin-dir",
        help="Where acb-assigner/acb-run/acb-sbatch live on the nodes; default: the bin "
        "directory of the Python running this command.",
    ),
]


@contextlib.contextmanager
def _edge() -> Iterator[None]:
    """Turn the Slurm layer's errors into one message and exit code 1."""
    try:
        yield
    except AcbSlurmError as exc:
        typer.echo(f"acb-sbatch: error: {exc}", err=True)
        raise typer.Exit(1) from None


def _expand_log_path(pattern: str, job_id: str, name: str, cwd: Path) -> Path:
    """Slurm's %j/%x/%u/%% in an --output path (the common ones), made absolute."""
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    text = (
        pattern.replace("%%", "\0").replace("%j", job_id).replace("%x", name).replace("%u", user)
    ).replace("\0", "%")
    path = Path(text)
    return path if path.is_absolute() else cwd / path


def _run_root(spec: JobSpec, cwd: Path) -> Path:
    root = Path(spec.broker.run_root or defaults.RUN_ROOT)
    return root if root.is_absolute() else cwd / root


def _log_parent(pattern: str, cwd: Path) -> Path | None:
    """The directory of an --output/--error path that exists whatever the job id: the literal
    text before the first %-pattern, up to its last slash (None: the submit dir itself)."""
    literal = pattern.split("%", 1)[0]
    if "/" not in literal:
        return None
    parent = Path(literal[: literal.rindex("/") + 1] or "/")
    return parent if parent.is_absolute() else cwd / parent


def _prepare_dirs(spec: JobSpec, cwd: Path) -> None:
    """Create what the job writes to before it can start: the parents of its output and error
    files (Slurm does not create them, and the job would fail without a word) and the run root."""
    alloc = spec.allocation
    folders = [_run_root(spec, cwd)]
    for pattern in (alloc.output, alloc.error):
        parent = _log_parent(pattern, cwd) if pattern else None
        if parent is not None:
            folders.append(parent)
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AcbSlurmError(
                f"cannot create {folder}: {exc.strerror or exc}; nothing was submitted"
            ) from None


@app.command()
def submit(
    job_yaml: Annotated[Path, typer.Argument(help="The job spec.")],
    template_dir: TemplateDir = None,
    bin_dir: BinDir = None,
    test_only: Annotated[
        bool,
        typer.Option(
            "--test-only",
            help="Ask Slurm whether it would run it (sbatch --test-only); submit nothing.",
        ),
    ] = False,
    submitter: Annotated[
        str | None,
        typer.Option(
            help=f"Submission backend ({', '.join(available_submitters())}); default: "
            "pyslurm when it matches the installed Slurm, else the sbatch CLI."
        ),
    ] = None,
) -> None:
    """Validate JOB_YAML, render its batch script and submit it.

    \b
    Prints the job id, the run directory (<submit dir>/acb-runs/<job id>: the submitted script,
    the token, each node's socket, event log and assigner log) and the output file.
    Example: acb-sbatch submit examples/slurm/gate-virtual.yaml
    """
    with _edge():
        spec = load_spec(job_yaml)
        script = render_batch(spec, bin_dir=bin_dir or default_bin_dir(), template_dir=template_dir)
        backend = get_submitter(submitter) if submitter else choose_submitter()
        cwd = Path.cwd()
        if test_only:
            answer = backend.test_only(script, cwd=str(cwd))
            typer.echo(
                f"Slurm would start it at {answer['start']} on {answer['nodes']} "
                f"({answer['processors']} processors); nothing was submitted"
            )
            return
        _prepare_dirs(spec, cwd)
        job_id = backend.submit(script, cwd=str(cwd))
        # From here on the job exists: say so first, and never lose its id to a later error.
        typer.echo(f"submitted job {job_id} ({backend.name})")
        run_dir = _run_root(spec, cwd) / job_id
        try:
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            (run_dir / "job.sh").write_text(script, encoding="utf-8")
            shutil.copyfile(job_yaml, run_dir / "job.yaml")
        except OSError as exc:
            where = exc.filename or run_dir
            raise AcbSlurmError(
                f"job {job_id} was submitted, but its script could not be saved in {run_dir} "
                f"({where}: {exc.strerror or exc}); it runs anyway: acb-sbatch status {job_id}"
            ) from None
        alloc = spec.allocation
        output = _expand_log_path(alloc.output or "slurm-%j.out", job_id, alloc.name, cwd)
        typer.echo(f"run dir: {run_dir}")
        typer.echo(f"script:  {run_dir / 'job.sh'}")
        typer.echo(f"output:  {output}")
        if alloc.error:
            typer.echo(f"error:   {_expand_log_path(alloc.error, job_id, alloc.name, cwd)}")
        typer.echo(f"status:  acb-sbatch status {job_id}")


@app.command()
def render(
    job_yaml: Annotated[Path, typer.Argument(help="The job spec.")],
    template_dir: TemplateDir = None,
    bin_dir: BinDir = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Validate JOB_YAML and print the batch script it becomes; submit nothing.

    Example: acb-sbatch render job.yaml > job.sh && sbatch job.sh
    """
    with _edge():
        spec = load_spec(job_yaml)
        script = render_batch(spec, bin_dir=bin_dir or default_bin_dir(), template_dir=template_dir)
        if output is None:
            typer.echo(script, nl=False)
        else:
            output.write_text(script, encoding="utf-8")
            typer.echo(f"wrote {output}", err=True)


@app.command()
def prologue(
    policy: Annotated[
        str, typer.Option(help=f"Scheduling policy ({', '.join(known_policies())}).")
    ] = defaults.POLICY,
    virtual_gpus: Annotated[
        int | None, typer.Option(help="Pretend each node has N GPUs (machines without GPUs).")
    ] = None,
    gpu_memory: Annotated[
        str | None, typer.Option(help="Memory of each virtual GPU, e.g. 80GiB.")
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option(help="GPUs of each node the assigner may hand out (default: the job's)."),
    ] = None,
    startup_timeout: Annotated[
        int, typer.Option(help="Seconds to wait for every node's assigner.")
    ] = defaults.STARTUP_TIMEOUT_S,
    time_slice: Annotated[
        int,
        typer.Option(help="Ask a holder to yield after this many seconds while others wait."),
    ] = 0,
    run_root: Annotated[
        str | None,
        typer.Option(help="Run dirs go to RUN_ROOT/<job id> (default <submit dir>/acb-runs)."),
    ] = None,
    campaign: Annotated[
        str | None, typer.Option(help="Campaign file, exported as ACB_CAMPAIGN.")
    ] = None,
    template_dir: TemplateDir = None,
    bin_dir: BinDir = None,
) -> None:
    """Print the prologue alone, to start the assigners from an existing batch script.

    \b
    In the batch script, before the workers:
        eval "$(acb-sbatch prologue --policy simple)"
        acb_worker fold-0 --gate -- python work.py &     # one worker, in the background
        acb_worker fold --per-gpu 4 -- python work.py &  # 4 per GPU of every node
        wait                                             # waits for the workers only
    It starts one assigner per node, waits for them, exports ACB_ASSIGNER, ACB_TOKEN_FILE,
    ACB_RUN_DIR and ACB_JOB_ID, defines acb_worker (NAME [--gate|--auto|--client]
    [--node NODE|--per-node N|--per-gpu N] [acb-run options] -- CMD: the srun step under
    acb-run), and stops the assigners when the script exits, after the script's own EXIT trap.
    The assigners are not jobs of the script's shell; `$ACB_RUN_DIR/node-env CMD` points
    ACB_ASSIGNER at the node CMD runs on.
    """
    with _edge():
        options = PrologueOptions(
            policy=check_value(Broker, "policy", policy, "--policy"),
            virtual_gpus=None
            if virtual_gpus is None
            else check_value(Broker, "virtual_gpus", virtual_gpus, "--virtual-gpus"),
            gpu_memory=None
            if gpu_memory is None
            else check_value(Broker, "gpu_memory", gpu_memory, "--gpu-memory"),
            assigner_gpus=None
            if gpus is None or virtual_gpus
            else check_value(Broker, "gpus", gpus, "--gpus"),
            startup_timeout=check_value(
                Broker, "startup_timeout", startup_timeout, "--startup-timeout"
            ),
            time_slice=check_value(Broker, "time_slice", time_slice, "--time-slice"),
            run_root=None
            if run_root is None
            else check_value(Broker, "run_root", run_root, "--run-root"),
            campaign=None
            if campaign is None
            else check_value(JobSpec, "campaign", campaign, "--campaign"),
            bin_dir=bin_dir or default_bin_dir(),
        )
        typer.echo(render_prologue(options, template_dir=template_dir), nl=False)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="Slurm job id.")],
    run_dir: Annotated[
        str | None, typer.Option(help="The job's run dir, if not <submit dir>/acb-runs/<id>.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw replies as JSON.")] = False,
) -> None:
    """Ask each node's assigner of a running job who holds which GPU and who waits.

    Example: acb-sbatch status 1234
    """
    with _edge():
        folder = runtime.find_run_dir(job_id, run_dir)
        config = runtime.read_config(folder)
        answers = runtime.query_status(config)
        if as_json:
            from google.protobuf.json_format import MessageToDict

            typer.echo(
                json.dumps(
                    {n: (a if isinstance(a, str) else MessageToDict(a)) for n, a in answers},
                    indent=2,
                )
            )
        else:
            typer.echo(f"job {job_id}: run dir {folder}")
            typer.echo(runtime.format_status(answers))
        if any(isinstance(a, str) for _, a in answers):
            raise typer.Exit(1)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="Slurm job id.")]) -> None:
    """Cancel a job (scancel); its script stops the assigners and keeps the event logs.

    Example: acb-sbatch cancel 1234
    """
    with _edge():
        cancel_job(job_id)
        typer.echo(f"cancelled job {job_id} (scancel {job_id})")


@app.command()
def report(
    job_id: Annotated[str, typer.Argument(help="Slurm job id (its run dir holds the event logs).")],
    compare: Annotated[
        str | None,
        typer.Option(help="A second job id, drawn beside the first (e.g. static vs shared)."),
    ] = None,
    names: Annotated[
        list[str] | None,
        typer.Option(
            "--names",
            help="Labels of the runs, comma-separated in run order (shared,static); the option "
            "may also be repeated.",
        ),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Output directory; default: <run dir>/report.")
    ] = None,
    run_dir: Annotated[
        str | None, typer.Option(help="The job's run dir, if not <submit dir>/acb-runs/<id>.")
    ] = None,
    holdings: Annotated[
        bool, typer.Option("--holdings", help="Also list every lease: who held which GPU when.")
    ] = False,
) -> None:
    """Turn a job's assigner event logs into a timeline picture (PNG and a self-contained HTML)
    and a summary table: busy fraction, waits p50/p99, handoffs.

    Works on finished jobs too: the event logs stay in the run dir.
    Example: acb-sbatch report 1234 --compare 1200 --names shared,static
    """
    from acb_slurm.report import EventLogError, build_report, build_run
    from acb_slurm.report.events import find_event_logs
    from acb_slurm.report.summary import format_holdings, render_table

    with _edge():
        folder = runtime.find_run_dir(job_id, run_dir)
        other = runtime.find_run_dir(compare) if compare else None
        target = Path(out) if out else folder / "report"
        labels = [n.strip() for item in names or () for n in item.split(",") if n.strip()]
        try:
            paths = build_report(
                [folder],
                target,
                [other] if other else None,
                names=labels or None,
                title=f"acb-slurm job {job_id}" + (f" vs {compare}" if compare else ""),
            )
        except (EventLogError, ValueError) as exc:
            raise AcbSlurmError(str(exc)) from None
        summaries = json.loads(paths.summary.read_text(encoding="utf-8"))
        typer.echo(render_table(summaries))
        if holdings:
            typer.echo("")
            typer.echo(format_holdings(build_run(find_event_logs([folder]))))
        typer.echo(f"\ntimeline: {paths.png}\nreport:   {paths.html}")


@app.command()
def schema() -> None:
    """Print the JSON Schema (draft 2020-12) of job.yaml, for editors and CI checks.

    Example: acb-sbatch schema > job.schema.json
    """
    typer.echo(json.dumps(json_schema(), indent=2))


@app.command("await-assigners", hidden=True)
def await_assigners(
    nodes: Annotated[list[str], typer.Argument(help="Node names, the controller first.")],
    run_dir: Annotated[str, typer.Option(help="The job's run dir.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = defaults.STARTUP_TIMEOUT_S,
    watch_pid: Annotated[
        int | None, typer.Option(help="Give up early when this process (the srun) exits.")
    ] = None,
    write_config: Annotated[
        str | None, typer.Option(help="Write the inter-node config here.")
    ] = None,
    policy: Annotated[str, typer.Option(help="Recorded in the config.")] = defaults.POLICY,
) -> None:
    """Used by the prologue: wait for the nodes' assigners; print the controller's HOST:PORT."""
    with _edge():
        token_file = os.environ.get("ACB_TOKEN_FILE")
        entries = runtime.await_assigners(
            run_dir, nodes, timeout=timeout, watch_pid=watch_pid, token_file=token_file
        )
        if write_config:
            runtime.write_config(
                write_config,
                entries,
                run_dir=run_dir,
                job_id=os.environ.get("ACB_JOB_ID") or os.environ.get("SLURM_JOB_ID", ""),
                token_file=token_file or "",
                policy=policy,
            )
        typer.echo(entries[0].tcp)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
