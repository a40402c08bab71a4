"""Deterministic synthetic multi-coil cardiac k-space in the CMRxRecon / MMCMR-427K layout.

No real CMRxRecon / MMCMR-427K data can reach this project's machines, so this
module writes raw, fully sampled, multi-coil k-space *exactly as those datasets
deliver it*, for the conversion job and for MetaCLIP-CMR pre-training (whose
text is generated from modality, view, vendor, field strength and scanner
model parsed from the folder layout).

Layout (one file per sequence)::

    <root>/MultiCoil/<Modality>/TrainingSet/FullSample/Center{k:03d}/
        <Vendor>_<Field>_<Model>/P{n:03d}/<name>.mat

e.g. ``MultiCoil/Cine/TrainingSet/FullSample/Center002/Siemens_30T_Vida/P003/cine_sax.mat``.
``<Field>`` is ``15T`` (1.5 T) or ``30T`` (3.0 T).  Each centre owns a fixed
set of scanners (:data:`CENTERS`); patients are numbered per
centre/scanner, and the same ``P{n}`` under different modalities of one
scanner is the same synthetic person (shared anatomy, scar, ...).

File kinds (:data:`CATALOGUE`, the single place they are defined); each kind is
one (modality, view) *stratum* of the archive:

=========== ============= ============================ ============ =========
modality    name          views (per slice)            nz           nt
=========== ============= ============================ ============ =========
Cine        cine_sax      sax                          3-6          12 frames
Cine        cine_lax      2ch, 3ch, 4ch (this order)   3            12 frames
Cine        cine_lax_2ch  2ch                          1            12 frames
Cine        cine_lax_3ch  3ch                          1            12 frames
Cine        cine_lax_4ch  4ch                          1            12 frames
Cine        cine_lvot     lvot                         1            12 frames
Mapping     T1map         sax                          3            9 TIs
Mapping     T2map         sax                          3            3 TEs
LGE         lge_sax       sax                          4-7          (4D)
BlackBlood  blackblood    sax                          3-5          (4D)
=========== ============= ============================ ============ =========

``cine_lax`` is the long-axis stack of CMRxRecon 2023/2024 (one slice per view);
``cine_lax_2ch`` / ``_3ch`` / ``_4ch`` are per-view files as CMRxRecon 2025 names
them (the reader takes both, :func:`data_prep.kspace.source.slice_views`).  A
synthetic archive holds both, so every cine view has files with a single view label.

Array layout -- as h5py sees a MATLAB v7.3 file (MATLAB itself reports the
reversed order ``(kx, ky, sc, sz, t)``, as in the CMRxRecon documentation):

* 5D ``(nt, nz, nc, ny, nx)`` for cine and mapping,
* 4D ``(nz, nc, ny, nx)`` for LGE and black blood (no time axis).

MATLAB v7.3 files (:func:`write_mat_v73`) are HDF5 with the 512-byte MATLAB
userblock, dataset ``kspace_full`` of compound dtype
``[("real", "<f4"), ("imag", "<f4")]`` and attribute ``MATLAB_class=b"single"``.
MATLAB v5 files (:func:`write_mat_v5`, via ``scipy.io.savemat``) hold the
*same MATLAB variable*: because v5 keeps whatever axis order it is given, the
array is stored in MATLAB order ``(nx, ny, nc, nz[, nt])`` -- the order the
CMRxRecon 2023 documentation gives, ``(kx, ky, sc, sz, t)`` -- i.e. the
canonical array transposed.  :func:`read_kspace_mat` undoes this, so it returns
the canonical ``(nt, nz, nc, ny, nx)`` / ``(nz, nc, ny, nx)`` for both formats.

The reading side -- :data:`RELPATH_RE`, :func:`parse_relpath`,
:func:`read_kspace_mat`, :data:`DEFAULT_KEY` -- lives in
:mod:`data_prep.kspace.source` (shared with the real datasets) and is
re-exported here.

Images: every (t, z) magnitude image is rendered from a 2D cardiac phantom for
the slice's view (short axis: LV pool, myocardial ring, RV crescent,
papillary muscles, pericardial fat, lungs, liver, spine, descending aorta and
body wall; long axis 2ch/3ch/4ch/LVOT: LV + atria, RV/RA in 4ch, aortic root in
3ch/LVOT), with per-modality contrast physics from per-tissue PD/T1/T2
(:data:`TISSUES`): bSSFP cine (bright blood and fat, dark myocardium,
contracting blood pool), MOLLI-like T1 mapping ``|1 - 2 exp(-TI/T1)|`` with
field-dependent T1, T2-prepared ``exp(-TE/T2)`` mapping, LGE inversion
recovery with nulled myocardium and an enhancing segment in some patients,
and double-IR black-blood TSE.  Field strength and vendor change T1, noise
(Rician, in the magnitude), bias field and the arbitrary raw intensity scale.

Coils: smooth complex sensitivities (Gaussians around coil centres on an
ellipse around the FOV, smooth phase) normalised so that ``sum_c |S_c|^2 == 1``
at every pixel.  With a smooth image phase ``phi``::

    kspace[..., c, :, :] = centered_fft2(S_c * magnitude * exp(1j * phi))

hence ``rss(centered_ifft2(kspace), coil_axis=-3) == render_magnitude(scan)``
up to float32 rounding (noise is part of the rendered magnitude).

Determinism: all randomness comes from ``numpy.random.default_rng`` seeded
with ``np.random.SeedSequence`` built from ``(seed, index)`` (scan-level) or
``(seed, centre, scanner, patient)`` (patient anatomy); no global state, no
timestamps (fixed MAT header dates), so a scan's bytes depend only on the plan
seed and its index -- not on worker scheduling -- and
``plan_kspace_scans(n, s)`` is a prefix of ``plan_kspace_scans(n + m, s)``.
"""

from __future__ import annotations

import io
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import h5py
import numpy as np
import scipy.io

from core.fsutil import atomic_path
from data_prep.kspace.mri import centered_fft2
# Reading side (path layout, MAT reader) lives in data_prep.kspace.source; re-exported here.
from data_prep.kspace.source import DEFAULT_KEY, RELPATH_RE, parse_relpath, read_kspace_mat

__all__ = [
    "CATALOGUE",
    "CENTERS",
    "DEFAULT_KEY",
    "FORMATS",
    "RELPATH_RE",
    "TISSUES",
    "TRUTH_COLUMNS",
    "KSpaceScan",
    "ScanKind",
    "Scanner",
    "kind_of",
    "make_kspace",
    "parse_relpath",
    "plan_kspace_scans",
    "read_kspace_mat",
    "render_labels",
    "render_magnitude",
    "sequence_times_ms",
    "write_mat_v5",
    "write_mat_v73",
    "write_scan",
]

FORMATS = ("v73", "v5")

# --------------------------------------------------------------------------------------
# Catalogue: scanners, centres, file kinds
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scanner:
    """One scanner model as named in the dataset's scanner folder."""

    vendor: str
    field_strength_t: float
    model: str
    nc_range: tuple[int, int]  # inclusive range of receive coils after coil selection

    @property
    def folder(self) -> str:
        """``<Vendor>_<Field>_<Model>``, e.g. ``Siemens_30T_Vida``."""
        return f"{self.vendor}_{_field_code(self.field_strength_t)}_{self.model}"


def _field_code(field_t: float) -> str:
    return f"{int(round(field_t * 10)):02d}T"  # 1.5 -> "15T", 3.0 -> "30T"


def _s(folder: str, nc: tuple[int, int]) -> Scanner:
    vendor, field, model = folder.split("_", 2)
    return Scanner(vendor, int(field[:-1]) / 10.0, model, nc)


#: Each centre owns a fixed small set of scanners (centre is meaningful metadata).
CENTERS: Mapping[str, tuple[Scanner, ...]] = {
    "Center001": (_s("UIH_30T_umr780", (8, 10)), _s("UIH_15T_umr670", (6, 8))),
    "Center002": (_s("Siemens_30T_Vida", (8, 10)), _s("Siemens_15T_Avanto", (4, 6))),
    "Center003": (_s("Siemens_15T_Aera", (6, 8)), _s("Siemens_30T_Prisma", (8, 10))),
    "Center004": (_s("GE_15T_voyager", (6, 8)), _s("GE_30T_architect", (8, 10))),
    "Center005": (_s("Philips_30T_Ingenia", (6, 8)), _s("Philips_15T_Achieva", (4, 6))),
    "Center006": (_s("Siemens_15T_Sola", (6, 8)), _s("UIH_30T_umr790", (8, 10))),
}

# (center, scanner) pairs, a stable index per pair (used in patient seeds)
_SITES: tuple[tuple[str, Scanner], ...] = tuple(
    (c, s) for c in sorted(CENTERS) for s in CENTERS[c]
)


# Order in which a plan's first scans visit the sites (start offset from the seed):
# field strength alternates and vendors are spread, so any 8 consecutive sites
# (cyclically) cover both field strengths, >= 3 vendors and >= 4 centres.
_SITE_ORDER_FOLDERS = (
    ("Center002", "Siemens_30T_Vida"),
    ("Center004", "GE_15T_voyager"),
    ("Center001", "UIH_30T_umr780"),
    ("Center003", "Siemens_15T_Aera"),
    ("Center005", "Philips_30T_Ingenia"),
    ("Center006", "Siemens_15T_Sola"),
    ("Center006", "UIH_30T_umr790"),
    ("Center002", "Siemens_15T_Avanto"),
    ("Center004", "GE_30T_architect"),
    ("Center001", "UIH_15T_umr670"),
    ("Center003", "Siemens_30T_Prisma"),
    ("Center005", "Philips_15T_Achieva"),
)
_SITE_ORDER: tuple[int, ...] = tuple(
    next(i for i, (c, s) in enumerate(_SITES) if (c, s.folder) == cf) for cf in _SITE_ORDER_FOLDERS
)
assert sorted(_SITE_ORDER) == list(range(len(_SITES))), "site order must visit every site once"


@dataclass(frozen=True)
class ScanKind:
    """One file kind of the catalogue (modality folder + file stem)."""

    modality: str  # folder name: Cine, Mapping, LGE, BlackBlood
    name: str  # file stem: cine_sax, ...
    contrast: str  # cine | t1map | t2map | lge | blackblood
    views: tuple[str, ...] | None  # fixed per-slice views, or None = all "sax"
    nz_range: tuple[int, int]  # inclusive
    nt: int | None  # None = 4D file (no time axis)


#: The file kinds (one per (modality, view) stratum), in the order of a plan's first
#: cycle: the four modality folders within the first four scans, all five modality
#: labels within the first six, every kind within the first ``len(CATALOGUE)``.
CATALOGUE: tuple[ScanKind, ...] = (
    ScanKind("Cine", "cine_sax", "cine", None, (3, 6), 12),
    ScanKind("Mapping", "T1map", "t1map", None, (3, 3), 9),
    ScanKind("LGE", "lge_sax", "lge", None, (4, 7), None),
    ScanKind("BlackBlood", "blackblood", "blackblood", None, (3, 5), None),
    ScanKind("Cine", "cine_lax", "cine", ("2ch", "3ch", "4ch"), (3, 3), 12),
    ScanKind("Mapping", "T2map", "t2map", None, (3, 3), 3),
    ScanKind("Cine", "cine_lvot", "cine", ("lvot",), (1, 1), 12),
    ScanKind("Cine", "cine_lax_2ch", "cine", ("2ch",), (1, 1), 12),
    ScanKind("Cine", "cine_lax_4ch", "cine", ("4ch",), (1, 1), 12),
    ScanKind("Cine", "cine_lax_3ch", "cine", ("3ch",), (1, 1), 12),
)
_KIND_BY_NAME = {k.name: k for k in CATALOGUE}


def kind_of(name: str) -> ScanKind:
    """Catalogue entry for a file stem (``"cine_sax"``, ``"T1map"``, ...)."""
    try:
        return _KIND_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown scan name {name!r}; known: {sorted(_KIND_BY_NAME)}") from None


# --------------------------------------------------------------------------------------
# Scan spec and plan
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KSpaceScan:
    """Everything needed to (re)generate one k-space file deterministically."""

    index: int  # position in the plan; with `seed` it seeds all scan-level randomness
    modality: str  # "Cine" | "Mapping" | "LGE" | "BlackBlood"
    name: str  # file stem, e.g. "cine_sax"
    views: tuple[str, ...]  # one view label per slice (len == nz)
    center: str  # e.g. "Center002"
    vendor: str  # "Siemens" | "UIH" | "GE" | "Philips"
    field_strength_t: float  # 1.5 or 3.0
    scanner_model: str  # e.g. "Vida"
    patient: str  # e.g. "P003"
    nt: int | None  # None for 4D files (LGE, black blood)
    nz: int
    nc: int
    ny: int
    nx: int  # image columns (the field of view); the k-space readout holds nx * readout_oversampling samples
    seed: int  # plan seed
    readout_oversampling: int = 1  # CMRxRecon / MMCMR-427K: 2

    @property
    def scanner_folder(self) -> str:
        """``<Vendor>_<Field>_<Model>``, e.g. ``Siemens_30T_Vida``."""
        return f"{self.vendor}_{_field_code(self.field_strength_t)}_{self.scanner_model}"

    @property
    def relpath(self) -> str:
        """POSIX path of the file under the dataset root."""
        return (
            f"MultiCoil/{self.modality}/TrainingSet/FullSample/{self.center}/"
            f"{self.scanner_folder}/{self.patient}/{self.name}.mat"
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """k-space shape: (nt, nz, nc, ny, nx * readout_oversampling) or (nz, nc, ny, nx * readout_oversampling)."""
        spatial = (self.nz, self.nc, self.ny, self.nx * self.readout_oversampling)
        return spatial if self.nt is None else (self.nt, *spatial)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Magnitude shape: (nt, nz, ny, nx) or (nz, ny, nx)."""
        spatial = (self.nz, self.ny, self.nx)
        return spatial if self.nt is None else (self.nt, *spatial)


# SeedSequence stream tags (fixed forever: changing them changes every byte)
_STREAM_PLAN, _STREAM_SCAN, _STREAM_PATIENT = 0x504C, 0x5343, 0x5054
_SUB_SIZES, _SUB_GEOM, _SUB_CONTRAST, _SUB_NOISE, _SUB_COILS = range(5)


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


def _even(x: float, lo: int) -> int:
    return max(lo, 2 * int(round(x / 2.0)))


_CYCLE_KIND, _CYCLE_SITE = 1, 2  # sub-streams of _STREAM_PLAN


def _cycle_pick(seed: int, stream: int, i: int, first: tuple[int, ...]) -> int:
    """Entry ``i`` of a seeded cycle over ``len(first)`` items: block ``0`` is ``first``,
    block ``c > 0`` a permutation drawn from (seed, stream, c) -- a function of (seed, i) only."""
    c, j = divmod(i, len(first))
    if c == 0:
        return first[j]
    return int(_rng(seed, _STREAM_PLAN, stream, c).permutation(len(first))[j])


def plan_kspace_scans(n: int, seed: int, size_scale: float = 1.0, readout_oversampling: int = 1
                      ) -> list[KSpaceScan]:
    """Deterministic list of ``n`` scans.

    * file kind, i.e. the (modality, view) stratum: a seeded cycle over the
      catalogue (block randomisation) -- each run of ``len(CATALOGUE)`` (10)
      scans from the start visits every kind once, the first in catalogue
      order (all four modality folders within the first four scans), later ones
      in a permutation drawn from (seed, cycle); so in any prefix the counts of
      any two kinds differ by at most one (equal after every full cycle);
    * site: likewise a seeded cycle over the 12 (centre, scanner) pairs, the first
      in an order alternating 3.0 T / 1.5 T and cycling vendors (start offset from
      the seed), later ones permuted per (seed, cycle);
    * patients ``P001, P002, ...`` are numbered per (centre, scanner, file kind),
      so one patient folder collects several sequences of one person;
    * matrix: nx in [100, 128] * size_scale, ny = nx * [0.72, 0.92] (even,
      non-square), nc from the scanner's coil range, nz from the kind.

    ``size_scale`` scales only the in-plane matrix (ny, nx; minimum 16).
    ``readout_oversampling``: the k-space readout covers that many times the
    image's field of view along x (CMRxRecon: 2; the images are unchanged).
    The list for ``n`` is a prefix of the list for any larger ``n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not size_scale > 0:
        raise ValueError(f"size_scale must be > 0, got {size_scale}")
    if int(readout_oversampling) != readout_oversampling or readout_oversampling < 1:
        raise ValueError(f"readout_oversampling must be a whole number >= 1, got {readout_oversampling}")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    offset = int(_rng(seed, _STREAM_PLAN).integers(len(_SITES)))
    first_sites = tuple(_SITE_ORDER[(offset + j) % len(_SITES)] for j in range(len(_SITES)))
    counters: dict[tuple[str, str, str], int] = {}
    scans: list[KSpaceScan] = []
    for i in range(n):
        rng = _rng(seed, _STREAM_SCAN, i, _SUB_SIZES)
        kind = CATALOGUE[_cycle_pick(seed, _CYCLE_KIND, i, tuple(range(len(CATALOGUE))))]
        center, scanner = _SITES[_cycle_pick(seed, _CYCLE_SITE, i, first_sites)]
        key = (center, scanner.folder, kind.name)
        counters[key] = counters.get(key, 0) + 1
        nz = int(rng.integers(kind.nz_range[0], kind.nz_range[1] + 1))
        views = kind.views if kind.views is not None else ("sax",) * nz
        nc = int(rng.integers(scanner.nc_range[0], scanner.nc_range[1] + 1))
        nx = _even(rng.uniform(100, 128) * size_scale, 16)
        ny = _even(nx * rng.uniform(0.72, 0.92), 16)
        scans.append(
            KSpaceScan(
                index=i,
                modality=kind.modality,
                name=kind.name,
                views=tuple(views),
                center=center,
                vendor=scanner.vendor,
                field_strength_t=scanner.field_strength_t,
                scanner_model=scanner.model,
                patient=f"P{counters[key]:03d}",
                nt=kind.nt,
                nz=nz,
                nc=nc,
                ny=ny,
                nx=nx,
                seed=seed,
                readout_oversampling=int(readout_oversampling),
            )
        )
    return scans


# --------------------------------------------------------------------------------------
# Tissues and contrast physics
# --------------------------------------------------------------------------------------

#: Tissue classes of the phantom; ``render_labels`` returns indices into this tuple.
TISSUES: tuple[str, ...] = ("air", "fat", "muscle", "lung", "liver", "bone", "blood", "myocardium", "scar")
AIR, FAT, MUSCLE, LUNG, LIVER, BONE, BLOOD, MYO, SCAR = range(len(TISSUES))

# PD, T1@1.5T, T1@3T, T2@1.5T, T2@3T (ms), post-contrast T1@1.5T (ms) -- literature-ish values
_PROPS = np.array(
    [
        # PD    T1_15  T1_30  T2_15  T2_30  T1post
        [0.00, 1000.0, 1000.0, 50.0, 50.0, 1000.0],  # air (PD 0: no signal)
        [0.90, 260.0, 370.0, 80.0, 70.0, 250.0],  # fat
        [0.70, 1000.0, 1400.0, 35.0, 30.0, 600.0],  # skeletal muscle / body wall
        [0.18, 1200.0, 1300.0, 40.0, 35.0, 500.0],  # lung
        [0.75, 580.0, 810.0, 45.0, 35.0, 300.0],  # liver
        [0.45, 550.0, 700.0, 60.0, 50.0, 400.0],  # vertebral body (marrow)
        [0.95, 1550.0, 1900.0, 250.0, 200.0, 350.0],  # blood
        [0.80, 980.0, 1200.0, 48.0, 42.0, 450.0],  # myocardium
        [0.85, 1150.0, 1400.0, 60.0, 52.0, 230.0],  # scar / enhancing segment
    ]
)

# Vendor effects: noise & bias multipliers, T1 mapping bias, raw intensity scale.
_VENDOR_FX: Mapping[str, Mapping[str, float]] = {
    "Siemens": {"noise": 1.0, "bias": 1.0, "t1": 1.00, "scale": 1e-3},
    "UIH": {"noise": 1.15, "bias": 1.2, "t1": 1.02, "scale": 5e-2},
    "GE": {"noise": 1.25, "bias": 0.9, "t1": 0.97, "scale": 2.0},
    "Philips": {"noise": 0.9, "bias": 1.1, "t1": 1.03, "scale": 1e-1},
}
_FIELD_FX: Mapping[float, Mapping[str, float]] = {
    1.5: {"noise": 0.035, "bias": 0.12, "flip_deg": 55.0},
    3.0: {"noise": 0.022, "bias": 0.30, "flip_deg": 42.0},
}


def _tissue_params(scan: KSpaceScan, rng: np.random.Generator) -> dict[str, np.ndarray]:
    hi = scan.field_strength_t >= 2.0
    vfx = _VENDOR_FX[scan.vendor]
    pd = _PROPS[:, 0].copy()
    t1 = (_PROPS[:, 2] if hi else _PROPS[:, 1]) * vfx["t1"] * rng.uniform(0.97, 1.03, len(TISSUES))
    t2 = (_PROPS[:, 4] if hi else _PROPS[:, 3]) * rng.uniform(0.95, 1.05, len(TISSUES))
    t1post = _PROPS[:, 5] * (1.15 if hi else 1.0) * rng.uniform(0.95, 1.05, len(TISSUES))
    return {"pd": pd, "t1": t1, "t2": t2, "t1post": t1post}


def _bssfp(pd: np.ndarray, t1: np.ndarray, t2: np.ndarray, flip_deg: float) -> np.ndarray:
    a = math.radians(flip_deg)
    r = t1 / t2
    return pd * math.sin(a) / ((r + 1.0) - math.cos(a) * (r - 1.0))


def sequence_times_ms(scan: KSpaceScan) -> tuple[float, ...] | None:
    """Inversion times (T1map, ascending, MOLLI 4(1)3(1)2-like) or echo/T2-prep times
    (T2map) in ms for a mapping scan; ``None`` for other kinds.  Deterministic."""
    kind = kind_of(scan.name)
    rng = _rng(scan.seed, _STREAM_SCAN, scan.index, _SUB_CONTRAST, 1)
    if kind.contrast == "t1map":
        rr = float(rng.uniform(800.0, 1100.0))
        # three Look-Locker sets (4, 3, 2 images) starting at TI 100 / 180 / 260 ms
        ti = [t0 + k * rr for t0, n_img in ((100.0, 4), (180.0, 3), (260.0, 2)) for k in range(n_img)]
        ti = sorted(ti)
        nt = kind.nt or len(ti)
        if nt != len(ti):  # keep the catalogue free to change nt
            ti = list(np.linspace(100.0, 100.0 + 3 * rr, nt))
        return tuple(round(t, 1) for t in ti)
    if kind.contrast == "t2map":  # T2-preparation durations
        nt = kind.nt or 3
        return (0.0, 35.0, 55.0) if nt == 3 else tuple(float(x) for x in np.linspace(0.0, 55.0, nt).round(1))
    return None


def _signals(scan: KSpaceScan) -> np.ndarray:
    """Per-frame tissue signal, shape (nt or 1, n_tissues)."""
    kind = kind_of(scan.name)
    rng = _rng(scan.seed, _STREAM_SCAN, scan.index, _SUB_CONTRAST, 0)
    p = _tissue_params(scan, rng)
    pd, t1, t2, t1post = p["pd"], p["t1"], p["t2"], p["t1post"]
    flip = _FIELD_FX[scan.field_strength_t]["flip_deg"]
    nt = scan.nt or 1
    if kind.contrast == "cine":
        s = _bssfp(pd, t1, t2, flip * rng.uniform(0.9, 1.1))
        s[BLOOD] *= 1.3  # through-plane inflow brightens bSSFP blood
        return np.repeat(s[None], nt, axis=0)
    if kind.contrast == "t1map":
        ti = np.asarray(sequence_times_ms(scan))
        return pd[None] * np.abs(1.0 - 2.0 * np.exp(-ti[:, None] / t1[None]))
    if kind.contrast == "t2map":
        te = np.asarray(sequence_times_ms(scan))
        base = _bssfp(pd, t1, t2, 35.0)
        return base[None] * np.exp(-te[:, None] / t2[None])
    if kind.contrast == "lge":
        ti = t1post[MYO] * math.log(2.0) * rng.uniform(0.96, 1.04)  # null the myocardium
        return (pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1post)))[None]
    if kind.contrast == "blackblood":
        tr, te = 2.0 * rng.uniform(800.0, 1100.0), rng.uniform(55.0, 75.0)
        s = pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)
        s[BLOOD] *= 0.04  # double-inversion flow void
        return s[None]
    raise AssertionError(kind.contrast)


# --------------------------------------------------------------------------------------
# Phantom geometry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """Patient-level anatomy (shared by every scan of one synthetic person)."""

    heart_scale: float
    heart_dx: float
    heart_dy: float
    body_a: float
    body_b: float
    fat_mm: float
    lv_r: float  # end-diastolic LV blood radius at the base (mm)
    myo_mm: float
    rv_scale: float
    contraction: float  # 1 = normal EF
    scar: tuple[float, float, float] | None  # (centre angle, half width (rad), transmurality)
    lax_jitter: tuple[float, float, float, float]  # rotation jitter per LAX view (rad)


def _anatomy(scan: KSpaceScan) -> _Anatomy:
    site = next(i for i, (c, s) in enumerate(_SITES) if c == scan.center and s.folder == scan.scanner_folder)
    rng = _rng(scan.seed, _STREAM_PATIENT, site, int(scan.patient[1:]))
    scale = rng.uniform(0.85, 1.15)
    has_scar = rng.random() < 0.45
    scar = (
        (float(rng.uniform(-math.pi, math.pi)), float(rng.uniform(0.35, 0.9)), float(rng.uniform(0.4, 1.0)))
        if has_scar
        else None
    )
    return _Anatomy(
        heart_scale=scale,
        heart_dx=float(rng.normal(0.0, 6.0)),
        heart_dy=float(rng.normal(0.0, 5.0)),
        body_a=float(rng.uniform(150.0, 180.0)),
        body_b=float(rng.uniform(100.0, 125.0)),
        fat_mm=float(rng.uniform(6.0, 18.0)),
        lv_r=float(rng.uniform(22.0, 28.0) * scale),
        myo_mm=float(rng.uniform(8.0, 11.0) * scale),
        rv_scale=float(rng.uniform(0.9, 1.15)),
        contraction=float(rng.uniform(0.6, 1.1)),
        scar=scar,
        lax_jitter=tuple(float(x) for x in rng.uniform(-0.2, 0.2, 4)),  # type: ignore[arg-type]
    )


class _Canvas:
    """Soft (anti-aliased) tissue-fraction painter on a mm grid."""

    def __init__(self, ny: int, nx: int, px: float, dx: float = 0.0, dy: float = 0.0) -> None:
        self.px = px
        self.x = ((np.arange(nx) - nx / 2 + 0.5) * px - dx)[None, :]
        self.y = ((np.arange(ny) - ny / 2 + 0.5) * px - dy)[:, None]
        self.f = np.zeros((len(TISSUES), ny, nx), dtype=np.float64)
        self.f[AIR] = 1.0

    def ellipse(self, cx: float, cy: float, a: float, b: float, theta: float = 0.0) -> np.ndarray:
        """Fractional occupancy of an ellipse (semi-axes a along theta, b across)."""
        a, b = max(a, 1e-3), max(b, 1e-3)
        c, s = math.cos(theta), math.sin(theta)
        xr = (self.x - cx) * c + (self.y - cy) * s
        yr = -(self.x - cx) * s + (self.y - cy) * c
        d = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
        return np.clip(0.5 - (d - 1.0) * min(a, b) / self.px, 0.0, 1.0)

    def paint(self, tissue: int, occ: np.ndarray) -> None:
        self.f *= 1.0 - occ
        self.f[tissue] += occ

    def replace(self, src: int, dst: int, occ: np.ndarray) -> None:
        moved = self.f[src] * occ
        self.f[src] -= moved
        self.f[dst] += moved


def _cycle(t: int, nt: int | None, is_cine: bool) -> float:
    """Contraction state in [0, 1]: 0 = end diastole, ~1 = end systole."""
    if not is_cine or not nt:
        return 0.05  # mapping / LGE / black blood are acquired in diastole
    phase = t / nt
    return float(math.exp(-(((phase - 0.35) / 0.17) ** 2)))


def _body(cv: _Canvas, an: _Anatomy, s_liver: float) -> None:
    a, b = an.body_a, an.body_b
    cv.paint(FAT, cv.ellipse(0.0, 10.0, a, b))
    cv.paint(MUSCLE, cv.ellipse(0.0, 10.0, a - an.fat_mm, b - an.fat_mm))
    cv.paint(LUNG, cv.ellipse(72.0, 0.0, 0.36 * a, 0.62 * b, 0.25))
    cv.paint(LUNG, cv.ellipse(-72.0, 0.0, 0.38 * a, 0.64 * b, -0.25))
    if s_liver > 0.05:
        cv.paint(LIVER, cv.ellipse(-0.42 * a, 10.0 + 0.3 * b, 0.42 * a * s_liver, 0.4 * b * s_liver, -0.35))
    cv.paint(BONE, cv.ellipse(0.0, 10.0 + b - 32.0, 15.0, 13.0))  # vertebral body
    cv.paint(BLOOD, cv.ellipse(22.0, 10.0 + b - 55.0, 10.0, 10.0))  # descending aorta


def _sax_slice(cv: _Canvas, an: _Anatomy, s: float, c: float) -> None:
    """Short-axis slice at relative position s (0 = base, 1 = apex), contraction c."""
    _body(cv, an, s_liver=0.5 + 0.7 * s)
    hx, hy = 28.0 + an.heart_dx, -8.0 + an.heart_dy
    k = 0.32 * an.contraction * c
    r_in0 = an.lv_r * (1.0 - 0.6 * s**1.5)
    myo0 = an.myo_mm * (1.0 - 0.25 * s)
    r_out0 = r_in0 + myo0
    r_in = r_in0 * (1.0 - k)
    r_out = math.sqrt(r_in**2 + r_out0**2 - r_in0**2)
    rv_f = an.rv_scale * (1.0 - 0.75 * s) * (1.0 - 0.6 * k)
    # thin epicardial / pericardial fat around both ventricles
    rv_vis = max(rv_f, 0.3)
    cv.paint(FAT, cv.ellipse(hx - 0.55 * r_out * rv_vis, hy - 2.0, r_out * (1.0 + 0.95 * rv_vis) + 4.0, r_out + 4.0))
    if rv_f > 0.25:
        rvx, rvy = hx - 0.95 * r_out, hy - 4.0
        ra, rb = 1.3 * r_out * rv_f, 1.05 * r_out * rv_f
        cv.paint(MYO, cv.ellipse(rvx, rvy, ra + 3.0, rb + 3.0, -0.15))
        cv.paint(BLOOD, cv.ellipse(rvx, rvy, ra, rb, -0.15))
    cv.paint(MYO, cv.ellipse(hx, hy, r_out, r_out * 0.97))
    cv.paint(BLOOD, cv.ellipse(hx, hy, r_in, r_in * 0.95))
    if 0.15 < s < 0.8 and r_in > 9.0:
        for ang in (1.9, 0.9):  # papillary muscles (posterior and lateral)
            pr = 0.62 * r_in
            cv.paint(MYO, cv.ellipse(hx + pr * math.cos(ang), hy + pr * math.sin(ang), 0.16 * r_in, 0.16 * r_in))
    if an.scar is not None and s < 0.85:
        ang0, half, trans = an.scar
        ring = cv.ellipse(hx, hy, r_in + trans * (r_out - r_in), (r_in + trans * (r_out - r_in)) * 0.97)
        dang = np.angle(np.exp(1j * (np.arctan2(cv.y - hy, cv.x - hx) - ang0)))
        sector = np.clip(0.5 - (np.abs(dang) - half) * r_out / cv.px, 0.0, 1.0)
        cv.replace(MYO, SCAR, ring * sector)


def _lax_slice(cv: _Canvas, an: _Anatomy, view: str, c: float) -> None:
    """Long-axis slice (2ch / 3ch / 4ch / lvot) at contraction c."""
    _body(cv, an, s_liver=0.9)
    base_angle = {"2ch": 2.2, "3ch": 2.0, "4ch": 1.75, "lvot": 2.45}[view]
    jit = an.lax_jitter[("2ch", "3ch", "4ch", "lvot").index(view)]
    th = base_angle + jit
    u = (math.cos(th), math.sin(th))  # base -> apex
    # across the heart; in 4ch the RV (negative v) lands on the image left, as in radiological display
    v = (u[1], -u[0]) if view == "4ch" else (-u[1], u[0])
    hx, hy = 20.0 + an.heart_dx, -5.0 + an.heart_dy
    if view == "4ch":
        hx, hy = hx - 8.0, hy + 4.0

    def at(pu: float, pv: float) -> tuple[float, float]:
        return hx + pu * u[0] + pv * v[0], hy + pu * u[1] + pv * v[1]

    k = an.contraction * c
    L = 1.55 * an.lv_r * (1.0 - 0.10 * k)
    W = 0.95 * an.lv_r * (1.0 - 0.30 * k)
    t = an.myo_mm * (1.0 + 0.35 * k)
    la_a, la_b = 0.8 * an.lv_r * (1.0 + 0.2 * k), 0.9 * an.lv_r * (1.0 + 0.2 * k)
    extent = L + 2.0 * la_a + 10.0
    rv_w = 0.75 * W * an.rv_scale
    rv_v = -(W + t + rv_w + 2.0)
    rv_L = 0.85 * L
    lo, hi = (rv_v - rv_w - 3.0, W + t) if view == "4ch" else (-(W + t), W + t)
    fat_c = at(-0.5 * extent + L + 0.7 * t + 4.0, 0.5 * (lo + hi))
    cv.paint(FAT, cv.ellipse(*fat_c, 0.5 * extent + 6.0, 0.5 * (hi - lo) + 4.0, th))

    if view == "4ch":
        cv.paint(MYO, cv.ellipse(*at(-L - 0.8 * la_a, rv_v), la_a + 2.5, la_b + 2.5, th))  # RA wall
        cv.paint(MYO, cv.ellipse(*at(-L - 0.8 * la_a, 0.0), la_a + 2.5, la_b + 2.5, th))  # LA wall
        cv.paint(MYO, cv.ellipse(*at(-0.1 * L, rv_v), rv_L + 3.0, rv_w + 3.0, th))
        cv.paint(MYO, cv.ellipse(*at(0.0, 0.0), L + 0.7 * t, W + t, th))
        cv.paint(BLOOD, cv.ellipse(*at(-L - 0.8 * la_a, rv_v), la_a, la_b, th))  # RA
        cv.paint(BLOOD, cv.ellipse(*at(-L - 0.8 * la_a, 0.0), la_a, la_b, th))  # LA
        cv.paint(BLOOD, cv.ellipse(*at(-0.1 * L, rv_v), rv_L, rv_w, th))  # RV
        cv.paint(BLOOD, cv.ellipse(*at(0.0, 0.0), L, W, th))  # LV
        return

    la_pv = {"2ch": 0.0, "3ch": 0.25 * W, "lvot": 0.35 * W}[view]
    la_f = 0.75 if view == "lvot" else 1.0
    if view == "3ch":  # RV outflow sliver anterior to the LV
        cv.paint(MYO, cv.ellipse(*at(-0.15 * L, -(W + t + 9.0)), 0.7 * L, 9.0, th))
        cv.paint(BLOOD, cv.ellipse(*at(-0.15 * L, -(W + t + 9.0)), 0.7 * L - 3.0, 6.0, th))
    cv.paint(MYO, cv.ellipse(*at(-L - 0.8 * la_a * la_f, la_pv), la_a * la_f + 2.5, la_b * la_f + 2.5, th))
    if view in ("3ch", "lvot"):  # aortic root / ascending aorta leaving the LV base
        ao_len = 26.0 if view == "3ch" else 40.0
        ao_th = th + math.pi + (0.8 if view == "3ch" else 0.55)
        sx, sy = at(-0.85 * L, -0.55 * W)
        ax_, ay_ = sx + ao_len * math.cos(ao_th), sy + ao_len * math.sin(ao_th)
        cv.paint(MUSCLE, cv.ellipse(ax_, ay_, ao_len + 3.0, 14.0, ao_th))
        ao = cv.ellipse(ax_, ay_, ao_len, 11.5, ao_th)
    cv.paint(MYO, cv.ellipse(*at(0.0, 0.0), L + 0.7 * t, W + t, th))
    cv.paint(BLOOD, cv.ellipse(*at(-L - 0.8 * la_a * la_f, la_pv), la_a * la_f, la_b * la_f, th))
    if view in ("3ch", "lvot"):
        cv.paint(BLOOD, ao)
    cv.paint(BLOOD, cv.ellipse(*at(0.0, 0.0), L, W, th))
    if an.scar is not None:  # enhancing segment: a stretch of one LV wall
        ang0, half, trans = an.scar
        side = 1.0 if ang0 >= 0 else -1.0
        pu0 = (ang0 / math.pi) * 0.6 * L
        band = cv.ellipse(*at(pu0, side * (W + 0.5 * trans * t)), half * 0.5 * L + 4.0, 0.5 * trans * t + 1.0, th)
        cv.replace(MYO, SCAR, band)


def _slice_positions(scan: KSpaceScan, rng: np.random.Generator) -> np.ndarray:
    if scan.nz == 1:
        return np.array([0.45])
    # mapping: basal / mid / apical slices; stacks: base to near the apex
    lo, hi = (0.15, 0.8) if kind_of(scan.name).modality == "Mapping" else (0.05, 0.9)
    pos = np.linspace(lo, hi, scan.nz) + rng.uniform(-0.03, 0.03, scan.nz)
    return np.clip(pos, 0.0, 0.95)


def _geometry(scan: KSpaceScan) -> tuple[np.ndarray, float]:
    """Tissue fractions, shape (n_geom_frames, nz, n_tissues, ny, nx), and pixel size (mm).

    Cine scans get one geometry per frame (beating heart); other kinds share
    one geometry across their frames (n_geom_frames == 1).
    """
    rng = _rng(scan.seed, _STREAM_SCAN, scan.index, _SUB_GEOM)
    an = _anatomy(scan)
    fov_x = rng.uniform(340.0, 400.0)
    px = fov_x / scan.nx
    shift = rng.normal(0.0, 4.0, 2)
    pos = _slice_positions(scan, rng)
    is_cine = kind_of(scan.name).contrast == "cine"
    n_geom = scan.nt if (is_cine and scan.nt) else 1
    out = np.empty((n_geom, scan.nz, len(TISSUES), scan.ny, scan.nx), dtype=np.float64)
    for t in range(n_geom):
        c = _cycle(t, scan.nt, is_cine)
        for z, view in enumerate(scan.views):
            cv = _Canvas(scan.ny, scan.nx, px, shift[0], shift[1])
            if view == "sax":
                _sax_slice(cv, an, float(pos[z]), c)
            else:
                _lax_slice(cv, an, view, c)
            out[t, z] = cv.f
    return out, px


def _smooth_field(ny: int, nx: int, coefs: np.ndarray) -> np.ndarray:
    """exp of a quadratic polynomial in normalised coordinates (mean-free exponent)."""
    yy = np.linspace(-1.0, 1.0, ny)[:, None]
    xx = np.linspace(-1.0, 1.0, nx)[None, :]
    basis = (xx + 0 * yy, yy + 0 * xx, xx * yy, xx**2 - 1.0 / 3.0, yy**2 - 1.0 / 3.0)
    return sum(c * b for c, b in zip(coefs, basis))  # type: ignore[return-value]


def _render(scan: KSpaceScan) -> tuple[np.ndarray, np.ndarray]:
    """(noisy magnitude float32, labels uint8), both shaped like ``scan.image_shape``."""
    geom, _ = _geometry(scan)  # (ng, nz, nT, ny, nx)
    sig = _signals(scan)  # (nt or 1, nT)
    nt = scan.nt or 1
    gi = np.arange(nt) if geom.shape[0] == nt else np.zeros(nt, dtype=int)
    # explicit multiply-and-sum (no BLAS): bit-identical whatever the thread settings
    clean = (sig[:, None, :, None, None] * geom[gi]).sum(axis=2)
    labels = np.argmax(geom, axis=2).astype(np.uint8)[gi]

    rng = _rng(scan.seed, _STREAM_SCAN, scan.index, _SUB_NOISE)
    vfx, ffx = _VENDOR_FX[scan.vendor], _FIELD_FX[scan.field_strength_t]
    bias_amp = ffx["bias"] * vfx["bias"]
    bias = np.exp(
        np.stack(
            [_smooth_field(scan.ny, scan.nx, rng.normal(0.0, bias_amp / 2.0, 5)) for _ in range(scan.nz)]
        )
    )  # (nz, ny, nx)
    clean = clean * bias[None]
    ref = float(np.percentile(clean, 99.0)) or 1.0
    sigma = ffx["noise"] * vfx["noise"] * rng.uniform(0.8, 1.25) * ref
    n1 = rng.standard_normal(clean.shape)
    n2 = rng.standard_normal(clean.shape)
    mag = np.hypot(clean + sigma * n1, sigma * n2)  # Rician magnitude
    mag *= vfx["scale"] * math.exp(rng.normal(0.0, 0.3))  # arbitrary raw intensity scale
    if scan.nt is None:
        return mag[0].astype(np.float32), labels[0]
    return mag.astype(np.float32), labels


def render_magnitude(scan: KSpaceScan) -> np.ndarray:
    """Noisy magnitude images, float32, shape (nt, nz, ny, nx) or (nz, ny, nx).

    This is exactly what ``rss(centered_ifft2(kspace), coil_axis=-3)`` of
    :func:`make_kspace`'s k-space reproduces (up to float32 rounding).
    Intensities carry an arbitrary vendor-dependent raw scale, as real k-space does.
    """
    return _render(scan)[0]


def render_labels(scan: KSpaceScan) -> np.ndarray:
    """Dominant tissue per pixel (indices into :data:`TISSUES`), uint8, same shape as
    :func:`render_magnitude`.  Useful as ground truth for tests / segmentation toys."""
    return _render(scan)[1]


def _coil_maps(scan: KSpaceScan) -> np.ndarray:
    """Sensitivities (nz, nc, ny, nx) complex64 with sum_c |S_c|^2 == 1 everywhere.

    Geometry in pixel units (coil ring at 0.62 x the FOV half-widths)."""
    rng = _rng(scan.seed, _STREAM_SCAN, scan.index, _SUB_COILS)
    ny, nx, nc = scan.ny, scan.nx, scan.nc
    x = (np.arange(nx) - nx / 2 + 0.5)[None, None, :]
    y = (np.arange(ny) - ny / 2 + 0.5)[None, :, None]
    rx, ry = 0.62 * nx, 0.62 * ny
    ang0 = rng.uniform(0.0, 2.0 * math.pi)
    angles = ang0 + 2.0 * math.pi * np.arange(nc) / nc + rng.normal(0.0, 0.15, nc)
    width = rng.uniform(0.35, 0.5, nc) * 0.5 * (nx + ny)
    phase0 = rng.uniform(-math.pi, math.pi, nc)
    kph = rng.normal(0.0, 0.8 / (0.5 * (nx + ny)), (nc, 2))
    maps = np.empty((scan.nz, nc, ny, nx), dtype=np.complex64)
    for z in range(scan.nz):
        dz = rng.normal(0.0, 0.03 * (nx + ny), 2)  # small per-slice change of coil geometry
        cx = (rx * np.cos(angles) + dz[0])[:, None, None]
        cy = (ry * np.sin(angles) + dz[1])[:, None, None]
        logamp = -((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * width[:, None, None] ** 2)
        logamp = logamp - logamp.max(axis=0, keepdims=True)  # stable normalisation
        amp = np.exp(logamp)
        amp /= np.sqrt(np.sum(amp**2, axis=0, keepdims=True))
        ph = phase0[:, None, None] + kph[:, 0, None, None] * x + kph[:, 1, None, None] * y
        maps[z] = (amp * np.exp(1j * ph)).astype(np.complex64)
    return maps


def make_kspace(scan: KSpaceScan) -> tuple[np.ndarray, np.ndarray]:
    """``(magnitude, kspace)``: float32 magnitude as :func:`render_magnitude`, and
    complex64 k-space of shape :attr:`KSpaceScan.shape` (the readout oversampled
    ``scan.readout_oversampling`` times)."""
    mag, _ = _render(scan)
    rng = _rng(scan.seed, _STREAM_SCAN, scan.index, _SUB_NOISE, 1)
    coefs = rng.normal(0.0, 0.6, (scan.nz, 5))
    coefs[:, 0:2] *= 1.5
    phase = np.stack([_smooth_field(scan.ny, scan.nx, coefs[z]) for z in range(scan.nz)])
    phase = (phase + rng.uniform(-math.pi, math.pi, (scan.nz, 1, 1))).astype(np.float32)
    maps = _coil_maps(scan)  # (nz, nc, ny, nx)
    img = mag.astype(np.complex64) * np.exp(1j * phase).astype(np.complex64)  # (..., nz, ny, nx)
    coil_imgs = img[..., None, :, :] * maps  # (..., nz, nc, ny, nx)
    if scan.readout_oversampling > 1:  # the readout's wider field of view: air either side of the image
        extra = scan.nx * (scan.readout_oversampling - 1)
        pad = [(0, 0)] * (coil_imgs.ndim - 1) + [(extra // 2, extra - extra // 2)]
        coil_imgs = np.pad(coil_imgs, pad)
    ksp = centered_fft2(coil_imgs).astype(np.complex64, copy=False)
    assert ksp.shape == scan.shape, (ksp.shape, scan.shape)
    return mag, ksp


# --------------------------------------------------------------------------------------
# MAT-file writers (the reader is data_prep.kspace.source.read_kspace_mat)
# --------------------------------------------------------------------------------------

_FIXED_DATE = "Mon Jan  1 00:00:00 2024"
_MAT73_TEXT = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {_FIXED_DATE} HDF5 schema 1.00 ."
_MAT5_TEXT = f"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: {_FIXED_DATE}"
_COMPLEX_DT = np.dtype([("real", "<f4"), ("imag", "<f4")])


def _mat73_userblock() -> bytes:
    """512-byte MATLAB v7.3 header: 116 bytes text (space padded), 8 bytes subsystem
    offset, version 0x0200 and endian indicator 'IM' (as a little-endian MATLAB writes)."""
    head = _MAT73_TEXT.encode("ascii").ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    return head.ljust(512, b"\x00")


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Create the parent folders, then :func:`core.fsutil.atomic_path` (temp file in
    the same directory, fsync, ``os.replace``; removed on error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        yield tmp


def _as_kspace(kspace: np.ndarray) -> np.ndarray:
    arr = np.asarray(kspace)
    if not np.iscomplexobj(arr):
        raise ValueError(f"k-space must be complex, got dtype {arr.dtype}")
    if arr.ndim not in (4, 5):
        raise ValueError(f"k-space must be 4D (nz,nc,ny,nx) or 5D (nt,nz,nc,ny,nx), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.complex64)


def write_mat_v73(path: str | os.PathLike[str], kspace: np.ndarray, key: str = DEFAULT_KEY) -> Path:
    """Write complex k-space as a MATLAB v7.3 MAT-file (HDF5 + 512-byte userblock).

    The dataset ``key`` has shape ``kspace.shape`` as h5py sees it (MATLAB sees the
    reversed order), compound dtype real/imag ``<f4`` and ``MATLAB_class=b"single"``.
    Atomic (temp file + rename) and byte-deterministic.
    """
    arr = _as_kspace(kspace)
    path = Path(path)
    with _atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=512, libver="earliest") as f:
            ds = f.create_dataset(key, data=arr.view(_COMPLEX_DT), track_times=False)
            ds.attrs["MATLAB_class"] = np.bytes_("single")
        with open(tmp, "r+b") as fh:
            fh.write(_mat73_userblock())
    return path


def write_mat_v5(path: str | os.PathLike[str], kspace: np.ndarray, key: str = DEFAULT_KEY) -> Path:
    """Write complex k-space as an (older) MATLAB v5 MAT-file via ``scipy.io.savemat``.

    Axis order stored: MATLAB order ``(nx, ny, nc, nz[, nt])`` == ``(kx, ky, sc, sz, t)``
    as in the CMRxRecon 2023 documentation, i.e. ``kspace.T`` -- the same MATLAB
    variable a v7.3 file holds.  ``scipy.io.loadmat`` therefore returns the array
    transposed relative to h5py; :func:`read_kspace_mat` transposes it back.
    Single-precision complex, uncompressed, fixed header date; atomic.
    """
    arr = _as_kspace(kspace)
    bio = io.BytesIO()
    scipy.io.savemat(bio, {key: arr.T}, format="5", do_compression=False, oned_as="column")
    data = bytearray(bio.getvalue())
    data[:116] = _MAT5_TEXT.encode("ascii").ljust(116, b" ")  # scipy puts time.asctime() here
    path = Path(path)
    with _atomic_path(path) as tmp:
        tmp.write_bytes(bytes(data))
    return path


# --------------------------------------------------------------------------------------
# One scan -> one file + truth row
# --------------------------------------------------------------------------------------

#: Columns of the metadata row returned by :func:`write_scan` (``kspace_truth.csv``).
TRUTH_COLUMNS: tuple[str, ...] = (
    "relpath",
    "modality",
    "name",
    "views",
    "center",
    "vendor",
    "field_strength_t",
    "scanner_model",
    "patient",
    "shape",
    "format",
)


def write_scan(root: str | os.PathLike[str], scan: KSpaceScan, fmt: str = "v73") -> dict[str, object]:
    """Generate ``scan`` and write it to ``root / scan.relpath``; return its truth row.

    ``fmt``: ``"v73"`` (HDF5, default, what CMRxRecon ships) or ``"v5"``.
    Row keys are :data:`TRUTH_COLUMNS`; ``views`` is joined by ``"|"`` and ``shape``
    is the canonical (h5py-order) k-space shape joined by ``"x"``, e.g. ``12x5x8x88x112``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    _, ksp = make_kspace(scan)
    path = Path(root) / scan.relpath
    (write_mat_v73 if fmt == "v73" else write_mat_v5)(path, ksp)
    return {
        "relpath": scan.relpath,
        "modality": scan.modality,
        "name": scan.name,
        "views": "|".join(scan.views),
        "center": scan.center,
        "vendor": scan.vendor,
        "field_strength_t": scan.field_strength_t,
        "scanner_model": scan.scanner_model,
        "patient": scan.patient,
        "shape": "x".join(str(d) for d in ksp.shape),
        "format": fmt,
    }
