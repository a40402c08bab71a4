"""ACDC and M&Ms in their published layouts (synthetic content from the analytic hearts): the readers map both label
conventions to the project's and take ED / ES from Info.cfg and from the CSV; broken cases are quarantined with the
file and the reason; the conversion job writes shards and Zarr that agree, with the published train / test split."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import webdataset as wds

from core.format import SaxSample, StoreReader
from core.vocab import LABELS
from data_prep.engine import JobConfig
from data_prep.sax import acdc, mnms
from data_prep.sax.case import CaseError, load_volume
from data_prep.sax.job import SaxJobConfig, run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # not in `make test-fast`
N = 6  # cases per dataset: 4 published training, 2 test


@pytest.fixture(scope="module")
def sax_src(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sax_synth")
    res = subprocess.run([sys.executable, "-m", "data_prep", "synth", "--out", str(out), "--subjects", "0",
                          "--kspace-scans", "0", "--acdc", str(N), "--mnms", str(N), "--quiet", "sax_size_scale=0.35"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _truth(src: Path) -> dict[tuple[str, str], dict]:
    with open(src / "sax_truth.csv", newline="") as f:
        return {(r["dataset"], r["case"]): r for r in csv.DictReader(f)}


def test_both_published_layouts_are_written(sax_src):
    cases = sorted(p.name for p in (sax_src / "acdc/database/training").iterdir())
    assert cases == [f"patient{i:03d}" for i in range(1, 5)]
    assert sorted(p.name for p in (sax_src / "acdc/database/testing").iterdir()) == ["patient005", "patient006"]
    p1 = sax_src / "acdc/database/training/patient001"
    info = acdc.parse_info(p1 / "Info.cfg")
    assert {"ED", "ES", "Group", "Height", "NbFrame", "Weight"} <= set(info)
    names = {p.name for p in p1.iterdir()}
    assert {"Info.cfg", "patient001_4d.nii.gz", f"patient001_frame{info['ED']:02d}_gt.nii.gz",
            f"patient001_frame{info['ES']:02d}.nii.gz", f"patient001_frame{info['ES']:02d}_gt.nii.gz"} <= names
    assert nib.load(p1 / "patient001_4d.nii.gz").shape[3] == info["NbFrame"]
    csv_path = mnms.find_info_csv(sax_src / "mnms")
    assert csv_path.name == "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
    rows = mnms.read_info(csv_path)
    train = sorted((sax_src / "mnms/OpenDataset/Training/Labeled").iterdir())
    assert len(rows) == N and len(train) == 4 and all(rows[d.name]["Vendor"] in "AB" for d in train)
    gt = np.asarray(nib.load(train[0] / f"{train[0].name}_sa_gt.nii.gz").dataobj)
    labelled = [t for t in range(gt.shape[3]) if gt[..., t].any()]
    r = rows[train[0].name]
    assert labelled == sorted({int(r["ED"]), int(r["ES"])})  # labels at ED and ES only


@pytest.mark.parametrize("dataset", ["acdc", "mnms"])
def test_readers_map_the_labels_and_take_ed_es_from_the_source(sax_src, dataset):
    """Each structure's voxel count at ED and ES equals the generator's, in the project's label space: a swapped
    map (ACDC's 1 is the RV, M&Ms' 1 the LV) moves the LV count onto the RV."""
    truth = _truth(sax_src)
    if dataset == "acdc":
        cases, ignored = acdc.discover(sax_src / "acdc")
        read = [acdc.read_case(Path(c["dir"]), c["published"]) for c in cases]
    else:
        cases, ignored = mnms.discover(sax_src / "mnms")
        csv_path = mnms.find_info_csv(sax_src / "mnms")
        read = [mnms.read_case(Path(c["dir"]), c["published"], mnms.read_info(csv_path), csv_path) for c in cases]
    assert len(read) == N and not ignored
    for case in read:
        t = truth[(dataset, case.name)]
        assert case.published == t["split"]
        assert (case.ed, case.es) == (int(t["ed"]), int(t["es"])) and case.image.shape[3] == int(t["frames"])
        assert sorted(case.labels) == sorted({case.ed, case.es})
        for phase, frame in (("ed", case.ed), ("es", case.es)):
            for s in ("LV", "MYO", "RV"):
                assert int((case.labels[frame] == LABELS.index(s)).sum()) == int(t[f"{s}_{phase}_voxels"]), \
                    (case.name, phase, s)
        lv = (case.labels[case.ed] == LABELS.index("LV")).sum()
        assert lv > (case.labels[case.es] == LABELS.index("LV")).sum()  # the LV empties towards ES
    # the raw ids really differ: ACDC stores the LV as 3, M&Ms as 1
    c = read[0]
    gt_raw = (np.asarray(nib.load(Path(cases[0]["dir"]) / f"{c.name}_frame{c.ed + 1:02d}_gt.nii.gz").dataobj)
              if dataset == "acdc" else
              np.asarray(nib.load(Path(cases[0]["dir"]) / f"{c.name}_sa_gt.nii.gz").dataobj)[..., c.ed])
    raw_lv = 3 if dataset == "acdc" else 1
    assert (gt_raw == raw_lv).sum() == (c.labels[c.ed] == LABELS.index("LV")).sum()


def test_real_file_shapes_load(tmp_path):
    """A 4D cine saved as (X, Y, Z, 1, T) and a frame saved as (X, Y, Z, 1) load as (X, Y, Z, T) / (X, Y, Z); a 2D
    frame gets its slice axis; a 3D file where a cine is expected is an error naming it."""
    a = np.arange(6 * 5 * 3 * 4, dtype=np.int16).reshape(6, 5, 3, 1, 4)
    nib.save(nib.Nifti1Image(a, np.diag([1.5, 1.5, 8, 1])), tmp_path / "c.nii.gz")
    img, zooms = load_volume(tmp_path / "c.nii.gz", 4)
    assert img.shape == (6, 5, 3, 4) and zooms == (1.5, 1.5, 8.0) and np.array_equal(img, a[:, :, :, 0])
    nib.save(nib.Nifti1Image(a[..., 0, :1], np.eye(4)), tmp_path / "f.nii.gz")
    assert load_volume(tmp_path / "f.nii.gz", 3)[0].shape == (6, 5, 3)
    nib.save(nib.Nifti1Image(a[:, :, 0, 0, 0], np.eye(4)), tmp_path / "s.nii.gz")
    assert load_volume(tmp_path / "s.nii.gz", 3)[0].shape == (6, 5, 1)
    with pytest.raises(CaseError, match="s.nii.gz: expected a 4D image"):
        load_volume(tmp_path / "s.nii.gz", 4)


def _break(src: Path, dataset: str) -> dict[str, str]:
    """Damage copies of the source; returns case -> the reason's expected words."""
    if dataset == "acdc":
        tr = src / "database/training"
        p2, p3, p4 = (tr / f"patient00{i}" for i in (2, 3, 4))
        info = acdc.parse_info(p2 / "Info.cfg")
        (p2 / f"patient002_frame{info['ES']:02d}_gt.nii.gz").unlink()  # a missing ground truth
        text = (p3 / "Info.cfg").read_text().replace("NbFrame:", "NbFrame: 99\nOld:")  # frames disagree
        (p3 / "Info.cfg").write_text(text)
        gt = p4 / "patient004_frame01_gt.nii.gz"  # an unknown label value
        img = nib.load(gt)
        data = np.asarray(img.dataobj).copy()
        data[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(data, img.affine), gt)
        return {"acdc/patient002": "_gt.nii.gz: missing", "acdc/patient003": "NbFrame 99",
                "acdc/patient004": "label values [7.0]"}
    labelled = sorted((src / "OpenDataset/Training/Labeled").iterdir())
    a, b = labelled[0], labelled[1]
    (a / f"{a.name}_sa_gt.nii.gz").unlink()
    csv_path = mnms.find_info_csv(src)
    rows = [r for r in csv_path.read_text().splitlines() if not r.startswith(b.name)]
    csv_path.write_text("\n".join(rows) + "\n")  # a case without its CSV row
    return {f"mnms/{a.name}": "_sa_gt.nii.gz: missing", f"mnms/{b.name}": "has no row in"}


@pytest.mark.parametrize("dataset", ["acdc", "mnms"])
def test_job_converts_quarantines_and_keeps_the_published_split(sax_src, tmp_path, dataset, ray_cluster):
    src = tmp_path / "src"
    shutil.copytree(sax_src / dataset, src)
    broken = _break(src, dataset)
    cfg = SaxJobConfig(src=src, layout=dataset, crop=64, spacing_mm=2.5,  # a 160 mm field of view
                       job=JobConfig(out=tmp_path / "out", block_size=2, workers=2, val_fraction=0.3,
                                     test_fraction=0.0))
    report, _ = run(cfg, progress=False)
    assert report.counts == {"inputs": N, "written": N - len(broken), "quarantined": len(broken), "skipped": 0}
    m = json.loads((cfg.job.out / "manifest.json").read_text())
    reasons = {q["key"]: q["reason"] for q in m["quarantined"]}
    assert set(reasons) == set(broken)
    for key, words in broken.items():
        assert words in reasons[key], (key, reasons[key])
    assert m["split_scheme"]["name"] == "published"
    truth = _truth(sax_src)
    reader = StoreReader(cfg.job.out)
    splits = {k: b["split"] for b in m["blocks"] for k in b["keys"]}
    for key, split in splits.items():
        published = truth[tuple(key.split("/"))]["split"]
        assert split == "test" if published == "test" else split in ("train", "val"), (key, split)
    assert sorted(splits) == sorted(reader.keys())
    n = 0
    for shard in m["shards"]:
        for raw in wds.WebDataset(str(cfg.job.out / shard["path"]), shardshuffle=False):
            s = SaxSample.from_wds(raw)
            z = reader.sax(s.key)
            assert np.array_equal(s.image, z.image) and np.array_equal(s.seg, z.seg) and s.meta == z.meta
            t = truth[tuple(s.key.split("/"))]
            assert s.image.shape == (int(t["frames"]), s.seg.shape[1], 64, 64) and s.image.dtype == np.float16
            assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
            assert (s.meta["ed"], s.meta["es"]) == (int(t["ed"]), int(t["es"]))
            # the labels survive resampling: each structure's area on the 2.5 mm grid within 15 % of the truth
            # (nearest-neighbour from ~4.3 mm pixels: an ES left ventricle here is ~30 pixels a slice)
            f = np.prod(s.meta["source_spacing_mm"][:2]) / 2.5**2
            for i, phase in enumerate(("ed", "es")):
                for name in ("LV", "MYO", "RV"):
                    got = (s.seg[i] == LABELS.index(name)).sum() / f
                    assert abs(got / int(t[f"{name}_{phase}_voxels"]) - 1) < 0.15, (s.key, phase, name)
            n += 1
    assert n == N - len(broken)
    again, _ = run(cfg, progress=False)
    assert again.nothing_to_do
