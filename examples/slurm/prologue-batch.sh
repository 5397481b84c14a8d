#!/bin/bash
# An existing batch script that adds acb-slurm's assigners with one line (the eval) and runs two
# gated workers on them. Submit from the repository root: sbatch examples/slurm/prologue-batch.sh
#SBATCH --job-name=acb-prologue-demo
#SBATCH --nodes=1
#SBATCH --gres=gpu:1
#SBATCH --time=10:00
#SBATCH --output=acb-prologue-demo-%j.out
set -euo pipefail

acb_bin="${ACB_BIN_DIR:-$PWD/.venv/bin}"
eval "$("$acb_bin/acb-sbatch" prologue --policy simple --virtual-gpus 1 --gpu-memory 16GiB)"

for i in 0 1; do
    # shellcheck disable=SC2016  # expanded by the worker's bash, not here
    ACB_WORKER="demo-$i" srun --overlap --nodes=1 --ntasks=1 "$ACB_RUN_DIR/node-env" \
        "$acb_bin/acb-run" --gate -- bash -c 'echo "$ACB_WORKER holds GPU $CUDA_VISIBLE_DEVICES"; sleep 1' &
done
wait
