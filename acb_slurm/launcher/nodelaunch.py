"""`acb-launch`: the per-node launcher. One process starts every worker of its node.

A batch script that starts one `srun` step per worker makes 256 steps for 4 nodes x 64 workers;
sites rate-limit step creation, and each step is an srun on the batch node, a slurmstepd on the
worker's node and an `acb-run` Python (~40 MB). Instead the batch script starts one step per node
(`srun --nodes=N --ntasks-per-node=1 ... acb-launch --plan workers.json`), and this process:

- starts all of its node's workers at once, each named ``<group>-<node>-<i>`` (with
  ``a<task>-`` before the node in a job array task, as the batch script names them) in
  ``ACB_WORKER``, with its group's environment and working directory;
- gate mode: one `Client` (one session with the node's assigner) per worker, all in this
  process: acquire a lease, run the command with ``CUDA_VISIBLE_DEVICES`` (`launcher.gate`'s
  `run_gated`), release. A lost lease kills that worker's process group and ends it with
  `ExitCode.LEASE_LOST` (70), as `acb-run --gate` does; the other workers go on. Auto mode:
  the program is started directly with automatic mode's environment (what `acb-run --auto`
  sets before it execs the program; the program holds its own session). Client mode: the
  command as is;
- forwards SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 to every worker's process group. After
  SIGINT/SIGTERM/SIGHUP a worker that has not started yet (it waits for its GPU) never starts:
  it ends with 128+N. SIGUSR1/SIGUSR2 reach a waiting worker once it starts;
- restarts nothing, and writes each worker's exit status (`--report DIR`: ``DIR/<node>.codes``,
  one line per worker in plan order) for the batch script to report; its own exit status is 0
  when every worker succeeded, 1 otherwise.

Memory: one Python process per node, not one per worker. A worker costs a thread, a `Client`
(its channel to the same Unix socket; gRPC shares the connection between channels of one
target, see benchmarks/RESULTS.md) and its own command. The children's process groups are
guarded by one shared `supervise.GroupGuard`, not one guard process each.

The plan (JSON, written by the batch script into the run dir; `acb-sbatch render` shows it)::

    {"version": 1, "array_task_in_names": true,
     "groups": [{"name": "fold", "count": 8, "mode": "gate", "run_options": ["--gpus", "1"],
                 "command": ["python", "fold.py"], "env": {"K": "V"}, "workdir": null}]}

`run_options` are `acb-run` options of the group's mode, read by acb-run's own parser.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from acb_slurm import env
from acb_slurm.exitcodes import HELP as EXIT_HELP
from acb_slurm.exitcodes import ExitCode
from acb_slurm.supervise import FORWARDED_SIGNALS, GroupGuard, Supervised

__all__ = ["GroupPlan", "NodeLauncher", "Plan", "WorkerRun", "main", "plan_for_node"]

#: Signals after which a worker that has not started yet never starts.
STOPPING_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
MODES = ("gate", "auto", "client")
PLAN_VERSION = 1


class PlanError(ValueError):
    """The plan or the command line is wrong (the message says what to write)."""


@dataclass(frozen=True)
class GroupPlan:
    """One worker group: `count` workers on every node."""

    name: str
    count: int
    command: tuple[str, ...]
    mode: str = "gate"
    run_options: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "mode": self.mode,
            "run_options": list(self.run_options),
            "command": list(self.command),
            "env": dict(self.env),
            "workdir": self.workdir,
        }


@dataclass(frozen=True)
class Plan:
    """What every node's launcher runs."""

    groups: tuple[GroupPlan, ...]
    array_task_in_names: bool = False

    def to_json(self) -> str:
        """One line of JSON (the batch script writes it with printf)."""
        return json.dumps(
            {
                "version": PLAN_VERSION,
                "array_task_in_names": self.array_task_in_names,
                "groups": [g.as_json() for g in self.groups],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str, source: str = "the plan") -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{source} is not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            raise PlanError(f"{source}: not an acb-launch plan of version {PLAN_VERSION}")
        groups = []
        for i, raw in enumerate(data.get("groups") or []):
            try:
                groups.append(
                    GroupPlan(
                        name=_text(raw["name"]),
                        count=int(raw["count"]),
                        command=tuple(_text(a) for a in raw["command"]),
                        mode=_text(raw.get("mode", "gate")),
                        run_options=tuple(_text(a) for a in raw.get("run_options", ())),
                        env={_text(k): _text(v) for k, v in (raw.get("env") or {}).items()},
                        workdir=raw.get("workdir"),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise PlanError(f"{source}: groups[{i}] is malformed ({exc!r})") from None
        plan = cls(tuple(groups), bool(data.get("array_task_in_names", False)))
        plan.check()
        return plan

    def check(self) -> None:
        if not self.groups:
            raise PlanError("the plan has no worker groups")
        for i, group in enumerate(self.groups):
            where = f"groups[{i}] ({group.name})"
            if group.mode not in MODES:
                raise PlanError(f"{where}: mode {group.mode!r} is not one of {', '.join(MODES)}")
            if group.count < 0:
                raise PlanError(f"{where}: count {group.count} is negative")
            if not group.command:
                raise PlanError(f"{where}: no command")
            if group.mode == "client" and group.run_options:
                raise PlanError(f"{where}: acb-run options need mode gate or auto, not client")


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def worker_name(group: str, node: str, index: int, array_task: str | None) -> str:
    """``<group>-<node>-<i>``, ``<group>-a<task>-<node>-<i>`` in an array task: the names the
    batch script reports."""
    task = f"a{array_task}-" if array_task else ""
    return f"{group}-{task}{node}-{index}"


@dataclass
class WorkerRun:
    """One worker of this node, and what became of it."""

    name: str
    group: GroupPlan
    env: dict[str, str]
    code: int | None = None
    started: float | None = None  # time.time() when its command started
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    child: Supervised | None = None
    stop: int | None = None  # a stopping signal came before the command started
    pending: list[int] = field(default_factory=list)  # other signals, for when it starts
    client: Any = None  # its gate-mode Client, while it has one


def plan_for_node(plan: Plan, node: str, environ: Mapping[str, str]) -> list[WorkerRun]:
    """The workers of `node`, in plan order, with their environments."""
    task = environ.get("SLURM_ARRAY_TASK_ID") if plan.array_task_in_names else None
    workers = []
    for group in plan.groups:
        for i in range(group.count):
            name = worker_name(group.name, node, i, task)
            worker_env = {**environ, **group.env, env.WORKER: name}
            workers.append(WorkerRun(name, group, worker_env))
    return workers


class _Stopped(Exception):
    """A stopping signal came before the worker's command started."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} before it started")
        self.signum = signum


class NodeLauncher:
    """Runs the workers of one node (`run()` from the main thread: it owns the signals)."""

    def __init__(self, workers: Sequence[WorkerRun]) -> None:
        self.workers = list(workers)
        self._options: dict[int, Any] = {}  # acb-run options read, by group
        self._guard: GroupGuard | None = None
        self._token: str | None = None
        self._pending: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # Workers that ended, counted under `_wake_lock`: the pipe only wakes the main thread
        # (a byte may be dropped when it is full, and it is then non-empty anyway), the count
        # says how many ended. `_wake_open` is False once the pipe is closed: no worker thread
        # writes to its descriptor after that (its number may be another file's by then).
        self._wake_lock = threading.Lock()
        self._wake_open = True
        self._ended = 0
        self._closers: list[threading.Thread] = []  # closing the clients of stopped workers

    # ---- main thread ----

    def run(self) -> int:
        """Start every worker, forward signals until all have ended; 0 if all succeeded."""
        self._token = env.token()
        self._guard = GroupGuard()
        previous = {s: signal.signal(s, self._on_signal) for s in FORWARDED_SIGNALS}
        # The kernel may deliver a signal to any thread; Python runs the handler in the main
        # thread, which sleeps in os.read below: the wakeup fd wakes it whichever thread the
        # signal hit (the handler writes again once it ran, for the loop to see its signal).
        previous_wakeup = signal.set_wakeup_fd(self._wake_w)
        threads = [
            threading.Thread(target=self._run_worker, args=(w,), name=f"acb-worker-{i}")
            for i, w in enumerate(self.workers)
        ]
        try:
            for thread in threads:
                thread.start()
            while True:
                while self._pending:
                    self._deliver(self._pending.pop(0))
                with self._wake_lock:
                    if self._ended >= len(threads):
                        break
                os.read(self._wake_r, 4096)  # PEP 475: resumed after a handler
            for thread in threads:
                thread.join()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            with self._wake_lock:
                self._wake_open = False
            for closer in self._closers:
                closer.join()
            self._guard.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        return 0 if all(w.code == 0 for w in self.workers) else 1

    def _on_signal(self, signum: int, frame: object) -> None:
        self._pending.append(signum)  # handled by the main loop, outside the handler
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"s")

    def _deliver(self, signum: int) -> None:
        closing = []
        for worker in self.workers:
            with worker.lock:
                if worker.code is not None:
                    continue
                if worker.child is not None:
                    worker.child.send_signal(signum)
                elif signum in STOPPING_SIGNALS:
                    if worker.stop is None:
                        worker.stop = signum
                        if worker.client is not None:
                            closing.append(worker.client)
                else:
                    worker.pending.append(signum)
        # A worker waiting for its grant gives up once its client is closed. A close may wait
        # seconds for its session thread: each is closed on a thread of its own, so that the
        # main thread goes on handling signals (and hundreds of closes take as long as one).
        for client in closing:
            closer = threading.Thread(target=_close_quietly, args=(client,), name="acb-close")
            try:
                closer.start()
            except RuntimeError:  # no thread to be had: close it here
                _close_quietly(client)
            else:
                self._closers.append(closer)

    # ---- worker threads ----

    def _run_worker(self, worker: WorkerRun) -> None:
        try:
            worker.code = self._run(worker)
        except _Stopped as exc:
            worker.code = 128 + exc.signum
            self._say(worker, str(exc))
        except Exception as exc:
            worker.code = self._failure_code(worker, exc)
        finally:
            if worker.code is None:
                worker.code = 1
            self._wake()

    def _wake(self) -> None:
        """A worker ended: count it and wake the main thread."""
        with self._wake_lock:
            self._ended += 1
            if self._wake_open:
                # Full (BlockingIOError): the main thread has bytes to read, it wakes anyway.
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"d")

    def _failure_code(self, worker: WorkerRun, exc: Exception) -> int:
        from acb_slurm.launcher.cli import exit_code_of

        if worker.stop is not None:  # its client was closed to end its wait
            self._say(worker, f"stopped by {signal.Signals(worker.stop).name} before it started")
            return 128 + worker.stop
        code = exit_code_of(exc)
        if code is None:
            self._say(worker, f"failed: {type(exc).__name__}: {exc}")
            return 1
        self._say(worker, str(exc))
        return int(code)

    def _say(self, worker: WorkerRun, message: str) -> None:
        print(f"acb-launch: worker {worker.name}: {message}", file=sys.stderr, flush=True)

    def _run(self, worker: WorkerRun) -> int:
        group = worker.group
        if group.mode == "client":
            return self._start(worker, group.command, worker.env).wait().exit_status
        launch = self._options.get(id(group))
        if launch is None:
            launch = self._options[id(group)] = _read_run_options(group)
        memory = _memory_bytes(launch.memory)
        if group.mode == "auto":
            from acb_slurm.launcher.auto import AutoSpec, child_environment

            env.assigner_target(worker.env)  # ConfigurationError: said once, per worker
            spec = AutoSpec(
                command=group.command,
                device=launch.device,
                idle_ms=launch.idle_ms,
                memory_bytes=memory,
                priority=launch.priority,
                label=launch.label,
            )
            child_env = child_environment(spec, worker.env)
            return self._start(worker, group.command, child_env).wait().exit_status
        from acb_slurm.client.session import Client
        from acb_slurm.launcher.gate import GateSpec, run_gated

        client = Client(
            target=worker.env.get(env.ASSIGNER) or None,
            token=self._token,
            job_id=env.job_id(worker.env),
            worker=worker.name,
        )
        with worker.lock:
            if worker.stop is not None:
                raise _Stopped(worker.stop)
            worker.client = client
        try:
            return run_gated(
                GateSpec(
                    command=group.command,
                    gpus=launch.gpus,
                    memory_bytes=memory,
                    priority=launch.priority,
                    label=launch.label,
                    timeout=launch.timeout,
                ),
                client,
                environ=worker.env,
                start=lambda command, child_env: self._child(worker, command, child_env),
            )
        finally:
            client.close()

    def _child(
        self, worker: WorkerRun, command: Sequence[str], child_env: Mapping[str, str]
    ) -> Supervised:
        """The worker's supervised child, registered for signals (not started yet)."""
        child = Supervised(
            command,
            child_env,
            group=True,
            guard=self._guard or True,
            name="acb-launch",
            cwd=worker.group.workdir,
            stdin=subprocess.DEVNULL,
        )
        with worker.lock:
            if worker.stop is not None:
                raise _Stopped(worker.stop)
            worker.child = child
            for signum in worker.pending:  # kept by Supervised until the child exists
                child.send_signal(signum)
            worker.pending.clear()
        worker.started = time.time()
        return child

    def _start(
        self, worker: WorkerRun, command: Sequence[str], child_env: Mapping[str, str]
    ) -> Supervised:
        child = self._child(worker, command, child_env)
        try:
            return child.start()
        except OSError as exc:
            from acb_slurm.launcher.gate import GateError

            raise GateError(f"cannot start {command[0]!r}: {exc.strerror or exc}") from None


def _close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):
        client.close()


def _read_run_options(group: GroupPlan) -> Any:
    """The group's acb-run options, read by acb-run's own parser (a mistake: exit 64 there)."""
    from acb_slurm.launcher import cli

    return cli.read([f"--{group.mode}", *group.run_options, "--", *group.command])


def _memory_bytes(memory: str | None) -> int:
    from acb_slurm.launcher.gate import GateError
    from acb_slurm.units import parse_size

    if memory is None:
        return 0
    try:
        return parse_size(memory)
    except ValueError as exc:
        raise GateError(f"--memory: {exc}") from None


def write_report(directory: Path, node: str, workers: Sequence[WorkerRun]) -> Path:
    """``DIR/<node>.codes``: each worker's exit status, one per line, in plan order (written
    whole, then renamed into place: a reader never sees half of it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{node}.codes"
    tmp = directory / f".{node}.codes.tmp"
    tmp.write_text("".join(f"{w.code}\n" for w in workers), encoding="utf-8")
    tmp.replace(path)
    return path


def _raise_open_files_limit(workers: int) -> None:
    """A child needs a pidfd, a client a few descriptors: raise the soft limit to the hard one
    for hundreds of workers (a no-op when it is already high enough)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 64 + 8 * workers
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


# ---- command line ------------------------------------------------------------------------------

DESCRIPTION = """\
Start every worker of this node in one process (acb-slurm's per-node launcher), forward
signals to them, restart nothing, and report each worker's exit status.

The batch script that acb-sbatch renders runs it as ONE srun step per node instead of one step
per worker:

  srun --overlap --nodes=N --ntasks-per-node=1 "$ACB_RUN_DIR/node-env" \\
      acb-launch --plan "$ACB_RUN_DIR/launch/workers.json" --report "$ACB_RUN_DIR/launch"

Workers are named <group>-<node>-<i> (ACB_WORKER). Modes: gate holds a lease from this node's
assigner (ACB_ASSIGNER) exactly while the command runs, with CUDA_VISIBLE_DEVICES set (a lost
lease kills that worker's process group: exit 70); auto starts a PyTorch program in automatic
mode; client runs the command as is. SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 go to every
worker's process group; after SIGINT/SIGTERM/SIGHUP a worker still waiting for its GPU does not
start (exit 128+N)."""

EXAMPLES = """\
examples:
  acb-launch --plan workers.json --report reports/        # what a rendered job runs
  acb-launch --name fold --count 8 --gate --run-option=--memory=10GiB -- python fold.py
  acb-launch --name shell --count 2 --client -- bash -c 'echo "$ACB_WORKER"'

exit status: 0 when every worker exited 0, 1 when one did not (each worker's own status is in
DIR/<node>.codes with --report, and in the batch script's "acb: worker ..." lines); 64 for a
bad command line or plan. A worker's status is its command's, or acb-run's own:
""" + EXIT_HELP.split("\n", 1)[1]


def parser() -> argparse.ArgumentParser:
    from acb_slurm.launcher.cli import UsageParser

    p = UsageParser(
        prog="acb-launch",
        usage="acb-launch (--plan FILE | --name NAME --count N [--gate|--auto|--client] "
        "[--run-option=OPT]... -- CMD [ARGS...]) [--report DIR] [--node NODE]",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--plan", metavar="FILE", help="the workers, as JSON (written by the batch script)"
    )
    one = p.add_argument_group("one group, without a plan (acb_worker --per-node/--per-gpu)")
    one.add_argument("--name", help="the group's name: workers are NAME-<node>-<i>")
    one.add_argument("--count", type=int, metavar="N", help="workers of the group on this node")
    mode = one.add_mutually_exclusive_group()
    for name in MODES:
        mode.add_argument(
            f"--{name}",
            dest="mode",
            action="store_const",
            const=name,
            help={
                "gate": "hold a lease while the command runs (the default)",
                "auto": "PyTorch automatic mode",
                "client": "run the command as is (it talks to the assigner itself)",
            }[name],
        )
    one.add_argument(
        "--run-option",
        action="append",
        default=[],
        metavar="=OPT",
        help="an acb-run option of the mode, one per flag, written with '=': "
        "--run-option=--gpus --run-option=2, or --run-option=--memory=10GiB",
    )
    p.add_argument(
        "--report", metavar="DIR", help="write each worker's exit status to DIR/<node>.codes"
    )
    p.add_argument(
        "--node",
        help="this node's name in the workers' names (default SLURMD_NODENAME, else the host)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no summary line at the end (workers' own failures are still reported)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def read(argv: Sequence[str]) -> tuple[Plan, argparse.Namespace]:
    """The plan a command line asks for; PlanError says what is wrong."""
    args = parser().parse_args(list(argv))
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if args.plan is not None:
        if args.name is not None or args.count is not None or command or args.run_option:
            raise PlanError("--plan FILE names every worker: give no --name/--count/command")
        try:
            text = Path(args.plan).read_text(encoding="utf-8")
        except OSError as exc:
            raise PlanError(f"cannot read the plan {args.plan}: {exc.strerror or exc}") from None
        return Plan.from_json(text, args.plan), args
    if args.name is None or args.count is None or not command:
        raise PlanError(
            "give --plan FILE, or --name NAME --count N and the command after `--`, e.g. "
            "acb-launch --name fold --count 4 --gate -- python fold.py"
        )
    plan = Plan(
        (
            GroupPlan(
                name=args.name,
                count=args.count,
                command=tuple(command),
                mode=args.mode or "gate",
                run_options=tuple(args.run_option),
            ),
        )
    )
    plan.check()
    return plan, args


def _fail(message: str, code: ExitCode) -> NoReturn:
    print(f"acb-launch: {message}", file=sys.stderr, flush=True)
    raise SystemExit(int(code))


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        plan, args = read(sys.argv[1:] if argv is None else argv)
    except PlanError as exc:
        _fail(str(exc), ExitCode.USAGE)
    node = args.node or os.environ.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0]
    workers = plan_for_node(plan, node, os.environ)
    launcher = NodeLauncher(workers)
    for group in plan.groups:
        if group.mode != "client":  # a wrong option: exit 64 now, before anything starts
            launcher._options[id(group)] = _read_run_options(group)
    _raise_open_files_limit(len(workers))
    code = launcher.run()
    if args.report:
        write_report(Path(args.report), node, workers)
    if not args.quiet:
        failed = [w for w in workers if w.code != 0]
        print(
            f"acb-launch: {node}: {len(workers) - len(failed)} of {len(workers)} worker(s) "
            "exited 0",
            file=sys.stderr,
            flush=True,
        )
    sys.exit(code)


if __name__ == "__main__":
    main()
