"""The emulated GPU of `synthetic.py predict --hold` is shared like a real one (issue 12).

Real processes on one virtual GPU: a holder computing beside another progresses at half speed
(its compute time is at least twice its work: a lower bound, which load can only lengthen), a
holder on another GPU or under another assigner does not share, and a holder killed with
SIGKILL is dropped, so the GPU is not slowed by the dead. The state directory is each test's own.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "alphafold2"
SYNTHETIC = EXAMPLE / "synthetic.py"
SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ"

pytestmark = pytest.mark.timeout(180)

# At scale 1 a 66-residue prediction is 3 min x (66/256)^1.49 of GPU work (synthetic.py's
# model): `scale_for` sets one holder's work in seconds.
WORK_AT_SCALE_1 = 3 * 60 * (len(SEQUENCE) / 256) ** (math.log(1.1 / 0.6) / math.log(1.5))


def scale_for(seconds: float) -> str:
    return repr(seconds / WORK_AT_SCALE_1)


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Gpus:
    """`predict --hold` processes over one state directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.state = tmp_path / "gpu-state"
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self, name: str, devices: str, seconds: float, assigner: str = "unix:/a"
    ) -> subprocess.Popen[str]:
        out = self.tmp_path / name
        out.mkdir()
        (out / "msa.a3m").write_text(f">query\n{SEQUENCE}\n")
        env = {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": devices,
            "ACB_ASSIGNER": assigner,
            "ACB_SYNTHETIC_GPU_DIR": str(self.state),
        }
        proc = subprocess.Popen(
            [sys.executable, "-S", str(SYNTHETIC), "predict", str(out), "--hold",
             "--scale", scale_for(seconds)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen[str], name: str) -> dict[str, float]:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        return json.loads((self.tmp_path / name / "predict.json").read_text())

    def holders(self) -> list[int]:
        """The pids computing now, over every GPU's state file."""
        pids = []
        for path in self.state.glob("gpu-*.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            pids += [int(h["pid"]) for h in state["holders"].values()]
        return pids

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def gpus(tmp_path: Path):  # type: ignore[no-untyped-def]
    pool = Gpus(tmp_path)
    yield pool
    pool.cleanup()


def test_a_holder_alone_computes_its_work(gpus: Gpus) -> None:
    info = gpus.finish(gpus.start("alone", "0", 0.3), "alone")
    assert info["mode"] == "hold" and info["max_sharers"] == 1
    assert info["modelled_s"] == pytest.approx(0.3, rel=1e-3)
    assert info["compute_wall_s"] >= info["modelled_s"] * 0.99
    assert info["wall_s"] >= info["compute_wall_s"]
    assert gpus.holders() == []  # it left


def test_two_holders_of_one_gpu_each_progress_at_half_speed(gpus: Gpus) -> None:
    """Sharing is never free: the GPU serves one second of work per second."""
    long = gpus.start("long", "0", 60.0)
    wait_for(lambda: long.pid in gpus.holders(), what="the first holder to start computing")
    short = gpus.finish(gpus.start("short", "0", 0.5), "short")
    assert short["max_sharers"] == 2
    assert short["compute_wall_s"] >= 2 * short["modelled_s"] * 0.99
    assert gpus.holders() == [long.pid]


def test_holders_of_other_gpus_or_other_assigners_do_not_share(gpus: Gpus) -> None:
    long = gpus.start("long", "0", 60.0)
    wait_for(lambda: long.pid in gpus.holders(), what="the first holder to start computing")
    other_gpu = gpus.finish(gpus.start("other-gpu", "1", 0.2), "other-gpu")
    assert other_gpu["max_sharers"] == 1
    other_job = gpus.finish(gpus.start("other-job", "0", 0.2, assigner="unix:/b"), "other-job")
    assert other_job["max_sharers"] == 1


def test_a_stage_on_two_gpus_shares_each_of_them(gpus: Gpus) -> None:
    long = gpus.start("long", "1", 60.0)
    wait_for(lambda: long.pid in gpus.holders(), what="the first holder to start computing")
    both = gpus.finish(gpus.start("both", "0,1", 0.4), "both")
    assert both["max_sharers"] == 2  # GPU 1 is shared: the stage goes at its pace
    assert both["compute_wall_s"] >= 2 * both["modelled_s"] * 0.99


def test_a_holder_killed_with_sigkill_is_dropped_and_stops_slowing_the_gpu(gpus: Gpus) -> None:
    dead = gpus.start("dead", "0", 60.0)
    wait_for(lambda: dead.pid in gpus.holders(), what="the holder to start computing")
    waiter = gpus.start("waiter", "0", 0.6)
    wait_for(lambda: waiter.pid in gpus.holders(), what="the second holder to start computing")
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    # The survivor finds the dead holder (at its next look, within a quarter second) and
    # finishes; the dead one leaves nothing behind, not even its wake-up FIFO.
    info = gpus.finish(waiter, "waiter")
    assert info["max_sharers"] == 2
    assert gpus.holders() == []
    assert not list(gpus.state.glob("wake-*"))
    # A newcomer finds the GPU to itself.
    assert gpus.finish(gpus.start("after", "0", 0.2), "after")["max_sharers"] == 1


def test_a_broken_state_file_is_started_afresh(gpus: Gpus) -> None:
    first = gpus.finish(gpus.start("first", "0", 0.1), "first")
    assert first["max_sharers"] == 1
    (state,) = gpus.state.glob("gpu-*.json")
    state.write_text("{not json")
    assert gpus.finish(gpus.start("second", "0", 0.1), "second")["max_sharers"] == 1
    assert json.loads(state.read_text())["holders"] == {}


def test_a_batch_pays_the_modelled_start_up_once_and_a_compilation_cache_is_reused(
    tmp_path: Path,
) -> None:
    """`--startup`: imports and weights once per process, a compilation per input shape (50-
    residue buckets) unless the persistent cache has it; several OUTDIRs are one process."""
    cache = tmp_path / "jax-cache"
    outs = []
    for name, length in (("long", 120), ("short", 60), ("short2", 70)):
        out = tmp_path / name
        out.mkdir()
        (out / "msa.a3m").write_text(f">query\n{SEQUENCE[:60] + 'A' * (length - 60)}\n")
        outs.append(out)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "ACB_SYNTHETIC_GPU_DIR": str(tmp_path / "g")}

    def predict(*dirs: Path) -> list[dict[str, object]]:
        result = subprocess.run(
            [sys.executable, "-S", str(SYNTHETIC), "predict", *map(str, dirs), "--hold",
             "--startup", "--compile-cache", str(cache), "--scale", "1/3000",
             "--startup-compute-fraction", "0.5"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [json.loads((d / "predict.json").read_text()) for d in dirs]

    long, short, short2 = predict(*outs)
    # Shortest first, as colabfold_batch predicts; the start-up is paid by the first only.
    assert [short["batch"], short2["batch"], long["batch"]] == [3, 3, 3]
    assert short["imported"] == 1 and "imported" not in short2 and "imported" not in long
    assert (short["shape"], short2["shape"], long["shape"]) == (100, 100, 150)
    assert (short["compile"], short2["compile"], long["compile"]) == (
        "compiled", "in process", "compiled",
    )  # fmt: skip
    scale = 1 / 3000
    assert short["startup_s"] >= scale * (15 + 5 + 60) * 0.99
    assert sorted(p.name for p in cache.iterdir()) == ["shape-100.compiled", "shape-150.compiled"]
    # A later process finds both shapes in the cache: it loads them instead of compiling.
    again = predict(outs[0])[0]
    assert again["imported"] == 1 and again["compile"] == "cache"


def test_a_holder_stopped_with_sigterm_leaves_the_gpu_at_once(gpus: Gpus) -> None:
    stopped = gpus.start("stopped", "0", 60.0)
    wait_for(lambda: stopped.pid in gpus.holders(), what="the holder to start computing")
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=30) == 128 + signal.SIGTERM
    assert gpus.holders() == []  # left by itself, not found dead later
    assert not list(gpus.state.glob("wake-*"))


def test_a_fifo_left_by_a_holder_killed_before_it_joined_is_removed(gpus: Gpus) -> None:
    """SIGKILL between creating its wake-up FIFO and joining a GPU leaves the FIFO in no GPU's
    state: the next holder finds it by its name (pid and start time of a process that is gone)
    and removes it; a live process's FIFO is kept."""
    gpus.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stray = gpus.state / f"wake-{dead.pid}-1"  # its start time cannot be 1 tick after boot
    os.mkfifo(stray, 0o600)
    mine = gpus.state / f"wake-{os.getpid()}-{_start_time(os.getpid())}"
    os.mkfifo(mine, 0o600)
    try:
        assert gpus.finish(gpus.start("next", "0", 0.1), "next")["max_sharers"] == 1
        assert sorted(p.name for p in gpus.state.glob("wake-*")) == [mine.name]
    finally:
        mine.unlink()


def test_a_stop_between_creating_the_fifo_and_joining_leaves_no_fifo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop (SIGTERM: the handler's SystemExit) anywhere from the FIFO's creation on removes
    it: here raised by the first step after it, opening it."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import synthetic

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    real_open = os.open

    def open_or_stop(path: str, *args: int) -> int:
        if Path(path).name.startswith("wake-"):
            raise SystemExit(128 + signal.SIGTERM)
        return real_open(path, *args)

    monkeypatch.setattr(synthetic.os, "open", open_or_stop)
    with pytest.raises(SystemExit):
        synthetic.compute_on_gpus(1.0, ["0"], state)
    monkeypatch.undo()
    assert not list(state.glob("wake-*"))


def _start_time(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2 :].split()[19]
