"""A hostile input corpus through both converters, on a real local Ray cluster: each kind of bad input is built
the way it turns up in real archives, converted beside good inputs, and must be quarantined with a reason that
names its file and the check that failed (or, for the quirks real files have, written correctly); the good inputs
are byte-identical to a clean run and the counts reconcile."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io
import webdataset as wds

from data_prep.engine import JobConfig

pytestmark = pytest.mark.slow  # not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
CDT = np.dtype([("real", "<f4"), ("imag", "<f4")])


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every written sample's encoded fields (the shard member bytes), by key."""
    m = json.loads((out / "manifest.json").read_text())
    found = {}
    for shard in m["shards"]:
        for item in wds.WebDataset(str(out / shard["path"]), shardshuffle=False):
            found[item["__key__"]] = {k: v for k, v in item.items() if not k.startswith("__")}
    return found


def _reconciles(report) -> None:
    c = report.counts
    assert c["inputs"] == c["written"] + c["quarantined"] + c["skipped"], c


# ------------------------------------------------------------------------------------------------ UK Biobank
def _nifti(d: Path, view: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    img = nib.load(d / f"{view}.nii.gz")
    return img, np.asarray(img.dataobj)


def _save(d: Path, view: str, data: np.ndarray, affine=None, pixdim4=None, dtype=None) -> None:
    img, _ = _nifti(d, view)
    header = img.header.copy()
    if dtype is not None:
        header.set_data_dtype(dtype)
    out = nib.Nifti1Image(data, img.affine if affine is None else affine, header)
    if pixdim4 is not None:
        out.header["pixdim"][4] = pixdim4
    nib.save(out, d / f"{view}.nii.gz")


def _label(view: str, value, dtype) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        _, x = _nifti(d, f"seg_{view}")
        x = x.astype(dtype)
        x[0, 0, 0, 0] = value
        _save(d, f"seg_{view}", x, dtype=dtype)
    return edit


def _affine(view: str, edit_affine: Callable[[np.ndarray], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        img, x = _nifti(d, view)
        A = img.affine.copy()
        edit_affine(A)
        _save(d, view, x, affine=A)
    return edit


def _plane_shift(A: np.ndarray) -> None:
    n = np.cross(A[:3, 0], A[:3, 1])
    A[:3, 3] += 400 * n / np.linalg.norm(n)


def _every_view(fn: Callable[[Path, str], None]) -> Callable[[Path], None]:
    return lambda d: [fn(d, v) for v in ("sa", "la_2ch", "la_3ch", "la_4ch")]


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * keep)])
    return edit


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _relink(name: str, target: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / name).unlink()
        (d / name).symlink_to(target)
    return edit


#: NIfTI subjects: name -> (how the subject is broken, what the reason must say)
UKB_NIFTI: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated_gzip": (_truncate("sa.nii.gz", 0.5), "sa.nii.gz: unreadable NIfTI"),
    "empty_file": (_write("la_2ch.nii.gz", b""), "la_2ch.nii.gz: unreadable NIfTI"),
    "not_gzip": (_write("la_3ch.nii.gz", b"PK\x03\x04 not a NIfTI at all"), "la_3ch.nii.gz: unreadable NIfTI"),
    "gzip_of_junk": (_write("la_4ch.nii.gz", gzip.compress(b"\0" * 400)), "la_4ch.nii.gz: unreadable NIfTI"),
    "missing_view": (lambda d: (d / "la_4ch.nii.gz").unlink(), "la_4ch.nii.gz: missing view la_4ch"),
    "symlink_loop": (_relink("sa.nii.gz", "sa.nii.gz"), "sa.nii.gz: a symbolic link that does not resolve"),
    "dangling_link": (_relink("la_2ch.nii.gz", "/nonexistent/la_2ch.nii.gz"),
                      "la_2ch.nii.gz: a symbolic link that does not resolve"),
    "three_d_image": (lambda d: _save(d, "la_2ch", _nifti(d, "la_2ch")[1][..., 0]), "la_2ch.nii.gz: expected 4D"),
    "too_few_frames": (lambda d: _save(d, "la_3ch", _nifti(d, "la_3ch")[1][..., :25]), "25 frames, expected 50"),
    "flat_image": (lambda d: _save(d, "la_2ch", np.zeros(_nifti(d, "la_2ch")[1].shape, np.int16)),
                   "la_2ch: empty (constant) image"),
    "nan_pixels": (lambda d: _save(d, "la_4ch", np.where(np.arange(_nifti(d, "la_4ch")[1].size).reshape(
        _nifti(d, "la_4ch")[1].shape) == 7, np.nan, _nifti(d, "la_4ch")[1].astype(np.float32)), dtype=np.float32),
                   "la_4ch: non-finite pixel values"),
    "two_slice_long_axis": (lambda d: _save(d, "la_3ch", np.concatenate([_nifti(d, "la_3ch")[1]] * 2, axis=2)),
                            "a long-axis view must have one slice, got 2"),
    "too_few_sa_slices": (lambda d: [_save(d, v, _nifti(d, v)[1][:, :, :2]) for v in ("sa", "seg_sa")],
                          "2 short-axis slices, 3 required"),
    "seg_wrong_shape": (lambda d: _save(d, "seg_sa", _nifti(d, "seg_sa")[1][:, :-2]), "seg_sa.nii.gz: segmentation "
                                                                                      "shape"),
    "label_7": (_label("sa", 7, np.int16), "seg_sa.nii.gz: segmentation labels {7} outside the documented set"),
    "label_200": (_label("sa", 200, np.int16), "segmentation labels {200} outside"),
    "label_minus_1": (_label("sa", -1, np.int16), "segmentation labels {-1} outside"),
    "label_fraction": (_label("sa", 1.5, np.float32), "segmentation labels {1.5} outside"),
    "atrium_label_on_2ch": (_label("la_2ch", 2, np.uint8), "seg_la_2ch.nii.gz: segmentation labels {2} outside "
                                                           "the documented set [0, 1]"),
    "megametre_pixels": (_affine("sa", lambda A: A.__setitem__((slice(0, 3), 0), A[:3, 0] * 1e6)),
                         "sa: pixel spacing"),
    "micrometre_pixels": (_affine("la_3ch", lambda A: A.__setitem__(
        (slice(0, 3), slice(0, 2)), A[:3, :2] * 1e-3)), "la_3ch: pixel spacing"),
    "slices_100mm_apart": (_affine("sa", lambda A: A.__setitem__((slice(0, 3), 2), A[:3, 2] * 10)),
                           "sa: slice spacing 100 mm"),
    "plane_off_the_heart": (_affine("la_4ch", _plane_shift), "la_4ch: the plane does not cross the short-axis stack"),
    "frame_intervals_disagree": (lambda d: _save(d, "la_2ch", _nifti(d, "la_2ch")[1], pixdim4=40.0),
                                 "frame intervals of the views disagree"),
    "frame_interval_900ms": (_every_view(lambda d, v: _save(d, v, _nifti(d, v)[1], pixdim4=900.0)),
                             "frame interval 900 ms outside"),
}


def _dicom_pair(cohort: Path, d: Path, eid: str) -> tuple[Path, Path]:
    sa = sorted((cohort / "ukb_dicom").glob("*_20209_2_0.zip"))[0]
    la = sa.with_name(sa.name.replace("20209", "20208"))
    return shutil.copy(sa, d / f"{eid}_20209_2_0.zip"), shutil.copy(la, d / f"{eid}_20208_2_0.zip")


def _rezip(path: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    with zipfile.ZipFile(path) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in members:
            new = edit(info.filename, data)
            if new is not None:
                z.writestr(info, new)


def _dicom_edit(edit_ds: Callable, first_only: bool = False) -> Callable[[str, bytes], bytes | None]:
    import io

    import pydicom

    done = []

    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith(".dcm") or (first_only and done):
            return data
        done.append(name)
        ds = pydicom.dcmread(io.BytesIO(data))
        edit_ds(ds)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    return edit


#: DICOM subjects: name -> (edit of (sa zip, la zip), reason)
UKB_DICOM: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "no_long_axis_zip": (lambda sa, la: la.unlink(), "no 20208 (long axis) zip"),
    "not_a_zip": (lambda sa, la: sa.write_bytes(b"<html>404 Not Found</html>"), "_20209_2_0.zip"),
    "truncated_zip": (lambda sa, la: sa.write_bytes(sa.read_bytes()[:5000]), "_20209_2_0.zip"),
    "zip_without_dicom": (lambda sa, la: _rezip(sa, lambda n, b: b if n == "manifest.csv" else None),
                          "no DICOM"),
    "all_frames_derived": (lambda sa, la: _rezip(la, _dicom_edit(lambda ds: setattr(
        ds, "ImageType", ["DERIVED", "PRIMARY", "M", "ND"]))), "skipped as DERIVED"),
    "truncated_pixel_data": (lambda sa, la: _rezip(la, _dicom_edit(lambda ds: setattr(
        ds, "PixelData", ds.PixelData[:100]), first_only=True)), "truncated pixel data"),
}


@pytest.fixture(scope="module")
def ukb_corpus(tiny_cohort, tmp_path_factory, ray_cluster):
    """The tiny cohort's 4 NIfTI subjects (+ one DICOM subject with padded pixel data, a real-world quirk) converted
    alone and then beside every bad kind; both reports and outputs."""
    from data_prep.ukb.job import UKBJobConfig, run
    from data_prep.ukb.preprocess import UKBPreprocessConfig

    tmp = tmp_path_factory.mktemp("ukb_corpus")
    src = tmp / "src"
    shutil.copytree(tiny_cohort / "ukb", src)
    sa, la = _dicom_pair(tiny_cohort, src, "8000001")  # good, with 128 bytes of PixelData padding
    _rezip(la, _dicom_edit(lambda ds: setattr(ds, "PixelData", ds.PixelData + b"\0" * 128)))

    def convert(out: Path):
        cfg = UKBJobConfig(src=src, tabular=None, features=ROOT / "configs/data_prep/ukb_features.yaml",
                           job=JobConfig(out=out, block_size=4, workers=2),
                           preprocess=UKBPreprocessConfig(sa_planes=3, crop=32, fov_mm=115.2, sa_selection="spread"))
        return run(cfg, progress=False)[0]

    clean = convert(tmp / "clean")
    proto = sorted(p for p in src.iterdir() if p.is_dir())[0]
    expect = {}
    for i, (kind, (edit, why)) in enumerate(UKB_NIFTI.items()):
        eid = f"{9000000 + i}"
        shutil.copytree(proto, src / eid)
        edit(src / eid)
        expect[eid] = (kind, why)
    for i, (kind, (edit, why)) in enumerate(UKB_DICOM.items()):
        eid = f"{9100000 + i}"
        edit(*_dicom_pair(tiny_cohort, src, eid))
        expect[eid] = (kind, why)
    return clean, convert(tmp / "corpus"), expect, tmp


def test_ukb_bad_inputs_are_quarantined_with_the_file_and_the_check(ukb_corpus):
    clean, corpus, expect, tmp = ukb_corpus
    assert clean.counts == {"inputs": 5, "written": 5, "quarantined": 0, "skipped": 0}
    _reconciles(corpus)
    assert corpus.counts == {"inputs": 5 + len(expect), "written": 5, "quarantined": len(expect), "skipped": 0}
    reasons = {q["key"]: q["reason"] for q in corpus.manifest["quarantined"]}
    assert sorted(reasons) == sorted(expect)
    wrong = {expect[k][0]: reasons[k] for k in expect if expect[k][1] not in reasons[k]}
    assert not wrong, wrong
    unnamed = {expect[k][0]: reasons[k] for k in expect if k not in reasons[k]}  # the subject's file or folder
    assert not unnamed, unnamed
    assert len(UKB_NIFTI) + len(UKB_DICOM) >= 30


def test_ukb_good_subjects_beside_bad_ones_are_byte_identical(ukb_corpus):
    clean, corpus, _, tmp = ukb_corpus
    a, b = _samples(tmp / "clean"), _samples(tmp / "corpus")
    assert sorted(a) == sorted(b) and len(a) == 5
    assert all(a[k] == b[k] for k in a)
    assert any("padding" in n for n in json.loads(b["8000001"]["meta.json"])["notes"])  # the quirk, noted


# ------------------------------------------------------------------------------------------------ k-space
def _h5(path: Path, arr: np.ndarray, key: str = "kspace_full") -> None:
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset(key, data=arr)


def _kspace_of(path: Path) -> np.ndarray:
    from data_prep.kspace.source import read_kspace_mat

    return read_kspace_mat(path)


#: k-space files: name -> (file stem to use, writer(path, a good file of that kind), reason)
KSPACE: dict[str, tuple[str, Callable[[Path, Path], None], str]] = {
    "garbage": ("cine_sax", lambda p, g: p.write_bytes(b"\x00garbage" * 100), "not a readable MATLAB MAT-file"),
    "truncated_v73": ("cine_sax", lambda p, g: p.write_bytes(g.read_bytes()[:3000]),
                      "corrupt or truncated MATLAB v7.3"),
    "truncated_v5": ("cine_sax", lambda p, g: scipy.io.savemat(p, {"kspace_full": _kspace_of(g).T}) or p.write_bytes(
        p.read_bytes()[:2000]), "corrupt or truncated MATLAB v5"),
    "rank_6": ("cine_sax", lambda p, g: _h5(p, np.zeros((2, 1, 1, 4, 8, 8), CDT)), "has rank 6"),
    "lge_with_frames": ("lge_sax", lambda p, g: _h5(p, np.ones((2, 2, 1, 4, 8, 8)[1:], CDT)),
                        "has rank 5 (MATLAB shape (8, 8, 4, 1, 2)), expected at most 4"),
    "all_zeros": ("cine_sax", lambda p, g: _h5(p, np.zeros(_kspace_of(g).shape, CDT)), "zero energy"),
    "nan_values": ("cine_sax", lambda p, g: _h5(p, np.full(_kspace_of(g).shape, np.nan, np.complex64).view(CDT)),
                   "non-finite values"),
    "real_dtype": ("cine_sax", lambda p, g: _h5(p, np.zeros((2, 1, 2, 8, 8), np.float32)), "non-complex dtype"),
    "wrong_key": ("cine_sax", lambda p, g: _h5(p, np.ones((1, 1, 1, 8, 8), CDT), key="img"), "keys present: ['img']"),
    "empty_array": ("cine_sax", lambda p, g: _h5(p, np.zeros((0, 1, 2, 8, 8), CDT)), "is empty"),
    "unsupported_kind": ("T1map", lambda p, g: shutil.copy(g, p), "unsupported file kind Cine/T1map.mat"),
    "lax_with_two_slices": ("cine_lax", lambda p, g: _h5(p, np.ones((2, 2, 2, 8, 8), CDT)),
                            "a long-axis stack must hold exactly 3 slices"),
    "symlink_loop": ("cine_sax", lambda p, g: p.symlink_to(p.name), "a symbolic link that does not resolve"),
    "dangling_link": ("cine_sax", lambda p, g: p.symlink_to("/nonexistent.mat"), "a symbolic link that does not "
                                                                                 "resolve"),
    "too_many_frames": ("cine_sax", lambda p, g: _h5(p, np.ones((40, 1, 1, 8, 8), CDT)),
                        "40 frames x 1 slices exceed the store's capacity"),
}


@pytest.fixture(scope="module")
def kspace_corpus(tiny_cohort, tmp_path_factory, ray_cluster):
    from data_prep.kspace.job import KSpaceJobConfig, run

    tmp = tmp_path_factory.mktemp("kspace_corpus")
    src = tmp / "src"
    shutil.copytree(tiny_cohort / "kspace", src)
    good = sorted(src.rglob("*.mat"))
    cine = next(p for p in good if p.name == "cine_sax.mat")
    # quirks of real files, which must convert: a single-frame single-slice cine saved by MATLAB (trailing singleton
    # axes dropped) as v5 and as v7.3
    k = _kspace_of(cine)[:1, :1]
    site = cine.parent.parent
    for name, fmt in (("P801", "v5"), ("P802", "v73")):
        (site / name).mkdir()
        dropped = k[0, 0]  # (nc, ny, nx)
        if fmt == "v5":
            scipy.io.savemat(site / name / "cine_sax.mat", {"kspace_full": dropped.T})
        else:
            _h5(site / name / "cine_sax.mat", np.ascontiguousarray(dropped).view(CDT))

    def convert(out: Path):
        return run(KSpaceJobConfig(src=src, size=32, job=JobConfig(out=out, block_size=4, workers=2)),
                   progress=False)[0]

    clean = convert(tmp / "clean")
    expect = {}
    for i, (kind, (stem, write, why)) in enumerate(KSPACE.items()):
        # the patient folder beside a good file of that kind (an unsupported kind: in the Cine folder)
        site = next((p.parent.parent for p in good if p.stem == stem and kind != "unsupported_kind"),
                    cine.parent.parent)
        folder = site / f"P9{i:02d}"
        folder.mkdir()
        path = folder / f"{stem}.mat"
        write(path, cine)
        expect[path.relative_to(src).as_posix()] = (kind, why)
    (src / "stray").mkdir()
    (src / "stray" / "notes.mat").write_bytes(b"MATLAB 5.0")
    expect["stray/notes.mat"] = ("outside_the_layout", "expected .../MultiCoil/")
    (cine.parent / "cine_sax_mask.mat").write_bytes(b"mask")  # a sampling mask: ignored, not an input
    return clean, convert(tmp / "corpus"), expect, tmp, len(good) + 2


def test_kspace_bad_inputs_are_quarantined_with_the_file_and_the_check(kspace_corpus):
    clean, corpus, expect, tmp, n_good = kspace_corpus
    assert clean.counts == {"inputs": n_good, "written": n_good, "quarantined": 0, "skipped": 0}
    _reconciles(corpus)
    assert corpus.counts == {"inputs": n_good + len(expect), "written": n_good, "quarantined": len(expect),
                             "skipped": 0}
    q = corpus.manifest["quarantined"]
    by_file = {os.path.relpath(r["files"][0], tmp / "src"): r["reason"] for r in q}
    assert sorted(by_file) == sorted(expect)
    wrong = {expect[f][0]: by_file[f] for f in expect if expect[f][1] not in by_file[f]}
    assert not wrong, wrong
    unnamed = {expect[f][0]: by_file[f] for f in expect if f not in by_file[f]}
    assert not unnamed, unnamed
    assert any(p.endswith("cine_sax_mask.mat") for p in corpus.manifest["ignored_files"])
    assert len(KSPACE) + 1 >= 15 and len(KSPACE) + 1 + len(UKB_NIFTI) + len(UKB_DICOM) >= 40


def test_kspace_good_files_beside_bad_ones_are_byte_identical(kspace_corpus):
    clean, corpus, _, tmp, n_good = kspace_corpus
    a, b = _samples(tmp / "clean"), _samples(tmp / "corpus")
    assert sorted(a) == sorted(b) and len(a) == n_good
    assert all(a[k] == b[k] for k in a)
    # the files saved with MATLAB's dropped singleton axes converted to the full-rank file's image
    one = {k: json.loads(v["meta.json"]) for k, v in a.items() if "/P80" in json.loads(v["meta.json"])["sequence_key"]}
    assert len(one) == 2 and all(m["kspace_shape"][:2] == [1, 1] and len(m["stored_shape"]) == 3
                                 for m in one.values())


# ------------------------------------------------------------------------------------------------ whole-file inputs
@pytest.mark.parametrize("kind,content,reason", [
    ("no_eid_column", b"foo,bar\n1,2\n", "no 'eid' column in the header"),
    ("binary", b"\x00\x01\x02garbage\xff\xfe", "not a UTF-8 text CSV"),
    ("unterminated_quote", b'eid,31-0.0\n1,2\n"unterminated\n', "cannot parse the CSV"),
    ("empty", b"", "empty file (no header)"),
    ("missing", None, "cannot read the UK Biobank CSV (No such file or directory)"),
])
def test_a_bad_tabular_csv_is_one_line_with_the_file(tiny_cohort, tmp_path, kind, content, reason):
    """The CSV is one input for the whole cohort: the command stops before Ray starts, with one line, exit 2."""
    import subprocess
    import sys

    csv_path = tmp_path / f"{kind}.csv"
    if content is not None:
        csv_path.write_bytes(content)
    res = subprocess.run([sys.executable, "-m", "data_prep", "ukb", "--config", "configs/data_prep/ukb_demo.yaml",
                          "--src", str(tiny_cohort / "ukb"), "--tabular", str(csv_path), "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.strip() == f"error: {csv_path}: {res.stderr.split(': ', 2)[2].strip()}"
    assert len(res.stderr.strip().splitlines()) == 1 and reason in res.stderr, res.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()
