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
from finetune.probe import mae_ratio
from finetune.tasks import get_task
from finetune.train import fit

def _per_output_resnet(cfg: FinetuneConfig, task, out: Path) -> dict:
    """ResNet-50 trained separately for each target / disease; the per-output test metrics merged."""
    merged = {}
    for name in task.output_names(cfg):
        one = task.single_output(cfg, name)
        res = fit(replace(cfg, task=one, baseline="resnet50", out=out / name), progress=False)
        merged.update(res["test"][task.per_output])
    return {task.per_output: merged}


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
    task = get_task(cfg.task.name)
    results: dict[str, dict] = {}
    for b in baselines:
        if b not in ("mean_guess", "vit_scratch", "resnet50"):
            raise ValueError(f"unknown baseline {b!r}: mean_guess, vit_scratch or resnet50")
        if (b == "mean_guess" and not task.has_mean_guess) or (b == "resnet50" and task.needs_vit):
            continue  # no meaning for this task
        if b == "resnet50" and task.per_output:
            results[b] = _per_output_resnet(cfg, task, out / b)
        else:
            results[b] = fit(replace(cfg, baseline=b, out=out / b), progress=False)["test"]
    for name, encoder in methods.items():
        results[name] = fit(replace(cfg, baseline="none", encoder=Path(encoder), out=out / name), progress=False)["test"]
    table = task.comparison_table(cfg, results)
    atomic_write_text(out / "comparison.json", json.dumps(results, indent=1, default=float))
    sections = [("Methods", "Same splits, seed and protocol (" + cfg.protocol.kind + "); only the encoder differs."),
                ("Results", table)]
    if fractions and task.label_efficiency:
        eff = label_efficiency(cfg, methods, list(fractions), results, baselines)
        sections.append(("Label efficiency: average test MAE / mean-guess (same labelled subset)",
                         label_efficiency_table(eff, cfg.task.targets)))
    return report.write_report(out / "comparison.md", f"Comparison: {task.name} (test split)", sections)


def label_efficiency_table(eff: dict, names: list[str]) -> str:
    """One row per method, one column per labelled fraction: the average over `names` of MAE / mean-guess MAE."""
    cols = [f"{f:g}" for f in eff["fractions"]]
    rows = [{"method": m, **{f"{100 * float(c):g} %": mae_ratio(per[c], eff["mean_guess"][c], names)
                             for c in cols if c in per and eff["mean_guess"].get(c)}}
            for m, per in eff["methods"].items()]
    return report.markdown_table(rows, ["method", *[f"{100 * float(c):g} %" for c in cols]])
