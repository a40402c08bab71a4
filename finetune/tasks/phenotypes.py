"""Phenotype regression (ViTa Stage III): every z-scored target at once from the pooled features, errors in the
original units; the validation metric is the mean over targets of MAE / training std, so every target weighs
alike."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from finetune import figures, metrics, report
from finetune.models import mlp
from finetune.tasks.base import Task, finite, register_task


def target_stats(ds) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the regression targets over the training split (NaN-aware): z-scoring and mean-guess."""
    values = ds.targets_table().astype(np.float64)
    mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    return mean, np.where(std > 0, std, 1.0)


class Phenotypes(Task):
    name, dataset, primary = "phenotypes", "ukb", ("mae_over_sd_mean", -1.0)
    per_output, label_efficiency, has_mean_guess = "per_target", True, True

    def output_names(self, cfg):
        return list(cfg.task.targets)

    def single_output(self, cfg, name):
        return replace(cfg.task, targets=[name])

    def n_outputs(self, cfg):
        return len(cfg.task.targets)

    def targets(self, cfg):
        return list(cfg.task.targets)

    def build_heads(self, model, dim, n_out, hidden, seg_width):
        model.head = mlp(dim, hidden, n_out)

    def forward(self, model, batch):
        f = self.features(model, batch)
        return {"targets": model.head(model.feature_norm(f)), "features": f}

    def train_stats(self, cfg, train_ds, device):
        mean, std = target_stats(train_ds)
        return {"mean": mean, "std": std, "mean_t": torch.from_numpy(mean).to(device),
                "std_t": torch.from_numpy(std).to(device)}

    def loss(self, cfg, out, batch, stats):
        y = (batch["targets"].double() - stats["mean_t"]) / stats["std_t"]
        ok = torch.isfinite(y)
        return F.mse_loss(out["targets"].float()[ok], y.float()[ok]) if ok.any() else out["targets"].sum() * 0

    def collect(self, acc, res, batch, offset, stats):
        acc.setdefault("pred", []).append(res["targets"].double().cpu().numpy() * stats["std"] + stats["mean"])
        acc.setdefault("true", []).append(batch["targets"].cpu().numpy())
        acc["features"].append(res["features"].float().cpu().numpy())

    def score(self, cfg, pred, thresholds=None, spacing=None, stats=None):
        res = metrics.regression_metrics(pred["pred"], pred["true"], cfg.task.targets)
        std = None if not stats else stats.get("std")
        maes = np.array([res[t]["mae"] for t in cfg.task.targets]) / (np.ones(len(res)) if std is None else std)
        return {"per_target": res, "primary": -float(np.nanmean(maes)) if np.isfinite(maes).any() else float("nan")}

    def val_scalars(self, val):
        return finite({f"mae_{k}": v["mae"] for k, v in val["per_target"].items()})

    def mean_guess(self, cfg, data):
        mean, _ = target_stats(data["train"])
        true = data["test"].targets_table()
        return {"per_target": metrics.regression_metrics(np.broadcast_to(mean, true.shape), true, cfg.task.targets)}

    def record(self, cfg, data, stats):  # what `finetune predict` de-normalises the head's output with
        return {"target_stats": {"mean": stats["mean"].tolist(), "std": stats["std"].tolist()}}

    def csv_row(self, cfg, out_dir, ds, pred, i, thresholds):
        row = {}
        for j, t in enumerate(cfg.task.targets):
            row[f"{t}_pred"], row[f"{t}_true"] = float(pred["pred"][i, j]), float(pred["true"][i, j])
        return row

    def report(self, cfg, result, pred, fig_dir):
        figs = [figures.regression_scatter(pred["pred"], pred["true"], cfg.task.targets, [""] * len(cfg.task.targets),
                                           fig_dir / "regression.png")]
        return [("Test MAE", report.phenotype_table({result["method"]: result["test"]["per_target"]},
                                                    cfg.task.targets))], figs

    def tsne(self, cfg, pred):
        return pred["true"][:, 0], cfg.task.targets[0]

    def comparison_table(self, cfg, results):
        return report.phenotype_table({m: r["per_target"] for m, r in results.items()}, cfg.task.targets)

    def restore(self, cfg, result):
        if "target_stats" in result:
            return {}
        # a run from before fit saved them
        from finetune.data import SubjectDataset  # cycle: finetune.data imports finetune.tasks

        mean, std = target_stats(SubjectDataset(cfg.data.dataset, "train", self.name, cfg.model, train=False,
                                                seed=cfg.seed, targets=cfg.task.targets))
        return {"target_stats": {"mean": mean.tolist(), "std": std.tolist()}}

    def predict_stats(self, cfg, result):
        return {k: np.asarray(v, np.float64) for k, v in result["target_stats"].items()}

    def outputs(self, cfg, result, res, stats):
        values = res["targets"][0].double().numpy() * stats["std"] + stats["mean"]
        return {t: float(v) for t, v in zip(cfg.task.targets, values)}

    def raw_row(self, out_dir, key, study, meta, out):
        return {f"{t}_pred": v for t, v in out.items()}


register_task(Phenotypes())
