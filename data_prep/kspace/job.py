"""`python -m data_prep kspace`: raw multi-coil k-space (CMRxRecon / MMCMR-427K) -> shards + Zarr.

Inputs are `.mat` files under `--src` (every `*.mat` except sampling masks); each is one sequence keyed by its
place in the layout (`Cine/Center002/Siemens_30T_Vida/P003/cine_sax`). A file outside the layout, unreadable
or empty is quarantined with the reason. Splits: a patient's sequences share one split, and every (modality, view)
stratum is spread over train / val / test by the fractions (`SPLIT_SCHEME`; the manifest's `split_scheme` records
each patient's split and the per-stratum counts, and names a stratum a split lacks). In the Zarr store a
sequence's T x Z images are rows `image[image_offset : image_offset + frames * slices]` in (t, z) order — a ragged
layout, so memory and disk follow the real sizes — with `frames`, `slices`, `modality`, `views` and
`field_strength_t` alongside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from core.config import ConfigError, save_resolved_config
from core.format import KSpaceSample
from data_prep.engine import ArraySpec, JobConfig, WorkItem, mean_input_bytes, run_job
from data_prep.kspace.preprocess import MODALITIES, VIEWS, preprocess_kspace_file
from data_prep.kspace.source import parse_relpath, patient_key, sequence_key, stratum


@dataclass
class KSpaceJobConfig:
    src: Optional[Path] = None  # the raw k-space archive (required)
    size: int = 224  # MetaCLIP-CMR: images resized to 224 x 224
    keep_aspect: bool = False
    # CMRxRecon / MMCMR-427K acquire a 2x oversampled readout (512 samples for a 256-pixel field of view); the
    # central half of it is kept in image space. 1.0 for data saved without oversampling.
    readout_oversampling: float = 2.0
    max_frames: int = 32  # Zarr capacity per sequence; longer sequences are quarantined with the reason
    max_slices: int = 24
    fully_sampled_only: bool = True  # skip AccFactor (undersampled) folders
    job: JobConfig = field(default_factory=lambda: JobConfig(out=Path("data/kspace/converted"), block_size=64))

    def __post_init__(self) -> None:
        if not self.readout_oversampling >= 1.0:
            raise ValueError(f"readout_oversampling must be >= 1 (1: none, CMRxRecon: 2), got "
                             f"{self.readout_oversampling}")


def discover(src: Path, fully_sampled_only: bool = True) -> tuple[list[WorkItem], list[dict], list[str]]:
    if src is None:
        raise ConfigError("src is not set: the raw source directory (--src or src=...)")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source directory does not exist")
    items: dict[str, WorkItem] = {}
    skipped, ignored = [], []
    for path in sorted(src.rglob("*.mat")):
        rel = path.relative_to(src).as_posix()
        if path.name.endswith("_mask.mat") or "/Mask_Task" in f"/{rel}":
            ignored.append(rel)  # sampling masks, not images
            continue
        try:
            parsed = parse_relpath(rel)
        except ValueError as e:  # outside the layout: an input we cannot label, so quarantine it
            items[f"unparsed/{rel}"] = WorkItem(f"unparsed/{rel}", [str(path)], {"error": str(e)})
            continue
        if fully_sampled_only and parsed.get("sampling") not in (None, "FullSample"):
            ignored.append(rel)
            continue
        key = sequence_key(parsed)
        if key in items:
            skipped.append({"key": key, "reason": f"duplicate sequence: {rel} and {items[key].paths[0]}",
                            "files": [str(path)]})
            continue
        items[key] = WorkItem(key, [str(path)], {"relpath": rel}, group=patient_key(parsed),
                              stratum=stratum(str(parsed["modality"]), str(parsed["name"])))
    return list(items.values()), skipped, ignored


#: New k-space datasets: a patient's sequences share a split; each (modality, view) stratum is spread over the
#: splits by the fractions (data_prep.engine, "stratified"). Datasets converted before keep their hash split.
SPLIT_SCHEME = {"name": "stratified", "group_by": "patient: sources.kspace.patient_key ([split/][centre/scanner/]P###)",
                "stratify_by": "modality/view: sources.kspace.stratum (e.g. cine/sax, cine/2ch, t1map/sax)"}


@dataclass
class KSpaceDataset:
    cfg: KSpaceJobConfig
    name: str = "kspace"

    def arrays(self) -> dict[str, ArraySpec]:
        T, Z, S = self.cfg.max_frames, self.cfg.max_slices, self.cfg.size
        return {"image": ArraySpec((S, S), "float16", (S, S), ragged=T * Z),  # images in (t, z) order
                "frames": ArraySpec((), "int16", (), 0),
                "slices": ArraySpec((), "int16", (), 0),
                "modality": ArraySpec((), "int8", (), -1),
                "views": ArraySpec((Z,), "int8", (Z,), -1),
                "field_strength_t": ArraySpec((), "float32", (), np.nan)}

    def process(self, item: WorkItem) -> KSpaceSample:
        if item.payload.get("error"):
            raise ValueError(item.payload["error"])
        image, meta = preprocess_kspace_file(item.paths[0], item.payload["relpath"], self.cfg.size,
                                             keep_aspect=self.cfg.keep_aspect,
                                             readout_oversampling=self.cfg.readout_oversampling)
        T, Z = image.shape[:2]
        if T > self.cfg.max_frames or Z > self.cfg.max_slices:
            raise ValueError(f"{item.paths[0]}: {T} frames x {Z} slices exceed the store's capacity "
                             f"{self.cfg.max_frames} x {self.cfg.max_slices} (raise max_frames / max_slices)")
        return KSpaceSample(key=item.key, image=image, meta=meta)

    def rows(self, sample: KSpaceSample) -> dict[str, np.ndarray]:
        """The sample as fixed-shape Zarr rows (padded)."""
        T, Z = sample.image.shape[:2]
        image = sample.image.reshape(T * Z, *sample.image.shape[2:])
        views = np.full(self.cfg.max_slices, -1, np.int8)
        views[:Z] = [VIEWS.index(v) for v in sample.meta["views"]]
        return {"image": image, "frames": np.int16(T), "slices": np.int16(Z),
                "modality": np.int8(MODALITIES.index(sample.meta["modality_label"])), "views": views,
                "field_strength_t": np.float32(sample.meta["field_strength_t"] or np.nan)}


def run(cfg: KSpaceJobConfig, progress: bool = True):
    items, skipped, ignored = discover(cfg.src, cfg.fully_sampled_only)
    save_resolved_config(cfg, cfg.job.out, "kspace_config.yaml")

    def extra(manifest: dict, results) -> dict:
        return {"source": str(cfg.src), "ignored_files": sorted(set(manifest.get("ignored_files", [])) | set(ignored)),
                "vocabularies": {"modalities": list(MODALITIES), "views": list(VIEWS)}}

    report = run_job(KSpaceDataset(cfg), items, cfg.job, cfg, skipped=skipped, manifest_extra=extra, progress=progress,
                     split_scheme=SPLIT_SCHEME)
    src_bytes = mean_input_bytes(items)
    return report, src_bytes


JOB_CONFIG = KSpaceJobConfig  # the CLI's config schema
