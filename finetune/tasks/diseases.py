"""Disease classification under imbalance (ViTa Stage III): one light head per disease, BCE weighted by the
training split's negatives / positives, decision thresholds chosen on validation; validation metric: mean AP. The
report sets beside it what the cardiac phenotypes alone predict (`phenotype_reference`)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from core.vocab import PHENOTYPES
from finetune import figures, metrics, report
from finetune.models import mlp
from finetune.tasks.base import Task, finite, register_task


def disease_counts(ds) -> tuple[np.ndarray, np.ndarray]:
    labels = ds.diseases_table()
    return (labels == 1).sum(0), (labels == 0).sum(0)


def phenotype_reference(cfg, data: dict, c: float = 1.0) -> dict:
    """What the cardiac phenotypes alone predict: per disease, an L2 logistic regression (scikit-learn, C = `c`,
    classes balanced as the heads' loss is) on the stored phenotypes of the training split (z-scored, a missing
    value set to the training mean), scored on the test split. Not a model to deploy: the reference that says how
    far a disease is written in the heart's measurable shape at all, beside the image model's AUROC."""
    from sklearn.linear_model import LogisticRegression

    x_fit, x_test = (data[s].phenotypes_table().astype(np.float64) for s in ("train", "test"))
    mu = np.nanmean(x_fit, 0) if len(x_fit) else np.zeros(x_fit.shape[1])
    sd = np.nanstd(x_fit, 0) if len(x_fit) else np.ones(x_fit.shape[1])
    mu, sd = np.nan_to_num(mu), np.where(np.nan_to_num(sd) > 0, np.nan_to_num(sd), 1.0)
    z_fit = np.where(np.isnan(x_fit), 0.0, (x_fit - mu) / sd)
    z_test = np.where(np.isnan(x_test), 0.0, (x_test - mu) / sd)
    y_fit, y_test = data["train"].diseases_table(), data["test"].diseases_table()
    per = {}
    for j, d in enumerate(cfg.task.diseases):
        known = y_fit[:, j] >= 0
        if len(np.unique(y_fit[known, j])) < 2:  # one class in training: nothing to learn, the prevalence
            score = np.full(len(z_test), float(y_fit[known, j].mean()) if known.any() else 0.0)
        else:
            clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(z_fit[known], y_fit[known, j])
            score = clf.predict_proba(z_test)[:, 1]
        per[d] = metrics.classification_metrics(score, y_test[:, j], 0.5)
    return {"per_disease": per, "features": list(PHENOTYPES), "c": c}


class Diseases(Task):
    name, dataset, primary = "diseases", "ukb", ("ap_mean", 1.0)
    per_output, has_mean_guess = "per_disease", True

    def output_names(self, cfg):
        return list(cfg.task.diseases)

    def single_output(self, cfg, name):
        return replace(cfg.task, diseases=[name])

    def n_outputs(self, cfg):
        return len(cfg.task.diseases)

    def build_heads(self, model, dim, n_out, hidden, seg_width):
        from torch import nn

        model.heads = nn.ModuleList(mlp(dim, hidden, 1) for _ in range(n_out))

    def forward(self, model, batch):
        f = self.features(model, batch)
        h = model.feature_norm(f)
        return {"logits": torch.cat([head(h) for head in model.heads], dim=1), "features": f}

    def train_stats(self, cfg, train_ds, device):
        pos, neg = disease_counts(train_ds)
        w = neg / np.maximum(pos, 1) if cfg.task.class_weighting else np.ones(len(pos))
        return {"pos_weight": torch.tensor(w, dtype=torch.float32, device=device)}

    def loss(self, cfg, out, batch, stats):
        y, ok = batch["diseases"].float(), batch["diseases"] >= 0
        per = F.binary_cross_entropy_with_logits(out["logits"].float(), y.clamp(min=0), reduction="none",
                                                 pos_weight=stats["pos_weight"])
        return (per * ok).sum() / ok.sum().clamp_min(1)

    def collect(self, acc, res, batch, offset, stats):
        acc.setdefault("score", []).append(torch.sigmoid(res["logits"].float()).cpu().numpy())
        acc.setdefault("label", []).append(batch["diseases"].cpu().numpy())
        acc["features"].append(res["features"].float().cpu().numpy())

    def score(self, cfg, pred, thresholds=None, spacing=None, stats=None):
        per = {}
        for j, d in enumerate(cfg.task.diseases):
            s, y = pred["score"][:, j], pred["label"][:, j]
            thr = thresholds[d] if thresholds else metrics.choose_threshold(s, y)
            per[d] = metrics.classification_metrics(s, y, thr)
        aps = [m["ap"] for m in per.values() if not math.isnan(m["ap"])]
        return {"per_disease": per, "primary": float(np.mean(aps)) if aps else float("nan")}

    def val_scalars(self, val):
        out = {f"auroc_{k}": v["auroc"] for k, v in val["per_disease"].items()}
        ok = [v for v in out.values() if math.isfinite(v)]
        out["auroc_mean"] = float(np.mean(ok)) if ok else math.nan
        return finite(out)

    def mean_guess(self, cfg, data):
        pos, neg = disease_counts(data["train"])
        labels = data["test"].diseases_table()
        return {"per_disease": {d: metrics.classification_metrics(np.full(len(labels), pos[j] / max(pos[j] + neg[j], 1)),
                                                                  labels[:, j], 0.5)
                                for j, d in enumerate(cfg.task.diseases)}}

    def decide(self, cfg, val_pred):  # decision thresholds chosen on validation, applied to test
        return {d: metrics.choose_threshold(val_pred["score"][:, j], val_pred["label"][:, j])
                for j, d in enumerate(cfg.task.diseases)}

    def record(self, cfg, data, stats):
        return {"phenotype_reference": phenotype_reference(cfg, data)}

    def csv_row(self, cfg, out_dir, ds, pred, i, thresholds):
        row = {}
        for j, d in enumerate(cfg.task.diseases):
            prob, thr = float(pred["score"][i, j]), thresholds[d]
            row.update({f"{d}_probability": prob, f"{d}_threshold": thr, f"{d}_predicted": int(prob >= thr),
                        f"{d}_label": int(pred["label"][i, j])})
        return row

    def report(self, cfg, result, pred, fig_dir):
        figs = [figures.roc_pr_curves({d: pred["score"][:, j] for j, d in enumerate(cfg.task.diseases)},
                                      {d: pred["label"][:, j] for j, d in enumerate(cfg.task.diseases)},
                                      fig_dir / "roc_pr.png")]
        return [("Test classification", report.disease_table({result["method"]: result["test"]["per_disease"]}))], figs

    def tsne(self, cfg, pred):
        return pred["label"][:, 0].astype(float), cfg.task.diseases[0]

    def comparison_table(self, cfg, results):
        return report.disease_table({m: r["per_disease"] for m, r in results.items()})

    def outputs(self, cfg, result, res, stats):
        thresholds = result.get("thresholds") or {}
        prob = torch.sigmoid(res["logits"][0].float()).numpy()
        return {d: {"probability": float(p), "threshold": float(thresholds.get(d, 0.5)),
                    "predicted": int(p >= thresholds.get(d, 0.5))} for d, p in zip(cfg.task.diseases, prob)}

    def raw_row(self, out_dir, key, study, meta, out):
        return {f"{d}_{k}": v for d, o in out.items() for k, v in o.items()}


register_task(Diseases())
