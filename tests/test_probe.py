"""The linear probe (ridge on frozen features, penalty chosen on validation) and the nested label fractions."""

from __future__ import annotations

import math

import numpy as np

from finetune.data import nested_subset
from finetune.metrics import mean_guess_metrics
from finetune.probe import mae_ratio, ridge_probe


def _split(rng, n, w, informative: bool):
    x = rng.normal(size=(n, len(w)))
    y = x @ w + 0.05 * rng.normal(size=n) + 100.0
    if not informative:
        x = rng.normal(size=x.shape)  # features unrelated to the target
    return {"x": x, "y": y[:, None], "key": [str(i) for i in range(n)]}


def test_ridge_probe_reads_informative_features_and_not_noise():
    rng = np.random.default_rng(0)
    w = rng.normal(size=16)
    for informative, lo, hi in ((True, 0.0, 0.2), (False, 0.8, 2.0)):
        data = {s: _split(rng, n, w, informative) for s, n in (("train", 80), ("val", 30), ("test", 40))}
        res = ridge_probe(data, ["t"])
        mg = mean_guess_metrics(data["train"]["y"], data["test"]["y"], ["t"])
        ratio = mae_ratio(res["per_target"], mg, ["t"])
        assert lo <= ratio <= hi, (informative, ratio)
        assert res["pred"].shape == (40, 1) and np.isfinite(res["pred"]).all()


def test_ridge_probe_missing_targets_and_constant_features():
    rng = np.random.default_rng(1)
    w = rng.normal(size=4)
    data = {s: _split(rng, n, w, True) for s, n in (("train", 40), ("val", 10), ("test", 10))}
    for d in data.values():
        d["x"] = np.concatenate([d["x"], np.ones((len(d["x"]), 1))], axis=1)  # a constant feature
        d["y"] = np.concatenate([d["y"], np.full_like(d["y"], np.nan)], axis=1)  # a target never known
    data["train"]["y"][:5, 0] = np.nan
    res = ridge_probe(data, ["t", "never"])
    assert res["per_target"]["t"]["n"] == 10 and res["per_target"]["t"]["mae"] < 0.5
    assert res["per_target"]["never"]["n"] == 0 and math.isnan(res["alpha"]["never"])


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
