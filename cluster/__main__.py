"""python -m cluster — run cmrfm on SLURM through submitit: multi-node pretraining, Ray data prep on
an allocation, single-GPU fine-tuning, with timeout / preemption requeue and automatic resume."""

from __future__ import annotations

import argparse
import sys

from data_prep.config import ConfigError, add_show_config_command
from cluster.config import SlurmConfig

EPILOG = """examples:
  python -m cluster config --config configs/cluster/slurm_multinode.yaml nodes=16 partition=gpu

configs/cluster/ holds a multi-node GPU job (slurm_multinode) and the one-node CPU cluster used in CI (local_cpu).
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_show_config_command(sub, SlurmConfig, "configs/cluster/slurm_multinode.yaml")
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
