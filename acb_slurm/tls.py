"""TLS for the assigners' TCP traffic: a per-job CA, one key and certificate, mutual TLS.

Inter-node gRPC (executor → controller, `acb-sbatch status`, a client given a `host:port`
target) runs over TCP. It carries the job's token and session keys, so it is TLS, both ways
authenticated, with material made for one job:

    acb-assigner tls-init DIR      # the prologue: DIR = <run dir>/tls, exported as ACB_TLS_DIR

writes into DIR (made 0700 when missing; an existing one must be this user's and writable by
nobody else):

    ca.pem     the job's CA certificate (EC P-256, self-signed; its key is never written, so not
               even the job can sign another certificate once tls-init has returned)
    cert.pem   the job's certificate, signed by that CA: SAN DNS:acb-assigner, usable as server
               and as client (node addresses are not known in advance, so every assigner
               presents the same fixed name and clients check it through
               `grpc.ssl_target_name_override`)
    key.pem    its private key (PKCS#8, unencrypted)

all three 0600. Loading refuses a file that is not a regular file of this user or that group or
others can access in any way, and a directory of another user or one others can write, the
same rules as the token file and the socket directory. The assigner's TCP listener demands a
client certificate signed by the job's CA (mutual TLS): without the job's files no process
reaches the token check at all; the token stays as the second check.

Policy: a TCP target or listener without TLS material is refused unless plaintext was asked for
explicitly (`acb-assigner --insecure-tcp`, `ACB_INSECURE_TCP=1` for clients): for tests and
development on a machine whose loopback nobody else shares. Unix sockets never use TLS: they are
private by their directory.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acb_slurm import env as _env
from acb_slurm.client.errors import AssignerError

if TYPE_CHECKING:
    import grpc

#: Environment variable: the job's TLS directory (exported by the prologue, read by clients).
TLS_DIR_ENV = _env.TLS_DIR
#: Environment variable: "1" lets a client use a TCP target without TLS (tests, development).
INSECURE_TCP_ENV = _env.INSECURE_TCP
#: The name every assigner's certificate carries, and the name clients check for.
SERVER_NAME = "acb-assigner"
#: The TLS directory's name inside a run directory (<run dir>/tls).
RUN_DIR_NAME = "tls"
CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
FILES = (CA_FILE, CERT_FILE, KEY_FILE)
#: Certificates are valid from a day before they were made (clock skew between nodes) for
#: this many days (jobs are far shorter; the CA is trusted by one job only).
VALID_DAYS = 365


class TlsError(AssignerError):
    """TLS material is missing, unsafe (others can read or replace it) or unusable, or a TCP
    target has none and plaintext was not asked for."""


@dataclass(frozen=True)
class Material:
    """One job's TLS files, read and checked (`load`)."""

    directory: str
    ca: bytes
    cert: bytes
    key: bytes


# ---- making the material (the prologue) ----


def init(directory: str | os.PathLike[str], job: str = "") -> Material:
    """Make a new CA and the job's key and certificate in `directory` (files 0600).

    TlsError if the directory is unsafe or already holds any of the files (they are never
    overwritten: running assigners may be using them).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = os.path.abspath(directory)
    _make_private_directory(folder)
    present = [name for name in FILES if os.path.lexists(os.path.join(folder, name))]
    if present:
        raise TlsError(
            f"{folder} already holds {', '.join(present)}: refusing to overwrite TLS material "
            "an assigner may be using; remove them or choose another directory"
        )
    label = f"acb-slurm job {job}" if job else "acb-slurm job"
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{label} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    material = Material(
        directory=folder,
        ca=ca_cert.public_bytes(serialization.Encoding.PEM),
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    # The key first: a reader that finds the certificates finds the key too.
    for name, data in (
        (KEY_FILE, material.key),
        (CERT_FILE, material.cert),
        (CA_FILE, material.ca),
    ):
        _write_private(os.path.join(folder, name), data)
    return material


def _make_private_directory(folder: str) -> None:
    if not os.path.lexists(folder):
        try:
            os.makedirs(folder, mode=0o700)
            os.chmod(folder, 0o700)  # makedirs honours the umask
        except OSError as exc:
            raise TlsError(f"cannot create the TLS directory {folder}: {exc}") from None
    _check_directory(folder)


def _write_private(path: str, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise TlsError(f"cannot create {path}: {exc}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        os.close(fd)


# ---- loading and checking it ----


def _check_directory(folder: str) -> None:
    try:
        info = os.stat(folder)
    except OSError as exc:
        raise TlsError(f"cannot use the TLS directory {folder}: {exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise TlsError(f"the TLS directory {folder} is not a directory")
    uid = os.geteuid()
    if info.st_uid != uid:
        raise TlsError(
            f"the TLS directory {folder} is owned by uid {info.st_uid}, not by this user "
            f"(uid {uid}): another user could have put their own key and CA there"
        )
    if info.st_mode & 0o022:
        raise TlsError(
            f"the TLS directory {folder} is mode {stat.S_IMODE(info.st_mode):04o}: group or "
            f"others can replace the job's key and CA there; chmod 700 {folder}"
        )


def _read_private(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        hint = " (made by `acb-assigner tls-init DIR`)" if not os.path.lexists(path) else ""
        raise TlsError(f"cannot read {path}{hint}: {exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TlsError(f"{path} is not a regular file")
        uid = os.geteuid()
        if info.st_uid != uid:
            raise TlsError(
                f"{path} is owned by uid {info.st_uid}, not by this user (uid {uid}): refusing "
                "TLS material another user could have made"
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise TlsError(
                f"{path} is mode {mode:04o}: group or others can access the job's TLS "
                f"material (its key lets a process pass as the job's assigners); chmod 600 {path}"
            )
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    finally:
        os.close(fd)
    if b"-----BEGIN " not in data:
        raise TlsError(f"{path} is not a PEM file")
    return data


def load(directory: str | os.PathLike[str]) -> Material:
    """The job's TLS files from `directory`, checked as the module's docstring says."""
    folder = os.path.abspath(directory)
    _check_directory(folder)
    ca, cert, key = (_read_private(os.path.join(folder, name)) for name in FILES)
    return Material(directory=folder, ca=ca, cert=cert, key=key)


# ---- credentials ----


def server_credentials(material: Material) -> grpc.ServerCredentials:
    """For an assigner's TCP listener: its certificate, and clients must show one of the job's."""
    import grpc

    return grpc.ssl_server_credentials(
        [(material.key, material.cert)],
        root_certificates=material.ca,
        require_client_auth=True,
    )


def channel_credentials(material: Material) -> grpc.ChannelCredentials:
    """For a TCP client: trust only the job's CA, show the job's certificate."""
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=material.ca,
        private_key=material.key,
        certificate_chain=material.cert,
    )


def channel_options(options: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """`options` plus the name the server's certificate must carry."""
    return [*options, ("grpc.ssl_target_name_override", SERVER_NAME)]


# ---- choosing, per target ----


def is_unix(target: str) -> bool:
    return target.startswith(("unix:", "unix-abstract:"))


def env_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """The TLS directory the environment names (ACB_TLS_DIR), else None."""
    env = os.environ if environ is None else environ
    return env.get(TLS_DIR_ENV, "").strip() or None


def insecure_allowed(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(INSECURE_TCP_ENV, "").strip() == "1"


def for_target(
    target: str, tls_dir: str | None, environ: Mapping[str, str] | None = None
) -> Material | None:
    """The material a connection to `target` uses: None for a Unix socket, and for a TCP target
    when plaintext was asked for (ACB_INSECURE_TCP=1) and no TLS directory is known; TlsError
    when a TCP target has neither."""
    if is_unix(target):
        return None
    if tls_dir:
        return load(tls_dir)
    if insecure_allowed(environ):
        return None
    raise TlsError(
        f"refusing to talk to the assigner at {target} over TCP without TLS: the job's token "
        f"would cross the network in clear. Set {TLS_DIR_ENV} to the job's TLS directory "
        f"(<run dir>/{RUN_DIR_NAME}, made by `acb-assigner tls-init`), or "
        f"{INSECURE_TCP_ENV}=1 for a test assigner started with --insecure-tcp"
    )


def channel(
    target: str,
    options: Sequence[tuple[str, Any]] = (),
    tls_dir: str | None = None,
) -> grpc.Channel:
    """A synchronous channel to an assigner: plain for `unix:` targets, TLS for TCP targets with
    the material of `tls_dir` (default: ACB_TLS_DIR); TlsError when a TCP target has none and
    ACB_INSECURE_TCP is not 1."""
    import grpc

    material = for_target(target, tls_dir or env_dir())
    if material is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(
        target, channel_credentials(material), options=channel_options(options)
    )


def aio_channel(
    target: str, material: Material | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """An asyncio channel: TLS with `material`, plaintext when it is None (the caller decided
    that plaintext was asked for)."""
    import grpc

    if material is None or is_unix(target):
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(
        target, channel_credentials(material), options=channel_options(options)
    )


def run_dir_tls(run_dir: str | os.PathLike[str] | None) -> str | None:
    """The TLS directory of the job whose run dir is `run_dir`: <run dir>/tls when it exists
    (the job's own, whatever job this process runs in), else ACB_TLS_DIR."""
    if run_dir:
        candidate = Path(run_dir) / RUN_DIR_NAME
        with contextlib.suppress(OSError):
            if candidate.is_dir():
                return str(candidate)
    return env_dir()
