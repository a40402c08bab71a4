"""M&Ms as published (Campello et al. 2021): `OpenDataset/Training/Labeled/<code>/`, `Testing/<code>/` (and
`Validation/`, `Training/Unlabeled/`) with `<code>_sa.nii.gz` (the 4D cine) and `<code>_sa_gt.nii.gz` (labels
1 LV, 2 MYO, 3 RV at the ED and ES frames only), and the dataset information CSV (`External code`, `VendorName`,
`Vendor`, `Centre`, `ED`, `ES` as 0-based frames, ...). The paper's protocol (MetaCLIP-CMR Table 3: 150 training and
136 test cases) uses Training/Labeled and Testing; Validation and the unlabelled cases are not converted (listed as
ignored)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from data_prep.sax.case import CaseError, SaxCase, check_frames, load_volume, map_labels

SPLIT_DIRS = {("Training", "Labeled"): "train", ("Testing",): "test"}


def _published(rel_parts: tuple[str, ...]) -> Optional[str]:
    for prefix, split in SPLIT_DIRS.items():
        if rel_parts[:len(prefix)] == prefix:
            return split
    return None


def find_info_csv(src: Path) -> Optional[Path]:
    """The dataset information CSV: a .csv under `src` whose header has `External code`, `ED` and `ES`."""
    for p in sorted(Path(src).rglob("*.csv")):
        try:
            with open(p, newline="", encoding="utf-8-sig") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError):
            continue
        if {"External code", "ED", "ES"} <= {h.strip() for h in header}:
            return p
    return None


def read_info(path: Path) -> dict[str, dict]:
    """code -> its CSV row (stripped strings); a code listed twice is an error naming the file."""
    rows: dict[str, dict] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            code = row.get("External code", "")
            if not code:
                continue
            if code in rows:
                raise CaseError(f"{path}: case {code} is listed twice")
            rows[code] = row
    return rows


def discover(src: Path) -> tuple[list[dict], list[str]]:
    """Every `<code>_sa.nii.gz` under `src` in a published split: [{"name", "dir", "published"}], and the ones in
    the splits the protocol does not use (ignored)."""
    src = Path(src)
    cases, ignored = [], []
    for img in sorted(src.rglob("*_sa.nii.gz")):
        rel = img.relative_to(src).parts
        # the layout's root may be src itself or its OpenDataset/ folder
        parts = rel[1:] if rel and rel[0] == "OpenDataset" else rel
        split = _published(parts)
        if split is None:
            ignored.append(str(img))
            continue
        cases.append({"name": img.name[: -len("_sa.nii.gz")], "dir": str(img.parent), "published": split})
    return cases, ignored


def read_case(case_dir: Path, published: str, info: dict[str, dict], info_path: Path) -> SaxCase:
    d = Path(case_dir)
    code = d.name
    row = info.get(code)
    if row is None:
        raise CaseError(f"{d}: case {code} has no row in {info_path}")
    try:
        ed, es = int(float(row["ED"])), int(float(row["ES"]))
    except (KeyError, ValueError):
        raise CaseError(f"{info_path}: case {code}: ED / ES are not frame numbers ({row.get('ED')!r}, "
                        f"{row.get('ES')!r})") from None
    image, zooms = load_volume(d / f"{code}_sa.nii.gz", 4)
    gt_path = d / f"{code}_sa_gt.nii.gz"
    if not gt_path.is_file():
        raise CaseError(f"{gt_path}: missing (the ground truth of a labelled case)")
    gt, _ = load_volume(gt_path, 4)
    if gt.shape != image.shape:
        raise CaseError(f"{gt_path}: shape {gt.shape} differs from the cine's {image.shape}")
    check_frames(info_path, image.shape[3], ed, es)
    labels = {}
    for t in dict.fromkeys((ed, es)):
        frame = gt[..., t]
        if not frame.any():
            raise CaseError(f"{gt_path}: frame {t} ({'ED' if t == ed else 'ES'} in {info_path}) has no labels")
        labels[t] = map_labels(frame, "mnms", gt_path)
    meta = {"vendor": row.get("Vendor"), "vendor_name": row.get("VendorName"), "centre": row.get("Centre"),
            "group": row.get("Pathology"), "height_cm": _float(row.get("Height")),
            "weight_kg": _float(row.get("Weight"))}
    return SaxCase("mnms", code, published, image, labels, zooms, ed, es, meta)


def _float(v: Optional[str]) -> Optional[float]:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def case_files(case_dir: Path) -> list[str]:
    d = Path(case_dir)
    return sorted(str(p) for p in d.iterdir() if p.is_file() and p.name.endswith(".nii.gz"))
