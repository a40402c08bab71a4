"""`python -m data_prep ukb`: UK Biobank cine (NIfTI layout or raw DICOM zips) + tabular CSV -> shards + Zarr.

Inputs are subjects. A subject directory `<eid>/` (ukbb_cardiac NIfTI layout) or the zip pair
`<eid>_20209_2_0.zip` + `<eid>_20208_2_0.zip` (raw DICOM, imaging visit = instance 2) is one input; an eid
present in both layouts is converted once, from the NIfTI (it carries the segmentations), and the other copy is
counted as skipped. The tabular CSV is read once by the driver: each subject's raw feature vector (NaN where
missing) and disease labels travel with its work item; z-scoring and imputation use the training split's
statistics, versioned in the manifest and applied at load time, so growing the cohort never rewrites a shard.
The manifest's `geometry` and every sample's meta record the stored grid: `crop` pixels over `fov_mm`, i.e. the
stored pixel spacing (`preprocess_ukb` module doc).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from core.config import ConfigError, InputError, save_resolved_config
from core.format import UKBSample
from core.vocab import DISEASES, PHENOTYPES
from data_prep.engine import ArraySpec, JobConfig, WorkItem, mean_input_bytes, run_job
from data_prep.ukb.csv_export import read_ukb_csv
from data_prep.ukb.diseases import disease_table
from data_prep.ukb.feature_spec import DEFAULT_SPEC_PATH, load_feature_spec
from data_prep.ukb.features import extract_features, feature_schema, fit_stats
from data_prep.ukb.preprocess import UKBPreprocessConfig, preprocess
from data_prep.ukb.nifti import read_ukb_dicom_study, read_ukb_nifti_dir

_ZIP_RE = re.compile(r"^(\d+)_(20208|20209)_(\d+)_(\d+)\.zip$")


@dataclass
class UKBJobConfig:
    src: Optional[Path] = None  # the raw cine: ukbb_cardiac NIfTI folders or the bulk DICOM zips (required)
    tabular: Optional[Path] = None  # the UK Biobank CSV export; None: images only
    features: Optional[Path] = None  # the tabular feature spec; None: the project's (configs/data_prep/ukb_features.yaml)
    layout: Literal["auto", "nifti", "dicom"] = "auto"
    job: JobConfig = field(default_factory=lambda: JobConfig(out=Path("data/ukb/converted")))
    preprocess: UKBPreprocessConfig = field(default_factory=UKBPreprocessConfig)


def discover(src: Path, layout: str = "auto") -> tuple[list[WorkItem], list[dict], list[str]]:
    """-> work items (one per eid), skipped inputs (with reasons), ignored files (other visits, stray files)."""
    if src is None:
        raise ConfigError("src is not set: the raw source directory (--src or src=...)")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source directory does not exist")
    items: dict[str, WorkItem] = {}
    skipped, ignored = [], []
    if layout in ("auto", "nifti"):
        for d in sorted(p for p in src.iterdir() if p.is_dir() and p.name.isdigit()):
            items[d.name] = WorkItem(d.name, [str(d / f) for f in sorted(x.name for x in d.iterdir())],
                                     {"kind": "nifti", "dir": str(d)})
    if layout in ("auto", "dicom"):
        zips: dict[str, dict[str, Path]] = {}
        for z in sorted(src.glob("*.zip")):
            m = _ZIP_RE.match(z.name)
            if m is None or (m.group(3), m.group(4)) != ("2", "0"):
                ignored.append(str(z))  # other visits (instance 3 repeat imaging) or unknown names
                continue
            zips.setdefault(m.group(1), {})[m.group(2)] = z
        for eid, pair in sorted(zips.items()):
            files = [str(p) for p in pair.values()]
            if eid in items:
                skipped.append({"key": eid, "reason": "duplicate eid: also in the NIfTI layout", "files": files})
                continue
            items[eid] = WorkItem(eid, files, {"kind": "dicom", "sa": str(pair.get("20209", "")),
                                               "la": str(pair.get("20208", ""))})
    return list(items.values()), skipped, ignored


@dataclass
class UKBDataset:
    """The engine plug-in: how one subject becomes a UKBSample."""

    preprocess: UKBPreprocessConfig
    n_features: int
    name: str = "ukb"

    def arrays(self) -> dict[str, ArraySpec]:
        P, T, S = self.preprocess.sa_planes + 3, self.preprocess.frames, self.preprocess.crop
        return {"image": ArraySpec((P, T, S, S), "float16", (P, 1, S, S)),  # a chunk: one frame
                "seg": ArraySpec((P, T, S, S), "uint8", (P, 1, S, S)),
                "seg_valid": ArraySpec((P,), "bool", (P,), False),
                "tabular": ArraySpec((self.n_features,), "float32", (self.n_features,), np.nan),
                "diseases": ArraySpec((len(DISEASES),), "int8", (len(DISEASES),), -1),
                "phenotypes": ArraySpec((len(PHENOTYPES),), "float32", (len(PHENOTYPES),), np.nan)}

    def process(self, item: WorkItem) -> UKBSample:
        p = item.payload
        if p.get("error"):
            raise InputError(p["error"])
        if p["kind"] == "nifti":
            study = read_ukb_nifti_dir(p["dir"])
        else:
            missing = [f for f, z in (("20209 (short axis)", p["sa"]), ("20208 (long axis)", p["la"])) if not z]
            if missing:
                raise InputError(f"subject {item.key}: no {' or '.join(missing)} zip for instance 2")
            study = read_ukb_dicom_study(p["sa"], p["la"])
        image, seg, seg_valid, phenotypes, meta = preprocess(study, self.preprocess)
        tab = p.get("tabular")
        meta["tabular_row"] = tab is not None
        return UKBSample(key=item.key, image=image, seg=seg, seg_valid=seg_valid,
                         tabular=np.asarray(tab if tab is not None else np.full(self.n_features, np.nan), np.float32),
                         diseases=np.asarray(p.get("diseases", [-1] * len(DISEASES)), np.int8),
                         phenotypes=phenotypes, meta=meta)


def geometry(p: UKBPreprocessConfig) -> dict:
    """The stored grid, for the manifest: per-view values (source spacing, field of view) are in each sample's meta
    (`pixel_spacing_mm` = stored spacing, `source_pixel_spacing_mm`, `fov_mm`, `plane_affines`)."""
    return {"crop": p.crop, "fov_mm": p.fov_mm, "pixel_spacing_mm": p.fov_mm / p.crop if p.fov_mm else "source",
            "sa_planes": p.sa_planes, "sa_selection": p.sa_selection}


def run(cfg: UKBJobConfig, progress: bool = True):
    """Discover, attach tabular rows, convert on Ray, and version the training statistics in the manifest."""
    items, skipped, ignored = discover(cfg.src, cfg.layout)
    spec = load_feature_spec(cfg.features or DEFAULT_SPEC_PATH)
    save_resolved_config(cfg, cfg.job.out, "ukb_config.yaml")
    raw, eids, csv_info = None, [], {}
    if cfg.tabular is not None:
        df, report = read_ukb_csv(cfg.tabular, spec)
        raw = extract_features(df, spec)
        labels, names = disease_table(df, spec)
        eids = [str(e) for e in df.index]
        row_of = {e: i for i, e in enumerate(eids)}
        order = [names.index(d) for d in DISEASES]
        duplicates = {str(e) for e in report.duplicate_eids}
        for it in items:
            if it.key in duplicates:
                it.payload["error"] = f"{cfg.tabular}: several rows for eid {it.key}; cannot tell which is right"
            elif it.key in row_of:
                i = row_of[it.key]
                it.payload["tabular"] = raw[i].astype(np.float32)
                it.payload["diseases"] = labels[i, order].astype(np.int8)
        keys = {it.key for it in items}
        csv_info = {"path": str(cfg.tabular), "errors": report.errors(),
                    "imaging_without_csv_row": sorted(k for k in keys if k not in row_of),
                    "csv_rows_without_imaging": sorted(e for e in eids if e not in keys)}

    def extra(manifest: dict, results) -> dict:
        tab = dict(manifest.get("tabular", {}))
        tab["features"] = feature_schema(spec)
        tab["diseases"] = list(DISEASES)
        if csv_info:
            tab["csv"] = csv_info
        if raw is not None:  # statistics of every training subject in the dataset, from this CSV
            train = {k for b in manifest["blocks"] if b["split"] == "train" for k in b["keys"]}
            mask = np.array([e in train for e in eids])
            stats = fit_stats(raw, spec, mask, eids).to_dict()
            versions = dict(tab.get("stats", {}))
            versions.setdefault(stats["version"], stats)
            tab["stats"], tab["current_stats"] = versions, stats["version"]
        return {"tabular": tab, "source": str(cfg.src), "ignored_files": sorted(set(ignored)),
                "geometry": geometry(cfg.preprocess)}

    dataset = UKBDataset(cfg.preprocess, len(spec.features))
    report = run_job(dataset, items, cfg.job, cfg, skipped=skipped, manifest_extra=extra, progress=progress)
    src_bytes = mean_input_bytes(items)
    return report, src_bytes


JOB_CONFIG = UKBJobConfig  # the CLI's config schema
