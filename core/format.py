"""The on-disk sample format: the one contract between the data_prep writers and every reader.

A UK Biobank subject, a k-space sequence and a short-axis segmentation case are each one sample. In WebDataset
shards a sample is a group of tar members sharing a key (`<key>.tabular.arr`, `<key>.meta.json`, ...); in the Zarr
store it is an index along the leading axis of fixed-shape arrays.

Cine is stored frame by frame (schema 2): a UK Biobank subject's image and seg (P, T, H, W) are T members each,
`<key>.image.t000.arr` ... `<key>.image.t049.arr` holding (P, H, W), and the Zarr chunks hold one frame of all
planes, so a loader that keeps 5 of 50 frames reads and decodes those 5 (`frame_members`, `read_frames`). Shards
of schema 1 (one `<key>.image.arr` with every frame) are still read. Both are produced from the dataclasses below and
read back into them, so a reader gets exactly what preprocessing produced.

Arrays in shards are Blosc/Zstd-compressed with bit-shuffle (numcodecs) behind a tiny self-describing header,
so a shard member decodes without any side information. Light imports only (numpy, numcodecs): the training
loaders on GPU machines import this module.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from dataclasses import dataclass, field, fields

import numpy as np

from core.manifest import Manifest

SCHEMA_VERSION = 2  # 2: cine frame by frame (see above); 1: whole arrays

# --- keys in the Zarr store: fixed-width UTF-8 bytes (a stable Zarr v3 dtype, unlike strings) ----------------
KEY_BYTES = 128


def encode_key(key: str) -> np.ndarray:
    b = key.encode()
    if len(b) > KEY_BYTES:
        raise ValueError(f"key longer than {KEY_BYTES} bytes: {key!r}")
    out = np.zeros(KEY_BYTES, np.uint8)
    out[: len(b)] = np.frombuffer(b, np.uint8)
    return out


def decode_key(row: np.ndarray) -> str:
    return bytes(np.asarray(row, np.uint8)).rstrip(b"\0").decode()


# --- tabular features at load time ---------------------------------------------------------------------------
def normalise_tabular(raw: np.ndarray, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """Raw features (..., F) with NaN = missing -> (values float32, missing bool), with the manifest's training
    statistics (`manifest["tabular"]["stats"][version]`): numerical z-scored, missing -> 0 (the training mean,
    as in ViTa); categorical / binary indices kept, missing -> the training mode."""
    feats = stats["features"]
    num = np.array([f["kind"] == "numerical" for f in feats])
    mean = np.array([f["mean"] if f["kind"] == "numerical" else 0.0 for f in feats])
    std = np.array([f["std"] if f["kind"] == "numerical" else 1.0 for f in feats])
    mode = np.array([0.0 if f["kind"] == "numerical" else float(f["mode"]) for f in feats])
    raw = np.asarray(raw, np.float64)
    if raw.shape[-1] != len(feats):
        raise ValueError(f"{raw.shape[-1]} features, the statistics describe {len(feats)}")
    missing = np.isnan(raw)
    values = np.where(num, (raw - mean) / std, raw)
    values = np.where(missing, np.where(num, 0.0, mode), values)
    return values.astype(np.float32), missing


# --- array codec -----------------------------------------------------------------------------------------------
_MAGIC = b"CMRA"


def encode_array(a: np.ndarray, clevel: int = 3) -> bytes:
    """magic | u32 header length | JSON {dtype, shape} | Blosc(zstd, bit-shuffle) payload."""
    from numcodecs import Blosc

    a = np.ascontiguousarray(a)
    header = json.dumps({"dtype": a.dtype.str, "shape": list(a.shape)}).encode()
    payload = Blosc(cname="zstd", clevel=clevel, shuffle=Blosc.BITSHUFFLE).encode(a)
    return _MAGIC + struct.pack("<I", len(header)) + header + bytes(payload)


def encoded_shape(data: bytes) -> tuple[int, ...]:
    """The shape of an `encode_array` payload, from its header alone (nothing decompressed)."""
    if data[:4] != _MAGIC:
        raise ValueError("not a cmrfm array (bad magic)")
    (n,) = struct.unpack("<I", data[4:8])
    return tuple(json.loads(data[8:8 + n])["shape"])


def decode_array(data: bytes) -> np.ndarray:
    from numcodecs import Blosc

    if data[:4] != _MAGIC:
        raise ValueError("not a cmrfm array (bad magic)")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + n])
    out = np.frombuffer(Blosc().decode(data[8 + n:]), dtype=np.dtype(header["dtype"]))
    return out.reshape(header["shape"])


# --- cine frame by frame -----------------------------------------------------------------------------------------
def frame_member(name: str, t: int) -> str:
    """The member suffix of frame t of a per-frame field: 'image.t007.arr'."""
    return f"{name}.t{t:03d}.arr"


def stored_frames(suffixes, name: str = "image") -> int:
    """How many frames of `name` a sample stores (0: not stored frame by frame), from its member suffixes or a raw
    sample (whose "__members__", when a reader kept only some members, lists them all)."""
    if isinstance(suffixes, dict):
        suffixes = suffixes.get("__members__", suffixes)
    head = f"{name}.t"
    return sum(1 for s in suffixes if s.startswith(head) and s.endswith(".arr"))


def frame_of(suffix: str):
    """t of a per-frame member suffix '<name>.tNNN.arr', None for any other member."""
    parts = suffix.split(".")
    if len(parts) == 3 and parts[2] == "arr" and parts[1][:1] == "t" and parts[1][1:].isdigit():
        return int(parts[1][1:])
    return None


def frame_members(name: str, frames) -> set[str]:
    return {frame_member(name, int(t)) for t in frames}


def read_frames(sample: dict, name: str, frames=None) -> np.ndarray:
    """Frames `frames` (all when None) of the per-frame field `name` of a raw sample, as (P, len(frames), H, W):
    decodes only those members; a schema-1 sample's whole array is decoded and indexed."""
    if f"{name}.arr" in sample:
        a = decode_array(sample[f"{name}.arr"])
        return a if frames is None else a[:, np.asarray(frames, np.int64)]
    if frames is None:
        frames = range(stored_frames(sample, name))  # all of them
    missing = [frame_member(name, t) for t in frames if frame_member(name, t) not in sample]
    if missing:
        raise KeyError(f"sample {sample.get('__key__')!r} has no {', '.join(missing[:3])}")
    return np.stack([decode_array(sample[frame_member(name, t)]) for t in frames], axis=1)


# --- samples ---------------------------------------------------------------------------------------------------
class _Sample:
    """Shared WebDataset (de)serialisation: ndarray fields -> `<name>.arr` (those named in `frame_fields`: one
    `<name>.tNNN.arr` per frame of axis 1), dict fields -> `<name>.json`."""

    key: str
    frame_fields: tuple[str, ...] = ()

    def to_wds(self) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {"__key__": self.key}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray) and f.name in self.frame_fields:
                out.update({frame_member(f.name, t): encode_array(v[:, t]) for t in range(v.shape[1])})
            elif isinstance(v, np.ndarray):
                out[f"{f.name}.arr"] = encode_array(v)
            elif isinstance(v, dict):
                out[f"{f.name}.json"] = json.dumps(v, sort_keys=True).encode()
        return out

    @classmethod
    def from_wds(cls, sample: dict):
        kw = {"key": sample["__key__"]}
        for f in fields(cls):
            if f.name in cls.frame_fields and (f"{f.name}.arr" in sample or stored_frames(sample, f.name)):
                kw[f.name] = read_frames(sample, f.name)
            elif f"{f.name}.arr" in sample:
                kw[f.name] = decode_array(sample[f"{f.name}.arr"])
            elif f"{f.name}.json" in sample:
                kw[f.name] = json.loads(sample[f"{f.name}.json"])
        return cls(**kw)

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray))


@dataclass
class UKBSample(_Sample):
    """One UK Biobank subject. P = SA planes + 3 LA views, T = all stored frames (50), H = W = crop size."""

    key: str  # the eid
    image: np.ndarray  # (P, T, H, W) float16 in [0, 1]
    seg: np.ndarray  # (P, T, H, W) uint8, LABELS space
    seg_valid: np.ndarray  # (P,) bool: the plane has a segmentation (not the 3-chamber view)
    tabular: np.ndarray  # (F,) float32 raw features, NaN = missing (categoricals as indices); z-scoring and
    #                      imputation use the manifest's training statistics at load time (`normalise_tabular`)
    diseases: np.ndarray  # (len(DISEASES),) int8: 1 / 0, -1 where unknown
    phenotypes: np.ndarray  # (len(PHENOTYPES),) float32, NaN where unavailable
    meta: dict = field(default_factory=dict)  # source, spacing, crop box, chosen slices, frame interval, ...
    frame_fields = ("image", "seg")  # stored frame by frame: a loader decodes only the frames it keeps


@dataclass
class KSpaceSample(_Sample):
    """One k-space sequence, reconstructed: T frames x Z slices of S x S z-scored images."""

    key: str  # e.g. "Cine/Center002/Siemens_30T_Vida/P003/cine_sax"
    image: np.ndarray  # (T, Z, S, S) float16
    meta: dict = field(default_factory=dict)  # modality, views, center, vendor, field strength, model, texts


@dataclass
class SaxSample(_Sample):
    """One cine short-axis case of a segmentation benchmark (ACDC, M&Ms): T frames x Z slices of S x S images on a
    fixed in-plane grid, and the labels of its ED and ES frames (the other frames are images only, never scored)."""

    key: str  # "<dataset>/<case>", e.g. "acdc/patient001", "mnms/A0S9V9"
    image: np.ndarray  # (T, Z, S, S) float16 in [0, 1]
    seg: np.ndarray  # (2, Z, S, S) uint8, LABELS space: ED, ES
    meta: dict = field(default_factory=dict)  # dataset, published split, ed / es (0-based), spacing, vendor, ...


# --- the Zarr store ----------------------------------------------------------------------------------------------
class StoreReader:
    """Random access to a converted dataset (`OUT/` with manifest.json, store.zarr, meta/), by key or row.

    Reads touch only the requested rows' chunks: `ukb(key, frames=[0, 10, 20, 30, 40])` reads 5 image chunks
    of one subject (one chunk: one frame of every plane; 9 x 5 in stores written before schema 2). Only rows the manifest lists are visible.
    """

    def __init__(self, out: str | Path):
        import zarr

        self.out = Path(out)
        self.manifest = Manifest.load(self.out)
        self.group = zarr.open_group(self.out / self.manifest.store, mode="r")
        self.block_size = self.manifest.block_size
        self.rows = self.manifest.rows
        self.split = self.manifest.splits
        self._meta: dict[int, dict[int, dict]] = {}

    def keys(self, split: str | None = None) -> list[str]:
        return self.manifest.keys(split)

    def meta(self, key: str) -> dict:
        row = self.rows[key]
        block = row // self.block_size
        if block not in self._meta:
            lines = (self.out / "meta" / f"block-{block:06d}.jsonl").read_text().splitlines()
            self._meta[block] = {m["row"]: m for m in map(json.loads, lines)}
        m = dict(self._meta[block][row])
        m.pop("row"), m.pop("key")
        return m

    def ukb(self, key: str, frames=None) -> UKBSample:
        g, r = self.group, self.rows[key]
        sel = (r, slice(None), slice(None) if frames is None else list(frames))
        return UKBSample(key=key, image=g["image"].get_orthogonal_selection(sel),
                         seg=g["seg"].get_orthogonal_selection(sel), seg_valid=g["seg_valid"][r],
                         tabular=g["tabular"][r], diseases=g["diseases"][r], phenotypes=g["phenotypes"][r],
                         meta=self.meta(key))

    def _frames_by_slices(self, r: int) -> np.ndarray:
        """Row r's ragged (t, z)-ordered images as (T, Z, S, S)."""
        g = self.group
        t, z, off = int(g["frames"][r]), int(g["slices"][r]), int(g["image_offset"][r])
        return g["image"][off:off + t * z].reshape(t, z, *g["image"].shape[1:])

    def sax(self, key: str) -> SaxSample:
        r = self.rows[key]
        image = self._frames_by_slices(r)
        return SaxSample(key=key, image=image, seg=self.group["seg"][r, :, :image.shape[1]], meta=self.meta(key))

    def kspace(self, key: str) -> KSpaceSample:
        return KSpaceSample(key=key, image=self._frames_by_slices(self.rows[key]), meta=self.meta(key))
