"""examples/alphafold2: the files validate, and the synthetic workload's stages really run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from acb_slurm.campaign.items import read_items
from acb_slurm.campaign.spec import Device, GpuMode, load_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "alphafold2"
SYNTHETIC = EXAMPLE / "synthetic.py"
SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SYNTHETIC), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def test_the_synthetic_campaign_and_its_jobs_validate() -> None:
    spec = load_spec(EXAMPLE / "campaign-synthetic.yaml")
    assert [s.name for s in spec.stages] == ["msa", "predict"]
    assert spec.stages[0].device is Device.CPU and spec.stages[0].nice == 10
    assert spec.stages[1].device is Device.GPU and spec.stages[1].mode is GpuMode.GATE
    assert spec.batched_stage is spec.stages[1] and spec.stages[1].batch == 4
    assert spec.stages[1].outputs == ("ranked_0.pdb",)
    assert len(read_items(spec.items)) == 24
    from acb_slurm.slurm.spec import load_spec as load_job

    for name in ("job.yaml", "job-synthetic.yaml"):
        job = load_job(EXAMPLE / name)
        assert job.campaign is not None and job.workers[0].mode == "client"


def test_the_colabfold_campaign_caps_jax_at_the_predict_stages_memory_estimate(
    tmp_path: Path,
) -> None:
    """Each predict stage is a fresh JAX process: no slow `platform` allocator; no preallocation,
    a memory fraction equal to `memory` of an 80 GiB GPU, and no unified memory (ColabFold
    would set it, with a fraction of 4.0, unless set)."""
    text = (EXAMPLE / "campaign.yaml").read_text()
    fasta = tmp_path / "q.fasta"
    fasta.write_text(f">q test\n{SEQUENCE}\n")
    text = text.replace("/path/to/sequences", str(fasta))
    text = text.replace("/path/to/af2-results", str(tmp_path / "results"))
    (tmp_path / "campaign.yaml").write_text(text)
    predict = load_spec(tmp_path / "campaign.yaml").stages[1]
    assert predict.name == "predict" and predict.mode is GpuMode.GATE
    assert "XLA_PYTHON_CLIENT_ALLOCATOR" not in predict.env
    assert predict.env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert predict.env["TF_FORCE_UNIFIED_MEMORY"] == "0"
    fraction = float(predict.env["XLA_PYTHON_CLIENT_MEM_FRACTION"])
    assert fraction * 80 * 1024**3 == pytest.approx(predict.memory_bytes)
    # One colabfold_batch process for up to 8 sequences: a directory of their MSAs in, one
    # .done.txt per sequence out.
    assert predict.batch == 8 and "{items_dir}" in predict.command
    assert predict.item_link == "{outdir}/msa/*.a3m"
    assert predict.outputs == ("{results}/predictions/{item}.done.txt",)


def test_the_cpu_stage_aligns_and_the_hold_stage_needs_a_lease(tmp_path: Path) -> None:
    fasta = tmp_path / "q.fasta"
    fasta.write_text(f">q test\n{SEQUENCE}\n")
    out = tmp_path / "out"
    msa = run("msa", str(fasta), str(out), "--scale", "1/3000")
    assert msa.returncode == 0, msa.stderr
    info = json.loads((out / "msa.json").read_text())
    assert info["length"] == len(SEQUENCE) and info["searched"] >= 1
    assert info["modelled_s"] == pytest.approx(12 * 60 / 3000 * len(SEQUENCE) / 256, abs=1e-4)
    assert (out / "msa.a3m").read_text().splitlines()[1] == SEQUENCE

    no_lease = run("predict", str(out), "--hold", env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert no_lease.returncode != 0 and "CUDA_VISIBLE_DEVICES is empty" in no_lease.stderr

    held = run("predict", str(out), "--hold", "--scale", "1/3000",
               env={**os.environ, "CUDA_VISIBLE_DEVICES": "0",
                    "ACB_SYNTHETIC_GPU_DIR": str(tmp_path / "gpus")})  # fmt: skip
    assert held.returncode == 0, held.stderr
    info = json.loads((out / "predict.json").read_text())
    exponent = math.log(1.1 / 0.6) / math.log(1.5)
    expected = 3 * 60 / 3000 * (len(SEQUENCE) / 256) ** exponent
    assert info["modelled_s"] == pytest.approx(expected, abs=1e-4)
    assert info["wall_s"] >= info["compute_wall_s"] >= info["modelled_s"]
    assert info["max_sharers"] == 1 and info["batch"] == 1 and "startup_s" not in info
    assert len((out / "ranked_0.pdb").read_text().splitlines()) == len(SEQUENCE) + 1


@pytest.mark.slow
def test_the_torch_stage_runs_the_evoformer_like_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "msa.a3m").write_text(f">query\n{SEQUENCE}\n>hit0\n{SEQUENCE[::-1]}\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES") or "0"}
    result = run("predict", str(out), "--blocks", "1", "--recycles", "1", env=env)
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "predict.json").read_text())
    assert info["mode"] == "torch" and info["msa_depth"] == 2 and info["length"] == len(SEQUENCE)
    atoms = [line for line in (out / "ranked_0.pdb").read_text().splitlines() if line[:4] == "ATOM"]
    assert len(atoms) == len(SEQUENCE)
    coords = [tuple(float(a[30 + 8 * k : 38 + 8 * k]) for k in range(3)) for a in atoms]
    assert all(math.isfinite(c) for xyz in coords for c in xyz)
