"""`python -m finetune probe`: linear probes on frozen features — does pretraining put the phenotypes in the
representation? (the evidence table of the demo report; `finetune/scaling.py` uses the same probe).

Per method (a random-initialised encoder, or any export / pretraining run): every subject of the train / val /
test splits is embedded once (the pooled features the heads see, no augmentation, the encoder's frames), the
features are z-scored with the training split's statistics, and a ridge regression per target is fitted on the
training split in closed form (scikit-learn), its penalty chosen on the validation split from a fixed grid, and
scored on the test split in original units against the mean-guess baseline (the training mean). Nothing is trained
by SGD, so the probe has no seed, epoch or learning-rate choice to tune: it measures the features alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data_prep.fsutil import atomic_write_text
from finetune import metrics, report
from finetune.config import FinetuneConfig
from finetune.data import SubjectDataset, loader
from finetune.models import FinetuneModel
from pretrain.models.vit import ViTEncoder

ALPHAS = np.logspace(-2, 5, 22)  # ridge penalties tried on validation (features are z-scored)
RANDOM = "random"  # the method name of a randomly initialised encoder (seeded by `seed`)


@torch.no_grad()
def embed_splits(cfg: FinetuneConfig, encoder: Optional[str | Path]) -> dict[str, dict]:
    """{split: {"x": (N, D) features, "y": (N, targets) raw targets, "key": [...]}}; `encoder` None: random."""
    if encoder is None:
        torch.manual_seed(cfg.seed)
        enc, vit = ViTEncoder(cfg.model), cfg.model
    else:
        from pretrain.export import load_encoder

        enc, vit, _ = load_encoder(encoder)
    model = FinetuneModel("phenotypes", enc, vit, n_out=1).eval()
    out = {}
    for split in ("train", "val", "test"):
        ds = SubjectDataset(cfg.data.dataset, split, "phenotypes", vit, train=False, seed=cfg.seed,
                            targets=cfg.task.targets, cache=False)
        feats, keys = [], []
        for batch in loader(ds, cfg.data.batch_size, 0, shuffle=False, seed=cfg.seed):
            feats.append(model.features(batch).double().numpy())
            keys += batch["key"]
        out[split] = {"x": np.concatenate(feats) if feats else np.zeros((0, vit.dim)),
                      "y": ds.targets_table().astype(np.float64), "key": keys}
    return out


def ridge_probe(data: dict[str, dict], names: list[str], alphas: np.ndarray = ALPHAS) -> dict:
    """Per target: ridge on z-scored features, penalty chosen by validation MAE, test metrics in original units.
    Returns {"per_target": regression_metrics, "alpha": {name: alpha}, "pred": (N_test, targets)}."""
    from sklearn.linear_model import Ridge

    tr, va, te = data["train"], data["val"], data["test"]
    mu, sd = tr["x"].mean(0), tr["x"].std(0)
    sd = np.where(sd > 1e-12 * max(float(np.abs(mu).max(initial=0.0)), 1.0), sd, 1.0)  # constant features stay 0

    def z(x):
        return (x - mu) / sd

    pred = np.full(te["y"].shape, np.nan)
    chosen = {}
    for k, name in enumerate(names):
        ok_tr, ok_va = np.isfinite(tr["y"][:, k]), np.isfinite(va["y"][:, k])
        if ok_tr.sum() < 2:
            chosen[name] = math.nan
            continue
        best, best_alpha = math.inf, float(alphas[-1])
        for a in alphas:
            m = Ridge(alpha=float(a)).fit(z(tr["x"][ok_tr]), tr["y"][ok_tr, k])
            err = (np.abs(m.predict(z(va["x"][ok_va])) - va["y"][ok_va, k]).mean() if ok_va.any() else 0.0)
            if err < best - 1e-12:
                best, best_alpha = err, float(a)
        chosen[name] = best_alpha
        pred[:, k] = Ridge(alpha=best_alpha).fit(z(tr["x"][ok_tr]), tr["y"][ok_tr, k]).predict(z(te["x"]))
    return {"per_target": metrics.regression_metrics(pred, te["y"], names), "alpha": chosen, "pred": pred}


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
        if "mean_guess" not in result:
            result["mean_guess"] = metrics.mean_guess_metrics(data["train"]["y"], data["test"]["y"], names)
            result["n"] = {s: len(d["key"]) for s, d in data.items()}
        res = ridge_probe(data, names)
        result["methods"][name] = {"encoder": str(encoder) if encoder else RANDOM, "per_target": res["per_target"],
                                   "alpha": res["alpha"],
                                   "mae_ratio": mae_ratio(res["per_target"], result["mean_guess"], names)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "probe.json", json.dumps(result, indent=1, default=float))
    table = report.phenotype_table({"mean_guess": result["mean_guess"],
                                    **{m: r["per_target"] for m, r in result["methods"].items()}}, names)
    ratios = report.markdown_table([{"method": m, "MAE / mean-guess (average)": r["mae_ratio"]}
                                    for m, r in result["methods"].items()], ["method", "MAE / mean-guess (average)"])
    report.write_report(out / "probe.md", "Linear probe on frozen features (ridge, penalty chosen on validation)", [
        ("Test MAE", table), ("Against mean-guess", ratios)])
    return result
