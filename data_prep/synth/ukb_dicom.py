"""Write synthetic cine CMR as UK Biobank-style raw DICOM zips (fields 20209 short axis, 20208 long axis).

A real UK Biobank bulk file ``<eid>_20209_2_0.zip`` holds one DICOM file per cine frame per series, in no
particular order, plus a ``manifest.csv`` whose header is spelled as UK Biobank spells it
(``filename,patientid,studyid,aet,host,date,time,series discription``). The short-axis zip has one series per
slice (``CINE_segmented_SAX_b1`` = most basal ... ``_b<N>``) and usually a derived ``CINE_segmented_SAX_InlineVF``
series that converters must skip; the long-axis zip ``<eid>_20208_2_0.zip`` has ``CINE_segmented_LAX_2Ch``,
``_3Ch`` and ``_4Ch``. This module reproduces that layout from planes rendered by the synthetic cohort.

Geometry convention (shared with the NIfTI writer and ``data_prep.ukb.dicom``): a plane is an integer
array ``vol[x, y, t]`` (x = DICOM column index, y = DICOM row index, so ``ds.pixel_array == vol[:, :, t].T``) with
a NIfTI affine ``A`` (RAS+, mm) mapping voxel ``(x, y, k)`` to RAS. DICOM is LPS; with ``F = diag(-1, -1, 1)``:

* ImageOrientationPatient = ``[F @ A[:3,0] / |A[:3,0]|, F @ A[:3,1] / |A[:3,1]|]``
* PixelSpacing = ``[|A[:3,1]|, |A[:3,0]|]`` (row spacing first)
* ImagePositionPatient = ``F @ A[:3,3]`` (centre of the first transmitted pixel).

For a short-axis stack, pass one plane per slice whose affine is the stack affine shifted to that slice
(``A_k = A @ translate(0, 0, k)``), so ``A_k[:3, 3] = (A @ [0, 0, k, 1])[:3]``. For a single plane the reader
rebuilds ``A[:3, 2]`` as ``SliceThickness * unit(cross(A[:3,0], A[:3,1]))``; give the planes that third column if
you want an exact round trip.

Output is deterministic: UIDs are hashed from ``(seed, eid, field, series, frame)``, members are stored in a
seeded shuffled order with constant timestamps, so the same inputs and seed give a byte-identical zip.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.datadict import keyword_dict
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from core.fsutil import atomic_path

__all__ = [
    "CinePlane",
    "write_ukb_dicom_zip",
    "MANIFEST_NAME",
    "MANIFEST_COLUMNS",
    "INLINE_VF_DESCRIPTION",
    "ukb_zip_name",
]

MANIFEST_NAME = "manifest.csv"
# Spelled exactly as in the real UK Biobank manifests (including "discription").
MANIFEST_COLUMNS = ("filename", "patientid", "studyid", "aet", "host", "date", "time", "series discription")
INLINE_VF_DESCRIPTION = "CINE_segmented_SAX_InlineVF"
FIELD_SA = 20209
FIELD_LA = 20208

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)
_ZIP_DATE_TIME = (2020, 1, 1, 0, 0, 0)  # constant member timestamps -> reproducible bytes
_FILE_NAME_ROOT = "1.3.12.2.1107.5.2.18"  # looks like the real (Siemens-rooted) member names; names only
_IMPLEMENTATION_UID = generate_uid(entropy_srcs=["cmrfm", "synth", "ukb_dicom", "implementation"])  # fixed
_IMPLEMENTATION_VERSION = "CMRFM_SYNTH_1"
_MAX_VALUE = 4095  # BitsStored 12


@dataclass
class CinePlane:
    """One cine series: ``pixels[x, y, t]`` (ints in 0..4095) and its RAS voxel->mm affine."""

    description: str  # e.g. "CINE_segmented_SAX_b3", "CINE_segmented_LAX_4Ch"
    pixels: np.ndarray  # (X, Y, T) integer
    affine: np.ndarray  # (4, 4) RAS+
    slice_thickness_mm: float
    frame_interval_ms: float
    # Written as SpacingBetweenSlices when given (informational; readers use the positions).
    spacing_between_slices_mm: float | None = None


def ukb_zip_name(eid: int, field: int, instance: int = 2, array: int = 0) -> str:
    """Bulk-file name as UK Biobank ships it, e.g. ``1234567_20209_2_0.zip``."""
    return f"{int(eid)}_{int(field)}_{int(instance)}_{int(array)}.zip"


# --------------------------------------------------------------------------------------------- helpers


def _ds(x: float) -> str:
    return format_number_as_ds(float(x))


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "cmrfm/data_prep/synth/ukb_dicom")


def _uid(*parts: Any) -> str:
    # "2.25.<uuid-int>" UIDs (DICOM PS3.5 B.2: no registered root needed) from a name-based (v5) UUID, so
    # they are deterministic in ``parts``. (pydicom's generate_uid(prefix=None) ignores entropy_srcs.)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(str(p) for p in parts)).int}"


def _file_name(sop_uid: str) -> str:
    digest = int.from_bytes(hashlib.sha256(sop_uid.encode()).digest()[:16], "big")
    digits = str(digest).rjust(39, "0")
    return f"{_FILE_NAME_ROOT}.{int(digits[:5]) + 30000}.{digits[5:33]}.dcm"


def _da(day_offset: int) -> str:
    d = np.datetime64("2014-05-01") + np.timedelta64(int(day_offset), "D")
    return str(d).replace("-", "")


def _tm(seconds: float) -> str:
    seconds = float(seconds) % 86400.0
    h = int(seconds // 3600)
    m = int((seconds % 3600) // 60)
    s = seconds - 3600 * h - 60 * m
    return f"{h:02d}{m:02d}{s:09.6f}"


@dataclass
class _Geometry:
    iop: list[str]
    ipp: list[str]
    pixel_spacing: list[str]
    slice_location: str


def _geometry(affine: np.ndarray, what: str) -> _Geometry:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: affine must be a finite 4x4 array, got shape {a.shape}")
    c0, c1 = a[:3, 0], a[:3, 1]
    n0, n1 = float(np.linalg.norm(c0)), float(np.linalg.norm(c1))
    if n0 <= 0 or n1 <= 0:
        raise ValueError(f"{what}: affine has a zero in-plane axis")
    row, col = _LPS @ (c0 / n0), _LPS @ (c1 / n1)
    if abs(float(row @ col)) > 1e-4:
        raise ValueError(
            f"{what}: in-plane axes of the affine are not orthogonal (cos = {row @ col:.2e}); "
            "DICOM ImageOrientationPatient cannot represent a sheared plane"
        )
    ipp = _LPS @ a[:3, 3]
    normal = np.cross(row, col)
    return _Geometry(
        iop=[_ds(v) for v in (*row, *col)],
        ipp=[_ds(v) for v in ipp],
        pixel_spacing=[_ds(n1), _ds(n0)],  # [between rows, between columns]
        slice_location=_ds(float(ipp @ normal)),
    )


def _check_plane(plane: CinePlane, what: str) -> np.ndarray:
    px = np.asarray(plane.pixels)
    if px.ndim != 3:
        raise ValueError(f"{what}: pixels must be (X, Y, T), got shape {px.shape}")
    if not np.issubdtype(px.dtype, np.integer):
        raise ValueError(f"{what}: pixels must be integers, got {px.dtype}")
    if min(px.shape) < 1:
        raise ValueError(f"{what}: empty pixels {px.shape}")
    lo, hi = int(px.min()), int(px.max())
    if lo < 0 or hi > _MAX_VALUE:
        raise ValueError(f"{what}: pixel values must lie in 0..{_MAX_VALUE} (12 bit), got {lo}..{hi}")
    if not (plane.slice_thickness_mm > 0 and plane.frame_interval_ms > 0):
        raise ValueError(f"{what}: slice_thickness_mm and frame_interval_ms must be > 0")
    return px


def _window(px: np.ndarray) -> tuple[str, str]:
    lo, hi = np.percentile(px, [0.5, 99.5])
    width = max(float(hi - lo), 1.0)
    return _ds(round((float(hi) + float(lo)) / 2.0)), _ds(round(width))


# ---------------------------------------------------------------------------------------------- writer


@dataclass
class _Frame:
    name: str
    data: bytes
    manifest_row: tuple[str, ...]


def _frames_for_series(
    *,
    plane: CinePlane,
    px: np.ndarray,
    series_index: int,
    series_number: int,
    derived: bool,
    common: dict[str, Any],
    eid: int,
    field: int,
    seed: int,
    series_start_s: float,
    cardiac_number_of_images: int,
) -> list[_Frame]:
    what = f"series {plane.description!r}"
    geo = _geometry(plane.affine, what)
    nx, ny, nt = px.shape
    wc, ww = _window(px)
    series_uid = _uid("cmrfm-ukb", seed, eid, field, "series", series_index, plane.description)
    spacing = plane.spacing_between_slices_mm
    # One dataset per series; only the per-frame elements change inside the loop (pydicom's
    # element construction dominates the writing time otherwise).
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2"  # per frame below
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = (
        ["DERIVED", "PRIMARY", "M", "ND", "NORM"] if derived else ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"]
    )
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = "1.2"  # per frame below
    ds.StudyDate = common["StudyDate"]
    ds.SeriesDate = common["StudyDate"]
    ds.AcquisitionDate = common["StudyDate"]
    ds.ContentDate = common["StudyDate"]
    ds.StudyTime = common["StudyTime"]
    ds.SeriesTime = _tm(series_start_s)
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.InstitutionName = "UK Biobank Imaging Centre"
    ds.ReferringPhysicianName = ""
    ds.StationName = "AWP" + str(common["station"])
    ds.StudyDescription = "CMR_2D_cine_bSSFP"
    ds.SeriesDescription = plane.description
    ds.ManufacturerModelName = "AERA"
    ds.PatientName = str(eid)
    ds.PatientID = str(eid)
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    for key, value in common["patient"].items():
        setattr(ds, key, value)
    ds.BodyPartExamined = "HEART"
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = ["SK", "SS"]
    ds.ScanOptions = "CG"
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "*tfi2d1_12"
    ds.SliceThickness = _ds(plane.slice_thickness_mm)
    if spacing is not None:
        ds.SpacingBetweenSlices = _ds(spacing)
    ds.RepetitionTime = _ds(2.8)
    ds.EchoTime = _ds(1.19)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = _ds(63.67)
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = _ds(1.5)
    ds.FlipAngle = _ds(80)
    ds.NominalInterval = str(int(round(nt * float(plane.frame_interval_ms))))
    ds.CardiacNumberOfImages = str(int(cardiac_number_of_images))
    ds.HeartRate = str(int(round(60000.0 / (nt * float(plane.frame_interval_ms)))))
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = common["StudyInstanceUID"]
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = common["StudyID"]
    ds.SeriesNumber = str(series_number)
    ds.AcquisitionNumber = "1"
    ds.ImagePositionPatient = geo.ipp
    ds.ImageOrientationPatient = geo.iop
    ds.FrameOfReferenceUID = common["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = geo.slice_location
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ny
    ds.Columns = nx
    ds.PixelSpacing = geo.pixel_spacing
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = wc
    ds.WindowWidth = ww

    frames = []
    for t in range(nt):
        trigger_ms = t * float(plane.frame_interval_ms)
        sop_uid = _uid("cmrfm-ukb", seed, eid, field, "sop", series_index, plane.description, t)
        acq_tm = _tm(series_start_s + trigger_ms / 1000.0)
        meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.AcquisitionTime = acq_tm
        ds.ContentTime = acq_tm
        ds.TriggerTime = _ds(trigger_ms)
        ds.InstanceNumber = str(t + 1)
        ds.PixelData = np.ascontiguousarray(px[:, :, t].T, dtype="<u2").tobytes()

        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        name = _file_name(sop_uid)
        row = (
            name,
            str(eid),
            common["StudyInstanceUID"],
            common["aet"],
            common["host"],
            common["StudyDate"],
            acq_tm.split(".")[0],
            plane.description,
        )
        frames.append(_Frame(name=name, data=buf.getvalue(), manifest_row=row))
    return frames


def _inline_vf_plane(first: CinePlane, px: np.ndarray, rng: np.random.Generator) -> tuple[CinePlane, np.ndarray]:
    """A derived series that a converter must ignore: few frames, odd matrix, DERIVED image type."""
    nx, ny, nt = px.shape
    n_frames = min(3, nt)
    crop_y = max(1, (ny * 3) // 4)
    mip = px.max(axis=2)[:, :crop_y].astype(np.int64)
    frames = [np.clip(mip - int(rng.integers(0, 50)) * k, 0, _MAX_VALUE) for k in range(n_frames)]
    vf = np.stack(frames, axis=2).astype(np.uint16)
    plane = CinePlane(
        description=INLINE_VF_DESCRIPTION,
        pixels=vf,
        affine=np.asarray(first.affine, dtype=np.float64),
        slice_thickness_mm=first.slice_thickness_mm,
        frame_interval_ms=first.frame_interval_ms,
    )
    return plane, vf


def write_ukb_dicom_zip(
    path: str | os.PathLike[str],
    eid: int,
    field: int,
    planes: Sequence[CinePlane],
    *,
    seed: int,
    patient: dict[str, Any] | None = None,
    add_inline_vf: bool = False,
    compresslevel: int = 1,
) -> None:
    """Write ``planes`` as a UK Biobank-style DICOM zip (atomically) at ``path``.

    ``field`` is 20209 (short axis; planes ``CINE_segmented_SAX_b1..bN``, base to apex) or 20208 (long axis;
    ``CINE_segmented_LAX_2Ch/3Ch/4Ch``). ``patient`` optionally maps DICOM keywords to values
    (``PatientSex``, ``PatientAge``, ``PatientBirthDate``, ``PatientWeight``, ``PatientSize`` ...) and may carry
    ``StudyDate`` (YYYYMMDD) / ``StudyTime``; both zips of one subject share the StudyInstanceUID when written
    with the same ``seed``/``eid``/``StudyDate``. ``add_inline_vf`` adds the derived
    ``CINE_segmented_SAX_InlineVF`` series (3 frames) found in real short-axis zips. Members are deflated
    (``compresslevel``); the result is byte-identical for identical inputs.
    """
    eid = int(eid)
    field = int(field)
    if field not in (FIELD_SA, FIELD_LA):
        raise ValueError(f"field must be {FIELD_SA} (short axis) or {FIELD_LA} (long axis), got {field}")
    if not planes:
        raise ValueError("no planes to write")
    descriptions = [p.description for p in planes]
    if len(set(descriptions)) != len(descriptions):
        raise ValueError(f"duplicate series descriptions: {descriptions}")
    for d in descriptions:
        if not d or not re.fullmatch(r"[\x20-\x7e]{1,64}", d) or "\\" in d:
            raise ValueError(f"invalid SeriesDescription {d!r} (printable ASCII, <= 64 chars, no backslash)")
    if add_inline_vf and INLINE_VF_DESCRIPTION in descriptions:
        raise ValueError(f"{INLINE_VF_DESCRIPTION} given as a plane and add_inline_vf=True")

    patient = dict(patient or {})
    study_date = str(patient.pop("StudyDate", "")) or None
    study_time = patient.pop("StudyTime", None)
    for key in patient:
        if key not in keyword_dict:
            raise ValueError(f"patient: {key!r} is not a DICOM keyword")

    # Per-subject constants (identical for the 20208 and 20209 zips of one subject).
    subj_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, eid & 0xFFFFFFFF, 0x5EED])
    if study_date is None:
        study_date = _da(int(subj_rng.integers(0, 6 * 365)))
    start_s = float(study_time_seconds(study_time)) if study_time else float(subj_rng.integers(8 * 3600, 18 * 3600))
    common = {
        "StudyDate": study_date,
        "StudyTime": _tm(start_s),
        "StudyInstanceUID": _uid("cmrfm-ukb", seed, eid, "study", study_date),
        "FrameOfReferenceUID": _uid("cmrfm-ukb", seed, eid, "frame-of-reference", study_date),
        "StudyID": str(int(subj_rng.integers(1, 10_000))),
        "station": int(subj_rng.integers(10_000, 99_999)),
        "aet": "ANONYMOUS",
        "host": "ANONYMOUS",
        "patient": patient,
    }
    # Long axis acquired first (series 1..), short axis after it (series 10..), ~20 s per breath-hold.
    first_series = 1 if field == FIELD_LA else 10
    offset_s = 60.0 if field == FIELD_LA else 180.0

    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, eid & 0xFFFFFFFF, field])
    series: list[tuple[CinePlane, np.ndarray, bool]] = []
    for p in planes:
        series.append((p, _check_plane(p, f"series {p.description!r}"), False))
    if add_inline_vf:
        vf_plane, vf_px = _inline_vf_plane(series[0][0], series[0][1], rng)
        series.append((vf_plane, vf_px, True))

    frames: list[_Frame] = []
    for i, (plane, px, derived) in enumerate(series):
        frames.extend(
            _frames_for_series(
                plane=plane,
                px=px,
                series_index=i,
                series_number=first_series + i,
                derived=derived,
                common=common,
                eid=eid,
                field=field,
                seed=seed,
                series_start_s=start_s + offset_s + 20.0 * i,
                cardiac_number_of_images=series[0][1].shape[2] if derived else px.shape[2],
            )
        )
    names = [f.name for f in frames]
    if len(set(names)) != len(names):  # pragma: no cover - 128-bit hashes
        raise RuntimeError("member name collision")

    order = rng.permutation(len(frames))
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for j in order:
        writer.writerow(frames[j].manifest_row)

    path = Path(path)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
            for j in order:
                _writestr(zf, frames[j].name, frames[j].data, compresslevel)
            _writestr(zf, MANIFEST_NAME, manifest.getvalue().encode("utf-8"), compresslevel)


def study_time_seconds(tm: str | float | int) -> float:
    """Seconds since midnight of a DICOM TM string (``HHMMSS[.ffffff]``) or a number of seconds."""
    if isinstance(tm, (int, float)):
        return float(tm)
    s = str(tm).strip()
    if not re.fullmatch(r"\d{6}(\.\d{1,6})?", s):
        raise ValueError(f"StudyTime must be HHMMSS[.ffffff], got {tm!r}")
    return int(s[:2]) * 3600 + int(s[2:4]) * 60 + float(s[4:])


def _writestr(zf: zipfile.ZipFile, name: str, data: bytes, compresslevel: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # unix, regardless of the writing platform
    info.external_attr = 0o100644 << 16
    zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=compresslevel)
