"""Tests for the k-space reading side (data_prep.kspace.source) and the per-file
MetaCLIP-CMR preprocessing (data_prep.kspace.preprocess), on synthetic k-space."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep.kspace import preprocess as PK
from data_prep.kspace import source as SK
from data_prep.synth import kspace as K

SMALL = 0.3  # size_scale: nx ~ 30-38


@pytest.fixture(scope="module")
def scans() -> dict[str, K.KSpaceScan]:
    plan = K.plan_kspace_scans(len(K.CATALOGUE), seed=3, size_scale=SMALL)
    return {s.name: s for s in plan}


@pytest.fixture(scope="module")
def written(tmp_path_factory, scans) -> dict[str, tuple[Path, Path]]:
    """Every file kind written once as v7.3 and once as v5: name -> (v73 path, v5 path)."""
    root = tmp_path_factory.mktemp("ksp")
    out = {}
    for name, scan in scans.items():
        K.write_scan(root / "v73", scan, fmt="v73")
        K.write_scan(root / "v5", scan, fmt="v5")
        out[name] = (root / "v73" / scan.relpath, root / "v5" / scan.relpath)
    return out


def _field(scan: K.KSpaceScan) -> str:
    return f"{scan.field_strength_t:.1f}T"


# ---------------------------------------------------------------------------- reconstruction


def test_reconstruct_equals_generator_magnitude(scans):
    for scan in scans.values():
        mag, ksp = K.make_kspace(scan)
        rec = PK.reconstruct(ksp)
        expect = mag if scan.nt else mag[None]
        assert rec.dtype == np.float32 and rec.shape == expect.shape == ((scan.nt or 1), scan.nz, scan.ny, scan.nx)
        np.testing.assert_allclose(rec, expect, rtol=1e-4, atol=1e-5 * float(expect.max()))
    with pytest.raises(ValueError, match="complex"):
        PK.reconstruct(np.zeros((2, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="4D .* or 5D"):
        PK.reconstruct(np.zeros((2, 4, 4), np.complex64))


def test_matlab_dropped_singleton_axes_and_readout_oversampling(scans, tmp_path):
    """What real CMRxRecon files look like: MATLAB drops trailing singleton axes when it saves (the organisers'
    single-coil, single-slice, single-frame cine_sax.mat demo file holds a 2D (512, 246) array) and the readout
    is 2x oversampled. Saved with the singletons dropped (v5 and v7.3) the file converts to the same image as the
    full-rank file; the oversampling is removed in image space, giving the generator's image back, unsquashed."""
    import dataclasses

    import scipy.io

    cdt = np.dtype([("real", "<f4"), ("imag", "<f4")])
    for case, (name, shape) in enumerate((("cine_sax", dict(nt=1, nz=1, nc=1)), ("cine_sax", dict(nt=1, nz=2)),
                                          ("lge_sax", dict(nz=1, nc=1)))):
        base = scans[name]
        scan = dataclasses.replace(base, readout_oversampling=2, views=("sax",) * shape["nz"], **shape)
        mag, ksp = K.make_kspace(scan)
        assert ksp.shape == scan.shape and ksp.shape[-1] == 2 * scan.nx
        rank = SK.KIND_RANK[K.kind_of(name).contrast]
        dropped = ksp.reshape(ksp.shape[next(i for i, d in enumerate(ksp.shape) if d > 1):])  # leading 1s off
        assert dropped.ndim < rank
        full = K.write_mat_v73(tmp_path / f"full{case}" / scan.relpath, ksp)
        v73 = tmp_path / f"v73_{case}" / scan.relpath
        v73.parent.mkdir(parents=True)
        with h5py.File(v73, "w", userblock_size=512) as f:  # h5py order: MATLAB's reversed
            f.create_dataset("kspace_full", data=np.ascontiguousarray(dropped).view(cdt))
        v5 = tmp_path / f"v5_{case}" / scan.relpath
        v5.parent.mkdir(parents=True)
        scipy.io.savemat(v5, {"kspace_full": dropped.T})  # MATLAB order (kx, ky[, sc[, sz]])
        assert scipy.io.loadmat(v5)["kspace_full"].ndim == dropped.ndim
        ref, meta = PK.preprocess_kspace_file(full, scan.relpath, 32, readout_oversampling=2)
        for p in (v73, v5):
            img, m = PK.preprocess_kspace_file(p, scan.relpath, 32, readout_oversampling=2)
            np.testing.assert_array_equal(img, ref)
            assert m["kspace_shape"] == meta["kspace_shape"] == scan.shape
            assert m["stored_shape"] == dropped.shape and meta["stored_shape"] == scan.shape
        assert meta["readout_oversampling"] == 2.0 and meta["original_shape"][-2:] == (scan.ny, scan.nx)
        # the oversampling removed: the generator's own image, not a 2x-wide one squashed into the output square
        rec = PK.reconstruct(ksp, readout_oversampling=2)
        expect = mag.reshape(rec.shape)
        np.testing.assert_allclose(rec, expect, rtol=1e-4, atol=1e-5 * float(expect.max()))
        wide = PK.reconstruct(ksp)
        assert wide.shape[-1] == 2 * scan.nx
        assert np.abs(wide[..., : scan.nx // 2]).max() < 1e-3 * float(expect.max())  # the readout's margin: air
    with pytest.raises(ValueError, match="readout_oversampling"):
        PK.reconstruct(ksp, readout_oversampling=0.5)


def test_preprocess_file_shapes_stats_and_formats(scans, written):
    for name, scan in scans.items():
        p73, p5 = written[name]
        img, meta = PK.preprocess_kspace_file(p73, scan.relpath)
        img5, meta5 = PK.preprocess_kspace_file(p5, scan.relpath)
        nt = scan.nt or 1
        assert img.shape == (nt, scan.nz, 224, 224) and img.dtype == np.float16
        x = img.astype(np.float64)
        assert abs(x.mean()) < 1e-2 and abs(x.std() - 1.0) < 1e-2, (name, x.mean(), x.std())
        # v5 and v7.3 of the same scan: identical outputs
        np.testing.assert_array_equal(img5, img)
        assert (meta["format"], meta5["format"]) == ("v73", "v5")
        assert {k: v for k, v in meta5.items() if k != "format"} == {k: v for k, v in meta.items() if k != "format"}
        # relpath defaults to the path itself (it contains MultiCoil/...)
        img_p, meta_p = PK.preprocess_kspace_file(p73)
        np.testing.assert_array_equal(img_p, img)
        assert meta_p == meta
        # same pipeline applied to the generator's magnitude
        ref, _, _ = PK.preprocess_images(K.render_magnitude(scan).reshape(nt, scan.nz, scan.ny, scan.nx))
        np.testing.assert_allclose(x, ref.astype(np.float64), atol=2e-2)
        # metadata parsed from the path == the generator's plan
        assert (meta["modality"], meta["name"], meta["views"]) == (scan.modality, scan.name, scan.views)
        assert (meta["center"], meta["vendor"], meta["field_strength_t"], meta["scanner_model"]) == (
            scan.center, scan.vendor, scan.field_strength_t, scan.scanner_model,
        )  # fmt: skip
        assert (meta["patient"], meta["scanner"]) == (scan.patient, scan.scanner_folder)
        assert meta["sequence_key"] == f"{scan.modality}/{scan.center}/{scan.scanner_folder}/{scan.patient}/{name}"
        assert meta["patient_key"] == f"{scan.center}/{scan.scanner_folder}/{scan.patient}"
        assert meta["kspace_shape"] == scan.shape and meta["original_shape"] == (nt, scan.nz, scan.ny, scan.nx)
        assert meta["has_time_axis"] == (scan.nt is not None) and meta["nc"] == scan.nc
        assert meta["relpath"] == scan.relpath and meta["mat_key"] == "kspace_full"
        assert meta["size"] == (224, 224) and meta["norm_std"] > 0 and meta["n_zero_images"] == 0
        # integer labels
        assert PK.MODALITIES[meta["modality_index"]] == meta["modality_label"] == K.kind_of(name).contrast
        assert tuple(PK.VIEWS[i] for i in meta["view_indices"]) == scan.views
        assert meta["multi_view"] == (name == "cine_lax")


def test_labels_cover_the_generator():
    assert PK.MODALITIES == ("cine", "t1map", "t2map", "lge", "blackblood")
    assert PK.VIEWS == ("sax", "2ch", "3ch", "4ch", "lvot")
    for kind in K.CATALOGUE:
        assert SK.modality_label(kind.modality, kind.name) == kind.contrast
        nz = kind.nz_range[0]
        assert SK.slice_views(kind.name, nz) == (kind.views or ("sax",) * nz)
    # CMRxRecon 2025 per-view names
    assert SK.slice_views("cine_lax_4ch", 2) == ("4ch", "4ch")
    assert SK.slice_views("lge_lax_2ch", 1) == ("2ch",)
    assert SK.modality_label("LGE", "lge_lax_3ch") == "lge"
    assert SK.modality_label("mapping", "t1map") == "t1map"
    with pytest.raises(ValueError, match="exactly 3 slices"):
        SK.slice_views("cine_lax", 2)
    with pytest.raises(ValueError, match="unsupported file kind Mapping/T1rho"):
        SK.modality_label("Mapping", "T1rho")
    with pytest.raises(ValueError, match="unsupported"):
        SK.modality_label("Cine", "T1map")  # kind in the wrong modality folder


def test_size_option_keep_aspect_and_resize_filter(scans, written):
    scan = scans["lge_sax"]
    p73, _ = written["lge_sax"]
    img, meta = PK.preprocess_kspace_file(p73, size=(64, 96))
    assert img.shape == (1, scan.nz, 64, 96) and meta["size"] == (64, 96)
    sq, meta_sq = PK.preprocess_kspace_file(p73, size=64, keep_aspect=True)
    assert sq.shape == (1, scan.nz, 64, 64) and meta_sq["keep_aspect"]
    assert scan.ny < scan.nx  # padded along y: the first rows are the raw-zero background value
    pad_value = -meta_sq["norm_mean"] / meta_sq["norm_std"]
    np.testing.assert_allclose(sq[..., 0, :].astype(np.float32), pad_value, atol=1e-2)
    # resize == torch's antialiased bilinear, up and down
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for shape, size in (((3, 30, 38), (224, 224)), ((2, 246, 512), (224, 224)), ((1, 50, 40), (64, 96))):
        x = rng.standard_normal(shape).astype(np.float32)
        ours = PK.resize_images(x, size)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x)[:, None], size=size, mode="bilinear", antialias=True, align_corners=False
        )[:, 0].numpy()
        np.testing.assert_allclose(ours, ref, atol=2e-4)
    # downsampling is antialiased: a checkerboard averages out instead of aliasing
    cb = (np.indices((448, 448)).sum(axis=0) % 2).astype(np.float32)
    assert np.ptp(PK.resize_images(cb, 224)[1:-1, 1:-1]) < 1e-5  # (edge pixels: renormalised kernel)
    const = np.full((2, 5, 7), 3.0, np.float32)
    np.testing.assert_allclose(PK.resize_images(const, 11), 3.0, rtol=1e-6)


# ---------------------------------------------------------------------------- texts


def test_texts(scans, written):
    metas = {name: PK.preprocess_kspace_file(written[name][0])[1] for name in scans}
    phrases = {
        "cine_sax": ("cine", "short-axis"),
        "T1map": ("T1 mapping", "short-axis"),
        "T2map": ("T2 mapping", "short-axis"),
        "lge_sax": ("late gadolinium enhancement", "short-axis"),
        "blackblood": ("black-blood", "short-axis"),
        "cine_lvot": ("cine", "LVOT"),
        "cine_lax": ("cine", "two-chamber", "three-chamber", "four-chamber", "long-axis"),
        "cine_lax_2ch": ("cine", "two-chamber long-axis"),
        "cine_lax_3ch": ("cine", "three-chamber long-axis"),
        "cine_lax_4ch": ("cine", "four-chamber long-axis"),
    }
    for name, meta in metas.items():
        scan = scans[name]
        texts = meta["texts"]
        assert meta["text"] == texts[0] and len(texts) == len(PK.TEMPLATES)
        assert len(set(texts)) == len(texts), "template variants must differ"
        for t in texts:
            assert _field(scan) in t and scan.vendor in t and scan.scanner_model in t, t
            for ph in phrases[name]:
                assert ph in t, (ph, t)
        assert texts[0] == (
            f"{PK.MODALITY_PHRASES[K.kind_of(name).contrast]} cardiac MRI in "
            f"{'two-chamber, three-chamber and four-chamber long-axis views' if name == 'cine_lax' else PK.VIEW_PHRASES[scan.views[0]] + ' view'}"
            f" acquired on a {_field(scan)} {scan.vendor} {scan.scanner_model} scanner"
        )
        # per-slice texts: [template][slice]
        assert len(meta["slice_texts"]) == len(PK.TEMPLATES)
        assert all(len(st) == scan.nz for st in meta["slice_texts"])
        if name != "cine_lax":
            assert all(st == (texts[i],) * scan.nz for i, st in enumerate(meta["slice_texts"]))
        # deterministic
        assert PK.metadata_texts(meta) == {k: meta[k] for k in ("text", "texts", "slice_texts")}
    lax = metas["cine_lax"]["slice_texts"][0]
    for text, v in zip(lax, ("two-chamber", "three-chamber", "four-chamber")):
        assert f"{v} long-axis view " in text
        assert sum(w in text for w in ("two-chamber", "three-chamber", "four-chamber")) == 1
    # the paper's example, exactly
    meta = {"modality": "Cine", "name": "cine_sax", "views": ("sax",), "field_strength_t": 3.0,
            "vendor": "Siemens", "scanner_model": "Vida"}  # fmt: skip
    assert PK.metadata_text(meta) == "cine cardiac MRI in short-axis view acquired on a 3.0T Siemens Vida scanner"
    meta15 = dict(meta, field_strength_t=1.5, vendor="UIH", scanner_model="umr670")
    assert "1.5T UIH umr670" in PK.metadata_text(meta15, template=2)
    # no site in the layout (CMRxRecon 2023/2024): text without scanner
    no_site = {"modality": "LGE", "name": "lge_sax", "views": ("sax",) * 2}
    assert PK.metadata_text(no_site) == "late gadolinium enhancement cardiac MRI in short-axis view"
    assert PK.metadata_text(meta, template=1, slice_index=0) != PK.metadata_text(meta, template=0)
    with pytest.raises(ValueError, match="template"):
        PK.metadata_text(meta, template=len(PK.TEMPLATES))
    # training samples template variants with a seeded RNG
    rng = np.random.default_rng(0)
    picks = [PK.metadata_text(meta, int(rng.integers(len(PK.TEMPLATES)))) for _ in range(40)]
    assert len(set(picks)) == len(PK.TEMPLATES)


# ---------------------------------------------------------------------------- path layout


CANON = "MultiCoil/Cine/TrainingSet/FullSample/Center002/Siemens_30T_Vida/P003/cine_sax.mat"


def test_parse_relpath_layout_variations():
    m = SK.parse_relpath(CANON)
    assert m == {
        "modality": "Cine", "name": "cine_sax", "split": "TrainingSet", "sampling": "FullSample",
        "acc_factor": None, "center": "Center002", "vendor": "Siemens", "field_strength_t": 3.0,
        "scanner_model": "Vida", "scanner": "Siemens_30T_Vida", "patient": "P003", "relpath": CANON,
    }  # fmt: skip
    assert SK.sequence_key(m) == "Cine/Center002/Siemens_30T_Vida/P003/cine_sax"
    assert SK.patient_key(m) == "Center002/Siemens_30T_Vida/P003"
    assert SK.candidate_keys(m) == ("kspace_full", "kspace")
    # any prefix (dataset root, absolute path), Windows separators
    for prefix in ("/data/CMRxRecon2025/ChallengeData/", "CMRxRecon/", "C:\\data\\"):
        assert SK.parse_relpath(prefix + CANON) == m
    assert SK.parse_relpath(CANON.replace("/", "\\")) == m
    assert SK.parse_relpath(Path("/x") / CANON) == m
    # validation / test sets
    v = SK.parse_relpath(CANON.replace("TrainingSet", "ValidationSet"))
    assert v["split"] == "ValidationSet"
    assert SK.sequence_key(v) == "Cine/ValidationSet/Center002/Siemens_30T_Vida/P003/cine_sax"
    assert SK.patient_key(v) == "ValidationSet/Center002/Siemens_30T_Vida/P003"
    assert SK.parse_relpath(CANON.replace("TrainingSet", "TestSet"))["split"] == "TestSet"
    # undersampled folders (CMRxRecon 2023/2024)
    a = SK.parse_relpath(CANON.replace("FullSample", "AccFactor04"))
    assert (a["sampling"], a["acc_factor"]) == ("AccFactor04", 4)
    assert SK.candidate_keys(a) == ("kspace_sub04", "kspace")
    assert SK.sequence_key(a) == "Cine/AccFactor04/Center002/Siemens_30T_Vida/P003/cine_sax"
    # patient folder directly under the sampling folder (no centre / scanner level)
    n = SK.parse_relpath("MultiCoil/Mapping/ValidationSet/AccFactor10/P120/T1map.mat")
    assert (n["modality"], n["name"], n["patient"], n["acc_factor"]) == ("Mapping", "T1map", "P120", 10)
    assert n["center"] is n["vendor"] is n["field_strength_t"] is n["scanner_model"] is n["scanner"] is None
    assert SK.sequence_key(n) == "Mapping/ValidationSet/AccFactor10/P120/T1map"
    assert SK.sequence_key(SK.parse_relpath("MultiCoil/Cine/TrainingSet/FullSample/P001/cine_lax.mat")) == (
        "Cine/P001/cine_lax"
    )
    # field codes and model names
    f = SK.parse_relpath("MultiCoil/Cine/TrainingSet/FullSample/Center007/Siemens_055T_Free.Max/P0012/cine_sax.mat")
    assert (f["field_strength_t"], f["scanner_model"], f["patient"]) == (0.55, "Free.Max", "P0012")
    g = SK.parse_relpath("MultiCoil/LGE/TrainingSet/FullSample/Center001/UIH_50T_uMR_Jupiter/P001/lge_lax_4ch.mat")
    assert (g["vendor"], g["field_strength_t"], g["scanner_model"]) == ("UIH", 5.0, "uMR_Jupiter")
    assert SK.RELPATH_RE.search(CANON) is not None


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("MultiCoil/Cine/TrainingSet/FullSample/P001/cine_sax_mask.mat", "sampling-mask"),
        ("MultiCoil/Mapping/TrainingSet/FullSample/P001/T1map.csv", "not a .mat file"),
        ("SingleCoil/Cine/TrainingSet/FullSample/P001/cine_sax.mat", "single-coil"),
        ("Cine/TrainingSet/FullSample/P001/cine_sax.mat", "no MultiCoil"),
        ("MultiCoil/Cine/FullSample/Center002/Siemens_30T_Vida/P003/cine_sax.mat", "does not match"),
        ("MultiCoil/Cine/TrainingSet/FullSample/Center002/Siemens_3T_Vida/P003/cine_sax.mat", "does not match"),
        ("MultiCoil/Cine/TrainingSet/Mask_TaskR1/Center002/Siemens_30T_Vida/P003/cine_sax.mat", "does not match"),
        ("MultiCoil/Cine/TrainingSet/FullSample/Center002/Siemens_30T_Vida/cine_sax.mat", "does not match"),
    ],
)
def test_parse_relpath_rejects(bad, reason):
    with pytest.raises(ValueError, match=reason) as ei:
        SK.parse_relpath(bad)
    msg = str(ei.value)
    assert msg.startswith(bad) and "expected .../MultiCoil/<Modality>/" in msg


# ---------------------------------------------------------------------------- error cases


def test_errors_name_the_file(tmp_path: Path, scans, written):
    scan = scans["T2map"]
    _, ksp = K.make_kspace(scan)
    rel = scan.relpath

    def expect(path: Path, pattern: str, relpath: str | None = rel, **kw) -> str:
        with pytest.raises(ValueError, match=pattern) as ei:
            PK.preprocess_kspace_file(path, relpath, **kw)
        assert str(path) in str(ei.value), str(ei.value)
        return str(ei.value)

    good = written["T2map"][0]
    data = good.read_bytes()
    # truncated v7.3 (HDF5 superblock intact, data cut) and cut inside the header
    trunc = tmp_path / "trunc.mat"
    trunc.write_bytes(data[: len(data) * 2 // 3])
    expect(trunc, "truncated")
    head_only = tmp_path / "head.mat"
    head_only.write_bytes(data[:300])
    expect(head_only, "truncated")
    # truncated v5
    t5 = tmp_path / "trunc5.mat"
    d5 = written["T2map"][1].read_bytes()
    t5.write_bytes(d5[: len(d5) // 2])
    expect(t5, "corrupt or truncated MATLAB v5")
    # random bytes, empty file
    junk = tmp_path / "junk.mat"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    expect(junk, "not a readable MATLAB MAT-file")
    empty = tmp_path / "empty.mat"
    empty.write_bytes(b"")
    expect(empty, "not a readable MATLAB MAT-file")
    # missing key: the keys present are listed, both formats
    k73 = K.write_mat_v73(tmp_path / "key73.mat", ksp, key="img")
    msg = expect(k73, r"none of the keys \['kspace_full', 'kspace'\] not found")
    assert "keys present: ['img']" in msg
    k5 = K.write_mat_v5(tmp_path / "key5.mat", ksp, key="img")
    assert "keys present: ['img']" in expect(k5, "not found in MAT v5")
    assert "'other'" in expect(k73, "key 'other' not found", key="other")
    # explicit key / fallback key "kspace" is found
    img, meta = PK.preprocess_kspace_file(k73, rel, key="img")
    assert meta["mat_key"] == "img" and img.shape == (3, 3, 224, 224)
    kk = K.write_mat_v73(tmp_path / "kk.mat", ksp, key="kspace")
    assert PK.preprocess_kspace_file(kk, rel)[1]["mat_key"] == "kspace"
    # wrong rank (1D: MATLAB keeps at least 2 axes; 6D), non-complex dtype, empty array (a 3D file is a 5D one
    # saved with its trailing singleton axes dropped: test_matlab_dropped_singleton_axes_and_readout_oversampling)
    cdt = np.dtype([("real", "<f4"), ("imag", "<f4")])
    for nd, arr in ((1, ksp[0, 0, 0, 0]), (6, ksp[None])):
        p = tmp_path / f"rank{nd}.mat"
        with h5py.File(p, "w") as f:
            f["kspace_full"] = np.ascontiguousarray(arr).view(cdt)
        expect(p, f"rank {nd}")
    real = tmp_path / "real.mat"
    with h5py.File(real, "w") as f:
        f["kspace_full"] = np.abs(ksp)
    expect(real, "non-complex dtype")
    zero_size = tmp_path / "zerosize.mat"
    with h5py.File(zero_size, "w") as f:
        f["kspace_full"] = np.zeros((0, 3, 4, 8, 8), cdt)
    expect(zero_size, "empty")
    # zero-energy and non-finite k-space
    z = K.write_mat_v73(tmp_path / "zero.mat", np.zeros_like(ksp))
    expect(z, "zero energy")
    bad = ksp.copy()
    bad[0, 0, 0, 0, :3] = np.nan
    nanp = K.write_mat_v73(tmp_path / "nan.mat", bad)
    expect(nanp, "3 non-finite")
    # path outside the layout / unsupported kind / long-axis stack with the wrong slice count
    expect(good, "no MultiCoil", relpath="somewhere/else/T2map.mat")
    expect(tmp_path / "zero.mat", "no MultiCoil", relpath=None)
    t1rho = K.write_mat_v73(tmp_path / "MultiCoil/Mapping/TrainingSet/FullSample/P001/T1rho.mat", ksp)
    expect(t1rho, "unsupported file kind", relpath=None)
    lax = K.write_mat_v73(tmp_path / "MultiCoil/Cine/TrainingSet/FullSample/P001/cine_lax.mat", ksp[:, :2])
    expect(lax, "exactly 3 slices", relpath=None)
    # a missing file is a FileNotFoundError (not a data error)
    with pytest.raises(FileNotFoundError, match="missing.mat"):
        PK.preprocess_kspace_file(tmp_path / "missing.mat", rel)


def test_undersampled_layout_reads_subsampled_key(tmp_path: Path, scans):
    scan = scans["cine_sax"]
    _, ksp = K.make_kspace(scan)
    rel = f"MultiCoil/Cine/ValidationSet/AccFactor08/P007/{scan.name}.mat"
    K.write_mat_v5(tmp_path / rel, ksp, key="kspace_sub08")
    img, meta = PK.preprocess_kspace_file(tmp_path / rel)
    assert img.shape == (scan.nt, scan.nz, 224, 224)
    assert (meta["mat_key"], meta["format"], meta["acc_factor"], meta["center"]) == ("kspace_sub08", "v5", 8, None)
    assert meta["sequence_key"] == "Cine/ValidationSet/AccFactor08/P007/cine_sax"
    assert meta["text"] == "cine cardiac MRI in short-axis view"


def test_generator_reexports_reader():
    assert K.parse_relpath is SK.parse_relpath and K.read_kspace_mat is SK.read_kspace_mat
    assert K.RELPATH_RE is SK.RELPATH_RE and K.DEFAULT_KEY == SK.DEFAULT_KEY == "kspace_full"
