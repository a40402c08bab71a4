"""cluster: submitit launchers for SLURM (and this machine): pretraining, fine-tuning, Ray data prep.

- `submit`      a job config + a cluster config -> a job folder and a submitted job (callable from Python)
- `jobs`        what runs inside the allocation: the pretraining / fine-tuning / data prep callables, requeue on
                timeout or preemption, the Ray cluster over the nodes
- `launch`      the scheduler side: executors, sbatch scripts, job records, status, logs, cancel
- `config`      `SlurmConfig`; `__main__`: the command line (`python -m cluster`)
- `local_slurm.sh` a real one-node SLURM on this machine, for tests and CI
"""
