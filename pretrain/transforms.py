"""The per-sample transforms and augmentations of both trainers: UK Biobank cine subjects (`SampleTransform`:
frame selection, flips, rotations, contrast; the fine-tuning loader uses the same pieces) and k-space sequences
(`KSpaceTransform`: slices x frames of single images for MetaCLIP-CMR and its downstream classification).

Every random choice is a pure function of (seed, key, epoch) through `Rand` (PCG64 raw output under SeedSequence,
stable across NumPy versions) seeded with a domain tag, never of order, worker or rank: a resumed run repeats the
uninterrupted one, and switching one augmentation off leaves the others unchanged.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from core.format import (KSpaceSample, decode_array, encoded_shape, frame_of, normalise_tabular, read_frames,
                         stored_frames)
from core.vocab import LA_VIEWS, plane_names
from pretrain.config import DataConfig, KSpaceSampling

# domain tags of the seeds (the loader's shard permutation and shuffle buffer have their own)
TAG_AUG = 0x5EED_0003  # per-sample augmentation and k-space slice / frame choice
TAG_FRAMES = 0x5EED_0010  # fine-tuning segmentation: the frame offset of a training sample


# --- random numbers: PCG64 raw output (stable across NumPy versions), no global state ---------------------------
class Rand:
    """A stream of uint64 from PCG64(SeedSequence(words)); `below(n)` and `uniform` built on it."""

    _BLOCK = 256

    def __init__(self, *words: int):
        self._bg = np.random.PCG64(np.random.SeedSequence([int(w) % 2**64 for w in words]))
        self._buf: list[int] = []
        self._i = 0

    def raw(self) -> int:
        if self._i == len(self._buf):
            self._buf, self._i = self._bg.random_raw(self._BLOCK).tolist(), 0
        self._i += 1
        return self._buf[self._i - 1]

    def below(self, n: int) -> int:
        """Uniform in [0, n) (multiply-shift; the bias, < n / 2**64, is immaterial)."""
        return (self.raw() * n) >> 64

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * ((self.raw() >> 11) * 2.0**-53)


def key_word(key: str) -> int:
    """A sample's key as one 64-bit seed word (its SHA-256 prefix): randomness per (seed, key, epoch)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")



# --- UK Biobank cine ----------------------------------------------------------------------------------
def select_frames(stored: int, frames: int, offset: int = 0) -> np.ndarray:
    """round(linspace(0, T - 1, frames)), shifted cyclically by `offset`."""
    if not 1 <= frames <= stored:
        raise ValueError(f"cannot select {frames} frames of {stored}")
    base = np.rint(np.linspace(0, stored - 1, frames)).astype(np.int64)
    return (base + offset) % stored


def augment_params(seed: int, key: str, epoch: int, planes: int, stored_frames: int, cfg: DataConfig) -> dict:
    """The random parameters of one sample: a pure function of (seed, key, epoch) and the config.

    Drawn always and in a fixed order (offset, gamma, then angle and flip of each stored plane), so switching an
    augmentation off leaves the others unchanged.
    """
    rand = Rand(TAG_AUG, seed, epoch, key_word(key))
    offset = rand.below(max(1, stored_frames // cfg.frames))
    gamma = rand.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast)
    angles, flips = [], []
    for _ in range(planes):
        angles.append(rand.uniform(-cfg.rotation_deg, cfg.rotation_deg))
        flips.append(rand.below(2) == 1)
    return {"offset": offset if cfg.temporal_offset else 0,
            "gamma": gamma if cfg.contrast > 0 else 1.0,
            "angles": angles if cfg.rotation_deg > 0 else [0.0] * planes,
            "flips": flips if cfg.flip else [False] * planes}


def augment_image(image: torch.Tensor, angles, flips, gamma=1.0, seg: Optional[torch.Tensor] = None,
                  clamp: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """image (N, T, H, W) float in [0, 1] (a sample's planes, or a batch's planes flattened): flip plane n
    horizontally if flips[n], rotate it by angles[n] degrees (bilinear, zero padding; seg nearest), then
    x ** gamma (one number, or one per plane). Parameters are lists or tensors; the work runs on the image's
    device. Returns (image in [0, 1], seg). `clamp=False` (and gamma 1) for images not in [0, 1], e.g. z-scored
    ones."""
    N, T, H, W = image.shape
    dev = image.device
    flips = torch.as_tensor(flips, dtype=torch.bool, device=dev)
    if flips.any():
        image = torch.where(flips[:, None, None, None], image.flip(-1), image)
        if seg is not None:
            seg = torch.where(flips[:, None, None, None], seg.flip(-1), seg)
    angles = torch.as_tensor(angles, dtype=torch.float64).to(dev)
    if (angles != 0).any():
        rad = (angles * (math.pi / 180.0)).float()  # math.radians, in double, then float32
        c, s = torch.cos(rad), torch.sin(rad)
        z = torch.zeros_like(c)
        # rotation in pixel units, written in normalised coordinates (corrects for H != W)
        theta = torch.stack([torch.stack([c, -s * H / W, z], -1), torch.stack([s * W / H, c, z], -1)], 1)
        grid = F.affine_grid(theta, [N, T, H, W], align_corners=False)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if seg is not None:
            seg = F.grid_sample(seg.float(), grid, mode="nearest", padding_mode="zeros",
                                align_corners=False).to(seg.dtype)
    if clamp:
        image = image.clamp(0.0, 1.0)
    if isinstance(gamma, (int, float)):
        image = image.pow(gamma) if gamma != 1.0 else image
    else:
        gamma = torch.as_tensor(gamma, dtype=torch.float32).to(dev)
        image = image.pow(gamma.reshape(-1, 1, 1, 1) if gamma.ndim else gamma)
    return image, seg


def augment_batch(batch: dict, device: torch.device) -> torch.Tensor:
    """The batch's images (B, P, T, H, W) on `device`, augmented there when the loader left it to the batch
    (`data.augment_on: batch`: the samples carry their stored float16 frames and aug_angles / aug_flips (B, P),
    aug_gamma (B,)); the same parameters as the per-sample path, applied to all B * P planes in one call."""
    image = batch["image"].to(device, non_blocking=True)
    if "aug_angles" not in batch:
        return image
    B, P = image.shape[:2]
    gamma = batch["aug_gamma"].to(device).float()[:, None].expand(B, P).reshape(-1)
    out, _ = augment_image(image.float().flatten(0, 1), batch["aug_angles"].reshape(-1),
                           batch["aug_flips"].reshape(-1), gamma)
    return out.reshape(image.shape)


class SampleTransform:
    """raw WebDataset sample + epoch -> the training sample dict (see the module docstring). Picklable.

    `members` tells the shard reader which members of a sample to read at all: the frames this (key, epoch)
    selects, the segmentation only when asked for; the others are seeked over unread."""

    def __init__(self, cfg: DataConfig, seed: int, stats: Optional[dict] = None,
                 planes: Optional[Sequence[Union[int, str]]] = None, frames: Optional[int] = None):
        self.cfg, self.seed, self.stats = cfg, int(seed), stats
        self.planes = None if planes is None else list(planes)
        self.frames = int(frames if frames is not None else cfg.frames)
        self._cfg = cfg if cfg.frames == self.frames else replace(cfg, frames=self.frames)

    def _plane_index(self, P: int) -> Optional[list[int]]:
        if self.planes is None:
            return None
        names = plane_names(P - len(LA_VIEWS)) if P > len(LA_VIEWS) else ()
        out = []
        for p in self.planes:
            if isinstance(p, str):
                if p not in names:
                    raise ValueError(f"no plane {p!r} in {names}")
                out.append(names.index(p))
            else:
                if not -P <= int(p) < P:
                    raise ValueError(f"plane {p} out of range for {P} planes")
                out.append(int(p) % P)
        return out

    def _frames(self, key: str, epoch: int, stored: int) -> np.ndarray:
        # the offset is the first draw of augment_params, whatever the number of planes
        return select_frames(stored, self.frames, augment_params(self.seed, key, epoch, 0, stored, self._cfg)["offset"])

    def members(self, key: str, epoch: int, suffixes: Sequence[str]) -> set[str]:
        """The member suffixes of sample `key` to read in `epoch`, of those it has: the selected frames, and the
        segmentation (its frames, seg_valid) only when asked for."""
        T = stored_frames(suffixes)
        idx = set(self._frames(key, epoch, T).tolist()) if T else set()
        out = set()
        for s in suffixes:
            if s.startswith("seg") and not self.cfg.seg:
                continue
            t = frame_of(s)
            if t is None or t in idx:
                out.add(s)
        return out

    def __call__(self, raw: dict, epoch: int) -> dict:
        key = raw["__key__"]
        T = stored_frames(raw) or encoded_shape(raw["image.arr"])[1]  # schema 1: one member with every frame
        idx = self._frames(key, epoch, T)
        image = read_frames(raw, "image", idx)
        P = image.shape[0]
        prm = augment_params(self.seed, key, epoch, P, T, self._cfg)
        sel = self._plane_index(P)
        pidx = list(range(P)) if sel is None else sel
        # augmentation on the batch: the stored float16 travels (half the bytes), the device converts it
        dtype = image.dtype if self.cfg.augment_on == "batch" else np.float32
        image = torch.from_numpy(np.ascontiguousarray(image[pidx], dtype=dtype))
        seg = None
        if self.cfg.seg:
            seg = torch.from_numpy(np.ascontiguousarray(read_frames(raw, "seg", idx)[pidx], dtype=np.uint8))
        angles, flips = [prm["angles"][p] for p in pidx], [prm["flips"][p] for p in pidx]
        out = {"key": key, "epoch": int(epoch)}
        if self.cfg.augment_on == "batch":  # the parameters travel with the sample; `augment_batch` applies them
            out.update(aug_angles=torch.tensor(angles, dtype=torch.float64),
                       aug_flips=torch.tensor(flips, dtype=torch.bool),
                       aug_gamma=torch.tensor(prm["gamma"], dtype=torch.float32))
        else:
            image, seg = augment_image(image, angles, flips, prm["gamma"], seg)
        tabular = np.asarray(decode_array(raw["tabular.arr"]), np.float32)
        out.update(image=image.contiguous(), tabular=torch.from_numpy(tabular.copy()),
                   diseases=torch.from_numpy(np.asarray(decode_array(raw["diseases.arr"]), np.int8).copy()),
                   phenotypes=torch.from_numpy(np.asarray(decode_array(raw["phenotypes.arr"]), np.float32).copy()))
        if self.stats is not None:
            values, missing = normalise_tabular(tabular, self.stats)
            out["tabular_values"], out["tabular_missing"] = torch.from_numpy(values), torch.from_numpy(missing)
        if seg is not None:
            out["seg"] = seg.contiguous()
            out["seg_valid"] = torch.from_numpy(np.asarray(decode_array(raw["seg_valid.arr"]), bool)[pidx].copy())
        return out


# --- k-space sequences ----------------------------------------------------------------------------------------
def choose(rand: Rand, n: int, k: int) -> list[int]:
    """min(k, n) distinct indices of range(n), uniformly, sorted (partial Fisher-Yates on `rand`)."""
    pool = list(range(n))
    for i in range(min(k, n)):
        j = i + rand.below(n - i)
        pool[i], pool[j] = pool[j], pool[i]
    return sorted(pool[:min(k, n)])


def spread(n: int, k: int) -> list[int]:
    """min(k, n) evenly spaced indices of range(n) (the deterministic choice for evaluation)."""
    return sorted(set(np.rint(np.linspace(0, n - 1, min(k, n))).astype(int).tolist()))


def gather_images(image: np.ndarray, ts: Sequence[int], zs: Sequence[int], size: int) -> torch.Tensor:
    """Frames `ts` of slices `zs` of a (T, Z, S, S) sequence as (len(zs) * len(ts), size, size) float32 single
    images in (slice, frame) order, resized (bilinear, antialiased) when stored at another size."""
    x = torch.from_numpy(np.ascontiguousarray(image[np.ix_(ts, zs)].transpose(1, 0, 2, 3), np.float32))
    x = x.flatten(0, 1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x[:, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[:, 0]
    return x


def pad_images(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, S, S) images -> (n, S, S) zero-padded and the (n,) bool mask of the real ones."""
    image = torch.zeros(n, *x.shape[1:])
    image[:len(x)] = x
    valid = torch.zeros(n, dtype=torch.bool)
    valid[:len(x)] = True
    return image, valid


def sequence_images(image: np.ndarray, mc: KSpaceSampling) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of one stored (T, Z, S, S) k-space sequence an encoder sees at evaluation (`KSpaceTransform`
    with `train=False`): evenly spaced slices and frames, no augmentation; (image (N, S', S'), valid (N,))."""
    T, Z = image.shape[:2]
    return pad_images(gather_images(image, spread(T, mc.max_frames), spread(Z, mc.slices), mc.image_size),
                      mc.slices * mc.max_frames)


class KSpaceTransform:
    """raw k-space sequence sample + epoch -> a MetaCLIP-CMR training sample (paper Sec. 2.2-2.3). Picklable.

    Of a sequence's T frames x Z slices: `slices` distinct slices and up to `max_frames` distinct frames (random
    when training, evenly spaced when `train=False`), i.e. up to slices x max_frames single images, in (slice,
    frame) order, resized to `image_size` if stored otherwise, padded to a fixed N with `valid` False. One flip,
    rotation and intensity scale (`1 +- contrast`) for the whole sequence: its images stay views of the same
    acquisition. The sentence is one of the metadata templates, drawn per (seed, key, epoch) when training, the
    first template otherwise. A sequence of several views (cine LAX: 2ch/3ch/4ch) has no single view label
    (`view_valid` False: the soft labels' view term skips it).

    Output: image float32 (N, S, S) z-scored, valid (N,) bool, text, modality, view (int, -1 if none),
    view_valid (bool tensor), key, epoch.
    """

    def __init__(self, cfg: DataConfig, mc: KSpaceSampling, seed: int, train: bool = True):
        self.cfg, self.mc, self.seed, self.train = cfg, mc, int(seed), train

    def __call__(self, raw: dict, epoch: int) -> dict:
        return self.apply(KSpaceSample.from_wds(raw), epoch)

    def apply(self, s: KSpaceSample, epoch: int) -> dict:
        """The same from a decoded sample (e.g. random access through `StoreReader.kspace`)."""
        T, Z = s.image.shape[:2]
        rand = Rand(TAG_AUG, self.seed, epoch, key_word(s.key))
        zs = choose(rand, Z, self.mc.slices) if self.train else spread(Z, self.mc.slices)
        ts = choose(rand, T, self.mc.max_frames) if self.train else spread(T, self.mc.max_frames)
        texts = s.meta["texts"]
        text = texts[rand.below(len(texts))] if self.train else texts[0]
        angle = rand.uniform(-self.cfg.rotation_deg, self.cfg.rotation_deg)
        flip = rand.below(2) == 1
        scale = rand.uniform(1.0 - self.cfg.contrast, 1.0 + self.cfg.contrast)
        x = gather_images(s.image, ts, zs, self.mc.image_size)
        if self.train:
            x, _ = augment_image(x[None], [angle if self.cfg.rotation_deg > 0 else 0.0],
                                 [flip and self.cfg.flip], clamp=False)
            x = x[0] * (scale if self.cfg.contrast > 0 else 1.0)
        image, valid = pad_images(x, self.mc.slices * self.mc.max_frames)
        views = list(s.meta["view_indices"])
        single = len(set(views)) == 1
        return {"image": image, "valid": valid, "text": text, "modality": int(s.meta["modality_index"]),
                "view": int(views[0]) if single else -1, "view_valid": torch.tensor(single), "key": s.key,
                "epoch": int(epoch)}
