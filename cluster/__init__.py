"""cluster: submitit launchers for SLURM (and this machine): pretraining, fine-tuning, Ray data prep."""
