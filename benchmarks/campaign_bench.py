#!/usr/bin/env python3
"""Campaign throughput: static (one worker per GPU) vs shared (N workers per GPU, each policy),
on one or more GPU counts.

The same campaign (the AF2-shaped synthetic workload of examples/alphafold2/synthetic.py) runs
once per configuration with real `acb-campaign worker` processes and a real `acb-assigner`
(virtual GPUs). Printed per run: items/hour over the makespan and at steady state, GPU busy
(leased, per GPU-second) and GPU computing, the work-conserving bound and throughput as a
fraction of it.

Without a GPU the GPU stage runs on the emulated GPU (`synthetic.py predict --hold`): its
modelled work is shared with every other process computing on the same virtual GPU (processor
sharing: k holders each progress at 1/k speed), so sharing a GPU is never free; it waits instead
of computing, so it does not take the cores the CPU stages need. The CPU stage computes for
`--compute-fraction` of its modelled time (real alignment work) and waits for the rest.

The bound is work-conserving: min(GPUs / modelled GPU work per item, cores / CPU seconds per
item). A GPU serves at most one second of modelled work per second however it is shared, so no
configuration can exceed it; time a lease is held without computing (the stage process starting
and exiting) is what an exclusive lease costs over it. Steady throughput is measured over the
GPU window (first GPU-stage start to last GPU-stage end: every item's GPU work lies inside it),
which cannot overstate a GPU-bound run.

    .venv/bin/python benchmarks/campaign_bench.py [--items 32] [--workers-per-gpu 8] [--gpus 1 2]
        [--memory 30GiB] [--slurm]   # --slurm: each configuration as an acb-sbatch job

`--startup-study` compares start-up paid per item with a persistent compilation cache;
`--batch-study` compares start-up paid per item with a GPU stage over several ready items
(`batch: 4` and `batch: 8`), on the same items and emulated GPU.
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
from typing import Any

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
    gpu_window_s: float
    busy_fraction: float
    computing_fraction: float
    gpus_used: int
    max_sharers: int
    gpu_stage_s: float
    gpu_work_s: float
    cpu_stage_s: float
    cpu_stage_modelled_s: float
    cpu_seconds_per_item: float
    wait_p50_s: float | None
    wait_p99_s: float | None
    handoff_gap_p50_ms: float | None
    bound_items_per_hour: float
    bound_by: str
    fraction_of_bound: float
    makespan_fraction_of_bound: float
    load_average: float
    event_log: str
    startup: str = ""
    startup_s: float = 0.0
    compilations: int = 0
    batch: int = 1
    processes: int = 0


def write_items(path: Path, count: int, seed: int, lengths: tuple[int, int]) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(count):
            seq = "".join(rng.choice(AMINO) for _ in range(rng.randint(*lengths)))
            fh.write(f">bench{i:03d} synthetic AF2-shaped item\n{seq}\n")


def write_campaign(
    directory: Path,
    scale: str,
    compute_fraction: float,
    memory: str,
    startup: str = "",
    batch: int = 1,
) -> Path:
    """`startup`: "" (none), "per-item" (`predict --startup`: every GPU-stage process pays the
    modelled start-up of a real one) or "cache" (the same with a persistent compilation cache,
    fresh for this run). `batch`: the GPU stage's `batch` (one process, one start-up, for up to
    that many ready items; its {outdir} argument repeated per item)."""
    # The workload as it was when the bench started (a copy beside the runs): edits of the
    # example during a run do not change what the run measures.
    synthetic = directory.parent / "synthetic.py"
    if not synthetic.exists():
        shutil.copyfile(SYNTHETIC, synthetic)
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
                    "{python}", str(synthetic), "msa", "{fasta}", "{outdir}",
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
                    "{python}", "-S", str(synthetic), "predict", "{outdir}", "--hold",
                    "--scale", scale,
                    *(["--startup"] if startup else []),
                    *(["--compile-cache", str(directory / "compile-cache")]
                      if startup == "cache" else []),
                ],
                **({"batch": batch, "outputs": ["ranked_0.pdb"]} if batch > 1 else {}),
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
    root: Path,
    name: str,
    policy: str,
    gpus: int,
    workers: int,
    args: argparse.Namespace,
    startup: str = "",
    batch: int = 1,
) -> RunResult:
    directory = root / name
    if directory.exists():
        shutil.rmtree(directory)
    campaign = write_campaign(
        directory, args.scale, args.compute_fraction, args.memory, startup, batch
    )
    where = "local Slurm job" if args.slurm else "local processes"
    print(
        f"[{name}] {workers} worker(s) on {gpus} GPU(s), policy {policy}, {where} ...", flush=True
    )
    load_before = os.getloadavg()[0]
    if args.slurm:
        event_log = run_slurm(directory, campaign, name, policy, gpus, workers // gpus)
    else:
        event_log = run_local(directory, campaign, name, policy, gpus, workers)
    load = (load_before + os.getloadavg()[0]) / 2
    store = ResultsStore(directory / "results")
    done = store.done_records()
    ends = sorted(d["finished"] for d in done.values())
    # From the first item's start to the last item's end (the same for local and Slurm runs:
    # it leaves out job queueing and start-up).
    makespan = ends[-1] - min(d["started"] for d in done.values())

    def stage(key: str, field: str) -> list[float]:
        return [float(d["stages"][key][field]) for d in done.values()]

    gpu_starts = stage("predict", "started")
    gpu_ends = [a + b for a, b in zip(gpu_starts, stage("predict", "wall_s"), strict=True)]
    gpu_window = max(gpu_ends) - min(gpu_starts)
    steady = len(done) / gpu_window * 3600

    work, modelled_cpu, sharers, startups, compiled = [], [], [], [], 0
    gpu_processes = {(d["stages"]["predict"]["started"], d["worker"]) for d in done.values()}
    for item_id in done:
        out = store.outdir(item_id)
        predict = json.loads((out / "predict.json").read_text())
        work.append(predict["modelled_s"])
        startups.append(float(predict.get("startup_s", 0.0)))
        compiled += predict.get("compile") == "compiled"
        sharers.append(int(predict.get("max_sharers", 1)))
        modelled_cpu.append(json.loads((out / "msa.json").read_text())["modelled_s"])
    gpu_work = statistics.mean(work)
    cpu_seconds = statistics.mean(
        a + b for a, b in zip(stage("msa", "cpu_s"), stage("predict", "cpu_s"), strict=True)
    )
    cores = os.cpu_count() or 1
    gpu_bound = gpus / gpu_work * 3600
    cpu_bound = cores / cpu_seconds * 3600
    bound, bound_by = min((gpu_bound, "GPU"), (cpu_bound, "CPU"))
    run = build_run([event_log], name)
    summary = summarize(run)
    used = {g for h in run.holdings for g in h.gpus}
    result = RunResult(
        name=name,
        policy=policy,
        gpus=gpus,
        workers=workers,
        items_done=len(done),
        makespan_s=makespan,
        items_per_hour=len(done) / makespan * 3600,
        steady_items_per_hour=steady,
        gpu_window_s=gpu_window,
        busy_fraction=summary.busy_fraction,
        computing_fraction=sum(work) / (gpus * gpu_window),
        gpus_used=len(used),
        max_sharers=max(sharers),
        gpu_stage_s=statistics.mean(stage("predict", "wall_s")),
        gpu_work_s=gpu_work,
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
        makespan_fraction_of_bound=len(done) / makespan * 3600 / bound,
        load_average=load,
        event_log=str(event_log),
        startup=startup,
        startup_s=statistics.mean(startups),
        compilations=compiled,
        batch=batch,
        processes=len(gpu_processes),
    )
    print(
        f"[{name}] {len(done)} items in {makespan:.1f}s: {result.items_per_hour:.0f}/h "
        f"(steady {steady:.0f}/h), GPU busy {100 * summary.busy_fraction:.1f}%, computing "
        f"{100 * result.computing_fraction:.1f}%, GPUs used {len(used)}/{gpus}, up to "
        f"{result.max_sharers} per GPU; bound {bound:.0f}/h ({bound_by}), "
        f"{100 * result.fraction_of_bound:.1f}% of it (load {load:.1f})",
        flush=True,
    )
    return result


def markdown(results: list[RunResult]) -> str:
    lines = [
        "| run | policy | GPUs x workers | items/h (makespan) | items/h (steady) | vs static "
        "(steady) | GPU busy (leased) | GPU computing | GPUs used | holders per GPU (max) | "
        "GPU stage wall (work) | bound (limit) | **steady / bound** | makespan / bound | "
        "wait p50 / p99 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "---: | ---: | ---: |",
    ]
    if any(r.startup for r in results):
        lines[0] += " start-up per item (compilations) |"
        lines[1] += " ---: |"
    if any(r.batch > 1 for r in results):
        lines[0] += " batch (GPU processes) |"
        lines[1] += " ---: |"
    statics = {r.gpus: r for r in results if r.name.startswith("static")}
    for r in results:
        static = statics.get(r.gpus)
        versus = f"{r.steady_items_per_hour / static.steady_items_per_hour:.2f}x" if static else "-"
        waits = f"{r.wait_p50_s:.2f}s / {r.wait_p99_s:.2f}s" if r.wait_p50_s is not None else "-"
        lines.append(
            f"| {r.name} | {r.policy} | {r.gpus} x {r.workers} | {r.items_per_hour:.0f} | "
            f"{r.steady_items_per_hour:.0f} | {versus} | {100 * r.busy_fraction:.1f}% | "
            f"{100 * r.computing_fraction:.1f}% | {r.gpus_used} of {r.gpus} | {r.max_sharers} | "
            f"{r.gpu_stage_s:.2f}s ({r.gpu_work_s:.2f}s) | "
            f"{r.bound_items_per_hour:.0f} ({r.bound_by}) | **{100 * r.fraction_of_bound:.1f}%** | "
            f"{100 * r.makespan_fraction_of_bound:.1f}% | {waits} |"
            + (f" {r.startup_s:.2f}s ({r.compilations}) |" if r.startup else "")
            + (f" {r.batch} ({r.processes}) |" if any(x.batch > 1 for x in results) else "")
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32, help="items per shared run")
    parser.add_argument(
        "--items-per-gpu",
        type=int,
        help="items per shared run and GPU instead of --items: the drain at the end (the last "
        "items on each GPU) then weighs the same on every GPU count",
    )
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers-per-gpu", type=int, default=8)
    parser.add_argument("--scale", default="1/100", help="time scale of the modelled durations")
    parser.add_argument("--compute-fraction", type=float, default=0.15)
    parser.add_argument("--lengths", type=int, nargs=2, default=(200, 320))
    parser.add_argument(
        "--memory",
        default="30GiB",
        help="GPU-stage memory estimate (of 80GiB): 30GiB lets gpu-sharing place two per GPU",
    )
    parser.add_argument("--policies", nargs="+", default=["simple", "gpu-sharing", "gpu-affinity"])
    parser.add_argument(
        "--static-items",
        type=int,
        help="items of the static runs per GPU (default: as the shared runs); the static rate "
        "is steady from the first item",
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/acb-campaign-bench"))
    parser.add_argument(
        "--save-timeline", type=Path, help="also copy the static-vs-shared timeline PNG here"
    )
    parser.add_argument(
        "--startup-study",
        action="store_true",
        help="instead of the table: every policy with the modelled start-up of a real GPU-stage "
        "process paid per item, and with a persistent compilation cache, in the same run",
    )
    parser.add_argument(
        "--batch-study",
        action="store_true",
        help="instead of the table: start-up paid per item (batch 1) against a GPU stage over "
        "several ready items (--batches), each policy, the same items, in the same run",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
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
    for stale in root.glob("g*/synthetic.py"):
        stale.unlink()
    count = f"{args.items_per_gpu} items per GPU" if args.items_per_gpu else f"{args.items} items"
    print(
        f"campaign bench: {count}, lengths {args.lengths[0]}-{args.lengths[1]}, "
        f"scale {args.scale}, compute fraction {args.compute_fraction}, memory {args.memory}, "
        f"{os.cpu_count()} cores, {' and '.join(map(str, args.gpus))} virtual GPU(s), "
        f"{'local Slurm jobs' if args.slurm else 'local processes'}",
        flush=True,
    )
    t0 = time.time()
    results: list[RunResult] = []
    if args.startup_study:
        return startup_study(root, args, t0)
    if args.batch_study:
        return batch_study(root, args, t0)
    for gpus in args.gpus:
        items = args.items_per_gpu * gpus if args.items_per_gpu else args.items
        static_items = args.static_items * gpus if args.static_items else items
        directory = root / f"g{gpus}"
        directory.mkdir(parents=True, exist_ok=True)
        write_items(directory / "items.fasta", static_items, args.seed, tuple(args.lengths))
        results.append(run_config(directory, f"static-{gpus}gpu", "simple", gpus, gpus, args))
        write_items(directory / "items.fasta", items, args.seed, tuple(args.lengths))
        for policy in args.policies:
            name = f"shared-{policy}-{gpus}gpu"
            workers = gpus * args.workers_per_gpu
            results.append(run_config(directory, name, policy, gpus, workers, args))
    table = markdown(results)
    print()
    print(table)
    for gpus in args.gpus:
        runs = [r for r in results if r.gpus == gpus]
        static, shared = runs[0], runs[1:]
        best = max(shared, key=lambda r: r.steady_items_per_hour)
        print(
            f"{gpus} GPU(s): shared ({best.policy}) / static: "
            f"{best.steady_items_per_hour / static.steady_items_per_hour:.2f}x steady; shared "
            f"rows {min(100 * r.fraction_of_bound for r in shared):.1f}-"
            f"{max(100 * r.fraction_of_bound for r in shared):.1f}% of the bound"
        )
    print(f"total bench time {time.time() - t0:.0f}s")
    last = [r for r in results if r.gpus == args.gpus[-1]]
    sharing = next((r for r in last if r.policy == "gpu-sharing"), last[-1])
    paths = build_report(
        [Path(last[0].event_log)],
        root / "report",
        [Path(sharing.event_log)],
        names=[last[0].name, sharing.name],
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


def startup_study(root: Path, args: argparse.Namespace, t0: float) -> int:
    """Per-item start-up against a persistent compilation cache, per policy, in one run."""
    results = []
    for gpus in args.gpus:
        items = args.items_per_gpu * gpus if args.items_per_gpu else args.items
        directory = root / f"startup-g{gpus}"
        directory.mkdir(parents=True, exist_ok=True)
        write_items(directory / "items.fasta", items, args.seed, tuple(args.lengths))
        workers = gpus * args.workers_per_gpu
        for policy in args.policies:
            for variant in ("per-item", "cache"):
                name = f"startup-{variant}-{policy}-{gpus}gpu"
                results.append(
                    run_config(directory, name, policy, gpus, workers, args, startup=variant)
                )
    table = markdown(results)
    print()
    print(table)
    print(f"total bench time {time.time() - t0:.0f}s")
    write_results(root / "startup-results.json", args, results, table)
    return 0


def batch_study(root: Path, args: argparse.Namespace, t0: float) -> int:
    """Start-up per item against one start-up per batch of ready items, per policy, in one
    run: every run pays the modelled start-up of a real GPU-stage process (`--startup`)."""
    results = []
    for gpus in args.gpus:
        items = args.items_per_gpu * gpus if args.items_per_gpu else args.items
        directory = root / f"batch-g{gpus}"
        directory.mkdir(parents=True, exist_ok=True)
        write_items(directory / "items.fasta", items, args.seed, tuple(args.lengths))
        workers = gpus * args.workers_per_gpu
        for policy in args.policies:
            for batch in args.batches:
                name = f"batch{batch}-{policy}-{gpus}gpu"
                results.append(
                    run_config(
                        directory, name, policy, gpus, workers, args, "per-item", batch=batch
                    )
                )
    table = markdown(results)
    print()
    print(table)
    for base in (r for r in results if r.batch == 1):
        for other in results:
            if other.batch > 1 and (other.policy, other.gpus) == (base.policy, base.gpus):
                print(
                    f"{other.policy}, {other.gpus} GPU(s): batch {other.batch} / per item: "
                    f"{other.steady_items_per_hour / base.steady_items_per_hour:.2f}x steady, "
                    f"{other.items_per_hour / base.items_per_hour:.2f}x makespan"
                )
    print(f"total bench time {time.time() - t0:.0f}s")
    write_results(root / "batch-results.json", args, results, table)
    return 0


def write_results(path: Path, args: argparse.Namespace, results: list[Any], table: str) -> None:
    """The study's arguments, runs and table as JSON."""
    data = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": [asdict(r) for r in results],
        "table": table,
    }
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
