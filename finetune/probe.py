"""`python -m finetune probe`: linear probes on frozen features — does pretraining put the phenotypes in the
representation? (the evidence table of the demo report; `finetune/scaling.py` fits the same `ridge_probe` on
subjects no pretraining run saw).

Per method (a random-initialised encoder, or any export / pretraining run): every subject of the train and test
splits is embedded once (the pooled features the heads see, no augmentation, the encoder's frames), and a ridge
regression per target is fitted on the training split in closed form (scikit-learn), its penalty chosen from a
fixed grid by leave-one-out, then scored on the test split in original units against the mean-guess baseline (the
training mean). Nothing is trained by SGD, so the probe has no seed, epoch or learning-rate choice to tune: it
measures the features alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from core.fsutil import atomic_write_text
from finetune import metrics, report
from finetune.config import FinetuneConfig
from finetune.data import SubjectDataset, loader
from finetune.models import FinetuneModel
from pretrain.export import load_encoder
from pretrain.models.vit import ViTEncoder

ALPHAS = np.logspace(-2, 5, 22)  # ridge penalties tried by leave-one-out (features are z-scored)
RANDOM = "random"  # the method name of a randomly initialised encoder (seeded by `seed`)


@torch.no_grad()
def embed_splits(cfg: FinetuneConfig, encoder: Optional[str | Path],
                 splits: tuple[str, ...] = ("train", "test")) -> dict[str, dict]:
    """{split: {"x": (N, D) features, "y": (N, targets) raw targets, "key": [...]}}; `encoder` None: random."""
    if encoder is None:
        torch.manual_seed(cfg.seed)
        enc, vit = ViTEncoder(cfg.model), cfg.model
    else:
        enc, vit, _ = load_encoder(encoder)
    model = FinetuneModel("phenotypes", enc, vit, n_out=1).eval()
    out = {}
    for split in splits:
        ds = SubjectDataset(cfg.data.dataset, split, "phenotypes", vit, train=False, seed=cfg.seed,
                            targets=cfg.task.targets, cache=False)
        feats, keys = [], []
        for batch in loader(ds, cfg.data.batch_size, 0, shuffle=False, seed=cfg.seed):
            feats.append(model.features(batch).double().numpy())
            keys += batch["key"]
        out[split] = {"x": np.concatenate(feats) if feats else np.zeros((0, vit.dim)),
                      "y": ds.targets_table().astype(np.float64), "key": keys}
    return out


def ridge_probe(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, alphas=ALPHAS
                ) -> tuple[np.ndarray, list[float]]:
    """Per target (a column of `y_fit`; its NaN rows left out, fewer than 3 known: NaN): ridge regression with an
    intercept on features z-scored with the fit set's statistics, the penalty chosen from `alphas` by exact
    leave-one-out error on the fit set (scikit-learn's RidgeCV). Returns the test predictions (n_test, K) in the
    targets' units and the chosen penalties."""
    from sklearn.linear_model import RidgeCV

    mu, sd = x_fit.mean(0), x_fit.std(0)
    sd = np.where(sd > 1e-12 * max(float(np.abs(mu).max(initial=0.0)), 1.0), sd, 1.0)  # constant features stay 0
    z_fit, z_test = (x_fit - mu) / sd, (x_test - mu) / sd
    pred, chosen = np.full((len(x_test), y_fit.shape[1]), np.nan), []
    for k in range(y_fit.shape[1]):
        known = np.isfinite(y_fit[:, k])
        if known.sum() < 3:
            chosen.append(math.nan)
            continue
        model = RidgeCV(alphas=np.asarray(alphas, float)).fit(z_fit[known], y_fit[known, k])
        pred[:, k] = model.predict(z_test)
        chosen.append(float(model.alpha_))
    return pred, chosen


def loo_abs_errors(x_fit: np.ndarray, y_fit: np.ndarray, alphas=ALPHAS) -> np.ndarray:
    """(n_fit, K) leave-one-out absolute errors of the same ridge probe on the fit set itself (NaN where a target
    is missing): exact for ridge (scikit-learn's efficient LOO), at the penalty LOO chose. A second estimate of
    the probe's error beside the test split's, from every fit subject rather than the few test ones."""
    from sklearn.linear_model import RidgeCV

    mu, sd = x_fit.mean(0), x_fit.std(0)
    sd = np.where(sd > 1e-12 * max(float(np.abs(mu).max(initial=0.0)), 1.0), sd, 1.0)
    z = (x_fit - mu) / sd
    out = np.full(y_fit.shape, np.nan)
    for k in range(y_fit.shape[1]):
        known = np.isfinite(y_fit[:, k])
        if known.sum() < 3:
            continue
        m = RidgeCV(alphas=np.asarray(alphas, float), store_cv_results=True).fit(z[known], y_fit[known, k])
        out[known, k] = np.sqrt(m.cv_results_[:, int(np.flatnonzero(np.asarray(alphas) == m.alpha_)[0])])
    return out


def loo_mean_guess_errors(y_fit: np.ndarray) -> np.ndarray:
    """The mean-guess's leave-one-out absolute errors: |y_i - mean of the others| = |y_i - mean| n / (n - 1)."""
    out = np.full(y_fit.shape, np.nan)
    for k in range(y_fit.shape[1]):
        known = np.isfinite(y_fit[:, k])
        n = int(known.sum())
        if n >= 3:
            out[known, k] = np.abs(y_fit[known, k] - y_fit[known, k].mean()) * n / (n - 1)
    return out


def ratio_of_errors(err: np.ndarray, err_mean_guess: np.ndarray) -> float:
    """Average over targets (columns) of MAE / mean-guess MAE, from per-subject absolute errors (NaN skipped)."""
    r = [np.nanmean(err[:, k]) / np.nanmean(err_mean_guess[:, k]) for k in range(err.shape[1])
         if np.isfinite(err[:, k]).any() and np.nanmean(err_mean_guess[:, k]) > 0]
    return float(np.mean(r)) if r else math.nan


def bootstrap_ratio_difference(err_a: np.ndarray, err_b: np.ndarray, err_mean_guess: np.ndarray,
                               n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of ratio(a) - ratio(b) (`ratio_of_errors`) over test subjects resampled with replacement,
    the same resample for both (paired): an interval that holds 0 means the test split cannot tell them apart."""
    rng = np.random.default_rng(seed)
    n = len(err_a)
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        diffs.append(ratio_of_errors(err_a[i], err_mean_guess[i]) - ratio_of_errors(err_b[i], err_mean_guess[i]))
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def mae_ratio(per_target: dict, mean_guess: dict, names: list[str]) -> float:
    """The average over `names` of each target's test MAE divided by the mean-guess MAE (1.0 = mean-guess)."""
    r = [per_target[n]["mae"] / mean_guess[n]["mae"] for n in names
         if n in per_target and mean_guess.get(n, {}).get("mae", 0) > 0 and not math.isnan(per_target[n]["mae"])]
    return float(np.mean(r)) if r else math.nan


def probe(cfg: FinetuneConfig, methods: dict[str, Optional[str]]) -> dict:
    """Linear probes of every method (name -> encoder path, None = random init) into `cfg.out`: probe.json,
    probe.md. Returns {"targets", "mean_guess", "methods": {name: {"per_target", "alpha", "mae_ratio"}}}."""
    out = Path(cfg.out)
    names = list(cfg.task.targets)
    result: dict = {"targets": names, "methods": {}}
    for name, encoder in methods.items():
        data = embed_splits(cfg, encoder)
        train, test = data["train"], data["test"]
        if "mean_guess" not in result:
            result["mean_guess"] = metrics.mean_guess_metrics(train["y"], test["y"], names)
            result["n"] = {s: len(d["key"]) for s, d in data.items()}
            result["test_keys"] = test["key"]
            result["mean_guess_abs_err"] = np.abs(test["y"] - np.nanmean(train["y"], 0)).tolist()
            loo_mg = loo_mean_guess_errors(train["y"])
            result["loo_mean_guess_mae"] = dict(zip(names, np.nanmean(loo_mg, 0).tolist()))
        pred, alphas = ridge_probe(train["x"], train["y"], test["x"])
        per_target = metrics.regression_metrics(pred, test["y"], names)
        loo = loo_abs_errors(train["x"], train["y"])
        result["methods"][name] = {"encoder": str(encoder) if encoder else RANDOM, "per_target": per_target,
                                   "alpha": dict(zip(names, alphas)),
                                   "mae_ratio": mae_ratio(per_target, result["mean_guess"], names),
                                   # per test subject and target: what the bootstrap of the demo report resamples
                                   "abs_err": np.abs(pred - test["y"]).tolist(),
                                   "loo_mae_ratio": ratio_of_errors(loo, loo_mg),
                                   "loo_mae": dict(zip(names, np.nanmean(loo, 0).tolist()))}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "probe.json", json.dumps(result, indent=1, default=float))
    table = report.phenotype_table({"mean_guess": result["mean_guess"],
                                    **{m: r["per_target"] for m, r in result["methods"].items()}}, names)
    cols = ["method", "test MAE / mean-guess (average)", "leave-one-out on the fit split (average)"]
    ratios = report.markdown_table([{"method": m, cols[1]: r["mae_ratio"], cols[2]: r["loo_mae_ratio"]}
                                    for m, r in result["methods"].items()], cols)
    report.write_report(out / "probe.md", "Linear probe on frozen features (ridge, penalty by leave-one-out)", [
        ("Test MAE", table), ("Against mean-guess", ratios)])
    return result
