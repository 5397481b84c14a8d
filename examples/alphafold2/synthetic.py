#!/usr/bin/env python3
"""An AlphaFold2-shaped workload that runs anywhere: a CPU stage and a GPU stage per sequence.

    synthetic.py msa FASTA OUTDIR       CPU stage: align the query against a generated sequence
                                        database (real Smith-Waterman), write an MSA
    synthetic.py predict OUTDIR         GPU stage: Evoformer-like torch model (MSA row attention
                                        with pair bias, column attention, outer-product mean,
                                        triangle multiplication) sized from the sequence and the
                                        MSA, run on the GPU(s) in CUDA_VISIBLE_DEVICES; writes a
                                        CA-trace PDB
    synthetic.py predict OUTDIR --hold  GPU stage for machines without a GPU: an emulated GPU.
                                        The modelled GPU work is shared with every other process
                                        computing on the same (virtual) GPU, as SMs are: k
                                        concurrent holders each progress at 1/k speed. It waits
                                        instead of computing, so the CPU stays free for the CPU
                                        stages of other workers
    synthetic.py predict OUTDIR... --hold --startup [--compile-cache DIR]
                                        ... after the modelled start-up of a real GPU-stage
                                        process (imports, weights, XLA compilation per input
                                        shape) under the lease
    synthetic.py predict OUTDIR...      several OUTDIRs (a campaign's `batch:`): one process
                                        predicts them all (start-up paid once)

Durations are modelled on published AlphaFold2 timings (README.md lists the sources) and
multiplied by --scale: a 256-residue protein needs 12 min of MSA search and 3 min of GPU
(5 models x 0.6 min, AF2 paper) at scale 1; the CPU stage grows linearly with length, the GPU
stage with length^1.49 (fitted to 0.6 min at 256 and 1.1 min at 384 residues).

Only the standard library is imported at start (the GPU stage imports torch lazily), so the
harness's own start-up under the lease stays short; `--startup` models the real one.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the GPU stage starts under the lease
    import random

#: Modelled real-world durations of a 256-residue protein, in seconds.
MSA_SECONDS_256 = 12 * 60.0
GPU_SECONDS_256 = 5 * 0.6 * 60.0
#: Growth of the GPU stage with length: ln(1.1/0.6) / ln(384/256).
GPU_LENGTH_EXPONENT = math.log(1.1 / 0.6) / math.log(384 / 256)
DEFAULT_SCALE = 1.0 / 300.0
#: Modelled start-up of a real GPU-stage process (`colabfold_batch`), paid while it holds the
#: lease before its first prediction (`predict --startup`), in seconds at scale 1: importing JAX
#: and ColabFold and initialising the CUDA backend (CPU), reading five models' weights, about
#: 0.35 GB each, from shared storage at ~350 MB/s (waiting), and XLA compilation of the model
#: for each input shape: "one to several minutes per model shape" (issue 12; the five models
#: share one compiled program). With a persistent compilation cache a shape compiled by any
#: earlier process is loaded from the cache instead.
STARTUP_IMPORT_S = 15.0
STARTUP_WEIGHTS_S = 5.0
STARTUP_COMPILE_S = 60.0
STARTUP_CACHE_LOAD_S = 5.0
#: Inputs are padded to a multiple of this many residues, so lengths within one bucket share a
#: compiled shape (ColabFold pads to avoid recompiling for every length).
SHAPE_BUCKET = 50

AMINO = "ACDEFGHIKLMNPQRSTVWY"
# A small substitution score: +5 identical, +1 within a chemical group, -2 otherwise.
_GROUPS = ["AVLIMC", "FWY", "KRH", "DE", "STNQ", "GP"]
_GROUP_OF = {a: i for i, g in enumerate(_GROUPS) for a in g}


def msa_seconds(length: int, scale: float) -> float:
    return scale * MSA_SECONDS_256 * length / 256.0


def gpu_seconds(length: int, scale: float) -> float:
    return scale * GPU_SECONDS_256 * (length / 256.0) ** GPU_LENGTH_EXPONENT


def read_fasta(path: Path) -> tuple[str, str]:
    header, chunks = "", []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(">"):
            if header:
                break
            header = line[1:].strip()
        elif line.strip():
            chunks.append(line.strip())
    sequence = "".join(chunks).replace(":", "").upper()
    if not sequence:
        raise SystemExit(f"synthetic.py: no sequence in {path}")
    return header, sequence


def _score(a: str, b: str) -> int:
    if a == b:
        return 5
    return 1 if _GROUP_OF.get(a, -1) == _GROUP_OF.get(b, -2) else -2


def smith_waterman(query: str, target: str, gap: int = 4) -> int:
    """Best local alignment score (linear gap penalty), one row at a time."""
    previous = [0] * (len(target) + 1)
    best = 0
    for q in query:
        current = [0] * (len(target) + 1)
        for j, t in enumerate(target, start=1):
            value = max(0, previous[j - 1] + _score(q, t), previous[j] - gap, current[j - 1] - gap)
            current[j] = value
            if value > best:
                best = value
        previous = current
    return best


def _database_entry(rng: random.Random, query: str) -> str:
    """A database sequence: a mutated homolog of the query (a third of them) or random."""
    if rng.random() < 1 / 3:
        rate = rng.uniform(0.1, 0.6)
        return "".join(rng.choice(AMINO) if rng.random() < rate else c for c in query)
    return "".join(rng.choice(AMINO) for _ in range(len(query)))


def run_msa(fasta: Path, outdir: Path, scale: float, compute_fraction: float) -> dict[str, float]:
    """CPU stage: align against generated database entries until the modelled compute time is
    spent (CPU time), then wait out the modelled database reading (the rest of the stage)."""
    started = time.monotonic()
    cpu0 = time.process_time()
    header, query = read_fasta(fasta)
    total = msa_seconds(len(query), scale)
    compute = total * compute_fraction
    import random

    rng = random.Random(int.from_bytes(hashlib.sha256(query.encode()).digest()[:8], "big"))
    # Align a window of the query so one alignment is short and the budget is kept closely.
    window = query[:64]
    hits: list[tuple[int, str]] = []
    searched = 0
    threshold = 2 * len(window)
    while time.process_time() - cpu0 < compute or searched == 0:
        entry = _database_entry(rng, query)
        score = smith_waterman(window, entry[:64])
        searched += 1
        if score >= threshold:
            hits.append((score, entry))
    remaining = total - (time.monotonic() - started)
    if remaining > 0:
        time.sleep(remaining)  # modelled database I/O: the process waits, the CPU is free
    hits.sort(key=lambda h: -h[0])
    outdir.mkdir(parents=True, exist_ok=True)
    with open(outdir / "msa.a3m", "w", encoding="utf-8") as fh:
        fh.write(f">query {header}\n{query}\n")
        for i, (score, entry) in enumerate(hits[:512]):
            fh.write(f">hit{i} score={score}\n{entry}\n")
    info = {
        "length": len(query),
        "depth": 1 + min(len(hits), 512),
        "searched": searched,
        "modelled_s": round(total, 4),
        "wall_s": round(time.monotonic() - started, 4),
        "cpu_s": round(time.process_time() - cpu0, 4),
    }
    (outdir / "msa.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
    return info


def read_msa(outdir: Path) -> list[str]:
    path = outdir / "msa.a3m"
    if not path.exists():
        raise SystemExit(f"synthetic.py: {path} not found; run the msa stage first")
    return [line.strip() for line in path.read_text().splitlines() if not line.startswith(">")]


def write_pdb(path: Path, sequence: str, coords: list[tuple[float, float, float]]) -> None:
    three = {
        "A": "ALA", "C": "CYS", "D": "ASP", "E": "GLU", "F": "PHE", "G": "GLY", "H": "HIS",
        "I": "ILE", "K": "LYS", "L": "LEU", "M": "MET", "N": "ASN", "P": "PRO", "Q": "GLN",
        "R": "ARG", "S": "SER", "T": "THR", "V": "VAL", "W": "TRP", "Y": "TYR",
    }  # fmt: skip
    with open(path, "w", encoding="ascii") as fh:
        for i, (aa, (x, y, z)) in enumerate(zip(sequence, coords, strict=False), start=1):
            fh.write(
                f"ATOM  {i:5d}  CA  {three.get(aa, 'UNK')} A{i:4d}    "
                f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C\n"
            )
        fh.write("END\n")


def _helix(length: int) -> list[tuple[float, float, float]]:
    return [(2.3 * math.cos(i * 1.745), 2.3 * math.sin(i * 1.745), 1.5 * i) for i in range(length)]


def require_gpu_lease() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not visible:
        raise SystemExit(
            "synthetic.py predict: CUDA_VISIBLE_DEVICES is empty: run this stage as a gpu stage "
            "of an acb-campaign (or under acb-run --gate), which sets it to the leased GPUs"
        )
    return visible


# ---- the emulated GPU: processor sharing among the processes computing on a virtual GPU ----
#
# A real GPU runs the kernels of concurrent processes side by side on its SMs: two predictions on
# one GPU each take about twice as long. The hold mode emulates that. Each virtual GPU has a
# small state file (under a lock file, both in a private directory of this node): the processes
# computing on it now, and a virtual clock V that advances at 1/k of real time while k processes
# compute. A process that starts computing at V0 with W seconds of (exclusive) GPU work is done
# when V reaches V0 + W. So k holders each progress at 1/k speed, the GPU serves one second of
# work per second whenever anyone computes (work-conserving), and no arrangement of holders
# gets more than that. A process sleeps until its predicted finish; whoever leaves (or finds a
# dead holder) wakes the others through their FIFOs, since their finish moved closer. A holder
# that dies (kill -9) is found by its pid and start time at the next update (at the latest
# POLL_S later) and dropped. A stage on several GPUs progresses at the pace of its most shared
# GPU (data-parallel steps wait for the slowest device), counted as a holder on each.

#: The longest a holder sleeps without looking at its GPU's state (finding dead holders).
POLL_S = 0.25
GPU_DIR_ENV = "ACB_SYNTHETIC_GPU_DIR"


def _start_time(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def gpu_state_dir() -> Path:
    """This user's directory for the emulated GPUs' state ($ACB_SYNTHETIC_GPU_DIR, else a private
    directory in /dev/shm or the temporary directory): node-local, so locks work."""
    given = os.environ.get(GPU_DIR_ENV)
    if given:
        path = Path(given)
    else:
        import tempfile

        base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
        path = base / f"acb-synthetic-gpu-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise SystemExit(
            f"synthetic.py: {path} must belong to this user and be writable by nobody else "
            f"(set {GPU_DIR_ENV} to another directory)"
        )
    return path


def gpu_key(device_id: str) -> str:
    """Which emulated GPU a device id is: the same id under the same assigner on this host."""
    where = os.environ.get("ACB_ASSIGNER") or os.environ.get("ACB_RUN_DIR") or ""
    text = f"{socket.gethostname()}\0{where}\0{device_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class EmulatedGpu:
    """One virtual GPU's state file: {"t": monotonic time, "v": virtual clock at t,
    "holders": {token: {"pid", "start", "v0", "fifo"}}}, changed only under its lock file."""

    def __init__(self, directory: Path, device_id: str) -> None:
        key = gpu_key(device_id)
        self.device_id = device_id
        self.path = directory / f"gpu-{key}.json"
        self.lock_path = directory / f"gpu-{key}.lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        """The state, with dead holders dropped, under the lock. The clock is advanced to now
        only when the holders change (it advances at a constant rate until then); whoever
        leaves or is dropped wakes the holders that stay."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                state = json.loads(self.path.read_text(encoding="utf-8"))
                if not isinstance(state, dict) or not isinstance(state.get("holders"), dict):
                    raise ValueError("not a state")
                float(state["t"]), float(state["v"])
            except (OSError, ValueError, KeyError, TypeError):
                state = {"t": time.monotonic(), "v": 0.0, "holders": {}}
            self._advance(state)  # to now, at the rate of the holders so far
            before = set(state["holders"])
            for token, holder in list(state["holders"].items()):
                if not _alive(holder):
                    del state["holders"][token]
                    with contextlib.suppress(OSError):
                        os.unlink(holder["fifo"])
            yield state
            after = set(state["holders"])
            if after != before:
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(state), encoding="utf-8")
                os.replace(tmp, self.path)
                if before - after:  # fewer holders: the others' finish moved closer
                    _wake(h["fifo"] for h in state["holders"].values())
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _advance(state: dict) -> None:
        now = time.monotonic()
        holders = len(state["holders"])
        if holders:
            state["v"] = float(state["v"]) + max(0.0, now - float(state["t"])) / holders
        state["t"] = now


def _alive(holder: dict) -> bool:
    """Whether a holder's process still runs (the same process: pid and start time)."""
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if holder.get("start") == "?":  # no /proc: the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _start_time(pid) == holder.get("start")


def _wake(fifos: Iterator[str] | Sequence[str]) -> None:
    """One byte into each holder's FIFO: its finish moved, it recomputes it now."""
    for fifo in fifos:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue  # gone, or no reader: a dead holder, dropped at the next update
        with contextlib.suppress(OSError):  # a full pipe has a wake-up pending already
            os.write(fd, b"!")
        os.close(fd)


#: A holder's wake-up FIFO in the state directory: wake-<pid>-<start time>.
WAKE_PREFIX = "wake-"


def remove_stray_fifos(directory: Path) -> list[str]:
    """Remove the wake-up FIFOs of processes that are gone; returns their names. A holder's
    FIFO goes when it leaves or is found dead, but one killed (SIGKILL) after creating its FIFO
    and before joining a GPU is in no GPU's state: its FIFO is found here, by its name."""
    removed = []
    for entry in os.scandir(directory):
        if not entry.name.startswith(WAKE_PREFIX):
            continue
        pid, _, start = entry.name[len(WAKE_PREFIX) :].partition("-")
        if pid.isdigit() and start and not _alive({"pid": pid, "start": start}):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def compute_on_gpus(work_s: float, devices: Sequence[str], directory: Path) -> dict[str, float]:
    """Spend `work_s` seconds of exclusive GPU work on the emulated GPUs `devices`, sharing each
    with whoever else computes on it. Returns what it took: wall time and the most holders
    seen on one GPU (this process included)."""
    pid = os.getpid()
    start = _start_time(pid) or "?"
    token = f"{pid}-{start}"
    remove_stray_fifos(directory)
    fifo = directory / f"{WAKE_PREFIX}{token}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(fifo)
    gpus = [EmulatedGpu(directory, d) for d in dict.fromkeys(devices)]
    began = time.monotonic()
    most = 1
    joined: list[EmulatedGpu] = []
    wake = -1
    try:  # from the FIFO's creation on: a stop (SIGTERM: SystemExit) removes it
        os.mkfifo(fifo, 0o600)
        # Read and write: the FIFO always has a writer (this process), so it never reads as EOF.
        wake = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        for gpu in gpus:
            with gpu.locked() as state:
                state["holders"][token] = {
                    "pid": pid, "start": start, "v0": state["v"], "fifo": str(fifo)
                }  # fmt: skip
                most = max(most, len(state["holders"]))
            joined.append(gpu)
        while True:
            progress, slowest = math.inf, 1
            for gpu in gpus:
                with gpu.locked() as state:
                    mine = state["holders"].get(token)
                    if mine is None:  # dropped as dead (a pid clash after a restart): rejoin
                        mine = state["holders"][token] = {
                            "pid": pid, "start": start, "v0": state["v"], "fifo": str(fifo)
                        }  # fmt: skip
                    holders = len(state["holders"])
                    progress = min(progress, state["v"] - float(mine["v0"]))
                    slowest = max(slowest, holders)
            most = max(most, slowest)
            remaining = work_s - progress
            if remaining <= 1e-6:
                break
            # At the present sharing the work ends in remaining x holders seconds; a leaver
            # wakes this process earlier, a newcomer only makes the wait too short (then it
            # sleeps again).
            ready, _, _ = select.select([wake], [], [], min(remaining * slowest, POLL_S))
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake, 4096)
    finally:
        for gpu in joined:
            with gpu.locked() as state:
                state["holders"].pop(token, None)  # the others speed up: they are woken
        if wake != -1:
            os.close(wake)
        with contextlib.suppress(OSError):
            os.unlink(fifo)
    return {"compute_wall_s": time.monotonic() - began, "max_sharers": float(most)}


def _busy(cpu_seconds: float) -> None:
    """Burn `cpu_seconds` of this process's CPU time (compilation, imports)."""
    end = time.process_time() + cpu_seconds
    x = 0
    while time.process_time() < end:
        for i in range(2000):
            x = (x * 31 + i) % 1000003


def _spend(seconds: float, compute_fraction: float) -> None:
    """`seconds` of wall time, the first `compute_fraction` of it computing, the rest waiting."""
    started = time.monotonic()
    _busy(seconds * compute_fraction)
    time.sleep(max(0.0, seconds - (time.monotonic() - started)))


class Startup:
    """The modelled start-up of one GPU-stage process: imports and weights once, compilation
    once per shape (or a load from the persistent compilation cache, when one is given)."""

    def __init__(self, scale: float, cache: Path | None, compute_fraction: float) -> None:
        self.scale, self.cache, self.fraction = scale, cache, compute_fraction
        self.compiled: set[int] = set()
        self.started = False

    def before(self, length: int) -> dict[str, float | int | str]:
        """What it costs before predicting a sequence of `length`; returns what was done."""
        began = time.monotonic()
        info: dict[str, float | int | str] = {}
        if not self.started:
            self.started = True
            _spend(self.scale * STARTUP_IMPORT_S, self.fraction)
            _spend(self.scale * STARTUP_WEIGHTS_S, 0.0)  # reading weights: waiting on I/O
            info["imported"] = 1
        shape = -(-length // SHAPE_BUCKET) * SHAPE_BUCKET
        info["shape"] = shape
        if shape not in self.compiled:
            self.compiled.add(shape)
            marker = None if self.cache is None else self.cache / f"shape-{shape}.compiled"
            if marker is not None and marker.exists():
                _spend(self.scale * STARTUP_CACHE_LOAD_S, 0.0)
                info["compile"] = "cache"
            else:
                _spend(self.scale * STARTUP_COMPILE_S, self.fraction)
                info["compile"] = "compiled"
                if marker is not None:
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    tmp = marker.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text("compiled\n")
                    os.replace(tmp, marker)
        else:
            info["compile"] = "in process"
        info["startup_s"] = round(time.monotonic() - began, 4)
        return info


def run_hold(
    outdirs: Sequence[Path], scale: float, startup: Startup | None = None
) -> list[dict[str, float | int | str]]:
    """GPU stage without a GPU: the modelled GPU work on the emulated GPU(s) of the lease, one
    item after the other (several OUTDIRs: one process predicts them all, shortest first, as
    colabfold_batch does), each after its modelled start-up when `startup` is given."""
    visible = require_gpu_lease()
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    directory = gpu_state_dir()
    queries = sorted(((read_msa(outdir)[0], outdir) for outdir in outdirs), key=lambda q: len(q[0]))
    infos = []
    for query, outdir in queries:
        started = time.monotonic()
        modelled = gpu_seconds(len(query), scale)
        before = startup.before(len(query)) if startup is not None else {}
        shared = compute_on_gpus(modelled, devices, directory)
        write_pdb(outdir / "ranked_0.pdb", query, _helix(len(query)))
        info = {
            "mode": "hold",
            "devices": visible,
            "length": len(query),
            "modelled_s": round(modelled, 4),
            "compute_wall_s": round(shared["compute_wall_s"], 4),
            "max_sharers": int(shared["max_sharers"]),
            "batch": len(queries),
            **before,
            "wall_s": round(time.monotonic() - started, 4),
        }
        (outdir / "predict.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
        infos.append(info)
    return infos


def run_torch(outdir: Path, scale: float, blocks: int, recycles: int, max_seq: int) -> dict:
    """GPU stage: an Evoformer-like trunk on the leased GPU, then a distance head and classical
    multidimensional scaling to CA coordinates."""
    started = time.monotonic()
    visible = require_gpu_lease()
    import torch
    from torch import nn

    class RowAttentionWithPairBias(nn.Module):
        def __init__(self, c_m: int, c_z: int, heads: int) -> None:
            super().__init__()
            self.heads, self.norm = heads, nn.LayerNorm(c_m)
            self.qkv = nn.Linear(c_m, 3 * c_m, bias=False)
            self.bias = nn.Linear(c_z, heads, bias=False)
            self.out = nn.Linear(c_m, c_m)

        def forward(self, m: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            s, n, c = m.shape
            q, k, v = self.qkv(self.norm(m)).view(s, n, 3, self.heads, c // self.heads).unbind(2)
            logits = torch.einsum("sihc,sjhc->shij", q, k) / math.sqrt(c // self.heads)
            logits = logits + self.bias(z).permute(2, 0, 1).unsqueeze(0)
            out = torch.einsum("shij,sjhc->sihc", logits.softmax(-1), v).reshape(s, n, c)
            return m + self.out(out)

    class ColumnAttention(nn.Module):
        def __init__(self, c_m: int, heads: int) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(c_m, heads, batch_first=True)
            self.norm = nn.LayerNorm(c_m)

        def forward(self, m: torch.Tensor) -> torch.Tensor:
            x = self.norm(m).transpose(0, 1)  # residues as batch, sequences as tokens
            out, _ = self.attn(x, x, x, need_weights=False)
            return m + out.transpose(0, 1)

    class OuterProductMean(nn.Module):
        def __init__(self, c_m: int, c_z: int, c: int = 16) -> None:
            super().__init__()
            self.norm, self.a, self.b = nn.LayerNorm(c_m), nn.Linear(c_m, c), nn.Linear(c_m, c)
            self.out = nn.Linear(c * c, c_z)

        def forward(self, m: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            x = self.norm(m)
            outer = torch.einsum("sic,sjd->ijcd", self.a(x), self.b(x)) / m.shape[0]
            return z + self.out(outer.flatten(-2))

    class TriangleMultiplication(nn.Module):
        def __init__(self, c_z: int) -> None:
            super().__init__()
            self.norm, self.ab = nn.LayerNorm(c_z), nn.Linear(c_z, 2 * c_z)
            self.gate, self.out = nn.Linear(c_z, c_z), nn.Linear(c_z, c_z)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            x = self.norm(z)
            a, b = self.ab(x).sigmoid().chunk(2, -1)
            update = torch.einsum("ikc,jkc->ijc", a, b) / z.shape[0]
            return z + self.gate(x).sigmoid() * self.out(update)

    class Transition(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.ReLU(), nn.Linear(4 * c, c)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.net(x)

    class EvoformerBlock(nn.Module):
        def __init__(self, c_m: int, c_z: int) -> None:
            super().__init__()
            self.row = RowAttentionWithPairBias(c_m, c_z, 8)
            self.col = ColumnAttention(c_m, 8)
            self.m_trans, self.z_trans = Transition(c_m), Transition(c_z)
            self.opm, self.tri = OuterProductMean(c_m, c_z), TriangleMultiplication(c_z)

        def forward(self, m: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            m = self.m_trans(self.col(self.row(m, z)))
            z = self.z_trans(self.tri(self.opm(m, z)))
            return m, z

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    msa = read_msa(outdir)[:max_seq]
    query = msa[0]
    n = len(query)
    c_m, c_z = 64, 32
    index = {a: i for i, a in enumerate(AMINO)}
    tokens = torch.tensor(
        [[index.get(a, 0) for a in row[:n].ljust(n, "A")] for row in msa], device=device
    )
    torch.manual_seed(0)
    embed_m, embed_z = nn.Embedding(21, c_m).to(device), nn.Embedding(21, c_z).to(device)
    trunk = nn.ModuleList(EvoformerBlock(c_m, c_z) for _ in range(blocks)).to(device)
    distance = nn.Linear(c_z, 1).to(device)
    with torch.no_grad():
        m = embed_m(tokens)
        z = embed_z(tokens[0])[:, None, :] + embed_z(tokens[0])[None, :, :]
        for _ in range(recycles):
            for block in trunk:
                m, z = block(m, z)
        d = nn.functional.softplus(distance(z).squeeze(-1)) + 3.8
        d = (d + d.T) / 2
        # Classical MDS: coordinates from the predicted distance matrix.
        centre = torch.eye(n, device=device) - 1.0 / n
        gram = -0.5 * centre @ (d * d) @ centre
        values, vectors = torch.linalg.eigh(gram.double())
        coords = (vectors[:, -3:] * values[-3:].clamp(min=0).sqrt()).float().cpu().tolist()
    if device.type == "cuda":
        torch.cuda.synchronize()
    write_pdb(outdir / "ranked_0.pdb", query, [tuple(c) for c in coords])
    info = {
        "mode": "torch",
        "device": str(device),
        "devices": visible,
        "length": n,
        "msa_depth": len(msa),
        "blocks": blocks,
        "recycles": recycles,
        "modelled_s": round(gpu_seconds(n, scale), 4),
        "wall_s": round(time.monotonic() - started, 4),
        "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
    }
    (outdir / "predict.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
    return info


def _scale(text: str) -> float:
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synthetic.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    msa = sub.add_parser("msa", help="CPU stage")
    msa.add_argument("fasta", type=Path)
    msa.add_argument("outdir", type=Path)
    msa.add_argument(
        "--compute-fraction",
        type=float,
        default=1.0,
        help="share of the stage spent computing; the rest models waiting on database reads",
    )
    predict = sub.add_parser("predict", help="GPU stage")
    predict.add_argument(
        "outdir", type=Path, nargs="+", help="the item's directory (several: one process for all)"
    )
    predict.add_argument(
        "--hold",
        action="store_true",
        help="emulate the GPU (no GPU needed): the modelled work, shared with the other "
        "processes on the same virtual GPU",
    )
    predict.add_argument(
        "--startup",
        action="store_true",
        help="--hold: model the start-up of a real GPU-stage process under the lease (imports, "
        "weights, XLA compilation per input shape)",
    )
    predict.add_argument(
        "--compile-cache",
        type=Path,
        help="--startup: a persistent compilation cache (a directory all nodes see): shapes "
        "compiled by an earlier process are loaded instead of compiled",
    )
    predict.add_argument(
        "--startup-compute-fraction",
        type=float,
        default=1.0,
        help="--startup: share of imports and compilation spent computing (the rest waits)",
    )
    predict.add_argument("--blocks", type=int, default=8, help="Evoformer-like blocks")
    predict.add_argument("--recycles", type=int, default=3)
    predict.add_argument("--max-seq", type=int, default=128, help="MSA rows used")
    for p in (msa, predict):
        p.add_argument(
            "--scale", type=_scale, default=DEFAULT_SCALE, help="time scale (e.g. 1/300)"
        )
        p.add_argument("--fail-item", default="", help="exit 3 for this item id (tests)")
    args = parser.parse_args(argv)
    if args.fail_item and os.environ.get("ACB_CAMPAIGN_ITEM") == args.fail_item:
        print(f"synthetic.py: failing {args.fail_item} on purpose", file=sys.stderr)
        return 3
    if args.stage == "msa":
        info = run_msa(
            args.fasta, args.outdir, args.scale, min(1.0, max(0.0, args.compute_fraction))
        )
    elif args.hold:
        # Stopped (the campaign stops its workers with SIGTERM): leave the emulated GPU at once,
        # so that the others speed up now, not when they find a dead holder.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        startup = None
        if args.startup:
            fraction = min(1.0, max(0.0, args.startup_compute_fraction))
            startup = Startup(args.scale, args.compile_cache, fraction)
        for info in run_hold(args.outdir, args.scale, startup):
            print(json.dumps(info))
        return 0
    else:
        for outdir in args.outdir:  # one process, one torch import, for every OUTDIR
            print(
                json.dumps(run_torch(outdir, args.scale, args.blocks, args.recycles, args.max_seq))
            )
        return 0
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
