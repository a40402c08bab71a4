"""python -m cluster — run cmrfm on SLURM through submitit: multi-node pretraining, Ray data prep on
an allocation, single-GPU fine-tuning, with timeout / preemption requeue and automatic resume."""

from __future__ import annotations

import sys

from data_prep.config import add_show_config_command, cli_parser, run_cli
from cluster.config import SlurmConfig

EPILOG = """examples:
  python -m cluster config --config configs/cluster/slurm_multinode.yaml nodes=16 partition=gpu

configs/cluster/ holds a multi-node GPU job (slurm_multinode) and the one-node CPU cluster used in CI (local_cpu).
"""


def main(argv: list[str] | None = None) -> int:
    parser, sub = cli_parser("python -m cluster", __doc__, EPILOG)
    add_show_config_command(sub, SlurmConfig, "configs/cluster/slurm_multinode.yaml")
    return run_cli(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
