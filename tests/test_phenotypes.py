"""Phenotypes (data_prep/ukb/phenotypes.py) measured on analytic shapes of known volume, not against themselves:
ellipsoids and boxes drawn into label maps on tilted, anisotropic grids; the formulas (slice summation, LV mass at
1.05 g/mL, biplane and single-plane area-length) must give the shapes' volumes within 1-2 %."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data_prep.ukb.phenotypes import atrial_volumes_ml, measure_phenotypes, ventricular_volumes_ml


def _tilted_affine(spacing) -> np.ndarray:
    """A rotated grid (the voxel sizes are the columns' norms, whatever the orientation)."""
    a, b = math.radians(30), math.radians(-20)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag(spacing)
    aff[:3, 3] = (-40.0, 12.0, 7.5)
    return aff


def _ellipsoid(shape, spacing, centre_mm, semi_mm) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre_mm, semi_mm)) <= 1.0


def _ellipsoid_ml(semi_mm) -> float:
    return 4.0 / 3.0 * math.pi * float(np.prod(semi_mm)) / 1000.0


SPACING = (0.8, 0.8, 2.0)  # in-plane 0.8 mm, 2 mm slices
SHAPE = (160, 160, 60)
CENTRE_LV = (60.0, 64.0, 60.0)
# per frame: the LV cavity's semi-axes (mm); frame 2 is the smallest (end-systole)
LV_SEMI = [(25.0, 22.0, 40.0), (21.0, 19.0, 36.0), (17.0, 15.0, 33.0), (20.0, 18.0, 35.0)]
WALL_MM = 8.0
# whole voxels (multiples of the spacing); ES: frame 3
RV_BOX_MM = [(32.0, 20.0, 60.0), (28.0, 18.4, 56.0), (24.0, 16.0, 52.0), (22.4, 14.4, 50.0)]


def _short_axis_stack() -> np.ndarray:
    seg = np.zeros(SHAPE + (len(LV_SEMI),), np.uint8)
    for t, (semi, box) in enumerate(zip(LV_SEMI, RV_BOX_MM)):
        outer = _ellipsoid(SHAPE, SPACING, CENTRE_LV, [s + WALL_MM for s in semi])
        seg[..., t][outer] = 2
        seg[..., t][_ellipsoid(SHAPE, SPACING, CENTRE_LV, semi)] = 1
        # the RV: a box of whole voxels beside the LV (x from 96 mm, past the LV wall's 93 mm)
        nx, ny, nz = (round(b / s) for b, s in zip(box, SPACING))
        assert not seg[120:120 + nx, 20:20 + ny, 2:2 + nz, t].any()
        seg[120:120 + nx, 20:20 + ny, 2:2 + nz, t] = 3
    return seg


def test_ventricular_volumes_and_mass_of_ellipsoids_and_boxes():
    aff = _tilted_affine(SPACING)
    v = ventricular_volumes_ml(_short_axis_stack(), aff)
    for t, (semi, box) in enumerate(zip(LV_SEMI, RV_BOX_MM)):
        lv = _ellipsoid_ml(semi)
        myo = _ellipsoid_ml([s + WALL_MM for s in semi]) - lv
        assert v["lv"][t] == pytest.approx(lv, rel=0.01), t
        assert v["myo"][t] == pytest.approx(myo, rel=0.015), t
        voxels = np.prod([round(b / s) for b, s in zip(box, SPACING)])
        assert v["rv"][t] == pytest.approx(voxels * np.prod(SPACING) / 1000.0, rel=1e-9), t  # whole voxels: exact
        assert v["rv"][t] == pytest.approx(np.prod(box) / 1000.0, rel=0.02), t


def _ellipse(shape, pixel_mm, centre_mm, semi_mm) -> np.ndarray:
    return _ellipsoid(shape, pixel_mm, centre_mm, semi_mm)


def _atria():
    """2ch and 4ch label maps (X, Y, 1, T) of prolate atria: the LA an ellipsoid with semi-axes (a, b, c), cut
    through its long axis c by both views (ellipses a x c in 2ch, b x c in 4ch); the RA a spheroid (r, r, c) in
    4ch. The area-length formulas are exact for these shapes."""
    shape, px = (180, 180), (0.9, 1.1)  # anisotropic pixels
    la = [(18.0, 16.0, 28.0), (14.0, 13.0, 24.0), (16.0, 15.0, 26.0)]
    ra = [(17.0, 27.0), (13.0, 23.0), (15.0, 25.0)]
    s2 = np.zeros(shape + (1, len(la)), np.uint8)
    s4 = np.zeros(shape + (1, len(la)), np.uint8)
    for t, ((a, b, c), (r, rc)) in enumerate(zip(la, ra)):
        s2[:, :, 0, t][_ellipse(shape, px, (80.0, 90.0), (a, c))] = 1
        s4[:, :, 0, t][_ellipse(shape, px, (45.0, 90.0), (b, c))] = 1
        s4[:, :, 0, t][_ellipse(shape, px, (120.0, 95.0), (r, rc))] = 2
    aff = _tilted_affine(px + (6.0,))
    expected_la = [_ellipsoid_ml(s) for s in la]
    expected_ra = [_ellipsoid_ml((r, r, rc)) for r, rc in ra]
    return s2, s4, aff, expected_la, expected_ra


def test_biplane_and_single_plane_atrial_volumes_of_ellipsoids():
    s2, s4, aff, expected_la, expected_ra = _atria()
    a = atrial_volumes_ml(s2, aff, s4, aff)
    for t in range(len(expected_la)):
        assert a["la"][t] == pytest.approx(expected_la[t], rel=0.02), t
        assert a["ra"][t] == pytest.approx(expected_ra[t], rel=0.02), t


def test_measure_phenotypes_end_systole_mass_function_and_output():
    s2, s4, aff_la, expected_la, expected_ra = _atria()
    p = measure_phenotypes(_short_axis_stack(), _tilted_affine(SPACING), s2, aff_la, s4, aff_la, heart_rate_bpm=60.0)
    lvedv, lvesv = _ellipsoid_ml(LV_SEMI[0]), _ellipsoid_ml(LV_SEMI[2])  # ED = frame 0, ES = the smallest LV
    assert p["LVEDV"] == pytest.approx(lvedv, rel=0.01) and p["LVESV"] == pytest.approx(lvesv, rel=0.01)
    assert p["LVEF"] == pytest.approx(100 * (lvedv - lvesv) / lvedv, abs=1.0)
    assert p["LVCO"] == pytest.approx((lvedv - lvesv) * 60 / 1000, rel=0.03)
    myo_ed = _ellipsoid_ml([s + WALL_MM for s in LV_SEMI[0]]) - lvedv
    assert p["LVM"] == pytest.approx(1.05 * myo_ed, rel=0.015)  # grams: 1.05 g/mL
    rvedv, rvesv = np.prod(RV_BOX_MM[0]) / 1000, np.prod(RV_BOX_MM[3]) / 1000  # the RV's own smallest frame
    assert p["RVEDV"] == pytest.approx(rvedv, rel=0.02) and p["RVESV"] == pytest.approx(rvesv, rel=0.02)
    assert p["LAVmax"] == pytest.approx(max(expected_la), rel=0.02)
    assert p["LAVmin"] == pytest.approx(min(expected_la), rel=0.02)
    assert p["RAVmax"] == pytest.approx(max(expected_ra), rel=0.02)
    assert p["RAVmin"] == pytest.approx(min(expected_ra), rel=0.02)
