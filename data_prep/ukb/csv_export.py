"""Reading a UK Biobank tabular export (the ukbconv / RAP CSV: ``eid`` + ``FIELD-INSTANCE.ARRAY`` columns) as
it really comes: duplicated and pandas-mangled headers, junk columns, non-numeric cells, duplicate or
withdrawn (negative) eids, ~500k rows read in chunks. Everything found wrong is counted in a ``CsvReport``
(for the manifest and the quarantine list); nothing is dropped silently.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import pandas as pd

from core.config import InputFileError
from data_prep.ukb import fields as U
from data_prep.ukb.feature_spec import DEFAULT_SELF_REPORT_INSTANCES, TabularSpec


@dataclass
class CsvReport:
    """What ``read_ukb_csv`` found wrong or ignored (for the manifest / quarantine).

    * ``duplicated_columns``: header -> number of copies (the first copy in file order is kept; a
      pandas-mangled ``X.1`` header written back to disk counts as a copy of ``X``).
    * ``conflicting_cells``: header -> number of rows where a later copy disagrees with the first
      (only columns with disagreements; only loaded columns are compared).
    * ``unknown_columns``: well-formed ``FIELD-INSTANCE.ARRAY`` columns that are neither catalogued nor
      used by the spec (not loaded). ``junk_columns``: malformed headers (``f.eid``, ...), not loaded.
    * ``duplicate_eids``: eids on more than one row: ALL their rows are dropped (errors, not merged).
    * ``bad_eid_lines``: 1-based file line numbers whose eid is not an integer (dropped).
    * ``withdrawn_eids``: negative eids (UK Biobank's withdrawn participants), dropped.
    * ``bad_cells``: column -> number of non-empty cells that are not finite numbers (set missing).
    """

    path: str
    n_rows: int = 0
    n_subjects: int = 0
    n_columns: int = 0
    duplicated_columns: dict[str, int] = field(default_factory=dict)
    conflicting_cells: dict[str, int] = field(default_factory=dict)
    unknown_columns: list[str] = field(default_factory=list)
    junk_columns: list[str] = field(default_factory=list)
    duplicate_eids: list[int] = field(default_factory=list)
    bad_eid_lines: list[int] = field(default_factory=list)
    withdrawn_eids: list[int] = field(default_factory=list)
    bad_cells: dict[str, int] = field(default_factory=dict)

    @property
    def n_conflicting_cells(self) -> int:
        return sum(self.conflicting_cells.values())

    @property
    def n_bad_cells(self) -> int:
        return sum(self.bad_cells.values())

    def errors(self) -> list[str]:
        """Row-level problems that removed subjects (for the quarantine list)."""
        out = [f"eid {e}: on more than one row of {self.path}; all its rows dropped" for e in self.duplicate_eids]
        out += [f"{self.path}:{ln}: eid is not an integer; row dropped" for ln in self.bad_eid_lines]
        return out

    def warnings(self) -> list[str]:
        out = []
        for c, k in self.conflicting_cells.items():
            out.append(f"column {c!r}: {self.duplicated_columns.get(c, 2)} copies disagree in {k} rows; "
                       "first copy kept")
        for c, k in self.bad_cells.items():
            out.append(f"column {c!r}: {k} non-numeric cells set missing")
        if self.withdrawn_eids:
            out.append(f"{len(self.withdrawn_eids)} withdrawn (negative) eids dropped")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "n_rows": self.n_rows, "n_subjects": self.n_subjects,
                "n_columns": self.n_columns, "duplicated_columns": dict(self.duplicated_columns),
                "conflicting_cells": dict(self.conflicting_cells), "n_conflicting_cells": self.n_conflicting_cells,
                "unknown_columns": list(self.unknown_columns), "junk_columns": list(self.junk_columns),
                "duplicate_eids": list(self.duplicate_eids), "bad_eid_lines": list(self.bad_eid_lines),
                "withdrawn_eids": list(self.withdrawn_eids), "bad_cells": dict(self.bad_cells),
                "n_bad_cells": self.n_bad_cells}


_MANGLED_RE = re.compile(r"(.+)\.([1-9][0-9]*)")
_EID_RE = re.compile(r"-?[0-9]{1,18}")  # fits int64


def _wanted_pairs(spec: TabularSpec | None) -> set[tuple[int, int]]:
    pairs = set(U.FIELD_BY_KEY)
    pairs |= {(U.SELF_REPORT_FIELD, i) for i in DEFAULT_SELF_REPORT_INSTANCES}
    if spec is not None:
        pairs |= spec.field_instances()
    return pairs


def _is_text_column(name: str) -> bool:
    fid, inst, _ = U.parse_column(name)
    f = U.FIELD_BY_KEY.get((fid, inst))
    return f is not None and f.dtype in ("str", "date")


def _to_numeric(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Stripped strings -> float64 (NaN for empty / junk) and the mask of junk (non-empty, not finite)."""
    s = s.fillna("").astype(str).str.strip()
    empty = (s == "").to_numpy()
    num = np.array(pd.to_numeric(s.where(~empty), errors="coerce"), dtype=np.float64)  # a writable copy
    bad = ~empty & ~np.isfinite(num)
    num[bad] = np.nan
    return num, bad


def _to_text(s: pd.Series) -> np.ndarray:
    s = s.fillna("").astype(str).str.strip()
    out = np.array(s, dtype=object)
    out[(s == "").to_numpy()] = None
    return out


def read_ukb_csv(path: str | Path, spec: TabularSpec | None = None, *,
                 conflict: Literal["first", "missing"] = "first",
                 chunksize: int = 50_000) -> tuple[pd.DataFrame, CsvReport]:
    """Read a UK Biobank (ukbconv) CSV into a frame indexed by ``eid`` (int64, sorted ascending).

    Loaded columns: every catalogued ``FIELD-INSTANCE.ARRAY`` column (any array index) plus the
    (field, instance) pairs the spec uses; numeric columns as float64 (NaN = missing), the text ones
    (41270 ICD-10 codes, dates) as strings (pandas' string dtype under pandas >= 3, object before;
    missing = NaN / None). Everything else is reported, not loaded.
    Duplicated headers: the first copy in file order is kept (``conflict="missing"`` instead blanks the
    cells where copies disagree); disagreements are counted per column. The header is read by the csv
    module, so pandas never renames duplicates; ``X.1``-style headers already in the file are recognised
    as copies of ``X``. Rows are read in chunks of ``chunksize`` (a real export has ~500k rows).
    """
    path = Path(path)
    if conflict not in ("first", "missing"):
        raise ValueError(f"conflict must be 'first' or 'missing', got {conflict!r}")
    report = CsvReport(path=str(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
    except OSError as e:
        raise InputFileError(f"{path}: cannot read the UK Biobank CSV ({e.strerror or e})") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputFileError(f"{path}: not a UTF-8 text CSV ({type(e).__name__}: {e})") from e
    if not header:
        raise InputFileError(f"{path}: empty file (no header)")
    header = [h.strip() for h in header]
    report.n_columns = len(header)
    if "eid" not in header:
        raise InputFileError(f"{path}: no 'eid' column in the header (first columns: {header[:5]})")
    wanted = _wanted_pairs(spec)

    first: dict[str, int] = {}  # header -> position of its first copy
    copies: dict[str, list[int]] = {}  # header -> positions of the later copies
    keep: list[str] = []  # loaded data columns (first copies), in file order
    for j, name in enumerate(header):
        if name in first:
            copies.setdefault(name, []).append(j)
            continue
        if name == "eid":
            first[name] = j
            continue
        try:
            fid, inst, _ = U.parse_column(name)
        except ValueError:
            m = _MANGLED_RE.fullmatch(name)
            if m and m.group(1) in first:
                copies.setdefault(m.group(1), []).append(j)
            else:
                report.junk_columns.append(name)
            continue
        first[name] = j
        if (fid, inst) in wanted:
            keep.append(name)
        else:
            report.unknown_columns.append(name)
    report.duplicated_columns = {c: 1 + len(p) for c, p in copies.items()}
    loaded = {"eid", *keep}
    positions = sorted({first[c] for c in loaded} | {p for c in loaded for p in copies.get(c, [])})
    text_cols = {c for c in keep if _is_text_column(c)}

    parts: dict[str, list[np.ndarray]] = {c: [] for c in ["eid", *keep]}
    bad_counts: dict[str, int] = {}
    conflicts: dict[str, int] = {}
    n_rows = 0
    try:
        reader = pd.read_csv(path, header=None, skiprows=1, usecols=positions, dtype=str, keep_default_na=False,
                             na_filter=False, chunksize=max(1, int(chunksize)), encoding="utf-8",
                             skip_blank_lines=True)
        with reader:
            for chunk in reader:
                n_rows += len(chunk)
                for c in ["eid", *keep]:
                    col = chunk[first[c]]
                    if c == "eid" or c in text_cols:
                        val = _to_text(col)
                        others = [_to_text(chunk[p]) for p in copies.get(c, [])]
                        same = [(o == val) | (pd.isna(o) & pd.isna(val)) for o in others]
                    else:
                        val, bad = _to_numeric(col)
                        if bad.any():
                            bad_counts[c] = bad_counts.get(c, 0) + int(bad.sum())
                        others = [_to_numeric(chunk[p])[0] for p in copies.get(c, [])]
                        same = [(o == val) | (np.isnan(o) & np.isnan(val)) for o in others]
                    if same:
                        disagree = ~np.logical_and.reduce(same)
                        if disagree.any():
                            conflicts[c] = conflicts.get(c, 0) + int(disagree.sum())
                            if conflict == "missing" and c != "eid":
                                val = val.copy()
                                val[disagree] = None if val.dtype == object else np.nan
                    parts[c].append(val)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path}: cannot parse the CSV: {e}") from e
    report.n_rows = n_rows
    report.bad_cells = {c: bad_counts[c] for c in keep if c in bad_counts}
    report.conflicting_cells = {c: conflicts[c] for c in ["eid", *keep] if c in conflicts}

    def cat(c: str) -> np.ndarray:
        if parts[c]:
            return np.concatenate(parts[c])
        return np.empty(0, dtype=object if (c == "eid" or c in text_cols) else np.float64)

    eid_text = cat("eid")
    eids = np.zeros(len(eid_text), dtype=np.int64)
    ok = np.zeros(len(eid_text), dtype=bool)
    for i, t in enumerate(eid_text):
        if t is not None and _EID_RE.fullmatch(t):
            eids[i], ok[i] = int(t), True
        else:
            report.bad_eid_lines.append(i + 2)  # 1-based, after the header line
    report.withdrawn_eids = sorted(int(e) for e in eids[ok & (eids < 0)])
    ok &= eids >= 0
    uniq, counts = np.unique(eids[ok], return_counts=True)
    dup = uniq[counts > 1]
    report.duplicate_eids = [int(e) for e in dup]
    ok &= ~np.isin(eids, dup)

    order = np.flatnonzero(ok)
    order = order[np.argsort(eids[order], kind="stable")]
    data = {c: cat(c)[order] for c in keep}
    df = pd.DataFrame(data, index=pd.Index(eids[order], name="eid", dtype=np.int64), columns=keep)
    report.n_subjects = len(df)
    return df, report


def column_map(columns: Iterable[str]) -> dict[tuple[int, int], list[tuple[int, str]]]:
    """(field, instance) -> [(array, column)] sorted by array, of the well-formed FIELD-INSTANCE.ARRAY columns."""
    out: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for c in columns:
        try:
            fid, inst, arr = U.parse_column(str(c))
        except ValueError:
            continue
        out.setdefault((fid, inst), []).append((arr, str(c)))
    for v in out.values():
        v.sort()
    return out
