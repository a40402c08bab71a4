"""Read UK Biobank cine CMR DICOM zips (fields 20209 short axis, 20208 long axis) into volumes + affines.

``read_ukb_dicom_zip(path)`` returns ``{"sa": CineVolume}`` for a short-axis zip and
``{"la_2ch", "la_3ch", "la_4ch"}`` for a long-axis zip (whatever cine series the zip holds), with
``pixels[x, y, z, t]`` (int16; x = DICOM column, y = DICOM row) and a 4x4 RAS+ affine mapping voxel
``(x, y, z)`` to mm, the layout of ukbb_cardiac's ``sa.nii.gz`` / ``la_2ch.nii.gz``.

What the reader trusts and checks:

* Series are grouped by the DICOM headers (SeriesDescription, SeriesInstanceUID), not by the manifest.
  ``manifest.csv`` (or the misspelled ``manifest.cvs``) is cross-checked: its header may be spelled
  ``series discription``; rows for members missing from the zip, members missing from the manifest and
  descriptions that disagree with the headers raise ``DicomZipWarning`` (``strict=True`` makes them errors).
* Derived series (``CINE_segmented_SAX_InlineVF``, ImageType DERIVED) are skipped; other unknown series are
  skipped with a warning. A description acquired twice keeps the series with the highest SeriesNumber.
* Frames are ordered by TriggerTime; a series must have CardiacNumberOfImages frames, one geometry and one
  matrix size. Short-axis slices must share orientation, pixel spacing, matrix and frame count, and be evenly
  spaced; they are stacked along the slice normal with b1 (base) at z = 0.
* The affine comes from ImageOrientationPatient / ImagePositionPatient / PixelSpacing (LPS -> RAS); the slice
  axis from the slice positions ((last - first) / (Z - 1)); for a single slice it is
  ``SliceThickness * unit(cross(A[:3,0], A[:3,1]))``.

All failures raise ``DicomZipError`` (a ``ValueError``) or a subclass, with the zip, the member or series and
the reason in the message.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO, Any, Union

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

__all__ = [
    "CineVolume",
    "read_ukb_dicom_zip",
    "DicomZipError",
    "CorruptZipError",
    "DicomHeaderError",
    "SeriesError",
    "GeometryError",
    "DicomZipWarning",
    "volume_key",
]

log = logging.getLogger(__name__)

_LPS = np.diag([-1.0, -1.0, 1.0])
_MANIFEST_NAMES = ("manifest.csv", "manifest.cvs")
_SAX_RE = re.compile(r"SAX_b(\d+)\s*$", re.IGNORECASE)
_LAX_RE = re.compile(r"LAX_(\d)\s*ch\s*$", re.IGNORECASE)

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes]]


# ----------------------------------------------------------------------------------------------- errors


class DicomZipError(ValueError):
    """A UK Biobank DICOM zip that cannot be converted. ``zip``/``member``/``reason`` are kept as attributes."""

    def __init__(self, zip_name: str, reason: str, member: str | None = None):
        self.zip = zip_name
        self.member = member
        self.reason = reason
        where = f"{zip_name}: {member}" if member else zip_name
        super().__init__(f"{where}: {reason}")


class CorruptZipError(DicomZipError):
    """Not a zip, truncated, or a member that fails to decompress / CRC check."""


class DicomHeaderError(DicomZipError):
    """A member that is not readable DICOM or lacks a required tag."""


class SeriesError(DicomZipError):
    """A series (or set of slices) that is incomplete or inconsistent: frame counts, matrix sizes, timing."""


class GeometryError(DicomZipError):
    """Missing/invalid geometry tags, slices not parallel or unevenly spaced."""


class DicomZipWarning(UserWarning):
    """A real-world quirk that does not prevent conversion (manifest mismatches, ignored series...)."""


# ----------------------------------------------------------------------------------------------- result


@dataclass
class CineVolume:
    pixels: np.ndarray  # (X, Y, Z, T) int16
    affine: np.ndarray  # (4, 4) RAS+, voxel (x, y, z) -> mm
    frame_interval_ms: float  # mean TriggerTime step over slices (nan when TriggerTime is absent)
    descriptions: tuple[str, ...]  # SeriesDescription of each z
    trigger_times_ms: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (Z, T)
    slice_thickness_mm: float = float("nan")
    series_numbers: tuple[int, ...] = ()

    @property
    def description(self) -> str:
        return self.descriptions[0] if len(self.descriptions) == 1 else ",".join(self.descriptions)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)


def volume_key(description: str) -> str | None:
    """``"sa"`` for ``..._SAX_b<n>``, ``"la_<n>ch"`` for ``..._LAX_<n>Ch``, else None."""
    if _SAX_RE.search(description):
        return "sa"
    m = _LAX_RE.search(description)
    if m:
        return f"la_{m.group(1)}ch"
    return None


# ----------------------------------------------------------------------------------------------- frames


@dataclass
class _Frame:
    member: str
    description: str
    series_uid: str
    series_number: int
    derived: bool
    rows: int | None
    columns: int | None
    trigger_time: float | None
    instance_number: int | None
    cardiac_n: int | None
    iop: np.ndarray | None
    ipp: np.ndarray | None
    pixel_spacing: np.ndarray | None
    slice_thickness: float | None
    ds: Any  # the dataset, pixels decoded lazily (only for kept series)


def _floats(ds: Any, keyword: str, n: int) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    values = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
    try:
        arr = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _opt_float(ds: Any, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _opt_int(ds: Any, keyword: str) -> int | None:
    v = _opt_float(ds, keyword)
    return None if v is None else int(round(v))


class _Reader:
    def __init__(self, name: str, strict: bool):
        self.name = name
        self.strict = strict

    def warn(self, reason: str, member: str | None = None) -> None:
        if self.strict:
            raise DicomZipError(self.name, reason + " (strict mode)", member)
        where = f"{self.name}: {member}" if member else self.name
        warnings.warn(f"{where}: {reason}", DicomZipWarning, stacklevel=4)

    # ------------------------------------------------------------------------------------- zip level

    def read_member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
        try:
            return zf.read(info)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as e:
            raise CorruptZipError(self.name, f"cannot extract member ({type(e).__name__}: {e})", info.filename) from e

    def parse_manifest(self, raw: bytes, member: str) -> dict[str, str] | None:
        """basename -> series description (from the manifest), None if unusable."""
        text = raw.decode("utf-8-sig", errors="replace")
        rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
        if not rows:
            self.warn("manifest is empty", member)
            return None
        header = [re.sub(r"\s+", " ", c.strip().lower()) for c in rows[0]]
        if "filename" not in header:
            self.warn(f"manifest header has no 'filename' column: {rows[0]}", member)
            return None
        i_file = header.index("filename")
        desc_cols = [i for i, c in enumerate(header) if c in ("series discription", "series description")]
        i_desc = desc_cols[0] if desc_cols else None
        last_is_desc = i_desc == len(header) - 1
        out: dict[str, str] = {}
        for line_no, r in enumerate(rows[1:], start=2):
            if len(r) <= i_file or not r[i_file].strip():
                self.warn(f"manifest line {line_no} has no filename: {r}", member)
                continue
            fname = PurePosixPath(r[i_file].strip().replace("\\", "/")).name
            if i_desc is None:
                desc = ""
            elif len(r) != len(header) and last_is_desc:
                # Real manifests sometimes carry an unquoted comma inside a field (e.g. the date): the
                # description is still the last field.
                desc = r[-1].strip()
            else:
                desc = r[i_desc].strip() if len(r) > i_desc else ""
            if fname in out:
                self.warn(f"manifest lists {fname!r} twice", member)
            out[fname] = desc
        return out

    # ----------------------------------------------------------------------------------- DICOM level

    def parse_dicom(self, raw: bytes, member: str) -> _Frame:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = pydicom.dcmread(io.BytesIO(raw))
        except InvalidDicomError as e:
            raise DicomHeaderError(self.name, f"not a DICOM file ({e})", member) from e
        except Exception as e:  # noqa: BLE001 - pydicom raises many types on garbage
            raise DicomHeaderError(self.name, f"unreadable DICOM header ({type(e).__name__}: {e})", member) from e
        for w in caught:
            text = str(w.message)
            # pydicom reads garbage leniently and only warns when it runs off the end of the data.
            if any(k in text for k in ("End of file", "delimiter", "Expected explicit VR", "Unknown VR")):
                raise DicomHeaderError(self.name, f"corrupted DICOM header ({text})", member)
            self.warn(f"pydicom: {text}", member)
        try:
            if "PixelData" not in ds:
                raise DicomHeaderError(self.name, "no PixelData element (truncated or corrupted header)", member)
            if not str(ds.get("SeriesDescription", "") or "").strip():
                raise DicomHeaderError(
                    self.name, "missing SeriesDescription (cannot assign the frame to a series)", member
                )
            desc = str(ds.get("SeriesDescription", "") or "").strip()
            image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
            if isinstance(ds.get("ImageType"), str):
                image_type = [str(ds.ImageType).upper()]
            return _Frame(
                member=member,
                description=desc,
                series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
                series_number=_opt_int(ds, "SeriesNumber") or 0,
                derived=bool(image_type) and image_type[0] == "DERIVED",
                rows=_opt_int(ds, "Rows"),
                columns=_opt_int(ds, "Columns"),
                trigger_time=_opt_float(ds, "TriggerTime"),
                instance_number=_opt_int(ds, "InstanceNumber"),
                cardiac_n=_opt_int(ds, "CardiacNumberOfImages"),
                iop=_floats(ds, "ImageOrientationPatient", 6),
                ipp=_floats(ds, "ImagePositionPatient", 3),
                pixel_spacing=_floats(ds, "PixelSpacing", 2),
                slice_thickness=_opt_float(ds, "SliceThickness"),
                ds=ds,
            )
        except DicomZipError:
            raise
        except Exception as e:  # noqa: BLE001 - corrupted values surface lazily in pydicom
            raise DicomHeaderError(self.name, f"corrupted DICOM header ({type(e).__name__}: {e})", member) from e

    def pixels(self, f: _Frame) -> np.ndarray:
        ds = f.ds
        try:
            if not ds.file_meta.TransferSyntaxUID.is_compressed:
                spp = int(ds.get("SamplesPerPixel", 1) or 1)
                bits = int(ds.BitsAllocated)
                expected = int(ds.Rows) * int(ds.Columns) * spp * bits // 8
                got = len(ds.PixelData)
                if got < expected:
                    raise DicomHeaderError(
                        self.name,
                        f"PixelData holds {got} bytes, Rows x Columns x BitsAllocated says {expected} "
                        "(truncated pixel data or corrupted header)",
                        f.member,
                    )
                if got > expected + 1:  # + 1 is the even-length pad; some writers pad further: read, noted
                    self.warn(f"PixelData holds {got - expected} bytes of trailing padding (ignored)", f.member)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                arr = ds.pixel_array
        except DicomZipError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DicomHeaderError(self.name, f"cannot decode pixel data ({type(e).__name__}: {e})", f.member) from e
        for w in caught:
            self.warn(f"pydicom (pixel data): {w.message}", f.member)
        if arr.ndim != 2:
            raise DicomHeaderError(self.name, f"expected one 2-D monochrome frame, got array {arr.shape}", f.member)
        slope = _opt_float(f.ds, "RescaleSlope")
        intercept = _opt_float(f.ds, "RescaleIntercept")
        if (slope not in (None, 1.0)) or (intercept not in (None, 0.0)):
            self.warn(f"RescaleSlope/Intercept {slope}/{intercept} ignored (stored values returned)", f.member)
        if arr.size and (int(arr.max()) > np.iinfo(np.int16).max or int(arr.min()) < np.iinfo(np.int16).min):
            raise DicomHeaderError(
                self.name, f"pixel values {int(arr.min())}..{int(arr.max())} do not fit int16", f.member
            )
        return arr.T.astype(np.int16)  # (rows, cols) -> (x=col, y=row)

    # ---------------------------------------------------------------------------------- series level

    def series(self, desc: str, frames: list[_Frame], missing: list[str]) -> dict[str, Any]:
        """Check one series and return its ordered frames and geometry."""
        where = f"series {desc!r}"

        def fail(cls: type[DicomZipError], reason: str, member: str | None = None) -> None:
            if missing:
                reason += f"; manifest lists {len(missing)} file(s) of this series absent from the zip: " + ", ".join(
                    missing[:5]
                ) + (" ..." if len(missing) > 5 else "")
            raise cls(self.name, reason, member or where)

        for f in frames:
            for tag, value in (
                ("ImageOrientationPatient", f.iop),
                ("ImagePositionPatient", f.ipp),
                ("PixelSpacing", f.pixel_spacing),
                ("Rows", f.rows),
                ("Columns", f.columns),
            ):
                if value is None:
                    fail(GeometryError, f"missing or invalid {tag} ({where})", f.member)
        sizes = {(f.rows, f.columns) for f in frames}
        if len(sizes) != 1:
            fail(SeriesError, f"inconsistent matrix sizes (rows, columns) {sorted(sizes)} within the series")
        f0 = frames[0]
        for f in frames[1:]:
            if not np.allclose(f.iop, f0.iop, atol=1e-4) or not np.allclose(f.pixel_spacing, f0.pixel_spacing, atol=1e-4):
                fail(GeometryError, f"orientation/pixel spacing differs from {f0.member} within {where}", f.member)
            if not np.allclose(f.ipp, f0.ipp, atol=1e-2):
                fail(GeometryError, f"position differs from {f0.member} within {where} (one slice expected)", f.member)
        row, col = f0.iop[:3], f0.iop[3:]
        if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3 and abs(row @ col) < 1e-3):
            fail(GeometryError, f"ImageOrientationPatient {f0.iop.tolist()} is not two orthonormal vectors", f0.member)
        if np.any(f0.pixel_spacing <= 0):
            fail(GeometryError, f"non-positive PixelSpacing {f0.pixel_spacing.tolist()}", f0.member)

        # frame order and count
        n = len(frames)
        declared = {f.cardiac_n for f in frames if f.cardiac_n is not None}
        if len(declared) > 1:
            fail(SeriesError, f"inconsistent CardiacNumberOfImages {sorted(declared)}")
        if declared and n != next(iter(declared)):
            fail(SeriesError, f"{n} frames but CardiacNumberOfImages = {next(iter(declared))}")
        tts = [f.trigger_time for f in frames]
        if all(t is not None for t in tts):
            frames = sorted(frames, key=lambda f: (f.trigger_time, f.instance_number or 0))
            t_sorted = np.array([f.trigger_time for f in frames])
            if n > 1 and np.any(np.diff(t_sorted) <= 0):
                dup = [frames[i + 1].member for i in np.flatnonzero(np.diff(t_sorted) <= 0)]
                fail(SeriesError, f"duplicate TriggerTime in frames {dup[:3]}")
        elif any(t is not None for t in tts):
            bad = [f.member for f in frames if f.trigger_time is None]
            fail(SeriesError, f"TriggerTime missing in {len(bad)} of {n} frames, e.g. {bad[0]}")
        else:
            if any(f.instance_number is None for f in frames):
                fail(SeriesError, "neither TriggerTime nor InstanceNumber present: cannot order the frames")
            self.warn(f"{where}: no TriggerTime, frames ordered by InstanceNumber")
            frames = sorted(frames, key=lambda f: f.instance_number)
            t_sorted = np.full(n, np.nan)
        return {
            "description": desc,
            "frames": frames,
            "trigger_times": t_sorted,
            "iop": f0.iop,
            "ipp": np.mean([f.ipp for f in frames], axis=0),
            "pixel_spacing": f0.pixel_spacing,
            "shape": (f0.columns, f0.rows),
            "n_frames": n,
            "thickness": f0.slice_thickness,
            "series_number": f0.series_number,
            "member": f0.member,
        }

    def volume(self, key: str, series: list[dict[str, Any]], spacing_tol_mm: float) -> CineVolume:
        where = f"volume {key!r}"
        s0 = series[0]
        for s in series[1:]:
            if s["n_frames"] != s0["n_frames"]:
                raise SeriesError(
                    self.name,
                    f"inconsistent frame counts across slices: {s0['description']} has {s0['n_frames']}, "
                    f"{s['description']} has {s['n_frames']}",
                    where,
                )
            if s["shape"] != s0["shape"]:
                raise SeriesError(
                    self.name,
                    f"inconsistent matrix sizes across slices (columns, rows): {s0['description']} {s0['shape']}, "
                    f"{s['description']} {s['shape']}",
                    where,
                )
            if not np.allclose(s["pixel_spacing"], s0["pixel_spacing"], atol=1e-3):
                raise GeometryError(
                    self.name,
                    f"inconsistent PixelSpacing across slices: {s0['description']} {s0['pixel_spacing'].tolist()}, "
                    f"{s['description']} {s['pixel_spacing'].tolist()}",
                    where,
                )
            if not np.allclose(s["iop"], s0["iop"], atol=1e-3):
                n0 = np.cross(s0["iop"][:3], s0["iop"][3:])
                n1 = np.cross(s["iop"][:3], s["iop"][3:])
                angle = np.degrees(np.arccos(np.clip(abs(n0 @ n1), -1, 1)))
                what = "not parallel" if angle > 0.06 else "parallel but rotated in plane"
                raise GeometryError(
                    self.name,
                    f"slices {what}: {s0['description']} vs {s['description']} "
                    f"(normals {angle:.2f} deg apart; ImageOrientationPatient {s0['iop'].tolist()} vs {s['iop'].tolist()})",
                    where,
                )

        row, col = s0["iop"][:3], s0["iop"][3:]
        normal = np.cross(row, col)
        normal /= np.linalg.norm(normal)
        if len(series) > 1:
            proj = np.array([s["ipp"] @ normal for s in series])
            order = np.argsort(proj, kind="stable")
            series = [series[i] for i in order]
            proj = proj[order]
            nums = [_slice_number(s["description"]) for s in series]
            if nums[0] is not None and nums[-1] is not None and nums[0] > nums[-1]:
                series, proj, nums = series[::-1], proj[::-1], nums[::-1]
            if all(v is not None for v in nums) and nums != sorted(nums):
                self.warn(
                    f"{where}: slice numbers are not monotonic along the slice normal: "
                    + ", ".join(s["description"] for s in series)
                )
            positions = np.array([s["ipp"] for s in series])
            z = len(series)
            step = (positions[-1] - positions[0]) / (z - 1)
            if np.linalg.norm(step) < 1e-3:
                raise GeometryError(self.name, "all slices share one position", where)
            dev = positions - (positions[0] + np.arange(z)[:, None] * step)
            err = np.linalg.norm(dev, axis=1)
            tol = max(spacing_tol_mm, 0.02 * float(np.linalg.norm(step)))
            if np.max(err) > tol:
                gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
                raise GeometryError(
                    self.name,
                    "slices unevenly spaced: gaps between consecutive slices "
                    + ", ".join(
                        f"{series[i]['description']}->{series[i + 1]['description']} {g:.3f} mm"
                        for i, g in enumerate(gaps)
                    )
                    + f" (max deviation {np.max(err):.3f} mm > {tol:.3f} mm)",
                    where,
                )
            slice_axis = step
        else:
            thickness = s0["thickness"]
            if thickness is None or thickness <= 0:
                raise GeometryError(self.name, "single-slice series without a valid SliceThickness", s0["member"])
            slice_axis = normal * thickness

        ps = s0["pixel_spacing"]  # [between rows, between columns]
        lps = np.eye(4)
        lps[:3, 0] = row * ps[1]
        lps[:3, 1] = col * ps[0]
        lps[:3, 2] = slice_axis
        lps[:3, 3] = series[0]["ipp"]
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

        nx, ny = s0["shape"]
        nt = s0["n_frames"]
        pixels = np.empty((nx, ny, len(series), nt), dtype=np.int16)
        for k, s in enumerate(series):
            for t, f in enumerate(s["frames"]):
                arr = self.pixels(f)
                if arr.shape != (nx, ny):
                    raise SeriesError(
                        self.name, f"pixel data shape {arr.shape[::-1]} does not match Rows/Columns", f.member
                    )
                pixels[:, :, k, t] = arr
        trig = np.stack([s["trigger_times"] for s in series])
        with np.errstate(invalid="ignore"):
            dts = [np.mean(np.diff(t)) for t in trig if len(t) > 1 and np.all(np.isfinite(t))]
        frame_interval = float(np.mean(dts)) if dts else float("nan")
        thick = s0["thickness"]
        return CineVolume(
            pixels=pixels,
            affine=affine,
            frame_interval_ms=frame_interval,
            descriptions=tuple(s["description"] for s in series),
            trigger_times_ms=trig,
            slice_thickness_mm=float(thick) if thick is not None else float("nan"),
            series_numbers=tuple(int(s["series_number"]) for s in series),
        )


def _slice_number(description: str) -> int | None:
    m = _SAX_RE.search(description)
    return int(m.group(1)) if m else None


def _is_derived_description(desc: str) -> bool:
    return "inlinevf" in desc.lower().replace("_", "").replace(" ", "")


# ------------------------------------------------------------------------------------------------- main


def read_ukb_dicom_zip(
    path: Source,
    *,
    strict: bool = False,
    spacing_tol_mm: float = 0.1,
    name: str | None = None,
) -> dict[str, CineVolume]:
    """Read a UK Biobank cine DICOM zip (``<eid>_20209_2_0.zip`` / ``<eid>_20208_2_0.zip``).

    ``path`` may be a filename, the zip's bytes, or a binary file object (``name`` then labels messages).
    Returns ``{"sa": ...}`` and/or ``{"la_2ch": ..., "la_3ch": ..., "la_4ch": ...}`` depending on the series
    present. Quirks emit ``DicomZipWarning`` (errors when ``strict``); defects raise ``DicomZipError``
    subclasses naming the zip and the member or series. ``spacing_tol_mm`` (or 2 % of the slice spacing,
    whichever is larger) bounds the deviation of short-axis slice positions from an even grid.
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        label = name or "<zip bytes>"
        fileobj: Any = io.BytesIO(bytes(path))
    elif hasattr(path, "read"):
        label = name or str(getattr(path, "name", "<zip stream>"))
        fileobj = path
    else:
        label = name or os.fspath(path)
        fileobj = os.fspath(path)
    r = _Reader(label, strict)

    try:
        zf = zipfile.ZipFile(fileobj)
    except FileNotFoundError as e:
        raise CorruptZipError(label, "file not found") from e
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        raise CorruptZipError(label, f"not a zip file or truncated/corrupt zip ({type(e).__name__}: {e})") from e

    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        manifest_infos = [i for i in infos if PurePosixPath(i.filename).name.lower() in _MANIFEST_NAMES]
        others = [i for i in infos if i not in manifest_infos]

        manifest: dict[str, str] | None = None
        if not manifest_infos:
            r.warn("no manifest.csv in the zip; using the DICOM headers only")
        else:
            if len(manifest_infos) > 1:
                r.warn(f"{len(manifest_infos)} manifests; using {manifest_infos[0].filename}")
            m_info = manifest_infos[0]
            manifest = r.parse_manifest(r.read_member(zf, m_info), m_info.filename)

        listed = set(manifest) if manifest is not None else set()
        candidates = []
        for info in others:
            base = PurePosixPath(info.filename).name
            if base.startswith(".") or info.filename.startswith("__MACOSX/"):
                continue
            suffix = PurePosixPath(base).suffix.lower()
            if suffix in ("", ".dcm", ".ima") or base in listed or re.fullmatch(r"[\d.]+", base):
                candidates.append(info)
            else:
                r.warn("not a DICOM member (ignored)", info.filename)
        if not candidates:
            raise DicomZipError(label, "no DICOM files in the zip")

        frames: list[_Frame] = []
        present = set()
        for info in candidates:
            f = r.parse_dicom(r.read_member(zf, info), info.filename)
            frames.append(f)
            present.add(PurePosixPath(info.filename).name)

    # ------------------------------------------------------------------------- manifest cross-check
    missing_by_desc: dict[str, list[str]] = {}
    if manifest is not None:
        absent = sorted(set(manifest) - present)
        for fname in absent:
            missing_by_desc.setdefault(manifest[fname], []).append(fname)
        if absent:
            r.warn(
                f"manifest lists {len(absent)} file(s) not in the zip, e.g. {absent[0]!r}"
                + (f" ({manifest[absent[0]]})" if manifest[absent[0]] else "")
            )
        unlisted = [f for f in frames if PurePosixPath(f.member).name not in manifest]
        if unlisted:
            r.warn(f"{len(unlisted)} DICOM member(s) not listed in the manifest, e.g. {unlisted[0].member!r} (used)")
        mismatched = [
            f
            for f in frames
            if PurePosixPath(f.member).name in manifest
            and manifest[PurePosixPath(f.member).name]
            and manifest[PurePosixPath(f.member).name] != f.description
        ]
        if mismatched:
            f = mismatched[0]
            r.warn(
                f"manifest series description {manifest[PurePosixPath(f.member).name]!r} differs from the DICOM "
                f"header {f.description!r} in {len(mismatched)} member(s), e.g. {f.member!r} (header used)"
            )

    # ------------------------------------------------------------------------------ group by series
    groups: dict[str, dict[str, list[_Frame]]] = {}
    ignored: set[str] = set()
    derived: dict[str, int] = {}
    for f in frames:
        if f.derived or _is_derived_description(f.description):
            log.debug("%s: skipping derived series %r (%s)", label, f.description, f.member)
            derived[f.description] = derived.get(f.description, 0) + 1
        elif volume_key(f.description) is None:
            ignored.add(f.description)
        else:
            groups.setdefault(f.description, {}).setdefault(f.series_uid, []).append(f)
    if ignored:
        r.warn(f"series not converted (not a SAX_b*/LAX_*Ch cine): {sorted(ignored)}")
    if not groups:
        skipped = (f"; {sum(derived.values())} frame(s) skipped as DERIVED (ImageType or an inline-analysis "
                   f"series): {sorted(derived)}") if derived else ""
        raise DicomZipError(
            label, f"no cine series (SAX_b*/LAX_*Ch) found; series present: {sorted({f.description for f in frames})}"
            + skipped
        )

    by_key: dict[str, list[dict[str, Any]]] = {}
    for desc in sorted(groups, key=lambda d: (_slice_number(d) or 0, d)):
        per_uid = groups[desc]
        if len(per_uid) > 1:
            ranked = sorted(per_uid.values(), key=lambda fs: (max(f.series_number for f in fs), len(fs)))
            chosen = ranked[-1]
            r.warn(
                f"series {desc!r} acquired {len(per_uid)} times; keeping SeriesNumber "
                f"{chosen[0].series_number} ({len(chosen)} frames)"
            )
        else:
            chosen = next(iter(per_uid.values()))
        s = r.series(desc, chosen, missing_by_desc.get(desc, []))
        by_key.setdefault(volume_key(desc), []).append(s)

    out: dict[str, CineVolume] = {}
    for key in sorted(by_key):
        series = by_key[key]
        if key != "sa" and len(series) > 1:
            raise SeriesError(label, f"{len(series)} series map to {key!r}: {[s['description'] for s in series]}")
        out[key] = r.volume(key, series, spacing_tol_mm)
    return out
