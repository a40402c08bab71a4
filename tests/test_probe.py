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


def test_leave_one_out_errors_equal_refitting_without_each_subject():
    """The probe's leave-one-out errors (scikit-learn's closed form) equal n explicit ridge fits, each without one
    subject, at the chosen penalty; the mean-guess's equal |y_i - mean of the others|."""
    from sklearn.linear_model import Ridge

    from finetune.probe import ALPHAS, loo_abs_errors, loo_mean_guess_errors

    rng = np.random.default_rng(1)
    w = rng.normal(size=6)
    x, y = _split(rng, 30, w, True)
    y[3, 0] = np.nan  # a missing target: no error for that subject
    err = loo_abs_errors(x, y)
    known = np.isfinite(y[:, 0])
    z = (x - x.mean(0)) / x.std(0)
    _, (alpha,) = ridge_probe(x, y, x[:1])
    assert alpha in ALPHAS
    zk, yk = z[known], y[known, 0]
    explicit = [abs(Ridge(alpha=alpha).fit(np.delete(zk, i, 0), np.delete(yk, i)).predict(zk[i:i + 1])[0] - yk[i])
                for i in range(len(yk))]
    np.testing.assert_allclose(err[known, 0], explicit, rtol=1e-6, atol=1e-9)
    assert math.isnan(err[3, 0])
    mg = loo_mean_guess_errors(y)
    np.testing.assert_allclose(mg[known, 0][0], abs(yk[0] - np.delete(yk, 0).mean()))


def test_bootstrap_interval_of_a_ratio_difference():
    """Paired bootstrap of (ratio a - ratio b): an interval around 0 for the same errors, above 0 for errors
    twice as large, and the same interval for the same seed."""
    from finetune.probe import bootstrap_ratio_difference, ratio_of_errors

    rng = np.random.default_rng(2)
    mg = np.abs(rng.normal(10, 3, (40, 3)))
    b = mg * rng.uniform(0.3, 0.7, mg.shape)
    assert bootstrap_ratio_difference(b, b, mg, n_boot=200) == (0.0, 0.0)
    lo, hi = bootstrap_ratio_difference(2 * b, b, mg, n_boot=500)
    diff = ratio_of_errors(2 * b, mg) - ratio_of_errors(b, mg)
    assert 0 < lo < diff < hi
    assert bootstrap_ratio_difference(2 * b, b, mg, n_boot=500) == (lo, hi)
