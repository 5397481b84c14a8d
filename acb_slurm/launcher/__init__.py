"""`acb-run`: run a program under the node's assigner (`gate`: process-level; `auto`: PyTorch).

`acb_run_argv` is the one builder of `acb-run` command lines (the Slurm batch script, campaign
stages); this module imports nothing heavy, so either may use it cheaply.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

#: The modes of `acb-run`.
MODES = ("gate", "auto")


def acb_run_path() -> str:
    """Path of `acb-run`: beside this Python (a venv) or on PATH; FileNotFoundError if neither."""
    beside = os.path.join(os.path.dirname(sys.executable), "acb-run")
    if os.path.exists(beside):
        return beside
    found = shutil.which("acb-run")
    if found is None:
        raise FileNotFoundError(
            "acb-run not found beside the Python interpreter or on PATH; install acb-slurm in "
            "the environment that runs it"
        )
    return found


def acb_run_argv(
    mode: str,
    command: Sequence[str] = (),
    *,
    label: str | None = None,
    priority: int | None = None,
    gpus: int | None = None,
    memory: int | str | None = None,
    bin_dir: str | None = None,
    program: str | None = None,
) -> list[str]:
    """``acb-run --MODE [options] -- COMMAND...``; an option left None (or a zero/empty memory)
    is not written. The program is `program`, else ``BIN_DIR/acb-run``, else `acb_run_path()`.
    Without `command` the line ends with ``--`` (for a caller that appends the command)."""
    if mode not in MODES:
        raise ValueError(f"acb-run mode must be one of {', '.join(MODES)}, not {mode!r}")
    if program is None:
        program = f"{bin_dir}/acb-run" if bin_dir is not None else acb_run_path()
    argv = [program, f"--{mode}"]
    if label is not None:
        argv += ["--label", label]
    if priority is not None:
        argv += ["--priority", str(priority)]
    if gpus is not None:
        argv += ["--gpus", str(gpus)]
    if memory:
        argv += ["--memory", str(memory)]
    return [*argv, "--", *command]
