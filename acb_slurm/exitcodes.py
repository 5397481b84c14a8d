"""Exit statuses of `acb-run` and of programs under it, apart from the command's own.

A command's own status (0-255, 128+N for a signal) comes back unchanged. acb-run's own failures
use the BSD sysexits numbers, which programs seldom use for themselves, so a job script or a
campaign can tell "the command failed" from "acb-run could not run it" from "the GPU was taken
away". Imported by the launcher and by automatic mode inside the program: no dependencies.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    #: Bad command line: an unknown flag, a flag of the other mode, no mode, no command.
    USAGE = 64
    #: The request can never be granted here (more GPUs or memory than the node has), or a
    #: setting acb-run was given is wrong (ACB_IDLE_MS, --device, --memory).
    BAD_REQUEST = 65
    #: No assigner to talk to: ACB_ASSIGNER unset, unreachable, unsafe socket, token refused.
    ASSIGNER_UNAVAILABLE = 69
    #: The lease was lost while the command held it (assigner gone, session dropped, lease
    #: taken back): the command was stopped rather than run on a GPU it no longer holds.
    LEASE_LOST = 70
    #: No GPU was granted within --timeout, or the gang failed before its grant (--gang).
    NO_GRANT = 75
    #: The command could not be started (not found, not executable).
    CANNOT_START = 127
    #: Interrupted (SIGINT) while waiting for GPUs.
    INTERRUPTED = 130


#: What each status means, as `--help` says it.
MEANING = {
    ExitCode.USAGE: "bad command line",
    ExitCode.BAD_REQUEST: "a request or setting that cannot be served (more GPUs than exist, ...)",
    ExitCode.ASSIGNER_UNAVAILABLE: "no assigner to talk to (ACB_ASSIGNER unset, unreachable, ...)",
    ExitCode.LEASE_LOST: "the lease was lost while the command ran; the command was stopped",
    ExitCode.NO_GRANT: "no GPU granted within --timeout (or the gang failed before its grant)",
    ExitCode.CANNOT_START: "the command cannot be started",
    ExitCode.INTERRUPTED: "interrupted while waiting for GPUs",
}
HELP = "exit status: the command's own, or\n" + "\n".join(
    f"  {code:3d}  {meaning}" for code, meaning in MEANING.items()
)
