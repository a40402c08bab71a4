"""Evaluation figures (ViTa Figs. 4, 5, 7, 8): one PNG per function, written atomically, path returned.

Figures are drawn on `matplotlib.figure.Figure` objects bound to the Agg canvas explicitly, not through pyplot:
no display is needed (cluster nodes), no global backend is switched under a caller (e.g. a notebook), and nothing
accumulates in pyplot's figure registry over a long evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from sklearn.manifold import TSNE
from sklearn.metrics import precision_recall_curve, roc_curve

from core.fsutil import atomic_path
from core.vocab import LABELS
from finetune.metrics import _known, _np, classification_metrics, regression_metrics

__all__ = ["regression_scatter", "roc_pr_curves", "segmentation_overlay", "tsne_embedding", "training_curves",
           "LABEL_COLOURS"]

PathLike = Union[str, Path]
# fixed colour per label id (tab10 order, see core.vocab.LABELS), half transparent; background invisible
LABEL_COLOURS = np.array([(0, 0, 0, 0)] + [(*colormaps["tab10"](i)[:3], 0.45) for i in range(9)])


def _figure(rows: int, cols: int, size: tuple[float, float] = (3.2, 3.2)):
    """A Figure on the Agg canvas and its axes as a 2D array."""
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Figure, out: PathLike) -> Path:
    """Write `fig` to `out` as PNG atomically (readers never see a half-written file)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return max(1, math.ceil(n / cols)), cols


def regression_scatter(pred, true, names: Sequence[str], units: Union[Sequence[str], Mapping[str, str]],
                       out: PathLike) -> Path:
    """Predicted vs true per target (ViTa Figs. 5-6): identity line, least-squares line, R^2 and r in the title.

    `pred`, `true` (N, K) in original units; NaN targets are left out per target, as in `regression_metrics`
    (whose R^2, the coefficient of determination, and Pearson r the titles show).
    """
    pred = _np(pred, np.float64).reshape(len(pred), -1)
    true = _np(true, np.float64).reshape(len(true), -1)
    scores = regression_metrics(pred, true, names)
    rows, cols = _grid(len(names))
    fig, axes = _figure(rows, cols)
    for k, name in enumerate(names):
        ax = axes.flat[k]
        unit = units.get(name, "") if isinstance(units, Mapping) else units[k]
        ok = np.isfinite(true[:, k]) & np.isfinite(pred[:, k])
        t, p = true[ok, k], pred[ok, k]
        ax.scatter(t, p, s=6, alpha=0.5, linewidths=0)
        if len(t):
            lo, hi = min(t.min(), p.min()), max(t.max(), p.max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
            if len(t) >= 2 and np.ptp(t) > 0:
                slope, intercept = np.polyfit(t, p, 1)
                ax.plot([lo, hi], [slope * lo + intercept, slope * hi + intercept], "r-", lw=1, label="least squares")
        s = scores[name]
        ax.set_title(f"{name}\nR² = {s['r2']:.3f}, r = {s['pearson']:.3f}, n = {s['n']}", fontsize=9)
        suffix = f" ({unit})" if unit else ""
        ax.set_xlabel("true" + suffix, fontsize=8)
        ax.set_ylabel("predicted" + suffix, fontsize=8)
    axes.flat[0].legend(fontsize=7, loc="upper left")
    for ax in axes.flat[len(names):]:
        ax.set_axis_off()
    return _save(fig, out)


def roc_pr_curves(scores: Mapping[str, object], labels: Mapping[str, object], out: PathLike) -> Path:
    """ROC (AUROC in the legend) and precision-recall (AP in the legend, prevalence as a dashed line) per disease.

    Unknown labels (-1) are left out; a disease with a single class has no curve and is marked "n/a".
    """
    fig, axes = _figure(1, 2, (4.5, 4.2))
    roc_ax, pr_ax = axes.flat
    roc_ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    for i, name in enumerate(scores):
        colour = colormaps["tab10"](i % 10)
        s, y = _known(scores[name], labels[name])
        m = classification_metrics(s, y, threshold=0.5)  # threshold-free AUROC / AP only
        if math.isnan(m["auroc"]):
            roc_ax.plot([], [], color=colour, label=f"{name}: n/a (one class)")
            continue
        fpr, tpr, _ = roc_curve(y, s)
        roc_ax.plot(fpr, tpr, color=colour, lw=1.2, label=f"{name}: AUROC {m['auroc']:.3f}")
        precision, recall, _ = precision_recall_curve(y, s)
        pr_ax.step(recall, precision, where="post", color=colour, lw=1.2,
                   label=f"{name}: AP {m['ap']:.3f} (prev. {m['prevalence']:.1%})")
        pr_ax.axhline(m["prevalence"], color=colour, lw=0.8, ls="--")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (dashed: prevalence)",
              xlim=(0, 1), ylim=(0, 1.02))
    for ax in axes.flat:
        ax.legend(fontsize=7, loc="lower right" if ax is roc_ax else "upper right")
    return _save(fig, out)


def _overlay(ax, image: np.ndarray, label: np.ndarray | None) -> None:
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)  # robust window: MR intensities are unscaled
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    if label is not None:
        ax.imshow(LABEL_COLOURS[np.clip(label.astype(int), 0, len(LABEL_COLOURS) - 1)], interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def segmentation_overlay(images, truth, pred, titles: Sequence[str], out: PathLike) -> Path:
    """Rows = views (`titles`, e.g. SA base / mid / apex, 2ch, 4ch); columns: image, truth overlay, prediction overlay.

    `images` (V, H, W) intensities, `truth` / `pred` (V, H, W) label ids (`core.vocab.LABELS`), drawn in the
    fixed `LABEL_COLOURS` so that a structure has the same colour in every figure.
    """
    images, truth, pred = _np(images, np.float64), _np(truth), _np(pred)
    if not (images.shape == truth.shape == pred.shape and images.ndim == 3 and len(titles) == len(images)):
        raise ValueError(f"images {images.shape}, truth {truth.shape}, pred {pred.shape}: expected equal (V, H, W) "
                         f"and {len(images)} titles, got {len(titles)}")
    fig, axes = _figure(len(images), 3, (2.6, 2.6))
    for v, title in enumerate(titles):
        for c, (label, column) in enumerate([(None, "image"), (truth[v], "truth"), (pred[v], "prediction")]):
            _overlay(axes[v, c], images[v], label)
            if v == 0:
                axes[v, c].set_title(column, fontsize=9)
        axes[v, 0].set_ylabel(title, fontsize=9)
    present = sorted((set(np.unique(truth).tolist()) | set(np.unique(pred).tolist())) - {0})
    handles = [Patch(color=LABEL_COLOURS[i][:3], label=LABELS[i] if i < len(LABELS) else str(i))
               for i in present if 0 < i < len(LABEL_COLOURS)]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    return _save(fig, out)


def tsne_embedding(emb, values, name: str, out: PathLike, seed: int = 0) -> Path:
    """t-SNE of embeddings (N, D) coloured by one value per subject (ViTa Fig. 4); NaN values drawn grey.

    Perplexity min(30, (N - 1) / 3) keeps t-SNE valid down to N = 5 (it needs perplexity < N).
    """
    emb, values = _np(emb, np.float64), _np(values, np.float64).ravel()
    if len(emb) < 5 or len(values) != len(emb):
        raise ValueError(f"t-SNE needs >= 5 embeddings and one value each, got {emb.shape} and {values.shape}")
    xy = TSNE(n_components=2, perplexity=min(30.0, (len(emb) - 1) / 3), init="pca",
              random_state=seed).fit_transform(emb)
    fig, axes = _figure(1, 1, (5.0, 4.2))
    ax = axes[0, 0]
    ok = np.isfinite(values)
    ax.scatter(xy[~ok, 0], xy[~ok, 1], s=8, c="lightgrey", linewidths=0, label="missing")
    sc = ax.scatter(xy[ok, 0], xy[ok, 1], s=8, c=values[ok], cmap="viridis", linewidths=0)
    fig.colorbar(sc, ax=ax, label=name)
    ax.set(title=f"t-SNE (n = {len(emb)}) coloured by {name}", xticks=[], yticks=[])
    return _save(fig, out)


def training_curves(rows: Sequence[Mapping], keys: Sequence[str], out: PathLike) -> Path:
    """One panel per key: its value over "step" (row order if absent) across metrics.jsonl rows that have it."""
    n_rows, cols = _grid(len(keys), 3)
    fig, axes = _figure(n_rows, cols, (3.6, 2.8))
    for ax, key in zip(axes.flat, keys):
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, lw=1.2, marker="." if len(pts) < 50 else None)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(keys):]:
        ax.set_axis_off()
    return _save(fig, out)
