"""One UK Biobank subject's cine planes -> the model's input stack (ViTa Sec. 4.1, configurable).

- Short axis: `sa_planes` contiguous slices covering the ventricles. With a segmentation, the stack starts at
  the first slice (from the base) whose end-diastolic LV blood pool reaches `base_area_fraction` of its
  largest cross-section, i.e. just below the base; without one, the window of slices with the most cardiac
  motion along the long axis (image-based).
- Crop `crop` x `crop` pixels (no resampling) around the heart: the bounding-box centre of the SA segmentation
  carried into every plane through the affines; without a segmentation, the point where the long axis (the
  intersection line of the 2- and 4-chamber planes) pierces the middle chosen SA slice; failing that, the
  centre of that slice.
- Intensities: per plane, clip to the (low, high) percentiles of its cropped frames, then min-max to [0, 1].
- Segmentations follow every step; labels move to one space over all planes (`format.LABELS`).
- All stored frames are kept (the frames used for training are chosen at load time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.format import LA_VIEWS, PHENOTYPES, SOURCE_LABEL_MAPS, plane_names
from data_prep.phenotypes import measure_phenotypes
from data_prep.sources import CineStudy
from data_prep.sources.ukb_nifti import InputError


@dataclass
class UKBPreprocessConfig:
    sa_planes: int = 6
    frames: int = 50  # frames every view must have; all are kept
    crop: int = 128
    percentiles: tuple[float, float] = (1.0, 99.5)
    base_area_fraction: float = 0.5
    motion_radius_mm: float = 30.0  # image-based slice choice: motion measured within this radius of the axis

    def __post_init__(self):
        if self.sa_planes < 1 or self.crop < 8 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError("sa_planes >= 1, crop >= 8 and 0 <= low < high <= 100 percentiles are required")


def validate(study: CineStudy, cfg: UKBPreprocessConfig) -> None:
    for view, px in study.pixels.items():
        where = f"subject {study.eid} ({study.source}) {view}"
        if px.shape[-1] != cfg.frames:
            raise InputError(f"{where}: {px.shape[-1]} frames, expected {cfg.frames}")
        if view in LA_VIEWS and px.shape[2] != 1:
            raise InputError(f"{where}: a long-axis view must have one slice, got {px.shape[2]}")
        if not np.isfinite(px).all():
            raise InputError(f"{where}: non-finite pixel values")
        if px.size == 0 or float(px.max()) == float(px.min()):
            raise InputError(f"{where}: empty (constant) image")
    z = study.pixels["sa"].shape[2]
    if z < cfg.sa_planes:
        raise InputError(f"subject {study.eid}: {z} short-axis slices, {cfg.sa_planes} required")


def long_axis(study: CineStudy) -> tuple[np.ndarray, np.ndarray]:
    """A point on and the direction of the intersection line of the 2- and 4-chamber planes (RAS mm)."""
    planes = []
    for view in ("la_2ch", "la_4ch"):
        A = study.affines[view]
        n = np.cross(A[:3, 0], A[:3, 1])
        n /= np.linalg.norm(n)
        planes.append((n, n @ A[:3, 3]))
    (n1, d1), (n2, d2) = planes
    u = np.cross(n1, n2)
    if np.linalg.norm(u) < 1e-3:
        raise InputError(f"subject {study.eid}: 2- and 4-chamber planes are parallel")
    u /= np.linalg.norm(u)
    # the point on the line closest to the origin: solve n1.p = d1, n2.p = d2, u.p = 0
    p = np.linalg.solve(np.stack([n1, n2, u]), np.array([d1, d2, 0.0]))
    return p, u


def _pierce(study: CineStudy, k: int) -> np.ndarray:
    """Voxel (i, j) where the long axis crosses SA slice k."""
    p, u = long_axis(study)
    A = study.affines["sa"]
    n = np.cross(A[:3, 0], A[:3, 1])
    origin = A[:3, 3] + k * A[:3, 2]
    denom = n @ u
    if abs(denom) < 1e-6:
        raise InputError(f"subject {study.eid}: long axis parallel to the short-axis slices")
    x = p + u * (n @ (origin - p)) / denom
    return (np.linalg.inv(A) @ np.append(x, 1.0))[:2]


def select_sa_slices(study: CineStudy, cfg: UKBPreprocessConfig) -> tuple[list[int], str]:
    z, n = study.pixels["sa"].shape[2], cfg.sa_planes
    seg = study.segs.get("sa")
    if seg is not None and (seg[..., 0] == 1).any():
        area = (seg[..., 0] == 1).sum(axis=(0, 1))
        start = int(np.argmax(area >= cfg.base_area_fraction * area.max()))
        method = "segmentation"
    else:  # image-based: the contiguous window with the most motion around the long axis
        px = study.pixels["sa"].astype(np.float32)
        spacing = float(np.linalg.norm(study.affines["sa"][:3, 0]))
        r = cfg.motion_radius_mm / spacing
        ii, jj = np.meshgrid(np.arange(px.shape[0]), np.arange(px.shape[1]), indexing="ij")
        score = np.empty(z)
        for k in range(z):
            try:
                ci, cj = _pierce(study, k)
            except InputError:  # degenerate long-axis geometry: measure around the image centre
                ci, cj = (px.shape[0] - 1) / 2.0, (px.shape[1] - 1) / 2.0
            disk = (ii - ci) ** 2 + (jj - cj) ** 2 <= r * r
            score[k] = px[disk, k, :].std(axis=-1).mean() if disk.any() else 0.0
        window = np.convolve(score, np.ones(n), mode="valid")
        start = int(np.argmax(window))
        method = "image"
    start = min(start, z - n)
    return list(range(start, start + n)), method


def heart_centre(study: CineStudy, slices: list[int]) -> tuple[np.ndarray, str]:
    """The crop centre in RAS mm."""
    seg = study.segs.get("sa")
    A = study.affines["sa"]
    if seg is not None:
        ijk = np.argwhere(np.isin(seg[:, :, slices, :], (1, 2, 3)).any(axis=-1))
        if len(ijk):
            centre = (ijk.min(0) + ijk.max(0)) / 2.0
            centre[2] = slices[0] + centre[2]
            return (A @ np.append(centre, 1.0))[:3], "segmentation"
    mid = slices[len(slices) // 2]
    try:
        i, j = _pierce(study, mid)
        method = "long-axis intersection"
    except InputError:  # degenerate long-axis geometry: fall back to the image centre
        (i, j), method = (np.array(study.pixels["sa"].shape[:2]) - 1) / 2.0, "image centre"
    return (A @ np.array([i, j, mid, 1.0]))[:3], method


def _crop(a: np.ndarray, ci: float, cj: float, size: int) -> np.ndarray:
    """(X, Y, ...) -> (size, size, ...) around (ci, cj), zero padded outside the image."""
    i0, j0 = int(round(ci)) - size // 2, int(round(cj)) - size // 2
    out = np.zeros((size, size) + a.shape[2:], a.dtype)
    si, sj = slice(max(i0, 0), min(i0 + size, a.shape[0])), slice(max(j0, 0), min(j0 + size, a.shape[1]))
    if si.start < si.stop and sj.start < sj.stop:
        out[si.start - i0:si.stop - i0, sj.start - j0:sj.stop - j0] = a[si, sj]
    return out


def normalise(x: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    lo, hi = np.percentile(x, percentiles)
    if hi <= lo:
        hi = lo + 1.0  # a flat crop (validated images are not flat overall): all zeros
    return np.clip((x.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _remap(seg: np.ndarray, view: str) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    for src, dst in SOURCE_LABEL_MAPS["sa" if view.startswith("sa") else view].items():
        lut[src] = dst
    return lut[seg]


def preprocess(study: CineStudy, cfg: UKBPreprocessConfig, heart_rate_bpm: float | None = None):
    """-> image (P, T, H, W) float16 in [0, 1], seg (P, T, H, W) uint8, seg_valid (P,), phenotypes, meta."""
    validate(study, cfg)
    slices, slice_method = select_sa_slices(study, cfg)
    centre, centre_method = heart_centre(study, slices)
    names = plane_names(cfg.sa_planes)
    P, T, S = len(names), cfg.frames, cfg.crop
    image = np.zeros((P, T, S, S), np.float16)
    seg = np.zeros((P, T, S, S), np.uint8)
    seg_valid = np.zeros(P, bool)
    crops = {}
    for p, name in enumerate(names):
        view, k = ("sa", slices[p]) if name.startswith("sa_") else (name, 0)
        ci, cj = (np.linalg.inv(study.affines[view]) @ np.append(centre, 1.0))[:2]
        crops[name] = [round(float(ci)), round(float(cj))]
        plane = _crop(study.pixels[view][:, :, k, :], ci, cj, S)  # (S, S, T)
        image[p] = normalise(plane, cfg.percentiles).transpose(2, 0, 1)
        if view in study.segs:
            seg[p] = _remap(_crop(study.segs[view][:, :, k, :], ci, cj, S), view).transpose(2, 0, 1)
            seg_valid[p] = True
    phenotypes = np.full(len(PHENOTYPES), np.nan, np.float32)
    if all(v in study.segs for v in ("sa", "la_2ch", "la_4ch")):
        hr = heart_rate_bpm or 60000.0 / (study.frame_interval_ms * T)
        ph = measure_phenotypes(study.segs["sa"], study.affines["sa"], study.segs["la_2ch"], study.affines["la_2ch"],
                                study.segs["la_4ch"], study.affines["la_4ch"], hr)
        phenotypes[:] = [ph[k] for k in PHENOTYPES]
    meta = {"eid": study.eid, "source": study.source, "planes": list(names), "sa_slices": slices,
            "sa_slice_method": slice_method, "crop_centre_method": centre_method, "crop_centres": crops,
            "crop_centre_ras_mm": [float(c) for c in centre], "frame_interval_ms": study.frame_interval_ms,
            "pixel_spacing_mm": {v: float(np.linalg.norm(study.affines[v][:3, 0])) for v in study.affines},
            "sa_slices_available": int(study.pixels["sa"].shape[2]), "notes": list(study.notes)}
    return image, seg, seg_valid, phenotypes, meta
