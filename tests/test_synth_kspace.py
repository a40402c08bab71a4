"""Tests for the synthetic multi-coil k-space generator (data_prep.synth.kspace) and data_prep.kspace.mri."""

from __future__ import annotations

import re
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from data_prep.kspace.mri import centered_fft2, centered_ifft2, rss
from data_prep.synth import kspace as K

SMALL = 0.3  # size_scale for fast tests: nx ~ 30-38

LAYOUT = re.compile(
    r"^MultiCoil/(Cine|Mapping|LGE|BlackBlood)/TrainingSet/FullSample/Center\d{3}/"
    r"(Siemens|UIH|GE|Philips)_(15|30)T_[A-Za-z0-9]+/P\d{3}/"
    r"(cine_sax|cine_lax|cine_lax_2ch|cine_lax_3ch|cine_lax_4ch|cine_lvot|T1map|T2map|lge_sax|blackblood)\.mat$"
)
KNOWN_FOLDERS = {
    "Siemens_30T_Vida", "Siemens_15T_Aera", "Siemens_15T_Avanto", "Siemens_30T_Prisma",
    "Siemens_15T_Sola", "UIH_30T_umr780", "UIH_15T_umr670", "UIH_30T_umr790",
    "GE_15T_voyager", "GE_30T_architect", "Philips_30T_Ingenia", "Philips_15T_Achieva",
}  # fmt: skip


def _one_of_each(seed: int = 0, size_scale: float = SMALL) -> dict[str, K.KSpaceScan]:
    plan = K.plan_kspace_scans(len(K.CATALOGUE), seed, size_scale)
    return {s.name: s for s in plan}


def _label_mean(mag: np.ndarray, lab: np.ndarray, tissue: str) -> float:
    sel = lab == K.TISSUES.index(tissue)
    assert sel.sum() > 10, f"too few {tissue} pixels"
    return float(mag[sel].mean())


# ---------------------------------------------------------------------------- mri.py


def test_mri_fft_roundtrip_and_centering():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 4, 10, 12)) + 1j * rng.standard_normal((3, 4, 10, 12))).astype(np.complex64)
    k = centered_fft2(x)
    assert k.dtype == np.complex64 and k.shape == x.shape
    np.testing.assert_allclose(centered_ifft2(k), x, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(k), np.linalg.norm(x), rtol=1e-5)  # ortho
    img = np.ones((8, 6), np.float32)  # constant image -> all energy at the centre sample
    kc = centered_fft2(img)
    assert np.unravel_index(np.argmax(np.abs(kc)), kc.shape) == (4, 3)
    coils = np.stack([3 * np.ones((2, 2)), 4j * np.ones((2, 2))])
    np.testing.assert_allclose(rss(coils, coil_axis=0), 5.0)
    # other axes
    np.testing.assert_allclose(centered_ifft2(centered_fft2(x, axes=(0, 2)), axes=(0, 2)), x, atol=1e-5)


# ---------------------------------------------------------------------------- plan / layout


def test_plan_layout_and_naming():
    plan = K.plan_kspace_scans(40, seed=1, size_scale=SMALL)
    assert len({s.relpath for s in plan}) == len(plan)
    for s in plan:
        assert LAYOUT.match(s.relpath), s.relpath
        assert s.scanner_folder in KNOWN_FOLDERS
        field = s.scanner_folder.split("_")[1]
        assert {"15T": 1.5, "30T": 3.0}[field] == s.field_strength_t
        assert len(s.views) == s.nz
        assert s.nx != s.ny and s.ny % 2 == 0 and s.nx % 2 == 0
        assert 4 <= s.nc <= 10
        assert (s.nt is None) == (s.name in ("lge_sax", "blackblood"))
        meta = K.parse_relpath(s.relpath)
        assert (meta["center"], meta["vendor"], meta["field_strength_t"], meta["scanner_model"], meta["patient"]) == (
            s.center, s.vendor, s.field_strength_t, s.scanner_model, s.patient,
        )  # fmt: skip
        # each centre owns a fixed scanner set
        assert s.scanner_folder in {sc.folder for sc in K.CENTERS[s.center]}
        if s.name == "cine_lax":
            assert s.views == ("2ch", "3ch", "4ch")
        if s.name == "cine_lvot":
            assert s.views == ("lvot",) and s.nz == 1
        if s.name.startswith("cine_lax_"):  # CMRxRecon 2025 per-view files
            assert s.views == (s.name[-3:],) and s.nz == 1
        if s.name == "T1map":
            assert s.nt == 9 and K.sequence_times_ms(s) == tuple(sorted(K.sequence_times_ms(s)))
        if s.name == "T2map":
            assert s.nt == 3
        if s.name.startswith("cine"):
            assert s.nt == 12
    # deterministic and prefix-stable
    assert K.plan_kspace_scans(40, seed=1, size_scale=SMALL) == plan
    assert K.plan_kspace_scans(8, seed=1, size_scale=SMALL) == plan[:8]
    assert K.plan_kspace_scans(40, seed=2, size_scale=SMALL) != plan


@pytest.mark.parametrize("seed", range(0, 24, 2))
def test_every_modality_in_plan_of_8(seed):
    plan = K.plan_kspace_scans(8, seed)
    assert {s.modality for s in plan[:4]} == {"Cine", "Mapping", "LGE", "BlackBlood"}
    assert {K.kind_of(s.name).contrast for s in plan[:6]} == {"cine", "t1map", "t2map", "lge", "blackblood"}
    assert {s.field_strength_t for s in plan} == {1.5, 3.0}
    assert len({s.vendor for s in plan}) >= 3
    assert len({s.center for s in plan}) >= 4
    first = K.plan_kspace_scans(len(K.CATALOGUE), seed)
    assert [s.name for s in first] == [k.name for k in K.CATALOGUE]  # the first cycle visits every kind once
    views = {v for s in first for v in s.views if len(set(s.views)) == 1}
    assert views == {"sax", "2ch", "3ch", "4ch", "lvot"}  # every view has single-view files


@pytest.mark.parametrize("seed", [0, 7])
def test_plan_is_balanced_over_the_strata_and_sites(seed):
    """A seeded cycle, not independent draws: every (modality, view) kind and every site near-equally often in
    every prefix, in an order that changes from cycle to cycle and with the seed."""
    n, k, m = 300, len(K.CATALOGUE), 12
    plan = K.plan_kspace_scans(n, seed, size_scale=SMALL)
    kinds, sites = {c.name: 0 for c in K.CATALOGUE}, {}
    for i, s in enumerate(plan, start=1):
        kinds[s.name] += 1
        sites[s.scanner_folder] = sites.get(s.scanner_folder, 0) + 1
        assert max(kinds.values()) - min(kinds.values()) <= (0 if i % k == 0 else 1), i
        if i >= m:
            assert len(sites) == m and max(sites.values()) - min(sites.values()) <= (0 if i % m == 0 else 1), i
    assert set(kinds.values()) == {n // k}
    cycles = [tuple(s.name for s in plan[j:j + k]) for j in range(0, n, k)]
    assert len(set(cycles)) > len(cycles) // 2  # permuted per cycle (block randomisation), not one fixed order
    other = K.plan_kspace_scans(n, seed + 1, size_scale=SMALL)
    assert [s.name for s in other] != [s.name for s in plan]
    # every stratum meets many sites and both field strengths
    for kind in K.CATALOGUE:
        of = [s for s in plan if s.name == kind.name]
        assert len({s.scanner_folder for s in of}) >= 8 and {s.field_strength_t for s in of} == {1.5, 3.0}


def test_default_sizes():
    plan = K.plan_kspace_scans(32, seed=0)
    for s in plan:
        assert 96 <= s.nx <= 128 and 70 <= s.ny <= 120, (s.ny, s.nx)
        if s.name == "cine_sax":
            assert 3 <= s.nz <= 6


# ---------------------------------------------------------------------------- files


def test_v73_file_structure(tmp_path: Path):
    for scan in _one_of_each().values():
        row = K.write_scan(tmp_path, scan, fmt="v73")
        path = tmp_path / scan.relpath
        assert row["relpath"] == scan.relpath and row["format"] == "v73"
        assert row["views"] == "|".join(scan.views) and row["shape"] == "x".join(map(str, scan.shape))
        assert tuple(row) == K.TRUTH_COLUMNS
        head = path.read_bytes()[:512]
        assert head.startswith(b"MATLAB 7.3 MAT-file")
        assert head[124:128] == b"\x00\x02IM"
        assert h5py.is_hdf5(path)
        with h5py.File(path, "r") as f:
            assert f.userblock_size == 512
            assert list(f.keys()) == ["kspace_full"]
            ds = f["kspace_full"]
            assert ds.dtype.names == ("real", "imag")
            assert ds.dtype["real"] == np.dtype("<f4") and ds.dtype["imag"] == np.dtype("<f4")
            assert ds.shape == scan.shape
            assert ds.ndim == (5 if scan.nt else 4)
            if scan.nt:
                assert ds.shape == (scan.nt, scan.nz, scan.nc, scan.ny, scan.nx)
            else:
                assert ds.shape == (scan.nz, scan.nc, scan.ny, scan.nx)
            assert ds.attrs["MATLAB_class"] == b"single"
        assert not list(path.parent.glob(".*tmp*")), "temp file left behind"


def test_v5_roundtrip_matches_v73(tmp_path: Path):
    scans = _one_of_each()
    for name in ("cine_sax", "lge_sax", "cine_lvot"):
        scan = scans[name]
        _, ksp = K.make_kspace(scan)
        p73 = K.write_mat_v73(tmp_path / "a" / f"{name}.mat", ksp)
        p5 = K.write_mat_v5(tmp_path / "b" / f"{name}.mat", ksp)
        assert not h5py.is_hdf5(p5)
        assert p5.read_bytes().startswith(b"MATLAB 5.0 MAT-file")
        raw = scipy.io.loadmat(p5)["kspace_full"]
        assert raw.dtype == np.complex64
        assert raw.shape == ksp.shape[::-1]  # MATLAB order (nx, ny, nc, nz[, nt])
        a73, a5 = K.read_kspace_mat(p73), K.read_kspace_mat(p5)
        assert a73.dtype == a5.dtype == np.complex64
        assert a73.shape == a5.shape == scan.shape
        np.testing.assert_array_equal(a73, ksp)
        np.testing.assert_array_equal(a5, a73)
        # write_scan(fmt="v5") is the same file
        row = K.write_scan(tmp_path / "c", scan, fmt="v5")
        assert row["format"] == "v5"
        np.testing.assert_array_equal(K.read_kspace_mat(tmp_path / "c" / scan.relpath), ksp)


def test_rss_of_kspace_reproduces_magnitude(tmp_path: Path):
    for scan in _one_of_each(seed=5).values():
        K.write_scan(tmp_path, scan)
        ksp = K.read_kspace_mat(tmp_path / scan.relpath)
        mag = K.render_magnitude(scan)
        assert mag.dtype == np.float32 and mag.shape == scan.image_shape
        rec = rss(centered_ifft2(ksp), coil_axis=-3)
        np.testing.assert_allclose(rec, mag, rtol=1e-4, atol=1e-5 * float(mag.max()))
        # the coils really differ (not one coil repeated): per-coil images are not proportional
        coil_img = np.abs(centered_ifft2(ksp))
        c0, c1 = coil_img[..., 0, :, :], coil_img[..., 1, :, :]
        assert abs(np.corrcoef(c0.ravel(), c1.ravel())[0, 1]) < 0.99


def test_bytes_deterministic(tmp_path: Path):
    plan_a = K.plan_kspace_scans(9, seed=11, size_scale=SMALL)
    plan_b = K.plan_kspace_scans(9, seed=12, size_scale=SMALL)
    for fmt in K.FORMATS:
        for scan in plan_a:
            K.write_scan(tmp_path / f"a1{fmt}", scan, fmt=fmt)
        for scan in reversed(plan_a):  # order of generation must not matter
            K.write_scan(tmp_path / f"a2{fmt}", scan, fmt=fmt)
        for scan, other in zip(plan_a, plan_b):
            b1 = (tmp_path / f"a1{fmt}" / scan.relpath).read_bytes()
            b2 = (tmp_path / f"a2{fmt}" / scan.relpath).read_bytes()
            assert b1 == b2, scan.relpath
            ko = K.make_kspace(other)[1]
            ka = K.read_kspace_mat(tmp_path / f"a1{fmt}" / scan.relpath)
            assert ko.shape != ka.shape or not np.array_equal(ko, ka)
    # same scan regenerated in memory is identical too
    m1, k1 = K.make_kspace(plan_a[0])
    m2, k2 = K.make_kspace(plan_a[0])
    assert np.array_equal(k1, k2) and np.array_equal(m1, m2)


# ---------------------------------------------------------------------------- contrast


def test_modality_contrasts_differ():
    scans = _one_of_each(seed=0, size_scale=1.0)

    cine = scans["cine_sax"]
    mag, lab = K.render_magnitude(cine), K.render_labels(cine)
    assert _label_mean(mag, lab, "blood") / _label_mean(mag, lab, "myocardium") > 1.5
    assert _label_mean(mag, lab, "fat") / _label_mean(mag, lab, "myocardium") > 1.5
    # blood pool contracts over the cycle (mid slice, end diastole vs end systole)
    blood = (lab[:, cine.nz // 2] == K.TISSUES.index("blood")).sum(axis=(-2, -1))
    assert blood.min() < 0.9 * blood[0]

    bb = scans["blackblood"]
    mag, lab = K.render_magnitude(bb), K.render_labels(bb)
    assert _label_mean(mag, lab, "blood") / _label_mean(mag, lab, "myocardium") < 0.5

    t1 = scans["T1map"]
    mag, lab = K.render_magnitude(t1), K.render_labels(t1)
    myo_t = [_label_mean(mag[t], lab[t], "myocardium") for t in range(t1.nt)]
    assert max(myo_t) / min(myo_t) > 2.0

    t2 = scans["T2map"]
    mag, lab = K.render_magnitude(t2), K.render_labels(t2)
    myo_t = [_label_mean(mag[t], lab[t], "myocardium") for t in range(t2.nt)]
    assert myo_t[0] > 1.3 * myo_t[-1]

    lge = scans["lge_sax"]
    mag, lab = K.render_magnitude(lge), K.render_labels(lge)
    assert _label_mean(mag, lab, "blood") / _label_mean(mag, lab, "myocardium") > 2.0  # nulled myocardium

    # an enhancing segment in some patients: find one and check it is brighter than blood
    plan = K.plan_kspace_scans(60, seed=0, size_scale=0.6)
    lges = [s for s in plan if s.name == "lge_sax"]
    with_scar = []
    for s in lges:
        lab = K.render_labels(s)
        if (lab == K.TISSUES.index("scar")).sum() > 10:
            with_scar.append(s)
            mag = K.render_magnitude(s)
            assert _label_mean(mag, lab, "scar") > _label_mean(mag, lab, "blood")
    assert 0 < len(with_scar) < len(lges)

    # field strength shifts T1 / the T1-mapping contrast
    t1_15 = [s for s in K.plan_kspace_scans(60, seed=0, size_scale=SMALL) if s.name == "T1map"]
    assert {s.field_strength_t for s in t1_15} == {1.5, 3.0}


# ---------------------------------------------------------------------------- reader errors


def test_read_errors_name_the_file(tmp_path: Path):
    scan = _one_of_each()["T2map"]
    _, ksp = K.make_kspace(scan)
    p73 = K.write_mat_v73(tmp_path / "x73.mat", ksp)
    p5 = K.write_mat_v5(tmp_path / "x5.mat", ksp)
    for p in (p73, p5):
        with pytest.raises(ValueError, match=r"x(73|5)\.mat.*'nope'.*not found"):
            K.read_kspace_mat(p, key="nope")
    junk = tmp_path / "junk.mat"
    junk.write_text("this is not a MAT file\n" * 20)
    with pytest.raises(ValueError, match="junk.mat"):
        K.read_kspace_mat(junk)
    with pytest.raises(FileNotFoundError, match="missing.mat"):
        K.read_kspace_mat(tmp_path / "missing.mat")
    # wrong dtype (real) and wrong rank
    real73 = tmp_path / "real73.mat"
    with h5py.File(real73, "w") as f:
        f["kspace_full"] = np.zeros((2, 2, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"real73\.mat.*dtype"):
        K.read_kspace_mat(real73)
    real5 = tmp_path / "real5.mat"
    scipy.io.savemat(real5, {"kspace_full": np.zeros((2, 2, 2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"real5\.mat.*dtype"):
        K.read_kspace_mat(real5)
    rank73 = K.write_mat_v73(tmp_path / "rank73.mat", ksp[0])  # 4D is valid
    assert K.read_kspace_mat(rank73).shape == ksp.shape[1:]
    rank3 = tmp_path / "rank3.mat"  # (nc, ny, nx): saved by MATLAB with its two trailing singletons dropped
    with h5py.File(rank3, "w") as f:
        f["kspace_full"] = ksp[0, 0].view(np.dtype([("real", "<f4"), ("imag", "<f4")]))
    assert K.read_kspace_mat(rank3).shape == (1, *ksp.shape[2:])
    assert K.read_kspace_mat(rank3, ndim=5).shape == (1, 1, *ksp.shape[2:])
    bad_rank = tmp_path / "rank6.mat"
    with h5py.File(bad_rank, "w") as f:
        f["kspace_full"] = ksp[None].view(np.dtype([("real", "<f4"), ("imag", "<f4")]))
    with pytest.raises(ValueError, match=r"rank6\.mat.*rank 6"):
        K.read_kspace_mat(bad_rank)
    assert K.read_kspace_mat(rank73, ndim=4).shape == ksp.shape[1:]  # a 4D file read as a 4D kind: fine,
    with pytest.raises(ValueError, match=r"rank5\.mat.*rank 5.*at most 4"):  # a 5D one is not
        K.read_kspace_mat(K.write_mat_v73(tmp_path / "rank5.mat", ksp), ndim=4)
    with pytest.raises(ValueError, match="complex"):
        K.write_mat_v73(tmp_path / "w.mat", np.zeros((2, 2, 2, 2), np.float32))
    with pytest.raises(ValueError):
        K.write_scan(tmp_path, scan, fmt="v4")


# ---------------------------------------------------------------------------- timing


def test_32_scans_at_the_default_size(tmp_path: Path):
    """32 distinct files at the default size (the time it takes is printed, not asserted: speed is bench/'s)."""
    plan = K.plan_kspace_scans(32, seed=0)
    t0 = time.perf_counter()
    rows = [K.write_scan(tmp_path, s) for s in plan]
    dt = time.perf_counter() - t0
    nbytes = sum((tmp_path / r["relpath"]).stat().st_size for r in rows)
    print(f"\n[synth kspace] 32 scans at default size: {dt:.1f} s, {nbytes / 1e6:.0f} MB on disk (v7.3)")
    assert len({r["relpath"] for r in rows}) == 32 and all((tmp_path / r["relpath"]).is_file() for r in rows)
