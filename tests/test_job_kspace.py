"""`python -m data_prep kspace` on the synthetic k-space, on a real local Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import webdataset as wds

from data_prep.format import KSpaceSample, StoreReader
from data_prep.jobs.engine import JobConfig
from data_prep.jobs.kspace import KSpaceJobConfig, run
from data_prep.preprocess_kspace import preprocess_kspace_file


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
        f.create_dataset("kspace_full", data=np.zeros((4, 8, 8), [("real", "<f4"), ("imag", "<f4")]))
    (src / "stray").mkdir()
    (src / "stray" / "notes.mat").write_bytes(b"MATLAB 5.0")  # outside the layout
    (base / "P900" / "cine_sax_mask.mat").write_bytes(b"mask")  # a sampling mask: not an input

    cfg = _cfg(src, tmp_path / "out")
    report, _ = run(cfg, progress=False)
    c = report.counts
    assert c == {"inputs": len(good) + 3, "written": len(good), "quarantined": 3, "skipped": 0}
    m = json.loads((cfg.job.out / "manifest.json").read_text())
    reasons = " | ".join(q["reason"] for q in m["quarantined"])
    assert "cine_sax.mat" in reasons and "T1map.mat" in reasons and "notes.mat" in reasons
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
            direct, meta = preprocess_kspace_file(cfg.src / s.meta["relpath"], s.meta["relpath"], 64)
            assert np.array_equal(s.image, direct)  # what preprocessing produced, bit for bit
            assert s.image.shape[2:] == (64, 64) and s.meta["text"] == meta["text"]
            n += 1
    assert n == len(good)

    again, _ = run(cfg, progress=False)
    assert again.nothing_to_do and again.counts["skipped"] == len(good) + 3
