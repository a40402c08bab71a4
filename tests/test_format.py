"""The sample format: lossless array codec, sample round trips, stable splits."""

from __future__ import annotations

import numpy as np
import pytest

from core.format import (KSpaceSample, UKBSample, decode_array, encode_array, encoded_shape, frame_members,
                         read_frames, stored_frames)
from core.vocab import DISEASES, PHENOTYPES, SPLITS, plane_names
from data_prep.splits import split_of, stratified_group_splits


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint8, np.int8, np.int16, bool])
def test_array_codec_round_trip(dtype):
    a = (np.random.default_rng(0).random((3, 5, 7)) * 100).astype(dtype)
    b = decode_array(encode_array(a))
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_array_codec_compresses_and_rejects_foreign_bytes():
    a = np.zeros((50, 128, 128), np.float16)
    assert len(encode_array(a)) < a.nbytes / 50
    with pytest.raises(ValueError, match="magic"):
        decode_array(b"\x93NUMPY...")


def _ukb_sample(rng) -> UKBSample:
    return UKBSample(key="1234567", image=rng.random((9, 50, 16, 16)).astype(np.float16),
                     seg=rng.integers(0, 6, (9, 50, 16, 16)).astype(np.uint8), seg_valid=np.ones(9, bool),
                     tabular=np.where(rng.random(12) < 0.2, np.nan, rng.standard_normal(12)).astype(np.float32),
                     diseases=np.array([1, 0, -1, 0, 0, 1], np.int8)[: len(DISEASES)],
                     phenotypes=np.full(len(PHENOTYPES), np.nan, np.float32), meta={"eid": "1234567", "sa": [1, 2]})


def test_samples_round_trip_through_the_webdataset_dict():
    s = _ukb_sample(np.random.default_rng(1))
    d = s.to_wds()
    frames = {f"image.t{t:03d}.arr" for t in range(50)} | {f"seg.t{t:03d}.arr" for t in range(50)}
    assert d["__key__"] == "1234567" and set(d) >= frames | {"tabular.arr", "meta.json"}
    assert "image.arr" not in d and stored_frames(d) == 50 == stored_frames(d, "seg")
    t = UKBSample.from_wds(d)
    for name in ("image", "seg", "seg_valid", "tabular", "diseases"):
        assert np.array_equal(getattr(s, name), getattr(t, name), equal_nan=name == "tabular")
    assert np.array_equal(np.isnan(t.phenotypes), np.isnan(s.phenotypes)) and t.meta == s.meta
    k = KSpaceSample(key="Cine/Center001/Siemens_30T_Vida/P001/cine_sax",
                     image=np.ones((12, 3, 8, 8), np.float16), meta={"modality": "Cine"})
    k2 = KSpaceSample.from_wds(k.to_wds())
    assert k2.key == k.key and np.array_equal(k2.image, k.image) and k2.meta == k.meta


def test_cine_frames_read_alone_and_schema_1_still_reads():
    """Schema 2 stores cine frame by frame: reading frames 0, 12, 49 decodes only those three members (the others
    may be absent, as when the shard reader skipped them); a schema-1 sample (one member with every frame) gives
    the same arrays."""
    s = _ukb_sample(np.random.default_rng(2))
    d = s.to_wds()
    keep = frame_members("image", [0, 12, 49])
    only = {k: v for k, v in d.items() if k in keep or not k.startswith("image.")}
    assert np.array_equal(read_frames(only, "image", [0, 12, 49]), s.image[:, [0, 12, 49]])
    with pytest.raises(KeyError, match="image.t001.arr"):
        read_frames(only, "image", [0, 1])
    old = {"__key__": s.key, **{f"{n}.arr": encode_array(getattr(s, n)) for n in ("image", "seg", "seg_valid",
                                                                               "tabular", "diseases", "phenotypes")},
           "meta.json": d["meta.json"]}
    assert np.array_equal(read_frames(old, "image", [0, 12, 49]), s.image[:, [0, 12, 49]])
    assert encoded_shape(old["image.arr"]) == s.image.shape
    t = UKBSample.from_wds(old)
    assert np.array_equal(t.image, s.image) and np.array_equal(t.seg, s.seg)
    # one frame of 9 planes compresses on its own about as well as inside the whole array
    assert sum(len(d[m]) for m in frame_members("image", range(50))) < 1.05 * len(old["image.arr"])


def test_split_is_stable_and_balanced():
    keys = [str(1_000_000 + i) for i in range(20_000)]
    splits = [split_of(k) for k in keys]
    frac = {s: splits.count(s) / len(keys) for s in ("train", "val", "test")}
    assert abs(frac["train"] - 0.8) < 0.02 and abs(frac["val"] - 0.1) < 0.01 and abs(frac["test"] - 0.1) < 0.01
    assert [split_of(k) for k in keys[:100]] == splits[:100]  # a function of the key alone


def _units(n_groups: int, strata: int, seed: int = 0) -> dict[str, dict[str, int]]:
    """Groups (patients) of 1-6 items over `strata` strata, uneven as in a real archive."""
    rng = np.random.default_rng(seed)
    units = {}
    for g in range(n_groups):
        u: dict[str, int] = {}
        for s in rng.choice(strata, size=int(rng.integers(1, 7))):
            u[f"s{s}"] = u.get(f"s{s}", 0) + 1
        units[f"C{g % 7}/P{g:04d}"] = u
    return units


def _counts(units, assigned) -> dict[str, dict[str, int]]:
    c: dict[str, dict[str, int]] = {}
    for g, u in units.items():
        for s, n in u.items():
            c.setdefault(s, dict.fromkeys(SPLITS, 0))[assigned[g]] += n
    return c


def test_stratified_group_splits_balance_every_stratum():
    units = _units(400, 10)
    a = stratified_group_splits(units, val_fraction=0.2, test_fraction=0.2)
    assert set(a) == set(units) and set(a.values()) == set(SPLITS)
    for s, c in _counts(units, a).items():
        n = sum(c.values())
        for p, f in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
            assert abs(c[p] - f * n) <= 4, (s, c)  # a stratum follows the fractions to a few items
    # a function of the groups, not of their order
    assert stratified_group_splits(dict(reversed(list(units.items()))), val_fraction=0.2, test_fraction=0.2) == a
    # no val / test fraction: everything in train
    assert set(stratified_group_splits(units, val_fraction=0.0, test_fraction=0.0).values()) == {"train"}


def test_stratified_group_splits_never_move_what_is_placed():
    units = _units(300, 10, seed=1)
    old = dict(list(units.items())[:150])
    first = stratified_group_splits(old, val_fraction=0.2, test_fraction=0.2)
    # the archive grows: new groups, and new items of old groups
    grown = {g: dict(u) for g, u in units.items()}
    for g in list(old)[:40]:
        grown[g]["s99"] = grown[g].get("s99", 0) + 1
    new_units = {g: (u if g not in old else {s: n - old[g].get(s, 0) for s, n in u.items() if n - old[g].get(s, 0)})
                 for g, u in grown.items()}
    new_units = {g: u for g, u in new_units.items() if u}
    second = stratified_group_splits(new_units, counts=_counts(old, first), fixed=first, val_fraction=0.2,
                                     test_fraction=0.2)
    assert all(second[g] == first[g] for g in second if g in first)  # old patients keep their split
    everything = {**first, **second}
    for s, c in _counts(grown, everything).items():
        if s != "s99":
            n = sum(c.values())
            assert min(c.values()) > 0 and abs(c["test"] - 0.2 * n) <= 5, (s, c)


def test_plane_order():
    assert plane_names(2) == ("sa_0", "sa_1", "la_2ch", "la_3ch", "la_4ch")
