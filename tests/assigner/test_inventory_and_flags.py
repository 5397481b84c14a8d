"""Inventory selection (CUDA_VISIBLE_DEVICES), flag validation and the event log, as plain data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from acb_slurm import tls
from acb_slurm.assigner.cli import app, build_config
from acb_slurm.assigner.errors import AssignerStartError
from acb_slurm.assigner.eventlog import EventLog
from acb_slurm.assigner.inventory import select_visible, virtual_inventory
from acb_slurm.scheduler.types import Gpu

NODE_GPUS = [
    Gpu(index=i, memory_bytes=(i + 1) * 10, device_id=str(i), uuid=f"GPU-{i}aaa-{i}", name="A100")
    for i in range(4)
]


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (
            None,
            [("0", "GPU-0aaa-0"), ("1", "GPU-1aaa-1"), ("2", "GPU-2aaa-2"), ("3", "GPU-3aaa-3")],
        ),
        ("2,0", [("2", "GPU-2aaa-2"), ("0", "GPU-0aaa-0")]),
        ("GPU-3aaa-3, GPU-1", [("GPU-3aaa-3", "GPU-3aaa-3"), ("GPU-1", "GPU-1aaa-1")]),
    ],
    ids=["unset-means-all", "indices-in-given-order", "uuids-and-prefixes-kept-as-given"],
)
def test_visible_devices_pick_and_name_the_gpus(
    visible: str | None, expected: list[tuple[str, str]]
) -> None:
    gpus = select_visible(NODE_GPUS, visible)
    assert [(g.device_id, g.uuid) for g in gpus] == expected
    assert [g.index for g in gpus] == list(range(len(expected)))


@pytest.mark.parametrize(
    ("visible", "message"),
    [
        ("", "no GPU to hand out"),
        ("7", "names GPU 7 but NVML sees only 4"),
        ("GPU-9", "matches no GPU"),
        ("GPU-", "matches several GPUs"),
        ("1,GPU-1aaa-1", "same GPU twice"),
    ],
)
def test_bad_visible_devices_are_refused(visible: str, message: str) -> None:
    with pytest.raises(AssignerStartError, match=message):
        select_visible(NODE_GPUS, visible)


def test_virtual_inventory_declares_identical_gpus() -> None:
    gpus = virtual_inventory(3, 80)
    assert [(g.index, g.device_id, g.memory_bytes) for g in gpus] == [
        (0, "0", 80),
        (1, "1", 80),
        (2, "2", 80),
    ]
    with pytest.raises(AssignerStartError, match="at least 1"):
        virtual_inventory(0, 80)


def config(tmp_path: Path, **flags: object) -> object:
    options: dict[str, object] = {
        "socket_path": str(tmp_path / "a.sock"),
        "tcp": None,
        "policy": "simple",
        "virtual_gpus": 2,
        "gpu_memory": "80GiB",
        "event_log": None,
        "token_file": None,
        "ready_file": None,
        "controller": None,
    }
    options.update(flags)
    return build_config(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"gpu_memory": None}, "--virtual-gpus needs --gpu-memory"),
        ({"gpu_memory": "lots"}, "--gpu-memory: not a size: 'lots'"),
        ({"virtual_gpus": None}, "--gpu-memory is only for virtual GPUs"),
        ({"policy": "fifo"}, "known policies: gpu-affinity, gpu-sharing, simple"),
        ({"tcp": "8080"}, "--tcp wants HOST:PORT"),
        ({"controller": "node1"}, "--controller wants HOST:PORT"),
        ({"token_file": "/nonexistent/token"}, "cannot read --token-file"),
        ({"time_slice": -1.0}, "--time-slice wants seconds >= 0"),
        ({"time_slice": float("nan")}, "--time-slice wants seconds >= 0"),
        ({"tcp": "127.0.0.1:0"}, "--tcp needs --tls-dir DIR"),
        ({"controller": "node1:5000"}, "--controller needs --tls-dir DIR"),
        ({"tcp": "127.0.0.1:0", "tls_dir": "/nonexistent/tls"}, "--tls-dir: cannot use"),
        (
            {"tcp": "127.0.0.1:0", "tls_dir": "/tmp", "insecure_tcp": True},
            "--tls-dir and --insecure-tcp contradict",
        ),
    ],
)
def test_bad_flags_are_refused_with_what_to_do(
    tmp_path: Path, flags: dict[str, object], message: str
) -> None:
    with pytest.raises(AssignerStartError, match=message.replace("(", r"\(")):
        config(tmp_path, **flags)


def test_flags_become_a_config(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    token.chmod(0o600)  # a token file others can read is refused
    built = config(
        tmp_path,
        token_file=str(token),
        tcp="127.0.0.1:0",
        policy="gpu-sharing",
        time_slice=2.5,
        tls_dir=str(tls.init(tmp_path / "tls").directory),
    )
    assert built.tls.key.startswith(b"-----BEGIN PRIVATE KEY")  # type: ignore[attr-defined]
    assert built.token == "abc"  # type: ignore[attr-defined]
    assert built.time_slice == 2.5  # type: ignore[attr-defined]
    assert len(built.gpus) == 2  # type: ignore[attr-defined]
    assert built.gpus[0].memory_bytes == 80 * 1024**3  # type: ignore[attr-defined]


def test_help_lists_the_documented_flags() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for flag in (
        "--socket",
        "--tcp",
        "--policy",
        "--virtual-gpus",
        "--gpu-memory",
        "--event-log",
        "--token-file",
        "--ready-file",
        "--controller",
        "--time-slice",
        "--tls-dir",
        "--insecure-tcp",
    ):
        assert flag in result.output


def test_event_log_lines_carry_ts_event_node_and_survive_close(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    log = EventLog(path, node="n1")
    log.emit("start", policy="simple", gpus=[], pid=1)
    log.emit("stop", reason="SIGTERM")
    log.close()
    log = EventLog(path, node="n1")  # append-only: a restart adds lines
    log.emit("start", policy="simple", gpus=[], pid=2)
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["event"], e["node"]) for e in lines] == [
        ("start", "n1"),
        ("stop", "n1"),
        ("start", "n1"),
    ]
    assert all(isinstance(e["ts"], float) for e in lines)
    assert lines[1]["reason"] == "SIGTERM"
