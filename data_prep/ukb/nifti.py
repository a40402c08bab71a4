"""UK Biobank cine in the ukbb_cardiac NIfTI layout: `<eid>/{sa,la_2ch,la_3ch,la_4ch}.nii.gz` + `seg_*.nii.gz`."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from core.config import InputError
from core.vocab import SOURCE_LABEL_MAPS
from data_prep.ukb.study import CINE_VIEWS, SEGMENTED_VIEWS, CineStudy
from data_prep.ukb.dicom import read_ukb_dicom_zip


def _load(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)  # forces the (gzip) read: truncated files fail here
    except Exception as e:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: unreadable NIfTI ({type(e).__name__}: {e})") from e
    return img, data


def frame_interval(dts: list[float], where: str) -> float:
    """One frame interval (ms) for the study: the views' intervals (NaN: unknown) must agree within 10 % -- the
    cine planes of one examination share the cardiac cycle; disagreeing ones are from different scans."""
    known = np.asarray([d for d in dts if np.isfinite(d)], np.float64)
    if known.size == 0:
        return float("nan")
    mid = float(np.median(known))
    if known.min() < 0.9 * mid or known.max() > 1.1 * mid:
        raise InputError(f"{where}: frame intervals of the views disagree ({', '.join(f'{d:g}' for d in dts)} ms)")
    return mid


def _check_link(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path}: a symbolic link that does not resolve (dangling, or a loop)")


def _check_labels(path: Path, view: str, seg: np.ndarray) -> np.ndarray:
    """The segmentation as uint8 once every value is one of the plane's documented ukbb_cardiac labels
    (`core.vocab.SOURCE_LABEL_MAPS` and background): an unknown label (7, 200, -1, 1.5) would otherwise turn into
    background and the subject be written with a zero volume."""
    allowed = {0, *SOURCE_LABEL_MAPS["sa" if view.startswith("sa") else view]}
    values = np.unique(seg)
    bad = [v for v in values.tolist() if v not in allowed]  # NaN is never `in` the set
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise InputError(f"{path}: segmentation labels {{{shown}}} outside the documented set "
                         f"{sorted(allowed)} for {view}")
    return seg.astype(np.uint8)


def read_ukb_nifti_dir(subject_dir: str | Path) -> CineStudy:
    d = Path(subject_dir)
    pixels, affines, segs, dts = {}, {}, {}, []
    for view in CINE_VIEWS:
        path = d / f"{view}.nii.gz"
        _check_link(path)
        if not path.is_file():
            raise InputError(f"{path}: missing view {view}")
        img, data = _load(path)
        if data.ndim != 4:
            raise InputError(f"{path}: expected 4D (X, Y, Z, T), got shape {data.shape}")
        pixels[view], affines[view] = data, img.affine
        dts.append(float(img.header["pixdim"][4]))
    for view in SEGMENTED_VIEWS:
        path = d / f"seg_{view}.nii.gz"
        _check_link(path)
        if path.is_file():
            _, seg = _load(path)
            if seg.shape != pixels[view].shape:
                raise InputError(f"{path}: segmentation shape {seg.shape} != image shape {pixels[view].shape}")
            segs[view] = _check_labels(path, view, seg)
    return CineStudy(d.name, pixels, affines, frame_interval(dts, str(d)), segs, source="nifti")


def read_ukb_dicom_study(sa_zip: str | Path, la_zip: str | Path) -> CineStudy:
    """The raw DICOM zips (field 20209 short axis, 20208 long axis) of one subject; no segmentations."""
    import warnings

    vols, notes = {}, []
    for z in (sa_zip, la_zip):
        try:
            with warnings.catch_warnings(record=True) as caught:  # real-world quirks: converted, but noted
                warnings.simplefilter("always")
                vols.update(read_ukb_dicom_zip(z))
            notes += [str(w.message) for w in caught]
        except ValueError as e:
            raise InputError(str(e)) from e
    missing = [v for v in CINE_VIEWS if v not in vols]
    if missing:
        raise InputError(f"{sa_zip} / {la_zip}: missing views {missing}")
    eid = Path(sa_zip).name.split("_")[0]
    dts = [vols[v].frame_interval_ms for v in CINE_VIEWS]
    return CineStudy(eid, {v: vols[v].pixels for v in CINE_VIEWS}, {v: vols[v].affine for v in CINE_VIEWS},
                     frame_interval(dts, f"{sa_zip} / {la_zip}"), {}, source="dicom", notes=notes)
