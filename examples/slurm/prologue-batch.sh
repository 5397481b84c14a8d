#!/bin/bash
# An existing batch script that adds acb-slurm's assigners with one line (the eval) and runs two
# gated workers on them with acb_worker. Submit from the repository root (acb-sbatch is taken
# from ./.venv/bin, or from $ACB_BIN_DIR):
#     sbatch examples/slurm/prologue-batch.sh
# The script keeps its own habits: strict mode, an EXIT trap set before the eval (it runs first,
# then the prologue stops the assigners), background steps and a bare `wait` (the assigners are
# not jobs of this shell, so `wait` returns when the workers end).
#SBATCH --job-name=acb-prologue-demo
#SBATCH --nodes=1
#SBATCH --gres=gpu:1
#SBATCH --time=10:00
#SBATCH --output=acb-prologue-demo-%j.out
set -euo pipefail
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"; echo "cleaned up $scratch"' EXIT

acb_bin="${ACB_BIN_DIR:-$PWD/.venv/bin}"
eval "$("$acb_bin/acb-sbatch" prologue --policy simple --virtual-gpus 1 --gpu-memory 16GiB)"

for i in 0 1; do
    # acb_worker NAME [acb-run options] -- CMD: an srun step on the job's GPUs, under acb-run
    # (--gate by default; --auto, --client; --per-node N or --per-gpu N for a group).
    # shellcheck disable=SC2016  # expanded by the worker's bash, not here
    acb_worker "demo-$i" --gate -- bash -c 'echo "$ACB_WORKER holds GPU $CUDA_VISIBLE_DEVICES"; sleep 1' &
done
wait
echo "both workers done"
