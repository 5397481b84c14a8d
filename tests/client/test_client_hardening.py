"""The client against a socket another user could have planted, and at interpreter exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.client import AssignerError, Client

StartAssigner = Callable[..., AssignerProcess]


class Eavesdropper:
    """A Unix socket someone else listens on: records every byte a client sends it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        self.received = bytearray()
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.settimeout(0.1)
            with conn:
                while not self._stop.is_set():
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    self.received += data

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.listener.close()


@pytest.fixture
def eavesdropper(tmp_path: Path) -> Iterator[Eavesdropper]:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # e.g. a --socket put straight into a shared scratch directory
    listener = Eavesdropper(shared / "assigner.sock")
    yield listener
    listener.close()


def test_a_client_refuses_a_socket_in_a_directory_others_can_write(
    eavesdropper: Eavesdropper,
) -> None:
    client = Client(target=f"unix:{eavesdropper.path}", token="job-s3cret", connect_timeout=3)
    with pytest.raises(AssignerError, match="group or others can write") as refused:
        client.allocate(timeout=3)
    assert str(eavesdropper.path.parent) in str(refused.value)
    assert "0777" in str(refused.value)
    client.close()
    time.sleep(0.3)
    assert eavesdropper.connections == 0
    assert b"job-s3cret" not in eavesdropper.received


def test_the_unix_target_forms_are_all_checked(eavesdropper: Eavesdropper) -> None:
    for target in (f"unix:{eavesdropper.path}", f"unix://{eavesdropper.path}"):
        client = Client(target=target, token="job-s3cret", connect_timeout=3)
        with pytest.raises(AssignerError, match="group or others can write"):
            client.status()
        client.close()
    assert eavesdropper.connections == 0


def test_a_client_refuses_a_socket_or_directory_of_another_user(
    start_assigner: StartAssigner,
) -> None:
    assigner = start_assigner(gpus=1, token="tok")
    directory = os.path.dirname(assigner.socket)
    try:
        os.chown(assigner.socket, 65534, 65534)
        with Client(target=assigner.target, token="tok", connect_timeout=3) as client:
            with pytest.raises(AssignerError, match="owned by uid 65534") as refused:
                client.allocate(timeout=3)
            assert assigner.socket in str(refused.value)
        os.chown(assigner.socket, os.geteuid(), os.getegid())
        os.chown(directory, 65534, 65534)
        with Client(target=assigner.target, token="tok", connect_timeout=3) as client:
            with pytest.raises(AssignerError, match="owned by uid 65534") as refused:
                client.allocate(timeout=3)
            assert directory in str(refused.value)
        os.chown(directory, os.geteuid(), os.getegid())
        os.chmod(directory, 0o770)
        with (
            Client(target=assigner.target, token="tok", connect_timeout=3) as client,
            pytest.raises(AssignerError, match="group or others can write"),
        ):
            client.allocate(timeout=3)
    finally:
        os.chown(assigner.socket, os.geteuid(), os.getegid())
        os.chown(directory, os.geteuid(), os.getegid())
        os.chmod(directory, 0o700)
    with Client(target=assigner.target, token="tok") as client:  # all well again
        client.release(client.allocate(timeout=10))
    # The refused clients never reached it: one session only, the last client's.
    assert len([e for e in assigner.events() if e["event"] == "session"]) == 1


# ---- exit ---------------------------------------------------------------------------------------

EXITS_HOLDING = """
import atexit, sys, threading, weakref

sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up


def after_the_client_hook():
    # Registered before the client module is imported: runs after the client's own exit hook,
    # as the last thing before interpreter shutdown.
    threads = [t for t in threading.enumerate() if t.name == "acb-session" and t.is_alive()]
    print(f"at-exit threads={len(threads)} call-freed={call() is None}", flush=True)


atexit.register(after_the_client_hook)

from acb_slurm.client import Client, default_client, on_device_begin

if sys.argv[1] == "default":
    lease = on_device_begin(timeout=30)
    client = default_client()
else:
    client = Client()
    lease = client.allocate(timeout=30)
client.report_usage(lease, 1)
call = weakref.ref(client._call)
print(lease.lease_id, flush=True)
"""


@pytest.mark.slow
def test_processes_that_exit_holding_a_lease_never_hang(start_assigner: StartAssigner) -> None:
    # A process must never hang at exit in grpc's finaliser of its session stream (a daemon
    # thread frozen by interpreter shutdown while holding the call's lock): the client ends
    # every session at exit, before shutdown, and joins its thread.
    assigner = start_assigner(gpus=2)
    runs = 20
    for run in range(runs):
        kind = "default" if run % 2 else "own"
        proc = subprocess.Popen(
            [sys.executable, "-c", EXITS_HOLDING, kind],
            env=assigner.client_env(ACB_WORKER=f"exit-{run}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        lease = proc.stdout.readline().strip()
        printed = time.monotonic()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"run {run} ({kind}) printed its lease and did not exit within 10s: "
                f"{proc.stderr.read()[-2000:]}"
            ) from None
        # Read the rest through the same buffered streams as the first line (communicate()
        # would miss what readline() already buffered).
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert proc.returncode == 0, err
        assert lease, err
        assert time.monotonic() - printed < 5, f"run {run} took {time.monotonic() - printed}s"
        # Deterministic: by the end of the exit handlers the stream was closed, its thread
        # joined and the call freed (nothing left for shutdown to finalise).
        assert out.strip() == "at-exit threads=0 call-freed=True", (run, kind, out, err)
    events = assigner.events()
    released = [e for e in events if e["event"] == "release"]
    assert len(released) == len([e for e in events if e["event"] == "grant"]) == runs
    assert all(e["reason"] == "disconnect" for e in released)
