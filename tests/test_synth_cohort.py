"""End-to-end: `python -m data_prep synth` writes real files in the real layouts, deterministically."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from core.vocab import DISEASES
from data_prep.ukb.phenotypes import PHENOTYPES, measure_phenotypes
from data_prep.ukb.dicom import read_ukb_dicom_zip
from data_prep.synth.cohort import SynthConfig, generate

ROOT = Path(__file__).resolve().parents[1]
UKB_FILES = {"sa", "la_2ch", "la_3ch", "la_4ch", "seg_sa", "seg_la_2ch", "seg_la_4ch"}


@pytest.fixture
def cohort(tiny_cohort) -> Path:
    return tiny_cohort


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_layout_and_resolved_config(cohort):
    eids = sorted(p.name for p in (cohort / "ukb").iterdir())
    assert len(eids) == 4 and all(re.fullmatch(r"\d{7}", e) for e in eids)
    for e in eids:
        assert {p.name.removesuffix(".nii.gz") for p in (cohort / "ukb" / e).iterdir()} == UKB_FILES
        assert (cohort / "ukb_dicom" / f"{e}_20209_2_0.zip").is_file()
        assert (cohort / "ukb_dicom" / f"{e}_20208_2_0.zip").is_file()
    assert [r["eid"] for r in _read_csv(cohort / "truth.csv")] == eids
    tab = _read_csv(cohort / "ukb_tabular.csv")
    assert sorted({r["eid"] for r in tab}) == eids
    assert "subjects: 4" in (cohort / "synth_config.yaml").read_text()
    assert not list(cohort.rglob(".tmp*")) and not list(cohort.rglob("*.tmp"))  # nothing half-written left


def test_nifti_shapes_labels_affines(cohort):
    for d in sorted((cohort / "ukb").iterdir()):
        sa = nib.load(d / "sa.nii.gz")
        X, Y, Z, T = sa.shape
        assert 8 <= Z <= 13 and T == 50 and 150 <= X <= 260 and 150 <= Y <= 260 and X != Y
        assert sa.get_data_dtype() == np.int16
        vox = np.linalg.norm(sa.affine[:3, :3], axis=0)
        assert np.allclose(vox[:2], vox[0], atol=1e-6) and 1.6 < vox[0] < 2.0 and vox[2] == pytest.approx(10.0)
        assert np.allclose(sa.get_qform(), sa.affine) and sa.header.get_xyzt_units() == ("mm", "msec")
        dt = float(sa.header["pixdim"][4])
        assert 8.0 < dt < 30.0  # frame interval in ms for heart rates of 40-150 bpm
        seg = np.asarray(nib.load(d / "seg_sa.nii.gz").dataobj)
        assert seg.shape == sa.shape and set(np.unique(seg)) == {0, 1, 2, 3}
        assert all({1, 2, 3} <= set(np.unique(seg[..., t])) for t in range(T))  # every frame labelled
        sa_normal = sa.affine[:3, 2] / 10.0
        for view, labels in (("2ch", {0, 1}), ("3ch", None), ("4ch", {0, 1, 2})):
            la = nib.load(d / f"la_{view}.nii.gz")
            assert la.shape[2:] == (1, 50)
            assert np.linalg.norm(la.affine[:3, 2]) == pytest.approx(6.0)
            # every long-axis plane contains the LV long axis, i.e. is perpendicular to the short-axis planes
            assert abs(sa_normal @ la.affine[:3, 2] / 6.0) < 1e-6
            if labels is not None:
                s = np.asarray(nib.load(d / f"seg_la_{view}.nii.gz").dataobj)
                assert s.shape == la.shape and set(np.unique(s)) == labels


@pytest.mark.slow
def test_dicom_reassembles_to_the_nifti(cohort):
    for d in sorted((cohort / "ukb").iterdir()):
        sa = read_ukb_dicom_zip(cohort / "ukb_dicom" / f"{d.name}_20209_2_0.zip")["sa"]
        nii = nib.load(d / "sa.nii.gz")
        np.testing.assert_array_equal(sa.pixels, np.asarray(nii.dataobj))
        np.testing.assert_allclose(sa.affine, nii.affine, atol=1e-3)
        assert sa.frame_interval_ms == pytest.approx(float(nii.header["pixdim"][4]), rel=1e-3)
        la = read_ukb_dicom_zip(cohort / "ukb_dicom" / f"{d.name}_20208_2_0.zip")
        for view in ("2ch", "3ch", "4ch"):
            nii = nib.load(d / f"la_{view}.nii.gz")
            np.testing.assert_array_equal(la[f"la_{view}"].pixels, np.asarray(nii.dataobj))
            np.testing.assert_allclose(la[f"la_{view}"].affine[:3, :2], nii.affine[:3, :2], atol=1e-3)
            np.testing.assert_allclose(la[f"la_{view}"].affine[:3, 3], nii.affine[:3, 3], atol=1e-3)


def test_truth_is_measured_from_the_label_maps(cohort):
    tab = {r["eid"]: r for r in _read_csv(cohort / "ukb_tabular.csv")}
    for row in _read_csv(cohort / "truth.csv"):
        d = cohort / "ukb" / row["eid"]
        segs = {n: nib.load(d / f"seg_{n}.nii.gz") for n in ("sa", "la_2ch", "la_4ch")}
        hr = 60000.0 / (float(nib.load(d / "sa.nii.gz").header["pixdim"][4]) * 50)
        ph = measure_phenotypes(*[x for n in ("sa", "la_2ch", "la_4ch")
                                  for x in (np.asarray(segs[n].dataobj), segs[n].affine)], hr)
        for k in PHENOTYPES:
            assert float(row[k]) == pytest.approx(ph[k], rel=2e-3, abs=2e-3), k
        assert 60 < ph["LVEDV"] < 300 and 30 < ph["LVEF"] < 80 and 40 < ph["LVM"] < 250
        assert set(row[d_] for d_ in DISEASES) <= {"0", "1"}
        assert row["eid"] in tab


def test_kspace_files(cohort):
    rows = _read_csv(cohort / "kspace_truth.csv")
    assert len(rows) == 8
    for r in rows:
        path = cohort / "kspace" / r["relpath"]
        assert re.fullmatch(r"MultiCoil/\w+/TrainingSet/FullSample/Center\d{3}/[A-Za-z]+_(15|30)T_\w+/P\d{3}/\w+\.mat",
                            r["relpath"]), r["relpath"]
        if r["format"] == "v73":
            with h5py.File(path, "r") as f:
                k = f["kspace_full"]
                assert k.dtype.names == ("real", "imag") and k.ndim in (4, 5)
        else:
            assert path.read_bytes()[:10] == b"MATLAB 5.0"
    assert {r["format"] for r in rows} == {"v73", "v5"}  # the tiny config mixes both MAT versions


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "synth_config.yaml"}


@pytest.mark.slow
def test_same_seed_byte_identical_whatever_the_worker_count(cohort, tmp_path):
    cfg = SynthConfig(out=tmp_path / "again", subjects=4, kspace_scans=8, seed=0, dicom=True, prevalence_scale=4.0,
                      kspace_format="mixed", kspace_size_scale=0.5, workers=1)
    generate(cfg, progress=False)
    assert _hashes(cohort) == _hashes(tmp_path / "again")


@pytest.mark.slow
def test_different_seed_differs(tmp_path):
    a = generate(SynthConfig(out=tmp_path / "a", subjects=1, kspace_scans=1, seed=1, workers=1), progress=False)
    b = generate(SynthConfig(out=tmp_path / "b", subjects=1, kspace_scans=1, seed=2, workers=1), progress=False)
    assert a["subjects"] == b["subjects"] == 1
    assert not set(_hashes(tmp_path / "a").values()) & set(_hashes(tmp_path / "b").values())
