"""`acb-run`: run a program under the node's assigner. Thin: flags → spec → mode function."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from acb_slurm.client.errors import AssignerError
from acb_slurm.units import parse_size

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
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
        list[str] | None, typer.Argument(help="The command to run, after `--`.")
    ] = None,
    gate: Annotated[
        bool, typer.Option("--gate", help="Hold a lease exactly while the command runs.")
    ] = False,
    gpus: Annotated[int, typer.Option(help="GPUs to ask for.")] = 1,
    memory: Annotated[
        str | None, typer.Option(help="Memory needed per GPU, e.g. 10GiB (default: whole GPU).")
    ] = None,
    priority: Annotated[int, typer.Option(help="Higher is served first.")] = 0,
    label: Annotated[str, typer.Option(help="Shown in status and the event log.")] = "",
    timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds of waiting (exit 2).")
    ] = None,
    auto: Annotated[
        bool,
        typer.Option("--auto", help="PyTorch: hold a GPU only while the program uses it."),
    ] = False,
    idle_ms: Annotated[
        float | None,
        typer.Option(help="--auto: give the GPU back after this idle time (env ACB_IDLE_MS)."),
    ] = None,
    device: Annotated[
        str, typer.Option(help="--auto: managed device, cuda or cpu (env ACB_AUTO_DEVICE).")
    ] = "",
) -> None:
    """Run CMD with GPUs from the node's assigner (acb-slurm)."""
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
    except (AssignerError, AutoError) as exc:
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
