"""The manifest: the contract between a conversion and every reader of its dataset, loaded and checked once.

`manifest.json` at a converted dataset's root is written by `data_prep.engine` (atomically, after the
shards and the Zarr rows it lists). Readers take a `Manifest`: which kind of dataset it is, its Zarr store, its
blocks (keys, rows, split), its shards, the conversion settings, and for UK Biobank the tabular features and
the stored geometry. Anything else in the JSON stays reachable through `raw`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core.config import ConfigError

DATASET_KINDS = ("ukb", "kspace", "sax")  # manifest["dataset"]: what `python -m data_prep ukb|kspace|sax` wrote

#: The k-space conversion settings that decide a stored sequence (`data_prep.kspace.job.KSpaceJobConfig`).
KSPACE_PREPROCESS = ("size", "keep_aspect", "readout_oversampling")


@dataclass(frozen=True)
class Manifest:
    root: Path
    dataset: str  # "ukb" | "kspace"
    store: str  # the Zarr store, relative to root
    block_size: int
    blocks: tuple[dict, ...]  # {"id", "split", "keys", "rows"}
    shards: tuple[dict, ...]  # {"path", "split", "samples", "sha256", "bytes", "block"}
    config: dict  # the conversion job's resolved config
    tabular: dict = field(default_factory=dict)  # UK Biobank: {"features", "diseases", "stats", ...}
    geometry: dict = field(default_factory=dict)  # UK Biobank: planes, frames, crop, spacing
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, dataset: str | Path | None, kinds: tuple[str, ...] = DATASET_KINDS, setting: str = "dataset"
             ) -> "Manifest":
        """A converted dataset's manifest, checked: one ConfigError line naming the setting, the path and the
        reason (not set, missing folder, no or unreadable manifest, another kind of dataset than `kinds`)."""
        hint = "convert one first: python -m data_prep ukb|kspace|sax --out DIR"
        if dataset is None:
            raise ConfigError(f"{setting} is not set: name a converted dataset ({hint})")
        root = Path(dataset)
        path = root / "manifest.json"
        if not root.is_dir():
            raise ConfigError(f"{setting}: {root} does not exist ({hint})")
        if not path.is_file():
            raise ConfigError(f"{setting}: {path}: no manifest, so {root} is not a converted dataset ({hint})")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{setting}: {path}: unreadable manifest ({type(e).__name__}: {e})") from e
        if not isinstance(raw, dict) or "dataset" not in raw or "shards" not in raw:
            raise ConfigError(f"{setting}: {path}: not a cmrfm dataset manifest (no 'dataset' and 'shards')")
        if raw["dataset"] not in kinds:
            raise ConfigError(f"{setting}: {root} is a {raw['dataset']!r} dataset; this needs "
                              + " or ".join(repr(k) for k in kinds))
        return cls.from_dict(root, raw)

    @classmethod
    def from_dict(cls, root: str | Path, raw: dict) -> "Manifest":
        return cls(root=Path(root), dataset=raw["dataset"], store=raw.get("store", "store.zarr"),
                   block_size=int(raw.get("block_size", 0)), blocks=tuple(raw.get("blocks", ())),
                   shards=tuple(raw.get("shards", ())), config=raw.get("config") or {},
                   tabular=raw.get("tabular") or {}, geometry=raw.get("geometry") or {}, raw=raw)

    @property
    def rows(self) -> dict[str, int]:
        """key -> row in the Zarr store, for every sample the manifest lists."""
        return {k: r for b in self.blocks for k, r in zip(b["keys"], b["rows"])}

    @property
    def splits(self) -> dict[str, str]:
        """key -> split."""
        return {k: b["split"] for b in self.blocks for k in b["keys"]}

    def keys(self, split: Optional[str] = None) -> list[str]:
        return [k for b in self.blocks if split is None or b["split"] == split for k in b["keys"]]

    @property
    def tabular_features(self) -> list[dict]:
        return list(self.tabular.get("features", []))

    def tabular_stats(self) -> Optional[dict]:
        """The current training statistics of the tabular features (z-scoring, imputation), or None."""
        version = self.tabular.get("current_stats")
        return (self.tabular.get("stats") or {}).get(version) if version is not None else None

    def training_data(self) -> dict:
        """{"dataset": kind, "preprocess": the conversion settings that decide a stored sample}: what an encoder
        export records so that `finetune.api` can preprocess a raw subject exactly as the conversion did."""
        if self.dataset == "kspace":  # the k-space job's image settings sit at its config's top level
            return {"dataset": "kspace", "preprocess": {k: self.config[k] for k in KSPACE_PREPROCESS
                                                         if k in self.config}}
        return {"dataset": self.dataset, "preprocess": self.config.get("preprocess")}


def read_training_data(dataset: str | Path) -> Optional[dict]:
    """`Manifest.training_data` of a dataset folder, or None when its manifest is not readable (a moved dataset):
    an export then says nothing rather than something wrong."""
    try:
        return Manifest.load(dataset).training_data()
    except (ConfigError, KeyError, TypeError):
        return None
