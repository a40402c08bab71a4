"""One UK Biobank subject's cine planes -> the model's input stack (ViTa Sec. 4.1, configurable).

- Short axis, `sa_planes` slices. The base slice: with a segmentation the first slice (from the base) whose
  end-diastolic LV blood pool reaches `base_area_fraction` of its largest cross-section, i.e. just below the
  base; without one, the start of the contiguous window with the most cardiac motion around the long axis
  (image-based). `sa_selection: contiguous` (ViTa): the slices from there on. `spread`: evenly spaced from there
  to the apex — the last slice with ED LV blood pool, or without a segmentation the last slice of the run below
  the base whose motion stays above 15 % of the per-slice motion range (`_APEX_MOTION_FRACTION`).
- Geometry: each plane is stored as `crop` x `crop` pixels covering `fov_mm` x `fov_mm` around its centre, on
  the source pixel axes, resampled separably: exact area averaging of the source pixels where the stored grid is
  coarser (anti-aliased), linear interpolation where it is finer. Labels: each label's indicator is resampled the
  same way and the pixel takes the label with the largest share (background = the rest). Outside the image: 0.
  `fov_mm: null`: `crop` source pixels, no resampling (the old behaviour). Meta `pixel_spacing_mm` holds the
  STORED spacing per view (`fov_mm / crop`), `source_pixel_spacing_mm` the source's, `fov_mm` the field of view
  and `plane_affines` each stored plane's voxel -> RAS affine.
- Centres. SA: the bounding-box centre of the SA segmentation (LV, MYO, RV) in the chosen slices; without one,
  where the long axis (the intersection line of the 2- and 4-chamber planes) pierces the middle chosen slice;
  failing that, the centre of that slice. Each long-axis view its own (`la_centre`): the centre of the in-plane
  bounding box of the heart seen in the plane, moved as little as needed to keep its atria inside the field of
  view (a whole heart, 120-150 mm from apex to atrial roof, can exceed a small field of view: the apex is then
  what is cut). With segmentations, the heart = every labelled voxel (any frame) of every segmented plane — SA
  ventricles, 2/4-chamber atria — within `_SLAB_MM` of the plane, through the affines (so the unsegmented
  3-chamber view is placed from the other planes' labels), the atria = the long-axis labels among them. Without
  (DICOM-only input): the moving blood/fat-bright pixels near the long axis (`_motion_region`), the atria = the
  part of them more than one SA slice spacing beyond the most basal chosen SA slice.
- Intensities: per plane, clip to the (low, high) percentiles of its stored frames, then min-max to [0, 1].
- Segmentations follow every step; labels move to one space over all planes (`core.vocab.LABELS`). Phenotypes are
  measured on the source segmentations, at their resolution.
- All stored frames are kept (the frames used for training are chosen at load time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
from scipy import ndimage

from core.config import InputError
from core.vocab import LA_VIEWS, PHENOTYPES, SOURCE_LABEL_MAPS, plane_names
from data_prep.ukb.phenotypes import measure_phenotypes
from data_prep.ukb.study import CineStudy

_SLAB_MM = 10.0  # labelled voxels of other planes within this distance of a long-axis plane count as seen in it
_APEX_MOTION_FRACTION = 0.15  # image-based apex: the motion run below the base ends under this share of the range


@dataclass
class UKBPreprocessConfig:
    sa_planes: int = 6
    frames: int = 50  # frames every view must have; all are kept
    crop: int = 128  # stored grid: crop x crop pixels per plane
    fov_mm: Optional[float] = None  # field of view resampled onto the grid; None: crop source pixels, no resampling
    sa_selection: Literal["contiguous", "spread"] = "contiguous"  # SA slices from the base on, or base to apex
    percentiles: tuple[float, float] = (1.0, 99.5)
    base_area_fraction: float = 0.5
    motion_radius_mm: float = 30.0  # image-based slice choice: motion measured within this radius of the axis

    def __post_init__(self):
        if self.sa_planes < 1 or self.crop < 8 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError("sa_planes >= 1, crop >= 8 and 0 <= low < high <= 100 percentiles are required")
        if self.fov_mm is not None and not self.fov_mm > 0:
            raise ValueError(f"fov_mm must be positive (or null for no resampling), got {self.fov_mm}")
        if self.sa_selection not in ("contiguous", "spread"):
            raise ValueError(f"sa_selection must be 'contiguous' or 'spread', got {self.sa_selection!r}")


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
    validate_geometry(study)


PIXEL_MM = (0.3, 5.0)  # in-plane pixel spacing of a cardiac cine (UK Biobank: ~1.8 mm)
SLICE_GAP_MM = (1.0, 25.0)  # short-axis slice spacing (UK Biobank: 10 mm)
FRAME_MS = (2.0, 200.0)  # frame interval (UK Biobank: 50 frames over one RR interval, ~15-25 ms)


def validate_geometry(study: CineStudy) -> None:
    """Geometry a cine study must have before anything is measured in millimetres: finite, invertible affines,
    physiological pixel and slice spacings and frame interval, and long-axis planes that cross the short-axis
    stack (an absurd affine otherwise converts with blank long-axis planes and a 2e19 mL LVEDV)."""
    where = f"subject {study.eid} ({study.source})"
    if np.isfinite(study.frame_interval_ms) and not FRAME_MS[0] <= study.frame_interval_ms <= FRAME_MS[1]:
        raise InputError(f"{where}: frame interval {study.frame_interval_ms:g} ms outside {list(FRAME_MS)} ms")
    for view, A in study.affines.items():
        A = np.asarray(A, np.float64)
        if A.shape != (4, 4) or not np.isfinite(A).all():
            raise InputError(f"{where} {view}: affine is not a finite 4 x 4 matrix")
        if not np.isfinite(np.linalg.cond(A[:3, :3])) or np.linalg.cond(A[:3, :3]) > 1e6:
            raise InputError(f"{where} {view}: affine is singular (its axes are not independent)")
        si, sj = _spacing(A)
        if not (PIXEL_MM[0] <= si <= PIXEL_MM[1] and PIXEL_MM[0] <= sj <= PIXEL_MM[1]):
            raise InputError(f"{where} {view}: pixel spacing {si:g} x {sj:g} mm outside {list(PIXEL_MM)} mm")
    A_sa = np.asarray(study.affines["sa"], np.float64)
    nx, ny, nz = study.pixels["sa"].shape[:3]
    gap = float(np.linalg.norm(A_sa[:3, 2]))
    if nz > 1 and not SLICE_GAP_MM[0] <= gap <= SLICE_GAP_MM[1]:
        raise InputError(f"{where} sa: slice spacing {gap:g} mm outside {list(SLICE_GAP_MM)} mm")
    centre = _to_ras(A_sa, np.array([[(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2]]))[0]
    si, sj = _spacing(A_sa)
    radius = 0.5 * float(np.hypot(nx * si, ny * sj))
    for view in LA_VIEWS:
        A = np.asarray(study.affines[view], np.float64)
        n = _normal(A)
        dist = float(abs(n @ (centre - A[:3, 3])))
        ijk = _to_voxel(A, (centre - (n @ (centre - A[:3, 3])) * n)[None])[0]
        shape = study.pixels[view].shape
        inside = all(-0.25 * shape[k] <= ijk[k] <= 1.25 * shape[k] for k in (0, 1))
        if dist > radius or not inside:
            raise InputError(f"{where} {view}: the plane does not cross the short-axis stack (its centre lies "
                             f"{dist:.0f} mm from the plane, at pixel ({ijk[0]:.0f}, {ijk[1]:.0f}) of a "
                             f"{shape[0]} x {shape[1]} image)")


def _spacing(A: np.ndarray) -> tuple[float, float]:
    return float(np.linalg.norm(A[:3, 0])), float(np.linalg.norm(A[:3, 1]))


def _normal(A: np.ndarray) -> np.ndarray:
    n = np.cross(A[:3, 0], A[:3, 1])
    return n / np.linalg.norm(n)


def _to_ras(A: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Voxel coordinates (N, 3) -> RAS mm (N, 3) through the affine A."""
    return ijk @ A[:3, :3].T + A[:3, 3]


def _to_voxel(A: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """RAS mm (N, 3) -> voxel coordinates (N, 3) of the plane with affine A."""
    return _to_ras(np.linalg.inv(A), pts)


def long_axis(study: CineStudy) -> tuple[np.ndarray, np.ndarray]:
    """A point on and the direction of the intersection line of the 2- and 4-chamber planes (RAS mm)."""
    planes = []
    for view in ("la_2ch", "la_4ch"):
        A = study.affines[view]
        n = _normal(A)
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


def _sa_motion(study: CineStudy, cfg: UKBPreprocessConfig) -> np.ndarray:
    """Per SA slice: mean temporal standard deviation within `motion_radius_mm` of the long axis."""
    px = study.pixels["sa"].astype(np.float32)
    z = px.shape[2]
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
    return score


def select_sa_slices(study: CineStudy, cfg: UKBPreprocessConfig) -> tuple[list[int], str]:
    """-> chosen SA slice indices (base to apex) and how the base / apex were found ("segmentation" / "image")."""
    z, n = study.pixels["sa"].shape[2], cfg.sa_planes
    seg = study.segs.get("sa")
    if seg is not None and (seg[..., 0] == 1).any():
        area = (seg[..., 0] == 1).sum(axis=(0, 1))
        start = int(np.argmax(area >= cfg.base_area_fraction * area.max()))
        apex = int(np.nonzero(area)[0][-1])  # the last slice with LV blood pool at ED
        method = "segmentation"
    else:  # image-based: the contiguous window with the most motion around the long axis
        score = _sa_motion(study, cfg)
        start = int(np.argmax(np.convolve(score, np.ones(n), mode="valid")))
        apex, floor = start, score.min() + _APEX_MOTION_FRACTION * (score.max() - score.min())
        while apex + 1 < z and score[apex + 1] >= floor:
            apex += 1
        method = "image"
    start = min(start, z - n)
    if cfg.sa_selection == "spread" and apex - start + 1 > n:
        return [int(k) for k in np.round(np.linspace(start, apex, n))], method
    return list(range(start, start + n)), method


def heart_centre(study: CineStudy, slices: list[int]) -> tuple[np.ndarray, str]:
    """The short-axis crop centre in RAS mm."""
    seg = study.segs.get("sa")
    A = study.affines["sa"]
    if seg is not None:
        ijk = np.argwhere(np.isin(seg[:, :, slices, :], (1, 2, 3)).any(axis=-1)).astype(float)
        if len(ijk):
            ijk[:, 2] = np.asarray(slices)[ijk[:, 2].astype(int)]
            centre = (ijk.min(0) + ijk.max(0)) / 2.0
            return (A @ np.append(centre, 1.0))[:3], "segmentation"
    mid = slices[len(slices) // 2]
    try:
        i, j = _pierce(study, mid)
        method = "long-axis intersection"
    except InputError:  # degenerate long-axis geometry: fall back to the image centre
        (i, j), method = (np.array(study.pixels["sa"].shape[:2]) - 1) / 2.0, "image centre"
    return (A @ np.array([i, j, mid, 1.0]))[:3], method


def _labelled_points(study: CineStudy) -> dict[str, np.ndarray]:
    """Segmented view -> RAS mm (N, 3) of its voxels labelled in any frame."""
    out = {}
    for view, seg in study.segs.items():
        ijk = np.argwhere((seg > 0).any(axis=-1)).astype(float)
        out[view] = _to_ras(study.affines[view], ijk)
    return out


def _fit(centre: np.ndarray, lo: np.ndarray, hi: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Move `centre` (per axis) as little as needed for [lo, hi] to lie within centre +- half; centre on
    [lo, hi] where it is wider than the window."""
    a, b = hi - half, lo + half
    return np.where(a <= b, np.clip(centre, a, b), (lo + hi) / 2.0)


def _base(study: CineStudy, slices: list[int]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Where the long axis pierces the most basal chosen SA slice (RAS mm) and the unit direction along the long
    axis towards the base (SA slice index 0 is the base); None for a degenerate geometry."""
    try:
        p, u = long_axis(study)
        i, j = _pierce(study, slices[0])
    except InputError:
        return None
    A = study.affines["sa"]
    return (A @ np.array([i, j, slices[0], 1.0]))[:3], u * (-1.0 if u @ A[:3, 2] > 0 else 1.0)


def _motion_region(study: CineStudy, view: str, sa_centre: np.ndarray,
                   base: Optional[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Image-based heart region of a long-axis view: RAS mm of its moving pixels, and of those beyond the base
    (the atria). Motion = the temporal standard deviation of the frames, smoothed (2 mm), counted within 120 mm of
    the short-axis centre and 100 mm of the long axis, and only where the frames' smoothed maximum is at least
    half the bright end (99th percentile) there: blood or fat at some time, so that a lung border moving with the
    heart does not count. The pixels at >= 20 % of the largest motion, grown by 10 mm so that borders moving a
    little apart join: the connected region nearest the short-axis centre. Its atria: the part more than one SA
    slice spacing beyond where the long axis pierces the most basal chosen slice (that slice lies just below the
    valves)."""
    A = study.affines[view]
    px = study.pixels[view][:, :, 0, :].astype(np.float32)
    si, sj = _spacing(A)
    ij = np.stack(np.meshgrid(np.arange(px.shape[0]), np.arange(px.shape[1]), indexing="ij"), -1).reshape(-1, 2)
    ras = _to_ras(A, np.c_[ij, np.zeros(len(ij))])
    near = np.linalg.norm(ras - sa_centre, axis=1) <= 120.0
    if base is not None:
        off = ras - base[0]
        near &= np.linalg.norm(off - np.outer(off @ base[1], base[1]), axis=1) <= 100.0
    near = near.reshape(px.shape[:2])
    if not near.any():
        return np.zeros((0, 3)), np.zeros((0, 3))
    peak = ndimage.gaussian_filter(px.max(axis=-1), (2.0 / si, 2.0 / sj))
    bright = peak >= 0.5 * np.percentile(peak[near], 99)  # blood (and fat) at some time: not lung, muscle
    motion = ndimage.gaussian_filter(px.std(axis=-1), (2.0 / si, 2.0 / sj))
    motion = np.where(near & bright, motion, 0.0)
    none = np.zeros((0, 3))
    if not motion.max() > 0:
        return none, none
    mask = motion >= 0.2 * motion.max()
    regions, _ = ndimage.label(ndimage.binary_dilation(mask, np.ones((int(10 / si) | 1, int(10 / sj) | 1), bool)))
    idx = np.argwhere(mask)
    pts = _to_ras(A, np.c_[idx, np.zeros(len(idx))])
    lab = regions[idx[:, 0], idx[:, 1]]
    pts = pts[lab == lab[np.argmin(np.linalg.norm(pts - sa_centre, axis=1))]]
    gap = float(np.linalg.norm(study.affines["sa"][:3, 2]))  # one SA slice spacing
    atria = pts[(pts - base[0]) @ base[1] > gap] if base is not None else none
    return pts, atria


def la_centre(study: CineStudy, view: str, sa_centre: np.ndarray, base: Optional[tuple[np.ndarray, np.ndarray]],
              half_mm: float, points: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """A long-axis view's crop centre (voxel i, j) and how it was found; `half_mm`: half the field of view.

    The centre of the in-plane bounding box of the heart as seen in the plane, moved as little as needed to keep
    the atria in it inside the field of view (a heart can be longer than a small field of view: the apex is cut,
    not the atria). With segmentations, the heart = every labelled voxel (any frame) of every segmented plane
    within `_SLAB_MM` of this one, through the affines (the SA ventricles crossing it, its own atria, those of the
    other long-axis views near it: so the unsegmented 3-chamber view is placed too), the atria = the long-axis
    labels among them. Without segmentations: `_motion_region`, the atria = its part beyond the base.
    """
    A = study.affines[view]
    sp = np.array(_spacing(A))
    n, o = _normal(A), A[:3, 3]
    none = np.zeros((0, 3))
    seen = {v: p[np.abs((p - o) @ n) <= _SLAB_MM] for v, p in points.items()}
    heart = np.concatenate([p for p in seen.values()] + [none])
    if len(heart):
        atria = np.concatenate([p for v, p in seen.items() if v in LA_VIEWS] + [none])
        method = "segmentation"
    else:
        heart, atria = _motion_region(study, view, sa_centre, base)
        method = "motion"
    if not len(heart):
        return _to_voxel(A, sa_centre[None])[0, :2], "short-axis centre"
    ij = _to_voxel(A, heart)[:, :2] * sp  # mm along the plane's axes
    centre = (ij.min(0) + ij.max(0)) / 2.0
    if len(atria):
        a = _to_voxel(A, atria)[:, :2] * sp
        centre = _fit(centre, a.min(0) - sp, a.max(0) + sp, np.full(2, half_mm))
    return np.round(centre / sp, 2), method  # 0.01 px: float noise of the affines cannot flip a rounding


def _crop(a: np.ndarray, ci: float, cj: float, size: int) -> np.ndarray:
    """(X, Y, ...) -> (size, size, ...) around (ci, cj), zero padded outside the image."""
    i0, j0 = int(round(ci)) - size // 2, int(round(cj)) - size // 2
    out = np.zeros((size, size) + a.shape[2:], a.dtype)
    si, sj = slice(max(i0, 0), min(i0 + size, a.shape[0])), slice(max(j0, 0), min(j0 + size, a.shape[1]))
    if si.start < si.stop and sj.start < sj.stop:
        out[si.start - i0:si.stop - i0, sj.start - j0:sj.stop - j0] = a[si, sj]
    return out


def grid_weights(centre: float, step: float, size: int, n: int) -> np.ndarray:
    """(size, n) weights of the n source pixels in each of `size` stored pixels centred at centre + (a - (size -
    1) / 2) * step (source pixel units). Each stored pixel averages the source (as constant pixels) over a window
    max(step, 1) wide: the exact area average when step >= 1 (downsampling, anti-aliased), linear interpolation
    when step < 1; source outside [0, n) counts as 0."""
    c = centre + (np.arange(size) - (size - 1) / 2.0) * step
    w = max(step, 1.0)
    x = np.arange(n, dtype=np.float64)
    lo = np.maximum(x[None, :] - 0.5, (c - w / 2.0)[:, None])
    hi = np.minimum(x[None, :] + 0.5, (c + w / 2.0)[:, None])
    return (np.clip(hi - lo, 0.0, None) / w).astype(np.float32)


def _band(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense (S, n) weights -> (S, K) source indices and weights of each row's K nonzero (contiguous) columns."""
    nz = w > 0
    first = np.where(nz.any(1), nz.argmax(1), 0)
    K = max(int(nz.sum(1).max()), 1)
    idx = first[:, None] + np.arange(K)
    ok = idx < w.shape[1]
    idx = np.where(ok, idx, 0)
    return idx, np.where(ok, np.take_along_axis(w, idx, 1), 0.0).astype(np.float32)


def _apply(a: np.ndarray, wi: np.ndarray, wj: np.ndarray) -> np.ndarray:
    """(X, Y, ...) -> (Si, Sj, ...) = wi @ a @ wj^T over the first two axes (banded: a few source pixels each)."""
    extra = (1,) * (a.ndim - 2)
    (ii, wii), (jj, wjj) = _band(wi), _band(wj)
    t = sum(wii[:, k].reshape((-1, 1) + extra) * a[ii[:, k]] for k in range(ii.shape[1]))  # (Si, Y, ...)
    return sum(wjj[:, k].reshape((1, -1) + extra) * t[:, jj[:, k]] for k in range(jj.shape[1]))  # (Si, Sj, ...)


def resample(a: np.ndarray, wi: np.ndarray, wj: np.ndarray, labels: bool = False) -> np.ndarray:
    """A plane (X, Y, ...) onto the stored grid given by `grid_weights` per axis. Images: float32. Label maps:
    each label's indicator resampled alike, the pixel takes the label with the largest share (background = 1 -
    the others' shares), so labels are anti-aliased like the image and no label is invented."""
    rows, cols = np.nonzero(wi.any(0))[0], np.nonzero(wj.any(0))[0]  # only the source the grid touches
    if not len(rows) or not len(cols):
        return np.zeros((wi.shape[0], wj.shape[0]) + a.shape[2:], a.dtype if labels else np.float32)
    r, c = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    a, wi, wj = a[r, c], wi[:, r], wj[:, c]
    if not labels:
        return _apply(a.astype(np.float32), wi, wj)
    values = [v for v in np.unique(a) if v != 0]
    out = np.zeros((wi.shape[0], wj.shape[0]) + a.shape[2:], a.dtype)
    if values:
        share = np.stack([_apply((a == v).astype(np.float32), wi, wj) for v in values])
        best = share.argmax(0)
        top = np.take_along_axis(share, best[None], 0)[0]
        fg = top > 1.0 - share.sum(0)  # ties go to the background
        out[fg] = np.asarray(values, a.dtype)[best[fg]]
    return out


def store_plane(px: np.ndarray, lab: Optional[np.ndarray], A: np.ndarray, k: int, ci: float, cj: float, size: int,
                fov_mm: Optional[float]) -> tuple[np.ndarray, Optional[np.ndarray], list]:
    """One plane (X, Y, T) of a view with affine A (slice k), and its labels (or None), onto the stored grid:
    `size` x `size` pixels around voxel (ci, cj) covering `fov_mm` (None: `size` source pixels, no resampling).
    -> image (size, size, T), labels (size, size, T) or None, the stored plane's voxel -> RAS affine."""
    if fov_mm is None:
        step, origin = (1.0, 1.0), (round(float(ci)) - size // 2, round(float(cj)) - size // 2)
        image, lab = _crop(px, ci, cj, size), _crop(lab, ci, cj, size) if lab is not None else None
    else:
        si, sj = _spacing(A)
        step = (fov_mm / size / si, fov_mm / size / sj)
        origin = (ci - (size - 1) / 2.0 * step[0], cj - (size - 1) / 2.0 * step[1])
        wi, wj = grid_weights(ci, step[0], size, px.shape[0]), grid_weights(cj, step[1], size, px.shape[1])
        image, lab = resample(px, wi, wj), resample(lab, wi, wj, labels=True) if lab is not None else None
    M = np.array([[step[0], 0, 0, origin[0]], [0, step[1], 0, origin[1]], [0, 0, 1, k], [0, 0, 0, 1]])
    return image, lab, np.round(A @ M, 6).tolist()


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
    src_spacing = {v: _spacing(study.affines[v])[0] for v in study.affines}
    spacing = {v: (cfg.fov_mm / S if cfg.fov_mm else src_spacing[v]) for v in study.affines}
    points, base = _labelled_points(study), _base(study, slices)
    centres, methods = {}, {"sa": centre_method}
    for view in LA_VIEWS:
        half = (cfg.fov_mm or S * src_spacing[view]) / 2.0
        centres[view], methods[view] = la_centre(study, view, centre, base, half, points)
    crops, affines = {}, {}
    for p, name in enumerate(names):
        view, k = ("sa", slices[p]) if name.startswith("sa_") else (name, 0)
        A = study.affines[view]
        ci, cj = centres[view] if view in centres else _to_voxel(A, centre[None])[0, :2]
        lab = study.segs[view][:, :, k, :] if view in study.segs else None
        plane, lab, affines[name] = store_plane(study.pixels[view][:, :, k, :], lab, A, k, ci, cj, S, cfg.fov_mm)
        crops[name] = [round(float(ci)), round(float(cj))] if cfg.fov_mm is None else [round(float(ci), 3),
                                                                                        round(float(cj), 3)]
        image[p] = normalise(plane, cfg.percentiles).transpose(2, 0, 1)
        if lab is not None:
            seg[p] = _remap(lab, view).transpose(2, 0, 1)
            seg_valid[p] = True
    phenotypes = np.full(len(PHENOTYPES), np.nan, np.float32)
    if all(v in study.segs for v in ("sa", "la_2ch", "la_4ch")):
        hr = heart_rate_bpm or 60000.0 / (study.frame_interval_ms * T)
        ph = measure_phenotypes(study.segs["sa"], study.affines["sa"], study.segs["la_2ch"], study.affines["la_2ch"],
                                study.segs["la_4ch"], study.affines["la_4ch"], hr)
        phenotypes[:] = [ph[k] for k in PHENOTYPES]
    meta = {"eid": study.eid, "source": study.source, "planes": list(names), "sa_slices": slices,
            "sa_slice_method": slice_method, "sa_selection": cfg.sa_selection,
            "crop_centre_method": centre_method, "crop_centre_methods": methods, "crop_centres": crops,
            "crop_centre_ras_mm": [float(c) for c in centre], "frame_interval_ms": study.frame_interval_ms,
            "crop": S, "fov_mm": {v: cfg.fov_mm or S * spacing[v] for v in spacing}, "pixel_spacing_mm": spacing,
            "source_pixel_spacing_mm": src_spacing, "plane_affines": affines,
            "sa_slices_available": int(study.pixels["sa"].shape[2]), "notes": list(study.notes)}
    return image, seg, seg_valid, phenotypes, meta
