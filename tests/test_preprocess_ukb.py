"""UK Biobank cine preprocessing: slice choice, field of view and crop, normalisation, aligned labels, both source
layouts."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from core.config import load_config
from core.config import InputError
from core.vocab import LABELS, PHENOTYPES, SOURCE_LABEL_MAPS
from data_prep.ukb.job import UKBJobConfig
from data_prep.ukb.preprocess import UKBPreprocessConfig, preprocess, select_sa_slices, store_plane
from data_prep.ukb.nifti import read_ukb_dicom_study, read_ukb_nifti_dir

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


@pytest.mark.slow
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
    nib.save(nib.Nifti1Image(np.asarray(la.dataobj)[..., :30], la.affine, la.header), d / "la_3ch.nii.gz")
    with pytest.raises(InputError, match=r"la_3ch: 30 frames, expected 50"):
        preprocess(read_ukb_nifti_dir(d), CFG)

    d = _copy_subject(tiny_cohort, tmp_path / "flat")
    sa = nib.load(d / "sa.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(sa.shape, np.int16), sa.affine, sa.header), d / "sa.nii.gz")
    with pytest.raises(InputError, match=r"sa: empty"):
        preprocess(read_ukb_nifti_dir(d), CFG)

    d = _copy_subject(tiny_cohort, tmp_path / "nan")
    la = nib.load(d / "la_4ch.nii.gz")
    x = np.asarray(la.dataobj).astype(np.float32)
    x[3, 3, 0, 3] = np.nan
    header = la.header.copy()
    header.set_data_dtype(np.float32)  # the NaN survives the save
    nib.save(nib.Nifti1Image(x, la.affine, header), d / "la_4ch.nii.gz")
    with pytest.raises(InputError, match=r"la_4ch: non-finite"):
        preprocess(read_ukb_nifti_dir(d), CFG)

    # labels outside the plane's documented set (they used to become background, the subject written with RVEDV 0)
    for i, (view, value, dtype) in enumerate((("sa", 7, np.int16), ("sa", 200, np.int16), ("sa", -1, np.int16),
                                              ("sa", 1.5, np.float32), ("la_2ch", 2, np.uint8))):
        d = _copy_subject(tiny_cohort, tmp_path / f"label{i}")
        seg = nib.load(d / f"seg_{view}.nii.gz")
        x = np.asarray(seg.dataobj).astype(dtype)
        x[0, 0, 0, 0] = value
        nib.save(nib.Nifti1Image(x, seg.affine), d / f"seg_{view}.nii.gz")
        with pytest.raises(InputError, match=re.escape(f"seg_{view}.nii.gz: segmentation labels {{{value:g}}} "
                                                       "outside the documented set [0, 1")):
            read_ukb_nifti_dir(d)

    d = _copy_subject(tiny_cohort, tmp_path / "loop")
    (d / "sa.nii.gz").unlink()
    (d / "sa.nii.gz").symlink_to("sa.nii.gz")  # a symlink loop: not "missing"
    with pytest.raises(InputError, match=r"sa.nii.gz: a symbolic link that does not resolve"):
        read_ukb_nifti_dir(d)

    bad_zip = tmp_path / "1000000_20209_2_0.zip"
    bad_zip.write_bytes(gzip.compress(b"not a zip"))
    with pytest.raises(InputError, match="1000000_20209_2_0.zip"):
        read_ukb_dicom_study(bad_zip, bad_zip)


def test_absurd_geometry_is_refused_with_the_reason(tiny_cohort, tmp_path):
    """Geometry is checked before anything is measured in millimetres (a 1e6 mm short-axis pixel used to convert
    with blank long-axis planes and LVEDV = 2e19 mL)."""
    from data_prep.ukb.preprocess import validate_geometry

    study = read_ukb_nifti_dir(_subjects(tiny_cohort)[0])
    validate_geometry(study)  # the clean subject passes

    def with_affine(view: str, edit) -> "object":
        A = np.array(study.affines[view], np.float64)
        edit(A)
        return dataclasses.replace(study, affines={**study.affines, view: A})

    cases = [
        (with_affine("sa", lambda A: A.__setitem__((slice(0, 3), 0), A[:3, 0] * 1e6)),
         r"sa: pixel spacing 1\.8\d*e\+06 x 1\.8"),
        (with_affine("la_2ch", lambda A: A.__setitem__((slice(0, 3), 1), 0.0)), r"la_2ch: affine is singular"),
        (with_affine("sa", lambda A: A.__setitem__((0, 3), np.nan)), r"sa: affine is not a finite"),
        (with_affine("sa", lambda A: A.__setitem__((slice(0, 3), 2), A[:3, 2] * 10)), r"sa: slice spacing 100 mm"),
        (with_affine("la_4ch", lambda A: A.__setitem__((slice(0, 3), 3), A[:3, 3] + 400 * np.cross(A[:3, 0], A[:3, 1])
                                                      / np.linalg.norm(np.cross(A[:3, 0], A[:3, 1])))),
         r"la_4ch: the plane does not cross the short-axis stack \(its centre lies 4\d\d mm"),
        (dataclasses.replace(study, frame_interval_ms=900.0), r"frame interval 900 ms outside"),
    ]
    for bad, pattern in cases:
        with pytest.raises(InputError, match=rf"subject {study.eid} \(nifti\).*{pattern}"):
            preprocess(bad, CFG)
    # views whose frame intervals disagree come from different scans
    d = _copy_subject(tiny_cohort, tmp_path)
    la = nib.load(d / "la_2ch.nii.gz")
    la.header["pixdim"][4] = 40.0
    nib.save(la, d / "la_2ch.nii.gz")
    with pytest.raises(InputError, match=r"frame intervals of the views disagree \(21.7785, 40, "):
        read_ukb_nifti_dir(d)


def test_degenerate_long_axis_falls_back_to_the_image_centre(tiny_cohort):
    study = dataclasses.replace(read_ukb_nifti_dir(_subjects(tiny_cohort)[0]), segs={})
    study.affines = dict(study.affines, la_4ch=study.affines["la_2ch"])  # parallel planes: no long axis
    image, _, _, _, meta = preprocess(study, CFG)
    assert meta["crop_centre_method"] == "image centre" and image.shape == (9, 50, 128, 128)


# --- field of view, long-axis centres, slice choice ----------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
DEMO = load_config(UKBJobConfig, ROOT / "configs/data_prep/ukb_demo.yaml", []).preprocess


def _oblique_plane(si: float, sj: float) -> np.ndarray:
    """An oblique plane's affine: si x sj mm pixels, 6 mm slices."""
    a, b = np.deg2rad(25.0), np.deg2rad(-40.0)
    R = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]) @ \
        np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    A = np.eye(4)
    A[:3, :3] = R * np.array([si, sj, 6.0])
    A[:3, 3] = (-100.0, 40.0, 20.0)
    return A


@pytest.mark.parametrize("fov_mm, crop", [(115.2, 32), (230.4, 128), (96.0, 128), (None, 64)])
def test_field_of_view_resampling_preserves_a_disk_area(fov_mm, crop):
    """A disk of radius 40 mm on an oblique plane of 1.8 x 1.9 mm pixels, stored at 3.6 mm (the demo), 1.8 mm,
    0.75 mm and unresampled: its area, count x stored pixel area, stays within 2 % of pi r^2 for the image
    (thresholded at 0.5) and the label map; the stored affine puts it where it was; outside the source: zero."""
    A, r, X, Y = _oblique_plane(1.8, 1.9), 40.0, 150, 140
    centre_ij = np.array([71.3, 66.6])
    P = A[:3, :3] @ np.append(centre_ij, 0.0) + A[:3, 3]
    sub = (np.arange(8) + 0.5) / 8 - 0.5  # 8 x 8 samples per pixel: a partial-volume disk
    i = (np.arange(X)[:, None] + sub[None]).reshape(-1)
    j = (np.arange(Y)[:, None] + sub[None]).reshape(-1)
    ii, jj = np.meshgrid(i, j, indexing="ij")
    dist = np.linalg.norm(np.stack([ii, jj, np.zeros_like(ii)], -1) @ A[:3, :3].T + A[:3, 3] - P, axis=-1)
    frac = (dist <= r).reshape(X, 8, Y, 8).mean(axis=(1, 3))
    image = np.stack([frac, 0.5 * frac], -1).astype(np.float32) * 1000.0  # two frames
    centres = np.stack(np.meshgrid(np.arange(X), np.arange(Y), indexing="ij"), -1)
    inside = np.linalg.norm(np.c_[centres.reshape(-1, 2), np.zeros(X * Y)] @ A[:3, :3].T + A[:3, 3] - P, axis=1) <= r
    label = np.repeat((2 * inside.reshape(X, Y)).astype(np.uint8)[..., None], 2, -1)
    ci, cj = centre_ij + (3.3, -2.7)  # the grid is not aligned with the disk
    img, lab, aff = store_plane(image, label, A, 0, ci, cj, crop, fov_mm)
    aff = np.array(aff)
    sp = fov_mm / crop if fov_mm else 1.8
    assert img.shape == lab.shape == (crop, crop, 2) and lab.dtype == np.uint8
    assert np.linalg.norm(aff[:3, 0]) == pytest.approx(sp, rel=1e-6)
    truth = np.pi * r * r
    area_j = sp * np.linalg.norm(aff[:3, 1])
    assert (img[..., 0] >= 500.0).sum() * area_j == pytest.approx(truth, rel=0.02)
    assert (lab[..., 0] == 2).sum() * area_j == pytest.approx(truth, rel=0.02)
    assert set(np.unique(lab)) == {0, 2}
    # labels are filtered like the image (a label wins where its resampled share exceeds 1/2), not picked nearest
    share, _, _ = store_plane((label == 2).astype(np.float32), None, A, 0, ci, cj, crop, fov_mm)
    np.testing.assert_array_equal(lab == 2, share > 0.5)
    np.testing.assert_allclose(img[..., 1], 0.5 * img[..., 0], atol=1e-3)
    w = img[..., 0]
    ab = (np.argwhere(w >= 0) * w.reshape(-1, 1)).sum(0) / w.sum()  # the stored disk's centroid, through the affine
    assert np.linalg.norm(aff[:3, :3] @ np.append(ab, 0.0) + aff[:3, 3] - P) < 0.05  # mm (half a pixel: >= 0.3)
    img, lab, _ = store_plane(image + 1.0, label, A, 0, 2.0, 2.0, crop, fov_mm)  # a corner: half outside
    assert img[0, 0, 0] == 0.0 and img[-1, -1, 0] > 0.0 and not lab[0, 0].any()


def _inside(meta: dict, name: str, A: np.ndarray, k: int, ij: np.ndarray) -> np.ndarray:
    """Whether source voxel centres (N, 2) of plane `name` (source affine A, slice k) lie in the stored field of
    view, through the stored affine."""
    B = np.array(meta["plane_affines"][name])
    ab = (np.linalg.inv(B) @ A @ np.c_[ij, np.full(len(ij), k), np.ones(len(ij))].T)[:2]
    return ((ab >= -0.5) & (ab <= meta["crop"] - 0.5)).all(0)


def _check_coverage(study, meta, seg, labels=("LV", "MYO", "RV", "LA", "RA"), area_tol=0.03):
    """Every `labels` voxel of the source long-axis ED frames (LA, RA) and of the chosen SA slices (LV, MYO, RV; all
    frames) lies inside the stored field of view; with `seg`, the stored labelled area is the source's (mm^2 summed
    over all frames, SA also over the chosen slices; within `area_tol`: 3.6 mm pixels quantise a small atrium's
    outline by a few % in a single frame)."""
    sa_area, la_views = np.zeros((2, len(LABELS))), 0
    for p, name in enumerate(meta["planes"]):
        view = "sa" if name.startswith("sa_") else name
        if view not in study.segs:
            continue
        k = meta["sa_slices"][p] if view == "sa" else 0
        src = study.segs[view][:, :, k, :]
        for lab_src, lab in SOURCE_LABEL_MAPS[view].items():
            if LABELS[lab] not in labels:
                continue
            idx = np.argwhere(src == lab_src)
            check = idx if view == "sa" else idx[idx[:, 2] == 0]  # LA: the ED frame
            assert view == "sa" or len(check), (study.eid, name)
            assert _inside(meta, name, study.affines[view], k, check[:, :2]).all(), (study.eid, name, LABELS[lab])
            if seg is None:
                continue
            stored = (seg[p] == lab).sum() * meta["pixel_spacing_mm"][view] ** 2
            source = len(idx) * meta["source_pixel_spacing_mm"][view] ** 2
            if view == "sa":
                sa_area[:, lab] += stored, source
            else:
                la_views += 1
                assert stored == pytest.approx(source, rel=area_tol), (study.eid, name, LABELS[lab])
    if seg is not None:
        assert la_views == 3  # LA in the 2- and 4-chamber views, RA in the 4-chamber view
        np.testing.assert_allclose(sa_area[0, 1:4], sa_area[1, 1:4], rtol=area_tol)


def test_demo_geometry_keeps_the_atria_and_the_ventricles_inside(tiny_cohort):
    """The demo's 32 x 32 pixels over 115.2 mm: the atria of the 2- and 4-chamber views (each view centred on its
    own heart region) and the ventricles of the chosen SA slices are wholly inside, at their source area."""
    assert (DEMO.crop, DEMO.fov_mm) == (32, 115.2)
    for d in _subjects(tiny_cohort):
        study = read_ukb_nifti_dir(d)
        image, seg, seg_valid, _, meta = preprocess(study, DEMO)
        assert image.shape == seg.shape == (6, 50, 32, 32) and seg_valid.tolist() == [True] * 4 + [False, True]
        assert meta["pixel_spacing_mm"] == {v: pytest.approx(3.6) for v in ("sa", "la_2ch", "la_3ch", "la_4ch")}
        assert all(1.7 <= s <= 1.95 for s in meta["source_pixel_spacing_mm"].values())
        assert meta["fov_mm"]["la_4ch"] == 115.2 and meta["crop"] == 32
        assert meta["crop_centre_methods"] == dict.fromkeys(("sa", "la_2ch", "la_3ch", "la_4ch"), "segmentation")
        _check_coverage(study, meta, seg)
        # the long-axis views are not centred on the short-axis heart centre any more
        sa_centre = np.array(meta["crop_centre_ras_mm"])
        A = study.affines["la_4ch"]
        on_4ch = (np.linalg.inv(A) @ np.append(sa_centre, 1.0))[:2]
        assert np.linalg.norm(on_4ch - meta["crop_centres"]["la_4ch"]) * 1.8 > 5.0


def test_image_based_centres_keep_the_atria_inside(tiny_cohort):
    """Without segmentations (DICOM-only input) each long-axis view is centred on its cardiac motion, shifted to
    keep the part beyond the base (the atria) inside: every LA / RA voxel of the ED frame is still inside, and so
    is the LV of the chosen SA slices (the SA centre is the long axis, so an RV may be cut)."""
    for d in _subjects(tiny_cohort):
        study = read_ukb_nifti_dir(d)
        *_, meta = preprocess(dataclasses.replace(study, segs={}), DEMO)
        assert meta["crop_centre_methods"] == {"sa": "long-axis intersection", "la_2ch": "motion",
                                               "la_3ch": "motion", "la_4ch": "motion"}
        _check_coverage(study, meta, None, labels=("LV", "LA", "RA"))
        # the 3-chamber view, unsegmented anyway, lands where the segmentation-based centre puts it (within 12 mm)
        *_, with_seg = preprocess(study, DEMO)
        gap = np.subtract(meta["crop_centres"]["la_3ch"], with_seg["crop_centres"]["la_3ch"])
        assert np.linalg.norm(gap) * meta["source_pixel_spacing_mm"]["la_3ch"] < 12.0


def test_spread_and_contiguous_slice_choice(tiny_cohort):
    """contiguous: the slices from just below the base on; spread: evenly from there to the last slice with ED LV
    blood pool, so that every labelled slice lies between two chosen ones; image-based: the same within a slice."""
    contiguous = dataclasses.replace(DEMO, sa_selection="contiguous")
    assert DEMO.sa_selection == "spread"
    for d in _subjects(tiny_cohort):
        study = read_ukb_nifti_dir(d)
        area = (study.segs["sa"][..., 0] == 1).sum(axis=(0, 1))
        base, apex = int(np.argmax(area >= 0.5 * area.max())), int(np.nonzero(area)[0][-1])
        assert apex - base >= 4
        assert select_sa_slices(study, contiguous) == ([base, base + 1, base + 2], "segmentation")
        spread, method = select_sa_slices(study, DEMO)
        assert method == "segmentation" and spread[0] == base and spread[-1] == apex
        assert np.ptp(np.diff(spread)) <= 1 and min(np.diff(spread)) >= 2
        labelled = np.nonzero((study.segs["sa"] > 0).any(axis=(0, 1, 3)))[0]
        gap = np.abs(labelled[:, None] - np.array(spread)[None]).min(1)  # slices to the nearest chosen one
        assert gap.max() <= max(np.diff(spread)) and gap.max() <= base + 1
        by_img, method = select_sa_slices(dataclasses.replace(study, segs={}), DEMO)
        assert method == "image" and abs(by_img[0] - base) <= 1 and abs(by_img[-1] - apex) <= 1
        *_, meta = preprocess(study, DEMO)
        assert meta["sa_slices"] == spread and meta["sa_selection"] == "spread"
        # more slices asked than lie from the base to the apex: the contiguous stack
        z = apex - base + 1
        many = dataclasses.replace(DEMO, sa_planes=z + 1)
        as_contiguous = dataclasses.replace(many, sa_selection="contiguous")
        assert select_sa_slices(study, many)[0] == select_sa_slices(study, as_contiguous)[0]
