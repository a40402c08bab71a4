"""Synthetic cine short-axis segmentation cases written byte-for-byte in the layouts ACDC and M&Ms publish, from the
same analytic hearts as the UK Biobank cohort (`heart.HeartModel`): everything that reads those datasets runs here.

ACDC (Bernard et al. 2018), `acdc/database/{training,testing}/patientNNN/`:
    Info.cfg                          ED, ES (1-based frames), Group, Height, NbFrame, Weight
    patientNNN_4d.nii.gz              the cine stack (X, Y, Z, T), int16, a spacing-only affine as published
    patientNNN_frameFF.nii.gz         the ED and the ES volume (X, Y, Z)
    patientNNN_frameFF_gt.nii.gz      their labels: 1 RV, 2 MYO, 3 LV (uint8)
  training/ holds the first two thirds of the cases (the published 100 of 150), testing/ the rest.

M&Ms (Campello et al. 2021), `mnms/OpenDataset/`:
    Training/Labeled/<code>/<code>_sa.nii.gz      the cine stack (X, Y, Z, T) with the scanner's affine
    Training/Labeled/<code>/<code>_sa_gt.nii.gz   labels 1 LV, 2 MYO, 3 RV at the ED and ES frames, 0 elsewhere
    Testing/<code>/...                            the same
    211230_M&Ms_Dataset_information_diagnosis_opendataset.csv
        External code, VendorName, Vendor, Centre, ED, ES (0-based frames), Pathology, Sex, Age, Height, Weight
  Training holds vendors A and B only (as published); Testing all four vendors, each with its own intensity scale.

`sax_truth.csv` (ours, not part of either dataset) records per case its ED / ES frame and the LV, MYO and RV voxel
counts at both, in the project's label space, so that a reader with a swapped label map is caught.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import nibabel as nib
import numpy as np

from core.fsutil import atomic_path, atomic_write_text
from core.vocab import LABELS, SAX_LABEL_MAPS
from data_prep.synth.heart import HeartModel, Plane, plane_labels
from data_prep.synth.physiology import sample_subject, subject_rng

MNMS_CSV = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
MNMS_COLUMNS = ["External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Pathology", "Sex", "Age", "Height",
                "Weight"]
MNMS_VENDORS = {"A": ("Siemens", (1,), 1.0), "B": ("Philips", (2, 3), 0.8), "C": ("GE", (4,), 1.25),
                "D": ("Canon", (5,), 0.65)}  # name, centres, intensity scale (the vendor domain shift)
_EID_BASE = {"acdc": 7_000_000, "mnms": 8_000_000}  # subjects apart from the UK Biobank cohort's eids
_ANATOMY, _IMAGING, _PHYSIOLOGY = 1, 2, 0


def _sa_plane(heart: HeartModel, rng: np.random.Generator, spacing_mm: float, scale: float) -> Plane:
    """The heart's short-axis stack at `spacing_mm` / `scale` in-plane (the stack's centre and slices kept)."""
    sa = heart.planes(rng)["sa"]
    A = sa.affine.copy()
    pix = spacing_mm / scale
    centre = A[:3, 3] + A[:3, 0] * (sa.shape[0] - 1) / 2 + A[:3, 1] * (sa.shape[1] - 1) / 2
    n = [max(16, int(round(s * np.linalg.norm(A[:3, i]) / pix))) for i, s in enumerate(sa.shape[:2])]
    A[:3, 0] *= pix / np.linalg.norm(A[:3, 0])
    A[:3, 1] *= pix / np.linalg.norm(A[:3, 1])
    A[:3, 3] = centre - A[:3, 0] * (n[0] - 1) / 2 - A[:3, 1] * (n[1] - 1) / 2
    return Plane("sa", (n[0], n[1], sa.shape[2]), A)


def _group(subject) -> str:
    """An ACDC-style diagnostic group from the subject's physiology."""
    if subject.infarct:
        return "MINF"
    if subject.lvef_pct < 45:
        return "DCM"
    if subject.lv_wall_mm > 12:
        return "HCM"
    if subject.rvef_pct < 45:
        return "RV"
    return "NOR"


def render_case(dataset: str, index: int, seed: int, scale: float, frames: tuple[int, int]) -> dict:
    """One case: image (X, Y, Z, T) uint16, labels (X, Y, Z, T) in LABELS space, affine, ED / ES (0-based)."""
    eid = _EID_BASE[dataset] + index
    subject = sample_subject(eid, subject_rng(seed, eid, _PHYSIOLOGY))
    heart = HeartModel(subject, subject_rng(seed, eid, _ANATOMY))
    rng = subject_rng(seed, eid, _IMAGING)
    plane = _sa_plane(heart, rng, float(rng.uniform(1.3, 1.7)), scale)
    n_frames = int(rng.integers(frames[0], frames[1] + 1))
    codes, pixels = heart.render(plane, rng, n_frames=n_frames)
    labels = plane_labels("sa", codes)
    lv = (labels == LABELS.index("LV")).sum(axis=(0, 1, 2))
    return {"subject": subject, "image": pixels, "labels": labels, "affine": plane.affine, "ed": 0,
            "es": int(np.argmin(lv)), "frames": n_frames, "rng": rng}


def _save(path: Path, data: np.ndarray, affine: np.ndarray, zooms=None) -> None:
    img = nib.Nifti1Image(data, affine)
    if zooms is not None:
        img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _to_source(labels: np.ndarray, dataset: str) -> np.ndarray:
    """Project labels -> the dataset's published ids (the inverse of `SAX_LABEL_MAPS[dataset]`)."""
    lut = np.zeros(256, np.uint8)
    for src, ours in SAX_LABEL_MAPS[dataset].items():
        lut[ours] = src
    return lut[labels]


def _truth(dataset: str, case: str, split: str, c: dict) -> dict:
    row = {"dataset": dataset, "case": case, "split": split, "ed": c["ed"], "es": c["es"], "frames": c["frames"]}
    for phase in ("ed", "es"):
        for s in ("LV", "MYO", "RV"):
            row[f"{s}_{phase}_voxels"] = int((c["labels"][..., c[phase]] == LABELS.index(s)).sum())
    return row


def write_acdc_case(root: Path, index: int, n_cases: int, seed: int, scale: float,
                    frames: tuple[int, int] = (12, 30)) -> dict:
    """Case `index` (0-based) of `n_cases` under `root` (= .../acdc); returns its truth row."""
    c = render_case("acdc", index, seed, scale, frames)
    n_train = int(math.ceil(2 * n_cases / 3))
    split = "training" if index < n_train else "testing"
    name = f"patient{index + 1:03d}"
    d = root / "database" / split / name
    dx, dy = (float(np.linalg.norm(c["affine"][:3, i])) for i in (0, 1))
    dz = float(np.linalg.norm(c["affine"][:3, 2]))
    affine = np.diag([dx, dy, dz, 1.0])  # ACDC's NIfTI carry the voxel size only, no scanner orientation
    image = c["image"].astype(np.int16)
    _save(d / f"{name}_4d.nii.gz", image, affine, (dx, dy, dz, 1.0))
    for t in (c["ed"], c["es"]):
        _save(d / f"{name}_frame{t + 1:02d}.nii.gz", image[..., t], affine)
        _save(d / f"{name}_frame{t + 1:02d}_gt.nii.gz", _to_source(c["labels"][..., t], "acdc"), affine)
    s = c["subject"]
    atomic_write_text(d / "Info.cfg", f"ED: {c['ed'] + 1}\nES: {c['es'] + 1}\nGroup: {_group(s)}\n"
                                      f"Height: {s.height_cm:.1f}\nNbFrame: {c['frames']}\nWeight: {s.weight_kg:.1f}\n")
    return _truth("acdc", name, "train" if split == "training" else "test", c)


def mnms_code(index: int, seed: int) -> str:
    rng = np.random.default_rng([seed, 515, index])
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), 6))


def write_mnms_case(root: Path, index: int, n_cases: int, seed: int, scale: float,
                    frames: tuple[int, int] = (20, 30)) -> tuple[dict, dict]:
    """Case `index` of `n_cases` under `root` (= .../mnms); returns (truth row, information CSV row)."""
    c = render_case("mnms", index, seed, scale, frames)
    n_train = int(math.ceil(2 * n_cases / 3))
    train = index < n_train
    vendor = "AB"[index % 2] if train else "ABCD"[index % 4]
    vname, centres, gain = MNMS_VENDORS[vendor]
    code = mnms_code(index, seed)
    d = root / "OpenDataset" / ("Training/Labeled" if train else "Testing") / code
    image = np.clip(np.rint(c["image"] * gain), 0, 32767).astype(np.int16)
    _save(d / f"{code}_sa.nii.gz", image, c["affine"])
    gt = np.zeros_like(c["labels"])
    for t in (c["ed"], c["es"]):  # labelled at ED and ES only
        gt[..., t] = _to_source(c["labels"][..., t], "mnms")
    _save(d / f"{code}_sa_gt.nii.gz", gt, c["affine"])
    s = c["subject"]
    info = {"External code": code, "VendorName": vname, "Vendor": vendor, "Centre": centres[index % len(centres)],
            "ED": c["ed"], "ES": c["es"], "Pathology": _group(s), "Sex": "M" if s.sex else "F", "Age": int(s.age),
            "Height": round(s.height_cm, 1), "Weight": round(s.weight_kg, 1)}
    return _truth("mnms", code, "train" if train else "test", c), info


def write_mnms_csv(root: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MNMS_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: r["External code"]))
    atomic_write_text(root / "OpenDataset" / MNMS_CSV, buf.getvalue())
