"""Existing batch scripts with `eval "$(acb-sbatch prologue ...)"` pasted in, on the real Slurm.

Each script is one a user might already have: a bare `wait` for background steps, traps of its
own (set before or after the eval), strict mode with xtrace and a changed IFS/PATH/PS4, a TERM
or INT sent before the end. The prologue must live with all of them: the assigners are not jobs
of the script's shell, the script's traps run before the assigners stop, its shell options are
left as they were, and nothing but the script's own lines reaches its stdout.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .jobs import (
    ACB_SBATCH,
    RECORD_WORKER,
    REPO,
    Cluster,
    assert_exclusive_holdings,
    events,
    records,
    wait_job,
)

pytestmark = pytest.mark.slurm

PROLOGUE = f"{ACB_SBATCH} prologue --virtual-gpus 1 --gpu-memory 8GiB --startup-timeout 30"
EXAMPLE = REPO / "examples" / "slurm" / "prologue-batch.sh"


_submitted: list[str] = []


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs() -> Iterator[None]:
    """A failing test does not leave its job running on the shared cluster."""
    yield
    if _submitted:
        subprocess.run(["scancel", *_submitted], capture_output=True, check=False)
        _submitted.clear()


def _clean_env() -> dict[str, str]:
    """The test's environment without acb-slurm's variables (sbatch exports the environment)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("ACB_", "SLURM_"))}


def submit(
    tmp_path: Path,
    name: str,
    body: str,
    *,
    args: tuple[str, ...] = (),
    split: bool = False,
    nodes: int = 1,
) -> str:
    """Submit a batch script (its #SBATCH header added here) and return the job id.

    Output goes to <tmp>/<name>.out, and with `split` stderr to <tmp>/<name>.err.
    """
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        "#SBATCH --partition=acb",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --time=2:00",
        f"#SBATCH --output={tmp_path}/{name}.out",
    ]
    if split:
        header.append(f"#SBATCH --error={tmp_path}/{name}.err")
    script = tmp_path / f"{name}.sh"
    script.write_text("\n".join(header) + "\n" + textwrap.dedent(body), encoding="utf-8")
    result = subprocess.run(
        ["sbatch", "--parsable", str(script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_clean_env(),
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    _submitted.append(job_id)
    return job_id


def finish(
    tmp_path: Path, name: str, job_id: str, timeout: float = 60
) -> tuple[dict[str, str], str]:
    """Wait for the job (a script that hangs fails here, long before its time limit)."""
    record = wait_job(job_id, timeout=timeout)
    out = tmp_path / f"{name}.out"
    return record, out.read_text(encoding="utf-8", errors="replace") if out.exists() else ""


def wait_for(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def in_order(text: str, *parts: str) -> bool:
    """Every part occurs in text, in this order."""
    at = -1
    for part in parts:
        at = text.find(part, at + 1)
        if at < 0:
            return False
    return True


def test_bare_wait_returns_when_the_scripts_own_jobs_end(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    body = f"""\
        set -euo pipefail
        eval "$({PROLOGUE})"
        export ACB_TEST_RECORD={rec}
        acb_worker mine-0 -- {sys.executable} {RECORD_WORKER} &
        acb_worker mine-1 -- {sys.executable} {RECORD_WORKER} &
        sleep 1 &
        echo "jobs of the script: $(jobs -p | wc -l)"
        wait
        echo "bare wait returned after ${{SECONDS}}s"
        """
    job_id = submit(tmp_path, "acb-bare-wait", body)
    # Before the fix the bare `wait` waited for the assigners until the time limit (2 min).
    record, output = finish(tmp_path, "acb-bare-wait", job_id, timeout=45)
    assert record["JobState"] == "COMPLETED", output
    assert "jobs of the script: 3" in output  # the two workers and the sleep, no assigner
    assert in_order(output, "bare wait returned after", "acb: assigners stopped")
    log = events(tmp_path / "acb-runs" / job_id, "n1")
    assert sorted(e["worker"] for e in log if e["event"] == "grant") == ["mine-0", "mine-1"]
    assert_exclusive_holdings(log)
    assert log[-1]["event"] == "stop" and log[-1]["reason"] == "SIGINT"  # stopped by the prologue
    assert sorted(r["worker"] for r in records(rec)) == ["mine-0", "mine-1"]


def test_traps_set_before_the_eval_run_before_the_assigners_stop(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    body = f"""\
        set -euo pipefail
        scratch=$(mktemp -d {tmp_path}/scratch.XXXXXX)
        echo "scratch $scratch"
        cleanup() {{
            local status=$?
            up=$(test -S "${{ACB_ASSIGNER#unix:}}" && echo yes)
            echo "user cleanup ran: status $status, args $*, assigner up: $up"
            rm -rf "$scratch"
        }}
        trap 'cleanup "$@"' EXIT
        trap '' INT
        eval "$({PROLOGUE})"
        echo "INT after the eval: $(trap -p INT)"
        acb_worker w0 -- bash -c 'echo "w0 holds GPU $CUDA_VISIBLE_DEVICES"'
        exit 3
        """
    job_id = submit(tmp_path, "acb-traps", body, args=("first arg", "second"))
    record, output = finish(tmp_path, "acb-traps", job_id)
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "3:0", output
    # The script's own handler ran first, with the script's exit status and arguments, while the
    # assigner still ran; then the prologue stopped the assigners.
    assert in_order(
        output,
        "w0 holds GPU 0",
        "user cleanup ran: status 3, args first arg second, assigner up: yes",
        "acb: assigners stopped",
    ), output
    assert "INT after the eval: trap -- '' SIGINT" in output  # still ignored
    scratch = Path(re.search(r"^scratch (.*)$", output, re.M).group(1))  # type: ignore[union-attr]
    assert not scratch.exists()
    log = events(tmp_path / "acb-runs" / job_id, "n1")
    assert log[-1]["event"] == "stop" and log[-1]["reason"] == "SIGINT"


@pytest.mark.parametrize(("signal", "code"), [("TERM", 143), ("INT", 130)])
def test_a_signal_before_the_end_runs_the_users_handler_then_stops_the_assigners(
    slurm_cluster: Cluster, tmp_path: Path, signal: str, code: int
) -> None:
    """`scancel --batch --signal=SIG` (what `#SBATCH --signal=B:SIG@T` sends before the time
    limit): the script's handler saves state and exits, its EXIT handler cleans up, then the
    prologue stops the assigners."""
    name = f"acb-sig-{signal.lower()}"
    body = f"""\
        set -euo pipefail
        scratch=$(mktemp -d {tmp_path}/scratch.XXXXXX)
        trap 'echo "user cleanup ran"; rm -rf "$scratch"' EXIT
        save() {{
            echo "user {signal}: saving state"
            echo saved >{tmp_path}/checkpoint
            exit {code}
        }}
        trap save {signal}
        eval "$({PROLOGUE})"
        acb_worker long -- sleep 60 &
        echo started
        wait
        echo "not reached"
        """
    job_id = submit(tmp_path, name, body)
    run_dir = tmp_path / "acb-runs" / job_id

    def holding() -> bool:
        log = run_dir / "n1" / "events.jsonl"
        return log.exists() and any(e["event"] == "grant" for e in events(run_dir, "n1"))

    wait_for(holding, "the worker's grant")
    subprocess.run(["scancel", "--batch", f"--signal={signal}", job_id], check=True)
    record, output = finish(tmp_path, name, job_id, timeout=30)
    assert record["ExitCode"] == f"{code}:0", (record, output)
    assert in_order(
        output, "started", f"user {signal}: saving state", "user cleanup ran",
        "acb: assigners stopped",
    ), output  # fmt: skip
    assert "not reached" not in output
    assert (tmp_path / "checkpoint").read_text() == "saved\n"
    assert not list(tmp_path.glob("scratch.*"))
    log = events(run_dir, "n1")
    assert log[-1]["event"] == "stop" and log[-1]["reason"] == "SIGINT", log[-3:]


def test_a_term_handler_that_does_not_exit_lets_the_script_go_on(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    """The script's TERM handler only sets a flag: the script goes on as it would without the
    prologue, and the assigners still serve it (a last GPU step after the TERM)."""
    rec = tmp_path / "rec"
    rec.mkdir()
    body = f"""\
        set -euo pipefail
        stop=
        trap 'echo "TERM: finishing up"; stop=1' TERM
        eval "$({PROLOGUE})"
        echo looping
        while [[ -z $stop ]]; do sleep 0.2; done
        ACB_TEST_RECORD={rec} acb_worker final -- {sys.executable} {RECORD_WORKER}
        echo "saved after TERM"
        """
    job_id = submit(tmp_path, "acb-term-go-on", body)
    out = tmp_path / "acb-term-go-on.out"
    wait_for(lambda: out.exists() and "looping" in out.read_text(), "the loop")
    sent = time.time()
    subprocess.run(["scancel", "--batch", "--signal=TERM", job_id], check=True)
    record, output = finish(tmp_path, "acb-term-go-on", job_id)
    assert record["JobState"] == "COMPLETED", output
    assert in_order(output, "TERM: finishing up", "saved after TERM", "acb: assigners stopped")
    log = events(tmp_path / "acb-runs" / job_id, "n1")
    (grant,) = [e for e in log if e["event"] == "grant"]
    assert grant["worker"] == "final" and grant["ts"] > sent
    assert log[-1]["event"] == "stop" and log[-1]["reason"] == "SIGINT"
    assert [r["worker"] for r in records(rec)] == ["final"]


def test_a_trap_set_after_the_eval_replaces_the_prologues_and_slurm_stops_the_assigners(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    """As the prologue's header says: a later EXIT trap replaces the prologue's. Slurm then ends
    the assigner steps as the job ends (SIGTERM, a clean stop); a handler that calls
    acb_stop_assigners stops them itself."""
    late = f"""\
        set -euo pipefail
        eval "$({PROLOGUE})"
        trap 'echo "late cleanup ran"' EXIT
        acb_worker w0 -- true
        echo "script done"
        """
    chained = late.replace("late cleanup ran\"'", "late cleanup ran\"; acb_stop_assigners'")
    late_id = submit(tmp_path, "acb-late", late)
    chained_id = submit(tmp_path, "acb-late-chained", chained)

    record, output = finish(tmp_path, "acb-late", late_id)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", output
    assert in_order(output, "script done", "late cleanup ran")
    assert "acb: assigners stopped" not in output
    log = events(tmp_path / "acb-runs" / late_id, "n1")
    assert [e["worker"] for e in log if e["event"] == "grant"] == ["w0"]
    assert log[-1]["event"] == "stop" and log[-1]["reason"] == "SIGTERM"  # sent by Slurm

    record, output = finish(tmp_path, "acb-late-chained", chained_id)
    assert record["JobState"] == "COMPLETED", output
    assert in_order(output, "script done", "late cleanup ran", "acb: assigners stopped")
    log = events(tmp_path / "acb-runs" / chained_id, "n1")
    assert log[-1]["event"] == "stop" and log[-1]["reason"] == "SIGINT"  # by the prologue


def test_strict_mode_xtrace_and_a_changed_ifs_path_and_ps4(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    """set -Eeuo pipefail with an ERR trap, set -x with its own PS4, IFS=$'\\n\\t', and PATH
    changed before and after the eval (decoys that print to stdout): the prologue and
    acb_worker still work, leave the script's settings as they were, and print nothing but the
    script's own lines to its stdout."""
    rec = tmp_path / "rec"
    rec.mkdir()
    # Decoys that print to stdout and fail: on PATH before the eval (tools the prologue must
    # take from its own bin directory, and bash) and after it (what acb_worker and the cleanup
    # at exit must have looked up when the prologue ran).
    early, late = tmp_path / "early", tmp_path / "late"
    decoys = {
        early: ("python", "python3", "bash", "acb-run", "acb-assigner"),
        late: ("srun", "squeue", "scancel", "sleep", "awk", "acb-run"),
    }
    for folder, tools in decoys.items():
        folder.mkdir()
        for tool in tools:
            (folder / tool).write_text(f"#!/bin/sh\necho 'DECOY {tool}'\nexit 1\n")
            (folder / tool).chmod(0o755)
    body = f"""\
        set -Eeuo pipefail
        trap 'echo "ERR trap: line $LINENO" >&2' ERR
        IFS=$'\\n\\t'
        PS4='+ trace: '
        PATH="{early}:$PATH"
        set -x
        eval "$({PROLOGUE})"
        echo "after the prologue"
        set +x
        if [[ $IFS == $'\\n\\t' ]]; then echo "IFS kept"; fi
        if [[ $PS4 == '+ trace: ' ]]; then echo "PS4 kept"; fi
        if [[ $- == *e* && $- == *u* && $- == *E* && -o pipefail ]]; then echo "options kept"; fi
        PATH="{late}:$PATH"
        export ACB_TEST_RECORD={rec}
        acb_worker strict --per-node 2 -- {sys.executable} {RECORD_WORKER} &
        wait
        echo "workers done"
        """
    job_id = submit(tmp_path, "acb-strict", body, split=True)
    record, output = finish(tmp_path, "acb-strict", job_id)
    errors = (tmp_path / "acb-strict.err").read_text(encoding="utf-8", errors="replace")
    assert record["JobState"] == "COMPLETED", output + errors
    # stdout: the script's own lines and nothing else.
    assert output.splitlines() == [
        "after the prologue", "IFS kept", "PS4 kept", "options kept", "workers done",
    ], output  # fmt: skip
    assert "ERR trap" not in errors and "DECOY" not in errors, errors
    # xtrace: the eval line (and its command substitution) is traced, nothing inside it, and
    # the script's own commands after it are traced again.
    traced = [line for line in errors.splitlines() if line.startswith("+")]
    assert traced[0].startswith("++ trace: ") and "acb-sbatch prologue" in traced[0], traced
    assert traced[1].startswith("+ trace: eval "), traced
    assert traced[2] == "+ trace: echo 'after the prologue'", traced
    assert "acb: 1 assigner(s) ready" in errors and "acb: assigners stopped" in errors
    log = events(tmp_path / "acb-runs" / job_id, "n1")
    assert sorted(e["worker"] for e in log if e["event"] == "grant") == [
        "strict-n1-0",
        "strict-n1-1",
    ]
    assert log[-1]["event"] == "stop" and log[-1]["reason"] == "SIGINT"
    assert len(records(rec)) == 2


def test_acb_worker_per_node_per_gpu_node_and_client(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    prologue = (
        f"{ACB_SBATCH} prologue --policy gpu-affinity --virtual-gpus 2 --gpu-memory 8GiB"
        " --startup-timeout 30"
    )
    body = f"""\
        set -euo pipefail
        eval "$({prologue})"
        export ACB_TEST_RECORD={rec} ACB_TEST_SLEEP=0.1
        acb_worker g --per-gpu 2 -- {sys.executable} {RECORD_WORKER} &
        acb_worker pair --node n2 --gate --gpus 2 -- {sys.executable} {RECORD_WORKER} &
        acb_worker c --node=n2 --client -- \\
            bash -c 'echo "$ACB_WORKER on $SLURMD_NODENAME: $ACB_ASSIGNER"' &
        wait
        rc=0; acb_worker bad --per-node 1 --client -- bash -c 'exit 3' || rc=$?
        echo "bad group: $rc"
        rc=0; acb_worker -- true 2>{tmp_path}/usage.txt || rc=$?
        echo "no name: $rc"
        rc=0; acb_worker x --client --gpus 2 -- true 2>>{tmp_path}/usage.txt || rc=$?
        echo "client with acb-run options: $rc"
        """
    name = "acb-worker-fn"
    job_id = submit(tmp_path, name, body, nodes=2)
    record, output = finish(tmp_path, name, job_id)
    assert record["JobState"] == "COMPLETED", output
    run_dir = tmp_path / "acb-runs" / job_id
    seen = records(rec)
    by_worker = {r["worker"]: r for r in seen}
    assert sorted(by_worker) == sorted(
        [f"g-{n}-{i}" for n in ("n1", "n2") for i in range(4)] + ["pair"]
    )
    for worker, r in by_worker.items():
        if worker.startswith("g-"):
            assert r["node"] == worker.split("-")[1]
            assert r["assigner"].endswith(f"/{r['node']}/assigner.sock")
            assert r["cuda_visible_devices"] in ("0", "1")
    assert by_worker["pair"]["node"] == "n2"
    assert by_worker["pair"]["cuda_visible_devices"] == "0,1"
    assert re.search(r"^c on n2: unix:.*/n2/assigner\.sock$", output, re.M), output
    for node in ("n1", "n2"):
        log = events(run_dir, node)
        assert_exclusive_holdings(log)
        assert log[-1]["event"] == "stop"
    assert "acb: worker bad-n1-0 FAILED with exit code 3" in output
    assert "acb: worker bad-n2-0 FAILED with exit code 3" in output
    assert "bad group: 1" in output
    assert "no name: 2" in output
    assert "client with acb-run options: 2" in output
    usage = (tmp_path / "usage.txt").read_text()
    assert "acb_worker: the first argument is the worker's name" in usage
    assert "acb-run options need --gate or --auto" in usage


def test_the_example_runs_as_its_header_says(slurm_cluster: Cluster, tmp_path: Path) -> None:
    """examples/slurm/prologue-batch.sh, submitted with the command its header gives, from a
    directory laid out like the repository root (examples/ and .venv/)."""
    header = EXAMPLE.read_text(encoding="utf-8").split("#SBATCH", 1)[0]
    (command,) = re.findall(r"^#\s+(sbatch \S+)\s*$", header, re.M)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    result = subprocess.run(
        shlex.split(command), cwd=tmp_path, capture_output=True, text=True, env=_clean_env()
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split()[-1]
    _submitted.append(job_id)
    record = wait_job(job_id, timeout=60)  # its time limit is 10 minutes
    (out,) = tmp_path.glob(f"*{job_id}*.out")
    output = out.read_text(encoding="utf-8", errors="replace")
    assert record["JobState"] == "COMPLETED", output
    assert "demo-0 holds GPU 0" in output and "demo-1 holds GPU 0" in output
    assert in_order(output, "both workers done", "acb: assigners stopped"), output
    log = events(tmp_path / "acb-runs" / job_id, "n1")
    assert sorted(e["worker"] for e in log if e["event"] == "grant") == ["demo-0", "demo-1"]
    assert_exclusive_holdings(log)
