"""python -m pretrain — train the cardiac MRI encoder: ViTa Stage I (multi-view 3D+T MAE), Stage II
(image-tabular CLIP) and MetaCLIP-CMR (image-metadata-text CLIP), with DeepSpeed ZeRO across GPUs and nodes."""

from __future__ import annotations

import argparse
import sys

from core.cli import add_config_arguments, add_show_config_command, cli_parser, config_from_args, run_cli
from pretrain.config import PretrainConfig

EPILOG = """examples:
  torchrun --nproc_per_node 2 -m pretrain train --config configs/pretrain/vita_stage1_tiny.yaml
  deepspeed --num_gpus 8 --module pretrain train --config configs/pretrain/vita_stage1.yaml
  python -m pretrain export --run runs/vita_stage1
  python -m pretrain config --config configs/pretrain/vita_stage1.yaml          # paper-scale Stage I, resolved
  python -m pretrain config --config configs/pretrain/vita_stage1_tiny.yaml train.zero_stage=3 optim.lr=1e-3

configs/pretrain/ holds the paper-scale configs (vita_stage1, vita_stage2, metaclip_cmr) and tiny ones (*_tiny).
"""


# sysexits' EX_TEMPFAIL: stopped by a signal before the last step, checkpoint saved; the same command resumes.
# Not 0, so that a chained `train && export` (make demo) does not export an unfinished run.
EXIT_STOPPED = 75


def _train(args) -> int:
    from pretrain.train import train

    cfg = config_from_args(PretrainConfig, args)
    if args.allow_cpu:
        cfg.train.device = "auto"
    result = train(cfg)
    if result["stopped"]:
        return EXIT_STOPPED
    return 0 if result["step"] > 0 else 1


def _export(args) -> int:
    from pretrain.export import export_encoder

    print(f"wrote {export_encoder(args.run, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser, sub = cli_parser("python -m pretrain", __doc__, EPILOG)
    # the deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK in the environment is what we use
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    t = sub.add_parser("train", help="train a stage (config `stage`: mae = ViTa Stage I, tabular_clip = Stage II, "
                                     "metaclip = MetaCLIP-CMR); resumes from the latest complete checkpoint",
                       description="Train with DeepSpeed ZeRO. Launch with torchrun, the deepspeed launcher, srun, "
                                   "or as one process. The dataset, the geometry and the paths are checked first.")
    add_config_arguments(t, "configs/pretrain/vita_stage1_tiny.yaml")
    t.add_argument("--allow-cpu", action="store_true",
                   help="run a GPU config (train.device: cuda) on a machine without a GPU")
    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="write encoder.safetensors + encoder_config.yaml from a run's checkpoint")
    e.add_argument("--run", required=True, help="the run directory (checkpoint.dir)")
    e.add_argument("--out", help="output directory (default: the run directory)")
    e.set_defaults(func=_export)
    add_show_config_command(sub, PretrainConfig, "configs/pretrain/vita_stage1.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
