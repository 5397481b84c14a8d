"""`acb-run --gang`: real acb-run members on two real assigners (controller n1, executor n2).

The command of each member starts only once the whole gang is granted and sees where it stands;
a member whose command fails stops every other member's command (and whatever it left behind
in sessions of its own, as torchrun's workers are) within about a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from acb_slurm.assigner.testing import AssignerProcess, start_pool, wait_for
from acb_slurm.client import Client
from acb_slurm.exitcodes import ExitCode
from tests.launcher.test_gate_lease_loss import ACB_RUN, gone

TOKEN = "job-token"
StartAssigner = Callable[..., AssignerProcess]

SHOW = (
    'echo "$SLURMD_NODENAME rank=$PET_NODE_RANK nnodes=$PET_NNODES '
    'master=$PET_MASTER_ADDR:$PET_MASTER_PORT gpus=$CUDA_VISIBLE_DEVICES gang=$ACB_GANG"'
)


@pytest.fixture
def controller(start_assigner: StartAssigner, tmp_path: Path) -> AssignerProcess:
    """The controller (n1) of a two-node pool (executor n2 joined)."""
    return start_pool(start_assigner, tmp_path, TOKEN)[0]


def member(
    controller: AssignerProcess, node: str, script: str, *flags: str
) -> subprocess.Popen[str]:
    """`acb-run --gang g` on `node`, joining at the controller over TCP with the job's TLS."""
    env = controller.client_env(SLURMD_NODENAME=node, ACB_CONTROLLER=controller.tcp or "")
    return subprocess.Popen(
        [*ACB_RUN, "--gang", "g", "--gang-nodes", "2", *flags, "--", "bash", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_every_member_starts_with_its_part_and_the_rendezvous(
    controller: AssignerProcess,
) -> None:
    on_n2 = member(controller, "n2", SHOW, "--gpus", "2")
    time.sleep(0.5)
    assert on_n2.poll() is None, "started before the other member joined"
    on_n1 = member(controller, "n1", SHOW, "--gpus", "2")
    out1, err1 = on_n1.communicate(timeout=30)
    out2, err2 = on_n2.communicate(timeout=30)
    assert (on_n1.returncode, on_n2.returncode) == (0, 0), err1 + err2
    port = out1.split("master=127.0.0.1:")[1].split()[0]
    assert out1 == f"n1 rank=0 nnodes=2 master=127.0.0.1:{port} gpus=0,1 gang=g\n"
    assert out2 == f"n2 rank=1 nnodes=2 master=127.0.0.1:{port} gpus=0,1 gang=g\n"
    with Client(target=controller.target, token=TOKEN) as probe:
        assert not probe.status().gangs  # both left: the gang ended


def test_a_failing_member_stops_the_others_and_what_they_left_behind(
    controller: AssignerProcess, tmp_path: Path
) -> None:
    orphan = tmp_path / "orphan.pid"
    # Like torchrun's workers: a process in a session of its own, out of the group's reach.
    stays = f"setsid sleep 300 & echo $! > {orphan}; sleep 300"
    on_n2 = member(controller, "n2", stays)
    on_n1 = member(controller, "n1", "sleep 1; exit 3")
    wait_for(orphan.exists, what="the orphan to start")
    orphan_pid = int(wait_for(lambda: orphan.read_text().strip(), what="its pid"))
    assert on_n1.wait(30) == 3  # its own status, unchanged
    failed_at = time.monotonic()
    on_n2.wait(10)
    stopped_in = time.monotonic() - failed_at
    assert on_n2.returncode == ExitCode.LEASE_LOST
    assert stopped_in < 1.0, f"the other member stopped {stopped_in:.2f}s after the failure"
    assert wait_for(lambda: gone(orphan_pid), timeout=2, what="the orphan to be killed")
    err = on_n2.stderr.read() if on_n2.stderr else ""
    assert "gang g ended" in err and "exit status 3" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_gang_whose_member_never_comes_times_out_with_75(controller: AssignerProcess) -> None:
    alone = member(controller, "n1", "echo ran", "--timeout", "1")
    out, err = alone.communicate(timeout=30)
    assert alone.returncode == ExitCode.NO_GRANT, err
    assert out == "" and "not granted within 1s" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gang", "g", "--memory", "1GiB"], "--memory: not an option of --gang"),
        (["--gang", "g"], "give --gang-nodes K"),
        (["--gang", "g", "--gang-nodes", "0"], "--gang-nodes wants a count >= 1"),
        (["--gate", "--gang-nodes", "2"], "--gang-nodes: not an option of --gate"),
        (["--gang", "g", "--auto"], "not allowed with argument"),
    ],
)
def test_usage_mistakes_exit_64(flags: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_STEP_NUM_NODES"}
    run = subprocess.run(
        [*ACB_RUN, *flags, "--", "true"], env=env, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == ExitCode.USAGE
    assert message in run.stderr


DDP = Path(__file__).resolve().parents[2] / "examples" / "torchrun" / "ddp_train.py"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.mark.slow
def test_torchrun_over_two_members_trains_what_plain_torchrun_trains(
    controller: AssignerProcess, tmp_path: Path
) -> None:
    """A real DDP run (gloo) as a two-node gang, 2 ranks per node, ends with the parameters of
    the same run on 4 ranks under plain torchrun, bit for bit."""
    script = (
        f"exec {TORCHRUN} --nproc-per-node 2 --max-restarts 0 {DDP} --steps 10 "
        f"--out {tmp_path}/gang.pt"
    )
    members = [member(controller, node, script) for node in ("n1", "n2")]
    outputs = [m.communicate(timeout=180) for m in members]
    assert [m.returncode for m in members] == [0, 0], outputs
    ranks = "".join(out for out, _ in outputs)
    assert "rank 0/4 on n1" in ranks and "rank 3/4 on n2" in ranks
    assert_trains_like_plain_torchrun(tmp_path / "gang.pt", steps=10)


def assert_trains_like_plain_torchrun(params: Path, steps: int) -> None:
    """`params` (what rank 0 of a 4-rank DDP run of examples/torchrun/ddp_train.py saved) are
    bit for bit those of the same run under plain torchrun on this machine."""
    plain_params = params.with_name(f"plain-{params.name}")
    command = [TORCHRUN, "--standalone", "--nproc-per-node", "4", str(DDP)]
    plain = subprocess.run(
        [*command, "--steps", str(steps), "--out", str(plain_params)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 0, plain.stderr
    import torch

    gang, alone = torch.load(params), torch.load(plain_params)
    assert gang.keys() == alone.keys()
    assert all(torch.equal(gang[k], alone[k]) for k in gang)


def _workers_of(script: Path) -> list[int]:
    """Pids of torchrun workers (they have LOCAL_RANK in their environment) running `script`."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry.name}/environ").read_bytes()
        except OSError:
            continue
        if str(script).encode() in cmdline and b"\0LOCAL_RANK=" in b"\0" + environ:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_killed_rank_releases_every_node_within_a_second(
    controller: AssignerProcess, tmp_path: Path
) -> None:
    script = (
        f"exec {TORCHRUN} --nproc-per-node 2 --max-restarts 0 {DDP} --steps 10000 "
        f"--step-seconds 0.05 --out {tmp_path}/never.pt"
    )
    members = {node: member(controller, node, script) for node in ("n1", "n2")}
    workers = wait_for(lambda: len(w := _workers_of(DDP)) == 4 and w, timeout=120)
    with Client(target=controller.target, token=TOKEN) as probe:
        wait_for(lambda: [g.state for g in probe.status().gangs] == ["granted"])
    time.sleep(2)  # training has started on every rank
    os.kill(workers[0], 9)
    killed_at = time.time()
    codes = {node: m.wait(30) for node, m in members.items()}
    stopped_in = time.time() - killed_at
    # The other node's member was stopped (70); the rank's member says how a rank of its node
    # died: 128+9 as a rule, 128+15 when torchrun reaped the killed one first (a loaded machine)
    # and acb-run saw the next, which torchrun had sent SIGTERM.
    stopped, failed = sorted(codes.values())
    assert stopped == ExitCode.LEASE_LOST and failed in (128 + 9, 128 + 15), codes
    assert wait_for(lambda: not _workers_of(DDP), timeout=5, what="every rank to stop")
    # Each node's event log says when its part went back.
    logs = sorted(controller.directory.glob("*.events.jsonl"))
    releases = [
        e["ts"]
        for log in logs
        for e in map(json.loads, log.read_text().splitlines())
        if e["event"] == "release" and e.get("reason") == "gang-failed"
    ]
    assert len(releases) == 2, releases  # one GPU per node
    released_in = max(releases) - killed_at
    assert released_in < 1.0, f"parts released {released_in:.2f}s after the rank was killed"
    assert stopped_in < 3.0, f"the members ended {stopped_in:.2f}s after the rank was killed"


#: Two "ranks" as torchrun starts them: LOCAL_RANK in their environment, sessions of their own,
#: and a parent that does not reap them at once (torchrun polls every 0.1 s; this one never).
FAKE_RANKS = (
    'for i in 0 1; do LOCAL_RANK=$i setsid sleep 300 & echo $! >> "$RANKS"; done; exec sleep 300'
)


def test_a_failed_rank_is_seen_by_acb_run_itself_and_every_rank_dies(
    controller: AssignerProcess, tmp_path: Path
) -> None:
    """Without torchrun: a rank killed on n2 ends the gang at once, n2's member says so (137),
    n1's is stopped (70), and every rank on both nodes is dead, though each is in a session of
    its own."""
    members = {}
    for node in ("n1", "n2"):
        script = f"RANKS={tmp_path}/{node}.ranks; {FAKE_RANKS}"
        members[node] = member(controller, node, script)
    ranks = {
        node: wait_for(
            lambda node=node: len(p := _read_pids(tmp_path / f"{node}.ranks")) == 2 and p,
            what=f"{node}'s ranks",
        )
        for node in ("n1", "n2")
    }
    time.sleep(0.3)  # RankWatch walks the tree every 50 ms
    os.kill(ranks["n2"][0], 9)
    codes = {node: m.wait(10) for node, m in members.items()}
    assert codes == {"n1": ExitCode.LEASE_LOST, "n2": 128 + 9}, codes
    err = members["n2"].stderr.read() if members["n2"].stderr else ""
    assert "was killed by SIGKILL: gang g ended on every node" in err, err
    for pid in ranks["n1"] + ranks["n2"]:
        assert wait_for(lambda pid=pid: gone(pid), timeout=2, what=f"rank {pid} to die")


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except (OSError, ValueError):
        return []


def test_members_told_to_stop_each_finish_their_own_checkpoint(
    controller: AssignerProcess,
) -> None:
    """A cancelled job tells every node: the member that ends first (3) must not kill the one
    still saving its checkpoint, which ends with its own status (5), not 70."""
    saving = "trap 'sleep {0}; exit {1}' TERM; sleep 300 & wait"
    fast = member(controller, "n1", saving.format(0.3, 3))
    slow = member(controller, "n2", saving.format(2.5, 5))
    with Client(target=controller.target, token=TOKEN) as probe:
        wait_for(lambda: [g.state for g in probe.status().gangs] == ["granted"])
    time.sleep(0.5)  # both commands run (and have set their traps)
    fast.send_signal(15)
    slow.send_signal(15)
    assert (fast.wait(10), slow.wait(10)) == (3, 5)
    with Client(target=controller.target, token=TOKEN) as probe:
        assert not probe.status().gangs
    ends = [e for e in controller.events() if e["event"] == "gang_end"]
    assert [(e["failed"], e["reason"]) for e in ends] == [(False, "stopped")], ends
