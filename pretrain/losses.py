"""Contrastive losses for Stage II (ViTa image-tabular CLIP) and MetaCLIP-CMR (soft-label image-text CLIP).

Built like open_clip's `ClipLoss` with ``gather_with_grad=True, local_loss=True``:

- the embeddings are L2-normalised (in float32, whatever the input dtype: bf16/fp16 are upcast, float64 is kept)
  and all-gathered across the data-parallel ranks with `torch.distributed.nn.functional.all_gather`, whose
  backward sums every rank's gradient for a rank's slot back onto its owner (reduce-scatter), so the columns of the
  global similarity matrix are differentiable everywhere;
- each rank computes only ITS OWN ROWS against ALL columns (B_local x B_global logits, the positives of local row i
  sit at column ``rank * B_local + i``), in both directions, so no work is duplicated across ranks;
- the rows' per-sample losses are summed and divided by the GLOBAL batch size, i.e. each rank holds the partial
  ``L_r`` of the one-process loss ``L = sum_r L_r``. Through the all-gather's backward the gradient that reaches a
  rank's local inputs is then exactly ``dL/dx_r`` (the slice of the one-process gradient) - before any scaling.

Value and gradient scaling (the `grad_reduction` argument):

- the returned value is the one-process loss ``L`` over the whole global batch on EVERY rank (the partials are
  all-reduced as a detached scalar, for logging; the extra collective is one float);
- ``grad_reduction="mean"`` (default): DDP and DeepSpeed AVERAGE parameter gradients over the data-parallel ranks, so
  the backward is scaled by the world size ``W``: the gradient w.r.t. a rank's local embeddings is ``W * dL/dx_r``,
  and w.r.t. a replicated parameter (the logit scale, and through the encoders every weight) it is
  ``W * dL_r/dtheta``; the engine's average ``1/W * sum_r W * dL_r/dtheta = dL/dtheta`` is then the single-process
  gradient. (This is also what open_clip's local_loss does: its per-rank mean over B_local rows is W x our partial.)
- ``grad_reduction="sum"``: no scaling: the gradient w.r.t. a rank's local embeddings equals the slice of the
  one-process gradient exactly, and replicated parameters' gradients must be SUMMED over ranks (use this when you
  all-reduce with SUM yourself, or to compare with a single process).
With one process (or torch.distributed not initialised) both are the plain one-process loss and gradient.

All ranks must call the loss (and backward) with the same per-rank batch size (drop_last), as for any all_gather.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["gather_features", "gather_labels", "clip_loss", "soft_targets", "soft_clip_loss", "LogitScale",
           "MAX_LOGIT_SCALE", "LOCAL"]

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP: 1/tau is clamped at 100

GradReduction = Literal["mean", "sum"]
LOCAL = "local"  # group=LOCAL: this process's tensors only, no collectives (e.g. scoring gathered embeddings)


# --------------------------------------------------------------------------------------------------- gathering


def _world(group=None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) for group=LOCAL or when torch.distributed is not initialised."""
    if group == LOCAL or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def gather_features(*tensors: Tensor, group=None) -> tuple[Tensor, ...]:
    """All-gather each tensor along dim 0 in rank order, gradients flowing back to their owners.

    Uses `torch.distributed.nn.functional.all_gather` (open_clip's ``gather_with_grad=True``): its backward sums the
    gradients every rank computed for a slot and hands the sum to the rank that owns it. Every rank must call this
    (and the backward) with the same shapes. Identity when torch.distributed is not initialised or world size is 1.
    """
    _, world = _world(group)
    if world == 1:
        return tuple(tensors)
    from torch.distributed.nn.functional import all_gather

    kw = {} if group is None else {"group": group}
    return tuple(torch.cat(all_gather(t.contiguous(), **kw), dim=0) for t in tensors)


@torch.no_grad()
def gather_labels(*tensors: Tensor, group=None) -> tuple[Tensor, ...]:
    """All-gather non-differentiable tensors (integer / bool labels) along dim 0 in rank order (plain all_gather).

    Bool tensors travel as uint8 (not every backend reduces bools) and come back as bool. Identity when
    torch.distributed is not initialised or world size is 1.
    """
    _, world = _world(group)
    if world == 1:
        return tuple(tensors)
    out = []
    for t in tensors:
        send = (t.to(torch.uint8) if t.dtype == torch.bool else t).contiguous()
        parts = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(parts, send, group=group)
        out.append(torch.cat(parts, dim=0).to(t.dtype))
    return tuple(out)


# --------------------------------------------------------------------------------------------------- helpers


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _normalise(x: Tensor) -> Tensor:
    return F.normalize(x.to(_compute_dtype(x)), dim=-1)


def _finish(partial: Tensor, group, grad_reduction: GradReduction) -> Tensor:
    """Value: the global loss sum_r partial_r on every rank; gradient: partial's, times W for "mean" (see module)."""
    if grad_reduction not in ("mean", "sum"):
        raise ValueError(f"grad_reduction must be 'mean' or 'sum', got {grad_reduction!r}")
    _, world = _world(group)
    if world == 1:
        return partial
    total = partial.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    scaled = partial * world if grad_reduction == "mean" else partial
    return scaled + (total - scaled.detach())


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"expected two (B, D) embeddings of the same shape, got {tuple(a.shape)}, {tuple(b.shape)}")


# --------------------------------------------------------------------------------------------------- ViTa


def clip_loss(img: Tensor, tab: Tensor, temperature: float | Tensor = 0.1, weight: float = 0.5, *,
              include_positive: bool = True, grad_reduction: GradReduction = "mean", group=None) -> Tensor:
    """ViTa Stage II CLIP loss (eqs. 3-4): ``weight * l_it + (1 - weight) * l_ti`` over the global batch.

    img, tab: (B_local, D) embeddings of the same subjects, row i of both is subject i (any float dtype; computed in
    float32). They are L2-normalised, so ``logits = cos(z_i, z_t) / temperature``; l_it is the cross-entropy of each
    image row against all tabular columns of the GLOBAL (all-gathered) batch with the matching subject as the target,
    l_ti the same for tabular rows against image columns. Defaults are ViTa's: tau = 0.1, lambda = 0.5.

    Conventions (vs. the paper's text):

    - ``include_positive=True`` (default) is the standard CLIP / InfoNCE softmax, whose denominator runs over ALL
      k including the positive k = j, i.e. ``-log softmax(logits)[j, j]``. Eq. 3 as printed excludes k = j from the
      denominator (the "decoupled" form); we default to the standard one because ViTa cites CLIP and Hager et al.
      (2023), whose implementation is cross-entropy over the full row, it is a proper log-probability (>= 0, the
      gradient saturates once the pair dominates), and it is what `soft_clip_loss` (eq. 9) reduces to.
      ``include_positive=False`` implements eq. 3 literally (the value can be negative).
    - eq. 3 sums over the subjects; we average (divide by the global batch size) as CLIP does, so the loss and the
      learning rate do not depend on the batch size. The sum is ``B_global`` times this value.

    Distributed: local rows against gathered columns; returns the global loss on every rank; gradient scaling per
    `grad_reduction` (module docstring: "mean" makes DDP/DeepSpeed's gradient averaging give the one-process
    gradient).
    """
    _check_pair(img, tab)
    rank, _ = _world(group)
    zi, zt = _normalise(img), _normalise(tab)
    all_i, all_t = gather_features(zi, zt, group=group)
    b_local, b_global = zi.shape[0], all_i.shape[0]
    target = torch.arange(b_local, device=zi.device) + rank * b_local  # the positives' global columns

    def direction(rows: Tensor, cols: Tensor) -> Tensor:
        logits = rows @ cols.T / temperature  # (B_local, B_global)
        pos = logits.gather(1, target[:, None]).squeeze(1)
        if include_positive:
            denom = torch.logsumexp(logits, dim=1)
        else:
            mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, target[:, None], True)
            denom = torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=1)
        return (denom - pos).sum() / b_global  # this rank's share of the global mean

    partial = weight * direction(zi, all_t) + (1.0 - weight) * direction(zt, all_i)
    return _finish(partial, group, grad_reduction)


# --------------------------------------------------------------------------------------------------- MetaCLIP-CMR


class LogitScale(nn.Module):
    """A learnable ``log(1 / temperature)`` (CLIP-style), initialised at temperature 0.07 (MetaCLIP-CMR).

    ``forward()`` returns the parameter clamped at ``log(max_scale)`` (1/tau <= 100 as in CLIP); the clamp is also
    applied inside `soft_clip_loss`, so passing the raw parameter is equivalent. `clamp_()` clamps the stored value
    in place (CLIP does this after each optimizer step so the parameter cannot drift past the bound unseen).
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        if init_temperature <= 0 or max_scale <= 0:
            raise ValueError(f"init_temperature and max_scale must be > 0, got {init_temperature}, {max_scale}")
        self.max_log = math.log(max_scale)
        # shape (1,), not a scalar: DeepSpeed broadcasts parameters as byte views, which 0-dim tensors cannot be
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / init_temperature)]))

    def forward(self) -> Tensor:
        return self.logit_scale.clamp(max=self.max_log)[0]

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.forward().detach()))

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logit_scale.clamp_(0.0, self.max_log)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}"


def soft_targets(modality: Tensor, view: Tensor, view_valid: Tensor, alpha: float = 0.05, beta: float = 0.05,
                 rows: Tensor | None = None) -> Tensor:
    """MetaCLIP-CMR soft targets Q (eqs. 6-7), rows normalised to sum to 1.

    ``Q~_ij = [i = j] + alpha [i != j, m_i = m_j] + beta [i != j, r_i = r_j, view_valid_i, view_valid_j]``
    (both attributes shared: the contributions add). modality, view: (B,) integer labels, view_valid: (B,) bool.
    `rows` (default: all) selects the row indices, so a rank can build only its own rows of the global matrix.
    Q~ is symmetric, so the same rows serve both directions of eq. 8.
    """
    b = modality.shape[0]
    rows = torch.arange(b, device=modality.device) if rows is None else rows
    view_valid = view_valid.to(torch.bool)
    eye = rows[:, None] == torch.arange(b, device=modality.device)[None, :]
    same_m = (modality[rows][:, None] == modality[None, :]) & ~eye
    same_v = (view[rows][:, None] == view[None, :]) & view_valid[rows][:, None] & view_valid[None, :] & ~eye
    q = eye.double() + alpha * same_m.double() + beta * same_v.double()
    return q / q.sum(dim=1, keepdim=True)


def soft_clip_loss(img: Tensor, txt: Tensor, modality: Tensor, view: Tensor, view_valid: Tensor,
                   logit_scale: Tensor | LogitScale, alpha: float = 0.05, beta: float = 0.05, *,
                   grad_reduction: GradReduction = "mean", group=None) -> Tensor:
    """MetaCLIP-CMR bidirectional soft-label contrastive loss (eqs. 5-9) over the global batch.

    img, txt: (B_local, D) embeddings (L2-normalised here, computed in float32); modality, view: (B_local,) integer
    labels; view_valid: (B_local,) bool (the view term applies only where both views are valid); logit_scale:
    ``log(1/tau)``, a learnable scalar (a tensor or a `LogitScale`), clamped at log(100) and exponentiated.
    The embeddings are gathered with gradients, the labels without; soft targets Q per `soft_targets`; the loss is
    ``1/2 [SCE(Q, S/tau) + SCE(Q, S^T/tau)]`` with SCE the row-wise soft cross-entropy averaged over the global
    batch (eq. 9). With alpha = beta = 0 this is the standard (symmetric, lambda = 1/2) CLIP loss.

    Distributed: local rows against gathered columns, the global loss on every rank; gradients (embeddings and the
    logit scale) scaled per `grad_reduction` (module docstring).
    """
    _check_pair(img, txt)
    if not (modality.shape == view.shape == view_valid.shape == img.shape[:1]):
        raise ValueError(f"labels must be ({img.shape[0]},), got {tuple(modality.shape)}, {tuple(view.shape)}, "
                         f"{tuple(view_valid.shape)}")
    rank, _ = _world(group)
    zi, zt = _normalise(img), _normalise(txt)
    all_i, all_t = gather_features(zi, zt, group=group)
    dev = zi.device
    all_m, all_v, all_ok = gather_labels(modality.to(dev), view.to(dev), view_valid.to(dev, torch.bool), group=group)
    b_local, b_global = zi.shape[0], all_i.shape[0]
    rows = torch.arange(b_local, device=dev) + rank * b_local
    q = soft_targets(all_m, all_v, all_ok, alpha, beta, rows=rows).to(zi.dtype)  # (B_local, B_global)

    ls = logit_scale() if isinstance(logit_scale, LogitScale) else logit_scale
    scale = ls.to(zi.dtype).clamp(max=MAX_LOGIT_SCALE).exp()

    def sce(rows_z: Tensor, cols_z: Tensor) -> Tensor:
        logp = F.log_softmax(scale * (rows_z @ cols_z.T), dim=1)
        return -(q * logp).sum() / b_global

    partial = 0.5 * (sce(zi, all_t) + sce(zt, all_i))
    return _finish(partial, group, grad_reduction)
