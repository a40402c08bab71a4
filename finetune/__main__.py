"""python -m finetune — fine-tune a pretrained cardiac MRI encoder on one GPU: phenotype regression,
disease classification under class imbalance, all-plane segmentation, modality / view classification."""

from __future__ import annotations

import argparse
import sys

from core.cli import add_show_config_command, cli_parser, config_from_args, run_cli
from finetune.config import FinetuneConfig

EPILOG = """examples:
  python -m finetune train --config configs/finetune/vita_phenotypes.yaml encoder=runs/vita_stage2
  python -m finetune train --config configs/finetune/tiny.yaml protocol.kind=linear_probe
  python -m finetune compare --config configs/finetune/vita_phenotypes.yaml --method mae=runs/vita_stage1 \\
      --method vita=runs/vita_stage2 --baselines mean_guess,vit_scratch,resnet50
  python -m finetune probe --config configs/finetune/vita_phenotypes.yaml --method random=random \
      --method mae=runs/vita_stage1 --method vita=runs/vita_stage2 out=runs/probe
  python -m finetune embed --encoder runs/vita_stage2 --dataset data/ukb/converted --out embeddings.npz
  python -m finetune predict --model runs/demo/finetune/segmentation --input runs/demo/cohort/ukb --out runs/pred
  python -m finetune config --config configs/finetune/vita_phenotypes.yaml

configs/finetune/ holds the paper-scale task configs (vita_phenotypes, vita_diseases, vita_segmentation,
metaclip_modality_view) and a tiny one for tests and the demo.
"""


def _preflight(*args, **kwargs):
    from finetune.data import preflight  # torch: imported when a command runs, not for --help

    return preflight(*args, **kwargs)


def _train(args) -> int:
    from finetune.train import fit

    cfg = config_from_args(FinetuneConfig, args)
    _preflight(cfg.data.dataset, cfg.task.name, [cfg.encoder])
    result = fit(cfg)
    print(f"[finetune] done: best epoch {result.get('best_epoch')}; {cfg.out}/metrics.json, {cfg.out}/report.md")
    return 0


def _compare(args) -> int:
    from finetune.compare import compare

    cfg = config_from_args(FinetuneConfig, args)
    methods = dict(m.split("=", 1) for m in args.method)
    _preflight(cfg.data.dataset, cfg.task.name, [m for m in methods.values() if not m.startswith("imagenet:")])
    baselines = [b for b in args.baselines.split(",") if b]
    fractions = tuple(float(f) for f in args.train_fractions.split(",") if f)
    path = compare(cfg, methods, baselines, fractions)
    print(f"[finetune] comparison table: {path}")
    return 0


def _probe(args) -> int:
    from finetune.probe import RANDOM, probe

    cfg = config_from_args(FinetuneConfig, args)
    methods = {n: (None if e == RANDOM else e) for n, e in (m.split("=", 1) for m in args.method)}
    _preflight(cfg.data.dataset, "phenotypes", list(methods.values()))
    result = probe(cfg, methods)
    for name, r in result["methods"].items():
        print(f"[finetune] probe {name}: average test MAE / mean-guess {r['mae_ratio']:.3f}")
    print(f"[finetune] linear probes: {cfg.out}/probe.md, {cfg.out}/probe.json")
    return 0


def _embed(args) -> int:
    from finetune.embed import embed

    _preflight(args.dataset, "phenotypes", [args.encoder], setting="--dataset")
    path = embed(args.encoder, args.dataset, args.out, split=args.split, batch_size=args.batch_size)
    print(f"[finetune] embeddings: {path}")
    return 0


def _predict(args) -> int:
    from finetune.predict import predict_input

    predict_input(args.model, args.input, args.out, split=args.split, device=args.device)
    return 0


def _scaling(args) -> int:
    from finetune.scaling import ScalingConfig, run_study

    cfg = config_from_args(ScalingConfig, args)
    run_study(cfg)
    print(f"[finetune] scaling study: {cfg.out}/table.md, {cfg.out}/scaling.json, {cfg.out}/scaling.png")
    return 0


def _table3(args) -> int:
    from pathlib import Path

    from finetune.compare import table3

    runs = dict(r.split("=", 1) for r in args.run)
    print(f"[finetune] Table 3: {table3({k: Path(v) for k, v in runs.items()}, Path(args.out))}")
    return 0


def _demo_report(args) -> int:
    from finetune.demo_report import build

    print(f"[finetune] report: {build(args.demo)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser, sub = cli_parser("python -m finetune", __doc__, EPILOG)
    from core.cli import add_config_arguments

    p = sub.add_parser("train", help="one fine-tuning run: train, validate, test, report",
                       description="Fine-tune an encoder (config `encoder`: an export or a pretraining run; none: "
                                   "the config's ViT from scratch) on one task (`task.name`: phenotypes, diseases, "
                                   "segmentation, modality_view) with one protocol (`protocol.kind`). Writes "
                                   "metrics.json, report.md, predictions.csv, figures and TensorBoard under `out`.")
    add_config_arguments(p, "configs/finetune/vita_phenotypes.yaml")
    p.set_defaults(func=_train)
    p = sub.add_parser("compare", help="the paper's comparison: baselines and encoders on one task, one table",
                       description="Fine-tune every --method encoder and the --baselines on the config's task with "
                                   "the same budget and write one comparison table (comparison.md / .json).")
    add_config_arguments(p, "configs/finetune/vita_phenotypes.yaml")
    p.add_argument("--method", action="append", default=[], metavar="NAME=ENCODER",
                   help="an encoder to compare (export or pretraining run directory; sax_segmentation also "
                        "imagenet:FILE, local ImageNet ResNet-50 weights); repeatable")
    p.add_argument("--baselines", default="mean_guess,vit_scratch,resnet50",
                   help="comma-separated: mean_guess, vit_scratch, resnet50 (default: all)")
    p.add_argument("--train-fractions", default="", metavar="F,F,...",
                   help="also fine-tune every method on these nested fractions of the training split, same epochs: "
                        "phenotypes a label-efficiency table, other tasks their primary figure per fraction (e.g. "
                        "sax_segmentation 0.2: MetaCLIP-CMR's 100 %% / 20 %% regimes)")
    p.set_defaults(func=_compare)
    p = sub.add_parser("probe", help="linear probes (ridge) of frozen features per phenotype, against mean-guess")
    add_config_arguments(p, "configs/finetune/vita_phenotypes.yaml")
    p.add_argument("--method", action="append", default=[], metavar="NAME=ENCODER",
                   help="an encoder to probe (export or pretraining run directory; 'random' = the config's ViT, "
                        "randomly initialised); repeatable")
    p.set_defaults(func=_probe)
    p = sub.add_parser("embed", help="per-subject encoder embeddings of a converted dataset -> .npz",
                       description="Embed every subject of a converted UK Biobank dataset with a frozen encoder "
                                   "(mean-pooled tokens, the encoder's own frames) and save keys, splits and "
                                   "embeddings as .npz.")
    p.add_argument("--encoder", required=True, help="encoder.safetensors, its directory, or a pretraining run")
    p.add_argument("--dataset", required=True, help="a converted dataset directory (manifest.json + store.zarr)")
    p.add_argument("--out", required=True, help="output .npz (keys, split, embeddings)")
    p.add_argument("--split", default="all", help="train, val, test or all (default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_embed)
    p = sub.add_parser("predict", help="a fine-tuned model on new subjects -> predictions.csv (+ NIfTI masks)",
                       description="Run a finished `finetune train` run (its best weights, its thresholds) on a "
                                   "converted dataset or on raw UK Biobank subjects (a NIfTI folder, a folder of "
                                   "them, or a folder of 20209 / 20208 zip pairs), preprocessed as the run's "
                                   "training dataset was converted. Writes predictions.csv and, for segmentation, "
                                   "NIfTI label maps (raw input: in the input's own geometry).")
    p.add_argument("--model", required=True, help="a finetune train run directory (config.yaml, best.safetensors)")
    p.add_argument("--input", required=True, help="a converted dataset directory, or raw subjects (see above)")
    p.add_argument("--out", required=True, help="output directory (predictions.csv, predictions/<key>/...)")
    p.add_argument("--split", default="all", help="a converted dataset's split: train, val, test or all (default)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.set_defaults(func=_predict)
    p = sub.add_parser("scaling", help="probe quality against the number of pretraining subjects -> table + plot")
    add_config_arguments(p, "configs/scaling/demo.yaml")
    p.set_defaults(func=_scaling)
    p = sub.add_parser("table3", help="MetaCLIP-CMR's Table 3 from sax_segmentation comparisons (one per dataset)")
    p.add_argument("--run", action="append", default=[], metavar="DATASET=OUT", required=True,
                   help="a `finetune compare --train-fractions 0.2` output of sax_segmentation; repeatable")
    p.add_argument("--out", required=True, help="the markdown report to write")
    p.set_defaults(func=_table3)
    p = sub.add_parser("demo-report", help="the report of `make demo` from what its stages wrote")
    p.add_argument("--demo", default="runs/demo", help="the demo directory (default runs/demo)")
    p.set_defaults(func=_demo_report)
    add_show_config_command(sub, FinetuneConfig, "configs/finetune/vita_phenotypes.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
