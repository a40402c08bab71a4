"""UK Biobank disease labels (ViTa Appendix F) from the tabular export: ICD-10 diagnoses (field 41270) and, for
high blood pressure, the touchscreen self-report (6150); -1 where the subject has no usable information."""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_prep.ukb import fields as U
from data_prep.ukb.csv_export import column_map
from data_prep.ukb.feature_spec import DEFAULT_SELF_REPORT_INSTANCES, TabularSpec, default_feature_spec


def disease_table(df: pd.DataFrame, spec: TabularSpec | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """(labels int8 (N, D), names): 1 / 0, or -1 where the subject has no valid diagnostic information.

    Labels come from ``fields.disease_labels`` with the union of every ``41270-*`` column (ICD-10
    codes) and the 6150 self-report answers of the spec's instances (default 0 and 2). Unknown (-1) rule:
    * cad / infarct / hypertension / diabetes / stroke: -1 iff the subject has no 41270 entry at all (no
      hospital record; the paper uses only subjects with valid diagnostic entries);
    * high_blood_pressure: 1 on any positive evidence (hypertension ICD-10 code or 6150 == 4); else 0 if
      6150 holds a valid answer (a code >= 0 or -7 "none of the above") at one of the instances; else -1.
    Names / order: the spec's ``diseases`` (default ``fields.DISEASE_LABELS``).
    """
    if spec is not None and spec.diseases:
        diseases = spec.diseases
        missing_codes = set(spec.missing_codes)
    else:
        diseases = default_feature_spec().diseases
        missing_codes = set(U.MISSING_LIKE_CODES)
    names = tuple(d.name for d in diseases)
    sr_inst = spec.self_report_instances if spec is not None and spec.diseases else DEFAULT_SELF_REPORT_INSTANCES
    cmap = column_map(df.columns)
    icd_cols = [c for (fid, _), cols in sorted(cmap.items()) if fid == U.ICD10_FIELD for _, c in cols]
    sr_cols = [c for inst in sr_inst for _, c in cmap.get((U.SELF_REPORT_FIELD, inst), [])]
    n = len(df)
    icd = df[icd_cols].to_numpy(dtype=object) if icd_cols else np.empty((n, 0), dtype=object)
    sr = (np.column_stack([pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64) for c in sr_cols])
          if sr_cols else np.empty((n, 0)))
    real_special = [c for c in U.SPECIAL_CODES if c not in missing_codes]
    sr_valid = (np.isfinite(sr) & ((sr >= 0) | np.isin(sr, real_special))).any(axis=1)
    out = np.full((n, len(names)), -1, dtype=np.int8)
    for i in range(n):
        codes = [c for c in icd[i] if not pd.isna(c) and U.normalize_icd10(c) is not None]
        reported = [x for x in sr[i] if np.isfinite(x)]
        lab = U.disease_labels(codes, reported)
        for k, name in enumerate(names):
            if name == "high_blood_pressure":
                out[i, k] = 1 if lab[name] else (0 if sr_valid[i] else -1)
            elif codes:
                out[i, k] = int(lab[name])
    return out, names
