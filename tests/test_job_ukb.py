"""`python -m data_prep ukb` on the synthetic cohort, on a real local Ray cluster (2 workers)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import webdataset as wds

from core.format import StoreReader, UKBSample, normalise_tabular
from core.vocab import DISEASES, PHENOTYPES
from data_prep.engine import JobConfig
from data_prep.ukb.job import UKBJobConfig, discover, run
from data_prep.ukb.preprocess import UKBPreprocessConfig, preprocess
from data_prep.ukb.nifti import read_ukb_nifti_dir
from data_prep.splits import split_of
from data_prep.ukb.csv_export import read_ukb_csv
from data_prep.ukb.feature_spec import load_feature_spec
from data_prep.ukb.features import extract_features

pytestmark = pytest.mark.slow  # not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]


def _cfg(src, out, tabular=None, block_size=2) -> UKBJobConfig:
    return UKBJobConfig(src=src, tabular=tabular, features=ROOT / "configs/data_prep/ukb_features.yaml",
                        job=JobConfig(out=out, block_size=block_size, workers=2),
                        preprocess=UKBPreprocessConfig(crop=64))


def _shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def test_nifti_with_tabular_round_trip(tiny_cohort, tmp_path, ray_cluster):
    cfg = _cfg(tiny_cohort / "ukb", tmp_path / "out", tiny_cohort / "ukb_tabular.csv")
    report, _ = run(cfg, progress=False)
    assert report.counts == {"inputs": 4, "written": 4, "quarantined": 0, "skipped": 0}
    m = report.manifest
    assert len(m["tabular"]["features"]) == 117 and m["tabular"]["current_stats"] in m["tabular"]["stats"]
    truth = {r["eid"]: r for r in csv.DictReader(open(tiny_cohort / "truth.csv"))}
    spec = load_feature_spec(cfg.features)
    df, _ = read_ukb_csv(cfg.tabular, spec)
    raw = extract_features(df, spec)
    reader = StoreReader(cfg.job.out)
    assert sorted(reader.keys()) == sorted(truth)
    known = 0
    for shard in m["shards"]:
        for item in wds.WebDataset(str(cfg.job.out / shard["path"]), shardshuffle=False):
            s = UKBSample.from_wds(item)
            z = reader.ukb(s.key)
            for name in ("image", "seg", "seg_valid", "diseases"):  # shards and Zarr hold the same arrays
                assert np.array_equal(getattr(s, name), getattr(z, name)), name
            assert np.array_equal(s.tabular, z.tabular, equal_nan=True) and s.meta == z.meta
            image, seg, *_ = preprocess(read_ukb_nifti_dir(tiny_cohort / "ukb" / s.key), cfg.preprocess)
            assert np.array_equal(s.image, image) and np.array_equal(s.seg, seg)  # what preprocessing made
            assert split_of(s.key) == shard["split"]
            t = truth[s.key]
            assert np.allclose(s.phenotypes, [float(t[k]) for k in PHENOTYPES], rtol=2e-3, atol=2e-3)
            icd = [i for i, d in enumerate(DISEASES) if d != "high_blood_pressure"]  # from the ICD-10 array
            assert (s.diseases[icd] >= 0).all() or (s.diseases[icd] == -1).all()
            known += int((s.diseases[icd] >= 0).all())
            assert all(s.diseases[i] == int(t[d]) for i, d in enumerate(DISEASES) if s.diseases[i] >= 0
                       and d != "high_blood_pressure")
            row = list(df.index.astype(str)).index(s.key)
            assert np.array_equal(s.tabular, raw[row].astype(np.float32), equal_nan=True)
            values, missing = normalise_tabular(s.tabular, m["tabular"]["stats"][m["tabular"]["current_stats"]])
            assert np.array_equal(missing, np.isnan(s.tabular)) and np.isfinite(values).all()
    assert known >= 1  # labels were compared with the generator's truth for at least one subject, not all unknown
    # frames are a load-time choice: reading 5 of the 50 stored frames
    k = reader.keys()[0]
    five = reader.ukb(k, frames=[0, 10, 20, 30, 40])
    assert five.image.shape == (9, 5, 64, 64) and np.array_equal(five.image, reader.ukb(k).image[:, ::10])


def test_dicom_layout_and_duplicates(tiny_cohort, tmp_path, ray_cluster):
    src = tmp_path / "src"
    shutil.copytree(tiny_cohort / "ukb_dicom", src)
    nifti_eid = sorted(p.name for p in (tiny_cohort / "ukb").iterdir())[0]
    shutil.copytree(tiny_cohort / "ukb" / nifti_eid, src / nifti_eid)  # the same subject in both layouts
    items, skipped, _ = discover(src)
    assert len(items) == 4 and [s["key"] for s in skipped] == [nifti_eid]
    cfg = _cfg(src, tmp_path / "out")
    report, _ = run(cfg, progress=False)
    assert report.counts == {"inputs": 5, "written": 4, "quarantined": 0, "skipped": 1}
    reader = StoreReader(cfg.job.out)
    sources = {k: reader.meta(k)["source"] for k in reader.keys()}
    assert sources[nifti_eid] == "nifti" and sorted(set(sources.values())) == ["dicom", "nifti"]
    # the Python API's preprocessing (finetune.api) from either layout is, bit for bit, the sample stored
    from finetune.api import preprocess_study

    settings = json.loads((cfg.job.out / "manifest.json").read_text())["config"]["preprocess"]
    for key in reader.keys():
        given = src / key if sources[key] == "nifti" else (src / f"{key}_20209_2_0.zip", src / f"{key}_20208_2_0.zip")
        image, meta = preprocess_study(given, settings)
        stored = np.asarray(reader.group["image"][reader.rows[key]])
        assert image.dtype == stored.dtype and np.array_equal(image, stored), key
        assert meta["source"] == sources[key]
    with pytest.raises(Exception, match="neither a NIfTI folder"):
        preprocess_study(tmp_path, settings)


def _clone(src_dir: Path, dst_root: Path, eid: str) -> Path:
    d = dst_root / eid
    shutil.copytree(src_dir, d)
    return d


def test_bad_inputs_are_quarantined_and_counts_reconcile(tiny_cohort, tmp_path, ray_cluster):
    src = tmp_path / "src"
    shutil.copytree(tiny_cohort / "ukb", src)
    proto = sorted(src.iterdir())[0]
    bad = {}
    d = _clone(proto, src, "9000001")  # truncated .nii.gz
    data = (d / "sa.nii.gz").read_bytes()
    (d / "sa.nii.gz").write_bytes(data[: len(data) // 3])
    bad["9000001"] = "unreadable NIfTI"
    d = _clone(proto, src, "9000002")  # a missing view
    (d / "la_4ch.nii.gz").unlink()
    bad["9000002"] = "missing view la_4ch"
    d = _clone(proto, src, "9000003")  # wrong frame count
    img = nib.load(d / "la_3ch.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., :25], img.affine, img.header), d / "la_3ch.nii.gz")
    bad["9000003"] = "25 frames, expected 50"
    d = _clone(proto, src, "9000004")  # an empty image
    img = nib.load(d / "la_2ch.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine, img.header), d / "la_2ch.nii.gz")
    bad["9000004"] = "empty"
    d = _clone(proto, src, "9000005")  # a segmentation of the wrong shape
    seg = nib.load(d / "seg_sa.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[:, :-2], seg.affine), d / "seg_sa.nii.gz")
    bad["9000005"] = "segmentation shape"
    zsrc = sorted((tiny_cohort / "ukb_dicom").glob("*_20209_2_0.zip"))[0]
    shutil.copy(zsrc, src / "9000006_20209_2_0.zip")  # a DICOM subject without its long-axis zip
    bad["9000006"] = "no 20208 (long axis) zip"
    (src / "9000007_20209_2_0.zip").write_bytes(zsrc.read_bytes()[:5000])  # a corrupt zip
    shutil.copy(zsrc.with_name(zsrc.name.replace("20209", "20208")), src / "9000007_20208_2_0.zip")
    bad["9000007"] = "9000007_20209_2_0.zip"
    with zipfile.ZipFile(zsrc) as zin, zipfile.ZipFile(src / "9000008_20209_2_0.zip", "w") as zout:
        for info in zin.infolist():  # no manifest.csv: converted from the DICOM headers, with a note
            if info.filename != "manifest.csv":
                zout.writestr(info, zin.read(info))
    shutil.copy(zsrc.with_name(zsrc.name.replace("20209", "20208")), src / "9000008_20208_2_0.zip")
    d = _clone(proto, src, "9000009")  # absurd geometry: 1e6 mm short-axis pixels
    img = nib.load(d / "sa.nii.gz")
    A = img.affine.copy()
    A[:3, 0] *= 1e6
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), A, img.header), d / "sa.nii.gz")
    bad["9000009"] = "sa: pixel spacing"
    d = _clone(proto, src, "9000010")  # a label outside the documented set
    seg = nib.load(d / "seg_sa.nii.gz")
    x = np.asarray(seg.dataobj).copy()
    x[0, 0, 0, 0] = 7
    nib.save(nib.Nifti1Image(x, seg.affine, seg.header), d / "seg_sa.nii.gz")
    bad["9000010"] = "segmentation labels {7} outside the documented set"

    # the CSV: duplicated rows for one good subject, and a row for a subject without imaging
    rows = list(csv.reader(open(tiny_cohort / "ukb_tabular.csv")))
    header, body = rows[0], rows[1:]
    dup = body[1]
    extra = list(body[2])
    extra[0] = "9999999"
    tab = tmp_path / "tab.csv"
    with open(tab, "w", newline="") as f:
        csv.writer(f).writerows([header, *body, dup, extra])

    cfg = _cfg(src, tmp_path / "out", tab)
    report, _ = run(cfg, progress=False)
    c = report.counts
    assert c["inputs"] == c["written"] + c["quarantined"] + c["skipped"] == 4 + 10
    m = report.manifest
    reasons = {q["key"]: q["reason"] for q in m["quarantined"]}
    for eid, why in bad.items():
        assert why in reasons[eid], (eid, reasons.get(eid))
    assert "several rows for eid" in reasons[dup[0]]
    assert c["quarantined"] == len(bad) + 1 and c["written"] == 4 + 1 - 1  # 9000008 written, the duplicate not
    assert "9999999" in m["tabular"]["csv"]["csv_rows_without_imaging"]
    assert "9000008" in m["tabular"]["csv"]["imaging_without_csv_row"]
    assert any("manifest" in n for n in StoreReader(cfg.job.out).meta("9000008")["notes"])
    lines = [json.loads(x) for x in (cfg.job.out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(x["key"] for x in lines) == sorted(reasons) and all(x["files"] for x in lines)


def test_rerun_is_a_no_op_and_growth_appends(tiny_cohort, tmp_path, ray_cluster):
    src = tmp_path / "src"
    src.mkdir()
    eids = sorted(p.name for p in (tiny_cohort / "ukb").iterdir())
    for e in eids[:2]:
        shutil.copytree(tiny_cohort / "ukb" / e, src / e)
    cfg = _cfg(src, tmp_path / "out", tiny_cohort / "ukb_tabular.csv", block_size=1)
    run(cfg, progress=False)
    shards, manifest = _shard_hashes(cfg.job.out), (cfg.job.out / "manifest.json").read_bytes()
    again, _ = run(cfg, progress=False)
    assert again.nothing_to_do and (cfg.job.out / "manifest.json").read_bytes() == manifest
    for e in eids[2:]:
        shutil.copytree(tiny_cohort / "ukb" / e, src / e)
    grown, _ = run(cfg, progress=False)
    assert grown.counts == {"inputs": 4, "written": 2, "quarantined": 0, "skipped": 2}
    after = _shard_hashes(cfg.job.out)
    assert {k: after[k] for k in shards} == shards and len(after) == 4
    m = grown.manifest
    assert m["blocks"][:2] == json.loads(manifest)["blocks"]  # same rows and splits as before
    assert len(m["runs"]) == 2


def test_cli_help_and_errors(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "data_prep", "ukb", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0 and "--ray-address" in res.stdout and "--tabular" in res.stdout
    res = subprocess.run([sys.executable, "-m", "data_prep", "ukb", "--src", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "o"), "preprocess.crop=4"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "preprocess" in res.stderr
    with pytest.raises(FileNotFoundError, match="nope"):
        discover(tmp_path / "nope")
