"""MetaCLIP-CMR's downstream classification of k-space sequences: modality and (single-view sequences) view, from
the mean of the sequence's single-image features; validation metric: the mean of the two accuracies."""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from core.vocab import MODALITIES, VIEWS
from finetune import metrics, report
from finetune.models import mlp
from finetune.tasks.base import Task, register_task
from pretrain.models.metaclip import pool_sequences


class ModalityView(Task):
    name, dataset, primary = "modality_view", "kspace", ("accuracy_mean", 1.0)

    def build_heads(self, model, dim, n_out, hidden, seg_width):
        model.modality, model.view = mlp(dim, hidden, len(MODALITIES)), mlp(dim, hidden, len(VIEWS))

    def features(self, model, batch):
        return pool_sequences(model.encoder, batch["image"], batch["valid"])

    def forward(self, model, batch):
        f = self.features(model, batch)
        h = model.feature_norm(f)
        return {"modality": model.modality(h), "view": model.view(h), "features": f}

    def loss(self, cfg, out, batch, stats):
        view_ok = batch["view"] >= 0
        loss = F.cross_entropy(out["modality"].float(), batch["modality"])
        if view_ok.any():
            loss = loss + F.cross_entropy(out["view"].float()[view_ok], batch["view"][view_ok])
        return loss

    def collect(self, acc, res, batch, offset, stats):
        acc.setdefault("modality_pred", []).append(res["modality"].argmax(1).cpu().numpy())
        acc.setdefault("view_pred", []).append(res["view"].argmax(1).cpu().numpy())
        acc.setdefault("modality", []).append(batch["modality"].cpu().numpy())
        acc.setdefault("view", []).append(batch["view"].cpu().numpy())
        acc["features"].append(res["features"].float().cpu().numpy())

    def score(self, cfg, pred, thresholds=None, spacing=None, stats=None):
        ok = pred["view"] >= 0
        res = {"modality_accuracy": metrics.accuracy(pred["modality_pred"], pred["modality"]),
               "modality_balanced_accuracy": metrics.balanced_accuracy(pred["modality_pred"], pred["modality"]),
               "view_accuracy": metrics.accuracy(pred["view_pred"][ok], pred["view"][ok]) if ok.any() else float("nan"),
               "view_balanced_accuracy": (metrics.balanced_accuracy(pred["view_pred"][ok], pred["view"][ok])
                                          if ok.any() else float("nan"))}
        return {**res, "primary": float(np.nanmean([res["modality_accuracy"], res["view_accuracy"]]))}

    def csv_row(self, cfg, out_dir, ds, pred, i, thresholds):
        ok = pred["view"][i] >= 0
        return {"modality_pred": MODALITIES[pred["modality_pred"][i]], "modality_true": MODALITIES[pred["modality"][i]],
                "view_pred": VIEWS[pred["view_pred"][i]] if ok else "", "view_true": VIEWS[pred["view"][i]] if ok else ""}

    def report(self, cfg, result, pred, fig_dir):
        test = result["test"]
        return [("Test classification", report.markdown_table(
            [{"method": result["method"], **{k: v for k, v in test.items() if k != "primary"}}],
            ["method", "modality_accuracy", "modality_balanced_accuracy", "view_accuracy",
             "view_balanced_accuracy"]))], []

    def comparison_table(self, cfg, results):
        cols = ["modality_accuracy", "modality_balanced_accuracy", "view_accuracy", "view_balanced_accuracy"]
        return report.markdown_table([{"method": m, **{c: r[c] for c in cols}} for m, r in results.items()],
                                     ["method", *cols])


register_task(ModalityView())
