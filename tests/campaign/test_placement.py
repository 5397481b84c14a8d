"""gpu-sharing spreads a campaign's predictions over idle GPUs before it shares one (issue 12).

The case the issue found: two virtual GPUs, `memory` small enough that many predictions fit one
GPU (30 bytes; the issue had written `30`, a size with no unit, which is now refused). Two
workers whose predictions are known to run at once (a barrier in the stage) must get one GPU each
under gpu-sharing; under `gpu-sharing:pack`, which asks for packing, they share GPU 0 while GPU 1
idles.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from acb_slurm.assigner.testing import AssignerProcess
from acb_slurm.campaign.store import ResultsStore

from .conftest import Workers, runs, stage_command, write_campaign, write_fasta

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize(
    ("policy", "gpus_used"), [("gpu-sharing", {"0", "1"}), ("gpu-sharing:pack", {"0"})]
)
def test_two_concurrent_predictions_on_two_gpus(
    tmp_path: Path,
    assigner: Callable[..., AssignerProcess],
    workers: Workers,
    policy: str,
    gpus_used: set[str],
) -> None:
    ids = write_fasta(tmp_path / "items.fasta", 2)
    stages = [
        {"name": "msa", "command": stage_command("msa")},
        {
            "name": "predict",
            "device": "gpu",
            "memory": "30B",
            "command": stage_command(
                "predict", "--barrier", str(tmp_path / "barrier"), "--parties", "2"
            ),
        },
    ]
    campaign = write_campaign(tmp_path, stages, retries=0)
    node = assigner(gpus=2, policy=policy)
    for i in range(2):
        workers.start(campaign, f"w{i}", node.client_env(), "--max-items", "1")
    assert workers.wait_all() == [0, 0]
    assert sorted(ResultsStore(tmp_path / "results").done_records()) == ids
    predictions = [r for r in runs(tmp_path / "results") if r["stage"] == "predict"]
    assert len(predictions) == 2
    assert {r["cuda"] for r in predictions} == gpus_used
    grants = [e for e in node.events() if e["event"] == "grant"]
    assert sorted(g["gpus"][0] for g in grants) == sorted(int(g) for g in gpus_used) * (
        2 // len(gpus_used)
    )
