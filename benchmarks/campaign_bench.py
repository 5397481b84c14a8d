#!/usr/bin/env python3
"""Campaign throughput: static (one worker per GPU) vs shared (N workers per GPU, each policy).

The same campaign (the AF2-shaped synthetic workload of examples/alphafold2/synthetic.py) runs
once per configuration with real `acb-campaign worker` processes and a real `acb-assigner`
(virtual GPUs). Printed per run: items/hour over the makespan and at steady state (completions
after the first one), GPU busy fraction (from the event log), the analytical bound
min(GPUs / GPU-stage time, cores / CPU seconds per item), and throughput as a fraction of it.

On a machine without a GPU the GPU stage holds the virtual GPU for its modelled duration without
computing (`synthetic.py predict --hold`), so it does not steal the cores the CPU stages need;
the CPU stage computes for `--compute-fraction` of its modelled time (real alignment work) and
waits for the rest (modelled database reads).

    .venv/bin/python benchmarks/campaign_bench.py [--items 32] [--workers-per-gpu 8] [--gpus 1]
        [--slurm]   # each configuration as an acb-sbatch job on the local Slurm
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "alphafold2"))

from acb_slurm.assigner.testing import AssignerProcess  # noqa: E402
from acb_slurm.campaign.store import ResultsStore  # noqa: E402
from acb_slurm.report import build_report, build_run, summarize  # noqa: E402

SYNTHETIC = REPO / "examples" / "alphafold2" / "synthetic.py"
AMINO = "ACDEFGHIKLMNPQRSTVWY"


@dataclass
class RunResult:
    """The measurements of one configuration."""

    name: str
    policy: str
    gpus: int
    workers: int
    items_done: int
    makespan_s: float
    items_per_hour: float
    steady_items_per_hour: float
    busy_fraction: float
    gpu_stage_s: float
    gpu_stage_modelled_s: float
    cpu_stage_s: float
    cpu_stage_modelled_s: float
    cpu_seconds_per_item: float
    wait_p50_s: float | None
    wait_p99_s: float | None
    handoff_gap_p50_ms: float | None
    bound_items_per_hour: float
    bound_by: str
    fraction_of_bound: float
    modelled_gpu_bound_items_per_hour: float
    fraction_of_modelled_gpu_bound: float
    event_log: str


def write_items(path: Path, count: int, seed: int, lengths: tuple[int, int]) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(count):
            seq = "".join(rng.choice(AMINO) for _ in range(rng.randint(*lengths)))
            fh.write(f">bench{i:03d} synthetic AF2-shaped item\n{seq}\n")


def write_campaign(directory: Path, scale: str, compute_fraction: float, memory: str) -> Path:
    spec = {
        "name": directory.name,
        "items": "../items.fasta",
        "results": "results",
        "retries": 0,
        "progress_interval": 3600,
        "stages": [
            {
                "name": "msa",
                "device": "cpu",
                "command": [
                    "{python}", str(SYNTHETIC), "msa", "{fasta}", "{outdir}",
                    "--scale", scale, "--compute-fraction", str(compute_fraction),
                ],
            },
            {
                "name": "predict",
                "device": "gpu",
                "mode": "gate",
                "memory": memory,
                "command": [
                    # -S: the hold mode needs only the standard library; a shorter start-up
                    # while the lease is held (it is a larger share of a scaled-down stage).
                    "{python}", "-S", str(SYNTHETIC), "predict", "{outdir}", "--hold",
                    "--scale", scale,
                ],
            },
        ],
    }  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "campaign.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def run_local(
    directory: Path, campaign: Path, name: str, policy: str, gpus: int, workers: int
) -> Path:
    """Workers as local processes against one local acb-assigner; returns its event log."""
    with AssignerProcess(directory / "assigner", gpus=gpus, policy=policy, name="node") as node:
        procs = []
        for i in range(workers):
            env = node.client_env(ACB_WORKER=f"{name}-w{i}")
            log = open(directory / f"worker{i}.log", "w", encoding="utf-8")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "acb_slurm.campaign.cli", "worker", str(campaign)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"[{name}] workers exited with {codes}; see {directory}/worker*.log")
    return node.event_log


def run_slurm(
    directory: Path, campaign: Path, name: str, policy: str, gpus: int, per_gpu: int
) -> Path:
    """One acb-sbatch job on the local Slurm (virtual GPUs); returns its event log."""
    job = {
        "allocation": {
            "name": name,
            "partition": "acb",
            "nodes": 1,
            "gpus_per_node": gpus,
            "time": "20:00",
            "output": f"{name}-%j.out",
        },
        "broker": {"policy": policy, "virtual_gpus": gpus, "gpu_memory": "80GiB"},
        "campaign": str(campaign),
        "workers": [
            {
                "name": name,
                "mode": "client",
                "command": [str(Path(sys.executable).parent / "acb-campaign"), "worker"],
                "per_gpu": per_gpu,
            }
        ],
    }
    spec = directory / "job.yaml"
    spec.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "acb-sbatch"), "submit", str(spec)],
        cwd=directory,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    job_id = out.split("submitted job ", 1)[1].split()[0]
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
    while True:
        record = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
        ).stdout
        state = record.split("JobState=", 1)[1].split()[0]
        if state in final:
            break
        time.sleep(1.0)
    if state != "COMPLETED":
        raise SystemExit(
            f"[{name}] job {job_id} ended {state}; see {directory}/{name}-{job_id}.out"
        )
    (log,) = directory.glob(f"acb-runs/{job_id}/*/events.jsonl")
    return log


def run_config(
    root: Path, name: str, policy: str, gpus: int, workers: int, args: argparse.Namespace
) -> RunResult:
    directory = root / name
    if directory.exists():
        shutil.rmtree(directory)
    campaign = write_campaign(directory, args.scale, args.compute_fraction, args.memory)
    where = "local Slurm job" if args.slurm else "local processes"
    print(
        f"[{name}] {workers} worker(s) on {gpus} GPU(s), policy {policy}, {where} ...", flush=True
    )
    if args.slurm:
        event_log = run_slurm(directory, campaign, name, policy, gpus, workers // gpus)
    else:
        event_log = run_local(directory, campaign, name, policy, gpus, workers)
    store = ResultsStore(directory / "results")
    done = store.done_records()
    ends = sorted(d["finished"] for d in done.values())
    # From the first item's start to the last item's end (the same for local and Slurm runs:
    # it leaves out job queueing and start-up).
    makespan = ends[-1] - min(d["started"] for d in done.values())
    steady = (len(ends) - 1) / (ends[-1] - ends[0]) * 3600 if len(ends) > 1 else 0.0

    def stage(key: str, field: str) -> list[float]:
        return [float(d["stages"][key][field]) for d in done.values()]

    modelled_gpu, modelled_cpu = [], []
    for item_id in done:
        out = store.outdir(item_id)
        modelled_gpu.append(json.loads((out / "predict.json").read_text())["modelled_s"])
        modelled_cpu.append(json.loads((out / "msa.json").read_text())["modelled_s"])
    gpu_stage = statistics.mean(stage("predict", "wall_s"))
    cpu_seconds = statistics.mean(
        a + b for a, b in zip(stage("msa", "cpu_s"), stage("predict", "cpu_s"), strict=True)
    )
    cores = os.cpu_count() or 1
    gpu_bound = gpus / gpu_stage * 3600
    cpu_bound = cores / cpu_seconds * 3600
    bound, bound_by = min((gpu_bound, "GPU"), (cpu_bound, "CPU"))
    summary = summarize(build_run([event_log], name))
    result = RunResult(
        name=name,
        policy=policy,
        gpus=gpus,
        workers=workers,
        items_done=len(done),
        makespan_s=makespan,
        items_per_hour=len(done) / makespan * 3600,
        steady_items_per_hour=steady,
        busy_fraction=summary.busy_fraction,
        gpu_stage_s=gpu_stage,
        gpu_stage_modelled_s=statistics.mean(modelled_gpu),
        cpu_stage_s=statistics.mean(stage("msa", "wall_s")),
        cpu_stage_modelled_s=statistics.mean(modelled_cpu),
        cpu_seconds_per_item=cpu_seconds,
        wait_p50_s=summary.wait_p50_s,
        wait_p99_s=summary.wait_p99_s,
        handoff_gap_p50_ms=(
            summary.handoff_gap_p50_s * 1000 if summary.handoff_gap_p50_s is not None else None
        ),
        bound_items_per_hour=bound,
        bound_by=bound_by,
        fraction_of_bound=steady / bound,
        modelled_gpu_bound_items_per_hour=gpus / statistics.mean(modelled_gpu) * 3600,
        fraction_of_modelled_gpu_bound=steady / (gpus / statistics.mean(modelled_gpu) * 3600),
        event_log=str(event_log),
    )
    print(
        f"[{name}] {len(done)} items in {makespan:.1f}s: {result.items_per_hour:.0f}/h "
        f"(steady {steady:.0f}/h), GPU busy {100 * summary.busy_fraction:.1f}%, "
        f"bound {bound:.0f}/h ({bound_by}), {100 * result.fraction_of_bound:.1f}% of it",
        flush=True,
    )
    return result


def markdown(results: list[RunResult], static: RunResult, args: argparse.Namespace) -> str:
    lines = [
        "| run | policy | GPUs x workers | items/h (makespan) | items/h (steady) | vs static "
        "(steady) | GPU busy | GPU stage (modelled) | bound (limit) | steady / bound | "
        "steady / modelled-GPU bound | wait p50 / p99 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        waits = f"{r.wait_p50_s:.2f}s / {r.wait_p99_s:.2f}s" if r.wait_p50_s is not None else "-"
        lines.append(
            f"| {r.name} | {r.policy} | {r.gpus} x {r.workers} | {r.items_per_hour:.0f} | "
            f"{r.steady_items_per_hour:.0f} | "
            f"{r.steady_items_per_hour / static.steady_items_per_hour:.2f}x | "
            f"{100 * r.busy_fraction:.1f}% | "
            f"{r.gpu_stage_s:.2f}s ({r.gpu_stage_modelled_s:.2f}s) | "
            f"{r.bound_items_per_hour:.0f} ({r.bound_by}) | {100 * r.fraction_of_bound:.1f}% | "
            f"{100 * r.fraction_of_modelled_gpu_bound:.1f}% | {waits} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--workers-per-gpu", type=int, default=8)
    parser.add_argument("--scale", default="1/300", help="time scale of the modelled durations")
    parser.add_argument("--compute-fraction", type=float, default=0.15)
    parser.add_argument("--lengths", type=int, nargs=2, default=(200, 320))
    parser.add_argument("--memory", default="60GiB", help="GPU-stage memory estimate (of 80GiB)")
    parser.add_argument("--policies", nargs="+", default=["simple", "gpu-sharing", "gpu-affinity"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/acb-campaign-bench"))
    parser.add_argument(
        "--save-timeline", type=Path, help="also copy the static-vs-shared timeline PNG here"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--slurm",
        action="store_true",
        help="run each configuration as an acb-sbatch job on the local Slurm "
        "(scripts/slurm-dev-cluster up) instead of local processes",
    )
    args = parser.parse_args()

    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    write_items(root / "items.fasta", args.items, args.seed, tuple(args.lengths))
    print(
        f"campaign bench: {args.items} items, lengths {args.lengths[0]}-{args.lengths[1]}, "
        f"scale {args.scale}, compute fraction {args.compute_fraction}, "
        f"{os.cpu_count()} cores, {args.gpus} virtual GPU(s), "
        f"{'local Slurm jobs' if args.slurm else 'local processes'}",
        flush=True,
    )
    t0 = time.time()
    results = [run_config(root, "static", "simple", args.gpus, args.gpus, args)]
    for policy in args.policies:
        results.append(
            run_config(
                root, f"shared-{policy}", policy, args.gpus, args.gpus * args.workers_per_gpu, args
            )
        )
    static = results[0]
    table = markdown(results, static, args)
    print()
    print(table)
    best = max(results[1:], key=lambda r: r.steady_items_per_hour)
    print(
        f"\nshared ({best.policy}) / static: "
        f"{best.steady_items_per_hour / static.steady_items_per_hour:.2f}x steady, "
        f"{best.items_per_hour / static.items_per_hour:.2f}x over the makespan; "
        f"total bench time {time.time() - t0:.0f}s"
    )
    paths = build_report(
        [Path(static.event_log)],
        root / "report",
        [Path(best.event_log)],
        names=["static", best.name],
        title="Campaign benchmark: static vs shared",
    )
    (root / "results.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "runs": [asdict(r) for r in results],
                "table": table,
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    if args.save_timeline:
        shutil.copyfile(paths.png, args.save_timeline)
    print(f"report: {paths.html}\ntimeline: {paths.png}\nresults: {root / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
