"""python -m finetune — fine-tune a pretrained cardiac MRI encoder on one GPU: phenotype regression,
disease classification under class imbalance, all-plane segmentation, modality / view classification."""

from __future__ import annotations

import argparse
import sys

from data_prep.config import ConfigError, add_show_config_command
from finetune.config import FinetuneConfig

EPILOG = """examples:
  python -m finetune config --config configs/finetune/vita_phenotypes.yaml
  python -m finetune config --config configs/finetune/tiny.yaml protocol.kind=linear_probe

configs/finetune/ holds the paper-scale task configs (vita_phenotypes, vita_diseases, vita_segmentation,
metaclip_modality_view) and a tiny one for tests.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_show_config_command(sub, FinetuneConfig, "configs/finetune/vita_phenotypes.yaml")
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
