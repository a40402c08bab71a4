"""The linear probe (ridge on frozen features, penalty chosen on validation) and the nested label fractions."""

from __future__ import annotations

import math

import numpy as np

from finetune.data import nested_subset
from finetune.metrics import mean_guess_metrics, regression_metrics
from finetune.probe import mae_ratio, ridge_probe


def _split(rng, n, w, informative: bool):
    x = rng.normal(size=(n, len(w)))
    y = x @ w + 0.05 * rng.normal(size=n) + 100.0
    if not informative:
        x = rng.normal(size=x.shape)  # features unrelated to the target
    return x, y[:, None]


def test_ridge_probe_reads_informative_features_and_not_noise():
    rng = np.random.default_rng(0)
    w = rng.normal(size=16)
    for informative, lo, hi in ((True, 0.0, 0.2), (False, 0.8, 2.0)):
        (xf, yf), (xt, yt) = _split(rng, 80, w, informative), _split(rng, 40, w, informative)
        pred, alphas = ridge_probe(xf, yf, xt)
        ratio = mae_ratio(regression_metrics(pred, yt, ["t"]), mean_guess_metrics(yf, yt, ["t"]), ["t"])
        assert lo <= ratio <= hi, (informative, ratio)
        assert pred.shape == (40, 1) and np.isfinite(pred).all() and len(alphas) == 1


def test_ridge_probe_missing_targets_and_constant_features():
    rng = np.random.default_rng(1)
    w = rng.normal(size=4)
    (xf, yf), (xt, yt) = _split(rng, 40, w, True), _split(rng, 10, w, True)
    xf, xt = (np.concatenate([x, np.ones((len(x), 1))], axis=1) for x in (xf, xt))  # a constant feature
    yf, yt = (np.concatenate([y, np.full_like(y, np.nan)], axis=1) for y in (yf, yt))  # a target never known
    yf[:5, 0] = np.nan
    pred, alphas = ridge_probe(xf, yf, xt)
    res = regression_metrics(pred, yt, ["t", "never"])
    assert res["t"]["n"] == 10 and res["t"]["mae"] < 0.5
    assert res["never"]["n"] == 0 and math.isnan(alphas[1]) and np.isnan(pred[:, 1]).all()


def test_nested_subsets_are_nested_exact_and_order_free():
    keys = [f"{1000000 + i}" for i in range(65)]
    subsets = {f: nested_subset(keys, f) for f in (0.1, 0.25, 0.5, 1.0)}
    assert [len(subsets[f]) for f in (0.1, 0.25, 0.5, 1.0)] == [7, 17, 33, 65]
    assert set(subsets[0.1]) < set(subsets[0.25]) < set(subsets[0.5]) < set(subsets[1.0])
    assert nested_subset(list(reversed(keys)), 0.25) == list(reversed(subsets[0.25]))  # same keys, input order
    assert nested_subset(keys[:1], 0.1) == keys[:1]  # never empty


def test_training_loader_never_ends_on_a_single_sample_batch():
    """BatchNorm before the head cannot normalise a batch of one: training drops such a last batch (another sample
    each epoch); evaluation keeps every sample."""
    import torch
    from torch.utils.data import Dataset

    from finetune.data import loader

    class Items(Dataset):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return {"x": torch.tensor([i])}

        def set_epoch(self, epoch):
            pass

    sizes = {n: [len(b["x"]) for b in loader(Items(n), 4, 0, True, 0)] for n in (9, 8, 10, 1)}
    assert sizes == {9: [4, 4], 8: [4, 4], 10: [4, 4, 2], 1: [1]}
    assert sum(len(b["x"]) for b in loader(Items(9), 4, 0, False, 0)) == 9
    left_out = [set(range(9)) - {int(i) for b in loader(Items(9), 4, 0, True, 0, epoch) for i in b["x"]}
                for epoch in range(4)]
    assert all(len(s) == 1 for s in left_out) and len(set().union(*left_out)) > 1
