"""`acb-run`: run a program under the node's assigner. Thin: flags → spec → mode function."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

# Cheap: the client package loads gRPC only when a client is made (--gate), never for --auto,
# whose launcher only starts the program.
from acb_slurm.client.errors import AssignerError
from acb_slurm.units import parse_size

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: flags show no `<bool>` type, and the examples keep their line breaks.
    rich_markup_mode=None,
    context_settings={"allow_interspersed_args": False},
)

MODES_HELP = (
    "pick a mode: --gate holds GPUs while the whole command runs (any framework), e.g.\n"
    "  acb-run --gate --gpus 1 -- python predict.py\n"
    "or --auto holds a GPU only while an unmodified PyTorch program uses it, e.g.\n"
    "  acb-run --auto -- python train.py"
)


@app.command()
def run(
    ctx: typer.Context,
    command: Annotated[
        list[str] | None, typer.Argument(metavar="-- CMD", show_default=False, hidden=True)
    ] = None,
    gate: Annotated[
        bool,
        typer.Option(
            "--gate", metavar="", help="Hold a lease exactly while the command runs (any program)."
        ),
    ] = False,
    gpus: Annotated[int, typer.Option(metavar="N", help="GPUs to ask for.")] = 1,
    memory: Annotated[
        str | None,
        typer.Option(
            metavar="SIZE", help="Memory needed per GPU, e.g. 10GiB (default: the whole GPU)."
        ),
    ] = None,
    priority: Annotated[int, typer.Option(metavar="P", help="Higher is served first.")] = 0,
    label: Annotated[
        str, typer.Option(metavar="TEXT", help="Shown in status and the event log.")
    ] = "",
    timeout: Annotated[
        float | None,
        typer.Option(metavar="SECONDS", help="Give up after this long waiting (exit 2)."),
    ] = None,
    auto: Annotated[
        bool,
        typer.Option(
            "--auto", metavar="", help="PyTorch: hold a GPU only while the program uses it."
        ),
    ] = False,
    idle_ms: Annotated[
        float | None,
        typer.Option(
            metavar="MS", help="--auto: give the GPU back after this idle time (env ACB_IDLE_MS)."
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            metavar="DEVICE", help="--auto: managed device, cuda or cpu (env ACB_AUTO_DEVICE)."
        ),
    ] = "",
) -> None:
    """Run CMD with GPUs from the node's assigner (acb-slurm). Pick a mode:

    --gate holds the GPUs while the whole command runs, for any framework (JAX, TensorFlow,
    PyTorch, a binary); the command sees them in CUDA_VISIBLE_DEVICES. --auto runs an unmodified
    PyTorch program and holds a GPU only while it uses one. Outside an acb-sbatch job, set
    ACB_ASSIGNER to the socket of a running acb-assigner.

    Examples:

    \b
      acb-run --gate -- python fold.py
      acb-run --gate --gpus 2 --memory 20GiB -- python fold.py --model multimer
      acb-run --gate --timeout 600 --label msa -- ./run_alphafold.sh input.fasta
      acb-run --auto -- python train.py
      ACB_WORKER=worker-3 acb-run --gate -- python fold.py   # name the worker in logs
    """
    if auto and not gate:
        _run_auto(command or [], idle_ms, device, memory, priority, label)
    if not gate:
        typer.echo(ctx.get_help(), err=True)
        typer.echo(f"acb-run: {MODES_HELP}", err=True)
        raise typer.Exit(2)
    from acb_slurm.launcher.gate import GateError, GateSpec, run_gated

    try:
        memory_bytes = parse_size(memory) if memory is not None else 0
    except ValueError as exc:
        _fail(f"--memory: {exc}")
    spec = GateSpec(
        command=command or [],
        gpus=gpus,
        memory_bytes=memory_bytes,
        priority=priority,
        label=label,
        timeout=timeout,
    )
    try:
        code = run_gated(spec)
    except TimeoutError as exc:
        _fail(str(exc))
    except (AssignerError, GateError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("acb-run: interrupted while waiting for GPUs", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(code)


def _run_auto(
    command: list[str],
    idle_ms: float | None,
    device: str,
    memory: str | None,
    priority: int,
    label: str,
) -> None:
    from acb_slurm.launcher.auto import AutoError, AutoSpec, run_auto
    from acb_slurm.launcher.gate import GateError

    try:
        spec = AutoSpec(
            command=command,
            device=device,
            idle_ms=idle_ms,
            memory_bytes=parse_size(memory) if memory is not None else 0,
            priority=priority,
            label=label,
        )
        code = run_auto(spec)
    except ValueError as exc:
        _fail(f"--memory: {exc}")
    except (AssignerError, AutoError, GateError) as exc:  # GateError: command not found
        _fail(str(exc))
    raise typer.Exit(code)


def _fail(message: str) -> None:
    typer.echo(f"acb-run: {message}", err=True)
    raise typer.Exit(2)


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
