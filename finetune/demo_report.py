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

from core.fsutil import atomic_write_text
from finetune import figures, report
from finetune.tasks.segmentation import FIXED_MASK, FIXED_MASK_NOTE
from finetune.probe import bootstrap_ratio_difference, mae_ratio


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


def _retrieval(val: list[dict]) -> tuple[str, int, dict] | None:
    """The image-to-X top-1 key of a contrastive run's validation rows, its number of candidates (image -> text:
    the distinct sentences; else the samples) and the best row; None without such rows."""
    key = next((k for k in (val[0] if val else {}) if k.startswith("image_to_") and k.endswith("_top1")), None)
    if key is None:
        return None
    return key, val[-1].get("sentences", val[-1].get("n")), max(val, key=lambda r: r[key])


def _retrieval_statement(title: str, val: list[dict]) -> list[str]:
    """Image-to-X validation top-1 over the run: best and last against chance (1 / candidates)."""
    found = _retrieval(val)
    if found is None:
        return []
    key, candidates, best = found
    chance = 1 / candidates
    last = val[-1][key]

    def verdict(v: float) -> str:
        return f"{v / chance:.1f}x chance" if v >= 1.5 * chance else "at chance level"

    return [f"- {title}: validation {key.removesuffix('_top1').replace('_', ' ')} top-1 over {candidates} candidates "
            f"(chance {chance:.3f}): best {best[key]:.2f} at step {best['step']} ({verdict(best[key])}), last "
            f"{last:.2f} at step {val[-1]['step']} ({verdict(last)})."]


# the phenotypes of the headline average (volumes and mass: the rates and fractions are derived from them)
HEADLINE = ("LVEDV", "LVESV", "LVSV", "LVM", "RVEDV", "RVESV", "RVSV")


def _r(x, digits: int = 4):
    """Rounded for summary.json (NaN -> None, so the file is strict JSON)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), digits)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def summarise(demo: str | Path) -> dict:
    """The headline figures of a demo run under stable keys (what `summary.json` holds), from the stages' outputs."""
    demo, ft = Path(demo), Path(demo) / "finetune"
    out: dict = {}
    s1 = [r for r in _rows(demo / "stage1" / "metrics.jsonl") if r.get("split") == "val"]
    if s1:
        out["stage1"] = {k: _r(s1[-1].get(k)) for k in ("psnr", "psnr_mean_image", "psnr_constant")} | {
            "step": s1[-1]["step"]}
    for stage in ("stage2", "metaclip"):
        val = [r for r in _rows(demo / stage / "metrics.jsonl") if r.get("split") == "val"]
        found = _retrieval(val)
        if found:
            key, candidates, best = found
            chance = 1 / candidates
            out[stage] = {"retrieval_top1": _r(val[-1][key]), "chance": _r(chance),
                          "retrieval_top1_over_chance": _r(val[-1][key] / chance, 2),
                          "best_retrieval_top1_over_chance": _r(best[key] / chance, 2), "best_step": best["step"]}
    cmp = _json(ft / "phenotypes" / "comparison.json")
    if cmp and "mean_guess" in cmp:
        mg = cmp["mean_guess"]["per_target"]
        names = [n for n in HEADLINE if n in mg]
        out["phenotypes"] = {"targets": names, "mae_ratio": {m: _r(mae_ratio(r["per_target"], mg, names))
                                                             for m, r in cmp.items()}}
    eff = _json(ft / "phenotypes" / "label_efficiency" / "label_efficiency.json")
    if eff:
        names = [n for n in HEADLINE if n in next(iter(eff["mean_guess"].values()))]
        out["label_efficiency"] = {"mae_ratio": {m: {f: _r(mae_ratio(per[f], eff["mean_guess"][f], names))
                                                     for f in per} for m, per in eff["methods"].items()}}
    probe = _json(ft / "probe" / "probe.json")
    if probe:
        names = [n for n in HEADLINE if n in probe["mean_guess"]]
        out["linear_probe"] = {"mae_ratio": {m: _r(mae_ratio(r["per_target"], probe["mean_guess"], names))
                                             for m, r in probe["methods"].items()}}
        if "loo_mean_guess_mae" in probe:
            out["linear_probe"] |= _probe_evidence(probe, names)
    dis = _json(ft / "diseases" / "metrics.json")
    if dis:
        out["diseases"] = {"mean_auroc": _r(_mean(m["auroc"] for m in dis["test"]["per_disease"].values()))}
        ref = (dis.get("phenotype_reference") or {}).get("per_disease")
        if ref:  # what a logistic regression on the measured phenotypes reaches on the same test subjects
            out["diseases"]["phenotype_reference_mean_auroc"] = _r(_mean(m["auroc"] for m in ref.values()))
    seg = _json(ft / "segmentation" / "metrics.json")
    if seg and "volume_dice" in seg["test"]:
        out["segmentation"] = {"volume_dice": {k: _r(v["dice"]) for k, v in seg["test"]["volume_dice"].items()}}
        if "fixed_mask_volume_dice" in seg["test"]:  # what the heart's position alone scores
            out["segmentation"]["fixed_mask_volume_dice"] = {
                k: _r(v["dice"]) for k, v in seg["test"]["fixed_mask_volume_dice"].items()}
    mv = _json(ft / "modality_view" / "metrics.json")
    if mv:
        out["modality_view"] = {k: _r(mv["test"][k]) for k in ("modality_accuracy", "view_balanced_accuracy")}
    out["targets"] = targets(out)
    return out


def _probe_evidence(probe: dict, names: list[str]) -> dict:
    """Beside the probe's test ratios: the leave-one-out ratios on the fit split (every training subject) and,
    per pretrained method, the 95 % paired-bootstrap interval of (its test ratio - the random encoder's)."""
    cols = [probe["targets"].index(n) for n in names]
    loo = {m: _r(_mean(r["loo_mae"][n] / probe["loo_mean_guess_mae"][n] for n in names))
           for m, r in probe["methods"].items()}
    err = {m: np.asarray(r["abs_err"], float)[:, cols] for m, r in probe["methods"].items()}
    mg = np.asarray(probe["mean_guess_abs_err"], float)[:, cols]
    ci = {m: [_r(v) for v in bootstrap_ratio_difference(e, err["random"], mg)]
          for m, e in err.items() if m != "random"} if "random" in err else {}
    return {"loo_mae_ratio": loo, "test_minus_random_ci95": ci}


def targets(s: dict) -> list[dict]:
    """The demo's targets (issue 13), each met or not, computed from the summary; a missing figure is not met."""
    def get(*path):
        x = s
        for k in path:
            x = x.get(k) if isinstance(x, dict) else None
        return x

    def row(name, value, op, threshold):
        met = value is not None and threshold is not None and (value <= threshold if op == "<=" else
                                                               value >= threshold if op == ">=" else value < threshold)
        return {"target": name, "value": value, "op": op, "threshold": threshold, "met": bool(met)}

    probe = get("linear_probe", "mae_ratio") or {}
    pretrained_probe = [v for k, v in probe.items() if k != "random" and v is not None]
    seg_goals = {"LV": 0.90, "MYO": 0.80, "RV": 0.85, "LA": 0.80, "RA": 0.75}
    dice, fixed = get("segmentation", "volume_dice"), get("segmentation", "fixed_mask_volume_dice")
    s1 = get("stage1") or {}
    return [
        row("phenotypes: Stage II fine-tuned, average MAE / mean-guess", get("phenotypes", "mae_ratio", "vita"),
            "<=", 0.6),
        row("phenotypes: Stage II fine-tuned below ViT from scratch (MAE / mean-guess)",
            get("phenotypes", "mae_ratio", "vita"), "<", get("phenotypes", "mae_ratio", "vit_scratch")),
        row("linear probe: best pretrained frozen features below random-init features (MAE / mean-guess)",
            min(pretrained_probe) if pretrained_probe else None, "<", probe.get("random")),
        *[row(f"segmentation: {k} volume Dice", get("segmentation", "volume_dice", k), ">=", v)
          for k, v in seg_goals.items()],
        # the crops are centred on the heart: every structure must beat what its position alone scores
        row("segmentation: smallest margin of volume Dice over the fixed mask (any structure)",
            _r(min(d - fixed[k] for k, d in dice.items())) if dice and fixed and fixed.keys() == dice.keys()
            else None, ">=", 0.01),
        row("diseases: mean test AUROC", get("diseases", "mean_auroc"), ">=", 0.80),
        row("MetaCLIP-CMR Probe+FT: modality accuracy", get("modality_view", "modality_accuracy"), ">=", 0.90),
        row("MetaCLIP-CMR Probe+FT: view balanced accuracy", get("modality_view", "view_balanced_accuracy"), ">=",
            0.80),
        row("Stage II: validation retrieval top-1 / chance (final model)",
            get("stage2", "retrieval_top1_over_chance"), ">=", 3.0),
        # a clear margin: 0.5 dB, i.e. a masked-patch MSE about 11 % below the mean image's
        row("Stage I: validation PSNR above the training mean image's (dB, +0.5 dB margin)", s1.get("psnr"), ">=",
            None if s1.get("psnr_mean_image") is None else round(s1["psnr_mean_image"] + 0.5, 4)),
    ]


def build(demo: str | Path) -> Path:
    demo = Path(demo)
    ft = demo / "finetune"
    fig_dir = demo / "figures"
    summary = summarise(demo)
    atomic_write_text(demo / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    sections, figs = [], []
    text, f = pretraining_section(demo, fig_dir)
    if "stage1" in summary:
        s1 = summary["stage1"]
        text += (f"\n\nStage I validation reconstruction PSNR on the masked patches (step {s1['step']}): model "
                 f"**{s1['psnr']:.2f} dB**; references on the same patches: the training mean image "
                 f"{s1['psnr_mean_image']:.2f} dB, a constant (the training mean intensity) {s1['psnr_constant']:.2f} dB.")
    sections.append(("Pretraining (2 CPU ranks, DeepSpeed)", text))
    figs += f

    cmp = _json(ft / "phenotypes" / "comparison.json")
    if cmp:
        names = list(next(iter(cmp.values()))["per_target"])
        table = report.phenotype_table({m: r["per_target"] for m, r in cmp.items()}, names)
        says = []
        if "mean_guess" in cmp:
            head = [n for n in HEADLINE if n in names]
            ratios = {m: mae_ratio(r["per_target"], cmp["mean_guess"]["per_target"], head) for m, r in cmp.items()}
            says.append(f"Average over {', '.join(head)} of each phenotype's test MAE / mean-guess MAE "
                        "(1.00 = mean-guess):")
            says += [f"- `{m}`: {v:.3f}" for m, v in ratios.items() if m != "mean_guess"]
        sections.append(("Phenotypes: fine-tuned, test MAE (ViTa Table 1 shape)", table + "\n\n" + "\n".join(says)))
        figs += [ft / "phenotypes" / "vita" / "figures" / name for name in ("regression.png", "tsne.png")]
    probe = _json(ft / "probe" / "probe.json")
    if probe:
        names = probe["targets"]
        head = [n for n in HEADLINE if n in names]
        table = report.phenotype_table({"mean_guess": probe["mean_guess"],
                                        **{m: r["per_target"] for m, r in probe["methods"].items()}}, names)
        lp = summary.get("linear_probe", {})
        loo, ci = lp.get("loo_mae_ratio", {}), lp.get("test_minus_random_ci95", {})
        ratios = "\n".join(
            f"- `{m}`: average MAE / mean-guess {mae_ratio(r['per_target'], probe['mean_guess'], head):.3f} on the "
            f"{probe['n']['test']} test subjects" + (f"; {loo[m]:.3f} leave-one-out on the {probe['n']['train']} "
                                                     f"training subjects" if loo.get(m) is not None else "")
            + (f"; test minus `random`, 95 % paired bootstrap: [{ci[m][0]:+.3f}, {ci[m][1]:+.3f}]"
               if None not in ci.get(m, [None]) else "")
            for m, r in probe["methods"].items())
        if ci:
            ratios += ("\n\nAn interval that holds 0: the test split is too small to rank that method against the "
                       "random encoder; the leave-one-out figures use every training subject (the probe's "
                       "penalty is chosen by the same leave-one-out, so they are slightly optimistic, alike for "
                       "every method).")
        sections.append(("Evidence 1: linear probe on frozen features (ridge, penalty by leave-one-out)",
                         "Does pretraining put the phenotypes into the features? The same probe on a randomly "
                         "initialised encoder, the Stage I and the Stage II encoder.\n\n" + table + "\n\n" + ratios))
    if "label_efficiency" in summary:
        eff = summary["label_efficiency"]["mae_ratio"]
        fracs = sorted({f for per in eff.values() for f in per}, key=float)
        rows = [{"method": m, **{f"{100 * float(f):g} %": per.get(f) for f in fracs}} for m, per in eff.items()]
        sections.append(("Evidence 2: label efficiency (fine-tuned, average MAE / mean-guess)",
                         "Fine-tuning on nested fractions of the labelled training subjects, every method with the "
                         "same epochs (and so the same steps) at each fraction; pretraining used every training "
                         "subject, labelled or not.\n\n"
                         + report.markdown_table(rows, ["method", *[f"{100 * float(f):g} %" for f in fracs]])))
    dis = _json(ft / "diseases" / "metrics.json")
    if dis:
        per = dis["test"]["per_disease"]
        ref = (dis.get("phenotype_reference") or {}).get("per_disease")
        says = (f"Mean test AUROC over the diseases with both classes present: "
                f"{_mean(m['auroc'] for m in per.values()):.2f} (chance 0.50).")
        if ref:
            says += (f" Reference: a logistic regression on the {len(dis['phenotype_reference']['features'])} "
                     f"phenotypes measured from the ground-truth segmentations, fitted on the same training subjects, "
                     f"reaches {_mean(m['auroc'] for m in ref.values()):.2f} on the same test subjects (row "
                     f"`phenotypes_logistic`): how far each disease is written in the heart's measurable shape. "
                     f"The table gives each disease's test positives: with one or two, its AUROC is the rank of one "
                     f"or two subjects.")
        table = {"vita": per, **({"phenotypes_logistic": ref} if ref else {})}
        sections.append(("Diseases: test classification (ViTa Table 4 shape)",
                         report.disease_table(table) + "\n\n" + says))
        figs.append(ft / "diseases" / "figures" / "roc_pr.png")
    seg = _json(ft / "segmentation" / "metrics.json")
    if seg:
        t = seg["test"]
        body = ""
        if "volume_dice" in t:
            rows = {"vita": t["volume_dice"]}
            if "fixed_mask_volume_dice" in t:
                rows[FIXED_MASK] = t["fixed_mask_volume_dice"]
            body = ("Volume Dice per subject (short-axis stack 3D+T, each long-axis view 2D+T; a structure only "
                    "on planes whose ground truth has it):\n\n" + report.volume_dice_table(rows)
                    + (f"\n\n`{FIXED_MASK}`: {FIXED_MASK_NOTE}" if FIXED_MASK in rows else "")
                    + "\n\nPer 2D frame (secondary):\n\n")
        body += report.segmentation_table({"vita": t["per_structure"]})
        body += f"\n\nFrames scored per plane: {t.get('frames_scored')} (of the {t.get('frames_stored', '?')} stored)."
        sections.append(("Segmentation: test Dice / HD95 (mm), all planes", body))
        figs.append(ft / "segmentation" / "figures" / "segmentation.png")
    mv = _json(ft / "modality_view" / "metrics.json")
    if mv:
        t = mv["test"]
        cols = ["modality_accuracy", "modality_balanced_accuracy", "view_accuracy", "view_balanced_accuracy"]
        sections.append(("MetaCLIP-CMR: modality / view classification (Probe+FT)",
                         report.markdown_table([{"method": "metaclip", **{c: t[c] for c in cols}}], ["method", *cols])))
    rows = [{"target": t["target"], "value": t["value"], "goal": f"{t['op']} {t['threshold']}"
             if t["threshold"] is not None else "n.a.", "status": "met" if t["met"] else "NOT met"}
            for t in summary["targets"]]
    met = sum(t["met"] for t in summary["targets"])
    sections.append(("Targets", f"{met} of {len(rows)} met, computed from `summary.json`.\n\n"
                     + report.markdown_table(rows, ["target", "value", "goal", "status"])))
    return report.write_report(demo / "report.md", "cmrfm demo: synthetic cohort end to end", sections,
                               [f for f in figs if Path(f).is_file()])
