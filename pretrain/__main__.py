"""python -m pretrain — train the cardiac MRI encoder: ViTa Stage I (multi-view 3D+T MAE), Stage II
(image-tabular CLIP) and MetaCLIP-CMR (image-metadata-text CLIP), with DeepSpeed ZeRO across GPUs and nodes."""

from __future__ import annotations

import sys

from data_prep.config import add_show_config_command, cli_parser, run_cli
from pretrain.config import PretrainConfig

EPILOG = """examples:
  python -m pretrain config --config configs/pretrain/vita_stage1.yaml          # paper-scale Stage I, resolved
  python -m pretrain config --config configs/pretrain/vita_stage1_tiny.yaml train.zero_stage=3 optim.lr=1e-3

configs/pretrain/ holds the paper-scale configs (vita_stage1, vita_stage2, metaclip_cmr) and tiny ones (*_tiny).
"""


def main(argv: list[str] | None = None) -> int:
    parser, sub = cli_parser("python -m pretrain", __doc__, EPILOG)
    add_show_config_command(sub, PretrainConfig, "configs/pretrain/vita_stage1.yaml")
    return run_cli(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
