"""Maps to pictures: upsampling (bicubic, as in the paper), alignment, colour maps, overlays."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..io.images import Prepared

# 'jet'-like anchors (value, R, G, B), linearly interpolated
_ANCHORS = np.array([
    [0.00, 0, 0, 131], [0.125, 0, 0, 255], [0.375, 0, 255, 255],
    [0.625, 255, 255, 0], [0.875, 255, 0, 0], [1.00, 128, 0, 0]], dtype=np.float64)


def upsample(map2d: np.ndarray, size: tuple, method: str = "bicubic") -> np.ndarray:
    """Resize a float map to ``size`` = (width, height)."""
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[method]
    img = Image.fromarray(np.ascontiguousarray(map2d, dtype=np.float32), mode="F")
    return np.asarray(img.resize(tuple(int(v) for v in size), resample), dtype=np.float32)


def to_image_space(map2d: np.ndarray, prepared: Prepared, method: str = "bicubic") -> np.ndarray:
    """The map aligned with the original image: the model input covered the resized image
    (or its crop box); the map is stretched over that area, then resized to the original."""
    rw, rh = prepared.resized_size
    if prepared.crop_box is None:
        canvas = upsample(map2d, (rw, rh), method)
    else:
        left, top, right, bottom = prepared.crop_box
        canvas = np.zeros((rh, rw), np.float32)
        canvas[top:bottom, left:right] = upsample(map2d, (right - left, bottom - top), method)
    if (rw, rh) != tuple(prepared.original_size):
        canvas = upsample(canvas, prepared.original_size, method)
    return canvas


def normalize(map2d: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the maximum; negative values (bicubic overshoot) clip to 0."""
    m = np.nan_to_num(np.asarray(map2d, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    m = np.maximum(m, 0)
    top = m.max() if m.size else 0.0
    return m / top if top > 0 else np.zeros_like(m)


def colormap(values01: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) for values in [0, 1]."""
    v = np.clip(values01, 0, 1)
    rgb = [np.interp(v, _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)]
    return np.stack(rgb, axis=-1).astype(np.uint8)


def _colorbar(height: int, width: int = 16) -> Image.Image:
    ramp = np.linspace(1, 0, height)[:, None].repeat(width, axis=1)
    return Image.fromarray(colormap(ramp))


def overlay(img: Image.Image, map2d: np.ndarray, alpha: float = 0.5, colorbar: bool = False) -> Image.Image:
    """The heat map (normalised, resized to the image) blended over the image."""
    img = img.convert("RGB")
    m = map2d if map2d.shape == (img.height, img.width) else upsample(map2d, img.size)
    heat = Image.fromarray(colormap(normalize(m)))
    out = Image.blend(img, heat, alpha)
    if colorbar:
        bar = _colorbar(out.height)
        canvas = Image.new("RGB", (out.width + bar.width + 4, out.height), "white")
        canvas.paste(out, (0, 0))
        canvas.paste(bar, (out.width + 4, 0))
        out = canvas
    return out


def panel(img: Image.Image, maps: list, alpha: float = 0.5) -> Image.Image:
    """Side by side: the image, then one overlay per (caption, map), captions on top."""
    tiles = [("image", img.convert("RGB"))] + [(cap, overlay(img, m, alpha)) for cap, m in maps]
    cap_h = 14
    w, h = img.size
    canvas = Image.new("RGB", (w * len(tiles), h + cap_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (cap, tile) in enumerate(tiles):
        canvas.paste(tile, (i * w, cap_h))
        draw.text((i * w + 3, 1), cap, fill="black")
    return canvas


def save_heatmap_png(map2d: np.ndarray, path, min_side: int = 224) -> None:
    """The map at layer resolution, colour-mapped, nearest-upscaled to at least ``min_side``."""
    h, w = map2d.shape
    k = max(1, int(np.ceil(min_side / max(1, min(h, w)))))
    Image.fromarray(colormap(normalize(map2d))).resize((w * k, h * k), Image.NEAREST).save(path)
