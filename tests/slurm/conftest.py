"""The real local Slurm for `slurm`-marked tests (helpers to submit and watch jobs: jobs.py).

The session fixture runs `scripts/slurm-dev-cluster up --nodes 2 --gpus-per-node 2` (root
needed) and, when it started the cluster itself, `down` at the end. Jobs run as root, so the
venv's acb-* tools are reachable from them by absolute path.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from .jobs import CLUSTER, GPUS_PER_NODE, NODES, Cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    """A running dev cluster of 2 nodes x 2 fake GPUs (started here when it was not up)."""
    if os.geteuid() != 0:
        pytest.skip("real-Slurm tests need root: scripts/slurm-dev-cluster starts slurmctld/slurmd")
    was_up = (
        subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True).returncode == 0
    )
    up = subprocess.run(
        [str(CLUSTER), "up", "--nodes", str(NODES), "--gpus-per-node", str(GPUS_PER_NODE)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if up.returncode != 0:
        pytest.fail(f"scripts/slurm-dev-cluster up failed:\n{up.stdout}\n{up.stderr}")
    yield Cluster(NODES, GPUS_PER_NODE)
    if not was_up:
        subprocess.run([str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)
