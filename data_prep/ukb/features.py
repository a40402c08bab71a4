"""UK Biobank tabular features for Stage II: raw extraction by the feature spec, normalisation statistics fitted
on the training split only, encoding, and the schema the tabular encoder reads::

    raw = extract_features(df, spec)                           # (N, F) float64, NaN = missing
    stats = fit_stats(raw, spec, train_mask, df.index)         # training split only
    values, missing = encode(raw, spec, stats)                 # (N, F) float32, (N, F) bool
    schema = feature_schema(spec)                              # manifest + tabular encoder embeddings

Normalisation (ViTa Sec. 4.1): numerical features are z-scored with the training split's mean / std
(population std over the present training values; a degenerate std < ``std_floor`` is replaced by 1, so
such a feature is only centred) and missing entries are imputed with the training mean, i.e. 0 after
z-scoring ("Missing entries are imputed with the mean feature value"); categorical / binary features
keep their integer index (stored as float32 in the same vector) and missing entries take the training
mode. The missingness mask is kept, so the tabular encoder can use a learned "missing" token instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from core.format import normalise_tabular
from data_prep.ukb import fields as U
from data_prep.ukb.csv_export import column_map
from data_prep.ukb.feature_spec import KINDS, FeatureSpec, TabularSpec

STATS_FORMAT = "cmrfm-tabular-stats"
STATS_SCHEMA_VERSION = 1


@dataclass
class ExtractReport:
    """``absent``: feature -> the ``FIELD-INSTANCE`` keys it reads that have no column in the frame;
    ``invalid``: feature -> number of cells with values that are neither valid nor a missing code
    (an uncoded category, a negative value in an unsigned field), treated as missing."""

    absent: dict[str, list[str]] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"absent": {k: list(v) for k, v in self.absent.items()}, "invalid": dict(self.invalid)}


def _block(df: pd.DataFrame, cols: list[tuple[int, str]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, A) float64 values of the array columns (column a = array index a; NaN where no column)."""
    if not cols:
        return np.full((n, 0), np.nan), np.zeros(0, dtype=np.int64)
    arrays = np.array([a for a, _ in cols])
    vals = np.full((n, int(arrays.max()) + 1), np.nan)
    for a, c in cols:
        vals[:, a] = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64)
    return vals, arrays


def _clean_numerical(x: np.ndarray, f: FeatureSpec, missing: np.ndarray) -> tuple[np.ndarray, int]:
    out = x.copy()
    sv = dict(f.special_values)
    special = np.isin(x, list(sv)) if sv else np.zeros(x.shape, bool)
    for code, value in sv.items():
        out[x == code] = value
    if f.signed:
        return out, 0
    neg = (x < 0) & ~special
    invalid = int((neg & ~np.isin(x, missing)).sum())
    out[neg] = np.nan
    return out, invalid


def _clean_codes(x: np.ndarray, f: FeatureSpec, missing: np.ndarray) -> tuple[np.ndarray, int]:
    out = np.full(x.shape, np.nan)
    for k, code in enumerate(f.codes):
        out[x == code] = k
    invalid = int((np.isfinite(x) & np.isnan(out) & ~np.isin(x, missing)).sum())
    return out, invalid


def _first_valid(per_instance: list[np.ndarray], n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    for v in per_instance:
        take = np.isnan(out) & ~np.isnan(v)
        out[take] = v[take]
    return out


def extract_features_with_report(df: pd.DataFrame, spec: TabularSpec) -> tuple[np.ndarray, ExtractReport]:
    """``extract_features`` plus what was absent / invalid (see ``ExtractReport``)."""
    n = len(df)
    cmap = column_map(df.columns)
    missing = np.asarray(spec.missing_codes, dtype=np.float64)
    real_special = np.asarray([c for c in U.SPECIAL_CODES if c not in spec.missing_codes], dtype=np.float64)
    raw = np.full((n, len(spec.features)), np.nan)
    report = ExtractReport()
    for j, f in enumerate(spec.features):
        absent = [f"{fid}-{inst}" for fid in f.fields for inst in f.instances if (fid, inst) not in cmap]
        # a field exists at only some instances in UK Biobank: report it absent only if it is absent at all
        present_fields = {fid for fid in f.fields for inst in f.instances if (fid, inst) in cmap}
        absent = [a for a in absent if int(a.split("-")[0]) not in present_fields]
        if absent:
            report.absent[f.name] = absent
        invalid = 0
        if f.reduce in ("value", "mean"):
            per_inst = []
            for inst in f.instances:
                vals, _ = _block(df, cmap.get((f.fields[0], inst), []), n)
                if f.reduce == "value":
                    vals = vals[:, :1] if vals.shape[1] else np.full((n, 1), np.nan)
                if f.kind == "numerical":
                    vals, bad = _clean_numerical(vals, f, missing)
                else:
                    vals, bad = _clean_codes(vals, f, missing)
                invalid += bad
                if f.reduce == "mean":
                    with np.errstate(invalid="ignore"):
                        cnt = (~np.isnan(vals)).sum(axis=1)
                        v = np.where(cnt > 0, np.nansum(vals, axis=1) / np.maximum(cnt, 1), np.nan)
                else:
                    v = vals[:, 0]
                per_inst.append(v)
            raw[:, j] = _first_valid(per_inst, n)
        else:
            match = np.asarray(f.match, dtype=np.float64)
            found = np.zeros((n, len(f.match)), dtype=bool)
            answered = np.zeros(n, dtype=bool)
            for fid in f.fields:
                for inst in f.instances:
                    vals, _ = _block(df, cmap.get((fid, inst), []), n)
                    if not vals.shape[1]:
                        continue
                    for k, code in enumerate(match):
                        found[:, k] |= (vals == code).any(axis=1)
                    # a valid answer: a code >= 0 or a real special answer (-7 none of the above, ...)
                    ok = np.isfinite(vals) & ~np.isin(vals, missing)
                    ok_answer = ok & ((vals >= 0) | np.isin(vals, real_special))
                    invalid += int((ok & ~ok_answer).sum())
                    answered |= ok_answer.any(axis=1)
            if f.reduce == "any_code":
                raw[:, j] = np.where(found.any(axis=1), 1.0, np.where(answered, 0.0, np.nan))
            else:  # count_codes
                raw[:, j] = found.sum(axis=1).astype(np.float64)
        if invalid:
            report.invalid[f.name] = invalid
    return raw, report


def extract_features(df: pd.DataFrame, spec: TabularSpec) -> np.ndarray:
    """(N, F) float64 raw features in spec order: numerical values in their units, categorical / binary
    features as contiguous indices 0..K-1 (as floats), NaN = missing. Rows follow ``df`` (``read_ukb_csv``)."""
    return extract_features_with_report(df, spec)[0]


@dataclass(frozen=True)
class TabularStats:
    """Per-feature normalisation statistics fitted on the training split.

    numerical: ``mean`` / ``std`` (population std of the present training values; a std below
    ``std_floor`` is stored as 1.0, i.e. the feature is only centred; no training value at all -> 0 / 1);
    categorical / binary: ``mode`` (index; ties -> the smaller index; 0 without training values) and
    ``category_counts``. ``version``: sha256 prefix of (the spec's feature hash, the sorted training eids,
    their raw values), so it changes whenever the statistics could.
    """

    version: str
    spec_hash: str
    n_train: int
    names: tuple[str, ...]
    kinds: tuple[str, ...]
    mean: tuple[float | None, ...]
    std: tuple[float | None, ...]
    mode: tuple[int | None, ...]
    n_present: tuple[int, ...]
    category_counts: tuple[tuple[int, ...], ...]
    std_floor: float = 1e-6

    def to_dict(self) -> dict[str, Any]:
        feats = []
        for i, name in enumerate(self.names):
            d: dict[str, Any] = {"name": name, "kind": self.kinds[i], "n_present": self.n_present[i]}
            if self.kinds[i] == "numerical":
                d["mean"], d["std"] = self.mean[i], self.std[i]
            else:
                d["mode"], d["category_counts"] = self.mode[i], list(self.category_counts[i])
            feats.append(d)
        return {"format": STATS_FORMAT, "schema": STATS_SCHEMA_VERSION, "version": self.version,
                "spec_hash": self.spec_hash, "n_train": self.n_train, "std_floor": self.std_floor, "features": feats}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TabularStats":
        if not isinstance(d, Mapping) or d.get("format") != STATS_FORMAT or d.get("schema") != STATS_SCHEMA_VERSION:
            raise ValueError(f"not a {STATS_FORMAT} v{STATS_SCHEMA_VERSION} mapping")
        feats = d["features"]
        kinds = tuple(f["kind"] for f in feats)
        if any(k not in KINDS for k in kinds):
            raise ValueError(f"bad feature kinds in statistics: {sorted(set(kinds) - set(KINDS))}")
        num = [k == "numerical" for k in kinds]
        return cls(
            version=str(d["version"]), spec_hash=str(d["spec_hash"]), n_train=int(d["n_train"]),
            names=tuple(str(f["name"]) for f in feats), kinds=kinds,
            mean=tuple(float(f["mean"]) if m else None for f, m in zip(feats, num)),
            std=tuple(float(f["std"]) if m else None for f, m in zip(feats, num)),
            mode=tuple(None if m else int(f["mode"]) for f, m in zip(feats, num)),
            n_present=tuple(int(f["n_present"]) for f in feats),
            category_counts=tuple(() if m else tuple(int(c) for c in f["category_counts"]) for f, m in zip(feats, num)),
            std_floor=float(d.get("std_floor", 1e-6)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "TabularStats":
        return cls.from_dict(json.loads(text))


def _check_raw(raw: np.ndarray, spec: TabularSpec) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[1] != len(spec.features):
        raise ValueError(f"raw features must be (N, {len(spec.features)}) for {spec.source}, got {raw.shape}")
    if np.isinf(raw).any():
        raise ValueError("raw features contain infinite values (missing must be NaN)")
    for j, f in enumerate(spec.features):
        if f.kind != "numerical":
            col = raw[:, j]
            v = col[~np.isnan(col)]
            if v.size and (np.any(v != np.round(v)) or v.min() < 0 or v.max() >= f.num_categories):
                raise ValueError(f"feature {f.name!r}: categorical indices outside 0..{f.num_categories - 1}")
    return raw


def fit_stats(raw: np.ndarray, spec: TabularSpec, train_mask: np.ndarray, eids: Sequence[int],
              std_floor: float = 1e-6) -> TabularStats:
    """Fit normalisation statistics on the rows of ``raw`` where ``train_mask`` is True.

    ``eids`` (aligned with the rows, e.g. ``df.index``) identify the training subjects for the version hash.
    """
    raw = _check_raw(raw, spec)
    train_mask = np.asarray(train_mask, dtype=bool)
    eids = np.asarray(eids, dtype=np.int64)
    if train_mask.shape != (raw.shape[0],) or eids.shape != (raw.shape[0],):
        raise ValueError(f"train_mask {train_mask.shape} and eids {eids.shape} must be ({raw.shape[0]},)")
    tr = raw[train_mask]
    tr_eids = eids[train_mask]
    if len(np.unique(tr_eids)) != len(tr_eids):
        raise ValueError("duplicate eids among the training rows")
    means, stds, modes, present, counts = [], [], [], [], []
    for j, f in enumerate(spec.features):
        v = tr[:, j][~np.isnan(tr[:, j])]
        present.append(int(v.size))
        if f.kind == "numerical":
            m = float(v.mean()) if v.size else 0.0
            s = float(v.std()) if v.size else 1.0
            means.append(m)
            stds.append(s if s >= std_floor else 1.0)
            modes.append(None)
            counts.append(())
        else:
            c = np.bincount(v.astype(np.int64), minlength=f.num_categories)[: f.num_categories]
            means.append(None)
            stds.append(None)
            modes.append(int(np.argmax(c)) if v.size else 0)
            counts.append(tuple(int(x) for x in c))
    order = np.argsort(tr_eids, kind="stable")
    h = hashlib.sha256()
    h.update(json.dumps({"stats_schema": STATS_SCHEMA_VERSION, "spec": spec.feature_hash(),
                         "std_floor": std_floor}).encode())
    h.update(np.ascontiguousarray(tr_eids[order]).astype("<i8").tobytes())
    canon = np.where(np.isnan(tr[order]), np.nan, tr[order])  # one NaN bit pattern
    h.update(np.ascontiguousarray(canon).astype("<f8").tobytes())
    return TabularStats(version=h.hexdigest()[:16], spec_hash=spec.feature_hash(), n_train=int(train_mask.sum()),
                        names=spec.names, kinds=tuple(f.kind for f in spec.features), mean=tuple(means),
                        std=tuple(stds), mode=tuple(modes), n_present=tuple(present), category_counts=tuple(counts),
                        std_floor=std_floor)


def encode(raw: np.ndarray, spec: TabularSpec, stats: TabularStats) -> tuple[np.ndarray, np.ndarray]:
    """(values float32 (N, F), missing bool (N, F)): numerical z-scored with the training statistics and
    missing -> 0 (= the training mean); categorical / binary indices, missing -> the training mode."""
    raw = _check_raw(raw, spec)
    if stats.spec_hash != spec.feature_hash() or stats.names != spec.names:
        raise ValueError(f"statistics {stats.version} were fitted for another feature spec than {spec.source}")
    return normalise_tabular(raw, stats.to_dict())  # the one implementation, shared with the loaders


def feature_schema(spec: TabularSpec) -> list[dict[str, Any]]:
    """Per feature (in vector order): index, name, kind, fields, instances, reduce, num_categories
    (0 numerical, 2 binary, K categorical), codes (index -> UK Biobank code), match, unit."""
    out = []
    for j, f in enumerate(spec.features):
        out.append({"index": j, "name": f.name, "kind": f.kind, "fields": list(f.fields),
                    "instances": list(f.instances), "reduce": f.reduce, "num_categories": f.num_categories,
                    "codes": list(f.codes) if f.kind != "numerical" and f.reduce == "value" else [],
                    "match": list(f.match), "unit": f.unit})
    return out
