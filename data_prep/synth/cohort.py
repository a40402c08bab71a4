"""`python -m data_prep synth`: a synthetic cohort written exactly as the real sources deliver it.

    DIR/ukb/<eid>/{sa,la_2ch,la_3ch,la_4ch,seg_sa,seg_la_2ch,seg_la_4ch}.nii.gz   ukbb_cardiac NIfTI layout
    DIR/ukb_dicom/<eid>_20209_2_0.zip, <eid>_20208_2_0.zip                    raw UK Biobank DICOM (--dicom)
    DIR/ukb_tabular.csv                                                        UK Biobank export conventions
    DIR/kspace/MultiCoil/<Modality>/TrainingSet/FullSample/...                 CMRxRecon / MMCMR-427K k-space
    DIR/truth.csv, DIR/kspace_truth.csv                                        generator ground truth
    DIR/synth_config.yaml                                                      the resolved config

Every subject and scan draws from its own seeded stream (cohort seed, eid, purpose), so the output is
byte-identical for a seed whatever the worker count; every file is written to a temp name and renamed.
"""

from __future__ import annotations

import csv
import io
import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import yaml
from tqdm import tqdm

from core.config import ConfigError, config_to_dict, save_resolved_config
from core.fsutil import atomic_path, atomic_write_text, dir_bytes
from core.vocab import DISEASES
from data_prep.ukb.phenotypes import PHENOTYPES, measure_phenotypes
from data_prep.synth import kspace as ksp
from data_prep.synth import sax_datasets as sax
from data_prep.synth.heart import (LA_THICKNESS_MM, N_FRAMES, SA_SPACING_MM, SA_THICKNESS_MM, HeartModel,
                                   plane_labels)
from data_prep.synth.physiology import Subject, cohort_eids, sample_subject, subject_rng
from data_prep.synth.tabular import tabular_row, write_tabular_csv
from data_prep.synth.ukb_dicom import CinePlane, write_ukb_dicom_zip

# per-subject random streams
_PHYSIOLOGY, _ANATOMY, _IMAGING, _TABULAR = range(4)
LA_DICOM_NAMES = {"la_2ch": "CINE_segmented_LAX_2Ch", "la_3ch": "CINE_segmented_LAX_3Ch",
                  "la_4ch": "CINE_segmented_LAX_4Ch"}


@dataclass
class SynthConfig:
    out: Path = Path("data/synth")
    subjects: int = 64
    kspace_scans: int = 32
    seed: int = 0
    dicom: bool = False  # also write the raw UK Biobank DICOM zips (same pixels as the NIfTI)
    prevalence_scale: float = 1.0  # >1 enriches rare diseases (small demo cohorts)
    kspace_format: Literal["v73", "v5", "mixed"] = "v73"  # MATLAB v7.3 (HDF5) and/or v5 (CMRxRecon 2023)
    kspace_size_scale: float = 1.0
    # k-space written as CMRxRecon / MMCMR-427K store it: the readout 2x oversampled (the converter's
    # readout_oversampling removes it); 1 writes the image's field of view only
    kspace_readout_oversampling: int = 2
    # cine short-axis segmentation cases in the layouts ACDC and M&Ms publish (`sax_datasets`), from the same hearts
    acdc: int = 0
    mnms: int = 0
    sax_size_scale: float = 1.0  # in-plane resolution scale of those cases (0.25: quarter-size images for tests)
    workers: int = 0  # 0: one per core

    def __post_init__(self):
        if min(self.subjects, self.kspace_scans, self.acdc, self.mnms) < 0:
            raise ValueError("subjects, kspace_scans, acdc and mnms must be >= 0")
        if min(self.prevalence_scale, self.kspace_size_scale, self.sax_size_scale) <= 0:
            raise ValueError("prevalence_scale, kspace_size_scale and sax_size_scale must be > 0")
        if self.kspace_readout_oversampling < 1:
            raise ValueError(f"kspace_readout_oversampling must be >= 1, got {self.kspace_readout_oversampling}")


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, frame_interval_ms: float) -> None:
    """NIfTI-1 as ukbb_cardiac writes it: scanner (RAS) qform and sform, frame interval in pixdim[4] (ms)."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "msec")
    img.header["pixdim"][4] = frame_interval_ms
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def make_subject(cfg: SynthConfig, eid: int) -> tuple[dict, dict]:
    """Render, write and measure one subject; returns its truth row and its tabular row."""
    subject = sample_subject(eid, subject_rng(cfg.seed, eid, _PHYSIOLOGY), cfg.prevalence_scale)
    heart = HeartModel(subject, subject_rng(cfg.seed, eid, _ANATOMY))
    rng = subject_rng(cfg.seed, eid, _IMAGING)
    planes = heart.planes(rng)
    dt = 60000.0 / subject.heart_rate_bpm / N_FRAMES
    out = Path(cfg.out) / "ukb" / str(eid)
    out.mkdir(parents=True, exist_ok=True)
    pixels, segs = {}, {}
    for name, plane in planes.items():
        codes, pixels[name] = heart.render(plane, rng)
        write_nifti(out / f"{name}.nii.gz", pixels[name].astype(np.int16), plane.affine, dt)
        seg = plane_labels(name, codes)
        if seg is not None:
            segs[name] = seg
            write_nifti(out / f"seg_{name}.nii.gz", seg, plane.affine, dt)
    if cfg.dicom:
        _write_dicom(cfg, subject, planes, pixels, dt)
    ph = measure_phenotypes(segs["sa"], planes["sa"].affine, segs["la_2ch"], planes["la_2ch"].affine,
                            segs["la_4ch"], planes["la_4ch"].affine, subject.heart_rate_bpm)
    truth = {"eid": eid, **{d: int(getattr(subject, d)) for d in DISEASES}, **ph}
    return truth, tabular_row(subject, ph, subject_rng(cfg.seed, eid, _TABULAR))


def _write_dicom(cfg: SynthConfig, subject: Subject, planes, pixels, dt: float) -> None:
    ddir = Path(cfg.out) / "ukb_dicom"
    ddir.mkdir(parents=True, exist_ok=True)
    sa, A = pixels["sa"], planes["sa"].affine
    sax = []
    for k in range(sa.shape[2]):
        Ak = A.copy()
        Ak[:3, 3] = (A @ np.array([0, 0, k, 1.0]))[:3]
        sax.append(CinePlane(f"CINE_segmented_SAX_b{k + 1}", sa[:, :, k, :], Ak, SA_THICKNESS_MM, dt,
                             spacing_between_slices_mm=SA_SPACING_MM))
    lax = [CinePlane(LA_DICOM_NAMES[n], pixels[n][:, :, 0, :], planes[n].affine, LA_THICKNESS_MM, dt)
           for n in ("la_2ch", "la_3ch", "la_4ch")]
    patient = {"PatientSex": "M" if subject.sex else "F", "PatientAge": f"{int(subject.age):03d}Y",
               "PatientSize": round(subject.height_cm / 100, 2), "PatientWeight": round(subject.weight_kg, 1)}
    eid = subject.eid
    write_ukb_dicom_zip(ddir / f"{eid}_20209_2_0.zip", eid, 20209, sax, seed=cfg.seed, patient=patient,
                        add_inline_vf=True)
    write_ukb_dicom_zip(ddir / f"{eid}_20208_2_0.zip", eid, 20208, lax, seed=cfg.seed, patient=patient)


def _kspace_format(cfg: SynthConfig, scan: ksp.KSpaceScan) -> str:
    if cfg.kspace_format == "mixed":  # deterministic: every third file is an old-style v5 MAT-file
        return "v5" if scan.index % 3 == 2 else "v73"
    return cfg.kspace_format


def _task(args):
    cfg, kind, item = args
    if kind == "subject":
        return kind, make_subject(cfg, item)
    if kind == "acdc":
        return kind, sax.write_acdc_case(Path(cfg.out) / "acdc", item, cfg.acdc, cfg.seed, cfg.sax_size_scale)
    if kind == "mnms":
        return kind, sax.write_mnms_case(Path(cfg.out) / "mnms", item, cfg.mnms, cfg.seed, cfg.sax_size_scale)
    return kind, ksp.write_scan(Path(cfg.out) / "kspace", item, _kspace_format(cfg, item))


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def generate(cfg: SynthConfig, progress: bool = True) -> dict:
    """Write the whole cohort; returns the summary dict that `format_summary` prints."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    done = out / "synth_config.yaml"  # written last: its presence means the cohort is complete
    if done.exists():
        same = {**yaml.safe_load(done.read_text()), "workers": cfg.workers} == config_to_dict(cfg)
        if not same:
            raise ConfigError(f"{out} holds a complete cohort made with another config ({done}); "
                             "choose another --out or delete it")
        return _summary(cfg, _read_rows(out / "truth.csv"), _read_rows(out / "kspace_truth.csv"), 0.0, cached=True)
    out.mkdir(parents=True, exist_ok=True)
    eids = cohort_eids(cfg.subjects, cfg.seed)
    scans = ksp.plan_kspace_scans(cfg.kspace_scans, cfg.seed, cfg.kspace_size_scale, cfg.kspace_readout_oversampling)
    tasks = ([(cfg, "subject", e) for e in eids] + [(cfg, "kspace", s) for s in scans]
             + [(cfg, "acdc", i) for i in range(cfg.acdc)] + [(cfg, "mnms", i) for i in range(cfg.mnms)])
    workers = cfg.workers or os.cpu_count() or 1
    truths, tab_rows, scan_rows, sax_rows, mnms_info = [], [], [], [], []
    bar = tqdm(total=len(tasks), desc="synth", unit="item", disable=not progress, mininterval=1.0)
    with (mp.get_context("fork").Pool(min(workers, max(len(tasks), 1))) if workers > 1 else _Serial()) as pool:
        for kind, result in pool.imap_unordered(_task, tasks):
            if kind == "subject":
                truths.append(result[0])
                tab_rows.append(result[1])
            elif kind == "acdc":
                sax_rows.append(result)
            elif kind == "mnms":
                sax_rows.append(result[0])
                mnms_info.append(result[1])
            else:
                scan_rows.append(result)
            bar.update()
            bar.set_postfix(subjects=len(truths), scans=len(scan_rows), refresh=False)
    bar.close()
    truths.sort(key=lambda r: r["eid"])
    tab_rows.sort(key=lambda r: r["eid"])
    scan_rows.sort(key=lambda r: r["relpath"])
    if eids:
        _write_csv(out / "truth.csv", truths, ["eid", *DISEASES, *PHENOTYPES])
        write_tabular_csv(out / "ukb_tabular.csv", tab_rows, cfg.seed)
    if scans:
        _write_csv(out / "kspace_truth.csv", scan_rows, list(scan_rows[0].keys()))
    if mnms_info:
        sax.write_mnms_csv(out / "mnms", mnms_info)
    if sax_rows:
        sax_rows.sort(key=lambda r: (r["dataset"], r["case"]))
        _write_csv(out / "sax_truth.csv", sax_rows, list(sax_rows[0].keys()))
    save_resolved_config(cfg, out, "synth_config.yaml")
    return _summary(cfg, truths, scan_rows, time.perf_counter() - t0)


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k in DISEASES or k == "eid" else float(v) if k in PHENOTYPES else v) for k, v in r.items()}
            for r in rows]


class _Serial:
    """Pool stand-in for workers=1: same code path, no processes."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(fn, items):
        return map(fn, items)


def _summary(cfg: SynthConfig, truths: list[dict], scans: list[dict], seconds: float, cached: bool = False) -> dict:
    out = Path(cfg.out)
    s = {"out": str(out), "subjects": len(truths), "kspace_scans": len(scans), "seconds": seconds, "cached": cached,
         "acdc": cfg.acdc, "mnms": cfg.mnms,
         "bytes": {k: dir_bytes(out / k) for k in ("ukb", "ukb_dicom", "kspace", "acdc", "mnms")}}
    s["prevalence"] = {d: float(np.mean([t[d] for t in truths])) if truths else math.nan for d in DISEASES}
    s["phenotypes"] = {p: (float(np.mean([t[p] for t in truths])), float(np.std([t[p] for t in truths])))
                       for p in PHENOTYPES} if truths else {}
    mods: dict[str, int] = {}
    for r in scans:
        mods[r["name"]] = mods.get(r["name"], 0) + 1
    s["kspace_files"] = mods
    return s


def format_summary(s: dict) -> str:
    mb = {k: v / 2**20 for k, v in s["bytes"].items()}
    timing = ("already complete with this config: nothing to do" if s["cached"] else
              f"{s['seconds']:.1f} s, {s['subjects'] / max(s['seconds'], 1e-9):.2f} subjects/s")
    lines = [f"Synthetic cohort in {s['out']}  ({timing})",
             f"  UK Biobank subjects : {s['subjects']}   NIfTI {mb['ukb']:.1f} MiB   DICOM {mb['ukb_dicom']:.1f} MiB",
             f"  k-space scans       : {s['kspace_scans']}   {mb['kspace']:.1f} MiB   "
             + ", ".join(f"{k} {v}" for k, v in sorted(s["kspace_files"].items()))]
    if s.get("acdc") or s.get("mnms"):
        lines.append(f"  cine SAX segmentation: ACDC layout {s['acdc']} cases {mb['acdc']:.1f} MiB, M&Ms layout "
                     f"{s['mnms']} cases {mb['mnms']:.1f} MiB")
    if s["subjects"]:
        lines.append("  prevalence          : " + ", ".join(f"{d} {100 * p:.0f}%" for d, p in s["prevalence"].items()))
        ph = s["phenotypes"]
        lines.append("  phenotypes mean±sd  : " + ", ".join(
            f"{k} {ph[k][0]:.0f}±{ph[k][1]:.0f}" for k in ("LVEDV", "LVEF", "LVM", "RVEDV", "RVEF", "LAVmax", "RAVmax")))
        lines.append("  (UK Biobank reference: LVEDV ~140±30 mL, LVEF ~56-61 %, LVM ~90±20 g, RVEDV ~150±35 mL)")
    return "\n".join(lines)
