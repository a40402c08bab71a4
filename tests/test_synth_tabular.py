"""Synthetic UK Biobank tabular export (data_prep/synth/tabular.py) and the field catalogue (data_prep/ukb/fields.py)."""

from __future__ import annotations

import csv
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from core.vocab import DISEASES
from data_prep.ukb import fields as U
from data_prep.synth import tabular as T
from data_prep.synth.physiology import cohort_eids, sample_subject, subject_rng

SEED = 11
N = 300

# ViTa Appendix F, copied from the paper
PAPER_APPENDIX_F = {
    "cad": "I200, I201, I208, I209, I220, I221, I228, I229, I210, I211, I212, I213, I214, I219, I240, I248, I249, "
           "I250, I251, I252, I253, I254, I255, I256, I258, I259",
    "stroke": "I630, I631, I632, I633, I634, I635, I636, I638, I639",
    "hypertension": "I10, I110, I119, I120, I129, I130, I131, I132, I139, I150, I151, I152, I158, I159",
    "infarct": "I210, I211, I212, I213, I214, I219, I252",
    "diabetes": "E100, E101, E102, E103, E104, E105, E106, E107, E108, E109, E110, E111, E112, E113, E114, E115, "
                "E116, E117, E118, E119, E121, E123, E125, E128, E129, E130, E131, E132, E133, E134, E135, E136, "
                "E137, E138, E139, E140, E141, E142, E143, E144, E145, E146, E147, E148, E149",
}


def fake_phenotypes(s) -> dict[str, float]:
    """Stand-in for the volumes the lead's code measures from the label maps."""
    lvesv = s.lvedv_ml * (1 - s.lvef_pct / 100)
    rvesv = s.rvedv_ml * (1 - s.rvef_pct / 100)
    return {"LVEDV": s.lvedv_ml, "LVESV": lvesv, "LVSV": s.lvedv_ml - lvesv, "LVEF": s.lvef_pct,
            "LVM": 1.05 * s.bsa_m2 * (65.0 if s.sex else 52.0) * s.lv_wall_mm / (6.0 if s.sex else 5.1),
            "RVEDV": s.rvedv_ml, "RVESV": rvesv, "RVSV": s.rvedv_ml - rvesv, "RVEF": s.rvef_pct,
            "LAVmax": s.lav_max_ml, "LAVmin": s.lav_min_ml, "RAVmax": s.rav_max_ml, "RAVmin": s.rav_min_ml}


def build(seed: int = SEED, n: int = N):
    subjects = [sample_subject(e, subject_rng(seed, e, 0), prevalence_scale=2.0) for e in cohort_eids(n, seed)]
    rows = [T.tabular_row(s, fake_phenotypes(s), subject_rng(seed, s.eid, T.TABULAR_STREAM)) for s in subjects]
    return subjects, rows


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    subjects, rows = build()
    out = tmp_path_factory.mktemp("tab")
    T.write_tabular_csv(out, rows, seed=SEED)  # a directory -> <dir>/ukb_tabular.csv
    path = out / T.TABULAR_CSV_NAME
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    return {"subjects": subjects, "rows": rows, "path": path, "dir": out, "header": table[0], "data": table[1:]}


def _cells(cohort, column: str) -> list[str]:
    """The first copy of a column, as strings ('' = empty)."""
    j = cohort["header"].index(column)
    return [r[j] for r in cohort["data"]]


def _floats(cohort, column: str) -> np.ndarray:
    return np.array([float(v) if v != "" else np.nan for v in _cells(cohort, column)])


def _row_values(cohort, i: int, field: int, instances=(0, 1, 2, 3)) -> list[str]:
    out = []
    for j, c in enumerate(cohort["header"]):
        try:
            fid, inst, _ = U.parse_column(c)
        except ValueError:
            continue
        if fid == field and inst in instances and cohort["data"][i][j] != "":
            out.append(cohort["data"][i][j])
    return out


# --------------------------------------------------------------------------------------------------------
# catalogue
# --------------------------------------------------------------------------------------------------------
def test_catalogue_unique_field_instance_pairs():
    keys = [(f.field_id, f.instance) for f in U.FIELDS]
    assert len(keys) == len(set(keys))
    assert set(U.FIELD_BY_KEY) == set(keys)
    for f in U.FIELDS:
        assert f.instance in (0, 2) and f.arrays >= 1 and f.name
        if f.kind in ("binary", "categorical") and f.field_id != U.ICD10_FIELD:
            assert f.coding, f.field_id
        assert all(c in U.SPECIAL_CODES for c in f.special)


def test_catalogue_appendix_f_exact():
    for disease, text in PAPER_APPENDIX_F.items():
        assert U.ICD10_DISEASES[disease] == frozenset(c.strip() for c in text.split(",")), disease
    assert U.ALL_APPENDIX_F_CODES == frozenset().union(*U.ICD10_DISEASES.values())
    assert set(U.DISEASE_LABELS) == set(DISEASES)
    assert not set(T.ICD10_NOISE_CODES) & U.ALL_APPENDIX_F_CODES
    assert all("." not in c for c in U.ALL_APPENDIX_F_CODES)


def test_catalogue_appendix_d():
    feats = U.APPENDIX_D_FEATURES
    assert len(feats) == 117
    assert Counter(s.kind for s in feats.values()) == {"numerical": 67, "binary": 18, "categorical": 32}
    for name, src in feats.items():
        for fid in src.fields:
            assert any((fid, i) in U.FIELD_BY_KEY for i in src.instances), name
    assert feats["Systolic blood pressure (mean)"] == U.FeatureSource("numerical", (4080,), (2,), "mean")
    # LA phenotypes are not pretraining features (paper, section 4.1)
    assert not any(fid in range(24110, 24118) for s in feats.values() for fid in s.fields)


def test_column_name_roundtrip_and_parse_errors():
    assert U.column_name(4080, 2, 1) == "4080-2.1"
    assert U.parse_column("4080-2.1") == (4080, 2, 1)
    assert U.parse_column("41270-0.15") == (41270, 0, 15)
    for bad in ["eid", "4080-2", "4080_2.1", "4080-2.1.1", "f.4080.2.1", " 31-0.0", "031-0.0", "", "31-0.0 ",
                "a-0.0", "31--0.0"]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            U.parse_column(bad)
    with pytest.raises(ValueError):
        U.parse_column(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        U.column_name(31, -1, 0)
    assert U.lookup_column("53-0.0") is None  # well formed, not catalogued
    assert U.lookup_column("4080-2.5") is None  # beyond the catalogue's arrays
    assert U.lookup_column("4080-2.1").field_id == 4080


def test_disease_labels_rule():
    none = U.disease_labels([], [])
    assert set(none) == set(DISEASES) and not any(none.values())
    lab = U.disease_labels(["I21.9", " e11.9", None, float("nan"), "K219"], [4.0, float("nan"), -7])
    assert lab == {"cad": True, "infarct": True, "hypertension": False, "high_blood_pressure": True,
                   "diabetes": True, "stroke": False}
    assert U.disease_labels(["I10"], [-7])["high_blood_pressure"]  # hypertension code alone suffices
    assert U.disease_labels(["I251"], [])["cad"] and not U.disease_labels(["I251"], [])["infarct"]
    assert not U.disease_labels(["I25"], ["-3"])["cad"]  # exact codes, not prefixes


# --------------------------------------------------------------------------------------------------------
# the synthetic export
# --------------------------------------------------------------------------------------------------------
def test_rows_have_constant_columns(cohort):
    assert all(tuple(r) == T.ROW_COLUMNS for r in cohort["rows"])
    assert len(T.ROW_COLUMNS) == 246
    assert all(len(r) == len(cohort["header"]) for r in cohort["data"])
    assert len(cohort["data"]) == N


def test_header_eid_pattern_junk_and_order(cohort):
    header = cohort["header"]
    assert header[0] == "eid"
    malformed = set()
    parsed = []
    for c in header[1:]:
        try:
            parsed.append(U.parse_column(c))
        except ValueError:
            malformed.add(c)
    assert malformed == set(T.JUNK_COLUMNS)
    uncatalogued = {c for c in header[1:] if c not in malformed and U.lookup_column(c) is None}
    assert uncatalogued == set(T.UNCATALOGUED_COLUMNS)
    assert parsed != sorted(parsed)  # basket order, not sorted
    assert [c for c in header if c == "eid"] == ["eid"]
    eids = [int(v) for v in _cells(cohort, "eid")]
    assert eids == [s.eid for s in cohort["subjects"]]


def test_duplicated_headers(cohort):
    header = cohort["header"]
    dups = {c: k for c, k in Counter(header).items() if k > 1}
    assert len(dups) == T.N_DUPLICATED_COLUMNS and set(dups.values()) == {2}
    n_conflicting = 0
    for c in dups:
        j0, j1 = [j for j, h in enumerate(header) if h == c]
        diff = sum(r[j0] != r[j1] for r in cohort["data"])
        assert diff < 0.15 * N  # identical or only partly conflicting
        n_conflicting += diff > 0
    assert n_conflicting == 1
    # pandas renames the second copy "<col>.1" -- which is no longer a valid UK Biobank column name
    df = pd.read_csv(cohort["path"])
    for c in dups:
        assert c in df.columns and f"{c}.1" in df.columns
        with pytest.raises(ValueError):
            U.parse_column(f"{c}.1")
    assert len(df) == N and df["eid"].is_unique and df.columns[0] == "eid"
    assert not pd.api.types.is_numeric_dtype(df["53-2.0"])  # dates stay strings


def test_icd10_codes_without_dots_and_appendix_f_consistency(cohort):
    icd_re = re.compile(r"[A-Z][0-9]{2,3}")
    n_with = 0
    for i, s in enumerate(cohort["subjects"]):
        codes = _row_values(cohort, i, U.ICD10_FIELD)
        assert all(icd_re.fullmatch(c) for c in codes), codes
        assert len(codes) == len(set(codes))
        cols = [c for c in cohort["header"] if c.startswith("41270-")]
        filled = [cohort["data"][i][cohort["header"].index(c)] != "" for c in cols]
        assert filled == sorted(filled, reverse=True)  # arrays filled from .0, then empty
        n_with += bool(codes)
        sick = s.cad or s.stroke or s.hypertension or s.diabetes
        if s.cad:
            assert set(codes) & U.ICD10_DISEASES["cad"]
        if not (sick or s.high_blood_pressure):
            assert not set(codes) & U.ALL_APPENDIX_F_CODES
        for d in ("cad", "infarct", "hypertension", "diabetes", "stroke"):
            assert bool(set(codes) & U.ICD10_DISEASES[d]) == getattr(s, d), (s.eid, d, codes)
    assert 0.5 * N < n_with < N  # most, not all, subjects have a hospital record


def test_disease_labels_recover_subject_flags(cohort):
    agree_hbp = 0
    for i, s in enumerate(cohort["subjects"]):
        icd = _row_values(cohort, i, U.ICD10_FIELD)
        sr = _row_values(cohort, i, U.SELF_REPORT_FIELD, instances=(0, 2))
        lab = U.disease_labels(icd, sr)
        for d in ("cad", "infarct", "hypertension", "diabetes", "stroke"):
            assert lab[d] == getattr(s, d), (s.eid, d)
        answered = [v for v in _row_values(cohort, i, U.SELF_REPORT_FIELD, instances=(2,)) if v != "-3"]
        if answered:
            assert lab["high_blood_pressure"] == s.high_blood_pressure, s.eid
        agree_hbp += lab["high_blood_pressure"] == s.high_blood_pressure
    assert agree_hbp >= 0.95 * N
    assert sum(s.cad for s in cohort["subjects"]) >= 5  # the test is not vacuous


def test_values_respect_codings_and_special_codes(cohort):
    header = cohort["header"]
    seen_special: Counter = Counter()
    for j, c in enumerate(header):
        try:
            spec = U.lookup_column(c)
        except ValueError:
            continue
        if spec is None or spec.dtype in ("str", "date"):
            continue
        for r in cohort["data"]:
            v = r[j]
            if v == "":
                continue
            x = float(v)
            if spec.dtype == "int":
                assert x == int(x), (c, v)
                assert spec.allows(int(x)), (c, v)
            if x < 0 and not spec.signed:
                assert int(x) in spec.special, (c, v)
                seen_special[int(x)] += 1
    for code in (-1, -3, -7, -10):
        assert seen_special[code] > 0, code
    assert seen_special[-3] < seen_special[-7]  # "prefer not to answer" stays rare


def test_minus_ten_only_in_intake_fields(cohort):
    fields = set()
    for j, c in enumerate(cohort["header"]):
        if any(r[j] == "-10" for r in cohort["data"]):
            fields.add(U.parse_column(c)[0])
    assert fields and fields <= {1070, 1080, 1090, 1289, 1299}


def test_empty_cells_and_missing_visits(cohort):
    header, data = cohort["header"], cohort["data"]
    n_empty = sum(v == "" for r in data for v in r)
    assert n_empty > 0.05 * len(data) * len(header)
    inst2 = [j for j, c in enumerate(header) if re.fullmatch(r"\d+-2\.\d+", c)]
    visit_missing = [i for i, r in enumerate(data) if all(r[j] == "" for j in inst2)]
    assert 1 <= len(visit_missing) <= 0.1 * N
    # a measured field is not complete, but mostly present
    for col in ("21001-2.0", "4080-2.0", "1558-2.0"):
        frac = np.mean([v != "" for v in _cells(cohort, col)])
        assert 0.8 < frac < 1.0, col
    # LA/RA phenotypes for a minority only, LV ones for most
    la = np.mean([v != "" for v in _cells(cohort, "24110-2.0")])
    lv = np.mean([v != "" for v in _cells(cohort, "24100-2.0")])
    assert 0.02 < la < 0.3 and lv > 0.8


def test_sex_specific_medication_fields(cohort):
    for i, s in enumerate(cohort["subjects"]):
        men, women = _row_values(cohort, i, 6177), _row_values(cohort, i, 6153)
        assert not (women if s.sex else men)
        meds = {int(v) for v in (men or women)}
        if s.insulin and _row_values(cohort, i, 6177 if s.sex else 6153, instances=(2,)) not in (["-1"], ["-3"], []):
            assert 3 in meds


def test_bp_and_physiology_consistency(cohort):
    subjects = cohort["subjects"]
    sbp = np.array([s.sbp_mmhg for s in subjects])
    for col in ("4080-2.0", "4080-2.1"):
        v = _floats(cohort, col)
        m = ~np.isnan(v)
        assert np.corrcoef(v[m], sbp[m])[0, 1] > 0.8, col
    both = np.stack([_floats(cohort, "4080-2.0"), _floats(cohort, "4080-2.1")])
    m = ~np.isnan(both).all(axis=0)
    mean_bp = np.nanmean(both[:, m], axis=0)
    assert np.corrcoef(mean_bp, sbp[m])[0, 1] > 0.9
    # sex, age
    assert [int(v) for v in _cells(cohort, "31-0.0")] == [s.sex for s in subjects]
    age0, age2 = _floats(cohort, "21003-0.0"), _floats(cohort, "21003-2.0")
    m = ~np.isnan(age2)
    assert np.all(age2[m] == np.floor([s.age for s in np.array(subjects)[m]]))
    d = age2 - age0
    assert np.nanmin(d) >= 3 and np.nanmax(d) <= 10
    # derived fields
    h, w, bmi = _floats(cohort, "50-2.0"), _floats(cohort, "21002-2.0"), _floats(cohort, "21001-2.0")
    m = ~np.isnan(h + w + bmi)
    assert np.allclose(bmi[m], w[m] / (h[m] / 100) ** 2, atol=1e-3)
    sv, hr, co = _floats(cohort, "22423-2.0"), _floats(cohort, "22426-2.0"), _floats(cohort, "22424-2.0")
    m = ~np.isnan(sv + hr + co)
    assert m.sum() > 0.5 * N and np.allclose(co[m], sv[m] * hr[m] / 1000, atol=0.006)
    edv, esv, sv_b, ef_b = (_floats(cohort, f"2410{k}-2.0") for k in range(4))
    m = ~np.isnan(edv + esv + sv_b + ef_b)
    assert np.allclose(sv_b[m], edv[m] - esv[m], atol=0.011)
    assert np.allclose(ef_b[m], 100 * sv_b[m] / edv[m], atol=0.02)
    lvedv = np.array([s.lvedv_ml for s in subjects])
    assert np.corrcoef(edv[m], lvedv[m])[0, 1] > 0.95
    fat, ffm, wt = _floats(cohort, "23100-2.0"), _floats(cohort, "23101-2.0"), _floats(cohort, "21002-2.0")
    m = ~np.isnan(fat + ffm + wt)
    assert np.allclose(fat[m] + ffm[m], wt[m], atol=0.11)


def test_byte_identical_and_seed_dependent(cohort, tmp_path):
    _, rows = build()
    again = tmp_path / "again.csv"
    T.write_tabular_csv(again, rows, seed=SEED)
    assert again.read_bytes() == cohort["path"].read_bytes()
    other = tmp_path / "other.csv"
    T.write_tabular_csv(other, rows, seed=SEED + 1)  # same rows, other column order / duplicates
    assert other.read_bytes() != again.read_bytes()
    assert sorted(p.name for p in cohort["dir"].iterdir()) == [T.TABULAR_CSV_NAME]  # no temp files left
    text = again.read_text()
    assert "\r" not in text and "nan" not in text.lower() and "e+" not in text


def test_writer_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError):
        T.write_tabular_csv(tmp_path / "x.csv", [{"31-0.0": 1}], seed=0)
    with pytest.raises(ValueError):
        T.write_tabular_csv(tmp_path / "x.csv", [{"eid": 1}, {"eid": 1}], seed=0)
    assert not (tmp_path / "x.csv").exists()
