"""Cardiac phenotypes measured from UK Biobank-style label maps (as in Bai et al. 2020, ukbb_cardiac).

Ventricles: slice summation over the short-axis stack (voxel area x slice spacing), end-diastole = frame 0,
end-systole = the frame of minimal LV volume; LV mass = myocardial volume at ED x 1.05 g/mL.
Atria: area-length method per frame on the long-axis segmentations — biplane for the LA (2ch and 4ch), single
plane for the RA (4ch) — with the chamber length taken as the major-axis length of the region's second moments.
"""

from __future__ import annotations

import math

import numpy as np

from core.vocab import PHENOTYPES

MYOCARDIUM_DENSITY_G_PER_ML = 1.05


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def ventricular_volumes_ml(seg_sa: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame LV / myocardium / RV volumes (mL) from an SA label map (X, Y, Z, T): LV 1, myo 2, RV 3."""
    voxel_ml = float(np.prod(voxel_sizes(affine))) / 1000.0  # z spacing = slice spacing: slice summation
    counts = {k: (seg_sa == lab).sum(axis=(0, 1, 2)) * voxel_ml for k, lab in (("lv", 1), ("myo", 2), ("rv", 3))}
    return counts


def _area_length(mask: np.ndarray, pixel_mm: np.ndarray) -> tuple[float, float]:
    """Area (mm^2) and major-axis length (mm) of a 2D region from its second moments."""
    ij = np.argwhere(mask)
    if len(ij) < 3:
        return 0.0, 0.0
    pts = ij * pixel_mm
    area = len(ij) * float(pixel_mm[0] * pixel_mm[1])
    lam = np.linalg.eigvalsh(np.cov(pts.T))
    return area, 4.0 * math.sqrt(max(lam[-1], 0.0))  # ellipse: var along major axis = (length/2)^2 / 4


def atrial_volumes_ml(seg_2ch, aff_2ch, seg_4ch, aff_4ch) -> dict[str, np.ndarray]:
    """Per-frame LA (biplane) and RA (single-plane 4ch) volumes in mL. seg_* are (X, Y, 1, T)."""
    px2, px4 = voxel_sizes(aff_2ch)[:2], voxel_sizes(aff_4ch)[:2]
    k = 8.0 / (3.0 * math.pi)
    la, ra = [], []
    for t in range(seg_4ch.shape[-1]):
        a2, l2 = _area_length(seg_2ch[:, :, 0, t] == 1, px2)
        a4, l4 = _area_length(seg_4ch[:, :, 0, t] == 1, px4)
        la.append(k * a2 * a4 / min(l2, l4) / 1000.0 if min(l2, l4) > 0 else 0.0)
        ar, lr = _area_length(seg_4ch[:, :, 0, t] == 2, px4)
        ra.append(k * ar * ar / lr / 1000.0 if lr > 0 else 0.0)
    return {"la": np.array(la), "ra": np.array(ra)}


def measure_phenotypes(seg_sa, aff_sa, seg_2ch, aff_2ch, seg_4ch, aff_4ch, heart_rate_bpm: float) -> dict:
    v = ventricular_volumes_ml(seg_sa, aff_sa)
    es = int(np.argmin(v["lv"]))
    out = {"LVEDV": v["lv"][0], "LVESV": v["lv"][es], "RVEDV": v["rv"][0], "RVESV": v["rv"].min(),
           "LVM": v["myo"][0] * MYOCARDIUM_DENSITY_G_PER_ML}
    out["LVSV"], out["RVSV"] = out["LVEDV"] - out["LVESV"], out["RVEDV"] - out["RVESV"]
    out["LVEF"] = 100.0 * out["LVSV"] / out["LVEDV"]
    out["RVEF"] = 100.0 * out["RVSV"] / out["RVEDV"]
    out["LVCO"] = out["LVSV"] * heart_rate_bpm / 1000.0  # L/min
    a = atrial_volumes_ml(seg_2ch, aff_2ch, seg_4ch, aff_4ch)
    for ch, key in (("la", "LA"), ("ra", "RA")):
        vmax, vmin = float(a[ch].max()), float(a[ch].min())
        out[f"{key}Vmax"], out[f"{key}Vmin"], out[f"{key}SV"] = vmax, vmin, vmax - vmin
        out[f"{key}EF"] = 100.0 * (vmax - vmin) / vmax if vmax > 0 else float("nan")
    return {k: float(out[k]) for k in PHENOTYPES}
