"""Latent physiology of a synthetic UK Biobank participant.

Everything observable about a subject (cine anatomy, tabular fields, ICD-10 codes) is derived from one `Subject`
drawn here, so images and tables agree and phenotypes / diseases are learnable from images. Means and spreads
follow published UK Biobank reference values (Petersen et al. 2017 CMR reference ranges; the ViTa paper's
Table C.8); disease risks are logistic in age, sex, body size and each other, with intercepts set so that the
prevalences of the imaging cohort come out (hypertension ~18 %, CAD ~7 %, infarct ~3 %, diabetes ~6 %,
stroke ~2 %). `prevalence_scale` enriches rare diseases for small demo cohorts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Subject:
    eid: int
    # demographics and anthropometry
    sex: int  # UK Biobank coding (field 31): 0 female, 1 male
    age: float  # years, at the imaging visit
    height_cm: float
    weight_kg: float
    bmi: float
    bsa_m2: float  # Mosteller body surface area
    body_fat_pct: float
    waist_cm: float
    hip_cm: float
    # haemodynamics at the imaging visit
    sbp_mmhg: float
    dbp_mmhg: float
    heart_rate_bpm: float
    # lifestyle (UK Biobank codings)
    smoking_status: int  # field 20116: 0 never, 1 previous, 2 current
    pack_years: float
    alcohol_frequency: int  # field 1558: 1 daily ... 6 never
    moderate_activity_days: int  # field 884: 0..7
    walking_pace: int  # field 924: 1 slow, 2 steady, 3 brisk
    sleep_hours: int  # field 1160
    # diseases (ICD-10 / self-report) and treatments
    cad: bool
    infarct: bool
    hypertension: bool
    high_blood_pressure: bool  # self-reported, field 6150 == 4
    diabetes: bool
    stroke: bool
    bp_medication: bool
    cholesterol_medication: bool
    insulin: bool
    # cardiac targets that drive the anatomy; the truth written to truth.csv is re-measured from the label maps
    lvedv_ml: float
    lvef_pct: float
    lv_wall_mm: float
    lv_length_mm: float
    rvedv_ml: float
    rvef_pct: float
    lav_max_ml: float
    lav_min_ml: float
    rav_max_ml: float
    rav_min_ml: float
    # infarct: an akinetic, thinned myocardial sector (angles in radians around the LV long axis; apical fraction)
    infarct_angle: float
    infarct_width: float
    infarct_start: float  # fraction of the LV length from the base where the scar begins (0 base .. 1 apex)

    def as_dict(self) -> dict:
        return asdict(self)


def _logit_p(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def sample_subject(eid: int, rng: np.random.Generator, prevalence_scale: float = 1.0) -> Subject:
    """Draw one participant. All randomness comes from `rng` (seeded per subject by the caller)."""
    n = rng.standard_normal
    sex = int(rng.random() < 0.48)
    age = float(np.clip(64.0 + 7.7 * n(), 45.0, 82.0))
    height = float((176.0 + 6.8 * n()) if sex else (163.0 + 6.3 * n()))
    bmi = float(np.clip(np.exp(math.log(26.4) + 0.145 * n()) + (0.6 if sex else 0.0), 16.5, 48.0))
    weight = bmi * (height / 100.0) ** 2
    bsa = math.sqrt(height * weight / 3600.0)
    body_fat = float(np.clip((18.0 if sex else 30.0) + 1.1 * (bmi - 26.0) + 0.08 * (age - 60) + 3.0 * n(), 6, 55))
    waist = float(0.92 * bmi * 3.5 + (8.0 if sex else 0.0) + 5.0 * n())
    hip = float(62.0 + 1.5 * bmi + (0.0 if sex else 4.0) + 4.0 * n())

    smoking_status = int(rng.choice([0, 1, 2], p=[0.58, 0.35, 0.07]))
    pack_years = 0.0 if smoking_status == 0 else float(np.clip(rng.gamma(2.0, 9.0 if smoking_status == 2 else 6.0), 0.5, 120))
    alcohol_frequency = int(rng.choice([1, 2, 3, 4, 5, 6], p=[0.20, 0.26, 0.26, 0.11, 0.10, 0.07]))
    moderate_days = int(np.clip(np.round(3.6 + 2.3 * n()), 0, 7))
    walking_pace = int(rng.choice([1, 2, 3], p=[0.06, 0.52, 0.42]))
    sleep_hours = int(np.clip(np.round(7.1 + 1.0 * n()), 3, 12))
    fitness = 0.25 * (moderate_days - 3.6) + 0.4 * (walking_pace - 2.3)  # ~ N(0, 0.7)

    def disease(intercept: float, logit: float) -> bool:
        # prevalence_scale shifts the intercept by log(scale): rare diseases are enriched ~scale-fold
        return bool(rng.random() < _logit_p(intercept + math.log(prevalence_scale) + logit))

    a, b = (age - 64.0) / 7.7, (bmi - 26.5) / 4.2
    hypertension = disease(-1.75, 0.75 * a + 0.6 * b + 0.25 * sex)
    high_bp = hypertension or disease(-2.6, 0.5 * a + 0.4 * b)
    diabetes = disease(-3.6, 0.35 * a + 0.9 * b + 0.45 * sex + 0.5 * hypertension)
    cad = disease(-3.95, 0.8 * a + 0.9 * sex + 0.25 * b + 0.6 * (smoking_status > 0) + 0.6 * diabetes + 0.5 * hypertension)
    infarct = cad and bool(rng.random() < 0.45)
    stroke = disease(-4.2, 0.9 * a + 0.7 * hypertension + 0.4 * diabetes + 0.3 * (smoking_status == 2))
    bp_medication = (hypertension and rng.random() < 0.7) or (high_bp and rng.random() < 0.4)
    cholesterol_medication = (cad and rng.random() < 0.85) or rng.random() < 0.12 + 0.08 * (a > 0.5)
    insulin = diabetes and rng.random() < 0.18

    sbp = float(np.clip(128.0 + 6.0 * a + 3.0 * b + 4.0 * sex + 14.0 * hypertension - 6.0 * bp_medication
                        + 13.0 * n(), 85, 220))
    dbp = float(np.clip(0.42 * sbp + 24.0 + 2.0 * b + 7.0 * n(), 45, 130))
    hr = float(np.clip(66.0 - 4.0 * fitness + 1.5 * b + 2.0 * diabetes - 3.0 * bp_medication + 9.5 * n(), 42, 115))

    # LV: end-diastolic volume indexed to BSA (Petersen 2017: men ~ 82, women ~ 72 mL/m^2), smaller with age
    lvedv = bsa * (82.0 if sex else 72.0) * (1 - 0.004 * (age - 64)) * (1 + 0.1 * n()) * (1 + 0.05 * fitness)
    lvef = 60.0 + 4.5 * n() - 2.0 * (cad and not infarct) - 6.0 * infarct - 1.0 * diabetes
    if infarct:
        lvedv *= 1.12  # remodelling
    lvef = float(np.clip(lvef, 38.0, 78.0))
    # wall thickness: scales with body size and sex; pressure overload thickens it (concentric remodelling)
    wall = (6.0 if sex else 5.1) * math.sqrt(bsa / 1.9) * (1 + 0.06 * n()) + 1.9 * hypertension + 0.5 * (sbp > 150)
    length = float(np.clip(82.0 * (lvedv / 145.0) ** 0.3 * (1 + 0.04 * n()), 62, 110))
    rvedv = lvedv * (1.12 if sex else 1.05) * (1 + 0.07 * n())
    rvef = float(np.clip(57.0 + 5.0 * n() - 3.0 * infarct, 38, 78))
    # atria: dilated by pressure overload and age
    lav_max = bsa * (36.0 + 0.15 * (age - 64)) * (1 + 0.15 * n()) * (1.18 if hypertension else 1.0)
    lav_min = lav_max * float(np.clip(0.42 + 0.07 * n() + 0.05 * hypertension, 0.25, 0.7))
    rav_max = bsa * (46.0 if sex else 38.0) * (1 + 0.15 * n())
    rav_min = rav_max * float(np.clip(0.5 + 0.07 * n(), 0.3, 0.75))

    return Subject(
        eid=int(eid), sex=sex, age=round(age, 2), height_cm=height, weight_kg=weight, bmi=bmi, bsa_m2=bsa,
        body_fat_pct=body_fat, waist_cm=waist, hip_cm=hip, sbp_mmhg=sbp, dbp_mmhg=dbp, heart_rate_bpm=hr,
        smoking_status=smoking_status, pack_years=pack_years, alcohol_frequency=alcohol_frequency,
        moderate_activity_days=moderate_days, walking_pace=walking_pace, sleep_hours=sleep_hours,
        cad=cad, infarct=infarct, hypertension=hypertension, high_blood_pressure=high_bp, diabetes=diabetes,
        stroke=stroke, bp_medication=bool(bp_medication), cholesterol_medication=bool(cholesterol_medication),
        insulin=bool(insulin),
        lvedv_ml=float(lvedv), lvef_pct=lvef, lv_wall_mm=float(wall), lv_length_mm=length, rvedv_ml=float(rvedv),
        rvef_pct=rvef, lav_max_ml=float(lav_max), lav_min_ml=float(lav_min), rav_max_ml=float(rav_max),
        rav_min_ml=float(rav_min),
        infarct_angle=float(rng.uniform(-math.pi, math.pi)), infarct_width=float(rng.uniform(0.7, 1.4)),
        infarct_start=float(rng.uniform(0.3, 0.6)),
    )


def subject_rng(seed: int, eid: int, stream: int = 0) -> np.random.Generator:
    """Independent, scheduling-free random stream per (cohort seed, subject, purpose)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(eid), int(stream)]))


def cohort_eids(n: int, seed: int) -> list[int]:
    """UK Biobank-like 7-digit participant ids (1000000..6026000), unique, sorted, deterministic."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x0E1D]))
    return sorted(int(e) for e in rng.choice(np.arange(1_000_000, 6_026_000), size=n, replace=False))
