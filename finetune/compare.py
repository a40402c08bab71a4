"""`python -m finetune compare`: one task, several encoders and the papers' baselines, one table (ViTa Tables 1-4).

Every method is a full `fit` into `OUT/<method>/` with the same config, seed and splits; only the encoder differs:
  mean_guess    no model: the training mean (phenotypes) / prevalence (diseases)
  vit_scratch   the same ViT, randomly initialised (ViTa's "ViT" baseline)
  resnet50      MONAI's 2D ResNet-50 with planes x frames as channels, one model per target / disease as in ViTa
  NAME=ENCODER  any export or pretraining run directory (e.g. mae=runs/vita_stage1, vita=runs/vita_stage2)
Writes `OUT/comparison.md` and `OUT/comparison.json` (per method: its test metrics).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from data_prep.fsutil import atomic_write_text
from finetune import report
from finetune.config import FinetuneConfig
from finetune.train import fit

KEY = {"phenotypes": "per_target", "diseases": "per_disease", "segmentation": "per_structure"}


def _per_target_resnet(cfg: FinetuneConfig, out: Path) -> dict:
    """ResNet-50 trained separately for each target / disease; the per-target test metrics merged."""
    task, merged = cfg.task.name, {}
    names = cfg.task.targets if task == "phenotypes" else cfg.task.diseases
    for name in names:
        one = replace(cfg.task, targets=[name]) if task == "phenotypes" else replace(cfg.task, diseases=[name])
        res = fit(replace(cfg, task=one, baseline="resnet50", out=out / name), progress=False)
        merged.update(res["test"][KEY[task]])
    return {KEY[task]: merged}


def compare(cfg: FinetuneConfig, methods: dict[str, str], baselines: list[str]) -> Path:
    out = Path(cfg.out)
    task = cfg.task.name
    results: dict[str, dict] = {}
    for b in baselines:
        if b not in ("mean_guess", "vit_scratch", "resnet50"):
            raise ValueError(f"unknown baseline {b!r}: mean_guess, vit_scratch or resnet50")
        if b == "mean_guess" and task not in ("phenotypes", "diseases"):
            continue  # no meaning for segmentation / modality-view
        if b == "resnet50" and task in ("phenotypes", "diseases"):
            results[b] = _per_target_resnet(cfg, out / b)
        elif b != "resnet50" or task == "modality_view":
            results[b] = fit(replace(cfg, baseline=b, out=out / b), progress=False)["test"]
    for name, encoder in methods.items():
        results[name] = fit(replace(cfg, baseline="none", encoder=Path(encoder), out=out / name), progress=False)["test"]
    if task == "phenotypes":
        table = report.phenotype_table({m: r[KEY[task]] for m, r in results.items()}, cfg.task.targets)
    elif task == "diseases":
        table = report.disease_table({m: r[KEY[task]] for m, r in results.items()})
    elif task == "segmentation":
        table = report.segmentation_table({m: r[KEY[task]] for m, r in results.items()})
    else:
        cols = ["modality_accuracy", "modality_balanced_accuracy", "view_accuracy", "view_balanced_accuracy"]
        table = report.markdown_table([{"method": m, **{c: r[c] for c in cols}} for m, r in results.items()],
                                      ["method", *cols])
    atomic_write_text(out / "comparison.json", json.dumps(results, indent=1, default=float))
    return report.write_report(out / "comparison.md", f"Comparison: {task} (test split)", [
        ("Methods", "Same splits, seed and protocol (" + cfg.protocol.kind + "); only the encoder differs."),
        ("Results", table)])
