"""A running job's side: wait for its assigners, write the inter-node config, ask them for status.

Layout of a run directory (made 0700 by the prologue):

    <run dir>/token              the job's token (0600)
    <run dir>/assigners.json     the inter-node config (0600): every node's address, port, socket
    <run dir>/tls/               the job's TLS material (0700; ca.pem, cert.pem, key.pem 0600):
                                 TCP to the assigners is mutual TLS (`acb_slurm.tls`)
    <run dir>/<node>/            per node (0700): assigner.sock, ready.json, events.jsonl,
                                 assigner.log
    <run dir>/job.sh, job.yaml   what `acb-sbatch submit` submitted
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from acb_slurm import defaults
from acb_slurm.slurm.errors import JobStateError, SlurmError

CONFIG_NAME = "assigners.json"
CONFIG_VERSION = 1


@dataclass(frozen=True)
class NodeEntry:
    """One node's assigner as the inter-node config records it."""

    name: str
    role: str  # "controller" or "executor"
    address: str
    port: int
    tcp: str
    socket: str
    event_log: str
    ready_file: str
    pid: int


def node_dir(run_dir: str | Path, node: str) -> Path:
    return Path(run_dir) / node


def _process_gone(pid: int) -> bool:
    """True when `pid` has exited (a zombie, not yet reaped by its parent, counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"    ({path} does not exist)"
    kept = text.strip().splitlines()[-lines:] or ["(empty)"]
    return "\n".join(f"    {line}" for line in kept)


def _read_ready(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tcp") else None


def _split_hostport(tcp: str) -> tuple[str, int]:
    host, _, port = tcp.rpartition(":")
    return host.strip("[]"), int(port)


def _health_check(
    target: str, token: str | None, timeout: float, tls_dir: str | None = None
) -> str | None:
    """None when the assigner at `target` answers SERVING, else what went wrong."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from acb_slurm import tls
    from acb_slurm.env import TOKEN_METADATA_KEY

    metadata = [(TOKEN_METADATA_KEY, token)] if token else None
    try:
        with tls.channel(target, tls_dir=tls_dir) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    except tls.TlsError as exc:
        return str(exc)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def await_assigners(
    run_dir: str | Path,
    nodes: list[str],
    *,
    timeout: float,
    watch_pid: int | None = None,
    token_file: str | None = None,
) -> list[NodeEntry]:
    """Wait until every node's assigner wrote its ready file and answers a health check.

    Fails early when `watch_pid` (the srun that runs them) exits; the error quotes each missing
    node's assigner.log.
    """
    run = Path(run_dir)
    token = Path(token_file).read_text(encoding="utf-8").strip() if token_file else None
    deadline = time.monotonic() + timeout
    ready: dict[str, dict[str, Any]] = {}
    gone = False
    while True:
        for node in nodes:
            if node not in ready:
                data = _read_ready(node_dir(run, node) / "ready.json")
                if data is not None:
                    ready[node] = data
        if len(ready) == len(nodes) or gone or time.monotonic() > deadline:
            break
        gone = watch_pid is not None and _process_gone(watch_pid)
        time.sleep(0.1)
    missing = [n for n in nodes if n not in ready]
    problems = []
    from acb_slurm import tls

    tls_dir = tls.run_dir_tls(run)
    for node, data in ready.items():
        left = max(1.0, deadline - time.monotonic())
        why = _health_check(data["tcp"], token, timeout=min(left, 10.0), tls_dir=tls_dir)
        if why:
            problems.append(f"  {node}: ready file written but the health check failed: {why}")
    for node in missing:
        log = node_dir(run, node) / "assigner.log"
        reason = "its srun step exited" if gone else f"not ready after {timeout:.0f}s"
        problems.append(f"  {node}: {reason}; last lines of {log}:\n{_tail(log)}")
    if problems:
        raise JobStateError("assigners did not start:\n" + "\n".join(problems))
    entries = []
    for i, node in enumerate(nodes):
        data = ready[node]
        host, port = _split_hostport(str(data["tcp"]))
        folder = node_dir(run, node)
        entries.append(
            NodeEntry(
                name=node,
                role="controller" if i == 0 else "executor",
                address=host,
                port=port,
                tcp=str(data["tcp"]),
                socket=str(data.get("socket") or folder / "assigner.sock"),
                event_log=str(folder / "events.jsonl"),
                ready_file=str(folder / "ready.json"),
                pid=int(data.get("pid", 0)),
            )
        )
    return entries


def write_config(
    path: str | Path,
    entries: list[NodeEntry],
    *,
    run_dir: str | Path,
    job_id: str,
    token_file: str,
    policy: str,
) -> dict[str, Any]:
    """Write the inter-node config (JSON, mode 0600, atomically) and return it."""
    config = {
        "version": CONFIG_VERSION,
        "job_id": job_id,
        "run_dir": str(run_dir),
        "token_file": token_file,
        "policy": policy,
        "controller": entries[0].tcp if entries else "",
        "nodes": [asdict(e) for e in entries],
    }
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, target)
    return config


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobStateError(
            f"{path} does not exist: the job has not started its assigners yet (or they failed: "
            f"see {Path(run_dir)}/<node>/assigner.log and the job's output)"
        ) from None
    except (OSError, ValueError) as exc:
        raise JobStateError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != CONFIG_VERSION:
        raise JobStateError(f"{path} is not an acb-slurm config of version {CONFIG_VERSION}")
    return data


_JOB_ID = re.compile(r"^\d+(?:_\d+)?$")


def find_run_dir(job_id: str, explicit: str | None = None) -> Path:
    """The run dir of a job: explicit, ./acb-runs/<id>, or <submit dir>/acb-runs/<id> from Slurm.

    Array tasks have run dirs named <array job id>_<task id>; `job_id` may be given that way
    (1234_5) or as the task's own job id.
    """
    if explicit:
        return Path(explicit)
    if not _JOB_ID.match(job_id):
        raise JobStateError(
            f"{job_id!r} is not a Slurm job id (1234, or 1234_5 for an array task); "
            "pass --run-dir to name the run dir"
        )
    local = Path.cwd() / defaults.RUN_ROOT / job_id
    if local.is_dir():
        return local
    from acb_slurm.slurm.commands import show_job

    try:
        record = show_job(job_id)
    except SlurmError as exc:
        if "Invalid job id" not in str(exc):
            raise
        raise JobStateError(
            f"no run directory ./acb-runs/{job_id}, and Slurm no longer knows job {job_id} (it "
            "forgets finished jobs after MinJobAge); pass --run-dir <submit dir>/acb-runs/"
            f"{job_id} (or <broker.run_root>/{job_id})"
        ) from None
    names = [job_id]
    array_job, array_task = record.get("ArrayJobId", ""), record.get("ArrayTaskId", "")
    if array_job.isdigit() and array_task.isdigit():
        names.insert(0, f"{array_job}_{array_task}")
    workdir = record.get("WorkDir")
    for name in names:
        for base in (Path.cwd(), Path(workdir) if workdir else None):
            if base is not None and (base / defaults.RUN_ROOT / name).is_dir():
                return base / defaults.RUN_ROOT / name
    raise JobStateError(
        f"no run directory found for job {job_id} (looked in ./acb-runs/{names[0]} and the job's "
        "WorkDir); pass --run-dir if broker.run_root was set"
    )


def query_status(config: dict[str, Any], timeout: float = 5.0) -> list[tuple[str, Any]]:
    """Ask every node's assigner for Status: [(node, StatusReply or error text)]."""
    import grpc

    from acb_slurm import tls
    from acb_slurm._proto.acb.v1 import assigner_pb2, assigner_pb2_grpc
    from acb_slurm.env import TOKEN_METADATA_KEY

    token_file = config.get("token_file")
    token = None
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise JobStateError(f"cannot read the job's token {token_file}: {exc}") from None
    metadata = [(TOKEN_METADATA_KEY, token)] if token else None
    tls_dir = tls.run_dir_tls(config.get("run_dir"))  # <run dir>/tls, else ACB_TLS_DIR
    answers: list[tuple[str, Any]] = []
    for node in config.get("nodes", []):
        targets = [node["tcp"]]
        if node.get("socket") and Path(node["socket"]).exists():
            targets.insert(0, f"unix:{node['socket']}")
        answer: Any = "unreachable"
        for target in targets:
            try:
                with tls.channel(target, tls_dir=tls_dir) as channel:
                    stub = assigner_pb2_grpc.AssignerStub(channel)
                    answer = stub.Status(
                        assigner_pb2.StatusRequest(), timeout=timeout, metadata=metadata
                    )
                    break
            except grpc.RpcError as exc:
                answer = f"{target}: {exc.code().name}: {exc.details()}"
            except tls.TlsError as exc:
                answer = f"{target}: {exc}"
        answers.append((node["name"], answer))
    return answers


def format_status(answers: list[tuple[str, Any]]) -> str:
    """Who holds which GPU and who waits, per node, as text."""
    from acb_slurm.units import format_size

    lines: list[str] = []
    for node, reply in answers:
        if isinstance(reply, str):
            lines.append(f"node {node}: NOT ANSWERING ({reply})")
            continue
        me = reply.self
        lines.append(
            f"node {node} ({reply.role}, policy {me.policy}, up {me.uptime_seconds:.0f}s, "
            f"{me.address})"
        )
        holders = {lease.lease_id: lease for lease in me.leases}
        for gpu in me.gpus:
            who = [
                f"{holders[i].client.worker or holders[i].client.client_id} "
                f"({holders[i].held_seconds:.0f}s)"
                for i in gpu.lease_ids
                if i in holders
            ]
            lines.append(
                f"  gpu {gpu.index} [{gpu.device_id}] {format_size(gpu.memory_bytes)}: "
                + (", ".join(who) if who else "free")
            )
        if me.queue:
            for waiter in me.queue:
                lines.append(
                    f"  waiting: {waiter.client.worker or waiter.client.client_id} for "
                    f"{waiter.gpu_count} GPU(s), {waiter.waiting_seconds:.0f}s"
                )
        else:
            lines.append("  waiting: nobody")
        c = me.counters
        lines.append(
            f"  counters: {c.sessions} sessions, {c.requests} requests, {c.grants} grants, "
            f"{c.releases} releases, {c.disconnects} disconnects, {c.errors} errors"
        )
        pool = {me.node, *(executor.node for executor in reply.executors)}
        lines.extend(format_gangs(reply.gangs, pool))
    return "\n".join(lines)


def format_gangs(gangs: Any, pool: set[str] | None = None) -> list[str]:
    """The gangs a controller knows (`StatusReply.gangs`), one line each; `pool`: the nodes
    whose assigner joined the controller (a gang waits for a member's node outside it)."""
    lines = [f"  gangs: {len(gangs)}"] if gangs else []
    for gang in gangs:
        shape = f"{gang.gpus_per_node} GPU(s) on each of {gang.node_count} node(s)"
        parts = ", ".join(
            f"{part.node} gpu {','.join(map(str, part.gpu_indices))}" for part in gang.parts
        )
        missing = sorted(set(gang.members) - pool) if pool is not None else []
        if gang.state == "collecting" and missing:
            what = (
                f"waiting for the assigner of node(s) {', '.join(missing)} to join the "
                "controller (a member named a node outside the job's pool?)"
            )
        elif gang.state == "collecting":
            joined = ", ".join(gang.members)
            what = f"{len(gang.members)} of {gang.node_count} members joined ({joined})"
        elif gang.state == "waiting":
            what = f"all members joined ({', '.join(gang.members)}); waiting for GPUs"
        elif gang.state == "taking":
            what = f"nodes taking their parts; held so far: {parts or 'none'}"
        else:
            what = parts
        lines.append(f"    {gang.gang}: {gang.state} {gang.seconds:.0f}s, {shape}: {what}")
    return lines
