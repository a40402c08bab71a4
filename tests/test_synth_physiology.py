"""The synthetic cohort's physiology: plausible UK Biobank statistics, and couplings that show up in the images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from core.vocab import DISEASES
from data_prep.ukb.phenotypes import ventricular_volumes_ml
from data_prep.synth.heart import HeartModel, plane_labels, volume_curve
from data_prep.synth.physiology import cohort_eids, sample_subject, subject_rng


@pytest.fixture(scope="module")
def population():
    return [sample_subject(e, subject_rng(7, e, 0)) for e in cohort_eids(5000, 7)]


def test_prevalences_and_reference_ranges(population):
    prev = {d: np.mean([getattr(s, d) for s in population]) for d in DISEASES}
    assert 0.12 < prev["hypertension"] < 0.28 and prev["high_blood_pressure"] >= prev["hypertension"]
    assert 0.03 < prev["cad"] < 0.12 and 0.01 < prev["infarct"] < prev["cad"]
    assert 0.03 < prev["diabetes"] < 0.10 and 0.005 < prev["stroke"] < 0.05
    assert all(s.cad for s in population if s.infarct)  # infarct codes are a subset of the CAD codes
    mean = lambda k: np.mean([getattr(s, k) for s in population])  # noqa: E731
    assert 125 < mean("lvedv_ml") < 160 and 56 < mean("lvef_pct") < 62 and 25 < mean("bmi") < 28
    assert 120 < mean("sbp_mmhg") < 140 and 60 < mean("heart_rate_bpm") < 75
    bmi = np.array([s.bmi for s in population])
    assert np.allclose(bmi, [s.weight_kg / (s.height_cm / 100) ** 2 for s in population])


def test_enrichment_raises_rare_disease_prevalence():
    eids = cohort_eids(3000, 3)
    base = np.mean([sample_subject(e, subject_rng(3, e, 0)).stroke for e in eids])
    rich = np.mean([sample_subject(e, subject_rng(3, e, 0), prevalence_scale=4.0).stroke for e in eids])
    assert rich > 2.5 * base


def test_cycle_curves():
    phase = np.linspace(0, 1, 50, endpoint=False)
    c = volume_curve(phase, 0.33)
    assert c[0] == 0 and c.max() == pytest.approx(1.0, abs=0.01) and abs(phase[np.argmax(c)] - 0.33) < 0.03


@pytest.mark.slow
def test_couplings_measured_in_the_images():
    """Phenotypes measured from rendered short-axis label maps follow the latent physiology."""
    rows = []
    for e in cohort_eids(70, 11):
        s = sample_subject(e, subject_rng(11, e, 0), prevalence_scale=4.0)
        heart = HeartModel(s, subject_rng(11, e, 1))
        plane = heart.planes(subject_rng(11, e, 2))["sa"]
        codes, _ = heart.tissue_codes(plane, [0.0, heart.es_phase])
        v = ventricular_volumes_ml(plane_labels("sa", codes), plane.affine)
        rows.append((s, v["lv"][0], 100 * (1 - v["lv"][1] / v["lv"][0]), 1.05 * v["myo"][0]))
    edv = np.array([r[1] for r in rows])
    ef = np.array([r[2] for r in rows])
    lvm = np.array([r[3] for r in rows])
    hyp = np.array([r[0].hypertension for r in rows])
    inf = np.array([r[0].infarct for r in rows])
    bsa = np.array([r[0].bsa_m2 for r in rows])
    male = np.array([r[0].sex == 1 for r in rows])
    assert hyp.sum() >= 5 and inf.sum() >= 3
    # pressure overload thickens the wall: hypertensive subjects have a higher LV mass (indexed to BSA)
    assert stats.ttest_ind(lvm[hyp] / bsa[hyp], lvm[~hyp] / bsa[~hyp], alternative="greater").pvalue < 0.01
    # an akinetic infarcted sector lowers the ejection fraction measured from the images
    assert ef[inf].mean() < ef[~inf].mean() - 4
    # volumes scale with body size and sex
    assert stats.pearsonr(bsa, edv).statistic > 0.5
    assert edv[male].mean() > edv[~male].mean()
    # measured values track the targets the anatomy was built from (up to 10 mm slice-summation error)
    assert stats.pearsonr([r[0].lvedv_ml for r in rows], edv).statistic > 0.9


def test_planes_sample_one_anatomy():
    """Where a long-axis plane crosses a short-axis slice, both planes show the same tissue."""
    e = cohort_eids(1, 5)[0]
    s = sample_subject(e, subject_rng(5, e, 0))
    heart = HeartModel(s, subject_rng(5, e, 1))
    planes = heart.planes(subject_rng(5, e, 2))
    sa = planes["sa"]
    sa_codes, _ = heart.tissue_codes(sa, [0.3])
    inv = np.linalg.inv(sa.affine)
    for name in ("la_2ch", "la_3ch", "la_4ch"):
        la = planes[name]
        la_codes, _ = heart.tissue_codes(la, [0.3])
        ijk = la.world_points().reshape(-1, 3) @ inv[:3, :3].T + inv[:3, 3]
        near = np.abs(ijk[:, 2] - np.rint(ijk[:, 2])) < 0.05  # within 0.5 mm of an SA slice centre plane
        idx = np.rint(ijk[near]).astype(int)
        inside = np.all((idx >= 0) & (idx < np.array(sa.shape)), axis=1)
        a = la_codes.reshape(-1)[near][inside]
        b = sa_codes[idx[inside, 0], idx[inside, 1], idx[inside, 2], 0]
        cardiac = (a <= 7) & (a > 0) | (b <= 7) & (b > 0)
        assert cardiac.sum() > 20, name
        assert (a == b)[cardiac].mean() > 0.85, name  # nearest in-plane voxel: boundaries may differ
