"""Image loading and preprocessing, with the geometry to map results back onto the image."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ExciteError


@dataclass
class Prepared:
    """How an image became the model input: sizes are (width, height)."""

    original_size: tuple
    resized_size: tuple
    crop_box: Optional[tuple] = None   # (left, top, right, bottom) in resized coordinates


#: the most times one side of an image may be longer than the other (a strip scaled to a
#: 224-pixel shorter side would need gigabytes)
MAX_ASPECT = 100


def load_image(path) -> Image.Image:
    """An RGB image, fully decoded; one clear ExciteError line for anything unreadable.

    The size is read from the file's header first: an image of more pixels than Pillow's
    decompression-bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, 178,956,970 by default),
    or whose longer side is more than :data:`MAX_ASPECT` times its shorter one, is refused
    before anything is decoded."""
    path = Path(path)
    if not path.exists():
        raise ExciteError(f"{path}: cannot read image (no such file)")
    if path.is_dir():
        raise ExciteError(f"{path}: cannot read image (is a directory)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if max(w, h) > MAX_ASPECT * min(w, h):
                    raise ExciteError(f"{path}: image is {w}x{h}: its sides differ more than {MAX_ASPECT} times, "
                                      "beyond what a classifier's input can be resized from; crop it first")
                img.load()  # force the full decode: truncated files fail here, not later
                return to_rgb(img)
    except Image.DecompressionBombError:
        raise ExciteError(f"{path}: image has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's "
                          "decompression-bomb limit), not decoded; scale it down first") from None
    except UnidentifiedImageError:
        raise ExciteError(f"{path}: cannot read image (not an image file)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExciteError(f"{path}: cannot read image ({reason})") from None


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """8-bit RGB, as a viewer shows the picture.

    * EXIF orientation applied (a phone's portrait JPEG stays portrait);
    * 16/32-bit greyscale (modes ``I;16*``, ``I``) and float (``F``) scaled to 0..255 by the
      range of their bit depth, not clipped: a 16-bit value v becomes v / 257 (``I`` holds
      16-bit PNGs: values up to 65535 are read as 16-bit, larger ones by the maximum;
      ``F`` in [0, 1] is scaled by 255). Pillow's plain ``convert("RGB")`` clips them at
      255, which turns almost every pixel of a 16-bit photo white;
    * transparency (RGBA, LA, palette with a transparent colour) composited over white;
    * CMYK, YCbCr, palette, 1-bit: Pillow's conversion.
    """
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        elif mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            scale = 255.0
        else:
            top = float(np.nanmax(arr)) if arr.size else 0.0
            scale = 1.0 if top <= 255 else 255.0 / (65535.0 if top <= 65535 else top)
        grey = np.clip(np.rint(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def resized_size(size_wh: tuple, size: int, resize: str) -> tuple:
    """Target (width, height). "shorter": shorter side to ``size``, the other rounded
    to the nearest integer (768x576 -> 299x224 at 224); "square": size x size; "exact":
    ``size`` is the (width, height) to use (a model's fixed input); "none"."""
    w, h = size_wh
    if resize == "exact":
        return tuple(int(v) for v in size)
    if resize == "square":
        return size, size
    if resize == "none":
        return w, h
    if resize != "shorter":
        raise ExciteError(f"unknown resize mode {resize!r}; use shorter, square or none")
    if w <= h:
        return size, max(1, int(round(h * size / w)))
    return max(1, int(round(w * size / h))), size


def preprocess(img: Image.Image, size=224, resize: str = "shorter", crop: Optional[int] = None,
               mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
               scale: float = 1 / 255, channel_order: str = "RGB", layout: str = "NCHW"):
    """(array, Prepared): the float32 model input of one image ((C,H,W) or (H,W,C)).

    The channel count C is the length of ``mean`` (and ``std``): 3 feeds the RGB pixels
    (in ``channel_order``), 1 the grey ones, converted by Pillow's ``"L"`` mode (ITU-R 601-2
    luma, L = 0.299 R + 0.587 G + 0.114 B) before resizing, so a colour photo and the
    same photo made grey beforehand give one input."""
    channels = len(mean)
    if channels not in (1, 3) or len(std) != channels:
        raise ExciteError(f"a model input of {channels} channel(s) (mean {tuple(mean)}, std {tuple(std)}): images "
                          "are fed as 1 (grey) or 3 (RGB) channels")
    if channels == 1 and img.mode != "L":
        img = img.convert("L")
    elif channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")
    original = img.size
    target = resized_size(original, size, resize)
    if target != original:
        img = img.resize(target, Image.BILINEAR)
    box = None
    if crop:
        w, h = img.size
        left, top = int(round((w - crop) / 2)), int(round((h - crop) / 2))
        box = (left, top, left + crop, top + crop)
        img = img.crop(box)
    arr = np.asarray(img, dtype=np.float32) * scale
    if channels == 1:
        arr = arr[:, :, None]
        if channel_order not in ("RGB", "BGR"):
            raise ExciteError(f"unknown channel order {channel_order!r}")
    elif channel_order == "BGR":
        arr = arr[:, :, ::-1]
    elif channel_order != "RGB":
        raise ExciteError(f"unknown channel order {channel_order!r}")
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    if layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    elif layout != "NHWC":
        raise ExciteError(f"unknown layout {layout!r}")
    return np.ascontiguousarray(arr, dtype=np.float32), Prepared(original, target, box)


def batch_images(arrays: Sequence[np.ndarray]) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ExciteError(f"images of different sizes cannot share a batch: {sorted(shapes)}")
    return np.stack(arrays)
