"""Evaluation metrics of the downstream tasks (ViTa Sec. 5.2): pure functions of arrays, no training code.

- phenotype / physiology regression (Tables 1-3): MAE (+ std of the absolute errors, the tables' "+-"), RMSE, R^2,
  Pearson r, in ORIGINAL units, per target, with missing targets excluded per target;
- disease classification under class imbalance (Table 4): AUROC, AP, and F1 / recall / precision at a decision
  threshold chosen on the validation split (`choose_threshold`), since 0.5 predicts no positive at 3 % prevalence;
- segmentation (Fig. 7): Dice and HD95 per structure over 2D images, with MONAI;
- retrieval (MetaCLIP-CMR) top-k, and accuracy / balanced accuracy for modality and view classification.

Inputs may be numpy arrays or torch tensors; results are plain Python floats (NaN where a metric is undefined).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import numpy as np
import torch
from scipy.stats import pearsonr
from sklearn import metrics as skm

__all__ = ["regression_metrics", "mean_guess_metrics", "choose_threshold", "classification_metrics",
           "segmentation_metrics", "volume_dice", "accuracy", "balanced_accuracy"]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]
NAN = float("nan")


def _np(x: ArrayLike, dtype=None) -> np.ndarray:
    """numpy view of an array or tensor (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x  # numpy has no bfloat16
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


# ------------------------------------------------------------------------------------------------- regression


def regression_metrics(pred: ArrayLike, true: ArrayLike, names: Sequence[str],
                       valid: Optional[ArrayLike] = None) -> dict[str, dict[str, float]]:
    """Per-target errors of `pred` vs `true`, both (N, K) in original units (de-normalise before calling).

    A subject counts for target k when `valid[:, k]` (default: all) and `true[:, k]` is finite, so a missing
    phenotype drops that one target, not the subject. Returns ``{name: {"mae", "mae_std", "rmse", "r2", "pearson",
    "n"}}``; "r2" is the coefficient of determination (sklearn), "pearson" the sample correlation r (ViTa's Fig. 5
    quotes r^2); "mae_std" is the std of the absolute errors (the "+-" of Tables 1-3).
    """
    pred = _np(pred, np.float64).reshape(len(pred), -1)
    true = _np(true, np.float64).reshape(len(true), -1)
    if pred.shape != true.shape or pred.shape[1] != len(names):
        raise ValueError(f"pred {pred.shape}, true {true.shape} and {len(names)} names do not match")
    mask = np.isfinite(true) if valid is None else _np(valid, bool).reshape(true.shape) & np.isfinite(true)
    out = {}
    for k, name in enumerate(names):
        p, t = pred[mask[:, k], k], true[mask[:, k], k]
        n = len(t)
        if n == 0:
            out[name] = {"mae": NAN, "mae_std": NAN, "rmse": NAN, "r2": NAN, "pearson": NAN, "n": 0}
            continue
        err = np.abs(p - t)
        # both undefined for a constant target / prediction or n < 2: NaN rather than sklearn's 0 / scipy's warning
        defined = n >= 2 and np.ptp(t) > 0
        out[name] = {
            "mae": float(skm.mean_absolute_error(t, p)),
            "mae_std": float(err.std()),
            "rmse": float(np.sqrt(skm.mean_squared_error(t, p))),
            "r2": float(skm.r2_score(t, p)) if defined else NAN,
            "pearson": float(pearsonr(t, p)[0]) if defined and np.ptp(p) > 0 else NAN,
            "n": int(n),
        }
    return out


def mean_guess_metrics(train_true: ArrayLike, test_true: ArrayLike,
                       names: Sequence[str]) -> dict[str, dict[str, float]]:
    """The mean-guess baseline of Tables 1-3: predict every test subject's target as the training mean."""
    train = _np(train_true, np.float64).reshape(len(train_true), -1)
    test = _np(test_true, np.float64).reshape(len(test_true), -1)
    known = np.isfinite(train)
    count = known.sum(0)
    # missing training values ignored; a target never seen in training has no mean and no metrics (n = 0)
    mean = np.where(known, train, 0).sum(0) / np.maximum(count, 1)
    return regression_metrics(np.broadcast_to(mean, test.shape), test, names,
                              valid=np.broadcast_to(count > 0, test.shape))


# --------------------------------------------------------------------------------------------- classification


def _known(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Scores and 0/1 labels of the subjects whose label is known (unknown = -1, or any negative)."""
    s, y = _np(scores, np.float64).ravel(), _np(labels).ravel()
    keep = y >= 0
    return s[keep], y[keep].astype(int)


def choose_threshold(scores: ArrayLike, labels: ArrayLike, default: float = 0.5) -> float:
    """Decision threshold maximising F1 on validation scores; predict positive when ``score >= threshold``.

    The candidates are the distinct scores (every distinct way to split the sorted subjects). Equal F1: the larger
    threshold wins (fewer positives flagged for the same F1). With one class only (or no known label) F1 cannot
    pick anything, so `default` is returned (0.5 suits probabilities; pass 0.0 for logits).
    """
    s, y = _known(scores, labels)
    if len(y) == 0 or y.min() == y.max():
        return float(default)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)  # true positives when the top i+1 subjects are called positive
    fp = np.cumsum(1 - y)
    last = np.r_[s[1:] != s[:-1], True]  # a threshold must take all tied scores at once
    tp, fp, thr = tp[last], fp[last], s[last]
    # F1 = 2TP / (2TP + FP + FN); computed from integer counts, so equal F1s are equal floats and ties are exact
    f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))
    best = np.flatnonzero(f1 == f1.max())
    return float(thr[best].max())


def classification_metrics(scores: ArrayLike, labels: ArrayLike, threshold: float) -> dict[str, float]:
    """Table 4 metrics of one binary label: threshold-free AUROC and AP, F1 / recall / precision at `threshold`.

    Unknown labels (-1) are excluded. AUROC is NaN with one class present and AP is NaN without positives
    (both undefined; sklearn would raise or warn). F1 / recall / precision use ``zero_division=0``.
    """
    s, y = _known(scores, labels)
    pred = (s >= threshold).astype(int)
    both = len(y) > 0 and y.min() != y.max()
    pos = int(y.sum())
    return {
        "auroc": float(skm.roc_auc_score(y, s)) if both else NAN,
        "ap": float(skm.average_precision_score(y, s)) if pos > 0 else NAN,
        "f1": float(skm.f1_score(y, pred, zero_division=0)) if len(y) else NAN,
        "recall": float(skm.recall_score(y, pred, zero_division=0)) if len(y) else NAN,
        "precision": float(skm.precision_score(y, pred, zero_division=0)) if len(y) else NAN,
        "prevalence": pos / len(y) if len(y) else NAN,
        "threshold": float(threshold),
        "n": int(len(y)),
    }


def accuracy(pred: ArrayLike, true: ArrayLike) -> float:
    """Multi-class accuracy; `pred` holds class ids (N,) or scores (N, C), whose argmax is taken."""
    p, t = _np(pred), _np(true).ravel()
    return float(skm.accuracy_score(t, p.argmax(1) if p.ndim == 2 else p.ravel()))


def balanced_accuracy(pred: ArrayLike, true: ArrayLike) -> float:
    """Mean per-class recall (modality / view classes are imbalanced); `pred` as in `accuracy`."""
    p, t = _np(pred), _np(true).ravel()
    return float(skm.balanced_accuracy_score(t, p.argmax(1) if p.ndim == 2 else p.ravel()))


# ----------------------------------------------------------------------------------------------- segmentation


def _plane_spacing(spacing, n: int, p: int) -> np.ndarray:
    """Pixel spacing (row, col) per plane, (N, P, 2), from None (1 pixel), a scalar, (2,), or (N, P, 2)."""
    s = np.ones(2) if spacing is None else _np(spacing, np.float64)
    return np.broadcast_to(s if s.ndim else np.full(2, float(s)), (n, p, 2))


def volume_dice(pred: ArrayLike, true: ArrayLike, valid: ArrayLike, labels: Mapping[int, str],
                plane_labels: Sequence[Sequence[int]], groups: Sequence[int]) -> dict[str, dict[str, float]]:
    """Dice per subject over whole volumes, as ukbb_cardiac and nnU-Net report it: `pred`, `true` (N, P, T, H, W).

    Planes with the same `groups[p]` form one volume (e.g. the short-axis stack: 3D+T; each long-axis view on its
    own: 2D+T). A structure (label id -> name in `labels`) is scored on a subject's volume only where the volume's
    planes have a ground truth (``valid[n, p]``) whose label set `plane_labels[p]` contains it — an atrium is not
    scored on the short-axis stack, a ventricle not on a long-axis view whose segmentation has only the atria. Per
    (subject, volume, structure): absent in both prediction and truth -> left out; otherwise
    2 |P & T| / (|P| + |T|). Returns ``{name: {"dice", "std", "n"}}`` (mean and std over the items; NaN when none).
    """
    valid = _np(valid, bool)
    n_subj, n_planes = np.shape(pred)[:2]
    if np.shape(pred) != np.shape(true) or valid.shape != (n_subj, n_planes) or len(plane_labels) != n_planes \
            or len(groups) != n_planes:
        raise ValueError(f"pred {np.shape(pred)} / true {np.shape(true)} (N, P, T, H, W), valid (N, P), and one label "
                         f"set and group per plane are required")
    items: dict[int, list[float]] = {c: [] for c in labels}
    for i in range(n_subj):
        p_i, t_i = _np(pred[i]), _np(true[i])
        for g in dict.fromkeys(groups):
            for c in labels:
                planes = [p for p in range(n_planes) if groups[p] == g and valid[i, p] and c in plane_labels[p]]
                if not planes:
                    continue
                pc, tc = p_i[planes] == c, t_i[planes] == c
                denom = int(pc.sum()) + int(tc.sum())
                if denom:
                    items[c].append(2.0 * int((pc & tc).sum()) / denom)
    return {name: {"dice": float(np.mean(items[c])) if items[c] else NAN,
                   "std": float(np.std(items[c])) if items[c] else NAN, "n": len(items[c])}
            for c, name in labels.items()}


def segmentation_metrics(pred: ArrayLike, true: ArrayLike, valid: ArrayLike, labels: Mapping[int, str],
                         spacing=None, plane_labels: Optional[Sequence[Sequence[int]]] = None
                         ) -> dict[str, dict[str, float]]:
    """Dice and HD95 per structure between label maps `pred` and `true`, both (N, P, T, H, W).

    Every (subject, plane, frame) image with ``valid[n, p]`` (the plane has a ground-truth segmentation) is one 2D
    item; planes without one are skipped entirely. Per structure (label id -> name in `labels`) and item:

    - absent in both prediction and truth: Dice is undefined (0/0), so the item is left out of that structure's
      means (e.g. RV on a 2-chamber view, LV beyond the apex);
    - absent in exactly one: Dice is 0 and counted; the Hausdorff distance is infinite, so HD95 is averaged over
      the items where both are present only, and ``n_hd95`` says over how many (``n - n_hd95`` missed / spurious);
    - present in both: MONAI's `compute_dice` and `compute_hausdorff_distance(percentile=95)` (symmetric: the larger
      of the two directed 95th-percentile boundary distances), in `spacing` units (mm) or pixels when None.

    With `plane_labels` (one label set per plane), a structure is scored only on the planes whose ground truth can
    contain it (no LV on a long-axis view labelled with the atria only).

    Returns ``{name: {"dice", "hd95", "n", "n_hd95"}}`` (means over items; NaN when no item counts).
    `spacing`: None, a scalar, (row, col), or per plane (N, P, 2). Subjects are processed one at a time, so memory
    stays at one subject's planes (arrays may be memory-mapped).
    """
    # monai's top-level import pulls in most of the library (~7 s): only pay for it when segmenting
    from monai.metrics import compute_dice, compute_hausdorff_distance

    valid = _np(valid, bool)
    if np.shape(pred) != np.shape(true) or len(np.shape(pred)) != 5 or valid.shape != tuple(np.shape(pred)[:2]):
        raise ValueError(f"pred {np.shape(pred)} / true {np.shape(true)} must be (N, P, T, H, W), valid (N, P)")
    n_subj, n_planes, frames = np.shape(pred)[:3]
    spacing = _plane_spacing(spacing, n_subj, n_planes)
    dice: dict[int, list[np.ndarray]] = {c: [] for c in labels}
    hd: dict[int, list[np.ndarray]] = {c: [] for c in labels}
    for i in range(n_subj):
        planes = np.flatnonzero(valid[i])
        if len(planes) == 0:
            continue
        p = torch.as_tensor(_np(pred[i])[planes]).flatten(0, 1)  # (planes * T, H, W) 2D items
        t = torch.as_tensor(_np(true[i])[planes]).flatten(0, 1)
        item_spacing = np.repeat(spacing[i, planes], frames, axis=0)
        item_plane = np.repeat(planes, frames)
        for c in labels:
            pc, tc = (p == c)[:, None].double(), (t == c)[:, None].double()  # one-hot (items, 1, H, W) of structure c
            in_p, in_t = pc.flatten(1).any(1), tc.flatten(1).any(1)
            counted = in_p | in_t
            if plane_labels is not None:
                counted &= torch.as_tensor([c in plane_labels[q] for q in item_plane])
            if not counted.any():
                continue
            d = compute_dice(pc[counted], tc[counted], include_background=True, ignore_empty=False)[:, 0]
            dice[c].append(d.numpy())
            both = (in_p & in_t & counted).numpy()
            if both.any():
                with warnings.catch_warnings():  # MONAI 1.5+ trips over its own deprecated argument internally
                    warnings.filterwarnings("ignore", ".*always_return_as_numpy", FutureWarning)
                    h = compute_hausdorff_distance(pc[both], tc[both], include_background=True, percentile=95,
                                                   spacing=[tuple(s) for s in item_spacing[both]])[:, 0]
                hd[c].append(h.numpy())
    out = {}
    for c, name in labels.items():
        d = np.concatenate(dice[c]) if dice[c] else np.zeros(0)
        h = np.concatenate(hd[c]) if hd[c] else np.zeros(0)
        out[name] = {"dice": float(d.mean()) if len(d) else NAN, "hd95": float(h.mean()) if len(h) else NAN,
                     "n": int(len(d)), "n_hd95": int(len(h))}
    return out
