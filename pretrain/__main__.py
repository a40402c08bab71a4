"""python -m pretrain — train the cardiac MRI encoder: ViTa Stage I (multi-view 3D+T MAE), Stage II
(image-tabular CLIP) and MetaCLIP-CMR (image-metadata-text CLIP), with DeepSpeed ZeRO across GPUs and nodes."""

from __future__ import annotations

import argparse
import sys

from data_prep.config import ConfigError, add_show_config_command
from pretrain.config import PretrainConfig

EPILOG = """examples:
  python -m pretrain config --config configs/pretrain/vita_stage1.yaml          # paper-scale Stage I, resolved
  python -m pretrain config --config configs/pretrain/vita_stage1_tiny.yaml train.zero_stage=3 optim.lr=1e-3

configs/pretrain/ holds the paper-scale configs (vita_stage1, vita_stage2, metaclip_cmr) and tiny ones (*_tiny).
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_show_config_command(sub, PretrainConfig, "configs/pretrain/vita_stage1.yaml")
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
