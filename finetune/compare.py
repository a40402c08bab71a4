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

from core.fsutil import atomic_write_text
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


def label_efficiency(cfg: FinetuneConfig, methods: dict[str, str], fractions: list[float], full: dict,
                     baselines: list[str]) -> dict:
    """Phenotypes on nested fractions of the labelled training subjects (`data.train_fraction`): at each fraction
    every method gets the same budget — the config's epochs over the same subjects, so the same optimisation steps
    (each labelled subject is seen equally often at every fraction) — and the same validation and test splits.
    `full`: the 100 % results (from `compare`).
    Returns {"fractions", "methods": {name: {fraction: per_target}}, "mean_guess": {fraction: per_target}}."""
    out = Path(cfg.out) / "label_efficiency"
    res: dict = {"fractions": sorted(set(fractions) | {1.0}), "methods": {}, "mean_guess": {}}
    todo = {b: None for b in baselines if b == "vit_scratch"} | dict(methods)
    for f in res["fractions"]:
        key = f"{f:g}"
        if f == 1.0:
            res["mean_guess"][key] = full["mean_guess"]["per_target"] if "mean_guess" in full else None
            for name in todo:
                res["methods"].setdefault(name, {})[key] = full[name]["per_target"]
            continue
        sub = replace(cfg, data=replace(cfg.data, train_fraction=f))
        res["mean_guess"][key] = fit(replace(sub, baseline="mean_guess", out=out / key / "mean_guess"),
                                     progress=False)["test"]["per_target"]
        for name, encoder in todo.items():
            one = replace(sub, baseline="vit_scratch", out=out / key / name) if encoder is None else replace(
                sub, baseline="none", encoder=Path(encoder), out=out / key / name)
            res["methods"].setdefault(name, {})[key] = fit(one, progress=False)["test"]["per_target"]
    atomic_write_text(out / "label_efficiency.json", json.dumps(res, indent=1, default=float))
    return res


def compare(cfg: FinetuneConfig, methods: dict[str, str], baselines: list[str],
            fractions: tuple[float, ...] = ()) -> Path:
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
    sections = [("Methods", "Same splits, seed and protocol (" + cfg.protocol.kind + "); only the encoder differs."),
                ("Results", table)]
    if fractions and task == "phenotypes":
        eff = label_efficiency(cfg, methods, list(fractions), results, baselines)
        sections.append(("Label efficiency: average test MAE / mean-guess (same labelled subset)",
                         label_efficiency_table(eff, cfg.task.targets)))
    return report.write_report(out / "comparison.md", f"Comparison: {task} (test split)", sections)


def label_efficiency_table(eff: dict, names: list[str]) -> str:
    """One row per method, one column per labelled fraction: the average over `names` of MAE / mean-guess MAE."""
    from finetune.probe import mae_ratio

    cols = [f"{f:g}" for f in eff["fractions"]]
    rows = [{"method": m, **{f"{100 * float(c):g} %": mae_ratio(per[c], eff["mean_guess"][c], names)
                             for c in cols if c in per and eff["mean_guess"].get(c)}}
            for m, per in eff["methods"].items()]
    return report.markdown_table(rows, ["method", *[f"{100 * float(c):g} %" for c in cols]])
