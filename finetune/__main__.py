"""python -m finetune — fine-tune a pretrained cardiac MRI encoder on one GPU: phenotype regression,
disease classification under class imbalance, all-plane segmentation, modality / view classification."""

from __future__ import annotations

import sys

from data_prep.config import add_show_config_command, cli_parser, run_cli
from finetune.config import FinetuneConfig

EPILOG = """examples:
  python -m finetune config --config configs/finetune/vita_phenotypes.yaml
  python -m finetune config --config configs/finetune/tiny.yaml protocol.kind=linear_probe

configs/finetune/ holds the paper-scale task configs (vita_phenotypes, vita_diseases, vita_segmentation,
metaclip_modality_view) and a tiny one for tests.
"""


def main(argv: list[str] | None = None) -> int:
    parser, sub = cli_parser("python -m finetune", __doc__, EPILOG)
    add_show_config_command(sub, FinetuneConfig, "configs/finetune/vita_phenotypes.yaml")
    return run_cli(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
