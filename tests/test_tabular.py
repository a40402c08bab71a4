"""UK Biobank tabular conversion (data_prep/ukb/: feature_spec, csv_export, features, diseases) on a synthetic export with real-export quirks."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import yaml

from data_prep.ukb import csv_export as CX
from data_prep.ukb import diseases as DS
from data_prep.ukb import feature_spec as FS
from data_prep.ukb import features as FE
from data_prep.ukb import fields as U
from data_prep.synth import tabular as T
from data_prep.synth.physiology import cohort_eids, sample_subject, subject_rng

SEED = 23
N = 300
SPEC_PATH = FS.DEFAULT_SPEC_PATH
# Appendix D features the catalogue cannot supply (none today: all 117 are covered; list any gap here).
APPENDIX_D_GAPS: tuple[str, ...] = ()
ICD_DISEASES = ("cad", "infarct", "hypertension", "diabetes", "stroke")


def fake_phenotypes(s) -> dict[str, float]:
    """Stand-in for the volumes measured from the label maps (as in test_synth_tabular)."""
    lvesv = s.lvedv_ml * (1 - s.lvef_pct / 100)
    rvesv = s.rvedv_ml * (1 - s.rvef_pct / 100)
    return {"LVEDV": s.lvedv_ml, "LVESV": lvesv, "LVM": 1.05 * s.bsa_m2 * 60.0, "RVEDV": s.rvedv_ml, "RVESV": rvesv,
            "LAVmax": s.lav_max_ml, "LAVmin": s.lav_min_ml, "RAVmax": s.rav_max_ml, "RAVmin": s.rav_min_ml}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    subjects = [sample_subject(e, subject_rng(SEED, e, 0), prevalence_scale=2.0) for e in cohort_eids(N, SEED)]
    rows = [T.tabular_row(s, fake_phenotypes(s), subject_rng(SEED, s.eid, T.TABULAR_STREAM)) for s in subjects]
    out = tmp_path_factory.mktemp("tabular")
    path = out / T.TABULAR_CSV_NAME
    T.write_tabular_csv(path, rows, seed=SEED)
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    spec = FS.load_feature_spec(SPEC_PATH)
    df, report = CX.read_ukb_csv(path, spec)
    raw, ext = FE.extract_features_with_report(df, spec)
    by_eid = {s.eid: s for s in subjects}
    return {"subjects": [by_eid[e] for e in df.index], "path": path, "header": table[0], "data": table[1:],
            "spec": spec, "df": df, "report": report, "raw": raw, "ext": ext, "dir": out}


def first_copy(cohort, column: str) -> dict[int, str]:
    """eid -> the stripped cell of the FIRST copy of ``column`` in file order ('' = empty)."""
    j = cohort["header"].index(column)
    return {int(r[0]): r[j].strip() for r in cohort["data"]}


def cells(cohort, fid: int, instances) -> dict[int, list[str]]:
    """eid -> non-empty cells of all arrays of a field at the instances (first copies)."""
    cols = [(j, c) for j, c in enumerate(cohort["header"]) if c != "eid" and "." in c]
    seen, keep = set(), []
    for j, c in cols:
        try:
            f, i, _ = U.parse_column(c)
        except ValueError:
            continue
        if f == fid and i in instances and c not in seen:
            seen.add(c)
            keep.append(j)
    return {int(r[0]): [r[j] for j in keep if r[j] != ""] for r in cohort["data"]}


# --------------------------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------------------------
def test_spec_yaml_covers_appendix_d(cohort):
    spec = cohort["spec"]
    assert not APPENDIX_D_GAPS
    assert len(spec) == 117 - len(APPENDIX_D_GAPS)
    assert spec.names == tuple(n for n in U.APPENDIX_D_FEATURES if n not in APPENDIX_D_GAPS)
    assert Counter(f.kind for f in spec.features) == {"numerical": 67, "binary": 18, "categorical": 32}
    # the committed YAML is the generated default, and the rendering round-trips
    default = FS.default_feature_spec()
    assert spec == default
    assert FS.spec_from_dict(yaml.safe_load(FS.feature_spec_yaml(default))) == default
    for f in spec.features:
        src = U.APPENDIX_D_FEATURES[f.name]
        assert (f.kind, f.fields, f.instances, f.reduce) == (src.kind, src.fields, src.instances, src.reduce)
        if f.kind == "categorical":
            assert len(f.codes) >= 2 and not set(f.codes) & U.MISSING_LIKE_CODES
        if f.kind == "binary":
            assert f.num_categories == 2 and (f.codes == (0, 1) or f.reduce == "any_code")
    assert spec.features[spec.index("Usual walking pace")].codes == (1, 2, 3, -7)
    assert spec.features[spec.index("Number of days/week walked 10+ min")].codes == (0, 1, 2, 3, 4, 5, 6, 7, -2)
    assert dict(spec.features[spec.index("Time spent watching television (TV)")].special_values) == {-10: 0.5}
    assert spec.features[spec.index("Augmentation index for PWA")].signed
    assert tuple(d.name for d in spec.diseases) == U.DISEASE_LABELS
    schema = FE.feature_schema(spec)
    assert [s["index"] for s in schema] == list(range(117))
    assert [s["num_categories"] for s in schema] == [f.num_categories for f in spec.features]
    assert all(s["num_categories"] == 0 for s in schema if s["kind"] == "numerical")
    json.dumps(schema)  # manifest-ready


def _write_spec(tmp_path, mutate):
    data = yaml.safe_load(SPEC_PATH.read_text())
    mutate(data)
    path = tmp_path / "bad_spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _feat(d, name):
    return next(f for f in d["features"] if f["name"] == name)


@pytest.mark.parametrize("feature, mutate, words", [
    ("Pulse rate (mean)", lambda f, d: f.update(kind="ordinal"), "'ordinal' is not one of the allowed values"),
    ("Weight", lambda f, d: f.update(fields=[]), "'fields' is empty"),
    ("Usual walking pace", lambda f, d: f.pop("codes"), "needs 'codes'"),
    ("Body fat percentage", lambda f, d: f.update(name="Pulse rate (mean)"), "duplicate name"),
    ("Pulse wave Arterial Stiffness index", lambda f, d: f.update(cods=[1]), "unknown key"),
    ("Heart attack diagnosed by doctor", lambda f, d: f.update(match=[]), "needs 'match'"),
    ("Usual walking pace", lambda f, d: f.update(codes=[1, 2, 3, -3]), "missing_codes"),
    ("Sex", lambda f, d: f.update(codes=[0, 1, 2]), "exactly 2 codes"),
    ("Weight", lambda f, d: f.update(reduce="median"), "'median' is not one of the allowed values"),
])
def test_bad_spec_names_file_and_feature(tmp_path, feature, mutate, words):
    path = _write_spec(tmp_path, lambda d: mutate(_feat(d, feature), d))
    with pytest.raises(FS.FeatureSpecError) as e:
        FS.load_feature_spec(path)
    msg = str(e.value)
    named = feature if words != "duplicate name" else "Pulse rate (mean)"
    assert str(path) in msg and repr(named) in msg and words in msg, msg


def test_bad_spec_file_level_errors(tmp_path):
    p = tmp_path / "dup_key.yaml"
    p.write_text("version: 1\nfeatures: []\nfeatures: []\n")
    with pytest.raises(FS.FeatureSpecError, match="duplicate key"):
        FS.load_feature_spec(p)
    with pytest.raises(FS.FeatureSpecError, match="cannot read"):
        FS.load_feature_spec(tmp_path / "nope.yaml")
    p = _write_spec(tmp_path, lambda d: d["diseases"][0].update(icd10="stroke"))
    with pytest.raises(FS.FeatureSpecError, match=r"disease 'cad'.*diseases\[0\] is 'cad'"):
        FS.load_feature_spec(p)


# --------------------------------------------------------------------------------------------------------
# reading the export
# --------------------------------------------------------------------------------------------------------
def test_read_csv_quirks_reported(cohort):
    rep, df, header = cohort["report"], cohort["df"], cohort["header"]
    dups = {c: k for c, k in Counter(header).items() if k > 1}
    assert rep.duplicated_columns == dups and len(dups) == T.N_DUPLICATED_COLUMNS
    assert set(rep.unknown_columns) == set(T.UNCATALOGUED_COLUMNS)
    assert rep.junk_columns == list(T.JUNK_COLUMNS)
    assert rep.duplicate_eids == [] and rep.bad_eid_lines == [] and rep.bad_cells == {} and rep.errors() == []
    assert (rep.n_rows, rep.n_subjects) == (N, N)
    assert list(df.index) == sorted(int(r[0]) for r in cohort["data"]) and df.index.name == "eid"
    assert not set(T.UNCATALOGUED_COLUMNS + T.JUNK_COLUMNS) & set(df.columns)
    assert df.columns.is_unique and "eid" not in df.columns
    # first copy kept; the one partly conflicting duplicate is reported with its exact count
    n_conflicts = {}
    for c in dups:
        j0, j1 = [j for j, h in enumerate(header) if h == c]
        first = {int(r[0]): (float(r[j0]) if r[j0] else np.nan) for r in cohort["data"]}
        got = df[c].to_dict()
        assert all((math.isnan(first[e]) and math.isnan(got[e])) or first[e] == got[e] for e in got), c
        n_conflicts[c] = sum(r[j0] != r[j1] for r in cohort["data"])
    assert rep.conflicting_cells == {c: k for c, k in n_conflicts.items() if k}
    assert len(rep.conflicting_cells) == 1 and rep.n_conflicting_cells > 0
    assert any("first copy kept" in w for w in rep.warnings())
    # dtypes: numbers as float64, ICD-10 codes as text
    assert df["4080-2.0"].dtype == np.float64 and pd.api.types.is_string_dtype(df["41270-0.0"])
    json.dumps(rep.to_dict())


def test_read_csv_conflict_missing_mode(cohort):
    df, rep = CX.read_ukb_csv(cohort["path"], cohort["spec"], conflict="missing", chunksize=70)  # several chunks
    (col, k), = rep.conflicting_cells.items()
    assert df[col].isna().sum() - cohort["df"][col].isna().sum() <= k
    other = [c for c in df.columns if c != col]
    pd.testing.assert_frame_equal(df[other], cohort["df"][other])
    assert rep.to_dict() == cohort["report"].to_dict()


def test_read_csv_bad_rows_and_cells(tmp_path):
    path = tmp_path / "quirky.csv"
    path.write_text(
        "eid,31-0.0,21001-2.0,41270-0.0,41270-0.1,999-0.0,f.eid,21001-2.0.1\n"
        "1000003,1,27.5,I10,,5,x,27.5\n"
        "1000001,0, 31.25 ,,,5,x,31.25\n"
        "1000002,1,n/a,E119,I219,5,x,\n"
        "1000001,1,22.0,,,5,x,22.0\n"
        "abc,1,22.0,,,5,x,22.0\n"
        "-5,1,22.0,,,5,x,22.0\n"
        "1000004,0,inf,K219,,5,x,23\n")
    df, rep = CX.read_ukb_csv(path)
    assert list(df.index) == [1000002, 1000003, 1000004]  # sorted; duplicates, junk and withdrawn eids dropped
    assert rep.duplicate_eids == [1000001] and rep.bad_eid_lines == [6] and rep.withdrawn_eids == [-5]
    assert len(rep.errors()) == 2 and "1000001" in rep.errors()[0]
    assert rep.bad_cells == {"21001-2.0": 2}  # "n/a" and "inf"
    assert rep.unknown_columns == ["999-0.0"] and rep.junk_columns == ["f.eid"]
    assert rep.duplicated_columns == {"21001-2.0": 2}  # a pandas-mangled "X.1" header is a copy of X
    assert rep.conflicting_cells == {"21001-2.0": 1}  # 1000004 (inf vs 23); "n/a" vs empty agree (both missing)
    assert df.loc[1000003, "21001-2.0"] == 27.5 and np.isnan(df.loc[1000002, "21001-2.0"])
    assert np.isnan(df.loc[1000004, "21001-2.0"])
    assert df.loc[1000002, "41270-0.1"] == "I219" and pd.isna(df.loc[1000003, "41270-0.1"])
    labels, names = DS.disease_table(df)
    assert labels[:, names.index("hypertension")].tolist() == [0, 1, 0]
    assert labels[:, names.index("infarct")].tolist() == [1, 0, 0]
    assert labels[:, names.index("high_blood_pressure")].tolist() == [-1, 1, -1]  # no 6150 answers at all
    with pytest.raises(ValueError, match="no 'eid'"):
        (tmp_path / "noeid.csv").write_text("31-0.0\n1\n")
        CX.read_ukb_csv(tmp_path / "noeid.csv")


# --------------------------------------------------------------------------------------------------------
# raw features
# --------------------------------------------------------------------------------------------------------
def _expected(cell: str, f: FS.FeatureSpec) -> float:
    if cell == "":
        return np.nan
    x = float(cell)
    if f.kind == "numerical":
        sv = dict(f.special_values)
        if x in sv:
            return sv[x]
        return np.nan if (x < 0 and not f.signed) else x
    return float(f.codes.index(int(x))) if x == int(x) and int(x) in f.codes else np.nan


def test_value_features_match_the_csv_special_codes_and_blanks(cohort):
    spec, raw, df = cohort["spec"], cohort["raw"], cohort["df"]
    assert raw.shape == (N, 117) and raw.dtype == np.float64
    assert cohort["ext"].absent == {} and cohort["ext"].invalid == {}
    seen: Counter = Counter()
    for j, f in enumerate(spec.features):
        if f.reduce != "value":
            continue
        (inst,) = f.instances
        col = first_copy(cohort, U.column_name(f.fields[0], inst, 0))
        for i, e in enumerate(df.index):
            cell = col[e]
            exp = _expected(cell, f)
            assert (np.isnan(exp) and np.isnan(raw[i, j])) or exp == raw[i, j], (f.name, e, cell, raw[i, j])
            seen["blank" if cell == "" else cell if cell in ("-1", "-3", "-7", "-10", "-6", "-2", "-818", "-121")
                 else "value"] += 1
    for code in ("blank", "-1", "-3", "-10"):  # the checks above were not vacuous (-7: see the any_code test)
        assert seen[code] > 0, code
    # targeted: -10 "less than one" -> 0.5, -7 "none of the above" is a real walking-pace category
    tv = spec.index("Time spent watching television (TV)")
    tv_cells = first_copy(cohort, "1070-2.0")
    assert all(raw[i, tv] == 0.5 for i, e in enumerate(df.index) if tv_cells[e] == "-10")
    pace = spec.index("Usual walking pace")
    assert {raw[i, pace] for i, e in enumerate(df.index) if first_copy(cohort, "924-2.0")[e] == "-7"} <= {3.0}


def test_mean_any_code_and_count_features(cohort):
    spec, raw, df, subjects = cohort["spec"], cohort["raw"], cohort["df"], cohort["subjects"]
    sbp = raw[:, spec.index("Systolic blood pressure (mean)")]
    a, b = df["4080-2.0"].to_numpy(), df["4080-2.1"].to_numpy()
    both = np.stack([a, b])
    n_valid = (~np.isnan(both)).sum(axis=0)
    expected = np.where(n_valid > 0, np.nansum(both, axis=0) / np.maximum(n_valid, 1), np.nan)
    assert np.allclose(sbp, expected, equal_nan=True) and (n_valid == 1).any()  # one reading: that reading
    assert np.isnan(sbp).mean() < 0.1
    sex = np.array([s.sex for s in subjects])
    insulin = raw[:, spec.index("Insulin medication regularly taken")]
    assert all(subjects[i].insulin for i in np.flatnonzero(insulin == 1))
    assert np.mean((insulin == 1) == np.array([s.insulin for s in subjects])) > 0.97
    hrt = raw[:, spec.index("Hormone replacement therapy medication regularly taken")]
    assert np.isnan(hrt[sex == 1]).all()  # 6153 is the women's question: missing for men
    assert np.isin(hrt[sex == 0], [0, 1]).mean() > 0.97
    hbp = raw[:, spec.index("High blood pressure diagnosed by doctor")]
    answered = np.array([any(v not in ("-3",) for v in cells(cohort, 6150, (0, 2))[e]) for e in df.index])
    assert np.array_equal(~np.isnan(hbp), answered)
    none_of_the_above = np.array([set(cells(cohort, 6150, (0, 2))[e]) == {"-7"} for e in df.index])
    assert none_of_the_above.sum() > 0.3 * N and np.all(hbp[none_of_the_above] == 0)  # -7 is an answer: 0
    ops = raw[:, spec.index("Cardiac operations performed")]
    assert np.all(np.isin(ops, [0, 1, 2])) and ops.sum() > 0  # distinct codes, never missing
    assert all(subjects[i].cad for i in np.flatnonzero(ops > 0))
    assert np.array_equal(raw[:, spec.index("Sex")], sex.astype(float))


def test_categorical_indices_contiguous(cohort):
    spec, raw = cohort["spec"], cohort["raw"]
    for j, f in enumerate(spec.features):
        v = raw[:, j][~np.isnan(raw[:, j])]
        if f.kind == "numerical":
            continue
        assert v.size and np.all(v == np.round(v)) and v.min() >= 0 and v.max() < f.num_categories, f.name
    walk = raw[:, spec.index("Number of days/week walked 10+ min")]
    assert set(np.unique(walk[~np.isnan(walk)])) <= set(range(9))


def test_deterministic(cohort):
    df, rep = CX.read_ukb_csv(cohort["path"], cohort["spec"], chunksize=128)
    pd.testing.assert_frame_equal(df, cohort["df"])
    raw = FE.extract_features(df, cohort["spec"])
    assert np.array_equal(raw, cohort["raw"], equal_nan=True)


# --------------------------------------------------------------------------------------------------------
# statistics and encoding
# --------------------------------------------------------------------------------------------------------
def _train_mask(df) -> np.ndarray:
    return np.asarray(df.index % 3 != 0)


def test_zscore_and_imputation_use_train_rows_only(cohort):
    spec, raw, df = cohort["spec"], cohort["raw"], cohort["df"]
    train = _train_mask(df)
    assert 0.5 * N < train.sum() < 0.8 * N
    stats = FE.fit_stats(raw, spec, train, df.index)
    values, missing = FE.encode(raw, spec, stats)
    assert values.dtype == np.float32 and missing.dtype == bool and values.shape == raw.shape
    assert np.array_equal(missing, np.isnan(raw)) and np.isfinite(values).all()
    off_subset = 0
    n_num = 0
    for j, f in enumerate(spec.features):
        col, miss = values[:, j].astype(np.float64), missing[:, j]
        present_train = train & ~miss
        if f.kind == "numerical":
            n_num += 1
            v = raw[present_train, j]
            assert stats.mean[j] == pytest.approx(v.mean()) and stats.n_present[j] == v.size
            assert np.all(col[miss] == 0.0)  # imputed with the training mean (0 after z-scoring)
            if np.unique(v).size >= 2:
                z = col[present_train]
                assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4, f.name
                za = col[~miss]
                off_subset += abs(za.mean()) > 1e-3 or abs(za.std() - 1) > 1e-3
        else:
            assert np.all(col[miss] == stats.mode[j]), f.name
            counts = np.bincount(raw[present_train, j].astype(int), minlength=f.num_categories)
            assert stats.mode[j] == int(np.argmax(counts)) and stats.category_counts[j] == tuple(counts)
            assert np.array_equal(col[~miss], raw[~miss, j])
    assert off_subset > 0.8 * n_num  # not exactly standardised over all rows: the stats saw the train rows only


def test_stats_json_roundtrip_and_version(cohort, tmp_path):
    spec, raw, df = cohort["spec"], cohort["raw"], cohort["df"]
    train = _train_mask(df)
    stats = FE.fit_stats(raw, spec, train, df.index)
    p = tmp_path / "stats.json"
    p.write_text(stats.to_json())
    back = FE.TabularStats.from_json(p.read_text())
    assert back == stats and back.to_dict() == stats.to_dict()
    v1, m1 = FE.encode(raw, spec, stats)
    v2, m2 = FE.encode(raw, spec, back)
    assert np.array_equal(v1, v2) and np.array_equal(m1, m2)
    # deterministic, independent of row order; changes with the training eids and with the spec
    perm = np.random.default_rng(0).permutation(N)
    assert FE.fit_stats(raw[perm], spec, train[perm], df.index[perm]).version == stats.version
    fewer = train.copy()
    fewer[np.flatnonzero(train)[0]] = False
    assert FE.fit_stats(raw, spec, fewer, df.index).version != stats.version
    swapped = FE.fit_stats(raw, spec, train, np.asarray(df.index) + 1)
    assert swapped.version != stats.version and swapped.mean == stats.mean
    small = FS.TabularSpec(features=spec.features[:-1], missing_codes=spec.missing_codes, diseases=spec.diseases)
    other = FE.fit_stats(raw[:, :-1], small, train, df.index)
    assert other.version != stats.version
    with pytest.raises(ValueError, match="another feature spec"):
        FE.encode(raw[:, :-1], small, stats)
    with pytest.raises(ValueError):
        FE.TabularStats.from_dict({"format": "something else"})


def test_degenerate_features():
    spec = FS.spec_from_dict({"features": [
        {"name": "const", "kind": "numerical", "fields": [1]},
        {"name": "empty", "kind": "numerical", "fields": [2]},
        {"name": "cat", "kind": "categorical", "fields": [3], "codes": [5, 6, 7]},
        {"name": "nocat", "kind": "binary", "fields": [4]},
    ]})
    raw = np.array([[3.0, np.nan, 2.0, np.nan], [3.0, np.nan, 1.0, np.nan], [5.0, 1.0, np.nan, np.nan]])
    stats = FE.fit_stats(raw, spec, np.array([True, True, False]), [1, 2, 3])
    assert stats.std[0] == 1.0 and stats.mean[0] == 3.0  # degenerate std -> only centred, no blow-up
    assert (stats.mean[1], stats.std[1], stats.n_present[1]) == (0.0, 1.0, 0)
    assert stats.mode[2] == 1 and stats.mode[3] == 0  # tie -> smaller index; no training values -> 0
    values, missing = FE.encode(raw, spec, stats)
    assert values.tolist() == [[0, 0, 2, 0], [0, 0, 1, 0], [2, 1, 1, 0]]
    with pytest.raises(ValueError, match="outside"):
        FE.encode(np.array([[1.0, 1.0, 3.0, 0.0]]), spec, stats)


# --------------------------------------------------------------------------------------------------------
# disease labels
# --------------------------------------------------------------------------------------------------------
def test_disease_labels_match_latent_flags(cohort):
    df, subjects = cohort["df"], cohort["subjects"]
    labels, names = DS.disease_table(df, cohort["spec"])
    assert names == U.DISEASE_LABELS and labels.dtype == np.int8 and labels.shape == (N, 6)
    icd = cells(cohort, U.ICD10_FIELD, (0,))
    unknown = labels[:, names.index("cad")] == -1
    assert 0 < unknown.sum() < 0.3 * N  # subjects without a hospital record
    for i, (e, s) in enumerate(zip(df.index, subjects)):
        assert unknown[i] == (not icd[e])
        for d in ICD_DISEASES:
            k = names.index(d)
            assert (labels[i, k] == -1) == unknown[i]
            if unknown[i]:
                assert not getattr(s, d)  # no record only for subjects without an ICD-10 disease
            else:
                assert labels[i, k] == int(getattr(s, d)), (e, d)
    assert all(sum(getattr(s, d) for s in subjects) >= 3 for d in ICD_DISEASES)  # not vacuous
    # high_blood_pressure: exact wherever the imaging-visit self-report (6150-2) is a valid answer; the
    # documented exceptions are subjects whose imaging visit is missing or answered "prefer not to answer"
    k = names.index("high_blood_pressure")
    sr2 = cells(cohort, U.SELF_REPORT_FIELD, (2,))
    exceptions = 0
    for i, (e, s) in enumerate(zip(df.index, subjects)):
        if any(v != "-3" for v in sr2[e]):
            assert labels[i, k] == int(s.high_blood_pressure), e
        else:
            exceptions += labels[i, k] != int(s.high_blood_pressure)
            assert labels[i, k] != 1 or s.high_blood_pressure  # never a false positive
    assert exceptions <= 0.06 * N
    assert sum(s.high_blood_pressure for s in subjects) >= 10
