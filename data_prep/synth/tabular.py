"""Synthetic UK Biobank tabular export (``ukb_tabular.csv``), consistent with each subject's physiology.

``tabular_row`` turns one ``Subject`` (plus the cardiac phenotypes measured from its label maps) into the
row a ukbconv CSV export would hold: column ``FIELD-INSTANCE.ARRAY`` -> value (None = empty cell), for
every field of the catalogue ``data_prep.ukb.fields`` at instance 0 (baseline, 4-9 years before the
scan) and 2 (imaging visit). ``write_tabular_csv`` writes the rows as one CSV, ``eid`` first.

Values follow the physiology: two automated BP readings scatter around ``subject.sbp_mmhg``; inline
(Siemens) LV volumes 22420-22427 and Bai et al. phenotypes 24100-24117 scatter around the measured
``phenotypes``, with derived fields recomputed from the written values (stroke volume = EDV - ESV,
EF = SV / EDV, cardiac output = SV x HR / 1000, cardiac index = CO / BSA, BMI = weight / height^2,
fat-free mass = weight - fat mass, RR interval = 60000 / rate, ...); lifestyle answers come from the
subject's codes; self-reported conditions (6150), medication (6177 men / 6153 women), doctor-diagnosed
diabetes (2443) and hospital ICD-10 codes (41270) come from its diseases and treatments.

Real-export hardness, reproduced on purpose (a converter that survives this survives the real thing):

* Empty cells: missing at random (~1 % of measurement/answer cells; the second BP reading more often),
  fields measured on subsets only (PWA ~65 %, resting ECG ~70 %, Siemens inline LV ~70 %, DXA ~85 %,
  arterial stiffness 35 % / 75 %, LA/RA phenotypes ~15 %: "LA-related phenotypes are only available
  for a few subjects"), skip logic (durations only when the activity is done, pack years only for
  smokers, 1618 only for weekly drinkers, 20403/20416 not for never-drinkers), the online follow-up
  answered by ~45 %, and whole visits missing: the imaging-visit record (every ``-2.`` column) for
  ~3 % of subjects, the baseline touchscreen session for ~1.5 %.
* Special negative codes in the fields that allow them: -1 do not know, -3 prefer not to answer
  (~0.1-2 %), -10 "less than one" (vegetable intake, TV / computer / driving hours), -7 none of the
  above (6150, 6177/6153, 924), -6 it varies (1618), -2 unable to walk (864), -121 / -818 (online).
* Integer-coded categories, multi-array fields (4080/4079/102 two readings; 6150, 6177, 6153, 20004,
  41270 multi-select, filled from array 0, then empty); ICD-10 codes written without dots.
* Columns that are not catalogued: ``53-0.0`` / ``53-2.0`` (assessment dates, ``YYYY-MM-DD``),
  ``54-2.0`` (assessment centre), and the malformed ``f.eid`` (an R-style basket-merge leftover).
* In the CSV (``write_tabular_csv``): columns grouped in a few "baskets", each sorted by field but the
  whole not sorted; a few columns present twice under the same header (two identical copies, one
  partly conflicting copy: ~5 % of its cells differ); all deterministic in ``seed``.

All randomness comes from the ``rng`` / ``seed`` arguments (no global state). Pass ``tabular_row`` a
stream of its own, e.g. ``subject_rng(seed, eid, TABULAR_STREAM)``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import numbers
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from core.fsutil import atomic_write_text
from data_prep.ukb import fields as U
from data_prep.synth.physiology import Subject

TABULAR_CSV_NAME = "ukb_tabular.csv"
TABULAR_STREAM = 7  # suggested subject_rng stream for tabular_row
# The synthetic export carries fewer array columns than a real one for the long multi-select fields.
SYNTH_ARRAYS: Mapping[int, int] = {U.ICD10_FIELD: 16, 20004: 4}
UNCATALOGUED_COLUMNS: tuple[str, ...] = ("53-0.0", "53-2.0", "54-2.0")  # well formed, not in the catalogue
JUNK_COLUMNS: tuple[str, ...] = ("f.eid",)  # malformed headers (not FIELD-INSTANCE.ARRAY)
N_DUPLICATED_COLUMNS = 3  # columns written twice by write_tabular_csv (the last copy partly conflicting)
N_BASKETS = 3

# ICD-10 codes the generator uses (all in Appendix F except the noise list)
_CAD_NO_INFARCT = (("I251", .50), ("I209", .22), ("I200", .08), ("I208", .06), ("I259", .06), ("I248", .04),
                   ("I249", .02), ("I250", .02))
_INFARCT = (("I219", .35), ("I214", .22), ("I252", .25), ("I210", .07), ("I211", .07), ("I213", .02),
            ("I212", .02))
_INFARCT_EXTRA = (("I251", .5), ("I209", .15), ("I221", .03), ("I229", .02))  # added with these probabilities
_STROKE = (("I639", .45), ("I634", .18), ("I635", .12), ("I633", .08), ("I638", .07), ("I631", .05),
           ("I630", .03), ("I636", .02))
_HYPERTENSION = (("I10", .90), ("I119", .04), ("I110", .02), ("I129", .02), ("I130", .01), ("I158", .01))
_DIABETES_T2 = (("E119", .62), ("E118", .08), ("E114", .07), ("E116", .06), ("E112", .05), ("E113", .04),
                ("E117", .04), ("E149", .04))
_DIABETES_T1 = (("E109", .6), ("E105", .1), ("E103", .1), ("E108", .1), ("E101", .1))
# Unrelated common hospital codes (none is in Appendix F), e.g. K21.9 GORD -> "K219"
ICD10_NOISE_CODES: tuple[str, ...] = (
    "K219", "M545", "Z864", "E785", "K573", "N390", "J459", "Z867", "K429", "H251", "R074", "I489", "E039",
    "K802", "D649", "Z921", "I839", "M179", "K449", "N400", "R103", "Z871", "J181", "K590", "M199", "Z880")

# Keys of every tabular_row, in this order: eid, the catalogue's columns (arrays capped by SYNTH_ARRAYS),
# the uncatalogued and the junk columns.
ROW_COLUMNS: tuple[str, ...] = (
    ("eid",)
    + tuple(U.column_name(f.field_id, f.instance, a) for f in U.FIELDS
            for a in range(min(f.arrays, SYNTH_ARRAYS.get(f.field_id, f.arrays))))
    + UNCATALOGUED_COLUMNS + JUNK_COLUMNS)

_TOUCHSCREEN = frozenset({
    864, 874, 884, 894, 904, 914, 924, 943, 971, 981, 991, 1001, 1011, 1021, 2624, 2634, 3637, 3647, 1070, 1080,
    1090, 1160, 1200, 1239, 1249, 1259, 1269, 1279, 20116, 20160, 20161, 20162, 1558, 1618, 20117, 1289, 1299,
    1349, 1369, 1379, 1389, 1980, 1990, 2178, 2188, 2296, 2306, 4717, 2443, 6150, 6177, 6153, 3079})
_NEVER_BLANK = frozenset({31, 21003, U.ICD10_FIELD, 6150, 6177, 6153, 20004})  # no missing-at-random blanks
_MAR_RATE = 0.01


def _round(x: float, nd: int) -> float | int:
    return int(round(x)) if nd == 0 else round(float(x), nd)


def _pick(rng: np.random.Generator, table) -> str:
    codes, p = zip(*table)
    p = np.asarray(p, float)
    return codes[int(rng.choice(len(codes), p=p / p.sum()))]


class _Row:
    """The row under construction; ``set`` validates against the catalogue (catches generator typos)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.cells: dict[str, object] = {}

    def set(self, fid: int, inst: int, value, arr: int = 0) -> None:
        spec = U.field_spec(fid, inst)
        if arr >= min(spec.arrays, SYNTH_ARRAYS.get(fid, spec.arrays)):
            raise ValueError(f"array {arr} out of range for field {fid}")
        if value is not None and spec.dtype == "int":
            value = int(value)
            if not spec.allows(value):
                raise ValueError(f"value {value} not allowed for field {fid}-{inst}")
        elif value is not None and spec.dtype == "float":
            value = float(value)
            if not math.isfinite(value) or (value < 0 and not spec.signed and value not in spec.special):
                raise ValueError(f"value {value} not allowed for field {fid}-{inst}")
        self.cells[U.column_name(fid, inst, arr)] = value

    def ask(self, fid: int, inst: int, value, dk: float = 0.01, pna: float = 0.002, arr: int = 0):
        """Set a touchscreen answer, replaced by -3 / -1 (or -818 / -121 online) where the field allows."""
        spec = U.field_spec(fid, inst)
        u = self.rng.random()
        pna_code = -3 if -3 in spec.special else (-818 if -818 in spec.special else None)
        dk_code = -1 if -1 in spec.special else (-121 if -121 in spec.special else None)
        if value is not None:
            if pna_code is not None and u < pna:
                value = pna_code
            elif dk_code is not None and pna <= u < pna + dk:
                value = dk_code
        self.set(fid, inst, value, arr)
        return value

    def multi(self, fid: int, inst: int, codes: Sequence[int]) -> None:
        for a, c in enumerate(codes):
            self.set(fid, inst, c, a)


def _phenotype(phenotypes: Mapping[str, float], key: str) -> float | None:
    v = phenotypes.get(key)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) and v > 0 else None


def tabular_row(subject: Subject, phenotypes: Mapping[str, float], rng: np.random.Generator) -> dict[str, object]:
    """The UK Biobank export row of one subject: ``{"eid": ..., "31-0.0": ..., ...}`` (None = empty cell).

    ``phenotypes``: cardiac volumes measured from the subject's label maps, keys LVEDV, LVESV, LVSV, LVEF,
    LVM, RVEDV, RVESV, RVSV, RVEF, LAVmax, LAVmin, RAVmax, RAVmin (mL, g, %); missing / NaN keys leave the
    dependent fields empty. Every row has the same keys in the same order, ``ROW_COLUMNS`` (eid, all
    catalogue columns with arrays capped by ``SYNTH_ARRAYS``, ``UNCATALOGUED_COLUMNS``, ``JUNK_COLUMNS``).
    """
    s = subject
    r = _Row(rng)
    n = rng.standard_normal
    u = rng.random

    # ---- visits: baseline 4-9 years before the scan (baseline age >= 40) -----------------------------
    gap = float(min(rng.uniform(4.0, 9.0), s.age - 40.0))
    age0 = s.age - gap
    d0 = dt.date(2006, 3, 13) + dt.timedelta(days=int(rng.integers(0, 1663)))
    d2 = d0 + dt.timedelta(days=int(round(gap * 365.25)))
    r.cells["eid"] = int(s.eid)
    r.cells["53-0.0"] = d0.isoformat()
    r.cells["53-2.0"] = d2.isoformat()
    r.cells["54-2.0"] = int(rng.choice([11025, 11026, 11027, 11028]))
    r.cells["f.eid"] = str(int(s.eid))
    r.set(31, 0, s.sex)
    r.set(21003, 0, int(math.floor(age0)))
    r.set(21003, 2, int(math.floor(s.age)))

    # ---- anthropometry ------------------------------------------------------------------------------
    h2 = _round(s.height_cm + 0.4 * n(), 0)
    w2 = _round(s.weight_kg + 0.3 * n(), 1)
    h0 = _round(s.height_cm + 0.08 * gap + 0.6 * n(), 0)
    w0 = _round(s.weight_kg * math.exp(0.06 * n()), 1)
    bsa2 = math.sqrt(h2 * w2 / 3600.0)
    for inst, h, w, dbf in ((0, h0, w0, 0.0), (2, h2, w2, 0.0)):
        bmi = w / (h / 100.0) ** 2
        r.set(50, inst, h)
        r.set(21002, inst, w)
        r.set(21001, inst, _round(bmi, 4))
        r.set(20015, inst, _round(0.52 * h + 2.2 * n(), 0))
        r.set(48, inst, _round(s.waist_cm + 0.9 * (w - s.weight_kg) + 2.0 * n(), 0))
        r.set(49, inst, _round(s.hip_cm + 0.5 * (w - s.weight_kg) + 1.5 * n(), 0))
        if u() < (0.97 if inst == 0 else 0.95):  # impedance (not for everyone)
            bf = float(np.clip(s.body_fat_pct + 1.1 * (bmi - s.bmi) + 1.0 * n(), 5.0, 60.0))
            fat = _round(w * bf / 100.0, 1)
            ffm = _round(w - fat, 1)
            r.set(23099, inst, _round(bf, 1))
            r.set(23100, inst, fat)
            r.set(23101, inst, ffm)
            r.set(23102, inst, _round(0.732 * ffm + 0.4 * n(), 1))
            r.set(23105, inst, _round((370.0 + 21.6 * ffm) * 4.184 + 150 * n(), 0))
            r.set(23106, inst, _round(float(np.clip(900.0 - 6.0 * ffm + 35.0 * n(), 300, 900)), 0))
    r.set(12144, 2, _round(h2 + 0.5 * n(), 0))
    if u() < 0.85:
        r.set(23283, 2, _round(w2 * 1000.0 * (1 + 0.01 * n()), 0))

    # ---- blood pressure, pulse, arterial stiffness ---------------------------------------------------
    sbp0 = s.sbp_mmhg - 0.45 * gap + 9.0 * n()
    dbp0 = s.dbp_mmhg + 0.2 * gap + 6.0 * n()
    hr0 = s.heart_rate_bpm + 6.0 * n()
    for inst, sbp, dbp, hr in ((0, sbp0, dbp0, hr0), (2, s.sbp_mmhg, s.dbp_mmhg, s.heart_rate_bpm)):
        if u() < 0.03:  # automated device failed: manual readings only (fields 93/94, not catalogued)
            continue
        for a, off in ((0, 1.5), (1, -1.5)):
            r.set(4080, inst, _round(np.clip(sbp + off + 5.0 * n(), 70, 260), 0), a)
            r.set(4079, inst, _round(np.clip(dbp + off / 2 + 3.5 * n(), 40, 150), 0), a)
            r.set(102, inst, _round(np.clip(hr + 3.0 * n(), 35, 160), 0), a)
    for inst, p, age_i, sbp in ((0, 0.35, age0, sbp0), (2, 0.75, s.age, s.sbp_mmhg)):
        if u() < p:
            asi = 9.0 + 0.08 * (age_i - 64) + 0.02 * (sbp - 130) + 2.5 * n()
            r.set(21021, inst, _round(float(np.clip(asi, 3.0, 25.0)), 1))

    # ---- cardiac phenotypes ---------------------------------------------------------------------------
    ph = {k: _phenotype(phenotypes, k) for k in ("LVEDV", "LVESV", "LVM", "RVEDV", "RVESV", "LAVmax", "LAVmin",
                                                   "RAVmax", "RAVmin")}
    hr_cmr = float(np.clip(s.heart_rate_bpm + 3.0 * n(), 35, 160))
    if ph["LVEDV"] and ph["LVESV"] and u() < 0.70:  # Siemens inline VF (22420-22427)
        scale = 0.96 + 0.05 * n()  # inline contours: a per-scan scale error shared by EDV and ESV
        edv = ph["LVEDV"] * scale
        esv = min(ph["LVESV"] * scale * (1.0 + 0.07 * n()), 0.9 * edv)
        edv_i, esv_i = _round(edv, 0), _round(max(esv, 5.0), 0)
        sv_i = edv_i - esv_i
        hr_i = _round(hr_cmr, 0)
        co = _round(sv_i * hr_i / 1000.0, 2)
        bsa_i = _round(bsa2, 2)
        r.set(22421, 2, edv_i)
        r.set(22422, 2, esv_i)
        r.set(22423, 2, sv_i)
        r.set(22420, 2, _round(100.0 * sv_i / edv_i, 0))
        r.set(22426, 2, hr_i)
        r.set(22424, 2, co)
        r.set(22427, 2, bsa_i)
        r.set(22425, 2, _round(co / bsa_i, 2))
    if ph["LVEDV"] and ph["LVESV"] and u() < 0.94:  # Bai et al. (automated segmentation of the same images)
        lv_edv = _round(ph["LVEDV"] * (1 + 0.03 * n()), 2)
        lv_esv = _round(min(ph["LVESV"] * (1 + 0.04 * n()), 0.95 * lv_edv), 2)
        lv_sv = _round(lv_edv - lv_esv, 2)
        r.set(24100, 2, lv_edv)
        r.set(24101, 2, lv_esv)
        r.set(24102, 2, lv_sv)
        r.set(24103, 2, _round(100.0 * lv_sv / lv_edv, 2))
        r.set(24104, 2, _round(lv_sv * hr_cmr / 1000.0, 2))
        if ph["LVM"]:
            r.set(24105, 2, _round(ph["LVM"] * (1 + 0.04 * n()), 2))
        if ph["RVEDV"] and ph["RVESV"]:
            rv_edv = _round(ph["RVEDV"] * (1 + 0.04 * n()), 2)
            rv_esv = _round(min(ph["RVESV"] * (1 + 0.05 * n()), 0.95 * rv_edv), 2)
            r.set(24106, 2, rv_edv)
            r.set(24107, 2, rv_esv)
            r.set(24108, 2, _round(rv_edv - rv_esv, 2))
            r.set(24109, 2, _round(100.0 * (rv_edv - rv_esv) / rv_edv, 2))
        if u() < 0.15:  # long-axis (atrial) phenotypes: a minority only
            for fid, kmax, kmin in ((24110, "LAVmax", "LAVmin"), (24114, "RAVmax", "RAVmin")):
                if ph[kmax] and ph[kmin]:
                    vmax = _round(ph[kmax] * (1 + 0.05 * n()), 2)
                    vmin = _round(min(ph[kmin] * (1 + 0.07 * n()), 0.95 * vmax), 2)
                    r.set(fid, 2, vmax)
                    r.set(fid + 1, 2, vmin)
                    r.set(fid + 2, 2, _round(vmax - vmin, 2))
                    r.set(fid + 3, 2, _round(100.0 * (vmax - vmin) / vmax, 2))

    # ---- pulse wave analysis (imaging visit) ----------------------------------------------------------
    if u() < 0.65:
        hr_p = _round(s.heart_rate_bpm + 4.0 * n(), 0)
        sbp_b = _round(s.sbp_mmhg + 7.0 * n(), 0)
        dbp_b = _round(min(s.dbp_mmhg + 5.0 * n(), sbp_b - 15), 0)
        csbp = max(_round(sbp_b - max(2.0, 10.0 - 0.15 * (s.age - 64) + 3.0 * n()), 0), dbp_b + 10)
        cpp = csbp - dbp_b
        aix = _round(22.0 + 0.45 * (s.age - 64) - 7.0 * s.sex + 9.0 * n(), 0)
        sv_ref = (ph["LVEDV"] - ph["LVESV"]) if ph["LVEDV"] and ph["LVESV"] else s.lvedv_ml * s.lvef_pct / 100
        sv_p = _round(max(25.0, sv_ref * (1 + 0.15 * n())), 0)
        co_p = _round(sv_p * hr_p / 1000.0, 1)
        esp = _round(dbp_b + cpp * float(np.clip(0.75 + 0.05 * n(), 0.5, 0.95)), 0)
        map_p = _round(dbp_b + (sbp_b - dbp_b) / 3.0 + n(), 0)
        r.set(12673, 2, hr_p)
        r.set(12674, 2, sbp_b)
        r.set(12675, 2, dbp_b)
        r.set(12676, 2, sbp_b - dbp_b)
        r.set(12677, 2, csbp)
        r.set(12678, 2, cpp)
        r.set(12679, 2, int(rng.integers(5, 16)))
        r.set(12680, 2, _round(aix / 100.0 * cpp, 0))
        r.set(12681, 2, aix)
        r.set(12682, 2, co_p)
        r.set(12683, 2, esp)
        r.set(12684, 2, _round(100.0 * (esp - dbp_b) / cpp, 0))
        r.set(12685, 2, _round(80.0 * map_p / max(co_p, 0.5), 0))
        r.set(12686, 2, sv_p)
        r.set(12687, 2, map_p)
        r.set(12702, 2, _round(co_p / bsa2, 1))

    # ---- resting ECG (imaging visit) ------------------------------------------------------------------
    if u() < 0.70:
        rate = _round(np.clip(s.heart_rate_bpm + 4.0 * n(), 35, 160), 0)
        rr = _round(60000.0 / rate + 8.0 * n(), 0)
        r.set(12336, 2, rate)
        r.set(12338, 2, _round(np.clip(105 + 14 * n(), 60, 180), 0))
        r.set(12340, 2, _round(np.clip(88 + 6 * s.sex + 10 * s.infarct + 10 * n(), 60, 180), 0))
        r.set(22330, 2, _round(np.clip(162 + 0.6 * (s.age - 64) + 24 * n(), 90, 320), 0))
        r.set(22333, 2, rr)
        r.set(22334, 2, _round(rr + 6 * n(), 0))

    # ---- lifestyle (touchscreen, both visits) ---------------------------------------------------------
    any_disease = s.cad or s.stroke or s.diabetes or s.hypertension or s.high_blood_pressure
    status0 = 2 if (s.smoking_status == 1 and u() < 0.2) else s.smoking_status
    ppd = float(rng.uniform(0.5, 1.5))  # packs per day while smoking
    for inst, age_i, status in ((0, age0, status0), (2, s.age, s.smoking_status)):
        _smoking(r, inst, status, s.pack_years, ppd, gap, age_i)
        _alcohol(r, inst, s.alcohol_frequency if inst == 2 else int(np.clip(s.alcohol_frequency
                                                                              + rng.choice([-1, 0, 0, 0, 1]), 1, 6)))
        _diet(r, inst)
        _activity(r, inst, s)
        r.ask(1070, inst, _less_than_one(rng, int(np.clip(round(2.7 + 1.6 * n()), 0, 12)), 0.7))
        r.ask(1080, inst, _less_than_one(rng, int(np.clip(round(1.0 + 1.3 * n()), 0, 10)), 0.6))
        r.ask(1090, inst, _less_than_one(rng, int(np.clip(round(0.9 + 0.9 * n()), 0, 8)), 0.5))
        r.ask(1160, inst, s.sleep_hours if inst == 2 else int(np.clip(s.sleep_hours + rng.choice([-1, 0, 0, 1]), 3, 12)),
              dk=0.005, pna=0.001)
        r.ask(1200, inst, int(rng.choice([1, 2, 3], p=[.25, .47, .28])), pna=0.001)
        r.ask(1980, inst, int(u() < 0.45), dk=0.015, pna=0.005)
        r.ask(1990, inst, int(u() < 0.17), dk=0.01, pna=0.004)
        health = 1.9 + 0.5 * any_disease + 0.4 * (s.bmi > 30) + 0.3 * s.cad + 0.6 * n()
        r.ask(2178, inst, int(np.clip(round(health), 1, 4)), dk=0.005, pna=0.001)
        r.ask(2188, inst, int(u() < 0.22 + 0.3 * any_disease), dk=0.01, pna=0.002)
        r.ask(2296, inst, int(rng.choice([1, 2, 3], p=[.80, .13, .07])), pna=0.001)
        r.ask(2306, inst, int(rng.choice([0, 2, 3], p=[.65, .20, .15])), dk=0.015, pna=0.001)
        r.ask(4717, inst, int(u() < 0.05 + 0.15 * s.cad + 0.1 * (s.bmi > 32)), dk=0.008, pna=0.001)
        r.ask(3079, inst, 0, dk=0.003, pna=0.0)

    # ---- conditions, medication, operations -----------------------------------------------------------
    _medical_history(r, s)
    _online_followup(r, s, u() < 0.45)
    r.multi(U.ICD10_FIELD, 0, _icd10_codes(s, rng))

    # ---- missingness: canonical key set and order, blank at random, drop whole visits ----------------
    extra = set(r.cells) - set(ROW_COLUMNS)
    if extra:  # pragma: no cover - generator bug
        raise RuntimeError(f"tabular_row produced unexpected columns {sorted(extra)}")
    r.cells = {c: r.cells.get(c) for c in ROW_COLUMNS}
    visit2_missing = u() < 0.03
    touch0_missing = u() < 0.015
    for col in list(r.cells):
        try:
            fid, inst, arr = U.parse_column(col)
        except ValueError:
            continue
        if inst == 2 and visit2_missing:
            r.cells[col] = None
        elif inst == 0 and touch0_missing and fid in _TOUCHSCREEN:
            r.cells[col] = None
        elif fid not in _NEVER_BLANK and fid not in (53, 54) and u() < (_MAR_RATE + 0.02 * (arr == 1)):
            r.cells[col] = None
    return r.cells


def _less_than_one(rng: np.random.Generator, value: int, p: float) -> int:
    """A 0 answer becomes -10 ("less than one") with probability p."""
    return -10 if value == 0 and rng.random() < p else value


def _smoking(r: _Row, inst: int, status: int, pack_years: float, ppd: float, gap: float, age: float) -> None:
    rng, u = r.rng, r.rng.random
    if status == 2:
        current = 1 if u() < 0.85 else 2
        past = None if current == 1 else int(rng.choice([2, 4]))
    elif status == 1:
        current, past = 0, (1 if u() < 0.75 else 2)
    else:
        current, past = 0, (4 if u() < 0.8 else 3)
    current = r.ask(1239, inst, current, dk=0.0, pna=0.002)
    if current == -3:
        r.set(20116, inst, -3)
        return
    r.ask(1249, inst, past, dk=0.0, pna=0.001)
    r.set(20116, inst, status)
    r.set(20160, inst, int(status > 0))
    if status == 2 or (status == 1 and past == 1):
        py = pack_years if inst == 2 else max(0.5, pack_years - (gap * ppd if status == 2 else 0.0))
        r.set(20161, inst, _round(py, 2))
        r.set(20162, inst, _round(min(py / ppd, age - 15.0) / age, 4))
        r.ask(1259, inst, int(rng.choice([0, 1, 2], p=[.68, .29, .03])), dk=0.0, pna=0.001)
    else:
        r.ask(1259, inst, int(rng.choice([0, 1, 2], p=[.93, .06, .01])), dk=0.0, pna=0.001)
        r.ask(1269, inst, 0 if u() < 0.9 else int(rng.integers(1, 30)), dk=0.01, pna=0.001)
    r.ask(1279, inst, 0 if u() < 0.75 else int(rng.integers(1, 15)), dk=0.02, pna=0.001)


def _alcohol(r: _Row, inst: int, freq: int) -> None:
    rng, u = r.rng, r.rng.random
    freq = r.ask(1558, inst, freq, dk=0.0, pna=0.002)
    if freq == -3:
        r.set(20117, inst, -3)
        return
    r.set(20117, inst, (0 if u() < 0.6 else 1) if freq == 6 else 2)
    if freq in (1, 2, 3):
        r.ask(1618, inst, int(rng.choice([1, 0, -6], p=[.45, .26, .29])), dk=0.02, pna=0.001)


def _diet(r: _Row, inst: int) -> None:
    rng = r.rng
    r.ask(1289, inst, _less_than_one(rng, int(min(rng.poisson(2.7), 12)), 1.0) if rng.random() > 0.05 else -10)
    r.ask(1299, inst, _less_than_one(rng, int(min(rng.poisson(2.0), 12)), 1.0) if rng.random() > 0.08 else -10)
    for fid, p in ((1349, [.08, .28, .30, .28, .05, .01]), (1369, [.10, .45, .35, .09, .01, 0.]),
                   (1379, [.18, .55, .23, .04, 0., 0.]), (1389, [.15, .55, .25, .05, 0., 0.])):
        r.ask(fid, inst, int(rng.choice(6, p=p)), dk=0.005, pna=0.001)


def _activity(r: _Row, inst: int, s: Subject) -> None:
    rng, n, u = r.rng, r.rng.standard_normal, r.rng.random

    def minutes(median: float) -> int:
        return int(np.clip(round(median * math.exp(0.7 * n())), 5, 600))

    walk_days = int(np.clip(round(5.0 + 2.0 * n()), 0, 7)) if u() > 0.003 else -2
    walk_days = r.ask(864, inst, walk_days)
    if walk_days > 0:
        r.ask(874, inst, minutes(35), dk=0.05)
    mod = s.moderate_activity_days if inst == 2 else int(np.clip(s.moderate_activity_days + rng.choice([-1, 0, 1]), 0, 7))
    mod = r.ask(884, inst, mod)
    if mod > 0:
        r.ask(894, inst, minutes(45), dk=0.06)
    vig = r.ask(904, inst, int(np.clip(round(1.5 + 0.5 * (s.moderate_activity_days - 3.6) + 1.6 * n()), 0, 7)))
    if vig > 0:
        r.ask(914, inst, minutes(40), dk=0.06)
    r.ask(924, inst, -7 if walk_days == -2 else s.walking_pace, dk=0.0, pna=0.002)
    r.ask(943, inst, int(rng.choice(6, p=[.12, .45, .28, .10, .03, .02])))
    for freq_f, dur_f, p_done in ((971, 981, .70), (991, 1001, .12), (1011, 1021, .55), (2624, 2634, .25),
                                  (3637, 3647, .40)):
        if u() < p_done:
            r.ask(freq_f, inst, int(rng.choice([1, 2, 3, 4, 5, 6], p=[.05, .12, .18, .30, .15, .20])))
            r.ask(dur_f, inst, int(rng.choice([1, 2, 3, 4, 5, 6, 7], p=[.05, .25, .35, .18, .08, .06, .03])))


def _medical_history(r: _Row, s: Subject) -> None:
    """6150 (self-reported conditions), 6177/6153 (medication), 2443 (diabetes), 20004 (operations).

    Instance 2 reflects the subject's status at the scan; baseline (instance 0) reports a subset (the
    condition / treatment may have started between the visits), so the union over instances equals the
    imaging-visit answer. high_blood_pressure <=> 6150 contains 4 at instance 2 (unless answered -3).
    """
    u = r.rng.random
    conds2 = []
    if s.infarct and u() < 0.88 or (not s.infarct and u() < 0.002):
        conds2.append(1)
    if s.cad and u() < (0.35 if s.infarct else 0.65) or (not s.cad and u() < 0.003):
        conds2.append(2)
    if s.stroke and u() < 0.85:
        conds2.append(3)
    if s.high_blood_pressure:
        conds2.append(4)
    meds2 = [c for c, on in ((1, s.cholesterol_medication), (2, s.bp_medication), (3, s.insulin)) if on]
    if not s.sex:
        if u() < (0.08 if s.age > 55 else 0.03):
            meds2.append(4)
    med_field = 6177 if s.sex else 6153
    ops2 = []
    if s.cad and u() < 0.45:
        ops2.append(1070)
    if s.cad and u() < 0.15:
        ops2.append(1523 if u() < 0.3 else 1095)

    conds0 = [c for c in conds2 if u() < 0.65]
    meds0 = [m for m in meds2 if u() < 0.6]
    if not s.sex and 4 not in meds0 and u() < 0.10:
        meds0.append(4)  # HRT at baseline, stopped since
    if not s.sex and s.age - 6 < 52 and u() < 0.02:
        meds0.append(5)  # oral contraceptive at baseline
    ops0 = [o for o in ops2 if u() < 0.5]
    for inst, conds, meds, ops in ((0, conds0, sorted(meds0), ops0), (2, conds2, meds2, ops2)):
        r.multi(6150, inst, [-3] if u() < 0.006 else (conds or [-7]))
        x = u()
        r.multi(med_field, inst, [-3] if x < 0.003 else [-1] if x < 0.008 else (meds or [-7]))
        r.multi(20004, inst, ops)
        diab = (s.diabetes and u() < (0.93 if inst == 2 else 0.6)) or (not s.diabetes and u() < 0.01)
        r.ask(2443, inst, int(diab), dk=0.003, pna=0.002)


def _online_followup(r: _Row, s: Subject, answered: bool) -> None:
    """Alcohol-use and diabetes online questionnaires (stored at instance 0), answered by a subset."""
    if not answered:
        return
    rng = r.rng
    freq = {1: 4, 2: int(rng.choice([3, 4])), 3: int(rng.choice([2, 3])), 4: int(rng.choice([1, 2])),
            5: 1, 6: 0}[s.alcohol_frequency]
    freq = r.ask(20414, 0, freq, dk=0.0, pna=0.003)
    if freq > 0:
        r.ask(20416, 0, int(rng.choice([1, 2, 3, 4, 5], p=[.35, .35, .15, .12, .03])), dk=0.0, pna=0.003)
        r.ask(20403, 0, int(rng.choice([1, 2, 3, 4, 5], p=[.55, .28, .10, .05, .02])), dk=0.0, pna=0.003)
    r.ask(120007, 0, int(s.diabetes), dk=0.005, pna=0.003)


def _icd10_codes(s: Subject, rng: np.random.Generator) -> list[str]:
    """Hospital ICD-10 codes (41270): Appendix F codes for each disease (>= 1, so the labels are
    recoverable), none for diseases the subject does not have, plus unrelated common codes."""
    cap = SYNTH_ARRAYS[U.ICD10_FIELD]
    disease: list[str] = []

    def add(code: str) -> None:
        if code not in disease:
            disease.append(code)

    if s.infarct:
        add(_pick(rng, _INFARCT))
        for code, p in _INFARCT_EXTRA:
            if rng.random() < p:
                add(code)
    elif s.cad:
        for _ in range(1 + int(rng.random() < 0.35)):
            add(_pick(rng, _CAD_NO_INFARCT))
    if s.stroke:
        add(_pick(rng, _STROKE))
    if s.hypertension:
        add(_pick(rng, _HYPERTENSION))
    if s.diabetes:
        add(_pick(rng, _DIABETES_T1 if (s.insulin and rng.random() < 0.4) else _DIABETES_T2))
    sick = bool(disease)
    if not sick and rng.random() < 0.12:
        return []  # no hospital record at all
    n_noise = min(int(rng.poisson(2.0 + 1.5 * sick)), cap - len(disease), len(ICD10_NOISE_CODES))
    noise = [ICD10_NOISE_CODES[i] for i in rng.choice(len(ICD10_NOISE_CODES), size=n_noise, replace=False)]
    if s.cad and rng.random() < 0.4 and len(disease) + len(noise) < cap:
        noise.append("Z955")  # presence of coronary angioplasty implant (not an Appendix F code)
    codes = disease + noise
    return [codes[i] for i in rng.permutation(len(codes))]


# --------------------------------------------------------------------------------------------------------
# CSV writer
# --------------------------------------------------------------------------------------------------------
def _format_cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        x = float(v)
        if math.isnan(x):
            return ""
        if math.isinf(x):
            raise ValueError(f"infinite value {v!r} in tabular row")
        if x == int(x) and abs(x) < 1e15:
            return str(int(x))
        return repr(x)  # shortest round-trip repr: platform independent
    return str(v)


def _column_order(columns: Sequence[str], rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """Basket-like order: fields spread over N_BASKETS blocks, each sorted by (field, instance, array),
    then the malformed junk columns. Returns the order and each column's basket (-1 for junk)."""
    parsed = {}
    junk = []
    for c in columns:
        try:
            parsed[c] = U.parse_column(c)
        except ValueError:
            junk.append(c)
    fids = sorted({p[0] for p in parsed.values()})
    basket_of = {fid: int(b) for fid, b in zip(fids, rng.integers(0, N_BASKETS, size=len(fids)))}
    order = sorted(parsed, key=lambda c: (basket_of[parsed[c][0]], parsed[c]))
    return order + junk, [basket_of[parsed[c][0]] for c in order] + [-1] * len(junk)


def write_tabular_csv(path: str | Path, rows: Sequence[Mapping[str, object]], seed: int) -> None:
    """Write rows (from ``tabular_row``) as a UK Biobank-style CSV, atomically and deterministically.

    ``path``: the CSV file, or an existing directory (then ``<path>/ukb_tabular.csv``). ``eid`` is the
    first column; the others are in basket order (see module doc) with ``N_DUPLICATED_COLUMNS`` columns
    written twice under the same header (the last duplicate differs in ~5 % of its cells). Values:
    integers as integers, floats as their shortest repr ("27.3456", "172"), None/NaN as empty cells;
    "\\n" line ends, minimal quoting, UTF-8. Same rows + seed -> byte-identical file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TABULAR_CSV_NAME
    if not rows:
        raise ValueError("write_tabular_csv: no rows")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7AB0]))
    columns: list[str] = []
    seen: set[str] = set()
    eids: set[str] = set()
    for i, row in enumerate(rows):
        if "eid" not in row:
            raise ValueError(f"row {i} has no 'eid'")
        e = _format_cell(row["eid"])
        if e in eids:
            raise ValueError(f"duplicate eid {e}")
        eids.add(e)
        for c in row:
            if c not in seen and c != "eid":
                seen.add(c)
                columns.append(c)
    order, baskets = _column_order(columns, rng)

    # duplicated columns: catalogued single-array columns that every row has; copies go to another basket
    def single_array(c: str) -> bool:
        try:
            spec = U.lookup_column(c)
        except ValueError:
            return False
        return spec is not None and spec.arrays == 1

    candidates = [c for c in order if single_array(c) and all(c in r for r in rows)]
    dups = [candidates[i] for i in sorted(rng.choice(len(candidates), size=min(N_DUPLICATED_COLUMNS, len(candidates)),
                                                     replace=False))] if candidates else []
    # one block per basket (+ the junk block); each duplicate copy goes to the middle of another basket
    blocks: list[list[tuple[str, bool]]] = [[] for _ in range(N_BASKETS + 1)]
    for c, b in zip(order, baskets):
        blocks[b].append((c, False))
    for k, c in enumerate(dups):
        own = baskets[order.index(c)]
        target = (own + 1 + int(rng.integers(0, N_BASKETS - 1))) % N_BASKETS
        blocks[target].insert(len(blocks[target]) // 2, (c, k == len(dups) - 1))  # last copy conflicts
    sources: list[tuple[str, bool]] = [("eid", False)] + [cell for block in blocks for cell in block]
    header = [c for c, _ in sources]

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(header)
    for row in rows:
        out = []
        for c, conflicting in sources:
            v = row.get(c)
            if conflicting and v is not None and rng.random() < 0.05:
                other = rows[int(rng.integers(0, len(rows)))].get(c)  # a misaligned merge
                v = other if other != v else None
            out.append(_format_cell(v))
        w.writerow(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())
