"""Fixed cost of `acb-run --auto` on a program's start and exit, against running it plainly.

    .venv/bin/python benchmarks/auto_startup_bench.py [--repeats 5] [--warmup 1]

Starts its own acb-assigner with one virtual GPU, then runs, interleaved (the order rotates from
one repetition to the next), a small torch program (``import torch; x = torch.ones(3);
print(x.sum())``) plainly and under ``acb-run --auto --device cpu``; and, to show the launcher
alone, an empty program (``pass``: no torch, so no install and no grant) plainly, under
``acb-run --auto`` and under ``acb-run --gate`` (which holds a lease around it). Under --auto the
torch program goes through everything automatic mode adds: the launcher (which execs the program
in place), the boot sitecustomize, the install when torch is imported (client, hooks, watchdog),
the first grant (session and Allocate) and the exit handlers (watchdog stopped, session ended);
the assigner's event log is checked for one grant per run.

Printed per case: median and minimum wall time, and median CPU time of the whole process tree
(user + system, from wait4). Then the added fixed cost: median under --auto minus median plain,
in wall and CPU time; the median of the paired differences (the two runs of one repetition ran
close in time) and the difference of the minima, steadier when other work loads the machine; and
the ratio, against the target of at most 0.3 s. The torch import alone varies by ±0.15 s from
run to run: with the default 5 repetitions the medians move by about that much, --repeats 15
gives numbers steady to a few hundredths. ``acb-run`` is the console script beside this Python
(else ``python -m acb_slurm.launcher.cli``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from acb_slurm.assigner.testing import AssignerProcess

TORCH_PROGRAM = "import torch; x = torch.ones(3); print(x.sum())"
EMPTY_PROGRAM = "pass"
#: What `acb-run --auto` may add to a program's start and exit, in seconds.
TARGET_S = 0.3


def acb_run() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "acb-run")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "acb_slurm.launcher.cli"]


@dataclass
class Case:
    name: str
    argv: list[str]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def run(self, environ: dict[str, str]) -> None:
        with tempfile.TemporaryFile() as err:
            start = time.perf_counter()
            proc = subprocess.Popen(self.argv, env=environ, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                err.seek(0)
                detail = err.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name}: exit {proc.returncode}\n{detail}")
        self.wall.append(wall)
        self.cpu.append(usage.ru_utime + usage.ru_stime)

    def row(self) -> str:
        return (
            f"{self.name:<34} {statistics.median(self.wall):8.3f} {min(self.wall):8.3f} "
            f"{statistics.median(self.cpu):8.3f}"
        )


def added(auto: Case, plain: Case) -> str:
    """Median under --auto minus median plain, wall and CPU, and the ratio of the medians; also
    the median of the paired differences (the two runs of one repetition ran close in time, so
    a change of load on a shared machine cancels) and the difference of the minima."""
    wall = statistics.median(auto.wall) - statistics.median(plain.wall)
    cpu = statistics.median(auto.cpu) - statistics.median(plain.cpu)
    paired = statistics.median(a - p for a, p in zip(auto.wall, plain.wall, strict=True))
    fastest = min(auto.wall) - min(plain.wall)
    ratio = statistics.median(auto.wall) / statistics.median(plain.wall)
    verdict = "within" if wall <= TARGET_S else "ABOVE"
    return (
        f"{wall:+.3f} s wall ({cpu:+.3f} s CPU; paired {paired:+.3f} s, minima {fastest:+.3f} s), "
        f"ratio {ratio:.2f}x: {verdict} the {TARGET_S:g} s target"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each case first")
    args = parser.parse_args()

    python, run = sys.executable, acb_run()
    auto = [*run, "--auto", "--device", "cpu", "--"]
    torch_plain = Case("torch program, plain", [python, "-c", TORCH_PROGRAM])
    torch_auto = Case("torch program, acb-run --auto", [*auto, python, "-c", TORCH_PROGRAM])
    empty_plain = Case("empty program, plain", [python, "-c", EMPTY_PROGRAM])
    empty_auto = Case("empty program, acb-run --auto", [*auto, python, "-c", EMPTY_PROGRAM])
    empty_gate = Case(
        "empty program, acb-run --gate", [*run, "--gate", "--", python, "-c", EMPTY_PROGRAM]
    )
    cases = [torch_plain, torch_auto, empty_plain, empty_auto, empty_gate]

    with (
        tempfile.TemporaryDirectory(prefix="acb-startup-") as tmp,
        AssignerProcess(tmp, gpus=1, gpu_memory="80GiB") as assigner,
    ):
        environ = assigner.client_env()
        for _ in range(args.warmup):
            for case in cases:
                case.run(environ)
                case.wall.clear()
                case.cpu.clear()
        grants_before = sum(e["event"] == "grant" for e in assigner.events())
        for i in range(args.repeats):
            shift = i % len(cases)
            for case in cases[shift:] + cases[:shift]:
                case.run(environ)
        grants = sum(e["event"] == "grant" for e in assigner.events()) - grants_before

    # One grant per --auto torch run, one per --gate run: automatic mode really ran.
    expected = 2 * args.repeats
    print(f"acb-run: {' '.join(run)}; python: {python}; {args.repeats} runs of each case")
    print(f"{'case':<34} {'median s':>8} {'min s':>8} {'CPU s':>8}")
    for case in cases:
        print(case.row())
    print(f"added by --auto to the torch program: {added(torch_auto, torch_plain)}")
    print(f"added by --auto to the empty program: {added(empty_auto, empty_plain)}")
    print(f"added by --gate to the empty program: {added(empty_gate, empty_plain)}")
    if grants != expected:
        print(f"WARNING: {grants} grants, expected {expected}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
