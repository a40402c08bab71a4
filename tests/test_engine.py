"""The conversion engine on a real local Ray cluster (2 workers), with a toy dataset: shards, Zarr, manifest,
quarantine, worker crashes, idempotent re-runs and incremental growth."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import zarr

from core.format import _Sample, decode_key
from data_prep.engine import ArraySpec, JobConfig, WorkItem, run_job
from data_prep.splits import split_of


@dataclass
class ToySample(_Sample):
    key: str
    x: np.ndarray
    meta: dict = field(default_factory=dict)


class ToyDataset:
    name = "toy"

    def arrays(self):
        return {"x": ArraySpec((4, 4), "float32", (4, 4), 0.0)}

    def process(self, item: WorkItem) -> ToySample:
        if "bad" in item.key:
            raise ValueError(f"{item.paths[0]}: unreadable")
        if "nan" in item.key:
            int(float("nan"))  # a library error that does not name the file ("cannot convert float NaN ...")
        if "crash" in item.key:
            os._exit(1)  # what an out-of-memory kill looks like to Ray: the worker process is gone
        return ToySample(item.key, _value(item.key), {"n": len(item.key)})


def _value(key: str) -> np.ndarray:
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).random((4, 4)).astype(np.float32)


@pytest.fixture(autouse=True)
def _ray(ray_cluster):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules


def _items(keys, tmp_path):
    return [WorkItem(k, [str(tmp_path / f"{k}.src")]) for k in keys]


def _hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


@pytest.mark.slow
def test_convert_quarantine_crash_and_reconcile(tmp_path):
    keys = [f"{1000000 + i}" for i in range(9)] + ["1000100bad", "1000200crash", "1000300nan"]
    cfg = JobConfig(out=tmp_path / "out", block_size=3, workers=2, max_retries=1)
    rep = run_job(ToyDataset(), _items(keys, tmp_path), cfg, cfg, progress=False)
    c = rep.counts
    assert c == {"inputs": 12, "written": 9, "quarantined": 3, "skipped": 0}
    m = json.loads((cfg.out / "manifest.json").read_text())
    reasons = {q["key"]: q["reason"] for q in m["quarantined"]}
    assert reasons["1000100bad"] == f"ValueError: {tmp_path / '1000100bad.src'}: unreadable"  # names it already
    assert reasons["1000300nan"] == f"{tmp_path / '1000300nan.src'}: ValueError: cannot convert float NaN to integer"
    assert "worker crashed" in reasons["1000200crash"]
    assert len((cfg.out / "quarantine.jsonl").read_text().splitlines()) == 3
    # every shard listed with its true checksum; each holds one split; samples equal what process() made
    seen = {}
    for s in m["shards"]:
        path = cfg.out / s["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
        for sample in wds.WebDataset(str(path), shardshuffle=False):
            t = ToySample.from_wds(sample)
            assert split_of(t.key) == s["split"]
            seen[t.key] = t.x
    assert sorted(seen) == sorted(k for k in keys if k.isdigit())
    assert all(np.array_equal(v, _value(k)) for k, v in seen.items())
    # the Zarr store holds the same arrays at the rows the manifest names
    g = zarr.open_group(cfg.out / "store.zarr", mode="r")
    for b in m["blocks"]:
        for k, row in zip(b["keys"], b["rows"]):
            assert decode_key(g["key"][row]) == k and g["valid"][row]
            assert np.array_equal(g["x"][row], _value(k))
    assert int(np.asarray(g["valid"][:]).sum()) == 9
    assert not list(cfg.out.rglob("*.tmp*")) and not list(cfg.out.rglob(".tmp-*"))


def test_rerun_does_nothing_and_growth_appends(tmp_path):
    cfg = JobConfig(out=tmp_path / "out", block_size=4, workers=2)
    first = [f"{2000000 + i}" for i in range(10)]
    run_job(ToyDataset(), _items(first, tmp_path), cfg, cfg, progress=False)
    manifest = (cfg.out / "manifest.json").read_bytes()
    shards = _hashes(cfg.out)
    again = run_job(ToyDataset(), _items(first, tmp_path), cfg, cfg, progress=False)
    assert again.nothing_to_do and again.counts == {"inputs": 10, "written": 0, "quarantined": 0, "skipped": 10}
    assert (cfg.out / "manifest.json").read_bytes() == manifest and _hashes(cfg.out) == shards

    more = first + [f"{3000000 + i}" for i in range(7)]
    grown = run_job(ToyDataset(), _items(more, tmp_path), cfg, cfg, progress=False)
    assert grown.counts == {"inputs": 17, "written": 7, "quarantined": 0, "skipped": 10}
    after = _hashes(cfg.out)
    assert {k: after[k] for k in shards} == shards  # old shards byte-identical
    m = json.loads((cfg.out / "manifest.json").read_text())
    assert m["totals"]["samples"] == 17 and len(m["runs"]) == 2
    old_blocks = json.loads(manifest)["blocks"]
    assert m["blocks"][: len(old_blocks)] == old_blocks  # nothing moved: same rows, same splits


def test_quarantined_inputs_are_not_retried_until_their_files_change(tmp_path):
    cfg = JobConfig(out=tmp_path / "out", block_size=4, workers=2)
    items = _items(["4000000", "4000001bad"], tmp_path)
    (tmp_path / "4000001bad.src").write_text("v1")
    run_job(ToyDataset(), items, cfg, cfg, progress=False)
    rep = run_job(ToyDataset(), items, cfg, cfg, progress=False)
    assert rep.nothing_to_do and rep.counts["skipped"] == 2
    (tmp_path / "4000001bad.src").write_text("v2, longer")  # a new file: try again
    rep = run_job(ToyDataset(), items, cfg, cfg, progress=False)
    assert rep.counts == {"inputs": 2, "written": 0, "quarantined": 1, "skipped": 1}
    m = json.loads((cfg.out / "manifest.json").read_text())
    assert [q["key"] for q in m["quarantined"]] == ["4000001bad"]  # replaced, not duplicated


def test_block_size_and_splits_are_fixed_for_a_dataset(tmp_path):
    from core.config import ConfigError

    cfg = JobConfig(out=tmp_path / "out", block_size=4, workers=2)
    run_job(ToyDataset(), _items(["5000000"], tmp_path), cfg, cfg, progress=False)
    for changed in (JobConfig(out=cfg.out, block_size=8, workers=2),
                    JobConfig(out=cfg.out, block_size=4, workers=2, val_fraction=0.2)):
        with pytest.raises(ConfigError, match="fixed for a dataset"):
            run_job(ToyDataset(), _items(["5000001"], tmp_path), changed, changed, progress=False)
