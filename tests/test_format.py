"""The sample format: lossless array codec, sample round trips, stable splits."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.format import (DISEASES, PHENOTYPES, KSpaceSample, UKBSample, decode_array, encode_array, plane_names,
                              split_of)


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
    assert d["__key__"] == "1234567" and set(d) >= {"image.arr", "seg.arr", "meta.json"}
    t = UKBSample.from_wds(d)
    for name in ("image", "seg", "seg_valid", "tabular", "diseases"):
        assert np.array_equal(getattr(s, name), getattr(t, name), equal_nan=name == "tabular")
    assert np.array_equal(np.isnan(t.phenotypes), np.isnan(s.phenotypes)) and t.meta == s.meta
    k = KSpaceSample(key="Cine/Center001/Siemens_30T_Vida/P001/cine_sax",
                     image=np.ones((12, 3, 8, 8), np.float16), meta={"modality": "Cine"})
    k2 = KSpaceSample.from_wds(k.to_wds())
    assert k2.key == k.key and np.array_equal(k2.image, k.image) and k2.meta == k.meta


def test_split_is_stable_and_balanced():
    keys = [str(1_000_000 + i) for i in range(20_000)]
    splits = [split_of(k) for k in keys]
    frac = {s: splits.count(s) / len(keys) for s in ("train", "val", "test")}
    assert abs(frac["train"] - 0.8) < 0.02 and abs(frac["val"] - 0.1) < 0.01 and abs(frac["test"] - 0.1) < 0.01
    assert [split_of(k) for k in keys[:100]] == splits[:100]  # a function of the key alone


def test_plane_order():
    assert plane_names(2) == ("sa_0", "sa_1", "la_2ch", "la_3ch", "la_4ch")
