#!/usr/bin/env python3
"""An AlphaFold2-shaped workload that runs anywhere: a CPU stage and a GPU stage per sequence.

    synthetic.py msa FASTA OUTDIR       CPU stage: align the query against a generated sequence
                                        database (real Smith-Waterman), write an MSA
    synthetic.py predict OUTDIR         GPU stage: Evoformer-like torch model (MSA row attention
                                        with pair bias, column attention, outer-product mean,
                                        triangle multiplication) sized from the sequence and the
                                        MSA, run on the GPU(s) in CUDA_VISIBLE_DEVICES; writes a
                                        CA-trace PDB
    synthetic.py predict OUTDIR --hold  GPU stage for machines without a GPU: holds the (virtual)
                                        GPU for the modelled duration without computing, so the
                                        CPU stays free for the CPU stages of other workers

Durations are modelled on published AlphaFold2 timings (README.md lists the sources) and
multiplied by --scale: a 256-residue protein needs 12 min of MSA search and 3 min of GPU
(5 models x 0.6 min, AF2 paper) at scale 1; the CPU stage grows linearly with length, the GPU
stage with length^1.49 (fitted to 0.6 min at 256 and 1.1 min at 384 residues).

Only the standard library is imported at start (the GPU stage imports torch lazily), so the
process start-up that happens while the lease is held stays short.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

#: Modelled real-world durations of a 256-residue protein, in seconds.
MSA_SECONDS_256 = 12 * 60.0
GPU_SECONDS_256 = 5 * 0.6 * 60.0
#: Growth of the GPU stage with length: ln(1.1/0.6) / ln(384/256).
GPU_LENGTH_EXPONENT = math.log(1.1 / 0.6) / math.log(384 / 256)
DEFAULT_SCALE = 1.0 / 300.0

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


def run_hold(outdir: Path, scale: float) -> dict[str, float]:
    """GPU stage without computing: hold the leased GPU for the modelled time."""
    started = time.monotonic()
    visible = require_gpu_lease()
    msa = read_msa(outdir)
    query = msa[0]
    modelled = gpu_seconds(len(query), scale)
    time.sleep(max(0.0, modelled - (time.monotonic() - started)))
    write_pdb(outdir / "ranked_0.pdb", query, _helix(len(query)))
    info = {
        "mode": "hold",
        "devices": visible,
        "length": len(query),
        "modelled_s": round(modelled, 4),
        "wall_s": round(time.monotonic() - started, 4),
    }
    (outdir / "predict.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
    return info


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
    predict.add_argument("outdir", type=Path)
    predict.add_argument("--hold", action="store_true", help="hold the GPU without computing")
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
        info = run_hold(args.outdir, args.scale)
    else:
        info = run_torch(args.outdir, args.scale, args.blocks, args.recycles, args.max_seq)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
