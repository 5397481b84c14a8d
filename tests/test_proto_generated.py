"""The committed generated code is exactly what proto/ generates."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["assigner_pb2.py", "assigner_pb2.pyi", "assigner_pb2_grpc.py"]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "--proto_path=acb_slurm/_proto=proto",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            "acb_slurm/_proto/acb/v1/assigner.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "acb_slurm/_proto/acb/v1" / name).read_text()
        committed = (ROOT / "acb_slurm/_proto/acb/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run scripts/gen-proto and commit the result"
