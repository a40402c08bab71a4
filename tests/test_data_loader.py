"""The Stage I/II loader (pretrain/data.py): determinism, coverage, exact and approximate resume, transforms.

A small converted dataset is written on the fly without Ray: 8 train shards of 5 subjects (keys 1000000..1000039)
and 1 val shard, 5 planes (2 SA + 3 LA) x 10 frames x 16^2, with a minimal manifest.json.
"""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from core.format import UKBSample, normalise_tabular
from core.vocab import DISEASES, PHENOTYPES
from pretrain import data as D
from pretrain import transforms as TF
from pretrain.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]
P, T, S = 5, 10, 16
TRAIN_KEYS = [str(1_000_000 + i) for i in range(40)]
VAL_KEYS = [str(1_000_040 + i) for i in range(5)]
STATS = {"version": "v1", "features": [
    {"name": "age", "kind": "numerical", "mean": 60.0, "std": 8.0},
    {"name": "bmi", "kind": "numerical", "mean": 27.0, "std": 4.0},
    {"name": "sex", "kind": "binary", "mode": 1}]}
NOAUG = DataConfig(workers=0, shuffle_buffer=4, rotation_deg=0.0, flip=False, contrast=0.0)


def _sample(key: str, rng) -> UKBSample:
    tab = np.array([rng.normal(60, 8), rng.normal(27, 4), rng.integers(0, 2)], np.float32)
    tab[rng.random(3) < 0.3] = np.nan
    return UKBSample(key=key, image=rng.random((P, T, S, S)).astype(np.float16),
                     seg=rng.integers(0, 6, (P, T, S, S)).astype(np.uint8), seg_valid=np.array([1, 1, 1, 0, 1], bool),
                     tabular=tab, diseases=rng.integers(-1, 2, len(DISEASES)).astype(np.int8),
                     phenotypes=rng.random(len(PHENOTYPES)).astype(np.float32), meta={"eid": key})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from conftest import write_shards

    out = tmp_path_factory.mktemp("ukb")
    rng = np.random.default_rng(0)
    samples = {}

    def make(key):
        samples[key] = _sample(key, rng)
        return samples[key]

    groups = [("train", TRAIN_KEYS[i:i + 5]) for i in range(0, 40, 5)] + [("val", VAL_KEYS)]
    shards = write_shards(out, groups, make)
    shards.reverse()  # the loader sorts by block
    manifest = {"dataset": "ukb", "block_size": 5, "shards": shards,
                "tabular": {"stats": {"v1": STATS}, "current_stats": "v1"}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, samples


def _loader(ds, cfg=None, *, rank=0, world=1, batch=4, seed=0, **kw):
    return D.build_loader(ds[0], cfg or DataConfig(workers=0, shuffle_buffer=4), rank=rank, world_size=world,
                          batch_size=batch, seed=seed, **kw)


def _take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _flat(batches, field="key"):
    return [x for b in batches for x in (b[field] if field == "key" else b[field].tolist())]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["epoch"], y["epoch"])
        assert torch.equal(x["image"], y["image"])


# --- the manifest and the shard layout ------------------------------------------------------------------------
def test_manifest_shards_and_samples_per_epoch(dataset):
    shards = D.list_shards(dataset[0])
    assert [s.block for s in shards] == list(range(8)) and all(s.samples == 5 for s in shards)
    assert D.samples_per_epoch(dataset[0]) == 40 and D.samples_per_epoch(dataset[0], "val") == 5
    assert _loader(dataset).samples_per_epoch == 40


def test_epoch_shards_partition_and_fallback():
    for epoch in range(3):
        parts = [D.epoch_shards(8, s, 4, 0, epoch) for s in range(4)]
        assert sorted(i for p in parts for i in p) == list(range(8)) and all(len(p) == 2 for p in parts)
    assert D.epoch_shards(8, 0, 4, 0, 0) + D.epoch_shards(8, 1, 4, 0, 0) != \
        D.epoch_shards(8, 0, 4, 0, 1) + D.epoch_shards(8, 1, 4, 0, 1)
    fallback = [D.epoch_shards(3, s, 5, 0, 0) for s in range(5)]  # fewer shards than slots
    assert all(len(p) == 1 for p in fallback) and {p[0] for p in fallback} == {0, 1, 2}
    assert D.slot_positions(7, 2) == [4, 3] and D.slot_positions(7, 0) == [7]


# --- determinism and coverage ---------------------------------------------------------------------------------
def test_same_seed_same_batches_other_seed_differs(dataset):
    cfg = DataConfig(workers=2, shuffle_buffer=4)
    a = _take(_loader(dataset, cfg, world=2, rank=1, seed=3), 4)
    b = _take(_loader(dataset, cfg, world=2, rank=1, seed=3), 4)
    _same(a, b)
    c = _take(_loader(dataset, cfg, world=2, rank=1, seed=4), 4)
    assert _flat(a) != _flat(c)


def test_one_epoch_over_two_ranks_and_two_workers_covers_every_key_once(dataset):
    cfg = DataConfig(workers=2, shuffle_buffer=3)
    per_rank = [_take(_loader(dataset, cfg, world=2, rank=r, batch=5), 8) for r in range(2)]  # 2 epochs
    for epoch in range(2):
        keys = [k for r in range(2) for k in _flat(per_rank[r][4 * epoch:4 * epoch + 4])]
        assert sorted(keys) == TRAIN_KEYS  # every training key exactly once, no val key
        assert set(_flat(per_rank[0][4 * epoch:4 * epoch + 4], "epoch")) == {epoch}
    assert _flat(per_rank[0][:4]) != _flat(per_rank[0][4:])  # re-permuted


# --- resume ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_across_an_epoch_boundary(dataset, workers):
    cfg = DataConfig(workers=workers, shuffle_buffer=7)
    ref = _take(_loader(dataset, cfg, world=2, rank=1, batch=3), 11)  # a rank's epoch is 20 samples
    for n in (5, 7):  # before the boundary, and just after it
        first = _loader(dataset, cfg, world=2, rank=1, batch=3)
        _same(_take(first, n), ref[:n])
        state = first.state_dict()
        assert state == {"consumed": 3 * n, "world_size": 2, "workers": workers, "seed": 0, "samples_per_epoch": 40}
        again = _loader(dataset, cfg, world=2, rank=1, batch=3)
        assert again.load_state_dict(json.loads(json.dumps(state))) is True and again.resume_exact
        _same(_take(again, 11 - n), ref[n:])
    # the state is in samples: resuming with another batch size is exact too
    other = _loader(dataset, cfg, world=2, rank=1, batch=5)
    assert other.load_state_dict({**state, "consumed": 15})
    assert _flat(_take(other, 3)) == _flat(ref[5:10])


def test_resume_in_the_training_process_equals_one_worker_and_skips_whole_shards(dataset, monkeypatch):
    cfg0, cfg1 = DataConfig(workers=0, shuffle_buffer=2), DataConfig(workers=1, shuffle_buffer=2)
    ref = _take(_loader(dataset, cfg0, batch=5), 7)
    with_worker = _loader(dataset, cfg1, batch=5)
    assert with_worker.load_state_dict({**_loader(dataset, cfg0).state_dict(), "consumed": 25})  # K 0 -> 1: exact
    _same(_take(with_worker, 2), ref[5:7])
    opened = []
    real = D._read_shard
    monkeypatch.setattr(D, "_read_shard", lambda url, *a: (opened.append(url), (yield from real(url, *a)))[1])
    resumed = _loader(dataset, cfg0, batch=5)
    resumed.load_state_dict({**resumed.state_dict(), "consumed": 25})
    _same(_take(resumed, 1), ref[5:6])
    order = [D.list_shards(dataset[0])[i].url for i in D.epoch_shards(8, 0, 1, 0, 0)]
    assert opened and order[0] not in opened and order[1] not in opened  # skipped by count, never read


def test_resume_with_another_world_size_is_approximate_at_the_same_epoch(dataset, caplog):
    cfg = DataConfig(workers=2, shuffle_buffer=3)
    old = [_loader(dataset, cfg, world=2, rank=r, batch=5) for r in range(2)]
    seen = [_take(o, 6) for o in old]  # 30 samples per rank: global 60 = epoch 1, offset 20
    state = old[0].state_dict()
    new = _loader(dataset, DataConfig(workers=1, shuffle_buffer=3), world=1, batch=5)
    assert new.load_state_dict(state) is False and not new.resume_exact
    assert "approximate" in caplog.text and new.consumed == 60
    epochs = _flat(_take(new, 8), "epoch")
    assert epochs[:20] == [1] * 20 and epochs[20:] == [2] * 20  # same epoch, same offset: 20 samples left in it
    seen_epoch1 = {k for r in range(2) for b in seen[r][4:] for k in b["key"]}
    assert len(seen_epoch1) == 20
    # an explicit global count wins over consumed * world_size
    again = _loader(dataset, DataConfig(workers=0, shuffle_buffer=3), world=2, rank=0, batch=5)
    assert again.load_state_dict({**state, "consumed_global": 50}) is False and again.consumed == 25


def test_state_checks_and_stale_iterators(dataset):
    loader = _loader(dataset)
    with pytest.raises(ValueError, match="seed"):
        loader.load_state_dict({**loader.state_dict(), "seed": 1})
    with pytest.raises(ValueError, match="lacks"):
        loader.load_state_dict({"consumed": 4})
    it = iter(loader)
    next(it)
    loader.load_state_dict(loader.state_dict())
    with pytest.raises(RuntimeError, match="stale"):
        next(it)


# --- the per-sample transform ---------------------------------------------------------------------------------
def test_frame_selection_without_augmentation(dataset):
    assert TF.select_frames(50, 5).tolist() == [0, 12, 24, 37, 49]
    idx = np.rint(np.linspace(0, T - 1, 5)).astype(int)
    batch = _take(_loader(dataset, NOAUG, batch=8), 1)[0]
    assert batch["image"].shape == (8, P, 5, S, S) and batch["image"].dtype == torch.float32
    for i, key in enumerate(batch["key"]):
        stored = dataset[1][key]
        assert torch.equal(batch["image"][i], torch.from_numpy(stored.image[:, idx].astype(np.float32)))
        assert torch.equal(batch["diseases"][i], torch.from_numpy(stored.diseases))
        values, missing = normalise_tabular(stored.tabular, STATS)
        assert torch.equal(batch["tabular_values"][i], torch.from_numpy(values))
        assert torch.equal(batch["tabular_missing"][i], torch.from_numpy(missing))
        assert torch.equal(torch.isnan(batch["tabular"][i]), torch.from_numpy(missing))
    assert "seg" not in batch
    two = _take(_loader(dataset, NOAUG, batch=4, planes=["sa_1", "la_4ch"], frames=2), 1)[0]
    assert two["image"].shape == (4, 2, 2, S, S)
    k = two["key"][0]
    assert torch.equal(two["image"][0], torch.from_numpy(dataset[1][k].image[[1, 4]][:, [0, 9]].astype(np.float32)))
    shifted = TF.augment_params(0, "1000000", 0, P, 50, replace(NOAUG, temporal_offset=True))["offset"]
    assert 0 <= shifted < 10 and TF.select_frames(50, 5, 3).tolist() == [3, 15, 27, 40, 2]


def test_segmentation_follows_the_flips(dataset):
    cfg = replace(NOAUG, flip=True, seg=True)
    batch = _take(_loader(dataset, cfg, batch=4), 1)[0]
    idx = TF.select_frames(T, 5)
    for i, key in enumerate(batch["key"]):
        stored, prm = dataset[1][key], TF.augment_params(0, key, 0, P, T, cfg)
        for p in range(P):
            img, seg = stored.image[p, idx].astype(np.float32), stored.seg[p, idx]
            if prm["flips"][p]:
                img, seg = img[..., ::-1], seg[..., ::-1]
            assert np.array_equal(batch["image"][i, p].numpy(), img) and np.array_equal(batch["seg"][i, p].numpy(), seg)
        assert torch.equal(batch["seg_valid"][i], torch.from_numpy(stored.seg_valid))


def test_augmentation_is_a_function_of_seed_key_and_epoch(dataset):
    cfg = DataConfig(workers=0, shuffle_buffer=4)
    a = _take(_loader(dataset, cfg, batch=8), 10)  # one slot, 2 epochs
    b = _take(_loader(dataset, replace(cfg, workers=2, shuffle_buffer=9), batch=8), 10)  # two slots, other order
    assert _flat(a)[:40] != _flat(b)[:40]
    img_a = {(k, int(e)): x for bt in a for k, e, x in zip(bt["key"], bt["epoch"], bt["image"])}
    img_b = {(k, int(e)): x for bt in b for k, e, x in zip(bt["key"], bt["epoch"], bt["image"])}
    assert len(img_a) == len(img_b) == 80 and img_a.keys() == img_b.keys()
    assert all(torch.equal(img_a[k], img_b[k]) for k in img_a)
    assert not torch.equal(img_a[("1000000", 0)], img_a[("1000000", 1)])  # a new epoch, new augmentation
    other_seed = {k: x for bt in _take(_loader(dataset, cfg, batch=8, seed=1), 5)
                  for k, x in zip(bt["key"], bt["image"])}
    assert not torch.equal(other_seed["1000000"], img_a[("1000000", 0)])
    for x in img_a.values():
        assert x.min() >= 0.0 and x.max() <= 1.0


def _schema1(raw: dict) -> dict:
    """A raw schema-2 sample as schema 1 wrote it: one image / seg member holding every frame."""
    from core.format import encode_array, read_frames

    out = {k: v for k, v in raw.items() if not k.startswith(("image.t", "seg.t", "__members__"))}
    out.update({f"{n}.arr": encode_array(read_frames(raw, n)) for n in ("image", "seg")})
    return out


def test_the_reader_reads_only_the_frames_the_transform_keeps(dataset):
    """Cine is stored frame by frame: the shard reader hands over the selected frames' members (and no
    segmentation unless asked for), every other member is seeked over; the transform's output is the same as
    from the whole sample and from a schema-1 sample, for a random temporal offset too (the selection is a
    function of key and epoch)."""
    shard = D.list_shards(dataset[0], "train")[0]
    for cfg in (DataConfig(), DataConfig(temporal_offset=True, seg=True)):
        tf = TF.SampleTransform(cfg, 3, STATS)
        for epoch in (0, 1):
            full = list(D._read_shard(shard.url))
            part = list(D._read_shard(shard.url, select=lambda k, m: tf.members(k, epoch, m)))
            for a, b in zip(full, part):
                idx = tf._frames(a["__key__"], epoch, T)
                names = {"image"} | ({"seg"} if cfg.seg else set())
                frames = {k for k in b if k.startswith(("image.t", "seg.t"))}
                assert frames == {f"{n}.t{t:03d}.arr" for n in names for t in idx}
                assert "seg_valid.arr" not in b or cfg.seg
                assert len(b["__members__"]) == len([k for k in a if not k.startswith("__")]) == 2 * T + 5
                x, y = tf(a, epoch), tf(b, epoch)
                z = tf(_schema1(a), epoch)  # a shard written before cine was stored frame by frame
                for k in x:
                    if isinstance(x[k], torch.Tensor):
                        torch.testing.assert_close(x[k], z[k], rtol=0, atol=0, equal_nan=True)
                for k in x:
                    if isinstance(x[k], torch.Tensor):
                        torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, equal_nan=True)
                assert y["image"].shape == (P, 5, S, S)
    read = sum(len(v) for r in part for k, v in r.items() if not k.startswith("__"))
    assert read < 0.6 * sum(len(v) for r in full for k, v in r.items() if not k.startswith("__"))


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar"])
def test_the_header_reader_agrees_with_tarfile(tmp_path, fmt):
    """`_tar_entries` (headers parsed directly, for speed) lists what tarfile lists, long names (GNU 'L' records,
    pax paths, ustar prefixes) and a directory entry included; a damaged header is an error naming the file."""
    import io
    import tarfile

    path = tmp_path / f"{fmt}.tar"
    names = ["1000001.image.t000.arr", "dir/" + "k" * 120 + ".meta.json", "1000002.tabular.arr"]
    if fmt == "ustar":
        names[1] = "d" * 90 + "/" + "k" * 60 + ".meta.json"  # fits the ustar prefix + name fields
    with tarfile.open(path, "w", format={"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT,
                                         "ustar": tarfile.USTAR_FORMAT}[fmt]) as tar:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            data = bytes(range(256)) * (i + 1) + b"x" * i
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]
    with open(path, "rb") as f:
        assert list(D._tar_entries(f, str(path))) == expected and len(expected) == 3
    raw = bytearray(path.read_bytes())
    raw[130] ^= 0x01  # a size digit: the checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(raw))
    with open(tmp_path / "bad.tar", "rb") as f, pytest.raises(ValueError, match="bad.tar"):
        list(D._tar_entries(f, str(tmp_path / "bad.tar")))


def test_augmentation_on_the_batch_equals_augmentation_in_the_loader(dataset):
    """`data.augment_on: batch`: the loader hands over the selected frames and the parameters; `augment_batch`
    applies them to the whole batch on the training device, giving the per-sample result."""
    cfg = DataConfig(workers=0, shuffle_buffer=4, rotation_deg=10.0, contrast=0.1, temporal_offset=True)
    a = _take(_loader(dataset, cfg, batch=8), 2)
    b = _take(_loader(dataset, replace(cfg, augment_on="batch"), batch=8), 2)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and "aug_angles" in y and y["aug_angles"].shape == (8, P)
        assert y["image"].dtype == torch.float16  # the stored frames, unaugmented: the device converts them
        torch.testing.assert_close(TF.augment_batch(y, torch.device("cpu")), x["image"], rtol=0, atol=1e-6)
    assert torch.equal(TF.augment_batch(a[0], torch.device("cpu")), a[0]["image"])  # already augmented: as is
    with pytest.raises(ValueError, match="augment_on"):
        DataConfig(augment_on="gpu")


def test_augment_image_rotates_flips_and_stays_in_range():
    x = torch.rand(3, 2, S, S)
    out, _ = TF.augment_image(x, [30.0, -45.0, 10.0], [False] * 3, gamma=0.9)
    assert out.min() >= 0.0 and out.max() <= 1.0 and not torch.equal(out, x)
    flipped, _ = TF.augment_image(x, [0.0] * 3, [True, False, True])  # forced flips
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    assert torch.equal(flipped[2], x[2].flip(-1))
    quarter, _ = TF.augment_image(x, [90.0] * 3, [False] * 3)  # a quarter turn moves pixel centres onto centres
    assert any(torch.allclose(quarter, torch.rot90(x, k, (-2, -1)), atol=1e-4) for k in (1, -1))
    same, _ = TF.augment_image(x, [0.0] * 3, [False] * 3)
    assert torch.equal(same, x)
    params = TF.augment_params(0, "1000001", 0, P, T, DataConfig(rotation_deg=10.0))
    assert all(-10.0 <= a <= 10.0 for a in params["angles"]) and len(set(params["angles"])) == P  # one per plane
    assert 0.9 <= params["gamma"] <= 1.1


# --- the dependency rule ----------------------------------------------------------------------------------------
def test_data_module_imports_neither_ray_nor_the_conversion():
    def imports(module: str) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse((ROOT / "pretrain" / module).read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        return names

    loader, transforms = imports("data.py"), imports("transforms.py")
    assert not any(n.split(".")[0] in ("ray", "data_prep") for n in loader | transforms)
    assert "core.manifest" in loader and "core.format" in transforms  # the manifest and the sample format, from core


def test_an_exception_in_the_trainer_ends_the_process_despite_workers_ignoring_sigterm(dataset):
    """Workers ignore SIGTERM (SLURM signals every process; the trainer must save first), but multiprocessing stops
    them with SIGTERM at exit: an exception while a loader iterator is alive must still end the process (before the
    fix it waited for its workers forever, and a crashed SLURM job sat until its time limit)."""
    import subprocess
    import sys

    code = (f"from pretrain.data import build_loader\nfrom pretrain.config import DataConfig\n"
            f"it = iter(build_loader({str(dataset[0])!r}, DataConfig(workers=2, shuffle_buffer=4), rank=0, "
            f"world_size=1, batch_size=4, seed=0))\nnext(it)\nraise RuntimeError('boom in the training step')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "boom in the training step" in res.stderr, res.stderr[-2000:]
