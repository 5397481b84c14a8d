"""TCP between the job's processes is mutual TLS with the job's own CA (`acb_slurm.tls`): real
assigner processes, real gRPC over real TCP sockets.

The assigner refuses plaintext clients and clients whose certificate another CA signed; clients
refuse an assigner whose certificate another CA signed; the files are private and refused when
they are not; the executor joins its controller over TLS and not with a foreign certificate."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from acb_slurm import env, tls
from acb_slurm.assigner.testing import AssignerProcess, assigner_command
from acb_slurm.client import AssignerError, AssignerUnavailable, Client, Unauthenticated

from .test_daemon import wait_for

StartAssigner = Callable[..., AssignerProcess]
TOKEN = "job-token"


def mixed(directory: Path, ca_from: tls.Material, pair_from: tls.Material) -> str:
    """A TLS directory that trusts `ca_from`'s CA and shows `pair_from`'s key and certificate."""
    directory.mkdir(mode=0o700)
    for name, data in (
        (tls.CA_FILE, ca_from.ca),
        (tls.CERT_FILE, pair_from.cert),
        (tls.KEY_FILE, pair_from.key),
    ):
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
    return str(directory)


def health(
    target: str, credentials: grpc.ChannelCredentials | None
) -> health_pb2.HealthCheckResponse:
    """One health check over a raw channel (plaintext when `credentials` is None)."""
    metadata = ((env.TOKEN_METADATA_KEY, TOKEN),)
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials, options=tls.channel_options())
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata)


@pytest.fixture
def job(tmp_path: Path) -> tls.Material:
    return tls.init(tmp_path / "tls", job="42")


@pytest.fixture
def other(tmp_path: Path) -> tls.Material:
    """Another job's material: its CA is not ours."""
    return tls.init(tmp_path / "other-tls", job="43")


@pytest.fixture
def tls_assigner(start_assigner: StartAssigner, job: tls.Material) -> AssignerProcess:
    assigner = start_assigner(gpus=1, tcp="127.0.0.1:0", token=TOKEN, tls_dir=job.directory)
    assert assigner.tcp and assigner.ready["tls"] is True
    return assigner


# ---- the files ----


def test_init_writes_private_files_that_load(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "tls"
    made = tls.init(folder, job="7")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in tls.FILES:
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert sorted(os.listdir(folder)) == sorted(tls.FILES)  # the CA's key is not kept
    assert tls.load(folder) == made
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(made.cert)
    ca = x509.load_pem_x509_certificate(made.ca)
    assert cert.issuer == ca.subject and "job 7" in ca.subject.rfc4514_string()
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [tls.SERVER_NAME]
    cert.verify_directly_issued_by(ca)  # raises if another key signed it
    with pytest.raises(tls.TlsError, match="refusing to overwrite"):
        tls.init(folder)
    assert tls.load(folder) == made


def test_init_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(tls.TlsError, match="mode 0777: group or others can replace"):
        tls.init(shared)
    assert os.listdir(shared) == []


@pytest.mark.parametrize("name", tls.FILES)
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_a_file_others_can_access_is_refused(job: tls.Material, name: str, mode: int) -> None:
    path = Path(job.directory) / name
    path.chmod(mode)
    with pytest.raises(tls.TlsError, match=f"mode {mode:04o}: group or others can access"):
        tls.load(job.directory)
    path.chmod(0o600)
    tls.load(job.directory)


def test_a_directory_others_can_write_a_link_or_a_foreign_file_is_refused(
    job: tls.Material, tmp_path: Path
) -> None:
    folder = Path(job.directory)
    folder.chmod(0o757)
    with pytest.raises(tls.TlsError, match="mode 0757"):
        tls.load(folder)
    folder.chmod(0o700)
    key = folder / tls.KEY_FILE
    moved = tmp_path / "key-elsewhere.pem"
    key.rename(moved)
    key.symlink_to(moved)
    with pytest.raises(tls.TlsError, match=r"cannot read .*key\.pem"):
        tls.load(folder)  # a symbolic link is not followed
    key.unlink()
    moved.rename(key)
    if os.geteuid() != 0:
        return  # only root can give a file away
    os.chown(key, 12345, -1)
    with pytest.raises(tls.TlsError, match="owned by uid 12345"):
        tls.load(folder)


def test_tls_init_command_and_the_assigner_refuse_unsafe_material(tmp_path: Path) -> None:
    folder = tmp_path / "cli-tls"
    made = subprocess.run(
        [*assigner_command(), "tls-init", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == str(folder)
    assert all(stat.S_IMODE((folder / n).stat().st_mode) == 0o600 for n in tls.FILES)
    again = subprocess.run(
        [*assigner_command(), "tls-init", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr

    def assigner(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *assigner_command(),
                "--socket",
                str(tmp_path / "run" / "a.sock"),
                "--virtual-gpus",
                "1",
                "--gpu-memory",
                "1GiB",
                "--tcp",
                "127.0.0.1:0",
                *flags,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    (folder / tls.KEY_FILE).chmod(0o644)
    refused = assigner("--tls-dir", str(folder))
    assert refused.returncode == 2
    assert "key.pem is mode 0644" in refused.stderr and "chmod 600" in refused.stderr
    plain = assigner()
    assert plain.returncode == 2 and "--tcp needs --tls-dir DIR" in plain.stderr


# ---- the assigner's side ----


def test_a_client_with_the_jobs_material_is_served_over_tls(
    tls_assigner: AssignerProcess, job: tls.Material, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.TLS_DIR, job.directory)
    assert tls_assigner.tcp is not None
    with Client(target=tls_assigner.tcp, token=TOKEN, connect_timeout=10) as client:
        lease = client.allocate(timeout=10)
        assert lease.gpu_indices == (0,)
        client.release(lease)
        assert client.status().self.counters.grants == 1
    with (  # the token is still checked inside TLS
        Client(target=tls_assigner.tcp, token="wrong", connect_timeout=10) as intruder,
        pytest.raises(Unauthenticated),
    ):
        intruder.allocate(timeout=10)


def test_the_assigner_refuses_a_plaintext_client(
    tls_assigner: AssignerProcess, job: tls.Material
) -> None:
    assert tls_assigner.tcp is not None
    with pytest.raises(grpc.RpcError) as refused:
        health(tls_assigner.tcp, None)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    serving = health(tls_assigner.tcp, tls.channel_credentials(job))  # still serving
    assert serving.status == health_pb2.HealthCheckResponse.SERVING


def test_the_assigner_refuses_a_client_certificate_of_another_ca(
    tls_assigner: AssignerProcess, job: tls.Material, other: tls.Material, tmp_path: Path
) -> None:
    assert tls_assigner.tcp is not None
    # This client trusts the job's CA (so the server passes its check) and shows another CA's
    # certificate: only the assigner can refuse the handshake.
    foreign = tls.load(mixed(tmp_path / "foreign-client", ca_from=job, pair_from=other))
    with pytest.raises(grpc.RpcError) as refused:
        health(tls_assigner.tcp, tls.channel_credentials(foreign))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # No certificate at all (TLS that only checks the server) is refused the same way.
    with pytest.raises(grpc.RpcError) as anonymous:
        health(tls_assigner.tcp, grpc.ssl_channel_credentials(root_certificates=job.ca))
    assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE
    # The control: the job's own material passes.
    assert health(tls_assigner.tcp, tls.channel_credentials(job)).status == (
        health_pb2.HealthCheckResponse.SERVING
    )


def test_a_plaintext_tcp_assigner_needs_insecure_tcp(start_assigner: StartAssigner) -> None:
    with pytest.raises(RuntimeError, match="--tcp needs --tls-dir DIR"):
        start_assigner(gpus=1, tcp="127.0.0.1:0", token=TOKEN)
    plain = start_assigner(gpus=1, tcp="127.0.0.1:0", token=TOKEN, insecure_tcp=True)
    assert plain.tcp and plain.ready["tls"] is False
    assert health(plain.tcp, None).status == health_pb2.HealthCheckResponse.SERVING


# ---- the client's side ----


def test_a_client_refuses_an_assigner_certificate_of_another_ca(
    tls_assigner: AssignerProcess,
    job: tls.Material,
    other: tls.Material,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert tls_assigner.tcp is not None
    # Trusts another CA, shows the job's certificate (which the assigner accepts): only the
    # client can refuse the handshake, and it does before the token leaves it.
    monkeypatch.setenv(env.TLS_DIR, mixed(tmp_path / "wrong-ca", ca_from=other, pair_from=job))
    with (
        Client(target=tls_assigner.tcp, token=TOKEN, connect_timeout=10) as client,
        pytest.raises(AssignerUnavailable),
    ):
        client.allocate(timeout=10)
    assert not [e for e in tls_assigner.events() if e["event"] == "session"]
    monkeypatch.setenv(env.TLS_DIR, job.directory)  # the control
    with Client(target=tls_assigner.tcp, token=TOKEN, connect_timeout=10) as client:
        client.release(client.allocate(timeout=10))


def test_a_client_refuses_tcp_without_tls_unless_told(
    tls_assigner: AssignerProcess, job: tls.Material, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tls_assigner.tcp is not None
    monkeypatch.delenv(env.TLS_DIR, raising=False)
    monkeypatch.delenv(env.INSECURE_TCP, raising=False)
    with (
        Client(target=tls_assigner.tcp, token=TOKEN, connect_timeout=10) as client,
        pytest.raises(tls.TlsError, match="without TLS: the job's token would cross"),
    ):
        client.allocate(timeout=10)
    assert issubclass(tls.TlsError, AssignerError)
    monkeypatch.setenv(env.INSECURE_TCP, "1")  # plaintext asked for: the TLS assigner refuses it
    with (
        Client(target=tls_assigner.tcp, token=TOKEN, connect_timeout=10) as client,
        pytest.raises(AssignerUnavailable),
    ):
        client.allocate(timeout=10)
    monkeypatch.setenv(env.TLS_DIR, job.directory)
    Path(job.directory, tls.KEY_FILE).chmod(0o640)
    with (
        Client(target=tls_assigner.tcp, token=TOKEN, connect_timeout=10) as client,
        pytest.raises(tls.TlsError, match="mode 0640"),
    ):
        client.allocate(timeout=10)


# ---- executor and controller ----


def test_the_executor_joins_its_controller_over_tls_and_not_with_another_ca(
    start_assigner: StartAssigner, job: tls.Material, other: tls.Material, tmp_path: Path
) -> None:
    controller = start_assigner(gpus=1, tcp="127.0.0.1:0", token=TOKEN, tls_dir=job.directory)
    assert controller.tcp
    stranger_dir = mixed(tmp_path / "stranger", ca_from=job, pair_from=other)
    stranger = start_assigner(gpus=1, token=TOKEN, controller=controller.tcp, tls_dir=stranger_dir)
    executor = start_assigner(
        gpus=2, tcp="127.0.0.1:0", token=TOKEN, controller=controller.tcp, tls_dir=job.directory
    )
    with Client(target=controller.target, token=TOKEN) as on_controller:
        status = wait_for(
            lambda: (s := on_controller.status()).executors and s, what="the executor to join"
        )
        assert status.role == "controller"
        assert [e.address for e in status.executors] == [executor.tcp]
        wait_for(
            lambda: "retrying" in stranger.stderr_text(),
            what="the stranger's refused handshakes",
        )
        # The one with another CA's certificate never joined.
        assert [e.address for e in on_controller.status().executors] == [executor.tcp]
    with Client(target=stranger.target, token=TOKEN) as on_stranger:
        assert on_stranger.status().role == "executor"  # it tried, and serves its own node
