"""Read raw multi-coil cardiac k-space in the CMRxRecon / MMCMR-427K layout (reading side only).

The synthetic generator (:mod:`data_prep.synth.kspace`) *writes* this layout;
this module *reads* it -- for the real datasets and the synthetic one alike --
and is what the conversion job uses.  Three things live here:

1. the dataset path layout (:data:`RELPATH_RE`, :func:`parse_relpath`,
   :func:`sequence_key`, :func:`patient_key`);
2. the file kinds: the classification label of a file (:func:`modality_label`,
   vocabulary :data:`MODALITIES`) and the view of each of its slices
   (:func:`slice_views`, vocabulary :data:`VIEWS`);
3. the MAT-file reader (:func:`read_kspace_mat`, :func:`load_kspace`) for
   MATLAB v7.3 (HDF5) and v5 files.

Path layout
-----------
Canonical (CMRxRecon 2025 / MMCMR-427K, what the generator writes)::

    MultiCoil/<Modality>/TrainingSet/FullSample/Center00K/<Vendor>_<Field>_<Model>/P00N/<name>.mat

e.g. ``MultiCoil/Cine/TrainingSet/FullSample/Center002/Siemens_30T_Vida/P003/cine_sax.mat``.
Tolerated variations (all tested):

* anything before ``MultiCoil/`` (a dataset root, an absolute path:
  ``/data/CMRxRecon2024/ChallengeData/MultiCoil/...``); backslashes are read as ``/``;
* split folder ``TrainingSet`` | ``TrainSet`` | ``ValidationSet`` | ``TestSet``;
* sampling folder ``FullSample`` or ``AccFactorNN`` (CMRxRecon 2023/2024
  undersampled data; ``acc_factor`` = NN, default MAT key ``kspace_subNN``);
* no ``CenterNNN/<Vendor>_<Field>_<Model>/`` level -- the patient folder sits
  directly under the sampling folder (CMRxRecon 2023/2024:
  ``MultiCoil/Cine/TrainingSet/FullSample/P001/cine_sax.mat``); centre,
  vendor, field strength, model and scanner are then ``None``;
* field codes of two or three digits with an implied decimal point after the
  first digit: ``15T`` = 1.5 T, ``30T`` = 3.0 T, ``50T`` = 5.0 T, ``055T`` = 0.55 T;
* model names may contain letters, digits, ``.``, ``-`` and ``_``
  (``Siemens_30T_MAGNETOM_Vida`` -> vendor ``Siemens``, model ``MAGNETOM_Vida``);
* patient folders ``P`` + 3 or 4 digits.

Rejected with a ValueError that says why: files that are not ``.mat``,
sampling-mask files (``cine_sax_mask.mat``), ``SingleCoil`` data (no coil
axis), and any other path outside the layout.

File kinds and views
--------------------
:func:`modality_label` maps (modality folder, file stem) to one of
:data:`MODALITIES` -- ``Mapping`` holds two modalities, ``T1map`` and ``T2map``.
:func:`slice_views` gives one of :data:`VIEWS` per slice: ``*_sax``, ``T1map``,
``T2map`` and ``blackblood`` are short axis; ``cine_lvot`` is LVOT;
``cine_lax`` / ``lge_lax`` hold one slice per long-axis view in the order
2ch, 3ch, 4ch (exactly three slices, otherwise a ValueError: the per-slice
views would be a guess); ``cine_lax_2ch`` / ``lge_lax_4ch`` ... (CMRxRecon 2025
names) are that view for every slice.  Anything else is "unsupported" (a
ValueError), so new kinds are added here, deliberately, with their labels.

MAT files
---------
Canonical array order as h5py sees a MATLAB v7.3 file: 5D ``(nt, nz, nc, ny, nx)``
(cine, mapping) or 4D ``(nz, nc, ny, nx)`` (LGE, black blood); MATLAB itself
reports the reversed order ``(kx, ky, sc, sz, t)``.  v7.3 files are HDF5 (after
a 512-byte MATLAB userblock) with complex data as compound ``{real, imag}``
floats; v5 files (``scipy.io``) hold the same MATLAB variable, i.e. the array in
MATLAB order, and are transposed back.  Both return complex64 in canonical order.
MATLAB drops trailing singleton axes when it saves (a single-frame cine is stored
4D, a single-coil single-slice single-frame one 2D); the reader puts them back up
to the file kind's rank (:data:`KIND_RANK`).

Readout oversampling: CMRxRecon and MMCMR-427K k-space is acquired with a 2x
oversampled readout (``kx``, canonical ``nx``: 512 samples for a 256-pixel field
of view); :func:`data_prep.kspace.preprocess.reconstruct` keeps the central
1/factor of the readout in image space, as the challenge's own tools do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import scipy.io

from core.vocab import MODALITIES, VIEWS

__all__ = [
    "DEFAULT_KEY",
    "KIND_RANK",
    "MODALITIES",
    "RELPATH_RE",
    "VIEWS",
    "KSpaceData",
    "candidate_keys",
    "load_kspace",
    "modality_label",
    "parse_relpath",
    "patient_key",
    "read_kspace_mat",
    "sequence_key",
    "slice_views",
    "stratum",
]

DEFAULT_KEY = "kspace_full"

# Modality and view labels for classification: defined with the sample format (`core.format`)

# --------------------------------------------------------------------------------------
# Path layout
# --------------------------------------------------------------------------------------

#: The dataset layout; ``search`` it (anything may precede ``MultiCoil/``).
#: Groups: rel (from ``MultiCoil/`` on), modality, split, sampling, acc, center,
#: scanner, vendor, field, model, patient, name.
RELPATH_RE = re.compile(
    r"(?:^|/)(?P<rel>MultiCoil/"
    r"(?P<modality>[A-Za-z][A-Za-z0-9]*)/"
    r"(?P<split>TrainingSet|TrainSet|ValidationSet|TestSet)/"
    r"(?P<sampling>FullSample|AccFactor(?P<acc>\d{1,2}))/"
    r"(?:(?P<center>Center\d{3})/"
    r"(?P<scanner>(?P<vendor>[A-Za-z]+)_(?P<field>\d{2,3})T_(?P<model>[A-Za-z0-9][A-Za-z0-9.\-_]*))/)?"
    r"(?P<patient>P\d{3,4})/"
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9_\-]*)\.mat)$"
)

_LAYOUT_HELP = (
    "expected .../MultiCoil/<Modality>/<TrainingSet|ValidationSet|TestSet>/<FullSample|AccFactorNN>/"
    "[CenterNNN/<Vendor>_<NN>T_<Model>/]PNNN/<name>.mat"
)


def _field_t(code: str) -> float:
    """``"15"`` -> 1.5, ``"30"`` -> 3.0, ``"055"`` -> 0.55 (decimal point after the first digit)."""
    return round(int(code) / 10 ** (len(code) - 1), 4)


def parse_relpath(relpath: str | os.PathLike[str]) -> dict[str, object]:
    """Metadata encoded in a dataset path (what MetaCLIP-CMR parses from the layout).

    Returns ``modality`` (folder, e.g. ``"Mapping"``), ``name`` (file stem),
    ``split``, ``sampling`` (``"FullSample"`` / ``"AccFactor04"``), ``acc_factor``
    (int or None), ``center``, ``vendor``, ``field_strength_t`` (float),
    ``scanner_model``, ``scanner`` (folder) -- these five None when the layout has
    no centre/scanner level -- ``patient`` and ``relpath`` (the path from
    ``MultiCoil/`` on).  Raises ValueError naming the path and the reason when it
    is outside the layout (see the module docstring).
    """
    s = os.fspath(relpath)
    s = (s.decode() if isinstance(s, bytes) else s).replace("\\", "/")
    m = RELPATH_RE.search(s)
    if m is None:
        low = "/" + s.lower()
        if not low.endswith(".mat"):
            why = "not a .mat file"
        elif "/singlecoil/" in low:
            why = "single-coil data is not supported (no coil axis); use the MultiCoil folder"
        elif low.endswith("_mask.mat"):
            why = "a sampling-mask file, not k-space"
        elif "/multicoil/" not in low:
            why = "no MultiCoil/ folder in the path"
        else:
            why = "path does not match the dataset layout"
        raise ValueError(f"{s}: {why}; {_LAYOUT_HELP}")
    g = m.groupdict()
    if g["name"].lower().endswith("_mask"):
        raise ValueError(f"{s}: a sampling-mask file, not k-space; {_LAYOUT_HELP}")
    has_site = g["center"] is not None
    return {
        "modality": g["modality"],
        "name": g["name"],
        "split": g["split"],
        "sampling": g["sampling"],
        "acc_factor": int(g["acc"]) if g["acc"] is not None else None,
        "center": g["center"],
        "vendor": g["vendor"] if has_site else None,
        "field_strength_t": _field_t(g["field"]) if has_site else None,
        "scanner_model": g["model"] if has_site else None,
        "scanner": g["scanner"] if has_site else None,
        "patient": g["patient"],
        "relpath": g["rel"],
    }


def _split_part(parsed: dict[str, object]) -> list[str]:
    split = parsed.get("split") or "TrainingSet"
    return [] if split in ("TrainingSet", "TrainSet") else [str(split)]


def _site_part(parsed: dict[str, object]) -> list[str]:
    return [str(parsed["center"]), str(parsed["scanner"])] if parsed.get("center") else []


def patient_key(parsed: dict[str, object]) -> str:
    """Stable id of the person: ``"Center002/Siemens_30T_Vida/P003"``.

    ``[<split>/][<Center>/<Scanner>/]<Patient>``.  The same patient folder under
    different modality folders is the same person (use this for patient-level
    train/val splits).  A non-training split is prefixed (``"ValidationSet/P001"``):
    CMRxRecon numbers patients per split.
    """
    return "/".join(_split_part(parsed) + _site_part(parsed) + [str(parsed["patient"])])


def sequence_key(parsed: dict[str, object]) -> str:
    """Stable id of one sequence: ``"Cine/Center002/Siemens_30T_Vida/P003/cine_sax"``.

    ``<Modality>/[<split>/][<sampling>/][<Center>/<Scanner>/]<Patient>/<name>``: the split
    appears only when it is not the training set, the sampling folder only when it is
    not ``FullSample``, the site only when the layout has one.
    """
    sampling = parsed.get("sampling") or "FullSample"
    parts = [str(parsed["modality"])] + _split_part(parsed)
    parts += [] if sampling == "FullSample" else [str(sampling)]
    parts += _site_part(parsed) + [str(parsed["patient"]), str(parsed["name"])]
    return "/".join(parts)


def candidate_keys(parsed: dict[str, object]) -> tuple[str, ...]:
    """MAT variable names to try for a parsed path, most specific first:
    ``("kspace_full", "kspace")`` for FullSample, ``("kspace_sub04", "kspace")`` for AccFactor04."""
    acc = parsed.get("acc_factor")
    return (f"kspace_sub{int(acc):02d}", "kspace") if acc is not None else (DEFAULT_KEY, "kspace")


# --------------------------------------------------------------------------------------
# File kinds: modality label and per-slice views
# --------------------------------------------------------------------------------------

# (modality folder, file-stem regex (lower case), label)
_KIND_RULES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("Cine", re.compile(r"^cine_(sax|lax|lvot|lax_(2ch|3ch|4ch))$"), "cine"),
    ("Mapping", re.compile(r"^t1map$"), "t1map"),
    ("Mapping", re.compile(r"^t2map$"), "t2map"),
    ("LGE", re.compile(r"^lge_(sax|lax|lax_(2ch|3ch|4ch))$"), "lge"),
    ("BlackBlood", re.compile(r"^blackblood$"), "blackblood"),
)


def modality_label(modality: str, name: str) -> str:
    """Classification label (one of :data:`MODALITIES`) of a file: ``("Mapping", "T2map") -> "t2map"``.

    Raises ValueError for an unsupported (folder, stem) pair, e.g. ``("Cine", "T1map")``.
    """
    stem = name.lower()
    for folder, rx, label in _KIND_RULES:
        if folder.lower() == modality.lower() and rx.match(stem):
            return label
    known = ", ".join(f"{f}/{rx.pattern}" for f, rx, _ in _KIND_RULES)
    raise ValueError(f"unsupported file kind {modality}/{name}.mat (supported: {known})")


def slice_views(name: str, nz: int) -> tuple[str, ...]:
    """View (one of :data:`VIEWS`) of each of the ``nz`` slices of file stem ``name``.

    ``cine_lax`` / ``lge_lax`` -> ``("2ch", "3ch", "4ch")`` (requires nz == 3);
    ``*_lax_2ch`` etc. -> that view for every slice; ``cine_lvot`` -> ``"lvot"``;
    ``*_sax``, ``T1map``, ``T2map``, ``blackblood`` -> ``"sax"``.
    """
    if nz < 1:
        raise ValueError(f"{name}: need at least one slice, got nz={nz}")
    stem = name.lower()
    m = re.match(r"^(cine|lge)_lax_(2ch|3ch|4ch)$", stem)
    if m:
        return (m.group(2),) * nz
    if re.match(r"^(cine|lge)_lax$", stem):
        if nz != 3:
            raise ValueError(
                f"{name}: a long-axis stack must hold exactly 3 slices (2ch, 3ch, 4ch), got nz={nz}; "
                "per-slice views unknown"
            )
        return ("2ch", "3ch", "4ch")
    if stem == "cine_lvot":
        return ("lvot",) * nz
    if re.match(r"^(cine|lge)_sax$", stem) or stem in ("t1map", "t2map", "blackblood"):
        return ("sax",) * nz
    raise ValueError(f"{name}: unknown file kind, cannot tell the slice views")


def stratum(modality: str, name: str) -> str:
    """The (modality, view) stratum of a file, from its folder and stem alone (what the conversion balances over
    the splits): ``"cine/sax"``, ``"cine/2ch"``, ``"t1map/sax"``; a long-axis stack (``cine_lax``) is
    ``"cine/2ch+3ch+4ch"``.  An unsupported kind is ``"unsupported/<Modality>/<name>"`` (it is quarantined
    at conversion anyway)."""
    try:
        label = modality_label(modality, name)
        nz = 3 if re.match(r"^(cine|lge)_lax$", name.lower()) else 1
        views = slice_views(name, nz)
    except ValueError:
        return f"unsupported/{modality}/{name}"
    return f"{label}/{'+'.join(dict.fromkeys(views))}"


# --------------------------------------------------------------------------------------
# MAT-file reader
# --------------------------------------------------------------------------------------

_COMPLEX_DT = np.dtype([("real", "<f4"), ("imag", "<f4")])


@dataclass(frozen=True)
class KSpaceData:
    """A k-space array read from a MAT file and where it came from."""

    kspace: np.ndarray  # complex64, (nt, nz, nc, ny, nx) or (nz, nc, ny, nx)
    format: str  # "v73" | "v5"
    key: str  # the MAT variable read
    stored_shape: tuple[int, ...]  # as stored, canonical (reversed MATLAB) order, dropped singleton axes absent


def _keys_tuple(key: str | Sequence[str]) -> tuple[str, ...]:
    keys = (key,) if isinstance(key, str) else tuple(key)
    if not keys:
        raise ValueError("need at least one MAT variable name")
    return keys


def _missing(p: Path, keys: tuple[str, ...], present: list[str], fmt: str) -> ValueError:
    want = f"key {keys[0]!r}" if len(keys) == 1 else f"none of the keys {list(keys)}"
    return ValueError(f"{p}: {want} not found in MAT {fmt} file (keys present: {present})")


#: Canonical rank of each file kind (:data:`MODALITIES` label): cine and mapping carry a frame axis (cardiac
#: phase, inversion or echo time), LGE and black blood do not.
KIND_RANK: dict[str, int] = {"cine": 5, "t1map": 5, "t2map": 5, "lge": 4, "blackblood": 4}


def _full_rank(p: Path, key: str, matlab_shape: tuple[int, ...], ndim: int | None) -> tuple[int, ...]:
    """The MATLAB-order shape with the trailing singleton axes MATLAB drops when it saves put back.

    MATLAB stores no trailing singleton dimension beyond the second (v5 and v7.3 alike), so a single-frame cine is
    saved as ``(kx, ky, sc, sz)``, a single-slice single-frame one as ``(kx, ky, sc)`` and a single-coil one as
    ``(kx, ky)`` (CMRxRecon's public ``cine_sax.mat`` demo file: ``(512, 246)``). ``ndim``: the canonical rank of
    the file kind (:data:`KIND_RANK`); None: 4 or 5 as stored, lower ranks padded to 4."""
    rank = len(matlab_shape)
    target = ndim if ndim is not None else max(rank, 4)
    if rank < 2 or rank > 5 or rank > target:
        want = f"{target}" if ndim is not None else "4 (kx, ky, sc, sz) or 5 (kx, ky, sc, sz, t)"
        raise ValueError(f"{p}: {key!r} has rank {rank} (MATLAB shape {matlab_shape}), expected at most {want} "
                         "(MATLAB order; trailing singleton axes may be dropped)")
    if 0 in matlab_shape:
        raise ValueError(f"{p}: {key!r} is empty (MATLAB shape {matlab_shape})")
    return tuple(matlab_shape) + (1,) * (target - rank)


def _read_v73(p: Path, keys: tuple[str, ...], ndim: int | None) -> KSpaceData:
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise ValueError(f"{p}: corrupt or truncated MATLAB v7.3 (HDF5) file ({e})") from e
    with f:
        present = sorted(k for k in f.keys() if not k.startswith("#"))
        key = next((k for k in keys if k in f), None)
        if key is None:
            raise _missing(p, keys, present, "v7.3")
        ds = f[key]
        if not isinstance(ds, h5py.Dataset):
            raise ValueError(f"{p}: {key!r} is a {type(ds).__name__}, not an array")
        dt = ds.dtype
        names = dt.names or ()
        if set(names) != {"real", "imag"} or any(dt[n].kind != "f" for n in names):
            raise ValueError(f"{p}: {key!r} has non-complex dtype {dt}, expected complex (compound real/imag)")
        full = _full_rank(p, key, tuple(ds.shape)[::-1], ndim)[::-1]  # h5py sees the reversed MATLAB order
        try:
            raw = ds[()]
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{p}: corrupt or truncated MATLAB v7.3 (HDF5) file, cannot read {key!r} ({e})") from e
    if raw.dtype == _COMPLEX_DT:
        arr = np.ascontiguousarray(raw).view(np.complex64)
    else:
        arr = np.empty(raw.shape, dtype=np.complex64)
        arr.real = raw["real"]
        arr.imag = raw["imag"]
    return KSpaceData(arr.reshape(full), "v73", key, tuple(int(d) for d in raw.shape))


def _read_v5(p: Path, keys: tuple[str, ...], ndim: int | None) -> KSpaceData:
    try:
        mat = scipy.io.loadmat(p, variable_names=list(keys))
    except Exception as e:  # scipy raises ValueError/TypeError/OSError/MatReadError/... on junk
        with open(p, "rb") as fh:
            head = fh.read(20)
        if head.startswith(b"MATLAB 7.3"):
            raise ValueError(f"{p}: corrupt or truncated MATLAB v7.3 file (header present, no HDF5 data)") from e
        if head.startswith(b"MATLAB 5.0"):
            raise ValueError(f"{p}: corrupt or truncated MATLAB v5 file ({type(e).__name__}: {e})") from e
        raise ValueError(f"{p}: not a readable MATLAB MAT-file ({type(e).__name__}: {e})") from e
    key = next((k for k in keys if k in mat), None)
    if key is None:
        try:
            present = sorted(str(v[0]) for v in scipy.io.whosmat(p))
        except Exception:  # pragma: no cover - loadmat just read the file
            present = []
        raise _missing(p, keys, present, "v5")
    arr = np.asarray(mat[key])
    if not np.iscomplexobj(arr):
        raise ValueError(f"{p}: {key!r} has non-complex dtype {arr.dtype}, expected complex")
    stored = tuple(int(d) for d in arr.shape)
    arr = arr.reshape(_full_rank(p, key, stored, ndim))
    return KSpaceData(np.ascontiguousarray(arr.T, dtype=np.complex64), "v5", key, stored[::-1])


def load_kspace(path: str | os.PathLike[str], key: str | Sequence[str] = DEFAULT_KEY,
                ndim: int | None = None) -> KSpaceData:
    """Like :func:`read_kspace_mat`, also reporting the file format, the variable read and its stored shape."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise ValueError(f"{p}: a symbolic link that does not resolve (dangling, or a loop)")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    keys = _keys_tuple(key)
    if ndim not in (None, 4, 5):
        raise ValueError(f"ndim must be None, 4 or 5, got {ndim}")
    if h5py.is_hdf5(p):
        return _read_v73(p, keys, ndim)
    return _read_v5(p, keys, ndim)


def read_kspace_mat(path: str | os.PathLike[str], key: str | Sequence[str] = DEFAULT_KEY,
                    ndim: int | None = None) -> np.ndarray:
    """Read k-space from a MATLAB v7.3 (HDF5) or v5 MAT-file as complex64.

    ``key`` is the MAT variable, or a sequence of names tried in order (the first
    present wins; see :func:`candidate_keys`).  Returns the canonical order
    ``(nt, nz, nc, ny, nx)`` / ``(nz, nc, ny, nx)`` for both formats (v5 files are
    stored in MATLAB order and transposed back).

    ``ndim``: the canonical rank the file kind has (:data:`KIND_RANK`: 5 with a frame
    axis, 4 without); the trailing singleton axes MATLAB drops on saving (a single
    frame, slice or coil) are put back up to it.  None: a stored rank 4 or 5 is taken
    as it is, a lower one is padded to 4.

    Raises FileNotFoundError for a missing file and ValueError -- naming the file
    and the reason -- for: not a MAT file, a corrupt or truncated file, a missing
    key (listing the keys present), a non-complex dtype, a rank above ``ndim`` (or
    5) or below 2, or an empty array.
    """
    return load_kspace(path, key, ndim).kspace
