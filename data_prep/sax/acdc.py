"""ACDC as published (Bernard et al. 2018): `database/{training,testing}/patientNNN/` with `Info.cfg` (ED, ES as
1-based frames, Group, Height, NbFrame, Weight), `patientNNN_4d.nii.gz` and, at ED and ES,
`patientNNN_frameFF.nii.gz` + `patientNNN_frameFF_gt.nii.gz` (labels 1 RV, 2 MYO, 3 LV)."""

from __future__ import annotations

from pathlib import Path

from data_prep.sax.case import CaseError, SaxCase, check_frames, load_volume, map_labels

SPLIT_DIRS = {"training": "train", "testing": "test"}


def discover(src: Path) -> tuple[list[dict], list[str]]:
    """Every case folder (one with an Info.cfg) under `src`: [{"name", "dir", "published"}], and the Info.cfg files
    outside training/ or testing/ (not a published case: ignored)."""
    cases, ignored = [], []
    for info in sorted(Path(src).rglob("Info.cfg")):
        split = SPLIT_DIRS.get(info.parent.parent.name)
        if split is None:
            ignored.append(str(info))
            continue
        cases.append({"name": info.parent.name, "dir": str(info.parent), "published": split})
    return cases, ignored


def parse_info(path: Path) -> dict:
    """Info.cfg: `Key: value` lines; ED, ES and NbFrame are required integers."""
    info = {}
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise CaseError(f"{path}: line {n} is not 'Key: value': {line[:80]!r}")
        info[key.strip()] = value.strip()
    for key in ("ED", "ES", "NbFrame"):
        if key not in info:
            raise CaseError(f"{path}: no {key}")
        try:
            info[key] = int(float(info[key]))
        except ValueError:
            raise CaseError(f"{path}: {key} is not a number: {info[key]!r}") from None
    for key in ("Height", "Weight"):
        try:
            info[key] = float(info[key]) if key in info else None
        except ValueError:
            info[key] = None
    return info


def read_case(case_dir: Path, published: str) -> SaxCase:
    d = Path(case_dir)
    name = d.name
    info_path = d / "Info.cfg"
    info = parse_info(info_path)
    image, zooms = load_volume(d / f"{name}_4d.nii.gz", 4)
    T = image.shape[3]
    if T != info["NbFrame"]:
        raise CaseError(f"{d / f'{name}_4d.nii.gz'}: {T} frames, but {info_path} says NbFrame {info['NbFrame']}")
    ed, es = info["ED"] - 1, info["ES"] - 1  # 1-based in Info.cfg and the file names
    check_frames(info_path, T, ed, es)
    labels = {}
    for t in dict.fromkeys((ed, es)):
        gt_path = d / f"{name}_frame{t + 1:02d}_gt.nii.gz"
        if not gt_path.is_file():
            raise CaseError(f"{gt_path}: missing (the ground truth of frame {t + 1}, "
                            f"{'ED' if t == ed else 'ES'} in {info_path})")
        gt, _ = load_volume(gt_path, 3)
        if gt.shape != image.shape[:3]:
            raise CaseError(f"{gt_path}: shape {gt.shape} differs from the cine's {image.shape[:3]}")
        labels[t] = map_labels(gt, "acdc", gt_path)
    meta = {"group": info.get("Group"), "height_cm": info.get("Height"), "weight_kg": info.get("Weight"),
            "nb_frames": info["NbFrame"]}
    return SaxCase("acdc", name, published, image, labels, zooms, ed, es, meta)


def case_files(case_dir: Path) -> list[str]:
    """The files a case is read from (fingerprinted by the conversion engine; named in quarantine records)."""
    d = Path(case_dir)
    return sorted(str(p) for p in d.iterdir() if p.is_file() and (p.name == "Info.cfg" or p.name.endswith(".nii.gz")))

