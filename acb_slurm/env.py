"""Environment variables that connect launchers, clients and assigners: the one list of them."""

from __future__ import annotations

import os

#: gRPC target of the node's assigner: "unix:/path/to/assigner.sock" or "host:port".
ASSIGNER = "ACB_ASSIGNER"
#: Path of a file (mode 0600) holding the job's token.
TOKEN_FILE = "ACB_TOKEN_FILE"
#: The token itself (for tests and ad-hoc use; prefer ACB_TOKEN_FILE).
TOKEN = "ACB_TOKEN"
#: Job identity shown in status and logs; defaults to SLURM_JOB_ID.
JOB_ID = "ACB_JOB_ID"
#: Worker name shown in status and logs; defaults to "<host>:<pid>".
WORKER = "ACB_WORKER"
#: The job's run directory (sockets, event logs, the inter-node config file).
RUN_DIR = "ACB_RUN_DIR"
#: Set by `acb-run --auto` for its child: the automatic-mode settings (JSON). The child removes it
#: at start, so programs it starts in turn do not install automatic mode again.
AUTO = "ACB_AUTO"
#: Idle interval (milliseconds) after which automatic mode gives the GPU back (`--idle-ms`).
IDLE_MS = "ACB_IDLE_MS"
#: Its default, in milliseconds (see benchmarks/RESULTS.md: far above the gaps between device
#: calls of a training loop, small against a CPU phase of seconds). Here, not beside automatic
#: mode, so that `acb-run` resolves it without importing torch (1.7 s of CPU).
DEFAULT_IDLE_MS = 500
#: Device automatic mode manages: "cuda" (default) or "cpu" (tests without a GPU) (`--device`).
AUTO_DEVICE = "ACB_AUTO_DEVICE"
#: Log level of automatic mode inside the program (default WARNING; INFO shows every swap).
AUTO_LOG_LEVEL = "ACB_AUTO_LOG_LEVEL"
#: "1": automatic and manual swap may offload while CUDA graph pools exist (the program
#: re-captures its graphs after every swap); otherwise such an offload is refused.
SWAP_ALLOW_GRAPHS = "ACB_SWAP_ALLOW_GRAPHS"
#: Set by `acb-run --gate` for its child: the id of the lease the child runs under.
LEASE_ID = "ACB_LEASE_ID"
#: Where acb-assigner, acb-run and the other commands live on the nodes (the job's prologue puts
#: it first on PATH).
BIN = "ACB_BIN"
#: Directory of the job's Unix sockets (the run dir, or a short /tmp path when that is too long).
SOCKET_DIR = "ACB_SOCKET_DIR"
#: The controller's TCP address (`host:port`) in a multi-node job, exported by the prologue: gang
#: members (`acb-run --gang`) join there. Unset: the node's own assigner (ACB_ASSIGNER) is it.
CONTROLLER = "ACB_CONTROLLER"
#: Set by `acb-run --gang` for its command: the gang's name, this node's rank, the node count.
GANG = "ACB_GANG"
GANG_NODE_RANK = "ACB_GANG_NODE_RANK"
GANG_NODES = "ACB_GANG_NODES"
#: Path of the job's inter-node config file (assigners.json: each node's address, port, socket).
ASSIGNERS_CONFIG = "ACB_ASSIGNERS_CONFIG"
#: Campaign file a job's campaign workers read (job.yaml's `campaign:`).
CAMPAIGN = "ACB_CAMPAIGN"
#: Set for each stage command of a campaign: the item, the stage name and the attempt (1, 2, ...).
CAMPAIGN_ITEM = "ACB_CAMPAIGN_ITEM"
CAMPAIGN_STAGE = "ACB_CAMPAIGN_STAGE"
CAMPAIGN_ATTEMPT = "ACB_CAMPAIGN_ATTEMPT"
#: A directory searched for sbatch templates before the packaged ones.
TEMPLATE_DIR = "ACB_TEMPLATE_DIR"
#: The job's TLS directory (<run dir>/tls: ca.pem, cert.pem, key.pem, each 0600; made by
#: `acb-assigner tls-init`): clients of a TCP target (`host:port`) use TLS with it.
TLS_DIR = "ACB_TLS_DIR"
#: "1": a client may talk to a TCP target without TLS (tests against `--insecure-tcp` assigners).
INSECURE_TCP = "ACB_INSECURE_TCP"
#: Metadata key that carries the token on every gRPC call.
TOKEN_METADATA_KEY = "x-acb-token"
#: Trailing metadata key of a refused call: the lease book's name for the refusal (e.g.
#: "UnknownSession"), where the status code alone is shared by several.
REFUSAL_METADATA_KEY = "x-acb-refusal"


class ConfigurationError(RuntimeError):
    """The environment does not say how to reach an assigner."""


def assigner_target(environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    target = env.get(ASSIGNER, "").strip()
    if not target:
        raise ConfigurationError(
            f"{ASSIGNER} is not set: run under acb-run or an acb-sbatch job, or export "
            f"{ASSIGNER}=unix:/path/to/assigner.sock (the socket acb-assigner listens on)"
        )
    return target


def controller_target(environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    """Where gangs are joined: ACB_CONTROLLER, else the node's own assigner (one-node jobs)."""
    env = os.environ if environ is None else environ
    return env.get(CONTROLLER, "").strip() or assigner_target(env)


def token(environ: os._Environ[str] | dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    path = env.get(TOKEN_FILE)
    if path:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    return env.get(TOKEN) or None


def job_id(environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(JOB_ID) or env.get("SLURM_JOB_ID", "")


def worker_name(environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if env.get(WORKER):
        return env[WORKER]
    import socket  # here: the automatic mode's boot imports this module in every program

    return f"{socket.gethostname()}:{os.getpid()}"
