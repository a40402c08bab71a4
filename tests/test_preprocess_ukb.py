"""UK Biobank cine preprocessing: slice choice, crop, normalisation, aligned labels, both source layouts."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from data_prep.format import LABELS, PHENOTYPES
from data_prep.preprocess_ukb import UKBPreprocessConfig, preprocess, select_sa_slices
from data_prep.sources.ukb_nifti import InputError, read_ukb_dicom_study, read_ukb_nifti_dir

CFG = UKBPreprocessConfig()


def _subjects(cohort):
    return sorted(p for p in (cohort / "ukb").iterdir())


def test_stack_shapes_ranges_and_label_spaces(tiny_cohort):
    for d in _subjects(tiny_cohort):
        image, seg, seg_valid, _, meta = preprocess(read_ukb_nifti_dir(d), CFG)
        assert image.shape == seg.shape == (9, 50, 128, 128) and image.dtype == np.float16
        assert float(image.min()) == 0.0 and float(image.max()) == 1.0
        assert seg_valid.tolist() == [True] * 6 + [True, False, True]  # no 3-chamber segmentation
        assert meta["planes"][6:] == ["la_2ch", "la_3ch", "la_4ch"] and len(meta["sa_slices"]) == 6
        assert np.diff(meta["sa_slices"]).tolist() == [1] * 5  # contiguous
        for p in range(6):
            assert set(np.unique(seg[p])) == {0, 1, 2, 3}
        assert set(np.unique(seg[6])) == {0, LABELS.index("LA")}
        assert set(np.unique(seg[8])) == {0, LABELS.index("LA"), LABELS.index("RA")}
        assert not seg[7].any()


def test_labels_stay_aligned_with_the_pixels(tiny_cohort):
    """bSSFP: blood pools are bright, myocardium dark — only true if every crop moved image and labels alike."""
    for d in _subjects(tiny_cohort):
        image, seg, *_ = preprocess(read_ukb_nifti_dir(d), CFG)
        img = image.astype(np.float32)
        for p in range(6):
            lv, myo = img[p][seg[p] == 1].mean(), img[p][seg[p] == 2].mean()
            assert lv > myo + 0.3, (d.name, p)
        assert img[8][seg[8] == 5].mean() > 0.5  # RA blood in the 4-chamber view


def test_phenotypes_match_the_generator_truth(tiny_cohort):
    truth = {r["eid"]: r for r in csv.DictReader(open(tiny_cohort / "truth.csv"))}
    for d in _subjects(tiny_cohort):
        *_, phenotypes, _ = preprocess(read_ukb_nifti_dir(d), CFG)
        for k, v in zip(PHENOTYPES, phenotypes):
            assert v == pytest.approx(float(truth[d.name][k]), rel=2e-3, abs=2e-3), k


def test_dicom_and_nifti_sources_give_the_same_stack(tiny_cohort):
    for d in _subjects(tiny_cohort):
        z = tiny_cohort / "ukb_dicom"
        dicom = read_ukb_dicom_study(z / f"{d.name}_20209_2_0.zip", z / f"{d.name}_20208_2_0.zip")
        nifti = dataclasses.replace(read_ukb_nifti_dir(d), segs={})  # the DICOM zips carry no segmentation
        a, _, valid_a, ph_a, meta_a = preprocess(dicom, CFG)
        b, _, _, _, meta_b = preprocess(nifti, CFG)
        np.testing.assert_array_equal(a, b)
        assert meta_a["sa_slices"] == meta_b["sa_slices"] and meta_a["sa_slice_method"] == "image"
        assert not valid_a.any() and np.isnan(ph_a).all()


def test_image_based_slice_choice_agrees_with_the_segmentation(tiny_cohort):
    for d in _subjects(tiny_cohort):
        study = read_ukb_nifti_dir(d)
        by_seg, m1 = select_sa_slices(study, CFG)
        by_img, m2 = select_sa_slices(dataclasses.replace(study, segs={}), CFG)
        assert (m1, m2) == ("segmentation", "image")
        assert len(set(by_seg) & set(by_img)) >= 4


def _copy_subject(cohort, tmp_path):
    src = _subjects(cohort)[0]
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_name_the_file_and_reason(tiny_cohort, tmp_path):
    d = _copy_subject(tiny_cohort, tmp_path)
    (d / "la_3ch.nii.gz").unlink()
    with pytest.raises(InputError, match=r"la_3ch.nii.gz: missing view"):
        read_ukb_nifti_dir(d)

    d = _copy_subject(tiny_cohort, tmp_path / "trunc")
    data = (d / "sa.nii.gz").read_bytes()
    (d / "sa.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"sa.nii.gz: unreadable NIfTI"):
        read_ukb_nifti_dir(d)

    d = _copy_subject(tiny_cohort, tmp_path / "seg")
    seg = nib.load(d / "seg_la_4ch.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[:-1], seg.affine), d / "seg_la_4ch.nii.gz")
    with pytest.raises(InputError, match=r"seg_la_4ch.nii.gz: segmentation shape"):
        read_ukb_nifti_dir(d)

    d = _copy_subject(tiny_cohort, tmp_path / "frames")
    la = nib.load(d / "la_3ch.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(la.dataobj)[..., :30], la.affine), d / "la_3ch.nii.gz")
    with pytest.raises(InputError, match=r"la_3ch: 30 frames, expected 50"):
        preprocess(read_ukb_nifti_dir(d), CFG)

    d = _copy_subject(tiny_cohort, tmp_path / "flat")
    sa = nib.load(d / "sa.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(sa.shape, np.int16), sa.affine), d / "sa.nii.gz")
    with pytest.raises(InputError, match=r"sa: empty"):
        preprocess(read_ukb_nifti_dir(d), CFG)

    d = _copy_subject(tiny_cohort, tmp_path / "nan")
    la = nib.load(d / "la_4ch.nii.gz")
    x = np.asarray(la.dataobj).astype(np.float32)
    x[3, 3, 0, 3] = np.nan
    nib.save(nib.Nifti1Image(x, la.affine), d / "la_4ch.nii.gz")
    with pytest.raises(InputError, match=r"la_4ch: non-finite"):
        preprocess(read_ukb_nifti_dir(d), CFG)

    bad_zip = tmp_path / "1000000_20209_2_0.zip"
    bad_zip.write_bytes(gzip.compress(b"not a zip"))
    with pytest.raises(InputError, match="1000000_20209_2_0.zip"):
        read_ukb_dicom_study(bad_zip, bad_zip)


def test_degenerate_long_axis_falls_back_to_the_image_centre(tiny_cohort):
    study = dataclasses.replace(read_ukb_nifti_dir(_subjects(tiny_cohort)[0]), segs={})
    study.affines = dict(study.affines, la_4ch=study.affines["la_2ch"])  # parallel planes: no long axis
    image, _, _, _, meta = preprocess(study, CFG)
    assert meta["crop_centre_method"] == "image centre" and image.shape == (9, 50, 128, 128)
