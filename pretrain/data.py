"""The training loader: WebDataset shards of a converted dataset (UK Biobank for ViTa Stage I/II, k-space
sequences for MetaCLIP-CMR), streamed deterministically and resumed exactly.

Input
    A converted dataset directory (the one holding manifest.json, written by `data_prep.engine`) and a split
    (default "train"). The shard list is `manifest["shards"]` of that split, sorted by block id, each with its
    sample count; nothing else is listed or globbed, so shards of an unfinished conversion are never read.

Slots
    With world size W and K DataLoader workers per rank there are R = W * max(K, 1) slots; slot s = rank * K +
    worker (K = 0, loading in the training process, is one slot per rank, the same stream as K = 1).

The per-slot stream (infinite, re-permuted every epoch)
    for epoch e = 0, 1, 2, ...:
      perm = the shard list permuted by a RNG seeded from (seed, e);
      slot s reads shards perm[s], perm[s + R], perm[s + 2R], ... in that order;
      fallback when there are fewer shards than slots (n < R): slot s reads the single shard perm[s % n], so every
      slot has data; each shard is then read by floor(R / n) or ceil(R / n) slots per epoch, i.e. each sample is
      seen about R / n times per global pass over the data, every copy with the same augmentation (it is a
      function of (seed, key, epoch)) -- a mode for tiny/demo datasets only, with a warning;
      the samples pass through a shuffle buffer of `shuffle_buffer` samples seeded from (seed, e, s): it fills
      to its size, then each incoming sample replaces a uniformly chosen buffered one, which is emitted; at the
      end of the slot's epoch it drains in random order. The buffer is per (slot, epoch), so its state after
      k samples is a pure function of k (it holds raw, still-compressed samples: memory per rank is about
      shuffle_buffer * max(K, 1) * the shard bytes per sample).
    A slot's epoch ends when it has read its shards; when R does not divide the shard count (or shards differ in
    size) slots have different epoch lengths and drift apart in epochs. A global epoch is an exact pass over the
    data (every key exactly once over all slots) only when shards divide evenly over slots.
    All random numbers come from NumPy's PCG64 raw output under SeedSequence (streams NumPy guarantees stable
    across versions), never from global random state.

A nested subset of the split (`DataConfig.subjects` = N, for scaling studies)
    The N keys of the split's shards with the smallest salted hash of the key (`nested_subset`): the 50-key
    subset lies inside the 100-key one, and a key's rank depends on nothing but the keys, so converting more
    subjects into the dataset never reorders the existing ones (a new key enters a subset only by outranking one).
    Each shard then counts only its kept samples (shards with none are left out), the others are skipped unread
    (tar headers only: a local shard is seeked over), and everything above -- permutations, slots, the shuffle
    buffer on ordinals, exact resume -- runs on those counts unchanged. `samples_per_epoch` is the subset's size.
    The loader state also carries the subset's digest (a hash of its sorted keys): resuming under another subset
    (another N, or a grown dataset whose N smallest hashes changed) is an approximate resume by count.

Per-sample transform: a pure function of (seed, key, epoch), never of order, slot or worker
    select `frames` of the stored T at round(linspace(0, T - 1, frames)) -- the shard reader reads and decodes
    only those frames' members (`SampleTransform.members`; cine is stored frame by frame, `core.format`)
    (ViTa: 5 of 50), optionally shifted cyclically by a random offset below one frame spacing (cine is one
    cardiac cycle; off by default); augment (ViTa Sec. 4.1: rotation, flipping, contrast): horizontal flip per
    plane with p = 0.5, rotation by one angle per plane in +-rotation_deg (the same for all frames of the
    plane; planes are different views), bilinear with zero padding (`grid_sample`), and contrast as a gamma in
    [1 - c, 1 + c] per sample; values stay in [0, 1]. All random parameters are always drawn (for every stored
    plane, in a fixed order), so switching one augmentation off does not change the others.
    Output per sample: image float32 (P, frames, H, W) in [0, 1]; key; epoch (of the slot stream that read it);
    tabular (raw, NaN = missing); tabular_values / tabular_missing (`normalise_tabular` with the manifest's
    current training statistics, when the manifest has them); diseases (int8, -1 unknown); phenotypes (NaN
    unavailable); seg (uint8, same frames / flips / rotations, nearest) and seg_valid when `cfg.seg`.

State and resume
    A rank's DataLoader over the IterableDataset interleaves its K workers strictly round-robin, one sample each
    (batch_size=None in the DataLoader; batches are stacked in the training process), which PyTorch guarantees
    while every worker yields forever. So the rank's state is one number, consumed = n samples handed out in
    batches; worker k has then yielded n // K + (k < n % K) samples, derived, never stored. A new iterator
    rotates the worker roles so that its worker 0 plays slot n % K, whose sample is the next in the
    interleaving. All ranks step in lockstep with one batch size, so n is the same on every rank.

    state_dict() = {"consumed": n, "world_size": W, "workers": K, "seed": seed, "samples_per_epoch": N}
                   (+ "subset": the subset's digest when `subjects` restricts the split)

    load_state_dict, same W, same max(K, 1), same dataset (samples_per_epoch): exact. Each slot finds its
    (epoch, offset) from its position, skips WHOLE shards by their manifest sample counts without opening them,
    replays the shuffle buffer on sample ordinals to learn which ordinals are buffered and how many were read,
    reads from the first shard holding a buffered ordinal, keeping the buffered samples raw (nothing decoded)
    and discarding the rest, and continues. The run then sees exactly the samples (and augmentations) it would
    have seen without the interruption, none twice, none skipped -- whatever the batch size after resuming.
    Cost: at most the slot's current epoch is re-read (less when the buffer is small against it).

    load_state_dict, different W or K (or a grown dataset): approximate, by global sample count. The global
    count C = state["consumed_global"] when given, else consumed * W; every rank continues at consumed =
    C // W', so each new slot starts ~C / R' samples into its own stream -- the same epoch and about the same
    offset in it. Around the boundary up to about (R + R') shards' worth of samples (plus the buffered ones)
    of the current epoch are seen twice or not at all; later epochs are exact passes again. Flagged:
    load_state_dict returns False, `resume_exact` is False and a warning is logged. A grown dataset keeps the
    slot positions by count (its permutations differ, so the current epoch's coverage is approximate).
    A different seed is refused (ValueError).

Public API
    build_loader(dataset_dir, cfg, *, rank, world_size, batch_size, seed, split="train", planes=None, frames=None)
        -> ResumableLoader (iterable of batches: dict of stacked tensors, "key" a list of str)
    samples_per_epoch(dataset_dir, split="train", subjects=None) -> int
    nested_subset(keys, n), subset_shards(shards, manifest.blocks, n): the subset of `DataConfig.subjects`
    plus the pieces, for tests and other loaders: list_shards, epoch_shards, locate, slot_positions,
    slot_stream, ShuffleBuffer, collate. The per-sample transforms (`SampleTransform`, `KSpaceTransform` to pass
    as `transform=`, frame selection, augmentation) are in `pretrain/transforms.py`.

Imports nothing of data_prep and no ray (`core` and `pretrain` only): this module runs on the GPU machines.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.manifest import Manifest
from pretrain.config import DataConfig
from pretrain.transforms import Rand, SampleTransform

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
STATE_KEYS = ("consumed", "world_size", "workers", "seed", "samples_per_epoch")
# domain tags of the seeds: shard permutation, shuffle buffer (per-sample augmentation: transforms.TAG_AUG)
_TAG_PERM, _TAG_BUFFER = 0x5EED_0001, 0x5EED_0002
_NOTHING = object()


# --- the manifest ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    url: str  # a local path (anything webdataset's gopen opens)
    samples: int  # samples read from it (the kept ones when `keep` is set)
    block: int
    keep: Optional[frozenset] = None  # None: every sample; else only these keys (a nested subset), in tar order


def list_shards(dataset_dir: PathLike, split: str = "train", manifest: Optional[Manifest] = None) -> list[Shard]:
    """The split's shards from the manifest, sorted by block id."""
    m = Manifest.load(dataset_dir) if manifest is None else manifest
    rows = sorted((s for s in m.shards if s["split"] == split), key=lambda s: (s["block"], s["path"]))
    return [Shard(str(Path(dataset_dir) / s["path"]), int(s["samples"]), int(s["block"])) for s in rows]


def samples_per_epoch(dataset_dir: PathLike, split: str = "train", subjects: Optional[int] = None) -> int:
    """Samples of the split in the manifest's shards (one pass over the data); of its nested subset of
    `subjects` keys when given."""
    shards = list_shards(dataset_dir, split)
    if subjects is not None:
        shards, _ = subset_shards(shards, Manifest.load(dataset_dir).blocks, subjects)
    return sum(s.samples for s in shards)


# --- nested subsets of a split (scaling studies) ----------------------------------------------------------------
SUBSET_SALT = "cmrfm-subset-v1"


def subset_rank(key: str) -> tuple[int, str]:
    """A key's place in every nested subset: its salted hash (ties, practically never, by the key)."""
    return int.from_bytes(hashlib.sha256(f"{SUBSET_SALT}:{key}".encode()).digest()[:8], "big"), key


def nested_subset(keys: Iterable[str], n: int) -> list[str]:
    """The min(n, len(keys)) keys of smallest `subset_rank`, in that order: nested in n, and stable when keys are
    added (an existing key's rank among the others never changes)."""
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    return sorted(set(keys), key=subset_rank)[:n]


def shard_keys(shard: Shard) -> list[str]:
    """The sample keys of a tar shard in order, from its headers (member data is seeked over, not read)."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    keys: list[str] = []
    with tarfile.open(shard.url, mode="r:") as tar:
        for info in tar:
            prefix, _ = base_plus_ext(info.name) if info.isreg() else (None, None)
            if prefix is not None and not prefix.startswith("__") and (not keys or keys[-1] != prefix):
                keys.append(prefix)
    return keys


def subset_shards(shards: Sequence[Shard], blocks: Sequence[dict], n: int) -> tuple[list[Shard], str]:
    """The shards restricted to the nested subset of n keys of all their samples: each with its kept keys and
    count, shards without any left out, in the same order; and the subset's digest (a hash of its sorted keys).
    A shard's keys come from the manifest's block list `blocks` (the tar headers when it has none)."""
    by_block = {int(b["id"]): list(b["keys"]) for b in blocks}
    keys = {s.block: by_block[s.block] if s.block in by_block else shard_keys(s) for s in shards}
    for s in shards:
        if len(keys[s.block]) != s.samples:
            raise ValueError(f"{s.url}: the manifest lists {len(keys[s.block])} keys and {s.samples} samples")
    chosen = nested_subset([k for s in shards for k in keys[s.block]], n)
    if len(chosen) < n:
        warnings.warn(f"data.subjects={n}, but the split has only {len(chosen)} samples: using all of them",
                      stacklevel=2)
    kept = set(chosen)
    out = []
    for s in shards:
        mine = frozenset(k for k in keys[s.block] if k in kept)
        if mine:
            out.append(replace(s, samples=len(mine), keep=mine))
    digest = hashlib.sha256("\n".join(sorted(kept)).encode()).hexdigest()[:16]
    return out, digest


# --- which shards a slot reads, and where a position lies ------------------------------------------------------
def epoch_shards(n_shards: int, slot: int, slots: int, seed: int, epoch: int) -> list[int]:
    """Indices (into the sorted shard list) that `slot` reads in `epoch`, in order."""
    if n_shards < 1:
        raise ValueError("no shards")
    perm = list(range(n_shards))
    rand = Rand(_TAG_PERM, seed, epoch)
    for i in range(n_shards - 1, 0, -1):  # Fisher-Yates
        j = rand.below(i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    if n_shards < slots:  # fallback: cycle the permutation, one shard per slot
        return [perm[slot % n_shards]]
    return perm[slot::slots]


def locate(shards: Sequence[Shard], slot: int, slots: int, seed: int, position: int) -> tuple[int, int]:
    """(epoch, offset in the slot's epoch) of the slot stream's `position`-th sample."""
    epoch = 0
    while True:
        length = sum(shards[i].samples for i in epoch_shards(len(shards), slot, slots, seed, epoch))
        if length <= 0:
            raise ValueError(f"slot {slot} has no samples in epoch {epoch}")
        if position < length:
            return epoch, position
        position -= length
        epoch += 1


def slot_positions(consumed: int, workers: int) -> list[int]:
    """Samples each of a rank's max(K, 1) worker slots has yielded when the rank consumed `consumed`."""
    k = max(workers, 1)
    return [consumed // k + (w < consumed % k) for w in range(k)]


# --- the shuffle buffer ---------------------------------------------------------------------------------------
class ShuffleBuffer:
    """Fill to `size`, then each push replaces (and returns) a uniformly chosen item; `pop` drains randomly.

    Its state after any sequence of pushes and pops is a pure function of that sequence and the seed, so it can
    be replayed on ordinals instead of samples (`items` may be rewritten in place).
    """

    def __init__(self, size: int, rand: Rand):
        self.size = max(1, int(size))
        self.items: list[Any] = []
        self.rand = rand

    def __len__(self) -> int:
        return len(self.items)

    def push(self, item):
        if len(self.items) < self.size:
            self.items.append(item)
            return _NOTHING
        j = self.rand.below(len(self.items))
        out, self.items[j] = self.items[j], item
        return out

    def pop(self):
        j = self.rand.below(len(self.items))
        self.items[j], self.items[-1] = self.items[-1], self.items[j]
        return self.items.pop()


# --- reading ---------------------------------------------------------------------------------------------------
MemberSelect = Callable[[str, Sequence[str]], set]  # (key, the sample's member suffixes) -> the suffixes to read


def _octal(field: bytes, what: str, path: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes >= 8 GiB)
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.rstrip(b"\0 ").strip() or b"0", 8)
    except ValueError:
        raise ValueError(f"{path}: not a tar file (bad {what} field {field!r})") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """'<len> key=value\n' records of a pax extended header."""
    out, i = {}, 0
    while i < len(data) and data[i:i + 1] not in (b"", b"\0"):
        n = int(data[i:data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1:i + n - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        i += n
    return out


def _tar_entries(f, path: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file of a seekable tar, reading the 512-byte headers only.

    Python's tarfile builds a TarInfo per member (about 80 us each): with one member per cine frame that was most
    of a sample's read time. This parses what the shards use: ustar / GNU / pax headers, GNU long names (L) and pax
    paths and sizes (x); global pax headers (g) are skipped. Checksums are verified."""
    pos, long_name, pax = 0, None, {}
    while True:
        f.seek(pos)
        hdr = f.read(512)
        if len(hdr) < 512 or hdr == bytes(512):
            return  # end of archive (a zero block), or a truncated file's end
        if _octal(hdr[148:156], "checksum", path) != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise ValueError(f"{path}: corrupt tar header at byte {pos}")
        size = _octal(hdr[124:136], "size", path)
        kind = hdr[156:157]
        data = pos + 512
        pos = data + -(-size // 512) * 512
        if kind in (b"L", b"x", b"g"):
            f.seek(data)
            block = f.read(size)
            if kind == b"L":
                long_name = block.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax_records(block)
            continue
        name = hdr[:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
        if hdr[257:262] == b"ustar" and hdr[345:500].strip(b"\0"):
            name = hdr[345:500].rstrip(b"\0").decode("utf-8", "surrogateescape") + "/" + name
        name = pax.get("path", long_name or name)
        size = int(pax.get("size", size))
        if "size" in pax:
            pos = data + -(-size // 512) * 512
        long_name, pax = None, {}
        if kind in (b"0", b"\0", b"7"):  # regular files
            yield name, data, size


def _read_shard(url: str, keep: Optional[frozenset] = None, select: Optional[MemberSelect] = None
                ) -> Iterator[dict]:
    """Raw samples of one tar shard ({"__key__", "image.t000.arr": bytes, ...}); nothing is decoded. `keep`: only
    the samples with these keys; `select`: of each sample only the members it names (e.g. the frames the
    transform will use; "__members__" then lists all the sample has). In a local file the rest is seeked over
    unread (tar headers only, `_tar_entries`); in a stream it is read and dropped."""
    from webdataset.tariterators import base_plus_ext, tarfile_samples

    def wanted(raw: dict) -> dict:
        if select is None:
            return raw
        members = tuple(k for k in raw if not k.startswith("__"))
        names = select(raw["__key__"], members)
        return {"__members__": members, **{k: v for k, v in raw.items() if k.startswith("__") or k in names}}

    if not Path(url).is_file():
        yield from (wanted(raw) for raw in tarfile_samples([{"url": url}]) if keep is None or raw["__key__"] in keep)
        return

    def read(f, key: str, where: dict) -> dict:
        def data(n):
            f.seek(where[n][0])
            return f.read(where[n][1])

        if select is None:
            return {"__key__": key, "__url__": url, **{n: data(n) for n in where}}
        names = select(key, tuple(where))
        return {"__key__": key, "__url__": url, "__members__": tuple(where),
                **{n: data(n) for n in where if n in names}}

    key, where = None, {}
    with open(url, "rb") as f:
        for name, offset, size in _tar_entries(f, url):
            prefix, suffix = base_plus_ext(name)
            if prefix is None or prefix.startswith("__") or (keep is not None and prefix not in keep):
                continue
            if key is not None and key != prefix:
                yield read(f, key, where)
                where = {}
            key, suffix = prefix, suffix.lower()
            if suffix in where:
                raise ValueError(f"{url}: duplicate file {name}")
            where[suffix] = (offset, size)
        if key is not None:
            yield read(f, key, where)


def _epoch_stream(shards: Sequence[Shard], order: list[int], seed: int, epoch: int, slot: int, buffer: int,
                  offset: int, members=None) -> Iterator[tuple[int, dict]]:
    """The slot's epoch `epoch` from its `offset`-th sample: (epoch, raw sample) after the shuffle buffer."""
    counts = [shards[i].samples for i in order]
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    total = starts[-1]
    buf = ShuffleBuffer(buffer, Rand(_TAG_BUFFER, seed, epoch, slot))
    read = yielded = 0
    while yielded < offset:  # replay on ordinals: which are buffered, how many were read
        if read < total:
            if buf.push(read) is not _NOTHING:
                yielded += 1
            read += 1
        else:
            buf.pop()
            yielded += 1
    where = {o: k for k, o in enumerate(buf.items)}  # buffered ordinal -> buffer index
    first = min([read, *where])

    select = None if members is None else (lambda key, suffixes: members(key, epoch, suffixes))

    def strip(raw: dict) -> dict:
        raw.pop("__url__", None)
        raw.pop("__local_path__", None)
        return raw

    for j, i in enumerate(order):
        if starts[j + 1] <= first:
            continue  # skipped whole, never opened
        n = 0
        keep = shards[i].keep
        for raw in _read_shard(shards[i].url, keep, select):
            o = starts[j] + n
            n += 1
            if o < read:  # consumed before the interruption, or waiting in the buffer
                if o in where:
                    buf.items[where[o]] = (epoch, strip(raw))
                continue
            out = buf.push((epoch, strip(raw)))
            if out is not _NOTHING:
                yield out
        if n != counts[j]:
            raise RuntimeError(f"{shards[i].url}: {n} samples, the manifest says {counts[j]}")
    while len(buf):
        yield buf.pop()


def slot_stream(shards: Sequence[Shard], slot: int, slots: int, seed: int, shuffle_buffer: int, start: int = 0,
                members=None) -> Iterator[tuple[int, dict]]:
    """The infinite stream of slot `slot` of `slots`, from its `start`-th sample: (epoch, raw sample).
    `members(key, epoch, suffixes)`: the members of each sample to read (default all)."""
    epoch, offset = locate(shards, slot, slots, seed, start)
    while True:
        order = epoch_shards(len(shards), slot, slots, seed, epoch)
        yield from _epoch_stream(shards, order, seed, epoch, slot, shuffle_buffer, offset, members)
        epoch, offset = epoch + 1, 0


def collate(samples: list[dict]) -> dict:
    """Stack tensors, numbers -> a tensor, anything else (the keys) -> a list."""
    out = {}
    for name in samples[0]:
        vals = [s[name] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            out[name] = torch.stack(vals)
        elif isinstance(vals[0], (int, float, np.integer, np.floating)) and not isinstance(vals[0], bool):
            out[name] = torch.tensor(vals)
        else:
            out[name] = vals
    return out


def _identity(x):
    return x


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGUSR1 / SIGUSR2 to the training process: SLURM signals every process
    of a task (scancel, preemption, the pre-timeout signal), and a worker killed by it would crash the trainer
    before it can save its checkpoint."""
    import signal

    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """At interpreter exit multiprocessing stops its daemonic children (DataLoader workers) with SIGTERM, which our
    workers ignore: after an exception in the trainer (the loader's iterator still alive in the traceback) the
    process would wait for them forever instead of failing. Registered after multiprocessing's own exit handler,
    this runs first and kills them."""
    import multiprocessing

    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


# --- one rank's dataset and loader ----------------------------------------------------------------------------
class RankDataset(IterableDataset):
    """The samples of one rank: in a DataLoader worker k, slot rank * K + (k + consumed) % K from its position."""

    def __init__(self, shards: Sequence[Shard], transform: SampleTransform, *, rank: int, world_size: int,
                 workers: int, seed: int, shuffle_buffer: int, consumed: int = 0):
        super().__init__()
        self.shards, self.transform = list(shards), transform
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.seed, self.shuffle_buffer, self.consumed = seed, shuffle_buffer, consumed

    def __iter__(self):
        k = max(self.workers, 1)
        info = get_worker_info()
        wid = 0 if info is None else info.id
        if info is not None and info.num_workers != k:
            raise RuntimeError(f"built for {k} workers, running in {info.num_workers}")
        local = (wid + self.consumed) % k  # worker 0 of a new iterator plays the slot whose sample is next
        slot = self.rank * k + local
        start = slot_positions(self.consumed, self.workers)[local]
        for epoch, raw in slot_stream(self.shards, slot, self.world_size * k, self.seed, self.shuffle_buffer,
                                      start, getattr(self.transform, "members", None)):
            yield self.transform(raw, epoch)


class ResumableLoader:
    """Batches of one rank, infinite; `state_dict` / `load_state_dict` resume exactly (see the module docstring).

    Each `iter()` starts a fresh DataLoader (non-persistent workers) at the current position; an iterator made
    before a `load_state_dict` or a newer `iter()` stops being valid.
    """

    def __init__(self, dataset: RankDataset, *, batch_size: int, samples_per_epoch: int, pin_memory: bool = False,
                 subset: Optional[str] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.subset = subset  # the digest of a nested subset (`subset_shards`), None: the whole split
        self.pin_memory = pin_memory
        self.rank, self.world_size, self.workers = dataset.rank, dataset.world_size, dataset.workers
        self.seed = dataset.seed
        self.resume_exact = True
        self._consumed = 0
        self._generation = 0

    @property
    def consumed(self) -> int:
        """Samples this rank has handed out in batches, since the start of the run."""
        return self._consumed

    @property
    def epoch(self) -> float:
        """Global passes over the data so far (all ranks), as a fraction."""
        return self._consumed * self.world_size / max(self.samples_per_epoch, 1)

    def __iter__(self) -> Iterator[dict]:
        self._generation += 1
        return self._batches(self._generation)

    def _batches(self, generation: int) -> Iterator[dict]:
        ds = RankDataset(self.dataset.shards, self.dataset.transform, rank=self.rank, world_size=self.world_size,
                         workers=self.workers, seed=self.seed, shuffle_buffer=self.dataset.shuffle_buffer,
                         consumed=self._consumed)
        # its own generator: a DataLoader iterator otherwise draws its base seed from the global torch RNG, which
        # would shift dropout's random numbers between a resumed run (new iterator after the RNG is restored) and
        # an uninterrupted one (our streams never use that seed)
        kw: dict[str, Any] = dict(batch_size=None, collate_fn=_identity, num_workers=self.workers,
                                  persistent_workers=False, in_order=True,
                                  generator=torch.Generator().manual_seed(self.seed))
        if self.workers > 0:
            kw["worker_init_fn"] = _ignore_stop_signals
            atexit.unregister(_kill_workers_at_exit)  # once, and after multiprocessing's handler
            atexit.register(_kill_workers_at_exit)
        if self.workers > 0:
            kw["prefetch_factor"] = max(2, math.ceil(2 * self.batch_size / self.workers))  # ~2 batches in flight
        it = iter(DataLoader(ds, **kw))
        try:
            while True:
                if generation != self._generation:
                    raise RuntimeError("this loader iterator is stale: the loader was re-iterated or its state loaded")
                batch = collate([next(it) for _ in range(self.batch_size)])
                if self.pin_memory:
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                self._consumed += self.batch_size
                yield batch
        finally:
            del it  # shuts the workers down

    def state_dict(self) -> dict:
        state = {"consumed": self._consumed, "world_size": self.world_size, "workers": self.workers,
                 "seed": self.seed, "samples_per_epoch": self.samples_per_epoch}
        if self.subset is not None:
            state["subset"] = self.subset
        return state

    def load_state_dict(self, state: dict) -> bool:
        """Continue where `state` left off; True if exactly, False if approximately (see the module docstring).

        An optional "consumed_global" (samples consumed by all ranks together) is used for an approximate
        resume instead of consumed * world_size.
        """
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this loader {self.seed}: resuming with another "
                             f"seed would change every permutation and augmentation")
        n, W, K = int(state["consumed"]), int(state["world_size"]), int(state["workers"])
        same_layout = W == self.world_size and max(K, 1) == max(self.workers, 1)
        same_data = (int(state["samples_per_epoch"]) == self.samples_per_epoch
                     and state.get("subset") == self.subset)
        self._generation += 1
        if same_layout and same_data:
            self._consumed, self.resume_exact = n, True
            return True
        total = int(state.get("consumed_global", n * W))
        self._consumed, self.resume_exact = total // self.world_size, False
        why = (f"world size {W} -> {self.world_size}, workers {K} -> {self.workers}" if not same_layout else
               f"the dataset changed ({state['samples_per_epoch']} -> {self.samples_per_epoch} samples per epoch)"
               if int(state["samples_per_epoch"]) != self.samples_per_epoch else
               f"the subset changed ({state.get('subset')} -> {self.subset})")
        log.warning("approximate loader resume (%s): continuing at global sample %d (%d per rank); samples near "
                    "the boundary may repeat or be skipped once", why, total, self._consumed)
        return False


def build_loader(dataset_dir: Optional[PathLike], cfg: DataConfig, *, rank: int, world_size: int, batch_size: int,
                 seed: int, split: str = "train", planes: Optional[Sequence[Union[int, str]]] = None,
                 frames: Optional[int] = None, transform=None) -> ResumableLoader:
    """The loader of one rank. `dataset_dir` None: `cfg.dataset`. `planes`: plane indices or names
    (`plane_names`) to keep, in that order; `frames` overrides `cfg.frames` (pass the model's). `transform`:
    another per-sample transform (raw sample, epoch) -> dict, e.g. `KSpaceTransform`; default `SampleTransform`."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}")
    if dataset_dir is None:
        dataset_dir = cfg.dataset
    manifest = Manifest.load(dataset_dir)
    shards = list_shards(dataset_dir, split, manifest)
    if not shards:
        raise ValueError(f"{dataset_dir}: no {split!r} shards in the manifest")
    subset = None
    if cfg.subjects is not None:
        shards, subset = subset_shards(shards, manifest.blocks, cfg.subjects)
        log.info("data.subjects=%d: %d %s samples in %d shards (subset %s)", cfg.subjects,
                 sum(s.samples for s in shards), split, len(shards), subset)
    slots = world_size * max(cfg.workers, 1)
    if len(shards) < slots:
        warnings.warn(f"{len(shards)} {split} shards for {slots} loader slots: slots share shards, so every epoch "
                      f"repeats each sample about {slots / len(shards):.1f} times (use fewer workers or ranks, or "
                      f"smaller blocks)", stacklevel=2)
    if transform is None:
        transform = SampleTransform(cfg, seed, manifest.tabular_stats(), planes, frames)
    ds = RankDataset(shards, transform, rank=rank, world_size=world_size, workers=cfg.workers, seed=int(seed),
                     shuffle_buffer=cfg.shuffle_buffer)
    return ResumableLoader(ds, batch_size=batch_size, samples_per_epoch=sum(s.samples for s in shards),
                           pin_memory=torch.cuda.is_available(), subset=subset)
