"""`python -m finetune demo-report --demo runs/demo`: the end-to-end report of `make demo`.

Reads what the pipeline's stages left in the demo directory (pretraining runs' metrics.jsonl, fine-tuning runs'
metrics.json / comparison.json and figures) and writes `report.md` with the papers' tables, the figures and
plain statements of what was measured against the baselines — computed from the numbers, never assumed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from finetune import figures, report


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _mean(values) -> float:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else float("nan")


def pretraining_section(demo: Path, fig_dir: Path) -> tuple[str, list[Path]]:
    lines, figs = [], []
    stages = [("Stage I (MAE)", "stage1", ["loss", "psnr"]), ("Stage II (image-tabular CLIP)", "stage2", ["loss", "acc"]),
              ("MetaCLIP-CMR", "metaclip", ["loss", "acc"])]
    table, says = [], []
    for title, name, keys in stages:
        rows = _rows(demo / name / "metrics.jsonl")
        train = [r for r in rows if r.get("split", "train") == "train"]
        val = [r for r in rows if r.get("split") == "val"]
        if not train:
            continue
        first, last = train[0], train[-1]
        row = {"stage": title, "steps": last["step"], "loss first": first["loss"], "loss last": last["loss"],
               keys[1] + " last": last.get(keys[1])}
        if val:
            retrieval = {k: v for k, v in val[-1].items() if k.endswith("top1")}
            row["val retrieval top-1"] = ", ".join(f"{k.removesuffix('_top1')} {v:.2f}" for k, v in retrieval.items())
        if keys[1] == "acc" and val:
            row["note"] = ("loss moved off chance" if last["loss"] < 0.95 * first["loss"] else
                           "loss stayed at its starting (chance) level")
        table.append(row)
        says += _retrieval_statement(title, val)
        figs.append(figures.training_curves(train, keys, fig_dir / f"pretrain_{name}.png"))
    cols = ["stage", "steps", "loss first", "loss last", "psnr last", "acc last", "val retrieval top-1", "note"]
    lines.append(report.markdown_table(table, [c for c in cols if any(c in r for r in table)]))
    lines += ["", *says] if says else []
    return "\n".join(lines), figs


def _retrieval_statement(title: str, val: list[dict]) -> list[str]:
    """Image-to-X validation top-1 over the run: best and last against chance (1 / candidates)."""
    key = next((k for k in (val[0] if val else {}) if k.startswith("image_to_") and k.endswith("_top1")), None)
    if key is None:
        return []
    candidates = val[-1].get("sentences", val[-1].get("n"))  # image -> text: the distinct sentences
    chance = 1 / candidates
    best = max(val, key=lambda r: r[key])
    last = val[-1][key]

    def verdict(v: float) -> str:
        return f"{v / chance:.1f}x chance" if v >= 1.5 * chance else "at chance level"

    return [f"- {title}: validation {key.removesuffix('_top1').replace('_', ' ')} top-1 over {candidates} candidates "
            f"(chance {chance:.3f}): best {best[key]:.2f} at step {best['step']} ({verdict(best[key])}), last "
            f"{last:.2f} at step {val[-1]['step']} ({verdict(last)})."]


def build(demo: str | Path) -> Path:
    demo = Path(demo)
    ft = demo / "finetune"
    fig_dir = demo / "figures"
    sections, figs = [], []
    text, f = pretraining_section(demo, fig_dir)
    sections.append(("Pretraining (2 CPU ranks, DeepSpeed)", text))
    figs += f

    cmp_path = ft / "phenotypes" / "comparison.json"
    if cmp_path.is_file():
        res = json.loads(cmp_path.read_text())
        names = list(next(iter(res.values()))["per_target"])
        table = report.phenotype_table({m: r["per_target"] for m, r in res.items()}, names)
        avg = {m: _mean(r["per_target"][n]["mae"] for n in names) for m, r in res.items()}
        says = []
        for m in avg:
            if m != "mean_guess" and "mean_guess" in avg:
                change = 100 * (avg[m] - avg["mean_guess"]) / avg["mean_guess"]
                verdict = "lower than" if change <= -1 else ("higher than" if change >= 1 else "within 1 % of")
                says.append(f"- `{m}`: average MAE {avg[m]:.3f}, {change:+.1f} % against mean-guess "
                            f"({avg['mean_guess']:.3f}): {verdict} mean-guess.")
        sections.append(("Phenotypes: test MAE (ViTa Table 1 shape)", table + "\n\n" + "\n".join(says)))
        figs += [ft / "phenotypes" / "vita" / "figures" / name for name in ("regression.png", "tsne.png")]
    dis = ft / "diseases" / "metrics.json"
    if dis.is_file():
        res = json.loads(dis.read_text())
        per = res["test"]["per_disease"]
        auroc = _mean(m["auroc"] for m in per.values())
        says = f"Mean test AUROC over the diseases with both classes present: {auroc:.2f} (chance 0.50)."
        sections.append(("Diseases: test classification (ViTa Table 4 shape)",
                         report.disease_table({"vita": per}) + "\n\n" + says))
        figs.append(ft / "diseases" / "figures" / "roc_pr.png")
    seg = ft / "segmentation" / "metrics.json"
    if seg.is_file():
        res = json.loads(seg.read_text())
        sections.append(("Segmentation: test Dice / HD95 (mm), all planes",
                         report.segmentation_table({"vita": res["test"]["per_structure"]}) +
                         f"\n\nFrames scored per plane: {res['test'].get('frames_scored')} (of the"
                         f" {res['test'].get('frames_stored', '?')} stored)."))
        figs.append(ft / "segmentation" / "figures" / "segmentation.png")
    mv = ft / "modality_view" / "metrics.json"
    if mv.is_file():
        t = json.loads(mv.read_text())["test"]
        cols = ["modality_accuracy", "modality_balanced_accuracy", "view_accuracy", "view_balanced_accuracy"]
        sections.append(("MetaCLIP-CMR: modality / view classification (Probe+FT)",
                         report.markdown_table([{"method": "metaclip", **{c: t[c] for c in cols}}], ["method", *cols])))
    return report.write_report(demo / "report.md", "cmrfm demo: synthetic cohort end to end", sections,
                               [f for f in figs if Path(f).is_file()])
