"""The Slurm layer (`acb-sbatch`): job.yaml spec and validation, rendering of the batch script
and prologue templates, submission, and the running job's status and cancel."""
