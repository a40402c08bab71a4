"""The on-disk sample format: the one contract between the data_prep writers and every reader.

A UK Biobank subject and a k-space sequence are each one sample. In WebDataset shards a sample is a group of
tar members sharing a key (`<key>.image.arr`, `<key>.meta.json`, ...); in the Zarr store it is an index
along the leading axis of fixed-shape arrays. Both are produced from the dataclasses below and read back into
them, so a reader gets exactly what preprocessing produced.

Arrays in shards are Blosc/Zstd-compressed with bit-shuffle (numcodecs) behind a tiny self-describing header,
so a shard member decodes without any side information. Light imports only (numpy, numcodecs): the training
loaders on GPU machines import this module.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from dataclasses import dataclass, field, fields

import numpy as np

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")

# --- UK Biobank cine -------------------------------------------------------------------------------------------
LA_VIEWS = ("la_2ch", "la_3ch", "la_4ch")
# one label space over all planes: the SA labels, then the LA labels remapped after them
LABELS = ("background", "LV", "MYO", "RV", "LA", "RA")
SOURCE_LABEL_MAPS = {  # ukbb_cardiac label -> unified label, per plane kind
    "sa": {1: 1, 2: 2, 3: 3},
    "la_2ch": {1: 4},
    "la_4ch": {1: 4, 2: 5},
}
DISEASES = ("cad", "infarct", "hypertension", "high_blood_pressure", "diabetes", "stroke")
PHENOTYPES = ("LVEDV", "LVESV", "LVSV", "LVEF", "LVCO", "LVM", "RVEDV", "RVESV", "RVSV", "RVEF",
              "LAVmax", "LAVmin", "LASV", "LAEF", "RAVmax", "RAVmin", "RASV", "RAEF")


# --- k-space sequences: classification labels (index = the integer label stored; append only) ---------------------
MODALITIES: tuple[str, ...] = ("cine", "t1map", "t2map", "lge", "blackblood")
VIEWS: tuple[str, ...] = ("sax", "2ch", "3ch", "4ch", "lvot")


def plane_names(sa_planes: int) -> tuple[str, ...]:
    """Plane order of the image stack: SA slices base to apex, then the long-axis views."""
    return tuple(f"sa_{i}" for i in range(sa_planes)) + LA_VIEWS


def split_of(key: str, val_fraction: float = 0.1, test_fraction: float = 0.1, salt: str = "cmrfm-split-v1") -> str:
    """Stable split from a hash of the key alone: adding subjects never moves an existing one."""
    u = int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


STRATIFIED_SALT = "cmrfm-strata-v1"


def stratified_group_splits(units: dict[str, dict[str, int]], counts: dict[str, dict[str, int]] | None = None,
                            fixed: dict[str, str] | None = None, val_fraction: float = 0.1,
                            test_fraction: float = 0.1, salt: str = STRATIFIED_SALT) -> dict[str, str]:
    """A split per *group* (e.g. a patient: all its scans in one split, no leakage) such that within every
    *stratum* (e.g. (modality, view)) the split counts follow the fractions as closely as the groups allow.

    units:  group -> {stratum: number of new items of that group}
    counts: stratum -> {split: items already in that split} (the dataset so far; not modified)
    fixed:  group -> split for groups that already have one: their new items follow it, whatever the balance
    Returns group -> split for every group of `units`.

    New groups are placed one at a time in the order of a salted hash of the group (a function of the group
    alone, not of the input order), each into the split with a positive fraction that minimises the squared
    deviation of its strata's counts from `fraction x stratum total`; ties go to `split_of(group)`, then train,
    val, test. Placing never moves what is placed: a larger archive converted later keeps every earlier group
    where it was (the conversion engine passes the manifest's groups as `fixed` and its counts as `counts`).
    """
    frac = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    c: dict[str, dict[str, int]] = {s: {p: int((counts or {}).get(s, {}).get(p, 0)) for p in SPLITS}
                                    for s in set(counts or {}) | {s for u in units.values() for s in u}}
    out: dict[str, str] = {}

    def add(group: str, split: str) -> None:
        out[group] = split
        for s, n in units[group].items():
            c[s][split] += int(n)

    for g in sorted(units):
        if fixed and g in fixed:
            add(g, fixed[g])
    order = sorted((g for g in units if g not in out),
                   key=lambda g: (hashlib.sha256(f"{salt}:{g}".encode()).digest(), g))
    for g in order:
        first = split_of(g, val_fraction, test_fraction, salt)
        cands = [p for p in (first, *SPLITS) if frac[p] > 0]
        cands = list(dict.fromkeys(cands)) or ["train"]
        best, best_cost = cands[0], None
        for p in cands:
            cost = 0.0
            for s, n in units[g].items():
                total = sum(c[s].values()) + n
                cost += sum((c[s][q] + (n if q == p else 0) - frac[q] * total) ** 2 for q in SPLITS)
            if best_cost is None or cost < best_cost - 1e-9:
                best, best_cost = p, cost
        add(g, best)
    return out


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


def decode_array(data: bytes) -> np.ndarray:
    from numcodecs import Blosc

    if data[:4] != _MAGIC:
        raise ValueError("not a cmrfm array (bad magic)")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + n])
    out = np.frombuffer(Blosc().decode(data[8 + n:]), dtype=np.dtype(header["dtype"]))
    return out.reshape(header["shape"])


# --- samples ---------------------------------------------------------------------------------------------------
class _Sample:
    """Shared WebDataset (de)serialisation: ndarray fields -> `<name>.arr`, dict fields -> `<name>.json`."""

    key: str

    def to_wds(self) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {"__key__": self.key}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                out[f"{f.name}.arr"] = encode_array(v)
            elif isinstance(v, dict):
                out[f"{f.name}.json"] = json.dumps(v, sort_keys=True).encode()
        return out

    @classmethod
    def from_wds(cls, sample: dict):
        kw = {"key": sample["__key__"]}
        for f in fields(cls):
            if f"{f.name}.arr" in sample:
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


@dataclass
class KSpaceSample(_Sample):
    """One k-space sequence, reconstructed: T frames x Z slices of S x S z-scored images."""

    key: str  # e.g. "Cine/Center002/Siemens_30T_Vida/P003/cine_sax"
    image: np.ndarray  # (T, Z, S, S) float16
    meta: dict = field(default_factory=dict)  # modality, views, center, vendor, field strength, model, texts


# --- the Zarr store ----------------------------------------------------------------------------------------------
class StoreReader:
    """Random access to a converted dataset (`OUT/` with manifest.json, store.zarr, meta/), by key or row.

    Reads touch only the requested rows' chunks: `ukb(key, frames=[0, 10, 20, 30, 40])` reads 9 x 5 image
    chunks of one subject. Only rows the manifest lists are visible.
    """

    def __init__(self, out: str):
        from pathlib import Path

        import zarr

        self.out = Path(out)
        self.manifest = json.loads((self.out / "manifest.json").read_text())
        self.group = zarr.open_group(self.out / self.manifest["store"], mode="r")
        self.block_size = self.manifest["block_size"]
        self.rows = {k: r for b in self.manifest["blocks"] for k, r in zip(b["keys"], b["rows"])}
        self.split = {k: b["split"] for b in self.manifest["blocks"] for k in b["keys"]}
        self._meta: dict[int, dict[int, dict]] = {}

    def keys(self, split: str | None = None) -> list[str]:
        return [k for k in self.rows if split is None or self.split[k] == split]

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

    def kspace(self, key: str) -> KSpaceSample:
        g, r = self.group, self.rows[key]
        t, z, off = int(g["frames"][r]), int(g["slices"][r]), int(g["image_offset"][r])
        image = g["image"][off:off + t * z].reshape(t, z, *g["image"].shape[1:])
        return KSpaceSample(key=key, image=image, meta=self.meta(key))


# --- the manifest, read before anything expensive starts -------------------------------------------------------
DATASET_KINDS = ("ukb", "kspace")  # manifest["dataset"]: what `python -m data_prep ukb|kspace` wrote


def read_dataset_manifest(dataset: str | Path, kinds: tuple[str, ...] = DATASET_KINDS,
                          setting: str = "dataset") -> dict:
    """A converted dataset's manifest, checked: one ConfigError line naming the setting, the path and the reason
    (missing folder, no or unreadable manifest, another kind of dataset than `kinds`)."""
    from data_prep.config import ConfigError

    root = Path(dataset)
    path = root / "manifest.json"
    hint = "convert one first: python -m data_prep ukb|kspace --out DIR"
    if not root.is_dir():
        raise ConfigError(f"{setting}: {root} does not exist ({hint})")
    if not path.is_file():
        raise ConfigError(f"{setting}: {path}: no manifest, so {root} is not a converted dataset ({hint})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{setting}: {path}: unreadable manifest ({type(e).__name__}: {e})") from e
    if not isinstance(manifest, dict) or "dataset" not in manifest or "shards" not in manifest:
        raise ConfigError(f"{setting}: {path}: not a cmrfm dataset manifest (no 'dataset' and 'shards')")
    if manifest["dataset"] not in kinds:
        raise ConfigError(f"{setting}: {root} is a {manifest['dataset']!r} dataset; this needs "
                          + " or ".join(repr(k) for k in kinds))
    return manifest

