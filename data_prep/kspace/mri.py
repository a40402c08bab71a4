"""MRI maths shared by the whole project (numpy only).

One implementation of the centred, orthonormal 2D Fourier transforms and the
root-sum-of-squares (RSS / SOS) coil combination:

* the synthetic k-space generator (``data_prep.synth.kspace``) uses
  :func:`centered_fft2` to turn coil images into k-space;
* the conversion job uses :func:`centered_ifft2` followed by :func:`rss` to
  reconstruct magnitude images from fully sampled multi-coil k-space, exactly
  as MetaCLIP-CMR does ("sum-of-squares (SOS) reconstruction").

Conventions
-----------
"Centred" means the DC sample sits at index ``n // 2`` of each transformed
axis both in image space and in k-space: ``ifftshift -> fft -> fftshift`` (and
``ifftshift -> ifft -> fftshift`` for the inverse).  ``norm="ortho"`` makes the
pair unitary, so energies are preserved and ``centered_ifft2(centered_fft2(x))
== x`` up to rounding.

Precision: single-precision input (float16/float32/complex64) gives a
complex64 result, anything else complex128 -- independent of the numpy version
(numpy < 2 always computes FFTs in double precision).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["centered_fft2", "centered_ifft2", "rss"]

_SINGLE = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.complex64))


def _out_dtype(a: np.ndarray) -> np.dtype:
    return np.dtype(np.complex64) if a.dtype in _SINGLE else np.dtype(np.complex128)


def _check_axes(a: np.ndarray, axes: Sequence[int]) -> tuple[int, int]:
    axes = tuple(int(ax) for ax in axes)
    if len(axes) != 2:
        raise ValueError(f"axes must name exactly two axes, got {axes!r}")
    if a.ndim < 2:
        raise ValueError(f"need an array with >= 2 dimensions, got shape {a.shape}")
    norm = tuple(ax % a.ndim for ax in axes)
    if norm[0] == norm[1]:
        raise ValueError(f"axes must be distinct, got {axes!r}")
    return norm  # type: ignore[return-value]


def centered_fft2(img: np.ndarray, axes: Sequence[int] = (-2, -1)) -> np.ndarray:
    """Centred orthonormal 2D FFT (image -> k-space) over ``axes``.

    ``fftshift(fft2(ifftshift(img), norm="ortho"))`` on the given axes; all
    other axes are batch axes.
    """
    a = np.asarray(img)
    ax = _check_axes(a, axes)
    out = np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(a, axes=ax), axes=ax, norm="ortho"), axes=ax
    )
    return out.astype(_out_dtype(a), copy=False)


def centered_ifft2(ksp: np.ndarray, axes: Sequence[int] = (-2, -1)) -> np.ndarray:
    """Centred orthonormal 2D inverse FFT (k-space -> image) over ``axes``.

    Exact inverse of :func:`centered_fft2` (up to floating-point rounding).
    """
    a = np.asarray(ksp)
    ax = _check_axes(a, axes)
    out = np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(a, axes=ax), axes=ax, norm="ortho"), axes=ax
    )
    return out.astype(_out_dtype(a), copy=False)


def rss(coil_images: np.ndarray, coil_axis: int) -> np.ndarray:
    """Root-sum-of-squares coil combination: ``sqrt(sum_c |x_c|^2)``.

    ``coil_axis`` is removed from the result.  The result is real: float32 for
    single-precision input, float64 otherwise.  For this project's k-space
    layout ((nt, nz, nc, ny, nx) or (nz, nc, ny, nx)) the coil axis is ``-3``.
    """
    a = np.asarray(coil_images)
    if a.ndim == 0:
        raise ValueError("rss needs an array with a coil axis")
    power = a.real * a.real
    if np.iscomplexobj(a):
        power = power + a.imag * a.imag
    out = np.sqrt(np.sum(power, axis=coil_axis))
    real_dtype = np.float32 if a.dtype in _SINGLE else np.float64
    return out.astype(real_dtype, copy=False)
