"""`python -m data_prep kspace` on the synthetic k-space, on a real local Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import webdataset as wds

from core.format import KSpaceSample, StoreReader
from data_prep.engine import JobConfig
from data_prep.kspace.job import KSpaceJobConfig, run
from data_prep.kspace.preprocess import preprocess_kspace_file

pytestmark = pytest.mark.slow  # not in `make test-fast`


def _cfg(src: Path, out: Path) -> KSpaceJobConfig:
    return KSpaceJobConfig(src=src, size=64, job=JobConfig(out=out, block_size=4, workers=2))


def test_kspace_round_trip_and_bad_files(tiny_cohort, tmp_path, ray_cluster):
    import shutil

    src = tmp_path / "kspace"
    shutil.copytree(tiny_cohort / "kspace", src)
    good = sorted(src.rglob("*.mat"))
    base = good[0].parent.parent  # a scanner folder
    (base / "P900").mkdir()
    (base / "P900" / "cine_sax.mat").write_bytes(b"\x00garbage" * 100)  # unreadable
    with h5py.File(base / "P900" / "T1map.mat", "w", userblock_size=512) as f:  # wrong rank
        f.create_dataset("kspace_full", data=np.zeros((2, 1, 1, 4, 8, 8), [("real", "<f4"), ("imag", "<f4")]))
    (src / "stray").mkdir()
    (src / "stray" / "notes.mat").write_bytes(b"MATLAB 5.0")  # outside the layout
    (base / "P900" / "cine_sax_mask.mat").write_bytes(b"mask")  # a sampling mask: not an input
    (base / "P901").mkdir()
    (base / "P901" / good[0].name).symlink_to(good[0].name)  # a symlink loop (it names itself)

    cfg = _cfg(src, tmp_path / "out")
    report, _ = run(cfg, progress=False)
    c = report.counts
    assert c == {"inputs": len(good) + 4, "written": len(good), "quarantined": 4, "skipped": 0}
    m = json.loads((cfg.job.out / "manifest.json").read_text())
    reasons = " | ".join(q["reason"] for q in m["quarantined"])
    assert "cine_sax.mat" in reasons and "T1map.mat" in reasons and "notes.mat" in reasons
    assert f"P901/{good[0].name}: a symbolic link that does not resolve" in reasons
    assert any("cine_sax_mask.mat" in f for f in m["ignored_files"])

    reader = StoreReader(cfg.job.out)
    assert sorted(reader.keys()) == sorted(report.manifest["blocks"][i]["keys"][j]
                                           for i in range(len(m["blocks"])) for j in range(len(m["blocks"][i]["keys"])))
    n = 0
    for shard in m["shards"]:
        for raw in wds.WebDataset(str(cfg.job.out / shard["path"]), shardshuffle=False):
            s = KSpaceSample.from_wds(raw)
            z = reader.kspace(s.key)
            assert np.array_equal(s.image, z.image) and s.meta == z.meta  # shards and Zarr agree
            direct, meta = preprocess_kspace_file(cfg.src / s.meta["relpath"], s.meta["relpath"], 64,
                                                  readout_oversampling=cfg.readout_oversampling)
            assert np.array_equal(s.image, direct)  # what preprocessing produced, bit for bit
            assert s.image.shape[2:] == (64, 64) and s.meta["text"] == meta["text"]
            # the synthetic files are written as CMRxRecon's are (a 2x oversampled readout); the job removes it
            assert s.meta["readout_oversampling"] == 2.0
            assert s.meta["original_shape"][-1] * 2 == s.meta["kspace_shape"][-1]
            n += 1
    assert n == len(good)

    again, _ = run(cfg, progress=False)
    assert again.nothing_to_do and again.counts["skipped"] == len(good) + 4


def _write(root: Path, scans) -> None:
    from data_prep.synth import kspace as K

    for s in scans:
        K.write_scan(root, s, "v73")


def _key_splits(manifest: dict) -> dict[str, str]:
    return {k: b["split"] for b in manifest["blocks"] for k in b["keys"]}


def _patient(key: str) -> str:
    from data_prep.kspace.source import parse_relpath, patient_key

    modality, *site, patient, name = key.split("/")
    return patient_key(parse_relpath(f"MultiCoil/{modality}/TrainingSet/FullSample/{'/'.join(site)}/{patient}/{name}.mat"))


def test_stratified_split_is_grouped_and_stable_when_the_archive_grows(tmp_path, ray_cluster):
    """Convert 40 scans, add 30 (new patients and new sequences of old ones): every old key keeps its split, every
    patient's sequences share one split, the manifest records the scheme, and a stratum a split lacks is named."""
    from data_prep.engine import format_summary
    from data_prep.kspace.source import stratum
    from data_prep.synth import kspace as K

    plan = K.plan_kspace_scans(70, seed=5, size_scale=0.2)
    src = tmp_path / "src"
    _write(src, plan[:40])
    cfg = KSpaceJobConfig(src=src, size=32, job=JobConfig(out=tmp_path / "out", block_size=8, workers=2,
                                                          val_fraction=0.2, test_fraction=0.2))
    report, _ = run(cfg, progress=False)
    first = _key_splits(report.manifest)
    scheme = report.manifest["split_scheme"]
    assert len(first) == 40 and scheme["name"] == "stratified" and "patient" in scheme["group_by"]
    assert set(first.values()) == {"train", "val", "test"}
    assert scheme["missing"]  # 40 scans over 10 strata: some stratum lacks a split, said, not failed
    assert "warning: strata absent from a split" in format_summary(report, cfg.job.out)

    _write(src, plan[40:])
    old_patients = {_patient(k) for k in first}
    assert any(f"{s.center}/{s.scanner_folder}/{s.patient}" in old_patients for s in plan[40:])
    report2, _ = run(cfg, progress=False)
    m = report2.manifest
    both = _key_splits(m)
    assert len(both) == 70 and all(both[k] == s for k, s in first.items())  # nothing moved
    by_patient: dict[str, set] = {}
    for k, s in both.items():
        by_patient.setdefault(_patient(k), set()).add(s)
    assert all(len(s) == 1 for s in by_patient.values())  # no patient in two splits
    sc = m["split_scheme"]
    assert sc["groups"] == {p: next(iter(s)) for p, s in sorted(by_patient.items())}
    strata: dict[str, dict[str, int]] = {}
    for k, s in both.items():
        modality, name = k.split("/")[0], k.split("/")[-1]
        c = strata.setdefault(stratum(modality, name), {"train": 0, "val": 0, "test": 0})
        c[s] += 1
    assert sc["strata"] == strata
    missing = [{"stratum": st, "split": p} for st, c in sorted(strata.items()) for p in ("train", "val", "test")
               if not c[p]]
    assert sc["missing"] == missing
    summary = format_summary(report2, cfg.job.out)
    assert ("warning: strata absent from a split" in summary) == bool(missing)
    for x in missing:
        assert x["stratum"] in summary


def _demo_items(n: int, seed: int, size_scale: float):
    from data_prep.engine import WorkItem
    from data_prep.kspace.source import patient_key, sequence_key, stratum
    from data_prep.synth import kspace as K

    items = []
    for s in K.plan_kspace_scans(n, seed, size_scale):
        p = K.parse_relpath(s.relpath)
        items.append(WorkItem(sequence_key(p), [s.relpath], {"relpath": s.relpath}, group=patient_key(p),
                              stratum=stratum(s.modality, s.name)))
    return items


def test_demo_cohort_has_every_stratum_in_every_split_and_grows_stably():
    """The plan of the demo's own configs (configs/data_prep/synth_demo.yaml, kspace_demo.yaml): every (modality,
    view) stratum in train, val and test near the fractions; planning a larger archive after it moves nothing."""
    import yaml

    from data_prep.engine import BlockResult, _plan_blocks, _record_split_scheme, _split_state
    from data_prep.kspace.job import SPLIT_SCHEME

    root = Path(__file__).resolve().parents[1] / "configs" / "data_prep"
    synth = yaml.safe_load((root / "synth_demo.yaml").read_text())
    job = JobConfig(**{k: v for k, v in yaml.safe_load((root / "kspace_demo.yaml").read_text())["job"].items()
                       if k != "out"})
    n = synth["kspace_scans"]
    assert n >= 300
    items = _demo_items(n, synth["seed"], synth["kspace_size_scale"])
    state = _split_state(None, SPLIT_SCHEME)
    blocks = _plan_blocks(items, 0, job, state)
    results = [BlockResult(b.id, b.split, [it.key for it in b.items], [], [], None) for b in blocks]
    rec = _record_split_scheme(state, blocks, results, job)
    assert rec["missing"] == [] and len(rec["strata"]) == 10
    frac = {"train": 1 - job.val_fraction - job.test_fraction, "val": job.val_fraction, "test": job.test_fraction}
    for st, c in rec["strata"].items():
        total = sum(c.values())
        assert all(abs(c[p] - frac[p] * total) <= max(3, 0.1 * total) for p in c), (st, c)
    split = {it.key: b.split for b in blocks for it in b.items}

    # the archive grows by half: the manifest's record places the new scans; every earlier scan keeps its split
    more = _demo_items(n + n // 2, synth["seed"], synth["kspace_size_scale"])[n:]
    blocks2 = _plan_blocks(more, len(blocks), job, {**state, **rec})
    split2 = {it.key: b.split for b in blocks2 for it in b.items}
    assert not set(split) & set(split2)
    group = {it.key: it.group for it in items + more}
    for k, s in split2.items():
        if group[k] in rec["groups"]:
            assert s == rec["groups"][group[k]]  # a known patient's new scans join its split
    results2 = [BlockResult(b.id, b.split, [it.key for it in b.items], [], [], None) for b in blocks2]
    rec2 = _record_split_scheme({**state, **rec}, blocks2, results2, job)
    assert all(rec2["groups"][g] == s for g, s in rec["groups"].items()) and rec2["missing"] == []


def test_ukb_and_older_kspace_datasets_keep_the_hash_split():
    from data_prep.engine import _plan_blocks, _split_state
    from data_prep.splits import split_of

    assert _split_state(None, "hash") == {"name": "hash"}
    assert _split_state({"blocks": []}, {"name": "stratified"}) == {"name": "hash"}  # created before the scheme
    items = _demo_items(60, 0, 0.2)
    job = JobConfig(block_size=4, val_fraction=0.2, test_fraction=0.2)
    for b in _plan_blocks(items, 0, job, _split_state(None, "hash")):
        assert all(split_of(it.key, 0.2, 0.2) == b.split for it in b.items)
