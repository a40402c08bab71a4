"""A 3D+T heart in a torso, imaged as UK Biobank cine planes.

One analytic anatomy per subject (LV cavity and myocardium as truncated prolate half-ellipsoids, a crescent RV,
ellipsoidal atria, an aortic root, lungs, liver, chest wall) is sampled at the voxel centres of every plane —
the short-axis stack and the 2/3/4-chamber long-axis planes — through real affines. Label maps are therefore
consistent across planes, and phenotypes measured from them follow the subject's physiology: volumes from the
subject's LVEDV/EF targets, wall thickness from body size and hypertension, an akinetic thinned sector for an
infarct.

Heart frame: `s` runs along the LV long axis from the endocardial apex (s = 0, fixed in time) to the base
(s = L(t)); `x` points from the LV towards the RV, `y = s × x`. Internal tissue codes are in `Tissue`; the
per-plane label spaces of the UK Biobank segmentations are applied by `plane_labels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data_prep.synth.physiology import Subject

N_FRAMES = 50
SA_SPACING_MM, SA_THICKNESS_MM, LA_THICKNESS_MM = 10.0, 8.0, 6.0


class Tissue:
    BACKGROUND, LV, MYO, RV, LA, RA, RV_WALL, AORTA, BODY, LUNG, LIVER, FAT, SPINE = range(13)


# bSSFP cine contrast: bright blood and fat, dark myocardium and lungs
CINE_INTENSITY = np.zeros(13, np.float32)
CINE_INTENSITY[[Tissue.LV, Tissue.RV, Tissue.LA, Tissue.RA, Tissue.AORTA]] = 1.0
CINE_INTENSITY[[Tissue.MYO, Tissue.RV_WALL]] = 0.27
CINE_INTENSITY[Tissue.BODY], CINE_INTENSITY[Tissue.LUNG] = 0.36, 0.05
CINE_INTENSITY[Tissue.LIVER], CINE_INTENSITY[Tissue.FAT], CINE_INTENSITY[Tissue.SPINE] = 0.33, 0.85, 0.45

# smooth texture modulates soft tissue strongly, blood (flow) slightly
TEXTURE_AMPLITUDE = np.zeros(13, np.float32)
TEXTURE_AMPLITUDE[[Tissue.BODY, Tissue.LIVER, Tissue.FAT]] = 0.18
TEXTURE_AMPLITUDE[[Tissue.LV, Tissue.RV, Tissue.LA, Tissue.RA]] = 0.06

# label spaces of the UK Biobank (ukbb_cardiac) segmentations, tissue -> label
PLANE_LABELS = {
    "sa": {Tissue.LV: 1, Tissue.MYO: 2, Tissue.RV: 3},
    "la_2ch": {Tissue.LA: 1},
    "la_4ch": {Tissue.LA: 1, Tissue.RA: 2},
}


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    axis = _unit(axis)  # Rodrigues
    return v * math.cos(angle) + np.cross(axis, v) * math.sin(angle) + axis * (axis @ v) * (1 - math.cos(angle))


def volume_curve(phase: np.ndarray, es_phase: float) -> np.ndarray:
    """Ventricular contraction c(phase) in [0, 1]: 0 at end-diastole (phase 0), 1 at end-systole; then rapid
    filling, diastasis and the atrial kick back to 0 at phase 1."""
    p = np.asarray(phase, float) % 1.0
    systole = 0.5 - 0.5 * np.cos(np.pi * np.clip(p / es_phase, 0, 1))
    rapid = np.clip((p - es_phase) / 0.22, 0, 1)
    kick = np.clip((p - 0.82) / 0.16, 0, 1)
    diastole = 1.0 - 0.72 * (0.5 - 0.5 * np.cos(np.pi * rapid)) - 0.28 * (0.5 - 0.5 * np.cos(np.pi * kick))
    return np.where(p <= es_phase, systole, diastole)


def atrial_curve(phase: np.ndarray, es_phase: float) -> np.ndarray:
    """Atrial filling a(phase) in [0, 1]: 1 (maximal volume) just after ventricular end-systole, 0 after the
    atrial contraction late in diastole."""
    p = np.asarray(phase, float) % 1.0
    peak = es_phase + 0.04
    fill = 0.5 - 0.5 * np.cos(np.pi * np.clip((p + 0.06) / (peak + 0.06), 0, 1))
    empty_passive = np.clip((p - peak) / 0.25, 0, 1)
    empty_active = np.clip((p - 0.8) / 0.14, 0, 1)
    late = 1.0 - 0.45 * (0.5 - 0.5 * np.cos(np.pi * empty_passive)) - 0.55 * (0.5 - 0.5 * np.cos(np.pi * empty_active))
    # after the atrial kick (p > 0.94) refilling starts again towards the next cycle's p = 0 value
    return np.where(p <= peak, fill * 0.88 + 0.12 * (p < 0.0), late)


@dataclass(frozen=True)
class Plane:
    """A cine plane: its name, matrix size (X, Y, Z) and RAS affine (voxel index -> mm)."""
    name: str
    shape: tuple[int, int, int]
    affine: np.ndarray

    def world_points(self) -> np.ndarray:
        """(X, Y, Z, 3) RAS coordinates of the voxel centres."""
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij"), -1).astype(np.float64)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]


class HeartModel:
    """The subject's anatomy over one cardiac cycle. `tissue(points_heart_frame, phase)` is the whole model."""

    def __init__(self, subject: Subject, rng: np.random.Generator):
        self.subject = s = subject
        self.es_phase = float(np.clip(0.30 + 0.0015 * (s.heart_rate_bpm - 65) * -1 + 0.02 * rng.standard_normal(),
                                      0.26, 0.42))
        # --- orientation in the scanner (RAS): apex anterior-left-inferior, base posterior-right-superior
        e_s = _unit([0.58, -0.52, 0.62] + 0.12 * rng.standard_normal(3))
        e_x = np.array([0.55, 0.83, 0.0]) + 0.1 * rng.standard_normal(3)  # towards the RV: right-anterior
        e_x = _unit(e_x - (e_x @ e_s) * e_s)
        self.R = np.stack([e_x, np.cross(e_s, e_x), e_s], 1)  # columns: x, y, s in RAS
        self.apex = np.array([-25.0, 35.0, -40.0]) + 6.0 * rng.standard_normal(3)  # RAS mm, cavity apex
        # --- LV geometry at end-diastole, from the physiology targets
        self.L_ed = s.lv_length_mm
        self.shortening = 0.13 + 0.02 * rng.standard_normal()  # long-axis shortening fraction at ES
        self.V_ed, self.V_es = s.lvedv_ml * 1e3, s.lvedv_ml * 1e3 * (1 - s.lvef_pct / 100)  # mm^3
        self.w_ed = s.lv_wall_mm
        # --- RV, atria, aorta: shapes relative to the LV, sizes calibrated below
        self.rv_aspect = float(np.clip(1.35 + 0.1 * rng.standard_normal(), 1.1, 1.6))
        self.aorta_angle = math.radians(135.0) + 0.1 * rng.standard_normal()
        self.aorta_r = 11.0 + 1.2 * rng.standard_normal() + 1.5 * s.sex
        self._rv_scale_ed = self._rv_scale_es = 1.0
        self._calibrate_rv()
        # torso: static background in the world frame
        self.torso = dict(cx=5.0 + 8 * rng.standard_normal(), cy=-5.0 + 5 * rng.standard_normal(),
                          ax=150.0 + 25 * (s.bmi - 26) / 4 + 10 * s.sex, ay=105.0 + 18 * (s.bmi - 26) / 4,
                          fat=8.0 + 1.2 * (s.bmi - 22) + 4 * (1 - s.sex))
        self.texture = rng.standard_normal((6, 4))  # smooth tissue texture: random plane waves

    # ----------------------------------------------------------------------------------------------- LV
    def lv_shape(self, phase):
        c = volume_curve(phase, self.es_phase)
        L = self.L_ed * (1 - self.shortening * c)
        V = self.V_ed + (self.V_es - self.V_ed) * c
        b = np.sqrt(V / (2.0 / 3.0 * np.pi * L))  # half prolate ellipsoid V = 2/3 pi b^2 L
        b_ed = math.sqrt(self.V_ed / (2.0 / 3.0 * math.pi * self.L_ed))
        w = self.w_ed * (b_ed / b) ** 0.9  # systolic wall thickening (myocardial volume roughly kept)
        return float(L), float(b), float(b_ed), float(w), float(c)

    def _rv_cavity(self, x, y, s, L, b_out, scale):
        # RV: half ellipsoid beside the LV on +x, minus the LV myocardium (handled by precedence)
        cx = 0.55 * b_out
        ax, ay, Lr = (b_out * 0.95) * scale, (b_out * 0.95 * self.rv_aspect) * scale, 0.88 * L
        u = (L - s) / Lr
        # the crescent ends at the septal insertion points: nothing of the RV on the LV's far side
        inside = (((x - cx) / ax) ** 2 + (y / ay) ** 2 + u**2 <= 1.0) & (x > 0.2 * b_out)
        return inside, (s <= L) & (s >= L - Lr)

    def _rv_volume(self, phase, scale, h=3.0):
        L, b, _, w, _ = self.lv_shape(phase)
        g = np.arange(-100, 140, h)
        x, y, s = np.meshgrid(g, g - 20, np.arange(-10, L + 1, h), indexing="ij")
        t = self.tissue(x, y, s, phase, rv_scale=scale)
        return float((t == Tissue.RV).sum() * h**3)

    def _calibrate_rv(self):
        """Scale the RV so its cavity volume hits the RVEDV / RVESV targets (secant on a coarse grid)."""
        s = self.subject
        targets = {0.0: s.rvedv_ml * 1e3, self.es_phase: s.rvedv_ml * 1e3 * (1 - s.rvef_pct / 100)}
        scales = []
        for phase, target in targets.items():
            k0, k1 = 1.0, 1.15
            v0, v1 = self._rv_volume(phase, k0), self._rv_volume(phase, k1)
            for _ in range(3):
                if abs(v1 - v0) < 1e-6:
                    break
                k0, k1, v0 = k1, float(np.clip(k1 + (target - v1) * (k1 - k0) / (v1 - v0), 0.4, 2.5)), v1
                v1 = self._rv_volume(phase, k1)
            scales.append(k1)
        self._rv_scale_ed, self._rv_scale_es = scales

    # ------------------------------------------------------------------------------------------ atria
    def atrium_radius(self, vol_max_ml, vol_min_ml, phase, elong):
        a = atrial_curve(phase, self.es_phase)
        v = (vol_min_ml + (vol_max_ml - vol_min_ml) * a) * 1e3
        r = (v / (4.0 / 3.0 * math.pi * elong)) ** (1 / 3)
        return float(r), float(r * elong)

    # ----------------------------------------------------------------------------------------- tissue
    def tissue(self, x, y, s, phase, rv_scale=None) -> np.ndarray:
        """Tissue code at heart-frame points (mm) for a cardiac phase in [0, 1); background is 0."""
        L, b, b_ed, w, c = self.lv_shape(phase)
        sub = self.subject
        out = np.zeros(np.shape(x), np.uint8)
        rho = np.hypot(x, y)
        theta = np.arctan2(y, x)
        # infarct: an apical sector that does not contract and is thinned
        k_inf = np.zeros_like(rho)
        if sub.infarct:
            d = np.abs((theta - sub.infarct_angle + np.pi) % (2 * np.pi) - np.pi)
            u_pos = (L - s) / L
            k_inf = (0.5 + 0.5 * np.cos(np.pi * np.clip(d / (sub.infarct_width / 2), 0, 1))) * (d < sub.infarct_width / 2)
            k_inf = k_inf * np.clip((u_pos - sub.infarct_start) / 0.1, 0, 1)
        b_local = b + (b_ed - b) * k_inf
        w_local = w + (0.45 * self.w_ed - w) * k_inf
        u = np.clip((L - s) / L, -1, 1)
        cavity = (s >= 0) & (s <= L) & (rho <= b_local * np.sqrt(np.clip(1 - u**2, 0, 1)))
        u_out = (L - s) / (L + w_local)
        outer = (s <= L) & (s >= -w_local) & (rho <= (b_local + w_local) * np.sqrt(np.clip(1 - u_out**2, 0, 1)))
        # aortic root: a tube leaving the base towards the 3-chamber direction, then upwards
        ca, sa_ = math.cos(self.aorta_angle), math.sin(self.aorta_angle)
        ao_c = 0.45 * b_ed + 0.3 * np.clip(s - L, 0, None)
        aorta = (s > L - 4) & (s < L + 55) & (np.hypot(x - ao_c * ca, y - ao_c * sa_) <= self.aorta_r)
        # atria above the valve plane: LA on the LV axis, RA above the RV
        la_r, la_h = self.atrium_radius(sub.lav_max_ml, sub.lav_min_ml, phase, 1.25)
        la = ((x + 0.1 * b_ed) ** 2 + y**2) / la_r**2 + ((s - L - 0.92 * la_h) / la_h) ** 2 <= 1
        ra_r, ra_h = self.atrium_radius(sub.rav_max_ml, sub.rav_min_ml, phase, 1.3)
        ra_cx = 1.25 * (b_ed + self.w_ed) + 0.35 * ra_r
        ra = ((x - ra_cx) ** 2 + y**2) / ra_r**2 + ((s - L - 0.9 * ra_h) / ra_h) ** 2 <= 1
        # RV cavity and its thin free wall
        if rv_scale is None:
            rv_c = volume_curve(phase, self.es_phase)
            rv_scale = self._rv_scale_ed + (self._rv_scale_es - self._rv_scale_ed) * rv_c
        rv_in, rv_span = self._rv_cavity(x, y, s, L, b + w, rv_scale)
        rv = rv_in & rv_span
        rv_wall_in, _ = self._rv_cavity(x, y, s, L, b + w + 3.0, rv_scale)
        rv_wall = rv_wall_in & (s <= L) & (s >= L - 0.88 * L - 3.0)
        # mediastinum around the heart (keeps the lungs off it) and epicardial fat on its surface
        centre_s = 0.6 * (L + la_h)
        out[(x / (1.9 * b_ed + 30)) ** 2 + (y / (1.7 * b_ed + 25)) ** 2 + ((s - centre_s) / (0.75 * L + 40)) ** 2 <= 1] = Tissue.BODY
        fat_outer = (s <= L + 2) & (s >= -w_local - 4) & (rho <= (b_local + w_local + 3.5) * np.sqrt(np.clip(1 - ((L - s) / (L + w_local + 4)) ** 2, 0, 1)))
        out[fat_outer] = Tissue.FAT
        fat_rv, _ = self._rv_cavity(x, y, s, L, b + w + 6.0, rv_scale)
        out[fat_rv & (s <= L + 2) & (s >= 0.1 * L - 6.0)] = Tissue.FAT
        # precedence: later assignments win
        out[rv_wall] = Tissue.RV_WALL
        out[rv] = Tissue.RV
        out[ra] = Tissue.RA
        out[la] = Tissue.LA
        out[aorta] = Tissue.AORTA
        out[outer] = Tissue.MYO
        out[cavity] = Tissue.LV
        return out

    # --------------------------------------------------------------------------------------- torso
    def background(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Static tissue codes and a smooth texture at RAS points p (..., 3)."""
        t = self.torso
        X, Y, Z = p[..., 0], p[..., 1], p[..., 2]
        r = ((X - t["cx"]) / t["ax"]) ** 2 + ((Y - t["cy"]) / t["ay"]) ** 2
        code = np.where(r <= 1.0, Tissue.BODY, Tissue.BACKGROUND).astype(np.uint8)
        inner = ((X - t["cx"]) / (t["ax"] - t["fat"])) ** 2 + ((Y - t["cy"]) / (t["ay"] - t["fat"])) ** 2
        code[(r <= 1.0) & (inner > 1.0)] = Tissue.FAT
        for side in (-1, 1):  # lungs
            lung = ((X - side * 0.55 * t["ax"]) / (0.36 * t["ax"])) ** 2 + ((Y + 10) / (0.75 * t["ay"])) ** 2 \
                + ((Z - 40) / 150) ** 2
            code[(lung <= 1.0) & (inner <= 1.0)] = Tissue.LUNG
        liver = ((X - 50) / 120) ** 2 + ((Y + 5) / 85) ** 2 + ((Z + 150) / 85) ** 2
        code[(liver <= 1.0) & (inner <= 1.0)] = Tissue.LIVER
        spine = np.hypot(X - t["cx"], Y - (t["cy"] - 0.72 * t["ay"])) <= 18
        code[spine] = Tissue.SPINE
        k = self.texture
        tex = sum(np.sin(p @ (k[i, :3] / (18 + 9 * i)) + 3 * k[i, 3]) for i in range(k.shape[0])) / k.shape[0]
        return code, tex.astype(np.float32)

    def to_heart(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = (p - self.apex) @ self.R
        return q[..., 0], q[..., 1], q[..., 2]

    # -------------------------------------------------------------------------------------- planes
    def planes(self, rng: np.random.Generator) -> dict[str, Plane]:
        """The SA stack (8-13 slices, 10 mm apart, b1 = most basal = k 0) and the three LA planes."""
        e_x, e_y, e_s = self.R[:, 0], self.R[:, 1], self.R[:, 2]
        out = {}
        pix = float(np.clip(1.82 + 0.04 * rng.standard_normal(), 1.7, 1.95))
        # SA: from just above the base at ED to beyond the apex
        top = self.L_ed + rng.uniform(0.0, 12.0)
        bottom = -self.w_ed - rng.uniform(0.0, 8.0)
        nz = int(np.clip(math.ceil((top - bottom) / SA_SPACING_MM) + 1, 8, 13))
        ang = rng.uniform(-0.4, 0.4)
        a1 = _rotate(e_x, e_s, ang + math.pi)  # image x: RV on the image left, as displayed clinically
        a2 = np.cross(e_s, a1)
        shape = (int(rng.integers(186, 214)), int(rng.integers(196, 230)), nz)
        centre = self.apex + e_s * top + 12 * rng.standard_normal(3) * np.array([1, 1, 0])
        out["sa"] = self._plane("sa", shape, a1 * pix, a2 * pix, -e_s * SA_SPACING_MM, centre)
        # LA: each contains the long axis; 4ch through the RV and both atria, 2ch perpendicular, 3ch via the LVOT
        mid = self.apex + e_s * (self.L_ed * 0.85)
        for name, angle in (("la_2ch", math.pi / 2), ("la_3ch", self.aorta_angle), ("la_4ch", 0.0)):
            d = math.cos(angle) * e_x + math.sin(angle) * e_y
            a1, a2 = d, -e_s  # base at the top of the image
            normal = np.cross(a1, a2)
            shape = (int(rng.integers(196, 224)), int(rng.integers(176, 212)), 1)
            c = mid + rng.uniform(-8, 8) * d
            out[name] = self._plane(name, shape, a1 * pix, a2 * pix, normal * LA_THICKNESS_MM, c)
        return out

    @staticmethod
    def _plane(name, shape, col_x, col_y, col_z, centre) -> Plane:
        A = np.eye(4)
        A[:3, 0], A[:3, 1], A[:3, 2] = col_x, col_y, col_z
        A[:3, 3] = centre - col_x * (shape[0] - 1) / 2 - col_y * (shape[1] - 1) / 2
        return Plane(name, shape, A)

    # ------------------------------------------------------------------------------------- imaging
    def tissue_codes(self, plane: Plane, phases) -> tuple[np.ndarray, np.ndarray]:
        """Tissue codes (X, Y, Z, len(phases)) uint8 of a plane, and the static texture (X, Y, Z)."""
        p = plane.world_points()
        bg_code, tex = self.background(p)
        x, y, s = self.to_heart(p)
        roi = (s > -40) & (s < self.L_ed + 110) & (np.hypot(x, y) < 120)  # everything cardiac lies inside
        xr, yr, sr = x[roi], y[roi], s[roi]
        codes = np.empty(plane.shape + (len(phases),), np.uint8)
        for t, phase in enumerate(phases):
            frame = bg_code.copy()
            h = self.tissue(xr, yr, sr, float(phase))
            frame[roi] = np.where(h > 0, h, frame[roi])
            codes[..., t] = frame
        return codes, tex

    def render(self, plane: Plane, rng: np.random.Generator, n_frames: int = N_FRAMES):
        """Tissue codes (X, Y, Z, T) uint8 and cine image (X, Y, Z, T) uint16 of one plane over the cycle."""
        codes, tex = self.tissue_codes(plane, np.arange(n_frames) / n_frames)
        X, Y = np.meshgrid(np.linspace(-1, 1, plane.shape[0]), np.linspace(-1, 1, plane.shape[1]), indexing="ij")
        g = rng.normal(0, 0.25, 4)  # coil bias field: smooth, static over the cycle
        bias = np.exp(g[0] * X + g[1] * Y + g[2] * X * Y + g[3] * (X**2 - Y**2) * 0.5).astype(np.float32)[..., None]
        sigma = np.float32(0.022 + 0.006 * rng.random())
        gain = np.float32(rng.uniform(180.0, 420.0))  # UK Biobank-like 12-bit range, blood ~ 200-450
        pixels = np.empty(codes.shape, np.uint16)
        for t in range(n_frames):  # frame by frame: small arrays stay in cache
            c = codes[..., t]
            img = CINE_INTENSITY[c] * (1.0 + TEXTURE_AMPLITUDE[c] * tex)
            img = ndimage.gaussian_filter(img, sigma=(0.7, 0.7, 0)) * bias  # point-spread blur, bias field
            real = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
            img = np.hypot(real, sigma * rng.standard_normal(img.shape, dtype=np.float32))  # Rician magnitude
            pixels[..., t] = np.clip(np.rint(img * gain), 0, 4095)
        return codes, pixels


def plane_labels(name: str, codes: np.ndarray) -> np.ndarray | None:
    """UK Biobank label map for a plane (None for the 3-chamber view, which has no segmentation)."""
    mapping = PLANE_LABELS.get(name)
    if mapping is None:
        return None
    lut = np.zeros(256, np.uint8)
    for tissue, label in mapping.items():
        lut[tissue] = label
    return lut[codes]
