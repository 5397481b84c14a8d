"""`acb-run`: run a program under the node's assigner. Thin: flags → spec → mode function.

Read with the standard library's argparse, unlike the other commands (typer): acb-run starts
every worker and sits in front of the program it wraps, and typer validates every value through
pydantic, about 0.19 s of CPU before the command starts, more than half of what `acb-run --auto`
may add to a program (benchmarks/auto_startup_bench.py). argparse reads the same line in ~10 ms.

Failures of acb-run itself exit with the statuses of `acb_slurm.exitcodes`, never with a
traceback; the command's own status comes back unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from acb_slurm.exitcodes import HELP as EXIT_HELP
from acb_slurm.exitcodes import ExitCode

MODES_HELP = (
    "pick a mode: --gate holds GPUs while the whole command runs (any framework), e.g.\n"
    "  acb-run --gate --gpus 1 -- python predict.py\n"
    "or --auto holds a GPU only while an unmodified PyTorch program uses it, e.g.\n"
    "  acb-run --auto -- python train.py\n"
    "or --gang NAME runs one node's part of a multi-node program (torchrun), e.g.\n"
    "  srun --nodes 2 --ntasks-per-node 1 acb-run --gang train --gpus 2 -- torchrun \\\n"
    "      --nproc-per-node 2 train.py"
)

DESCRIPTION = """\
Run CMD with GPUs from the node's assigner (acb-slurm). Pick a mode:

--gate holds the GPUs while the whole command runs, for any framework (JAX, TensorFlow,
PyTorch, a binary); the command sees them in CUDA_VISIBLE_DEVICES. --auto runs an unmodified
PyTorch program and holds a GPU only while it uses one. --gang NAME is one node's member of a
gang: run it on each of the K nodes of a multi-node program (one task per node); all of them
start CMD at once when --gpus GPUs are granted on every node, with torchrun's PET_NNODES,
PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT set, and all stop when one fails. Outside an
acb-sbatch job, set ACB_ASSIGNER to the socket of a running acb-assigner."""

EXAMPLES = """\
examples:
  acb-run --gate -- python fold.py
  acb-run --gate --gpus 2 --memory 20GiB -- python fold.py --model multimer
  acb-run --gate --timeout 600 --label msa -- ./run_alphafold.sh input.fasta
  acb-run --auto -- python train.py
  ACB_WORKER=worker-3 acb-run --gate -- python fold.py   # name the worker in logs
  acb-run --gang train-r0 --gpus 2 -- torchrun --nproc-per-node 2 train.py  # on each node

"""

#: Flags that mean something in some modes only: flag → (argparse dest, those modes).
MODE_ONLY = {
    "--gpus": ("gpus", ("gate", "gang")),
    "--timeout": ("timeout", ("gate", "gang")),
    "--memory": ("memory", ("gate", "auto")),
    "--idle-ms": ("idle_ms", ("auto",)),
    "--device": ("device", ("auto",)),
    "--gang-nodes": ("gang_nodes", ("gang",)),
}


@dataclass(frozen=True)
class Launch:
    """A command line, read: what `launch` runs."""

    mode: str
    command: list[str]
    gpus: int = 1
    memory: str | None = None
    priority: int = 0
    label: str = ""
    timeout: float | None = None
    idle_ms: float | None = None
    device: str = ""
    gang: str = ""
    gang_nodes: int = 0


class UsageParser(argparse.ArgumentParser):
    """argparse whose mistakes exit with `ExitCode.USAGE` (64), saying `<prog>: <message>`
    after the usage line (acb-run, acb-launch)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(int(ExitCode.USAGE))


def parser() -> argparse.ArgumentParser:
    p = UsageParser(
        prog="acb-run",
        usage="acb-run (--gate | --auto | --gang NAME) [OPTIONS] -- CMD [ARGS...]",
        description=DESCRIPTION,
        epilog=EXAMPLES + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    mode = p.add_argument_group("mode (one of)").add_mutually_exclusive_group()
    mode.add_argument(
        "--mode",
        choices=("gate", "auto"),
        help="gate: hold a lease exactly while the command runs (any program); auto: PyTorch, "
        "hold a GPU only while the program uses it",
    )
    mode.add_argument(
        "--gate", dest="mode", action="store_const", const="gate", help="same as --mode gate"
    )
    mode.add_argument(
        "--auto", dest="mode", action="store_const", const="auto", help="same as --mode auto"
    )
    mode.add_argument(
        "--gang",
        metavar="NAME",
        help="this node's member of gang NAME (one per node; every member gives the same NAME, "
        "unique to this run of the program within the job)",
    )
    both = p.add_argument_group("all modes")
    both.add_argument(
        "--memory",
        metavar="SIZE",
        help="--gate/--auto: memory needed per GPU, e.g. 10GiB (default: the whole GPU; a gang "
        "always takes whole GPUs)",
    )
    both.add_argument(
        "--priority", metavar="P", type=int, default=0, help="higher is served first (default 0)"
    )
    both.add_argument(
        "--label", metavar="TEXT", default="", help="shown in status and the event log"
    )
    gate = p.add_argument_group("--gate and --gang")
    gate.add_argument(
        "--gpus", metavar="N", type=int, help="GPUs to ask for (--gang: on each node; default 1)"
    )
    gate.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        help=f"give up after this long waiting (exit {ExitCode.NO_GRANT:d}; a gang member that "
        "gives up fails the gang for every member)",
    )
    gang = p.add_argument_group("--gang only")
    gang.add_argument(
        "--gang-nodes",
        metavar="K",
        type=int,
        help="how many nodes (members) the gang has (default: SLURM_STEP_NUM_NODES, the srun "
        "step's node count)",
    )
    auto = p.add_argument_group("--auto only")
    auto.add_argument(
        "--idle-ms",
        metavar="MS",
        type=float,
        help="give the GPU back after this idle time (env ACB_IDLE_MS)",
    )
    auto.add_argument(
        "--device", metavar="DEVICE", help="managed device, cuda or cpu (env ACB_AUTO_DEVICE)"
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD", help=argparse.SUPPRESS)
    return p


def read(argv: Sequence[str]) -> Launch:
    """Read a command line; a mistake exits with `ExitCode.USAGE` and says what to write."""
    p = parser()
    args = p.parse_args(list(argv))
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if args.gang is not None:
        args.mode = "gang"
    if args.mode is None:
        p.print_usage(sys.stderr)
        _fail(MODES_HELP, ExitCode.USAGE)
    wrong = [
        flag
        for flag, (dest, modes) in MODE_ONLY.items()
        if args.mode not in modes and getattr(args, dest) is not None
    ]
    if wrong:
        _fail(f"{', '.join(wrong)}: not an option of --{args.mode}", ExitCode.USAGE)
    gang_nodes = 0
    if args.mode == "gang":
        if not args.gang.strip():
            _fail("--gang wants the gang's name, got an empty one", ExitCode.USAGE)
        gang_nodes = _gang_nodes(args.gang_nodes)
    if not command:
        _fail(
            f"no command to run: put it after `--`, e.g. acb-run --{args.mode} -- python x.py",
            ExitCode.USAGE,
        )
    return Launch(
        mode=args.mode,
        command=command,
        gpus=1 if args.gpus is None else args.gpus,
        memory=args.memory,
        priority=args.priority,
        label=args.label,
        timeout=args.timeout,
        idle_ms=args.idle_ms,
        device=args.device or "",
        gang=args.gang or "",
        gang_nodes=gang_nodes,
    )


def _gang_nodes(given: int | None) -> int:
    """--gang-nodes, else the srun step's node count; at least 1."""
    import os

    if given is None:
        step = os.environ.get("SLURM_STEP_NUM_NODES", "")
        if not step.isdigit():
            _fail(
                "--gang: how many nodes? give --gang-nodes K (outside an srun step, "
                "SLURM_STEP_NUM_NODES is not there to say it)",
                ExitCode.USAGE,
            )
        given = int(step)
    if given < 1:
        _fail(f"--gang-nodes wants a count >= 1, got {given}", ExitCode.USAGE)
    return given


def launch(spec: Launch) -> int:
    """Run the command in its mode; returns its exit status (--auto execs the command in place:
    it returns only by failing). Exits with an `ExitCode` and the reason when it cannot."""
    from acb_slurm.units import parse_size

    try:
        memory_bytes = parse_size(spec.memory) if spec.memory is not None else 0
    except ValueError as exc:
        _fail(f"--memory: {exc}", ExitCode.USAGE)
    try:
        if spec.mode == "gang":
            from acb_slurm.launcher.gang import GangSpec, run_gang

            return run_gang(
                GangSpec(
                    command=spec.command,
                    gang=spec.gang,
                    node_count=spec.gang_nodes,
                    gpus_per_node=spec.gpus,
                    priority=spec.priority,
                    label=spec.label,
                    timeout=spec.timeout,
                )
            )
        if spec.mode == "auto":
            from acb_slurm.launcher.auto import AutoSpec, run_auto

            run_auto(
                AutoSpec(
                    command=spec.command,
                    device=spec.device,
                    idle_ms=spec.idle_ms,
                    memory_bytes=memory_bytes,
                    priority=spec.priority,
                    label=spec.label,
                )
            )
        from acb_slurm.launcher.gate import GateSpec, run_gated

        return run_gated(
            GateSpec(
                command=spec.command,
                gpus=spec.gpus,
                memory_bytes=memory_bytes,
                priority=spec.priority,
                label=spec.label,
                timeout=spec.timeout,
            )
        )
    except KeyboardInterrupt:
        _fail("interrupted while waiting for GPUs", ExitCode.INTERRUPTED)
    except Exception as exc:
        code = exit_code_of(exc)
        if code is None:
            raise
        _fail(str(exc), code)


def exit_code_of(exc: BaseException) -> ExitCode | None:
    """The status for one of acb-run's own failures; None for anything else (a bug: raise)."""
    from acb_slurm.client import errors
    from acb_slurm.launcher.auto import AutoError
    from acb_slurm.launcher.gate import GateError

    if isinstance(exc, (TimeoutError, errors.GangAborted)):
        return ExitCode.NO_GRANT
    if isinstance(exc, (errors.InvalidGpuRequest, errors.GrantImpossible)):
        return ExitCode.BAD_REQUEST
    if isinstance(exc, errors.AssignerError):
        return ExitCode.ASSIGNER_UNAVAILABLE
    if isinstance(exc, (AutoError, GateError)):
        return getattr(exc, "exit_code", ExitCode.BAD_REQUEST)
    return None


def _fail(message: str, code: ExitCode) -> NoReturn:
    print(f"acb-run: {message}", file=sys.stderr)
    raise SystemExit(int(code))


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    spec = read(sys.argv[1:] if argv is None else argv)
    sys.exit(launch(spec))


if __name__ == "__main__":
    main()
