"""The paper's map post-processing: bicubic upsampling to the image for every method, and a
Gaussian blur with sigma = 0.02 * max(W, H) for grad, deconv, guided and LRP.

    blur_sigma(W, H) = 0.02 * max(W, H)                       (W, H: the final map size)
    gaussian_kernel1d(sigma): g_k = exp(-k^2 / (2 sigma^2)) / sum_k', |k| <= ceil(4 sigma)
    gaussian_blur(m, sigma)[y, x] = sum_{dy, dx} g_dy g_dx m[refl(y + dy), refl(x + dx)]

``refl`` is the half-sample symmetric extension (... 1 0 | 0 1 2 ... n-1 | n-1 n-2 ...,
repeated for kernels wider than the map; scipy.ndimage's ``reflect``). With a symmetric
kernel this operator is symmetric, so it preserves both constants and the map's mass
(sum m). ``postprocess_map`` upsamples first (bicubic, ``maps.upsample``), then blurs with the
sigma of the final size.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from ..errors import ExciteError

BLUR_FRACTION = 0.02
TRUNCATE = 4.0


def blur_sigma(width: int, height: int, fraction: float = BLUR_FRACTION) -> float:
    """The paper's blur: sigma = 0.02 * max(W, H) pixels."""
    return float(fraction) * max(int(width), int(height))


def gaussian_kernel1d(sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
    """Normalised sampled Gaussian of radius ceil(truncate * sigma) (float64); [1] for sigma 0."""
    if not np.isfinite(sigma) or sigma < 0:
        raise ExciteError(f"blur sigma must be a finite number >= 0, got {sigma}")
    radius = int(math.ceil(truncate * sigma))
    if sigma == 0 or radius == 0:
        return np.ones(1)
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (k / sigma) ** 2)
    return g / g.sum()


def _blur_axis(m: np.ndarray, g: np.ndarray, axis: int) -> np.ndarray:
    radius = len(g) // 2
    if radius == 0:
        return m
    pad = [(0, 0)] * m.ndim
    pad[axis] = (radius, radius)
    mp = np.pad(m, pad, mode="symmetric")
    n = m.shape[axis]
    out = np.zeros(m.shape, np.float64)
    for i, w in enumerate(g):
        out += w * np.take(mp, np.arange(i, i + n), axis=axis)
    return out


def gaussian_blur(map2d: np.ndarray, sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
    """Separable Gaussian blur of the last two axes (mass and constants preserved)."""
    m = np.asarray(map2d, np.float64)
    if m.ndim < 2:
        raise ExciteError(f"a map to blur needs 2 axes (H, W), got shape {m.shape}")
    g = gaussian_kernel1d(sigma, truncate)
    return _blur_axis(_blur_axis(m, g, m.ndim - 2), g, m.ndim - 1)


def postprocess_map(map2d: np.ndarray, size: Optional[Tuple[int, int]] = None, blur: bool = True,
                    fraction: float = BLUR_FRACTION, resample: str = "bicubic") -> np.ndarray:
    """The map as the paper shows it: upsampled to ``size`` = (W, H) (bicubic), then, with
    ``blur``, Gaussian-blurred with sigma = ``fraction`` * max(W, H). float32 (H, W)."""
    from .maps import upsample

    m = np.asarray(map2d, np.float32)
    if m.ndim != 2:
        raise ExciteError(f"a map must be 2-D (H, W), got shape {m.shape}")
    if size is not None and tuple(int(v) for v in size) != (m.shape[1], m.shape[0]):
        m = upsample(m, size, resample)
    if blur:
        m = gaussian_blur(m, blur_sigma(m.shape[1], m.shape[0], fraction)).astype(np.float32)
    return m


def postprocess_for(method: str, map2d: np.ndarray, size: Optional[Tuple[int, int]] = None,
                    blur: Optional[bool] = None) -> np.ndarray:
    """``postprocess_map`` with the method's own blur setting (``blur`` overrides it: the
    flag to turn the paper's blur off)."""
    from ..methods import get_any_method

    return postprocess_map(map2d, size, blur=get_any_method(method).blur if blur is None else blur)


def image_space_map(map2d: np.ndarray, prepared, method: str, full_res: bool = False, blur: bool = True,
                    image_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """A layer map (h, w) on the photo, as ``explain`` stores and draws it: aligned with the
    original image (:func:`onnx_excite.render.maps.to_image_space` of its ``prepared``
    geometry), at display size (long side at most 1600 px) unless ``full_res``, with the
    paper's blur where the method declares it (and ``blur``), clipped at 0 (bicubic overshoot).
    float32 (H, W)."""
    import dataclasses

    from ..methods import get_any_method
    from .maps import to_image_space
    from .overlay import display_size

    size = tuple(image_size or prepared.original_size)
    store = size if full_res else display_size(size, min_side=1)
    info = dataclasses.replace(prepared, original_size=store) if store != tuple(prepared.original_size) else prepared
    up = to_image_space(map2d, info)
    if blur and get_any_method(method).blur:  # the paper's blur, sigma = 0.02 max(W, H)
        up = gaussian_blur(up, blur_sigma(up.shape[1], up.shape[0])).astype(np.float32)
    return np.maximum(up, 0)
