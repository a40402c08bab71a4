"""Data-loading throughput (subjects/s) for ViTa Stage I samples -- 9 planes x 5 of 50 frames x 128^2, the
augmentations on -- several ways, in one run, on the same machine and the same subjects:

  (a) shards   the WebDataset shards through the real training loader (`pretrain.data.build_loader`: shard
               streams, shuffle buffer, `SampleTransform`), batches collated in the calling process as in training,
               side by side for the two shard layouts and the two places augmentation can run:
      shards-v1     schema 1 (the layout before cine was stored frame by frame): one member with all 50 frames of
                    every plane, decoded whole, 5 frames kept, flip / rotate / gamma in the loader (a copy of the
                    converted shards rewritten to that layout here);
      shards        schema 2: one member per frame, the reader reads and decodes only the 5 selected frames,
                    augmentation in the loader;
      shards-batch  schema 2 with `data.augment_on=batch`: the loader reads, decodes and selects; flips /
                    rotations / gamma run on the batch on the training device (`augment_batch`), not counted
                    here (its CPU cost per batch is reported separately);
  (b) zarr     the Zarr store by random access (`finetune.data.SubjectDataset`, train=True: the 5 frame chunks of
               one subject, then the same augmentation), through a torch DataLoader with the same
               workers and batch size, subjects drawn at random with replacement;
  (c) nifti    the per-subject NIfTI files read on the fly, two ways, through the same DataLoader:
      nifti-ref       as the reference ViTa / CineMA loaders do: `nibabel.load(...).get_fdata()` of the whole
                      sa.nii.gz, la_2ch, la_3ch, la_4ch volumes (all slices, all 50 frames, float64) at every
                      access, then index the 6 SA slices / crop 128^2 / the 5 frames (slices and crop centres
                      taken from the converted dataset's metadata, i.e. precomputed), percentile-normalise each
                      plane's 5 frames, the same augmentation; no segmentations read;
      nifti-pipeline  the project's own per-subject conversion on the fly: `read_ukb_nifti_dir` (images and
                      segmentations) + `data_prep.ukb.preprocess.preprocess` (slice choice, heart centre, crops,
                      normalisation of all 50 frames, phenotypes from the label maps), then the 5 frames and the
                      same augmentation -- an upper bound of "convert while training".

For each way and each `--workers` K the rate is taken over `--samples` subjects after one warm-up batch (worker
start-up, first reads and the shuffle buffer's first fill excluded, reported separately), `--repeats` times,
interleaved; the best rate is reported (all are in the JSON). The rates are then set
against the measured H100 Stage I step rates (bench/results/pretrain_step_h100.json): loader workers per GPU
needed at the measured per-worker rate. A split of the shard paths' per-sample cost (tar read, Blosc decode,
select, augment) for both layouts and a Zarr 5-frame read is measured in-process, and the bytes per subject of
both shard layouts against the source NIfTI.

    python bench/loading.py [--cohort DIR] [--converted DIR] [--subjects 16] [--workers 0 2] [--samples 64]
                            [--nifti-samples 16] [--batch 4] [--repeats 2] [--out bench/results/loading.json]
                            [--no-markdown]

--cohort: a synthetic cohort (`python -m data_prep synth`; default: one of --subjects subjects is generated in a
temp dir); --converted: that cohort converted by `python -m data_prep ukb` (default: converted here with the real
job, `job.block_size=4` so that the training split has several shards). The cohort is small and sits in the
OS page cache after the first pass: the figures are the CPU cost of loading (read from cache, decompress,
transform), not disk or network I/O. Writes the JSON and the "## Data loading" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/loading.py` from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, RandomSampler  # noqa: E402

from common import update_benchmarks  # noqa: E402

FRAMES = 5
SECTION = "## Data loading"
# the H100 Stage I step rates this loader has to feed (bench/pretrain_step.py, micro-batch 32)
GPU_ROWS = {"paper 1025x5 bf16": "paper shape (width 1025, 5 heads), bf16",
            "1024x8 bf16": "width 1024, 8 heads, bf16"}
GPU_FALLBACK = {"paper 1025x5 bf16": 118.4, "1024x8 bf16": 310.8}  # samples/s, if the JSON is missing


# --- data -------------------------------------------------------------------------------------------------------
def ensure_data(args, tmp: Path) -> tuple[Path, Path, dict]:
    """The cohort and its conversion (made here with the real CLI jobs when not given); what was done."""
    made = {}
    cohort = args.cohort
    if cohort is None or not (cohort / "ukb").is_dir():
        cohort = cohort or tmp / "cohort"
        cmd = [sys.executable, "-m", "data_prep", "synth", "--out", str(cohort), "--subjects", str(args.subjects),
               "--kspace-scans", "0", "--seed", "0", "--quiet"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        made["synth"] = {"cmd": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - t0, 1)}
    conv = args.converted
    if conv is None or not (conv / "manifest.json").is_file():
        conv = conv or tmp / "converted"
        cmd = [sys.executable, "-m", "data_prep", "ukb", "--src", str(cohort / "ukb"), "--tabular",
               str(cohort / "ukb_tabular.csv"), "--out", str(conv), "--quiet", "job.block_size=4"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        made["convert"] = {"cmd": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - t0, 1)}
    return cohort, conv, made


def schema1_copy(conv: Path, out: Path) -> Path:
    """The converted dataset with its shards rewritten to schema 1 (whole `image.arr` / `seg.arr` members with all
    frames, as written before cine was stored frame by frame); the manifest, metadata and Zarr store are shared."""
    import webdataset as wds

    from core.format import encode_array, read_frames
    from core.manifest import Manifest
    from pretrain.data import _read_shard

    out.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(conv):
        if name != "shards":
            os.symlink(conv / name, out / name)
    for shard in Manifest.load(conv).shards:
        src, dst = conv / shard["path"], out / shard["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as f:
            tar = wds.TarWriter(f, encoder=False, mtime=0.0)
            for raw in _read_shard(str(src)):
                whole = {"__key__": raw["__key__"], **{k: v for k, v in raw.items()
                                                       if not k.startswith(("__", "image.t", "seg.t"))}}
                for field in ("image", "seg"):
                    whole[f"{field}.arr"] = encode_array(read_frames(raw, field))
                tar.write(whole)
            tar.close()
    return out


def nbytes(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def augment(image: torch.Tensor, key: str, epoch: int, seed: int = 0) -> torch.Tensor:
    """The training augmentation (DataConfig defaults: rotation +-10 deg, flips, gamma 1 +- 0.1) of (P, 5, H, W)."""
    from pretrain.config import DataConfig
    from pretrain.transforms import augment_image, augment_params

    prm = augment_params(seed, key, epoch, image.shape[0], 50, DataConfig())
    out, _ = augment_image(image, prm["angles"], prm["flips"], prm["gamma"])
    return out.contiguous()


class NiftiReference(Dataset):
    """(c) nifti-ref: whole volumes through nibabel + get_fdata() at every access, then index (see the docstring)."""

    def __init__(self, src: Path, keys: list[str], metas: dict[str, dict], crop: int = 128,
                 fov_mm: float | None = None):
        self.src, self.keys, self.metas, self.crop, self.fov_mm = src, keys, metas, crop, fov_mm

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        import nibabel as nib

        from core.vocab import LA_VIEWS
        from data_prep.ukb.preprocess import store_plane
        from pretrain.transforms import select_frames

        key = self.keys[i]
        meta = self.metas[key]
        imgs = {v: nib.load(self.src / key / f"{v}.nii.gz") for v in ("sa", *LA_VIEWS)}
        vols = {v: img.get_fdata() for v, img in imgs.items()}
        T = vols["sa"].shape[-1]
        idx = select_frames(T, FRAMES)
        planes = []
        for name in meta["planes"]:
            view, k = ("sa", meta["sa_slices"][int(name[3:])]) if name.startswith("sa_") else (name, 0)
            ci, cj = meta["crop_centres"][name]
            x, _, _ = store_plane(vols[view][:, :, k, :][..., idx], None, imgs[view].affine, k, ci, cj, self.crop,
                                  self.fov_mm)  # (S, S, 5), resampled as the conversion did
            lo, hi = np.percentile(x, (1.0, 99.5))
            planes.append(np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0).transpose(2, 0, 1))
        image = torch.from_numpy(np.stack(planes).astype(np.float32))
        return {"image": augment(image, key, 0), "key": key}


class NiftiPipeline(Dataset):
    """(c) nifti-pipeline: the project's read_ukb_nifti_dir + preprocess per access, then 5 frames + augmentation."""

    def __init__(self, src: Path, keys: list[str], pcfg):
        self.src, self.keys, self.pcfg = src, keys, pcfg

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        from data_prep.ukb.preprocess import preprocess
        from data_prep.ukb.nifti import read_ukb_nifti_dir
        from pretrain.transforms import select_frames

        key = self.keys[i]
        image, *_ = preprocess(read_ukb_nifti_dir(self.src / key), self.pcfg)
        idx = select_frames(image.shape[1], FRAMES)
        return {"image": augment(torch.from_numpy(np.ascontiguousarray(image[:, idx], np.float32)), key, 0),
                "key": key}


def _collate(samples: list[dict]) -> dict:
    from pretrain.data import collate

    return collate(samples)


def random_access_loader(ds: Dataset, workers: int, batch: int, n: int, seed: int = 0) -> DataLoader:
    """Random subjects with replacement (n of them), as a training DataLoader over a map-style dataset."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch, sampler=RandomSampler(ds, replacement=True, num_samples=n, generator=gen),
                      num_workers=workers, collate_fn=_collate, persistent_workers=False)


# --- timing -----------------------------------------------------------------------------------------------------
def time_batches(batches, n: int, warmup: int) -> dict:
    """Subjects/s over `n` samples after `warmup` samples (start-up, first reads) from an iterator of batches."""
    t0 = time.perf_counter()
    it = iter(batches)
    seen = 0
    while seen < warmup:
        seen += len(next(it)["key"])
    t1 = time.perf_counter()
    got = 0
    while got < n:
        b = next(it)
        assert b["image"].shape[2] == FRAMES, b["image"].shape  # (batch, planes, frames, H, W)
        got += len(b["key"])
    t2 = time.perf_counter()
    del it
    return {"samples": got, "seconds": round(t2 - t1, 3), "startup_s": round(t1 - t0, 3),
            "subjects_per_s": got / (t2 - t1)}


def split_costs(conv: Path, conv_v1: Path, n: int) -> dict:
    """Per-sample ms, in-process, of both shard layouts: tar read (schema 1: every member; schema 2: the members
    the transform uses, the rest seeked over), Blosc decode, select + augment, and the whole `SampleTransform`;
    the per-batch CPU cost of `augment_batch`; a Zarr 5-frame read."""
    from core.format import StoreReader, decode_array, read_frames
    from core.manifest import Manifest
    from pretrain.config import DataConfig
    from pretrain.data import _read_shard, collate, list_shards
    from pretrain.transforms import SampleTransform, augment_batch, select_frames

    stats = Manifest.load(conv).tabular_stats()
    tf = SampleTransform(DataConfig(), 0, stats, frames=FRAMES)
    tf_batch = SampleTransform(DataConfig(augment_on="batch"), 0, stats, frames=FRAMES)

    def read(dataset: Path, select) -> tuple[list[dict], float]:
        raws, t = [], 0.0
        for shard in list_shards(dataset, "train"):
            it = _read_shard(shard.url, select=select)
            while len(raws) < n:
                t0 = time.perf_counter()
                raw = next(it, None)
                t += time.perf_counter() - t0
                if raw is None:
                    break
                raws.append(raw)
            if len(raws) >= n:
                break
        return raws, t

    members = lambda key, suffixes: tf.members(key, 0, suffixes)  # noqa: E731
    v1, t_read1 = read(conv_v1, members)  # schema 1: the image member is one, read whole
    v2, t_read2 = read(conv, members)
    k = len(v2)
    t = {"dec1": 0.0, "dec2": 0.0, "tf1": 0.0, "tf2": 0.0, "tf2_batch": 0.0, "zarr": 0.0}
    reader = StoreReader(str(conv))
    out = []
    for r1, r2 in zip(v1, v2):
        idx = select_frames(50, FRAMES)
        t0 = time.perf_counter()
        decode_array(r1["image.arr"])
        t["dec1"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        read_frames(r2, "image", idx)
        t["dec2"] += time.perf_counter() - t0
        for name, f, r in (("tf1", tf, r1), ("tf2", tf, r2), ("tf2_batch", tf_batch, r2)):
            t0 = time.perf_counter()
            o = f(r, 0)
            t[name] += time.perf_counter() - t0
        out.append(o)
        t0 = time.perf_counter()
        reader.group["image"].get_orthogonal_selection((reader.rows[r2["__key__"]], slice(None), idx.tolist()))
        t["zarr"] += time.perf_counter() - t0
    batch = collate(out[:4])
    t0 = time.perf_counter()
    for _ in range(3):
        augment_batch(batch, torch.device("cpu"))
    t_aug_batch = (time.perf_counter() - t0) / 3
    ms = lambda x: round(1e3 * x / k, 2)  # noqa: E731
    size = lambda raws, pre: sum(len(v) for r in raws for m, v in r.items() if m.startswith(pre)) / k / 2**20  # noqa
    return {"samples": k, "stored_frames": 50, "kept_frames": FRAMES,
            "v1_tar_read_ms": ms(t_read1), "v1_decode_all_frames_ms": ms(t["dec1"]),
            "v1_transform_ms": ms(t["tf1"]), "v1_image_member_mib": round(size(v1, "image.arr"), 2),
            "v2_tar_read_ms": ms(t_read2), "v2_decode_5_frames_ms": ms(t["dec2"]),
            "v2_transform_ms": ms(t["tf2"]), "v2_transform_no_augment_ms": ms(t["tf2_batch"]),
            "v2_image_members_read_mib": round(size(v2, "image.t"), 2),
            "augment_batch_cpu_ms_per_sample": round(1e3 * t_aug_batch / len(batch["key"]), 2),
            "zarr_read_5_frames_ms": ms(t["zarr"])}


# --- the report -------------------------------------------------------------------------------------------------
def gpu_rates() -> tuple[dict, str]:
    path = ROOT / "bench/results/pretrain_step_h100.json"
    rates, src = dict(GPU_FALLBACK), "fallback figures of BENCHMARKS.md"
    if path.is_file():
        d = json.loads(path.read_text())
        for r in d.get("rows", []):
            if r.get("label") in GPU_ROWS and "samples_per_s" in r:
                rates[r["label"]] = r["samples_per_s"]
        src = f"{path.relative_to(ROOT)} ({d.get('device')}, micro-batch {d.get('micro_batch')})"
    return rates, src


WAYS = {
    "shards-v1": "(a) shards, schema 1 (all 50 frames in one member), augmentation in the loader",
    "shards": "(a) shards, frame by frame (5 frames read), augmentation in the loader",
    "shards-batch": "(a) shards, frame by frame, augmentation on the batch (`augment_on=batch`)",
    "zarr": "(b) Zarr store, random access (`SubjectDataset`)",
    "nifti-ref": "(c) NIfTI, nibabel `get_fdata()` of whole volumes per access",
    "nifti-pipeline": "(c') NIfTI, `read_ukb_nifti_dir` + `preprocess` per access",
}


def markdown(res: dict) -> str:
    m = res["machine"]
    ws = res["workers"]
    gpu = res["gpu"]
    g_paper, g_fast = gpu["samples_per_s"]["paper 1025x5 bf16"], gpu["samples_per_s"]["1024x8 bf16"]
    lines = [SECTION + " (`python bench/loading.py`)", "",
             f"{m['cpus']}-core CPU machine ({m['note']}; load average {m['loadavg_start'][0]:.1f} at the start, "
             f"{m['loadavg_end'][0]:.1f} at the end), torch {m['torch']}, {m['date']}; Stage I samples "
             f"(9 planes x 5 of 50 frames x 128², flips / rotation / gamma on), batch {res['batch']}, "
             f"{res['subjects']} synthetic subjects ({res['train_subjects']} in the training split), in the page cache "
             f"(CPU cost, not disk I/O); best of {res['repeats']} interleaved repeats, each after one warm-up batch "
             f"(`bench/results/loading.json`):", "",
             "| way | " + " | ".join(f"subjects/s, {w} workers" for w in ws) +
             f" | workers per GPU to feed {g_paper:.0f} / {g_fast:.0f} samples/s |",
             "| --- | " + " | ".join("---" for _ in ws) + " | --- |"]
    for way, label in WAYS.items():
        rows = {r["workers"]: r for r in res["runs"] if r["way"] == way}
        if not rows:
            continue
        cells = [f"{rows[w]['subjects_per_s']:.2f}" if w in rows else "-" for w in ws]
        need = res["workers_needed"].get(way, {})
        lines.append(f"| {label} | " + " | ".join(cells) +
                     f" | {need.get('paper 1025x5 bf16', '-')} / {need.get('1024x8 bf16', '-')} |")
    s = res["split"]
    lines += ["", f"Workers per GPU = ceil(GPU samples/s / the one-process rate (0 workers)); GPU rates: the H100 "
              f"Stage I steps above (paper shape {g_paper:.0f} samples/s, width 1024 {g_fast:.0f} samples/s, "
              f"micro-batch 32 on one GPU).",
              "", f"Where a shard sample's time goes (in-process, per subject, {s['samples']} subjects). Schema 1: "
              f"tar read {s['v1_tar_read_ms']:.1f} ms, Blosc decode of all {s['stored_frames']} frames "
              f"{s['v1_decode_all_frames_ms']:.1f} ms ({s['v1_image_member_mib']:.1f} MiB member), the whole "
              f"transform {s['v1_transform_ms']:.1f} ms. Frame by frame: tar read of the used members "
              f"{s['v2_tar_read_ms']:.1f} ms ({s['v2_image_members_read_mib']:.2f} MiB of image), decode of the 5 "
              f"frames {s['v2_decode_5_frames_ms']:.1f} ms, the whole transform {s['v2_transform_ms']:.1f} ms, "
              f"{s['v2_transform_no_augment_ms']:.1f} ms without the augmentation (which `augment_batch` runs on the "
              f"batch: {s['augment_batch_cpu_ms_per_sample']:.1f} ms per sample on this CPU; on the GPU it is one "
              f"grid_sample over the batch, not measured yet). Zarr: 5 frame chunks in {s['zarr_read_5_frames_ms']:.1f} ms.",
              "", f"Bytes per subject: source NIfTI {s['nifti_mib_per_subject']:.1f} MiB, shards frame by frame "
              f"{s['shards_v2_mib_per_subject']:.1f} MiB ({s['shards_v2_mib_per_subject'] / s['nifti_mib_per_subject']:.2f}x), "
              f"schema 1 {s['shards_v1_mib_per_subject']:.1f} MiB."]
    ratios = [max(r["subjects_per_s_all"]) / min(r["subjects_per_s_all"]) for r in res["runs"]
              if min(r["subjects_per_s_all"]) > 0]
    busy = m["loadavg_start"][0] >= m["cpus"]
    lines += ["", f"Repeats of the same measurement differed by up to {max(ratios, default=1.0):.1f}x on this machine "
              f"(all in the JSON)." + (" The machine was oversubscribed (load average >= cores) before the run "
                                        "began: worker counts cannot show a gain here, and the one-process rate "
                                        "(hence workers per GPU) is pessimistic." if busy else "")]
    if res.get("notes"):
        lines += ["", res["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, help="a synthetic cohort (python -m data_prep synth); default: generated")
    ap.add_argument("--converted", type=Path, help="its conversion (python -m data_prep ukb); default: converted here")
    ap.add_argument("--subjects", type=int, default=16, help="subjects of a generated cohort")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers, each measured")
    ap.add_argument("--samples", type=int, default=64, help="subjects timed per way and worker count (shards, zarr)")
    ap.add_argument("--nifti-samples", type=int, default=16, help="subjects timed for the (slow) NIfTI ways")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="each measurement repeated; the best rate is reported "
                                                           "(a shared machine only ever slows a run down)")
    ap.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    ap.add_argument("--note", default="shared with concurrent test runs",
                    help="how the machine was loaded (goes into the table's caption)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/loading.json")
    ap.add_argument("--no-markdown", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core per loader process, as in a DataLoader worker (torch sets 1 there)

    from core.format import StoreReader
    from data_prep.ukb.preprocess import UKBPreprocessConfig
    from finetune.data import SubjectDataset
    from pretrain.config import DataConfig, ViTConfig
    from pretrain.data import build_loader

    tmp = Path(tempfile.mkdtemp(prefix="cmrfm-loading-"))
    try:
        load0 = os.getloadavg()
        cohort, conv, made = ensure_data(args, tmp)
        conv_v1 = schema1_copy(conv, tmp / "converted-schema1")
        reader = StoreReader(str(conv))
        keys = reader.keys("train")
        metas = {k: reader.meta(k) for k in keys}
        pcfg = UKBPreprocessConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                      for k, v in reader.manifest.config["preprocess"].items()})
        vit = ViTConfig(img_size=pcfg.crop, sa_planes=pcfg.sa_planes, frames=FRAMES)
        print(f"{os.cpu_count()} cores, torch {torch.__version__}; cohort {cohort}, converted {conv}: "
              f"{len(reader.keys())} subjects, {len(keys)} in train; load average {load0[0]:.2f}", flush=True)
        for step, d in made.items():
            print(f"  made the {step} ({d['seconds']} s): python {d['cmd']}", flush=True)

        runs, trials = [], []
        for rep in range(args.repeats):  # interleaved, so that a busy spell of the shared machine hits all ways
            for w in args.workers:
                for way in args.ways:
                    n = args.samples if way.startswith(("shards", "zarr")) else args.nifti_samples
                    if way.startswith("shards"):
                        where = conv_v1 if way == "shards-v1" else conv
                        cfg = DataConfig(dataset=where, workers=w, frames=FRAMES,
                                         augment_on="batch" if way == "shards-batch" else "loader")
                        batches = build_loader(where, cfg, rank=0, world_size=1, batch_size=args.batch, seed=rep,
                                               frames=FRAMES)
                    else:
                        if way == "zarr":
                            ds = SubjectDataset(conv, "train", "phenotypes", vit, train=True, seed=rep)
                        elif way == "nifti-ref":
                            ds = NiftiReference(cohort / "ukb", keys, metas, pcfg.crop, pcfg.fov_mm)
                        else:
                            ds = NiftiPipeline(cohort / "ukb", keys, pcfg)
                        batches = random_access_loader(ds, w, args.batch, n + args.batch, seed=rep)
                    r = {"way": way, "workers": w, "repeat": rep, **time_batches(batches, n, args.batch)}
                    trials.append(r)
                    print(f"{way:15s} workers {w} (repeat {rep}): {r['subjects_per_s']:7.2f} subjects/s over "
                          f"{r['samples']} ({r['seconds']:.1f} s; warm-up batch {r['startup_s']:.1f} s)", flush=True)
        for w in args.workers:
            for way in args.ways:
                ts = [t for t in trials if t["way"] == way and t["workers"] == w]
                best = max(ts, key=lambda t: t["subjects_per_s"])
                runs.append({"way": way, "workers": w, "batch": args.batch, "samples": best["samples"],
                             "subjects_per_s": best["subjects_per_s"],
                             "subjects_per_s_per_worker": best["subjects_per_s"] / max(w, 1),
                             "subjects_per_s_all": [round(t["subjects_per_s"], 3) for t in ts],
                             "startup_s_all": [t["startup_s"] for t in ts]})

        split = split_costs(conv, conv_v1, min(len(keys), 12))
        every = reader.keys()
        sizes = {"nifti_mib_per_subject": nbytes(f for k in every for f in (cohort / "ukb" / k).glob("*.nii*"))
                 / len(every) / 2**20,
                 "shards_v2_mib_per_subject": nbytes((conv / "shards").rglob("*.tar")) / len(every) / 2**20,
                 "shards_v1_mib_per_subject": nbytes((conv_v1 / "shards").rglob("*.tar")) / len(every) / 2**20}
        sizes = {k: round(v, 2) for k, v in sizes.items()}
        split.update(sizes)
        rates, src = gpu_rates()
        needed = {}
        for way in args.ways:
            one = next((r for r in runs if r["way"] == way and r["workers"] == min(args.workers)), None)
            if one:
                per = one["subjects_per_s_per_worker"]
                needed[way] = {g: math.ceil(v / per) for g, v in rates.items()}
        load1 = os.getloadavg()
        res = {"machine": {"platform": f"{platform.machine()} {platform.system()}", "cpus": os.cpu_count(),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                           "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in load1],
                           "note": args.note},
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "made": made,
               "data": {"cohort": str(cohort), "converted": str(conv)},
               "subjects": len(reader.keys()), "train_subjects": len(keys), "batch": args.batch,
               "preprocess": reader.manifest.config["preprocess"], "workers": args.workers,
               "timed": {k: v for k, v in WAYS.items()}, "runs": runs, "split": split,
               "gpu": {"source": src, "samples_per_s": rates, "labels": GPU_ROWS},
               "workers_needed": needed, "repeats": args.repeats, "trials": trials,
               "workers_needed_rule": "ceil(GPU samples/s / subjects/s of one loading process (the smallest --workers, "
                                      "0 = in the training process))"}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print()
        print("shard sample cost (ms/subject): " + ", ".join(f"{k} {v}" for k, v in split.items()))
        print(f"GPU rates ({src}):")
        for g, v in rates.items():
            print(f"  {GPU_ROWS[g]}: {v:.0f} samples/s -> workers per GPU: "
                  + ", ".join(f"{way} {needed[way][g]}" for way in needed))
        print(f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end; wrote {args.out}")
        if not args.no_markdown:
            update_benchmarks(markdown(res), SECTION)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
