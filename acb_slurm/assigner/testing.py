"""Start a real `acb-assigner` process for tests and benchmarks, and stop it cleanly.

    with AssignerProcess(tmp_path, gpus=2) as assigner:
        env = assigner.client_env()     # ACB_ASSIGNER (and ACB_TOKEN_FILE) for workers
        ...
        events = assigner.events()      # the event log, parsed

The process is started with --virtual-gpus and waited for through its ready file and the
standard health check; `stop()` sends SIGTERM and waits (SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from acb_slurm import defaults, env


def assigner_command() -> list[str]:
    """The installed `acb-assigner` script beside this Python, else the module."""
    script = os.path.join(os.path.dirname(sys.executable), "acb-assigner")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "acb_slurm.assigner.cli"]


class AssignerProcess:
    """One acb-assigner subprocess with its socket, event log and ready file under `directory`."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        gpus: int = 2,
        gpu_memory: str = defaults.VIRTUAL_GPU_MEMORY,
        policy: str = defaults.POLICY,
        token: str | None = None,
        tcp: str | None = None,
        controller: str | None = None,
        extra_args: list[str] | None = None,
        name: str = "assigner",
        tls_dir: str | os.PathLike[str] | None = None,
        insecure_tcp: bool = False,
        node: str | None = None,
    ) -> None:
        """With `tcp` or `controller`, give the job's TLS material (`tls_dir`, made by
        `acb_slurm.tls.init`) or `insecure_tcp` (plaintext), else the assigner refuses to start."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Unix socket paths must stay short (108 bytes); fall back to a short temp dir.
        self._sock_dir: str | None = None
        self.socket = str(self.directory / "run" / f"{name}.sock")
        if len(self.socket) > 100:
            self._sock_dir = tempfile.mkdtemp(prefix="acb-")
            self.socket = os.path.join(self._sock_dir, "run", f"{name}.sock")
        self.event_log = self.directory / f"{name}.events.jsonl"
        self.ready_file = self.directory / f"{name}.ready.json"
        self.stderr_path = self.directory / f"{name}.stderr"
        self.token_file: Path | None = None
        if token is not None:
            self.token_file = self.directory / f"{name}.token"
            self.token_file.write_text(token + "\n", encoding="utf-8")
            self.token_file.chmod(0o600)
        self.args = [
            *assigner_command(),
            "--socket",
            self.socket,
            "--virtual-gpus",
            str(gpus),
            "--gpu-memory",
            gpu_memory,
            "--policy",
            policy,
            "--event-log",
            str(self.event_log),
            "--ready-file",
            str(self.ready_file),
        ]
        if self.token_file is not None:
            self.args += ["--token-file", str(self.token_file)]
        self.tls_dir = None if tls_dir is None else str(tls_dir)
        if tcp is not None:
            self.args += ["--tcp", tcp]
        if controller is not None:
            self.args += ["--controller", controller]
        if self.tls_dir is not None:
            self.args += ["--tls-dir", self.tls_dir]
        if insecure_tcp:
            self.args += ["--insecure-tcp"]
        if node is not None:
            self.args += ["--node", node]
        self.args += extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    @property
    def tcp(self) -> str | None:
        return self.ready.get("tcp")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.token_file is None:
            return ()
        return ((env.TOKEN_METADATA_KEY, self.token_file.read_text().strip()),)

    def client_env(self, **extra: str) -> dict[str, str]:
        """os.environ plus what a worker needs to reach this assigner."""
        out = dict(os.environ)
        for name in (env.TOKEN, env.TOKEN_FILE):
            out.pop(name, None)
        out[env.ASSIGNER] = self.target
        if self.token_file is not None:
            out[env.TOKEN_FILE] = str(self.token_file)
        out.pop(env.TLS_DIR, None)
        if self.tls_dir is not None:
            out[env.TLS_DIR] = self.tls_dir
        out.update(extra)
        return out

    def start(self, timeout: float = 30.0) -> AssignerProcess:
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(self.args, stdout=stderr, stderr=stderr)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"acb-assigner exited with {self.proc.returncode}: {self.stderr_text()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"acb-assigner not ready in {timeout}s: {self.stderr_text()}")
            time.sleep(0.02)
        self.ready = json.loads(self.ready_file.read_text())
        self.wait_healthy(max(1.0, deadline - time.monotonic()))
        return self

    def wait_healthy(self, timeout: float = 10.0) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=timeout,
                metadata=self.metadata(),
                wait_for_ready=True,
            )
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"acb-assigner health is {reply.status}, not SERVING")

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def events(self) -> list[dict[str, Any]]:
        """The event log so far, one dict per line."""
        if not self.event_log.exists():
            return []
        text = self.event_log.read_text(encoding="utf-8")
        complete = text[: text.rfind("\n") + 1]  # a line being written is not read half
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._cleanup()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (leaves the socket file behind, as a crash does); terminate() cleans up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _cleanup(self) -> None:
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)

    def __enter__(self) -> AssignerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.terminate()


def start_pool(
    start: Callable[..., AssignerProcess],
    directory: str | os.PathLike[str],
    token: str,
    gpus: int = 2,
) -> tuple[AssignerProcess, AssignerProcess]:
    """The assigners of a two-node job on this machine: controller `n1` and executor `n2`
    joined to it over mutual TLS (material made in `directory`/tls), `gpus` virtual GPUs each.
    `start(**options)` starts one (the tests' `start_assigner` fixture, or AssignerProcess's
    constructor and `start()`). Returns once n2 has joined n1."""
    from acb_slurm import tls
    from acb_slurm.client import Client

    material = tls.init(Path(directory) / "tls")
    common = {"gpus": gpus, "tcp": "127.0.0.1:0", "token": token, "tls_dir": material.directory}
    n1 = start(**common, node="n1")
    n2 = start(**common, node="n2", controller=n1.tcp)
    with Client(target=n1.target, token=token) as probe:
        wait_for(lambda: probe.status().executors, what="n2 to join n1")
    return n1, n2


def events_of(events: list[dict[str, Any]], kind: str, **match: Any) -> list[dict[str, Any]]:
    """The events of `kind` (an `AssignerProcess.events()` list) whose fields equal `match`."""
    return [
        e for e in events if e["event"] == kind and all(e.get(k) == v for k, v in match.items())
    ]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something true (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
