"""`acb-assigner`: parse flags into an AssignerConfig and run the daemon; errors end as one line."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from typing import Annotated

import typer

from acb_slurm import defaults, tls
from acb_slurm.assigner.errors import AssignerStartError
from acb_slurm.assigner.inventory import nvml_inventory, virtual_inventory
from acb_slurm.assigner.server import AssignerConfig, serve
from acb_slurm.scheduler.types import UnknownPolicy
from acb_slurm.units import parse_size

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def read_token(token_file: str) -> str:
    """The job's token from its file; AssignerStartError if the file is not private (group or
    others could read it) or the token cannot travel as gRPC metadata (printable ASCII)."""
    try:
        with open(token_file, "rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            raw = fh.read()
    except OSError as exc:
        raise AssignerStartError(f"cannot read --token-file {token_file}: {exc}") from None
    if mode & 0o044:
        raise AssignerStartError(
            f"--token-file {token_file} is mode {mode:04o}: group or others can read the job's "
            f"token; chmod 600 {token_file}",
            exit_code=2,
        )
    token = raw.strip()
    if not token:
        raise AssignerStartError(f"--token-file {token_file} is empty", exit_code=2)
    if not all(0x20 <= byte < 0x7F for byte in token):
        raise AssignerStartError(
            f"--token-file {token_file}: the token must be printable ASCII (it travels as gRPC "
            "metadata); e.g. make one with: od -An -N32 -tx1 /dev/urandom | tr -d ' \\n'",
            exit_code=2,
        )
    return token.decode("ascii")


def build_config(
    socket_path: str,
    tcp: str | None,
    policy: str,
    virtual_gpus: int | None,
    gpu_memory: str | None,
    event_log: str | None,
    token_file: str | None,
    ready_file: str | None,
    controller: str | None,
    time_slice: float = 0.0,
    tls_dir: str | None = None,
    insecure_tcp: bool = False,
    node: str | None = None,
) -> AssignerConfig:
    """Validate the flags into a config; AssignerStartError says what is wrong."""
    from acb_slurm.scheduler import get_policy

    try:
        get_policy(policy)
    except UnknownPolicy as exc:
        raise AssignerStartError(str(exc), exit_code=2) from None
    if virtual_gpus is not None:
        if gpu_memory is None:
            raise AssignerStartError(
                "--virtual-gpus needs --gpu-memory (the memory of each virtual GPU, e.g. 80GiB)",
                exit_code=2,
            )
        try:
            memory = parse_size(gpu_memory)
        except ValueError as exc:
            raise AssignerStartError(f"--gpu-memory: {exc}", exit_code=2) from None
        gpus = virtual_inventory(virtual_gpus, memory)
    elif gpu_memory is not None:
        raise AssignerStartError(
            "--gpu-memory is only for virtual GPUs: add --virtual-gpus N, or drop it to use the "
            "memory NVML reports",
            exit_code=2,
        )
    else:
        gpus = nvml_inventory()
    token = None if token_file is None else read_token(token_file)
    if tcp is not None and ":" not in tcp:
        raise AssignerStartError(f"--tcp wants HOST:PORT (port 0 = any), got {tcp!r}", exit_code=2)
    if not time_slice >= 0:  # also refuses NaN
        raise AssignerStartError(
            f"--time-slice wants seconds >= 0 (0 = never ask holders to yield), got {time_slice}",
            exit_code=2,
        )
    if controller is not None and ":" not in controller:
        raise AssignerStartError(
            f"--controller wants HOST:PORT of the controller's TCP address, got {controller!r}",
            exit_code=2,
        )
    material = tls_material(tcp, controller, tls_dir, insecure_tcp)
    if node is not None and not node.strip():
        raise AssignerStartError("--node wants a node name, got an empty one", exit_code=2)
    config = AssignerConfig(
        socket_path=os.path.abspath(socket_path),
        gpus=gpus,
        policy=policy,
        tcp=tcp,
        event_log=event_log,
        token=token,
        ready_file=ready_file,
        controller=controller,
        time_slice=time_slice,
        tls=material,
        insecure_tcp=insecure_tcp,
    )
    if node:
        config.node = node
    return config


def tls_material(
    tcp: str | None, controller: str | None, tls_dir: str | None, insecure_tcp: bool
) -> tls.Material | None:
    """The job's TLS material for the TCP listener and the link to the controller; refuses TCP
    without it unless --insecure-tcp says plaintext on purpose."""
    if tls_dir is not None and insecure_tcp:
        raise AssignerStartError(
            "--tls-dir and --insecure-tcp contradict each other: choose one", exit_code=2
        )
    if tls_dir is not None:
        try:
            return tls.load(tls_dir)
        except tls.TlsError as exc:
            raise AssignerStartError(f"--tls-dir: {exc}", exit_code=2) from None
    if (tcp is not None or controller is not None) and not insecure_tcp:
        flag = "--tcp" if tcp is not None else "--controller"
        raise AssignerStartError(
            f"{flag} needs --tls-dir DIR (the job's TLS material, made by `acb-assigner "
            "tls-init DIR`): over TCP the job's token and session keys would cross the network "
            "in clear. For a test on a machine nobody else uses, --insecure-tcp allows "
            "plaintext",
            exit_code=2,
        )
    return None


@app.command()
def assigner(
    socket: Annotated[
        str,
        typer.Option(
            "--socket",
            metavar="PATH",
            help="Unix socket to listen on. Its directory must be this user's and writable by "
            "nobody else (it is made 0700 if missing).",
        ),
    ],
    tcp: Annotated[
        str | None,
        typer.Option(metavar="HOST:PORT", help="Also listen on TCP (port 0 = ephemeral)."),
    ] = None,
    policy: Annotated[
        str,
        typer.Option(
            metavar="NAME",
            help="Scheduling policy: simple, gpu-sharing (spreads, then shares), "
            "gpu-sharing:pack (shares first) or gpu-affinity.",
        ),
    ] = defaults.POLICY,
    virtual_gpus: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Declare N virtual GPUs instead of asking NVML (machines without GPUs).",
        ),
    ] = None,
    gpu_memory: Annotated[
        str | None, typer.Option(metavar="SIZE", help="Memory of each virtual GPU, e.g. 80GiB.")
    ] = None,
    event_log: Annotated[
        str | None, typer.Option(metavar="PATH", help="Append JSON-lines events to this file.")
    ] = None,
    token_file: Annotated[
        str | None,
        typer.Option(
            metavar="PATH",
            help="Refuse calls whose x-acb-token is not this file's content (printable ASCII; "
            "the file must be readable by this user only, e.g. 0600).",
        ),
    ] = None,
    ready_file: Annotated[
        str | None,
        typer.Option(
            metavar="PATH",
            help="Write JSON {pid, socket, target, tcp, tls, node, policy} here once serving.",
        ),
    ] = None,
    controller: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT", help="Join this controller as an executor (multi-node jobs)."
        ),
    ] = None,
    time_slice: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="While a request waits, ask each holder to yield once it has held its lease "
            "this long (0 = never).",
        ),
    ] = 0.0,
    tls_dir: Annotated[
        str | None,
        typer.Option(
            metavar="DIR",
            help="The job's TLS material (ca.pem, cert.pem, key.pem, each 0600; made by "
            "`acb-assigner tls-init DIR`): the TCP listener speaks TLS and accepts only clients "
            "with the job's certificate, and --controller is reached over TLS. Needed with "
            "--tcp or --controller.",
        ),
    ] = None,
    insecure_tcp: Annotated[
        bool,
        typer.Option(
            "--insecure-tcp",
            help="Allow --tcp/--controller without TLS (token in clear: tests and development "
            "only).",
        ),
    ] = False,
    node: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="This node's name in the job's pool (gangs name their members' nodes by it); "
            "default: SLURMD_NODENAME, else the host name.",
        ),
    ] = None,
) -> None:
    """Run the GPU assigner of one node of a job: leases, sessions, event log.

    acb-sbatch's prologue starts one per node; start one by hand to share a machine's GPUs
    between programs that use the client API or run under acb-run.

    \b
    Examples:
      acb-assigner --socket /tmp/acb/assigner.sock                  # the node's GPUs (NVML)
      acb-assigner --socket /tmp/acb/assigner.sock --virtual-gpus 2 --gpu-memory 16GiB \\
          --policy gpu-sharing --event-log events.jsonl
      export ACB_ASSIGNER=unix:/tmp/acb/assigner.sock               # then, in another shell:
      acb-run --gate -- python fold.py
      acb-assigner tls-init "$ACB_RUN_DIR/tls"                      # multi-node: TLS material,
      acb-assigner --socket ... --tcp node1:0 --tls-dir "$ACB_RUN_DIR/tls"   # then TCP with it
    """
    try:
        config = build_config(
            socket,
            tcp,
            policy,
            virtual_gpus,
            gpu_memory,
            event_log,
            token_file,
            ready_file,
            controller,
            time_slice,
            tls_dir,
            insecure_tcp,
            node,
        )
        asyncio.run(serve(config))
    except AssignerStartError as exc:
        typer.echo(f"acb-assigner: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None


tls_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@tls_app.command()
def tls_init(
    directory: Annotated[
        str, typer.Argument(metavar="DIR", help="Where to write ca.pem, cert.pem, key.pem.")
    ],
) -> None:
    """Make a job's TLS material for the assigners' TCP traffic (run once per job, before the
    assigners start; every node reads the same DIR).

    \b
    Writes DIR/ca.pem (a new CA; its key is not kept), DIR/cert.pem and DIR/key.pem (the job's
    certificate, name "acb-assigner", for servers and clients), each 0600; DIR is made 0700 when
    missing. Existing files are never overwritten (exit 1).
    Then: acb-assigner ... --tcp HOST:0 --tls-dir DIR, and ACB_TLS_DIR=DIR for TCP clients.
    """
    from acb_slurm import env

    try:
        material = tls.init(directory, job=env.job_id())
    except tls.TlsError as exc:
        typer.echo(f"acb-assigner tls-init: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(material.directory)


def main() -> None:
    """Console-script entry point (`acb-assigner tls-init DIR` makes a job's TLS material)."""
    if sys.argv[1:2] == ["tls-init"]:
        sys.exit(tls_app(args=sys.argv[2:], prog_name="acb-assigner tls-init"))
    sys.exit(app())


if __name__ == "__main__":
    main()
