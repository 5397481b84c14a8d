"""Defaults that several parts of acb-slurm share, each written once here.

Plain constants without imports, so that anything (acb-run included) may read them for free.
The spec models (acb_slurm.slurm.spec, acb_slurm.campaign.spec) use them as field defaults; the
command-line options and templates that mirror a spec field refer to them too.
"""

#: Scheduling policy of a node's assigner (a name in acb_slurm.scheduler's registry).
POLICY = "simple"
#: Seconds a job waits for every node's assigner to be ready.
STARTUP_TIMEOUT_S = 60
#: Memory of each virtual GPU when a job declares virtual GPUs without `gpu_memory`.
VIRTUAL_GPU_MEMORY = "80GiB"
#: Directory (under the submit directory) that holds each job's run directory.
RUN_ROOT = "acb-runs"
