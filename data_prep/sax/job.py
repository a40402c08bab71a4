"""`python -m data_prep sax layout=acdc|mnms`: ACDC or M&Ms as published -> shards + Zarr (`core.format.SaxSample`).

Each case (`acdc.read_case` / `mnms.read_case`, labels mapped to the project's label space) is resampled in-plane
to `spacing_mm` (linear for the images, nearest for the labels; the slices stay as acquired), cropped or padded to
`crop` x `crop` around the image centre (no label is used to place the crop: the test cases are treated as a user's
would be), and scaled to [0, 1] between the case's intensity percentiles. Every frame is kept as image; only ED
and ES carry labels and are ever scored. Splits: the dataset's own training and test sets (split scheme
"published"), validation drawn from the training set by the key's hash. A case that cannot be read as published
(a missing `_gt`, frames that disagree with Info.cfg, a case without a CSV row, unknown label values, ...) is
quarantined with the file and the reason; counts reconcile as for every job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from scipy import ndimage

from core.config import ConfigError, save_resolved_config
from core.format import SaxSample
from data_prep.engine import ArraySpec, JobConfig, WorkItem, mean_input_bytes, run_job
from data_prep.sax import acdc, mnms
from data_prep.sax.case import SaxCase

SPLIT_SCHEME = {"name": "published", "group_by": "case", "stratify_by": "the dataset's own training / test sets"}


@dataclass
class SaxJobConfig:
    src: Optional[Path] = None  # the dataset as published (ACDC: the folder holding database/ or training/)
    layout: Optional[Literal["acdc", "mnms"]] = None
    crop: int = 128  # stored grid: crop x crop pixels per slice
    spacing_mm: float = 1.5  # in-plane pixel size of the stored grid (crop x spacing = the field of view)
    percentiles: tuple[float, float] = (1.0, 99.5)
    max_frames: int = 40  # Zarr capacity per case (ACDC: up to 35 frames; M&Ms: up to 36)
    max_slices: int = 24
    job: JobConfig = field(default_factory=lambda: JobConfig(out=Path("data/sax"), block_size=16, val_fraction=0.1,
                                                             test_fraction=0.0))

    def __post_init__(self) -> None:
        if self.crop < 8 or self.spacing_mm <= 0 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError("crop >= 8, spacing_mm > 0 and 0 <= low < high <= 100 percentiles are required")


def to_grid(case: SaxCase, crop: int, spacing_mm: float, percentiles: tuple[float, float]
            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """-> image (T, Z, crop, crop) float16 in [0, 1], seg (2, Z, crop, crop) uint8 (ED, ES), geometry meta."""
    sx, sy, sz = case.spacing_mm
    fx, fy = sx / spacing_mm, sy / spacing_mm
    image = ndimage.zoom(case.image, (fx, fy, 1, 1), order=1, mode="nearest", grid_mode=True)
    segs = [ndimage.zoom(case.labels[t], (fx, fy, 1), order=0, mode="nearest", grid_mode=True)
            for t in (case.ed, case.es)]
    box = _centre_box(image.shape[:2], crop)
    image = _crop(image, box, crop)
    segs = [_crop(s, box, crop) for s in segs]
    lo, hi = np.percentile(image, percentiles)
    image = np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    image = image.transpose(3, 2, 0, 1).astype(np.float16)  # (T, Z, X, Y)
    seg = np.stack([s.transpose(2, 0, 1) for s in segs]).astype(np.uint8)  # (2, Z, X, Y)
    # what the grid lost: label voxels outside the crop (a heart off the image centre, a field of view too small)
    kept = [int((s > 0).sum()) for s in segs]
    total = [int((case.labels[t] > 0).sum() * fx * fy) for t in (case.ed, case.es)]
    meta = {"spacing_mm": [spacing_mm, spacing_mm, sz], "source_spacing_mm": [sx, sy, sz],
            "source_shape": list(case.image.shape), "crop_box": box,
            "label_fraction_in_crop": round(min(1.0, *(k / t if t else 1.0 for k, t in zip(kept, total))), 3)}
    return image, seg, meta


def _centre_box(shape: tuple[int, int], crop: int) -> list[int]:
    """[x0, y0] of a crop x crop window centred on the image (negative: padded)."""
    return [int(round((n - crop) / 2)) for n in shape]


def _crop(a: np.ndarray, box: list[int], crop: int) -> np.ndarray:
    out = np.zeros((crop, crop, *a.shape[2:]), a.dtype)
    if a.dtype != np.uint8:
        out[...] = a.min()  # pad with the background
    x0, y0 = box
    sx = slice(max(x0, 0), min(x0 + crop, a.shape[0]))
    sy = slice(max(y0, 0), min(y0 + crop, a.shape[1]))
    out[sx.start - x0:sx.stop - x0, sy.start - y0:sy.stop - y0] = a[sx, sy]
    return out


def discover(cfg: SaxJobConfig) -> tuple[list[WorkItem], list[str], dict]:
    if cfg.src is None:
        raise ConfigError("src is not set: the dataset as published (--src or src=...)")
    if cfg.layout is None:
        raise ConfigError("layout is not set: acdc or mnms (layout=acdc)")
    src = Path(cfg.src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source directory does not exist")
    extra: dict = {}
    info: dict[str, dict] = {}
    if cfg.layout == "acdc":
        cases, ignored = acdc.discover(src)
    else:
        cases, ignored = mnms.discover(src)
        csv_path = mnms.find_info_csv(src)
        if csv_path is None:
            raise ConfigError(f"{src}: no M&Ms dataset information CSV (a .csv with External code, ED and ES "
                              f"columns) under the source")
        extra["info_csv"] = str(csv_path)
        info = mnms.read_info(csv_path)  # read once; each case carries its own row
    files = acdc.case_files if cfg.layout == "acdc" else mnms.case_files
    items = [WorkItem(f"{cfg.layout}/{c['name']}", files(Path(c["dir"])),
                      {"dir": c["dir"], "info": {c["name"]: info[c["name"]]} if c["name"] in info else {}, **extra},
                      published=c["published"]) for c in cases]
    return items, ignored, extra


@dataclass
class SaxDataset:
    cfg: SaxJobConfig
    name: str = "sax"

    def arrays(self) -> dict[str, ArraySpec]:
        T, Z, S = self.cfg.max_frames, self.cfg.max_slices, self.cfg.crop
        return {"image": ArraySpec((S, S), "float16", (S, S), ragged=T * Z),  # images in (t, z) order
                "seg": ArraySpec((2, Z, S, S), "uint8", (1, 1, S, S), 0),
                "frames": ArraySpec((), "int16", (), 0),
                "slices": ArraySpec((), "int16", (), 0),
                "ed": ArraySpec((), "int16", (), -1),
                "es": ArraySpec((), "int16", (), -1),
                "spacing_mm": ArraySpec((3,), "float32", (3,), np.nan)}

    def process(self, item: WorkItem) -> SaxSample:
        d = Path(item.payload["dir"])
        if self.cfg.layout == "acdc":
            case = acdc.read_case(d, item.published)
        else:
            case = mnms.read_case(d, item.published, item.payload["info"], Path(item.payload["info_csv"]))
        T, Z = case.image.shape[3], case.image.shape[2]
        if T > self.cfg.max_frames or Z > self.cfg.max_slices:
            raise ValueError(f"{d}: {T} frames x {Z} slices exceed the store's capacity {self.cfg.max_frames} x "
                             f"{self.cfg.max_slices} (raise max_frames / max_slices)")
        image, seg, geometry = to_grid(case, self.cfg.crop, self.cfg.spacing_mm, self.cfg.percentiles)
        meta = {"dataset": case.dataset, "case": case.name, "published_split": case.published, "ed": case.ed,
                "es": case.es, "frames": T, "slices": Z, **geometry, **case.meta}
        return SaxSample(key=item.key, image=image, seg=seg, meta=meta)

    def rows(self, sample: SaxSample) -> dict[str, np.ndarray]:
        T, Z = sample.image.shape[:2]
        seg = np.zeros((2, self.cfg.max_slices, self.cfg.crop, self.cfg.crop), np.uint8)
        seg[:, :Z] = sample.seg
        return {"image": sample.image.reshape(T * Z, *sample.image.shape[2:]), "seg": seg,
                "frames": np.int16(T), "slices": np.int16(Z), "ed": np.int16(sample.meta["ed"]),
                "es": np.int16(sample.meta["es"]), "spacing_mm": np.asarray(sample.meta["spacing_mm"], np.float32)}


def run(cfg: SaxJobConfig, progress: bool = True):
    items, ignored, extra = discover(cfg)
    save_resolved_config(cfg, cfg.job.out, "sax_config.yaml")

    def manifest_extra(manifest: dict, results) -> dict:
        return {"source": str(cfg.src), "layout": cfg.layout, **extra,
                "ignored_files": sorted(set(manifest.get("ignored_files", [])) | set(ignored)),
                "geometry": {"crop": cfg.crop, "spacing_mm": cfg.spacing_mm}}

    report = run_job(SaxDataset(cfg), items, cfg.job, cfg, manifest_extra=manifest_extra, progress=progress,
                     split_scheme=SPLIT_SCHEME)
    return report, mean_input_bytes(items)


JOB_CONFIG = SaxJobConfig  # the CLI's config schema
