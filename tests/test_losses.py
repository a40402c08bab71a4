"""pretrain.losses: ViTa CLIP loss (eqs. 3-4) and MetaCLIP-CMR soft-label loss (eqs. 6-9), one process and 2 ranks.

The 2-rank proof: two CPU processes (gloo over loopback, file:// rendezvous in tmp_path) each hold half of a fixed
batch; the loss on each rank equals the one-process loss over the whole batch, and the gradients w.r.t. each rank's
local embeddings (and the logit scale, after the documented reduction) equal the one-process gradients' slices.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import spawn_ranks
from pretrain.losses import (MAX_LOGIT_SCALE, LogitScale, clip_loss, gather_features, gather_labels, soft_clip_loss,
                             soft_targets)

WORLD = 2
B, D = 8, 16
ALPHA, BETA = 0.2, 0.3  # larger than the paper's 0.05 so that the soft targets move the loss visibly
LOG_SCALE = math.log(1 / 0.07)


def _batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1234)
    img = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    tab = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    # shared modality / view across the two halves; view 0 invalid for samples 3 and 6 (one per rank)
    modality = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1])
    view = torch.tensor([0, 0, 1, 1, 0, 1, 1, 2])
    valid = torch.tensor([True, True, True, False, True, True, False, True])
    return img, tab, modality, view, valid


# ------------------------------------------------------------------------------- direct references (the equations)


def _ref_clip(img, tab, tau, lam, include_positive=True):
    """Eqs. 3-4 written out term by term (mean over subjects, see clip_loss's docstring)."""
    zi, zt = F.normalize(img.double(), dim=-1), F.normalize(tab.double(), dim=-1)
    n = zi.shape[0]

    def one_way(a, b):
        total = 0.0
        for j in range(n):
            num = torch.exp(torch.dot(a[j], b[j]) / tau)
            den = sum(torch.exp(torch.dot(a[j], b[k]) / tau) for k in range(n) if include_positive or k != j)
            total = total - torch.log(num / den)
        return total / n

    return lam * one_way(zi, zt) + (1 - lam) * one_way(zt, zi)


def _ref_qtilde(modality, view, valid, alpha, beta):
    n = len(modality)
    q = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            q[i, j] = float(i == j) + alpha * float(i != j and modality[i] == modality[j]) \
                + beta * float(i != j and view[i] == view[j] and bool(valid[i]) and bool(valid[j]))
    return q


def _ref_soft(img, txt, modality, view, valid, log_scale, alpha, beta):
    """Eqs. 5-9 written out."""
    v, u = F.normalize(img.double(), dim=-1), F.normalize(txt.double(), dim=-1)
    q = _ref_qtilde(modality, view, valid, alpha, beta)
    q = q / q.sum(1, keepdim=True)
    s = v @ u.T
    tau = torch.exp(-log_scale.double()) if torch.is_tensor(log_scale) else math.exp(-log_scale)
    n = s.shape[0]

    def sce(z):
        out = 0.0
        for i in range(n):
            for j in range(n):
                out = out - q[i, j] * torch.log(torch.exp(z[i, j]) / torch.exp(z[i]).sum())
        return out / n

    return 0.5 * (sce(s / tau) + sce(s.T / tau))


# ------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("include_positive", [True, False])
def test_clip_loss_matches_equations(include_positive):
    img, tab, *_ = _batch()
    for tau, lam in [(0.1, 0.5), (0.1, 0.3), (0.5, 1.0)]:
        got = clip_loss(img, tab, tau, lam, include_positive=include_positive)
        assert torch.allclose(got, _ref_clip(img, tab, tau, lam, include_positive), atol=1e-10)
    # the standard convention is the cross-entropy of the cosine logits against the diagonal
    zi, zt = F.normalize(img, dim=-1), F.normalize(tab, dim=-1)
    ce = 0.5 * F.cross_entropy(zi @ zt.T / 0.1, torch.arange(B)) + 0.5 * F.cross_entropy(zt @ zi.T / 0.1, torch.arange(B))
    assert torch.allclose(clip_loss(img, tab), ce, atol=1e-10)
    # lambda weights the two directions: the image->table term alone differs from the table->image term alone
    assert not torch.allclose(clip_loss(img, tab, weight=1.0), clip_loss(img, tab, weight=0.0))


def test_soft_targets_weights():
    modality = torch.tensor([0, 0, 1, 1, 0, 0])
    view = torch.tensor([0, 1, 0, 1, 0, 0])
    valid = torch.tensor([True, True, True, False, False, True])
    a, b = 0.05, 0.07
    q = soft_targets(modality, view, valid, a, b)
    assert torch.allclose(q.sum(1), torch.ones(6, dtype=q.dtype))
    qt = q / q.diagonal()[:, None]  # undo the row normalisation: Q~_ii = 1
    assert torch.allclose(qt.diagonal(), torch.ones(6, dtype=q.dtype))
    assert math.isclose(qt[0, 1], a)  # same modality only
    assert math.isclose(qt[0, 2], b)  # same (valid) view only
    assert math.isclose(qt[0, 5], a + b)  # both: added
    assert math.isclose(qt[0, 4], a)  # same view, but 4's view is invalid: modality term only
    assert qt[1, 3] == 0  # same view 1, but 3's view invalid; different modality
    assert qt[0, 3] == 0 and qt[2, 3] == a
    assert torch.allclose(qt, _ref_qtilde(modality, view, valid, a, b))
    # rows= selects rows of the same global matrix
    assert torch.equal(soft_targets(modality, view, valid, a, b, rows=torch.tensor([2, 5])), q[[2, 5]])


def test_soft_clip_loss_matches_equations_and_reduces_to_clip():
    img, txt, modality, view, valid = _batch()
    ls = torch.tensor(LOG_SCALE, dtype=torch.float64)
    got = soft_clip_loss(img, txt, modality, view, valid, ls, ALPHA, BETA)
    assert torch.allclose(got, _ref_soft(img, txt, modality, view, valid, ls, ALPHA, BETA), atol=1e-10)
    # alpha = beta = 0: the standard symmetric CLIP loss with tau = exp(-logit_scale)
    hard = soft_clip_loss(img, txt, modality, view, valid, ls, 0.0, 0.0)
    assert torch.allclose(hard, clip_loss(img, txt, math.exp(-LOG_SCALE), 0.5), atol=1e-10)
    assert not torch.allclose(got, hard)  # the chosen labels make the soft targets matter
    # paper defaults
    assert torch.allclose(soft_clip_loss(img, txt, modality, view, valid, ls),
                          _ref_soft(img, txt, modality, view, valid, ls, 0.05, 0.05), atol=1e-10)


def test_logit_scale_gradient_and_clamp():
    img, txt, modality, view, valid = _batch(torch.float32)
    scale = LogitScale()
    assert math.isclose(scale.temperature, 0.07, rel_tol=1e-6)
    assert math.isclose(float(scale.logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-6)
    img.requires_grad_(True)
    loss = soft_clip_loss(img, txt, modality, view, valid, scale, ALPHA, BETA)
    loss.backward()
    assert scale.logit_scale.grad is not None and scale.logit_scale.grad.abs() > 0
    assert img.grad is not None and img.grad.abs().sum() > 0
    # above log(100) the scale is clamped: same loss as at the bound, no gradient into the parameter
    high = torch.tensor(MAX_LOGIT_SCALE + 1.0, requires_grad=True)
    lh = soft_clip_loss(img.detach(), txt, modality, view, valid, high, ALPHA, BETA)
    lb = soft_clip_loss(img.detach(), txt, modality, view, valid, torch.tensor(MAX_LOGIT_SCALE), ALPHA, BETA)
    lh.backward()
    assert torch.allclose(lh, lb) and high.grad == 0
    with torch.no_grad():
        scale.logit_scale.fill_(10.0)
    scale.clamp_()
    assert math.isclose(float(scale.logit_scale.detach()), MAX_LOGIT_SCALE, rel_tol=1e-6)
    # the tensor form and the module form agree
    assert torch.allclose(soft_clip_loss(img, txt, modality, view, valid, scale),
                          soft_clip_loss(img, txt, modality, view, valid, scale.logit_scale))


def test_bf16_inputs_computed_in_float32():
    img, txt, modality, view, valid = _batch(torch.float32)
    ib, tb = img.bfloat16().requires_grad_(True), txt.bfloat16().requires_grad_(True)
    loss = clip_loss(ib, tb)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.allclose(loss, clip_loss(ib.detach().float(), tb.detach().float()), atol=1e-6)
    loss.backward()
    assert ib.grad.dtype == torch.bfloat16 and torch.isfinite(ib.grad.float()).all()
    s = soft_clip_loss(ib, tb, modality, view, valid, torch.tensor(LOG_SCALE))
    assert s.dtype == torch.float32 and torch.isfinite(s)
    # large logits stay finite (log_softmax / logsumexp, no exp overflow)
    big = clip_loss(img * 1e4, txt * 1e4, temperature=1e-3)
    assert torch.isfinite(big)


def test_gather_is_identity_without_process_group():
    x, y = torch.randn(3, 4), torch.tensor([1, 2, 3])
    assert gather_features(x)[0] is x and gather_labels(y)[0] is y


def test_bad_arguments():
    img, txt, modality, view, valid = _batch()
    with pytest.raises(ValueError):
        clip_loss(img, txt[:4])
    with pytest.raises(ValueError):
        soft_clip_loss(img, txt, modality[:4], view, valid, torch.tensor(LOG_SCALE))
    with pytest.raises(ValueError):
        clip_loss(img, txt, grad_reduction="avg")


# ------------------------------------------------------------------------------- 2 ranks


def _cases():
    """(name, fn(img, tab, logit_scale_tensor, modality, view, valid, grad_reduction) -> loss)."""
    return {
        "clip": lambda i, t, s, m, v, ok, red: clip_loss(i, t, 0.1, 0.3, grad_reduction=red),
        "clip_excl": lambda i, t, s, m, v, ok, red: clip_loss(i, t, 0.1, 0.5, include_positive=False,
                                                              grad_reduction=red),
        "soft": lambda i, t, s, m, v, ok, red: soft_clip_loss(i, t, m, v, ok, s, ALPHA, BETA, grad_reduction=red),
    }


def _run(case, img, tab, modality, view, valid, red, dtype):
    """Loss and gradients w.r.t. img, tab and the logit scale for (a slice of) the batch."""
    i = img.to(dtype).clone().requires_grad_(True)
    t = tab.to(dtype).clone().requires_grad_(True)
    s = torch.tensor(LOG_SCALE, dtype=torch.float32, requires_grad=True)
    loss = _cases()[case](i, t, s, modality, view, valid, red)
    loss.backward()
    return {"loss": loss.detach(), "img": i.grad, "tab": t.grad,
            "scale": s.grad if s.grad is not None else torch.zeros(())}


def _encoder_grads(rank, lo, hi, red):
    """DDP emulation: shared linear encoders + LogitScale; per-rank param grads (to be averaged by the parent)."""
    torch.manual_seed(7)
    enc_i, enc_t, scale = torch.nn.Linear(D, D), torch.nn.Linear(D, D), LogitScale()
    img, tab, modality, view, valid = _batch(torch.float32)
    loss = soft_clip_loss(enc_i(img[lo:hi]), enc_t(tab[lo:hi]), modality[lo:hi], view[lo:hi], valid[lo:hi], scale,
                          ALPHA, BETA, grad_reduction=red)
    loss = loss + clip_loss(enc_i(img[lo:hi]), enc_t(tab[lo:hi]), 0.1, 0.3, grad_reduction=red)
    loss.backward()
    params = list(enc_i.parameters()) + list(enc_t.parameters()) + list(scale.parameters())
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in params]}


def _worker(rank: int) -> dict:
    img, tab, modality, view, valid = _batch()
    n = B // WORLD
    lo, hi = rank * n, (rank + 1) * n
    res = {}
    for dtype in (torch.float32, torch.float64):
        for case in _cases():
            for red in ("sum", "mean"):
                res[(case, red, str(dtype))] = _run(case, img[lo:hi], tab[lo:hi], modality[lo:hi], view[lo:hi],
                                                    valid[lo:hi], red, dtype)
    for red in ("sum", "mean"):
        res[("encoder", red)] = _encoder_grads(rank, lo, hi, red)
    res["gathered_labels"] = gather_labels(valid[lo:hi], modality[lo:hi])
    return res


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("losses_2ranks")
    return spawn_ranks(_worker, WORLD, tmp, timeout=120)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(_cases()))
def test_two_ranks_equal_one_process(two_rank_results, case, dtype):
    img, tab, modality, view, valid = _batch()
    ref = _run(case, img, tab, modality, view, valid, "mean", dtype)  # one process: "mean" and "sum" coincide
    n = B // WORLD
    for red in ("sum", "mean"):
        factor = 1.0 if red == "sum" else float(WORLD)
        scale_sum = 0.0
        for rank, res in enumerate(two_rank_results):
            got = res[(case, red, str(dtype))]
            sl = slice(rank * n, (rank + 1) * n)
            # the value: the one-process loss over the whole batch, on every rank
            assert torch.allclose(got["loss"], ref["loss"], atol=1e-6, rtol=0), (case, red, rank)
            # the local embeddings' gradients: the slices of the one-process gradients (x W for "mean")
            assert torch.allclose(got["img"] / factor, ref["img"][sl], atol=1e-6, rtol=0), (case, red, rank)
            assert torch.allclose(got["tab"] / factor, ref["tab"][sl], atol=1e-6, rtol=0), (case, red, rank)
            scale_sum = scale_sum + got["scale"]
        # the replicated logit scale: summed over ranks ("sum") / averaged like DDP ("mean") gives the one-process grad
        reduced = scale_sum if red == "sum" else scale_sum / WORLD
        assert torch.allclose(reduced, ref["scale"], atol=1e-6, rtol=0), (case, red)
        if case == "soft":
            assert ref["scale"].abs() > 1e-3  # a real check, not 0 == 0


@pytest.mark.parametrize("red", ["sum", "mean"])
def test_two_ranks_engine_averaging(two_rank_results, red):
    """Parameters of shared encoders: DDP/DeepSpeed average ("mean") or a SUM all-reduce ("sum") = one process."""
    ref = _encoder_grads(0, 0, B, red)
    per_rank = [res[("encoder", red)] for res in two_rank_results]
    for got in per_rank:
        assert torch.allclose(got["loss"], ref["loss"], atol=1e-6, rtol=0)
    for k, want in enumerate(ref["grads"]):
        total = sum(got["grads"][k] for got in per_rank)
        reduced = total / WORLD if red == "mean" else total
        assert torch.allclose(reduced, want, atol=1e-6, rtol=0), (red, k)


def test_two_ranks_gather_labels(two_rank_results):
    _, _, modality, _, valid = _batch()
    for res in two_rank_results:
        ok, m = res["gathered_labels"]
        assert ok.dtype == torch.bool and torch.equal(ok, valid) and torch.equal(m, modality)
