"""`python -m finetune compare`: one task, several encoders and the papers' baselines, one table (ViTa Tables 1-4).

Every method is a full `fit` into `OUT/<method>/` with the same config, seed and splits; only the encoder differs:
  mean_guess    no model: the training mean (phenotypes) / prevalence (diseases)
  vit_scratch   the same ViT, randomly initialised (ViTa's "ViT" baseline)
  resnet50      MONAI's 2D ResNet-50 with planes x frames as channels, one model per target / disease as in ViTa
  NAME=ENCODER  any export or pretraining run directory (e.g. mae=runs/vita_stage1, vita=runs/vita_stage2)
  NAME=imagenet:FILE  sax_segmentation: the ResNet-50 from local ImageNet weights (`imagenet_weights`)
Writes `OUT/comparison.md` and `OUT/comparison.json` (per method: its test metrics).

`fractions` (`--train-fractions`): phenotypes get a label-efficiency table (MAE / mean-guess per fraction); other
tasks are fine-tuned again on each nested fraction of the training split and tabulated by their primary figure
(MetaCLIP-CMR's Table 3 for sax_segmentation: methods x 100 % / 20 % of the cases, case-level 3D Dice).
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


IMAGENET = "imagenet:"


def method_config(cfg: FinetuneConfig, encoder: str) -> FinetuneConfig:
    """A NAME=ENCODER method's config: an export / run directory, or `imagenet:FILE` (the 2D ResNet-50 from local
    ImageNet weights)."""
    if str(encoder).startswith(IMAGENET):
        return replace(cfg, baseline="resnet50", encoder=None, imagenet_weights=Path(str(encoder)[len(IMAGENET):]))
    return replace(cfg, baseline="none", encoder=Path(encoder))


def regimes(cfg: FinetuneConfig, methods: dict[str, str], baselines: list[str], fractions: list[float],
            full: dict) -> dict:
    """Every method (and the baselines but mean_guess) fine-tuned again on each nested fraction of the training
    split (`data.train_fraction`), same epochs, validation and test: {method: {fraction: test results}}."""
    out = Path(cfg.out) / "regimes"
    per_output = get_task(cfg.task.name).per_output  # its ResNet-50 baseline is one model per output: left out
    res: dict = {name: {"1": full[name]} for name in full
                 if name != "mean_guess" and not (name == "resnet50" and per_output)}
    for f in sorted(set(fractions) - {1.0}):
        sub = replace(cfg, data=replace(cfg.data, train_fraction=f))
        for name in res:
            one = method_config(sub, methods[name]) if name in methods else replace(sub, baseline=name)
            res[name][f"{f:g}"] = fit(replace(one, out=out / f"{f:g}" / name), progress=False)["test"]
    atomic_write_text(out / "regimes.json", json.dumps(res, indent=1, default=float))
    return res


def regimes_table(task, res: dict) -> str:
    """One row per method, one column per fraction of the training cases: the task's primary test figure."""
    key = task.primary[0]
    cols = sorted({c for per in res.values() for c in per}, key=float, reverse=True)
    rows = [{"method": m, **{f"{100 * float(c):g} %": per[c].get(key) for c in cols if c in per}}
            for m, per in res.items()]
    return report.markdown_table(rows, ["method", *[f"{100 * float(c):g} %" for c in cols]])


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
        results[name] = fit(replace(method_config(cfg, encoder), out=out / name), progress=False)["test"]
    table = task.comparison_table(cfg, results)
    atomic_write_text(out / "comparison.json", json.dumps(results, indent=1, default=float))
    sections = [("Methods", "Same splits, seed and protocol (" + cfg.protocol.kind + "); only the encoder differs."),
                ("Results", table)]
    if fractions and task.label_efficiency:
        eff = label_efficiency(cfg, methods, list(fractions), results, baselines)
        sections.append(("Label efficiency: average test MAE / mean-guess (same labelled subset)",
                         label_efficiency_table(eff, cfg.task.targets)))
    elif fractions:
        reg = regimes(cfg, methods, baselines, list(fractions), results)
        sections.append((f"Training-set regimes: test {task.primary[0]} per fraction of the training cases (nested "
                         f"subsets, same epochs)", regimes_table(task, reg)))
    return report.write_report(out / "comparison.md", f"Comparison: {task.name} (test split)", sections)


def label_efficiency_table(eff: dict, names: list[str]) -> str:
    """One row per method, one column per labelled fraction: the average over `names` of MAE / mean-guess MAE."""
    cols = [f"{f:g}" for f in eff["fractions"]]
    rows = [{"method": m, **{f"{100 * float(c):g} %": mae_ratio(per[c], eff["mean_guess"][c], names)
                             for c in cols if c in per and eff["mean_guess"].get(c)}}
            for m, per in eff["methods"].items()]
    return report.markdown_table(rows, ["method", *[f"{100 * float(c):g} %" for c in cols]])


def table3(runs: dict[str, Path], out: Path) -> Path:
    """MetaCLIP-CMR's Table 3 from `finetune compare --train-fractions 0.2` runs of sax_segmentation, one per
    dataset (`runs`: {"ACDC": OUT, "M&Ms": OUT}): rows the methods, columns dataset x fraction of the training
    cases, test case-level 3D Dice (mean over LV, MYO, RV at ED and ES, then over cases); per method and dataset
    the full per-structure table and the figure of representative slices of its 100 % run."""
    regs = {name: json.loads((Path(run) / "regimes" / "regimes.json").read_text()) for name, run in runs.items()}
    methods = list(dict.fromkeys(m for reg in regs.values() for m in reg))
    cols = [(name, c) for name, reg in regs.items()
            for c in sorted({c for per in reg.values() for c in per}, key=float, reverse=True)]
    label = {(n, c): f"{n} {100 * float(c):g} %" for n, c in cols}
    rows = [{"method": m, **{label[n, c]: regs[n].get(m, {}).get(c, {}).get("case_dice_mean") for n, c in cols}}
            for m in methods]
    rows.append({"method": "best fixed mask", **{label[n, c]: next(iter(regs[n].values()))[c].get(
        "fixed_mask_case_dice_mean") for n, c in cols if c in next(iter(regs[n].values()))}})
    sections = [("Test case-level 3D Dice (mean over LV, MYO, RV at ED and ES; every method the same budget)",
                 report.markdown_table(rows, ["method", *label.values()]))]
    figures = []
    for name, run in runs.items():
        detail = {m: json.loads((Path(run) / "comparison.json").read_text())[m] for m in regs[name]}
        sections.append((f"{name}, all training cases, per structure and phase",
                         get_task("sax_segmentation").comparison_table(None, detail)))
        figures += [p for m in regs[name] for p in sorted((Path(run) / m / "figures").glob("sax_segmentation.png"))]
    return report.write_report(out, "MetaCLIP-CMR Table 3: segmentation transfer (test split)", sections, figures)

