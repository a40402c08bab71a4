"""What the ACDC and M&Ms readers return: one cine short-axis case as it is on disk, labels already in the
project's label space (`core.vocab.SAX_LABEL_MAPS`), checked for the problems real releases have."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from core.vocab import SAX_LABEL_MAPS


class CaseError(ValueError):
    """A case that cannot be used as published: the message names the file and the reason (quarantined)."""


@dataclass
class SaxCase:
    dataset: str  # "acdc" / "mnms"
    name: str  # patient001 / A0S9V9
    published: str  # the dataset's own split: "train" / "test"
    image: np.ndarray  # (X, Y, Z, T) float32 as stored
    labels: dict[int, np.ndarray]  # 0-based frame -> (X, Y, Z) uint8 in LABELS space (the labelled frames only)
    spacing_mm: tuple[float, float, float]  # x, y, z voxel size
    ed: int  # 0-based
    es: int
    meta: dict = field(default_factory=dict)  # vendor, centre, group, height, weight, ... as the source gives them


def load_volume(path: Path, ndim: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """A NIfTI as (X, Y, Z[, T]) float32 and its voxel size: trailing singleton axes beyond `ndim` are dropped,
    a missing slice axis (a 2D export) is added."""
    if not path.is_file():
        raise CaseError(f"{path}: missing")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 (nibabel raises many kinds for a damaged file)
        raise CaseError(f"{path}: unreadable NIfTI ({type(e).__name__}: {e})") from e
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    if ndim == 4 and data.ndim == 5 and data.shape[3] == 1:  # (X, Y, Z, 1, T): time on the 5th axis
        data = data[:, :, :, 0]
    if ndim == 3 and data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != ndim:
        raise CaseError(f"{path}: expected a {ndim}D image, found shape {data.shape}")
    zooms = tuple(float(z) for z in img.header["pixdim"][1:4])  # (a 2D file's third is its pixdim[3], 1 if unset)
    if not all(np.isfinite(zooms)) or min(zooms) <= 0:
        raise CaseError(f"{path}: voxel size {zooms} is not usable")
    return data, zooms


def map_labels(gt: np.ndarray, dataset: str, path: Path) -> np.ndarray:
    """Published label ids -> LABELS space; any other value is an error naming the file."""
    ids = np.unique(gt)
    known = {0, *SAX_LABEL_MAPS[dataset]}
    bad = [float(v) for v in ids if v not in known]
    if bad:
        raise CaseError(f"{path}: label values {bad[:5]} outside {dataset}'s {sorted(known)}")
    lut = np.zeros(max(known) + 1, np.uint8)
    for src, ours in SAX_LABEL_MAPS[dataset].items():
        lut[src] = ours
    return lut[gt.astype(np.int64)]


def check_frames(path: Path, n_frames: int, ed: int, es: int) -> None:
    for what, t in (("ED", ed), ("ES", es)):
        if not 0 <= t < n_frames:
            raise CaseError(f"{path}: {what} frame {t} (0-based) outside the {n_frames} frames of the cine")
