"""Readers of the raw inputs as their sources deliver them (UK Biobank NIfTI / DICOM zips, k-space MAT-files)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CINE_VIEWS = ("sa", "la_2ch", "la_3ch", "la_4ch")
SEGMENTED_VIEWS = ("sa", "la_2ch", "la_4ch")  # UK Biobank has no 3-chamber segmentation


@dataclass
class CineStudy:
    """One subject's cine planes, whatever the source: view -> (X, Y, Z, T) pixels and RAS affine."""

    eid: str
    pixels: dict[str, np.ndarray]
    affines: dict[str, np.ndarray]
    frame_interval_ms: float
    segs: dict[str, np.ndarray] = field(default_factory=dict)  # view -> (X, Y, Z, T) ukbb_cardiac labels
    source: str = "nifti"
    notes: list[str] = field(default_factory=list)  # quirks met while reading (e.g. a missing DICOM manifest)
