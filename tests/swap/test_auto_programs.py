"""Real, unmodified PyTorch programs (tests/swap/programs/) run plainly and under
`acb-run --auto --device cpu` against a real assigner with one virtual GPU: same exit code, same
stdout, and an offload really happened during the program's CPU phase (sleeps of 0.25 s or more
while its tensors are alive; the idle interval is 100 ms).

Counters: `acb-run` has no flag or variable for AutoSpec.stats_file, so the harness runs the
program with ACB_AUTO_LOG_LEVEL=INFO and reads automatic mode's "acb-auto INFO offload: N storages,
..." lines from its stderr.

Each case runs its two processes at the same time (each sleeps most of its run), so the suite
costs about one program run per case.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from acb_slurm import env
from acb_slurm.assigner.testing import AssignerProcess

StartAssigner = Callable[..., AssignerProcess]
Completed = subprocess.CompletedProcess[str]
PROGRAMS = Path(__file__).parent / "programs"
ACB_RUN = [sys.executable, "-m", "acb_slurm.launcher.cli"]
AUTO = [*ACB_RUN, "--auto", "--device", "cpu", "--idle-ms", "100", "--"]
TIMEOUT_S = 120
#: One offload as automatic mode logs it at INFO (SwapStats, then the reason in parentheses).
OFFLOAD_LINE = re.compile(r"^acb-auto \w+ offload: (\d+) storages, (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Case:
    name: str  # tests/swap/programs/<name>.py, and the test id
    offload: bool = True  # False: automatic mode is expected to refuse; only correctness counts
    why: str = ""  # why a refusal is expected
    needs: str = ""  # a module the program imports besides torch (skipped without it)

    @property
    def path(self) -> Path:
        return PROGRAMS / f"{self.name}.py"


CASES = [
    Case("threads_after_import"),
    Case(
        "threads_before_import",
        offload=False,
        why="a thread started before automatic mode is live through the CPU phase: its torch "
        "calls are not seen, so the lease is kept (and the swap-out retried with a backoff)",
    ),
    Case("atexit_before_import"),
    Case("finalize_at_exit"),
    Case("nested_jagged"),
    Case("two_tensor"),
    # numpy comes with matplotlib (the dev extra), not with torch. The from_numpy storage stays
    # where it is (a SwapWarning); the TwoTensor's inner tensors move.
    Case("two_tensor_from_numpy", needs="numpy"),
    Case("save_slow_file"),
    Case("compile_cpu_phases"),
    Case("saved_for_backward"),
    Case("saved_tensors_hooks"),
    Case("jit_loaded"),
    Case("sparse_csr"),
    Case("quantized_per_channel"),
    Case("bare_storage"),
    Case("dtensor_gloo"),
    Case("train_with_threads_pool"),
]


def plain_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ACB_")}


def describe(label: str, proc: Completed) -> str:
    return (
        f"--- {label}: exit {proc.returncode}\n"
        f"--- {label} stdout\n{proc.stdout}"
        f"--- {label} stderr\n{proc.stderr}"
    )


def run_both(program: Path, auto_env: dict[str, str]) -> tuple[Completed, Completed]:
    """Run `python program` plainly and under --auto at the same time; wait for both."""
    commands = [([sys.executable, str(program)], plain_environment())]
    commands.append(([*AUTO, sys.executable, str(program)], auto_env))
    procs = [
        subprocess.Popen(
            argv,
            env=environ,
            cwd=program.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv, environ in commands
    ]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    plain, auto = done
    return plain, auto


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_an_unmodified_program_prints_the_same_under_auto_mode_and_is_offloaded(
    case: Case, start_assigner: StartAssigner
) -> None:
    if case.needs:
        pytest.importorskip(case.needs)
    assigner = start_assigner(gpus=1)
    auto_env = assigner.client_env(**{env.AUTO_LOG_LEVEL: "INFO"})
    plain, auto = run_both(case.path, auto_env)
    both = describe("plain", plain) + describe("acb-run --auto", auto)

    assert plain.returncode == 0, f"the program fails without acb-run\n{both}"
    assert (auto.returncode, auto.stdout) == (plain.returncode, plain.stdout), (
        f"{case.name}: different exit code or stdout under --auto\n{both}"
    )
    if case.offload:
        offloads = [int(m.group(1)) for m in OFFLOAD_LINE.finditer(auto.stderr)]
        assert any(n > 0 for n in offloads), (
            f"{case.name}: no storage was offloaded during the CPU phases "
            f"(offloads of {offloads} storages)\n{describe('acb-run --auto', auto)}"
        )
