"""ViTa Stage II tabular encoder (`pretrain.models.tabular`): tokens, missing handling, corruption, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.format import normalise_tabular
from pretrain.config import TabularConfig
from pretrain.models.tabular import ProjectionHead, TabularEncoder, check_schema, corrupt

# vector order mixes the kinds on purpose: tokens must come back in feature order
KINDS = [("age", "numerical", 0), ("sex", "binary", 2), ("height", "numerical", 0), ("smoking", "categorical", 3),
         ("weight", "numerical", 0), ("diabetes", "binary", 2), ("alcohol", "categorical", 6)]
F = len(KINDS)
NUM = [j for j, (_, k, _) in enumerate(KINDS) if k == "numerical"]
CAT = [j for j, (_, k, _) in enumerate(KINDS) if k != "numerical"]


def schema() -> list[dict]:
    # the keys of data_prep.ukb.features.feature_schema
    return [{"index": j, "name": n, "kind": k, "fields": [1000 + j], "instances": [2], "reduce": "value",
             "num_categories": c, "codes": list(range(c)), "match": [], "unit": ""}
            for j, (n, k, c) in enumerate(KINDS)]


def cfg(**kw) -> TabularConfig:
    return TabularConfig(**{"dim": 40, "depth": 2, "heads": 5, "projection_dim": 16, **kw})


def batch(B: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, F, generator=g)
    for j in CAT:
        values[:, j] = torch.randint(0, KINDS[j][2], (B,), generator=g).float()
    missing = torch.rand(B, F, generator=g) < 0.3
    return values, missing


def encoder(seed: int = 0, **kw) -> TabularEncoder:
    torch.manual_seed(seed)
    return TabularEncoder(schema(), cfg(**kw)).eval()


def test_shapes_and_projection():
    enc = encoder()
    values, missing = batch(B=3)
    out = enc(values, missing)
    assert out.shape == (3, F, 40) and torch.isfinite(out).all()
    pooled = enc.pooled(values, missing)
    assert pooled.shape == (3, 40)
    torch.testing.assert_close(pooled, out.mean(dim=1))
    head = ProjectionHead(40, 16)
    assert head(pooled).shape == (3, 16)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == 1
    # vectorised parameters
    assert enc.num_weight.shape == (len(NUM), 40) and enc.num_bias.shape == (len(NUM), 40)
    assert enc.cat_embed.weight.shape == (2 + 3 + 2 + 6, 40)
    assert enc.feature_embed.shape == enc.missing_token.shape == (F, 40)
    assert len(enc.blocks) == 2


def test_schema_validation():
    s = schema()
    s[1]["num_categories"] = 3
    with pytest.raises(ValueError, match="'sex'.*binary"):
        TabularEncoder(s, cfg())
    s = schema()
    s[2]["index"] = 9
    with pytest.raises(ValueError, match="indices"):
        check_schema(s)
    # given out of order, the schema is sorted by index
    assert [f["name"] for f in check_schema(schema()[::-1])] == [n for n, _, _ in KINDS]


def test_categorical_out_of_range_names_the_feature():
    enc = encoder()
    values, missing = batch()
    missing[:] = False
    bad = values.clone()
    bad[2, 3] = 3.0  # smoking has 3 categories
    with pytest.raises(ValueError, match=r"'smoking'.*\[0, 3\)"):
        enc(bad, missing)
    bad = values.clone()
    bad[0, 1] = -1.0
    with pytest.raises(ValueError, match="'sex'"):
        enc(bad, missing)
    bad = values.clone()
    bad[1, 6] = 1.5  # not an integer
    with pytest.raises(ValueError, match="'alcohol'"):
        enc(bad, missing)
    bad = values.clone()
    bad[1, 2] = float("nan")  # NaN that is not flagged missing
    with pytest.raises(ValueError, match="'height'.*non-finite"):
        enc(bad, missing)
    # the same out-of-range value flagged missing is fine (never looked up)
    bad = values.clone()
    bad[2, 3] = 99.0
    missing[2, 3] = True
    assert torch.isfinite(enc(bad, missing)).all()


def test_missing_token_replaces_the_value_exactly_where_missing():
    enc = encoder()
    values, missing = batch()
    missing[:] = False
    missing[0, 0] = missing[0, 3] = missing[1, 5] = True
    ref = enc(values, missing)
    # changing missing entries (numerical and categorical, even to NaN) changes nothing
    changed = values.clone()
    changed[0, 0], changed[0, 3], changed[1, 5] = 123.0, float("nan"), 0.0 if values[1, 5] else 1.0
    torch.testing.assert_close(enc(changed, missing), ref, rtol=0, atol=0)
    # the missing token itself is what is embedded there
    tok = enc.embed(values, missing)
    torch.testing.assert_close(tok[0, 0], enc.missing_token[0] + enc.feature_embed[0])
    torch.testing.assert_close(tok[1, 5], enc.missing_token[5] + enc.feature_embed[5])
    # changing a present entry (numerical or categorical) changes the output of that sample only
    for j, new in ((2, values[0, 2] + 1.0), (6, (values[0, 6] + 1) % 6)):
        changed = values.clone()
        changed[0, j] = new
        out = enc(changed, missing)
        assert not torch.allclose(out[0], ref[0])
        torch.testing.assert_close(out[1:], ref[1:])
    # flagging a present entry missing changes the output even though its value stays
    m2 = missing.clone()
    m2[2, 4] = True
    assert not torch.allclose(enc(values, m2)[2], ref[2])


def test_nan_in_missing_entries_gives_finite_gradients():
    enc = encoder().train()
    values, missing = batch()
    values[missing] = float("nan")
    enc.pooled(values, missing).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_equal_values_of_different_features_give_different_tokens():
    enc = encoder()
    values = torch.zeros(1, F)  # every numerical feature 0, every categorical feature category 0
    missing = torch.zeros(1, F, dtype=torch.bool)
    tok = enc.embed(values, missing)[0]
    for a in range(F):
        for b in range(a + 1, F):
            assert not torch.allclose(tok[a], tok[b]), (KINDS[a][0], KINDS[b][0])
    # all missing: still distinguishable per feature
    tok = enc.embed(values, ~missing)[0]
    assert torch.cdist(tok, tok).add(torch.eye(F)).min() > 0
    # numerical embedding is value * w_f + b_f (+ feature identity)
    v = torch.zeros(1, F)
    v[0, 2] = 2.0
    tok = enc.embed(v, missing)[0, 2]
    torch.testing.assert_close(tok, 2.0 * enc.num_weight[1] + enc.num_bias[1] + enc.feature_embed[2])


def test_corruption():
    values = torch.arange(6 * F, dtype=torch.float32).reshape(6, F)  # all entries distinct
    missing = torch.rand(6, F, generator=torch.Generator().manual_seed(1)) < 0.5
    v0, m0 = corrupt(values, missing, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(v0, values) and torch.equal(m0, missing)
    v1, m1 = corrupt(values, missing, 1.0, torch.Generator().manual_seed(0))
    assert (v1 != values).all()  # every entry comes from another sample
    for j in range(F):
        assert torch.equal(v1[:, j].sort().values, values[:, j].sort().values)  # column multiset kept
        # the missingness flag travels with its value
        src = (v1[:, j, None] == values[None, :, j]).int().argmax(dim=1)
        assert torch.equal(m1[:, j], missing[src, j])
    # seeded: same generator seed, same corruption; a different seed differs
    v1b, _ = corrupt(values, missing, 1.0, torch.Generator().manual_seed(0))
    v1c, _ = corrupt(values, missing, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(v1, v1b) and not torch.equal(v1, v1c)
    # partial: about p of the entries change, each changed entry is another sample's value of that feature
    big = torch.arange(400 * F, dtype=torch.float32).reshape(400, F)
    vp, _ = corrupt(big, torch.zeros_like(big, dtype=torch.bool), 0.3, torch.Generator().manual_seed(0))
    frac = (vp != big).float().mean().item()
    assert 0.25 < frac < 0.35
    assert ((vp - big) % F == 0).all()  # same column
    # a batch of one is unchanged; the encoder corrupts in training only
    assert torch.equal(corrupt(values[:1], missing[:1], 1.0)[0], values[:1])
    enc = encoder(corruption=1.0)
    vals, miss = batch()
    torch.testing.assert_close(enc(vals, miss, torch.Generator().manual_seed(0)), encoder()(vals, miss))
    enc.train()
    assert not torch.allclose(enc(vals, miss, torch.Generator().manual_seed(0)), encoder().train()(vals, miss))


def test_gradients_reach_every_parameter():
    enc = encoder().train()
    head = ProjectionHead(40, 16)
    values, missing = batch(B=8)
    head(enc.pooled(values, missing)).square().sum().backward()
    names = {n for n, p in enc.named_parameters()}
    assert {"num_weight", "num_bias", "cat_embed.weight", "feature_embed", "missing_token", "norm.weight"} <= names
    for n, p in list(enc.named_parameters()) + list(head.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_bf16():
    enc = encoder().to(torch.bfloat16)
    values, missing = batch()
    out = enc.pooled(values, missing)  # float32 inputs, bf16 module
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    ref = encoder().pooled(values, missing)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


def test_runs_on_normalise_tabular_output():
    rng = np.random.default_rng(0)
    raw = np.stack([rng.normal(60, 8, 5), rng.integers(0, 2, 5), rng.normal(170, 10, 5), rng.integers(0, 3, 5),
                    rng.normal(75, 12, 5), rng.integers(0, 2, 5), rng.integers(0, 6, 5)], axis=1)
    raw[0, 0] = raw[1, 3] = raw[2, 5] = raw[4, 2] = np.nan
    # shaped like data_prep.ukb.features.TabularStats.to_dict()
    feats = []
    for j, (n, k, c) in enumerate(KINDS):
        d = {"name": n, "kind": k, "n_present": 100}
        if k == "numerical":
            d["mean"], d["std"] = float(np.nanmean(raw[:, j])), float(np.nanstd(raw[:, j]))
        else:
            d["mode"], d["category_counts"] = 1, [50] * c
        feats.append(d)
    stats = {"format": "cmrfm-tabular-stats", "schema": 1, "version": "v1", "spec_hash": "0" * 64, "n_train": 100,
             "std_floor": 1e-6, "features": feats}
    values, missing = normalise_tabular(raw, stats)
    values, missing = torch.from_numpy(values), torch.from_numpy(missing)
    assert missing.sum() == 4
    enc = encoder()
    out = enc.pooled(values, missing)
    assert out.shape == (5, 40) and torch.isfinite(out).all()


def test_image_feature_batchnorm_removes_the_common_component():
    """Stage II's optional image-feature normalisation: pooled features that share a large common vector (as a
    Stage I encoder's can) come out of the norm centred per channel over the batch; "none" is the paper's head."""
    from pretrain.config import ViTConfig
    from pretrain.models.clip import ImageTabularCLIP

    vit = ViTConfig(img_size=16, sa_planes=1, la_planes=1, frames=5, patch=(5, 8, 8), dim=32, depth=1, heads=4)
    torch.manual_seed(0)
    plain = ImageTabularCLIP(vit, cfg(image_feature_norm="none"), schema())
    normed = ImageTabularCLIP(vit, cfg(image_feature_norm="batchnorm"), schema())
    assert isinstance(plain.image_norm, torch.nn.Identity)
    pooled = torch.full((8, 32), 5.0) + 0.1 * torch.randn(8, 32)  # a common component, 2 % variation
    out = normed.image_norm(pooled)
    assert out.mean(0).abs().max() < 1e-4 and (out.std(0, correction=0) - 1).abs().max() < 0.01
    assert sum(p.numel() for p in normed.image_norm.parameters()) == 0  # no affine: nothing else to learn
    values, missing = batch(B=4)
    images = torch.rand(4, 2, 5, 16, 16)
    res = normed(images, values, missing, generator=torch.Generator().manual_seed(0))
    res["loss"].backward()
    assert torch.isfinite(res["loss"]) and normed.image_proj.proj.weight.grad.abs().sum() > 0
