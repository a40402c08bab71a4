"""Raw multi-coil k-space file -> MetaCLIP-CMR training sample (numpy + scipy only).

Per file (one sequence) of the CMRxRecon / MMCMR-427K layout
(:mod:`data_prep.kspace.source`), :func:`preprocess_kspace_file` returns the
preprocessed images and the acquisition metadata with its text, following
MetaCLIP-CMR Sec. 2.2:

1. **Reconstruction** (:func:`reconstruct`): centred orthonormal inverse 2D FFT
   per coil, root-sum-of-squares over coils ("sum-of-squares (SOS)
   reconstruction") -> float32 magnitude ``(nt, nz, ny, nx)``; 4D files
   (LGE, black blood) get ``nt = 1``.
2. **Resize** (:func:`resize_images`) of every image to ``size`` (224 x 224 by
   default) with antialiased bilinear interpolation (triangle filter widened
   by the scale factor when downsampling -- PIL ``BILINEAR`` /
   ``torch.nn.functional.interpolate(mode="bilinear", antialias=True,
   align_corners=False)``, which it matches to float32 rounding).  The paper
   says "resized to 224x224", so by default images are *stretched* to the
   square (aspect ratio not kept); ``keep_aspect=True`` instead pads the
   shorter axis symmetrically with zeros (air) before resizing.
3. **Normalisation** (:func:`normalize_sequence`): one z-score per *sequence*
   (mean / std over all frames and slices of the resized images, std floored
   at ``1e-6 * max |image|`` so a constant sequence gives zeros instead of
   inf), so every output sequence has mean 0 and std 1.  Resizing is linear
   with weights summing to one, so this is the paper's "z-score normalised and
   resized" with the statistics taken on the resampled grid (upsampling small
   matrices smooths noise and would otherwise leave std < 1).  The paper
   normalises "each slice"; per-sequence statistics (the project's choice)
   keep the relative intensities of frames / slices (e.g. the T1 recovery of a
   mapping series) and apply one affine map to every image of the sequence.
4. **float16** output ``(nt, nz, H, W)``, clipped to the float16 range.

Metadata text (:func:`metadata_text`) follows the paper's predefined templates
(Fig. 2), e.g. template 0: ``"cine cardiac MRI in short-axis view acquired on a
3.0T Siemens Vida scanner"``.  :data:`TEMPLATES` holds a few variants; training
samples a variant index with its own seeded RNG (``rng.integers(len(TEMPLATES))``).
A sequence whose slices have different views (``cine_lax``: 2ch, 3ch, 4ch)
gets one text per slice (``slice_texts``) and a sequence-level text naming all
its views.  Texts are deterministic functions of the metadata.

Labels for downstream classification: :data:`MODALITIES` and :data:`VIEWS`
(stable order; ``meta["modality_index"]``, ``meta["view_indices"]``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from core.config import InputError
from data_prep.kspace.mri import centered_ifft2, rss
from data_prep.kspace.source import (
    KIND_RANK,
    MODALITIES,
    VIEWS,
    candidate_keys,
    load_kspace,
    modality_label,
    parse_relpath,
    patient_key,
    sequence_key,
    slice_views,
)

__all__ = [
    "MODALITIES",
    "MODALITY_PHRASES",
    "TEMPLATES",
    "VIEWS",
    "VIEW_PHRASES",
    "metadata_text",
    "metadata_texts",
    "normalize_sequence",
    "preprocess_images",
    "preprocess_kspace_file",
    "readout_window",
    "reconstruct",
    "resize_images",
]

DEFAULT_SIZE = 224
STD_FLOOR_REL = 1e-6
_F16_MAX = float(np.finfo(np.float16).max)

# --------------------------------------------------------------------------------------
# Reconstruction and image preprocessing
# --------------------------------------------------------------------------------------


def readout_window(nx: int, readout_oversampling: float) -> slice:
    """The central ``nx / readout_oversampling`` image columns: the field of view an oversampled readout
    (``nx`` samples) was acquired for. 1.0 keeps every column."""
    if not readout_oversampling >= 1.0:
        raise ValueError(f"readout_oversampling must be >= 1, got {readout_oversampling}")
    keep = max(1, int(round(nx / readout_oversampling)))
    start = (nx - keep) // 2
    return slice(start, start + keep)


def reconstruct(kspace: np.ndarray, readout_oversampling: float = 1.0) -> np.ndarray:
    """Fully sampled multi-coil k-space -> RSS magnitude, float32 ``(nt, nz, ny, nx / readout_oversampling)``.

    ``kspace``: complex ``(nt, nz, nc, ny, nx)`` or ``(nz, nc, ny, nx)`` (-> nt = 1).
    Centred orthonormal inverse FFT over (ny, nx) (:func:`data_prep.kspace.mri.centered_ifft2`), the central
    ``1 / readout_oversampling`` of the readout (x) kept in image space (CMRxRecon: 2x oversampled, 512 -> 256),
    then root-sum-of-squares over the coil axis (:func:`data_prep.kspace.mri.rss`).
    Frames are processed one at a time to bound temporary memory.
    """
    k = np.asarray(kspace)
    if not np.iscomplexobj(k):
        raise ValueError(f"k-space must be complex, got dtype {k.dtype}")
    if k.ndim == 4:
        k = k[None]
    if k.ndim != 5:
        raise ValueError(f"k-space must be 4D (nz, nc, ny, nx) or 5D (nt, nz, nc, ny, nx), got shape {k.shape}")
    if k.dtype != np.complex64:
        k = k.astype(np.complex64)
    nt, nz, _, ny, nx = k.shape
    window = readout_window(nx, readout_oversampling)
    out = np.empty((nt, nz, ny, window.stop - window.start), dtype=np.float32)
    for t in range(nt):
        out[t] = rss(centered_ifft2(k[t])[..., window], coil_axis=-3)
    return out


def normalize_sequence(images: np.ndarray, std_floor_rel: float = STD_FLOOR_REL) -> tuple[np.ndarray, float, float]:
    """Per-sequence z-score: ``(images - mean) / max(std, std_floor_rel * max|images|)``.

    Statistics in float64 over the whole array; returns (float32 array, mean, std used).
    """
    x = np.asarray(images)
    x64 = x.astype(np.float64, copy=False)
    mean = float(x64.mean())
    std = float(x64.std())
    floor = max(std_floor_rel * float(np.abs(x64).max()), np.finfo(np.float32).tiny)
    std = max(std, floor)
    return ((x64 - mean) / std).astype(np.float32), mean, std


@functools.lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of antialiased linear resampling (half-pixel centres).

    Triangle kernel of half-width ``max(1, n_in / n_out)`` input pixels centred on each
    output pixel centre, weights renormalised per output pixel (edges: clamp) -- the
    PIL / torch ``antialias=True`` bilinear filter.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centers = (np.arange(n_out, dtype=np.float64) + 0.5) * scale  # output centres in input coordinates
    src = np.arange(n_in, dtype=np.float64) + 0.5
    w = np.clip(1.0 - np.abs(src[None, :] - centers[:, None]) / support, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


def resize_images(images: np.ndarray, size: int | tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """Resize the last two axes to ``size`` ((H, W) or an int for a square), float32.

    Separable antialiased bilinear resampling (see :func:`_resize_matrix`); leading axes
    are batch axes.  Same size in -> a copy of the input.
    """
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    x = np.asarray(images, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"need at least 2 dimensions, got shape {x.shape}")
    ny, nx = x.shape[-2:]
    if (ny, nx) == (h, w):
        return x.copy()
    lead = x.shape[:-2]
    flat = x.reshape(-1, ny, nx)
    wy = _resize_matrix(ny, h)
    wx = _resize_matrix(nx, w)
    out = np.matmul(np.matmul(wy, flat), wx.T)  # (N, h, w)
    return np.ascontiguousarray(out.reshape(*lead, h, w), dtype=np.float32)


def _pad_square(x: np.ndarray, value: float) -> np.ndarray:
    ny, nx = x.shape[-2:]
    n = max(ny, nx)
    py, px = n - ny, n - nx
    pad = [(0, 0)] * (x.ndim - 2) + [(py // 2, py - py // 2), (px // 2, px - px // 2)]
    return np.pad(x, pad, mode="constant", constant_values=value)


def preprocess_images(
    magnitude: np.ndarray,
    size: int | tuple[int, int] = DEFAULT_SIZE,
    *,
    keep_aspect: bool = False,
    std_floor_rel: float = STD_FLOOR_REL,
) -> tuple[np.ndarray, float, float]:
    """Magnitude ``(..., ny, nx)`` -> resized, z-scored float16 ``(..., H, W)``; also (mean, std).

    See the module docstring: antialiased bilinear resize (stretch, or pad to square
    with zeros first when ``keep_aspect``), then one z-score over the whole resized
    array (the sequence).  ``mean`` / ``std`` are in raw magnitude units.
    """
    x = np.asarray(magnitude, dtype=np.float32)
    if keep_aspect:
        x = _pad_square(x, 0.0)  # raw zero signal (air)
    z, mean, std = normalize_sequence(resize_images(x, size), std_floor_rel)
    np.clip(z, -_F16_MAX, _F16_MAX, out=z)
    return z.astype(np.float16), mean, std


# --------------------------------------------------------------------------------------
# Metadata text
# --------------------------------------------------------------------------------------

#: Phrase per modality label (:data:`MODALITIES`).
MODALITY_PHRASES: Mapping[str, str] = {
    "cine": "cine",
    "t1map": "T1 mapping",
    "t2map": "T2 mapping",
    "lge": "late gadolinium enhancement",
    "blackblood": "black-blood",
}
#: Phrase per view label (:data:`VIEWS`).
VIEW_PHRASES: Mapping[str, str] = {
    "sax": "short-axis",
    "2ch": "two-chamber long-axis",
    "3ch": "three-chamber long-axis",
    "4ch": "four-chamber long-axis",
    "lvot": "left ventricular outflow tract (LVOT)",
}
assert set(MODALITY_PHRASES) == set(MODALITIES) and set(VIEW_PHRASES) == set(VIEWS)

#: Predefined templates (with scanner, without scanner information).  Fields:
#: ``{modality}``, ``{view}`` (one view, or a list "two-chamber, three-chamber and
#: four-chamber long-axis"), ``{views}`` ("view" / "views"), ``{scanner}``
#: (e.g. "3.0T Siemens Vida").  Index 0 is the paper's example form.  Append only.
TEMPLATES: tuple[tuple[str, str], ...] = (
    (
        "{modality} cardiac MRI in {view} {views} acquired on a {scanner} scanner",
        "{modality} cardiac MRI in {view} {views}",
    ),
    (
        "a {modality} cardiac MR image in the {view} {views} from a {scanner} scanner",
        "a {modality} cardiac MR image in the {view} {views}",
    ),
    (
        "cardiac magnetic resonance: {modality}, {view} {views}, {scanner} scanner",
        "cardiac magnetic resonance: {modality}, {view} {views}",
    ),
    (
        "{view} {modality} CMR acquired with a {scanner} MRI system",
        "{view} {modality} CMR",
    ),
)


def _field_phrase(field_t: object) -> str | None:
    if field_t is None:
        return None
    s = f"{float(field_t):g}"  # type: ignore[arg-type]
    return (s if "." in s else s + ".0") + "T"  # 3 -> "3.0T", 1.5 -> "1.5T", 0.55 -> "0.55T"


def _scanner_phrase(meta: Mapping[str, object]) -> str:
    parts = [
        _field_phrase(meta.get("field_strength_t")),
        meta.get("vendor"),
        meta.get("scanner_model"),
    ]
    return " ".join(str(p).replace("_", " ") for p in parts if p)


def _view_phrase(views: Sequence[str]) -> tuple[str, str]:
    distinct = list(dict.fromkeys(views))  # order of first appearance
    for v in distinct:
        if v not in VIEW_PHRASES:
            raise ValueError(f"unknown view {v!r}; known: {VIEWS}")
    if len(distinct) == 1:
        return VIEW_PHRASES[distinct[0]], "view"
    phrases = [VIEW_PHRASES[v] for v in distinct]
    suffix = " long-axis"
    if all(p.endswith(suffix) for p in phrases):  # "two-chamber, three-chamber and four-chamber long-axis"
        heads = [p[: -len(suffix)] for p in phrases]
        return ", ".join(heads[:-1]) + " and " + heads[-1] + suffix, "views"
    return ", ".join(phrases[:-1]) + " and " + phrases[-1], "views"


def _modality_of(meta: Mapping[str, object]) -> str:
    label = meta.get("modality_label")
    if label is None:
        label = modality_label(str(meta["modality"]), str(meta["name"]))
    if label not in MODALITY_PHRASES:
        raise ValueError(f"unknown modality label {label!r}; known: {MODALITIES}")
    return str(label)


def metadata_text(meta: Mapping[str, object], template: int = 0, slice_index: int | None = None) -> str:
    """Metadata sentence for a sequence (``slice_index=None``) or one of its slices.

    ``meta`` needs ``views`` (one per slice) and either ``modality_label`` or
    (``modality`` folder, ``name``); ``field_strength_t``, ``vendor`` and
    ``scanner_model`` are optional (left out of the text when missing/None).
    ``template`` indexes :data:`TEMPLATES`.  Deterministic.
    """
    if not 0 <= int(template) < len(TEMPLATES):
        raise ValueError(f"template must be in [0, {len(TEMPLATES)}), got {template}")
    views = tuple(meta["views"])  # type: ignore[arg-type]
    if not views:
        raise ValueError("meta['views'] is empty")
    if slice_index is not None:
        views = (views[int(slice_index)],)
    view, views_word = _view_phrase(views)
    scanner = _scanner_phrase(meta)
    with_scanner, without = TEMPLATES[int(template)]
    fmt = with_scanner if scanner else without
    return fmt.format(modality=MODALITY_PHRASES[_modality_of(meta)], view=view, views=views_word, scanner=scanner)


def metadata_texts(meta: Mapping[str, object]) -> dict[str, object]:
    """All texts of a sequence: ``text`` (template 0, sequence level), ``texts``
    (sequence level, one per template) and ``slice_texts`` (``[template][slice]``)."""
    nz = len(tuple(meta["views"]))  # type: ignore[arg-type]
    texts = tuple(metadata_text(meta, t) for t in range(len(TEMPLATES)))
    slice_texts = tuple(
        tuple(metadata_text(meta, t, z) for z in range(nz)) for t in range(len(TEMPLATES))
    )
    return {"text": texts[0], "texts": texts, "slice_texts": slice_texts}


# --------------------------------------------------------------------------------------
# One file -> one sample
# --------------------------------------------------------------------------------------


def _err(path: object, msg: str) -> InputError:
    p = os.fspath(path)  # type: ignore[arg-type]
    return InputError(msg if msg.startswith(str(p)) else f"{p}: {msg}")


def preprocess_kspace_file(
    path: str | os.PathLike[str],
    relpath: str | os.PathLike[str] | None = None,
    size: int | tuple[int, int] = DEFAULT_SIZE,
    *,
    key: str | Sequence[str] | None = None,
    keep_aspect: bool = False,
    readout_oversampling: float = 1.0,
) -> tuple[np.ndarray, dict[str, object]]:
    """Read, reconstruct and preprocess one k-space file.

    ``path``: the file; ``relpath``: its path in the dataset layout (metadata is parsed
    from it; default: ``path`` itself, which works when it contains ``MultiCoil/...``).
    ``key``: MAT variable name(s); default :func:`data_prep.kspace.source.candidate_keys`
    (``kspace_full``, then ``kspace``; ``kspace_subNN`` for AccFactorNN folders).
    The file kind's rank (:data:`data_prep.kspace.source.KIND_RANK`) restores the trailing singleton axes MATLAB
    drops. ``readout_oversampling``: the readout's oversampling factor (CMRxRecon / MMCMR-427K: 2), removed in
    image space (:func:`reconstruct`).

    Returns ``images`` float16 ``(nt, nz, H, W)`` (nt = 1 for 4D files) and ``meta``
    (plain Python values): sequence_key, patient_key, relpath, modality (folder),
    modality_label, modality_index, name, views, view_indices, multi_view, split,
    sampling, acc_factor, center, vendor, field_strength_t, scanner_model, scanner,
    patient, format ("v73"/"v5"), mat_key, kspace_shape (canonical, full rank), stored_shape (as stored),
    readout_oversampling, original_shape ``(nt, nz, ny, nx)`` (nx after the oversampling is removed), has_time_axis, nt, nz, nc, size, keep_aspect, norm_mean,
    norm_std (raw units), n_zero_images, text, texts, slice_texts.

    Raises ValueError naming the file and the reason: path outside the layout,
    unsupported file kind, unreadable / truncated / non-MAT file, missing key,
    wrong rank or dtype, non-finite or all-zero k-space, non-finite images, a
    long-axis stack whose slice count does not give its views.  A missing file
    raises FileNotFoundError.
    """
    p = Path(path)
    try:
        parsed = parse_relpath(p if relpath is None else relpath)
        label = modality_label(str(parsed["modality"]), str(parsed["name"]))
    except ValueError as e:
        raise _err(p, str(e)) from e
    data = load_kspace(p, candidate_keys(parsed) if key is None else key, ndim=KIND_RANK[label])
    ksp = data.kspace
    n_bad = int(ksp.size - np.count_nonzero(np.isfinite(ksp)))
    if n_bad:
        raise _err(p, f"k-space {data.key!r} has {n_bad} non-finite values")
    if not np.any(ksp):
        raise _err(p, f"k-space {data.key!r} has zero energy (all zeros)")
    mag = reconstruct(ksp, readout_oversampling)
    if not np.isfinite(mag).all():
        raise _err(p, "reconstructed images are not finite (overflow)")
    nt, nz, ny, nx = mag.shape
    try:
        views = slice_views(str(parsed["name"]), nz)
    except ValueError as e:
        raise _err(p, str(e)) from e
    images, mean, std = preprocess_images(mag, size, keep_aspect=keep_aspect)
    if not np.isfinite(images).all():
        raise _err(p, "preprocessed images are not finite")
    meta: dict[str, object] = {
        "sequence_key": sequence_key(parsed),
        "patient_key": patient_key(parsed),
        "relpath": parsed["relpath"],
        "modality": parsed["modality"],
        "modality_label": label,
        "modality_index": MODALITIES.index(label),
        "name": parsed["name"],
        "views": views,
        "view_indices": tuple(VIEWS.index(v) for v in views),
        "multi_view": len(set(views)) > 1,
        "split": parsed["split"],
        "sampling": parsed["sampling"],
        "acc_factor": parsed["acc_factor"],
        "center": parsed["center"],
        "vendor": parsed["vendor"],
        "field_strength_t": parsed["field_strength_t"],
        "scanner_model": parsed["scanner_model"],
        "scanner": parsed["scanner"],
        "patient": parsed["patient"],
        "format": data.format,
        "mat_key": data.key,
        "kspace_shape": tuple(int(d) for d in ksp.shape),
        "stored_shape": data.stored_shape,
        "readout_oversampling": float(readout_oversampling),
        "original_shape": (nt, nz, ny, nx),
        "has_time_axis": ksp.ndim == 5,
        "nt": nt,
        "nz": nz,
        "nc": int(ksp.shape[-3]),
        "size": tuple(int(d) for d in images.shape[-2:]),
        "keep_aspect": bool(keep_aspect),
        "norm_mean": mean,
        "norm_std": std,
        "n_zero_images": int(np.count_nonzero(~mag.reshape(nt * nz, -1).any(axis=1))),
    }
    meta.update(metadata_texts(meta))
    return images, meta

