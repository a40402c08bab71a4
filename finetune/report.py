"""Markdown evaluation reports shaped like the ViTa tables (Tables 1-4) plus linked figures.

Results come in as the dicts of `finetune.metrics` keyed by method (e.g. "Mean-guess", "ViT (scratch)", "ViTa");
undefined values (NaN) print as "n.a.", as in the paper.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np

from core.fsutil import atomic_write_text

__all__ = ["markdown_table", "phenotype_table", "disease_table", "segmentation_table", "volume_dice_table",
           "write_report"]

PathLike = Union[str, Path]


def _cell(value, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "n.a." if math.isnan(value) else format(float(value), floatfmt)
    return str(value).replace("|", "\\|").replace("\n", " ")  # a pipe or newline would break the row


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], floatfmt: str = ".3f") -> str:
    """GitHub-flavoured markdown table of `rows` (dicts) in `columns` order; floats with `floatfmt`, NaN "n.a.",
    a missing key an empty cell."""
    lines = ["| " + " | ".join(_cell(c, floatfmt) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c), floatfmt) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float | None, floatfmt: str) -> str:
    """A "mean ± std" cell as in the ViTa tables ("n.a." when undefined)."""
    if mean is None or math.isnan(mean):
        return "n.a."
    return format(mean, floatfmt) + ("" if std is None or math.isnan(std) else " ± " + format(std, floatfmt))


def phenotype_table(results: Mapping[str, Mapping[str, Mapping[str, float]]], names: Sequence[str],
                    floatfmt: str = ".3f") -> str:
    """MAE (± std of the absolute errors) per phenotype, one row per method, plus the "Average" of Tables 1-3.

    `results[method]` is `regression_metrics`-like (``{name: {"mae", "mae_std"?}}``). The average is the mean MAE
    (± mean std) over the phenotypes the method has (the paper averages over the available ones).
    """
    rows = []
    for method, res in results.items():
        row = {"Method": method}
        for name in names:
            row[name] = _pm(res.get(name, {}).get("mae", math.nan), res.get(name, {}).get("mae_std"), floatfmt)
        known = [res[n] for n in names if not math.isnan(res.get(n, {}).get("mae", math.nan))]
        stds = [m.get("mae_std", math.nan) for m in known]
        row["Average"] = _pm(float(np.mean([m["mae"] for m in known])) if known else math.nan,
                             float(np.mean(stds)) if known else None, floatfmt)  # a NaN std drops the "±"
        rows.append(row)
    return markdown_table(rows, ["Method", *names, "Average"], floatfmt)


def disease_table(results: Mapping[str, Mapping[str, Mapping[str, float]]], floatfmt: str = ".3f") -> str:
    """Table 4: per disease (with its positives / labelled subjects and their ratio) and method, AUROC, F1, recall, precision and AP.

    `results[method][disease]` is `classification_metrics`-like.
    """
    diseases = list(dict.fromkeys(d for res in results.values() for d in res))  # first-seen order
    columns = {"AUROC": "auroc", "F1": "f1", "Recall": "recall", "Precision": "precision", "AP": "ap"}
    rows = []
    for disease in diseases:
        first = True
        for method, res in results.items():
            if disease not in res:
                continue
            m = res[disease]
            prev = m.get("prevalence", math.nan)
            n = int(m.get("n", 0) or 0)
            label = disease if math.isnan(prev) else (
                f"{disease} ({round(prev * n)}/{n}, {prev:.1%})" if n else f"{disease} ({prev:.1%})")
            rows.append({"Disease": label if first else "", "Method": method,
                         **{col: m.get(key, math.nan) for col, key in columns.items()}})
            first = False
    return markdown_table(rows, ["Disease", "Method", *columns], floatfmt)


def segmentation_table(results: Mapping[str, Mapping[str, Mapping[str, float]]], floatfmt: str = ".3f") -> str:
    """Dice and HD95 per structure, one row per method (`results[method]` is `segmentation_metrics`-like)."""
    structures = list(dict.fromkeys(s for res in results.values() for s in res))
    rows = []
    for method, res in results.items():
        row = {"Method": method}
        for s in structures:
            row[f"{s} Dice"] = res.get(s, {}).get("dice", math.nan)
            row[f"{s} HD95"] = res.get(s, {}).get("hd95", math.nan)
        rows.append(row)
    columns = ["Method"] + [f"{s} {m}" for s in structures for m in ("Dice", "HD95")]
    return markdown_table(rows, columns, floatfmt)


def volume_dice_table(results: Mapping[str, Mapping[str, Mapping[str, float]]], floatfmt: str = ".3f") -> str:
    """Volume Dice per structure (mean ± std over subjects' volumes, n), one row per method
    (`results[method]` is `metrics.volume_dice`-like)."""
    structures = list(dict.fromkeys(s for res in results.values() for s in res))
    rows = [{"Method": method, **{s: _pm(res.get(s, {}).get("dice", math.nan), res.get(s, {}).get("std"), floatfmt)
                                  + f" (n={res.get(s, {}).get('n', 0)})" for s in structures}}
            for method, res in results.items()]
    return markdown_table(rows, ["Method", *structures], floatfmt)


def write_report(path: PathLike, title: str, sections: Sequence[tuple[str, str]],
                 figures: Sequence[PathLike] = ()) -> Path:
    """Write a markdown report (title, one "##" section per (heading, markdown), then the figures linked by paths
    relative to the report, so the run directory can be moved or copied) atomically; returns its path."""
    path = Path(path)
    parts = [f"# {title}\n"]
    parts += [f"## {heading}\n\n{body.rstrip()}\n" for heading, body in sections]
    if figures:
        links = [f"![{Path(f).stem}]({Path(os.path.relpath(Path(f).resolve(), path.parent.resolve())).as_posix()})"
                 for f in figures]
        parts.append("## Figures\n\n" + "\n\n".join(links) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(parts))
    return path
