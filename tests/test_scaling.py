"""The scaling study (`finetune/scaling.py`, `make scaling`) and the loader's nested subsets (`data.subjects`).

The loader tests write a small converted dataset without Ray (8 train shards of 5 subjects + 1 val shard, a
manifest with its block list); the study runs for real at smoke scale on the fine-tuning tests' converted cohort
(`cohort60`: 37 train / 12 val / 11 test subjects): Stage I on N = 4 and 8 subjects through torchrun + DeepSpeed
on 2 CPU ranks, a few steps each, then the probe, the table, the JSON and the plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import ConfigError, load_config
from core.format import UKBSample
from core.manifest import Manifest
from core.vocab import DISEASES, PHENOTYPES
from pretrain import data as D
from pretrain.config import DataConfig

pytestmark = pytest.mark.slow  # not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
TRAIN_KEYS = [str(2_000_000 + 7 * i) for i in range(40)]
VAL_KEYS = [str(3_000_000 + i) for i in range(5)]
CFG = DataConfig(workers=0, shuffle_buffer=4, rotation_deg=0.0, flip=False, contrast=0.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from conftest import write_shards

    out = tmp_path_factory.mktemp("ukb")
    rng = np.random.default_rng(0)

    def make(key):
        return UKBSample(key=key, image=rng.random((4, 6, 8, 8)).astype(np.float16),
                         seg=np.zeros((4, 6, 8, 8), np.uint8), seg_valid=np.ones(4, bool),
                         tabular=np.zeros(2, np.float32), diseases=np.zeros(len(DISEASES), np.int8),
                         phenotypes=np.zeros(len(PHENOTYPES), np.float32), meta={})

    groups = [("train", TRAIN_KEYS[i:i + 5]) for i in range(0, 40, 5)] + [("val", VAL_KEYS)]
    shards = write_shards(out, groups, make)
    blocks = [{"id": i, "split": split, "keys": keys, "rows": []} for i, (split, keys) in enumerate(groups)]
    (out / "manifest.json").write_text(json.dumps({"dataset": "ukb", "shards": shards, "blocks": blocks}))
    return out


def _keys(loader, batches: int) -> list[str]:
    it = iter(loader)
    out = [k for _ in range(batches) for k in next(it)["key"]]
    it.close()
    return out


def test_nested_subset_is_nested_and_stable_when_keys_are_added():
    keys = [str(1_000_000 + i) for i in range(300)]
    subsets = {n: D.nested_subset(keys, n) for n in (1, 10, 50, 100, 300, 400)}
    assert [len(s) for s in subsets.values()] == [1, 10, 50, 100, 300, 300]
    for a, b in zip(list(subsets.values()), list(subsets.values())[1:]):
        assert b[:len(a)] == a  # nested: each subset is the start of the next
    assert D.nested_subset(reversed(keys), 50) == subsets[50]  # the input order does not matter
    grown = keys + [str(5_000_000 + i) for i in range(200)]
    order = [k for k in D.nested_subset(grown, len(grown)) if k in set(keys)]
    assert order == subsets[300]  # new subjects never reorder the existing ones
    assert set(subsets[50]) != set(keys[:50])  # chosen by the hash, not by key order


def test_subset_config_is_validated():
    assert load_config(DataConfig, None, ["subjects=12"]).subjects == 12
    with pytest.raises(ConfigError, match="subjects"):
        load_config(DataConfig, None, ["subjects=0"])


def test_filtered_shard_read_equals_the_stream(dataset):
    from webdataset.tariterators import tarfile_samples

    shard = D.list_shards(dataset)[0]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"}  # noqa: E731
    full = [strip(r) for r in tarfile_samples([{"url": shard.url}])]
    keep = frozenset(r["__key__"] for r in full[1::2])
    assert [strip(r) for r in D._read_shard(shard.url, frozenset(r["__key__"] for r in full))] == full
    assert [strip(r) for r in D._read_shard(shard.url, keep)] == [r for r in full if r["__key__"] in keep]
    assert D.shard_keys(shard) == [r["__key__"] for r in full]


@pytest.mark.parametrize("world", [1, 2])
def test_loader_reads_only_the_subset_in_exact_passes(dataset, world):
    n = 12
    subset = set(D.nested_subset(TRAIN_KEYS, n))
    assert D.samples_per_epoch(dataset, subjects=n) == n and D.samples_per_epoch(dataset) == 40
    cfg = DataConfig(**{**CFG.__dict__, "subjects": n})
    loaders = [D.build_loader(dataset, cfg, rank=r, world_size=world, batch_size=2, seed=0) for r in range(world)]
    assert all(ld.samples_per_epoch == n for ld in loaders)
    passes = 3
    seen = [k for ld in loaders for k in _keys(ld, passes * n // (2 * world))]
    assert set(seen) == subset
    if world == 1:  # one slot: every pass is exact
        assert sorted(seen) == sorted(list(subset) * passes)
    # the manifest's block list and the tar headers give the same subset
    no_blocks = D.subset_shards(D.list_shards(dataset), (), n)
    assert no_blocks == D.subset_shards(D.list_shards(dataset), Manifest.load(dataset).blocks, n)
    assert sum(s.samples for s in no_blocks[0]) == n and all(s.keep <= subset for s in no_blocks[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_subset_loader_resumes_exactly(dataset, workers):
    cfg = DataConfig(**{**CFG.__dict__, "subjects": 9, "workers": workers})
    ref = D.build_loader(dataset, cfg, rank=0, world_size=1, batch_size=2, seed=3)
    expected = _keys(ref, 20)
    first = D.build_loader(dataset, cfg, rank=0, world_size=1, batch_size=2, seed=3)
    head = _keys(first, 7)
    state = first.state_dict()
    assert state["samples_per_epoch"] == 9 and len(state["subset"]) == 16
    resumed = D.build_loader(dataset, cfg, rank=0, world_size=1, batch_size=2, seed=3)
    assert resumed.load_state_dict(state) is True
    assert head + _keys(resumed, 13) == expected
    # another subset is a different dataset: an approximate resume by count, flagged
    other = D.build_loader(dataset, DataConfig(**{**cfg.__dict__, "subjects": 10}), rank=0, world_size=1,
                           batch_size=2, seed=3)
    assert other.load_state_dict(state) is False and not other.resume_exact
    same_size = D.build_loader(dataset, cfg, rank=0, world_size=1, batch_size=2, seed=3)
    assert same_size.load_state_dict({**state, "subset": "0" * 16}) is False
    full = D.build_loader(dataset, DataConfig(**{**cfg.__dict__, "subjects": None}), rank=0, world_size=1,
                          batch_size=2, seed=3)
    assert "subset" not in full.state_dict()


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml"])
def test_scaling_configs_validate(name):
    from finetune.scaling import ScalingConfig, launch_command, pretrain_config, run_overrides, total_steps

    cfg = load_config(ScalingConfig, ROOT / "configs/scaling" / name)
    n = max(cfg.subjects)
    overrides = run_overrides(cfg, n, cfg.seeds[0], Path("runs/x"))
    pc = pretrain_config(cfg, overrides)
    assert pc.stage == "mae" and pc.data.subjects == n and pc.train.samples_per_epoch == cfg.samples_per_epoch
    cmd = launch_command(cfg, overrides, total_steps(pc))
    assert ("torch.distributed.run" in cmd) == (cfg.launch.kind == "torchrun")
    assert ("--wait" in cmd) == (cfg.launch.kind == "cluster")
    with pytest.raises(ConfigError, match="subjects"):
        load_config(ScalingConfig, ROOT / "configs/scaling" / name, ["subjects=[50, 50]"])


def test_ridge_probe_recovers_a_linear_target():
    from finetune.probe import ridge_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6)) * [1, 10, 0.1, 1, 1, 1] + 5
    w = np.array([1.0, 0.2, 0.0, -2.0, 0.0, 0.5])
    y = np.stack([x @ w + 3 + 0.01 * rng.normal(size=80), rng.normal(size=80)], 1)
    y[::7, 0] = np.nan  # missing values leave the row out of that target only
    pred, alphas = ridge_probe(x[:60], y[:60], x[60:], [1e-3, 1e-1, 10.0, 1e3])
    assert np.abs(pred[:, 0] - (x[60:] @ w + 3)).max() < 0.1 and alphas[0] < 1
    assert alphas[1] == 1e3  # pure noise: the largest penalty (the mean) wins by leave-one-out


@pytest.mark.slow
def test_scaling_study_smoke(cohort60, tmp_path):
    from finetune.scaling import ScalingConfig, run_study
    from pretrain.checkpoint import latest_tag

    out = tmp_path / "study"
    cfg = load_config(ScalingConfig, ROOT / "configs/scaling/demo.yaml", [
        f"dataset={cohort60}", f"out={out}", "subjects=[4, 8]", "samples_per_epoch=16", "epochs=2",
        "pretrain_overrides=[train.image_every=0, checkpoint.every_steps=1000, data.shuffle_buffer=4]"])
    result = run_study(cfg)
    steps = 2 * (16 // 8)
    assert [(p["subjects"], p["steps"]) for p in result["points"]] == [(0, 0), (4, steps), (8, steps)]
    for name in ("table.md", "scaling.json", "scaling.png", "scaling_config.yaml"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "scaling.json").read_text())
    assert [r["subjects"] for r in saved["summary"]] == [0, 4, 8]
    table = (out / "table.md").read_text()
    for r in saved["summary"]:  # the table shows the JSON's numbers
        assert f"{r['mae_ratio']:.3f}" in table
        assert 0.0 < r["mae_ratio"] < 10.0 and np.isfinite(r["r2"])
    for p in saved["points"]:
        assert set(p["probe"]["targets"]) == set(cfg.probe.targets)
        assert p["probe"]["n_fit"] == 12 and p["probe"]["n_test"] == 11
        assert p["passes"] == (steps * 8 / p["subjects"] if p["subjects"] else 0.0)
    # each run read exactly its nested subset: the loader state in its checkpoint
    for n in (4, 8):
        run = out / "runs" / f"n{n}-s0"
        assert (run / "encoder.safetensors").exists()
        tag = latest_tag(run / "checkpoints")
        client = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        loader = client["per_rank"][0]["loader"]
        assert loader["samples_per_epoch"] == n and "subset" in loader
        assert f"data.subjects={n}" in json.loads((run / "scaling_point.json").read_text())["overrides"]
    # re-running reuses every point (nothing is pretrained again) and refuses a changed budget
    mtime = (out / "runs" / "n8-s0" / "encoder.safetensors").stat().st_mtime
    again = run_study(cfg)
    assert (out / "runs" / "n8-s0" / "encoder.safetensors").stat().st_mtime == mtime
    assert json.dumps(again["summary"]) == json.dumps(result["summary"])
    with pytest.raises(ConfigError, match="another pretraining config"):
        run_study(load_config(ScalingConfig, ROOT / "configs/scaling/demo.yaml", [
            f"dataset={cohort60}", f"out={out}", "subjects=[4]", "samples_per_epoch=32", "epochs=2"]))
