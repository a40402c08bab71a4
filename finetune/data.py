"""Fine-tuning data: random access to a converted dataset's Zarr store (`core.format.StoreReader`), exact
epochs over the manifest's splits (train / val / test by a hash of the key, fixed at conversion).

UK Biobank subjects (tasks phenotypes, diseases, segmentation): the image (P, frames, H, W) in [0, 1] at the
encoder's frames (evenly spaced of the stored T; for segmentation in training a random offset per (seed, key,
epoch) so that every stored frame is learned; in evaluation the offset is chosen by the caller, so that all T
frames are scored), flips and rotations per plane in training as in pretraining (`pretrain.data`), and the
targets: phenotypes / tabular features (raw units, NaN missing), diseases (-1 unknown), seg + seg_valid.
k-space sequences (task modality_view): `pretrain.data.KSpaceTransform` on `StoreReader.kspace`.

Everything random is a function of (seed, key, epoch); the store is opened lazily in each process (DataLoader
workers do not share a Zarr handle).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core.config import ConfigError
from core.format import StoreReader
from core.manifest import Manifest
from core.vocab import DISEASES, PHENOTYPES
from finetune.tasks import get_task
from pretrain.config import DataConfig, KSpaceSampling, ViTConfig
from pretrain.data import collate
from pretrain.transforms import (TAG_FRAMES, KSpaceTransform, Rand, augment_image, augment_params, key_word,
                                 select_frames)

AUGMENT = DataConfig(rotation_deg=10.0, flip=True, contrast=0.1)  # ViTa Sec. 4.1, as in pretraining


def preflight(dataset: str | Path, task: str, encoders: Sequence[Optional[str | Path]] = (),
              setting: str = "data.dataset") -> Manifest:
    """Before any model is built: the dataset is a converted one of the kind the task needs, and every encoder
    path (an export or a pretraining run directory) exists; a ConfigError line each. Returns the manifest."""
    manifest = Manifest.load(dataset, (get_task(task).dataset,), setting)
    for enc in encoders:
        if enc is not None and not Path(enc).exists():
            raise ConfigError(f"encoder: {enc} does not exist (an encoder export or a pretraining run directory)")
    return manifest


def target_names(manifest: Manifest) -> list[str]:
    """Every regressable name: the PHENOTYPES, then the tabular features of the manifest."""
    return list(PHENOTYPES) + [f["name"] for f in manifest.tabular_features]


def nested_subset(keys: Sequence[str], fraction: float) -> list[str]:
    """The first ceil(fraction x N) of `keys` ranked by a hash of the key, in their original order: subsets of
    one split are nested (10 % inside 25 % inside 100 %) and independent of the order the keys come in."""
    keys = list(keys)
    if fraction >= 1.0:
        return keys
    rank = sorted(keys, key=lambda k: hashlib.sha256(f"cmrfm-label-fraction:{k}".encode()).digest())
    keep = set(rank[:max(1, math.ceil(fraction * len(keys)))])
    return [k for k in keys if k in keep]


class SubjectDataset(Dataset):
    """One split of a converted dataset as training / evaluation samples for `task`."""

    def __init__(self, dataset_dir: str | Path, split: str, task: str, vit: ViTConfig, *, train: bool, seed: int,
                 targets: Sequence[str] = (), diseases: Sequence[str] = DISEASES,
                 kspace: Optional[KSpaceSampling] = None, frame_offset: int = 0, augment: DataConfig = AUGMENT,
                 cache: bool = False, fraction: float = 1.0):
        kind = get_task(task)
        self.dir, self.split, self.task, self.vit = Path(dataset_dir), split, kind.name, vit
        # what the task's samples hold: k-space sequences, or cine subjects (+ segmentations for a dense task)
        self.sequences, self.dense, self.sax = kind.dataset == "kspace", kind.dense, kind.dataset == "sax"
        self.train, self.seed, self.frame_offset = train, int(seed), frame_offset
        self.augment = augment if train else replace(augment, rotation_deg=0.0, flip=False, contrast=0.0)
        self.epoch = 0
        self._cache: Optional[dict] = {} if cache else None  # decoded arrays per (key, frames), per process
        self._reader: Optional[StoreReader] = None
        self._pid = None
        reader = self.reader
        self.keys = nested_subset(reader.keys(split), fraction)
        self.manifest = reader.manifest
        names = target_names(self.manifest)
        missing = [t for t in targets if t not in names]
        if missing:
            raise ValueError(f"{self.dir}: unknown targets {missing}; known: {names}")
        self.target_index = [names.index(t) for t in targets]
        self.disease_index = [DISEASES.index(d) for d in diseases]
        self.kspace = None
        if self.sequences:
            self.kspace = KSpaceTransform(self.augment, kspace or KSpaceSampling(), seed, train=train)
        elif not self.sax:  # labels read once: a sample then costs one image (+ seg) read
            self._targets_tab, self._diseases_tab = self.targets_table(), self.diseases_table()
            self._seg_valid = self._rows("seg_valid").astype(bool) if self.keys else np.zeros((0, 0), bool)

    @property
    def reader(self) -> StoreReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader, self._pid = StoreReader(self.dir), os.getpid()
        return self._reader

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.keys)

    def _rows(self, name: str) -> np.ndarray:
        """One Zarr array's rows of this split, in key order (one read, no images)."""
        rows = [self.reader.rows[k] for k in self.keys]
        return np.asarray(self.reader.group[name].get_orthogonal_selection((rows,)))

    def targets_table(self) -> np.ndarray:
        """(N, targets) raw regression targets of the split (NaN missing)."""
        if not self.keys:
            return np.zeros((0, len(self.target_index)), np.float32)
        values = np.concatenate([self._rows("phenotypes"), self._rows("tabular")], axis=1)
        return values[:, self.target_index].astype(np.float32)

    def phenotypes_table(self) -> np.ndarray:
        """(N, len(PHENOTYPES)) the stored cardiac phenotypes of the split (NaN where not measured)."""
        if not self.keys:
            return np.zeros((0, len(PHENOTYPES)), np.float32)
        return self._rows("phenotypes").astype(np.float32)

    def diseases_table(self) -> np.ndarray:
        """(N, diseases) labels of the split: 1 / 0, -1 unknown."""
        if not self.keys:
            return np.zeros((0, len(self.disease_index)), np.int64)
        return self._rows("diseases")[:, self.disease_index].astype(np.int64)

    def seg_valid_table(self) -> np.ndarray:
        """(N, planes) bool: which planes of each subject of the split have a ground-truth segmentation."""
        return self._seg_valid

    def __getitem__(self, i: int) -> dict:
        key = self.keys[i]
        if self.kspace is not None:
            sample = None if self._cache is None else self._cache.get(key)
            if sample is None:
                sample = self.reader.kspace(key)
                if self._cache is not None:
                    self._cache[key] = sample
            out = self.kspace.apply(sample, self.epoch)
            return {k: out[k] for k in ("image", "valid", "modality", "view", "view_valid", "key")}
        if self.sax:
            return self._sax_case(key)
        g = self.reader.group
        P, T = g["image"].shape[1:3]
        offset = self.frame_offset
        if self.train and self.dense:  # every stored frame is learned over the epochs
            offset = Rand(TAG_FRAMES, self.seed, self.epoch, key_word(key)).below(max(1, T // self.vit.frames))
        frames = select_frames(T, self.vit.frames, offset)
        sel = (self.reader.rows[key], slice(None), frames.tolist())
        prm = augment_params(self.seed, key, self.epoch, P, T, self.augment)
        arrays = None if self._cache is None else self._cache.get((key, offset))
        if arrays is None:
            arrays = (np.asarray(g["image"].get_orthogonal_selection(sel), np.float32),
                      np.asarray(g["seg"].get_orthogonal_selection(sel), np.uint8) if self.dense else None)
            if self._cache is not None:
                self._cache[(key, offset)] = arrays
        image = torch.from_numpy(arrays[0].copy())
        seg = None if arrays[1] is None else torch.from_numpy(arrays[1].copy())
        image, seg = augment_image(image, prm["angles"], prm["flips"], prm["gamma"], seg)
        out = {"image": image.contiguous(), "key": key, "frames": torch.from_numpy(frames),
               "targets": torch.from_numpy(self._targets_tab[i]), "diseases": torch.from_numpy(self._diseases_tab[i])}
        if seg is not None:
            out["seg"] = seg.long().contiguous()
            out["seg_valid"] = torch.from_numpy(self._seg_valid[i].copy())
        return out

    def _sax_case(self, key: str) -> dict:
        """A short-axis segmentation case: its ED and ES stacks (2, Zmax, S, S) padded to the store's slice capacity,
        their labels, and which slices are real; augmented per phase in training."""
        sample = None if self._cache is None else self._cache.get(key)
        if sample is None:
            sample = self.reader.sax(key)
            if self._cache is not None:
                self._cache[key] = sample
        Z, S = sample.seg.shape[1], sample.seg.shape[2]
        zmax = self.reader.group["seg"].shape[2]
        image = np.zeros((2, zmax, S, S), np.float32)
        image[:, :Z] = sample.image[[sample.meta["ed"], sample.meta["es"]]]
        seg = np.zeros((2, zmax, S, S), np.uint8)
        seg[:, :Z] = sample.seg
        valid = np.zeros(zmax, bool)
        valid[:Z] = True
        prm = augment_params(self.seed, key, self.epoch, 2, zmax, self.augment)
        img, sg = augment_image(torch.from_numpy(image), prm["angles"], prm["flips"], prm["gamma"],
                                torch.from_numpy(seg))
        return {"image": img.contiguous(), "seg": sg.long().contiguous(), "slice_valid": torch.from_numpy(valid),
                "key": key}


def loader(ds: SubjectDataset, batch_size: int, workers: int, shuffle: bool, seed: int, epoch: int = 0
           ) -> DataLoader:
    """Exact epochs: a fresh permutation per (seed, epoch) when shuffling; the last partial batch is kept, except
    in training (shuffled) when it would hold a single sample: BatchNorm cannot normalise over one (a different
    sample is left out each epoch)."""
    ds.set_epoch(epoch)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    single = shuffle and batch_size > 1 and len(ds) > 1 and len(ds) % batch_size == 1
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=workers,
                      collate_fn=collate, persistent_workers=False, drop_last=single)
