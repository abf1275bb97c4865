"""Overlays and panels a person can read: captions (class, probability, method, layer, rule)
in a font proportional to the picture, a colour bar with ticks and a label, colour maps
(matplotlib's when it is installed, else the built-in 'jet'), per-map or shared scaling,
and a cap on the long side of what is written.

Values are mapped to colours by ``v / vmax`` clipped to [0, 1]; ``vmax`` is the map's own
maximum (scale "max") or one maximum shared by several maps of an image (scale "shared",
chosen by the caller), so that a weak class does not look as hot as the top-1.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import ExciteError

#: the built-in colour map: 'jet'-like anchors (value, R, G, B), linearly interpolated
_JET = np.array([
    [0.00, 0, 0, 131], [0.125, 0, 0, 255], [0.375, 0, 255, 255],
    [0.625, 255, 255, 0], [0.875, 255, 0, 0], [1.00, 128, 0, 0]], dtype=np.float64)
BUILTIN_CMAPS = ("jet",)
SCALES = ("max", "shared")
#: long side of written overlays and panels unless full resolution is asked for
MAX_SIDE = 1600
#: short side below which small images are enlarged for display (captions need room)
MIN_SIDE = 256
#: zlib's run-length strategy (Z_RLE) for the PNGs written: lossless like the default strategy,
#: about 5x faster to encode and no larger on overlays (see docs/performance.md)
PNG_OPTIONS = {"compress_type": 3, "compress_level": 6}


#: the formats overlays and panels are written in: {name: (file suffix, Pillow format, options)};
#: JPEG and WebP at quality 90 (lossy: a few % of the PNG's bytes, faster to encode)
IMAGE_FORMATS = {"png": (".png", "PNG", PNG_OPTIONS),
                 "jpg": (".jpg", "JPEG", {"quality": 90}),
                 "webp": (".webp", "WEBP", {"quality": 90})}


def save_png(img: Image.Image, path) -> None:
    """Write ``img`` as a lossless PNG with :data:`PNG_OPTIONS`."""
    img.save(path, format="PNG", **PNG_OPTIONS)


def image_format(name: str) -> str:
    """``name`` checked against :data:`IMAGE_FORMATS` (``jpeg`` is ``jpg``); one error line otherwise."""
    key = str(name).strip().lower()
    key = "jpg" if key == "jpeg" else key
    if key not in IMAGE_FORMATS:
        raise ExciteError(f"--format must be one of {', '.join(IMAGE_FORMATS)}, not {name!r}")
    if key == "webp":
        from PIL import features

        if not features.check("webp"):
            raise ExciteError("--format webp: this Pillow was built without WebP support; use png or jpg")
    return key


def save_image(img: Image.Image, path, fmt: str = "png") -> None:
    """Write ``img`` in ``fmt`` (a key of :data:`IMAGE_FORMATS`): PNG through :func:`save_png`."""
    if fmt == "png":
        save_png(img, path)
        return
    _, pil_format, options = IMAGE_FORMATS[fmt]
    img.convert("RGB").save(path, format=pil_format, **options)


def _jet_lut() -> np.ndarray:
    v = np.linspace(0, 1, 256)
    return np.stack([np.interp(v, _JET[:, 0], _JET[:, c]) for c in (1, 2, 3)], axis=-1).round().astype(np.uint8)


@lru_cache(maxsize=None)
def colormap_lut(name: str = "jet") -> np.ndarray:
    """A 256 x 3 uint8 lookup table: matplotlib's colormap ``name`` when matplotlib is
    installed (``pip install 'onnx-excite[plot]'``), else the built-in 'jet'."""
    try:
        import matplotlib
    except ImportError:
        if name in BUILTIN_CMAPS:
            return _jet_lut()
        raise ExciteError(f"colour map {name!r} needs matplotlib: pip install 'onnx-excite[plot]' "
                          f"(built in: {', '.join(BUILTIN_CMAPS)})") from None
    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(matplotlib.colormaps), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; e.g. jet, viridis, inferno, turbo"
        raise ExciteError(f"unknown colour map {name!r}{hint}") from None
    return (np.asarray(cmap(np.linspace(0, 1, 256)))[:, :3] * 255).round().astype(np.uint8)


def _indices(values01) -> np.ndarray:
    """uint8 colour indices rint(255 v), v clipped to [0, 1] (NaN 0, +inf 1), in float64."""
    v = np.asarray(values01, np.float64)
    return np.rint(np.fmin(np.fmax(v, 0.0), 1.0) * 255).astype(np.uint8)   # fmax turns NaN into 0


def colorize(values01: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """uint8 RGB (H, W, 3) for values in [0, 1] (clipped)."""
    return np.asarray(colorize_image(values01, cmap)) if np.ndim(values01) == 2 else colormap_lut(cmap)[_indices(values01)]


def colorize_image(values01: np.ndarray, cmap: str = "jet") -> Image.Image:
    """:func:`colorize` of a 2-D array as an RGB image (the lookup done by Pillow's palette
    conversion: ~1.7x faster than indexing the table with numpy)."""
    pal = Image.fromarray(_indices(values01), "P")
    pal.putpalette(colormap_lut(cmap).tobytes())
    return pal.convert("RGB")


def map_max(map2d: np.ndarray) -> float:
    """The largest finite value of a map (0 for an empty or all-negative map)."""
    m = np.asarray(map2d, np.float64)
    m = m[np.isfinite(m)]
    return float(max(m.max(), 0.0)) if m.size else 0.0


_FONTS = threading.local()   # FreeType faces may be used by one thread at a time: a cache per thread


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font (Pillow >= 10.1) at ``size`` px, else its bitmap font
    (cached per thread)."""
    cache = _FONTS.__dict__.setdefault("fonts", {})
    if size not in cache:
        try:
            cache[size] = ImageFont.load_default(size=max(6, int(size)))
        except TypeError:  # older Pillow: fixed 11 px bitmap font
            cache[size] = ImageFont.load_default()
    return cache[size]


def _text_size(draw: ImageDraw.ImageDraw, text: str, fnt) -> tuple:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=fnt)
    return right - left, bottom - top


def display_size(size_wh: tuple, full_res: bool = False, max_side: int = MAX_SIDE, min_side: int = MIN_SIDE) -> tuple:
    """(width, height) at which an image is drawn: at most ``max_side`` on the long side
    (unless ``full_res``), at least ``min_side`` on the short side (small images are enlarged
    so their captions can be read), aspect ratio kept."""
    w, h = (max(1, int(v)) for v in size_wh)
    k = 1.0
    if min(w, h) < min_side:
        k = min_side / min(w, h)
    if not full_res and max(w, h) * k > max_side:
        k = max_side / max(w, h)
    return max(1, int(round(w * k))), max(1, int(round(h * k)))


def font_px(size_wh: tuple) -> int:
    """Caption font size proportional to the picture: 1/22 of its short side, 12..64 px."""
    return int(np.clip(round(min(size_wh) / 22), 12, 64))


def _fit_font(draw, lines: Sequence[str], width: int, px: int):
    """The largest font at most ``px`` whose widest line fits in ``width``."""
    while px > 8:
        fnt = font(px)
        if max((_text_size(draw, t, fnt)[0] for t in lines), default=0) <= width:
            return fnt, px
        px -= 1
    return font(8), 8


def caption_band(img: Image.Image, lines: Sequence[str], px: Optional[int] = None) -> Image.Image:
    """``img`` with a dark translucent band at the top holding ``lines`` in white."""
    lines = [ln for ln in lines if ln]
    if not lines:
        return img
    out = img.convert("RGBA")
    probe = ImageDraw.Draw(out)
    pad = max(2, (px or font_px(img.size)) // 4)
    fnt, px = _fit_font(probe, lines, img.width - 2 * pad, px or font_px(img.size))
    line_h = int(px * 1.25)
    band = Image.new("RGBA", (img.width, line_h * len(lines) + 2 * pad), (0, 0, 0, 150))
    out.alpha_composite(band, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(lines):
        draw.text((pad, pad + i * line_h), text, font=fnt, fill=(255, 255, 255, 255))
    return out.convert("RGB")


def tick_texts(values: Sequence[float]) -> list[str]:
    """The tick labels of one colour bar, all in one format chosen from the largest value: fixed
    decimals (as many as the step between ticks needs for two significant digits) from 0.001 to
    10^4, else the same exponent form for every tick (``0.0e+00``, ``2.5e-04``, ...)."""
    values = [float(v) for v in values]
    top = max((abs(v) for v in values), default=0.0)
    if top == 0:
        return ["0" for _ in values]
    if 1e-3 <= top < 1e4:
        steps = [abs(b - a) for a, b in zip(values, values[1:]) if b != a] or [top]
        decimals = max(0, 1 - int(np.floor(np.log10(min(steps)))))
        return [f"{v:.{decimals}f}" for v in values]
    return [f"{v:.1e}" for v in values]


def bar_label(method: str, shared: bool = False) -> str:
    """What a colour bar says for ``method``'s maps: the quantity its declaration names
    (:attr:`onnx_excite.methods.Method.quantity`), and whether the scale is shared by the
    image's classes."""
    from ..methods import get_any_method

    return get_any_method(method).quantity + (" (shared scale)" if shared else "")


def map_caption(head: str, method: str, layer: str, rule: str | None = None) -> list[str]:
    """The caption lines of one map's overlay: ``head`` (class and probability), then the
    method as its declaration displays it, the layer, and the rule (when given)."""
    from ..methods import get_any_method

    line = f"{get_any_method(method).label} · {layer}" + (f" · {rule} rule" if rule else "")
    return [line] if not head else [head, line]


def class_label(classes: Sequence[int], class_names: Optional[Sequence[str]] = None) -> str:
    """The classes' names (the first synonym of each description), else their indices, joined by " + "."""
    return " + ".join(class_names[c].split(",")[0] if class_names else str(c) for c in classes)


def class_head(label: str, prob: float) -> str:
    """The first caption line: the class (or classes) and its probability."""
    return f"{label}  p={prob:.2f}"


def colorbar(height: int, vmax: float, label: str, cmap: str = "jet", px: Optional[int] = None,
             ticks: int = 5) -> Image.Image:
    """A vertical colour bar for values 0..``vmax`` with ``ticks`` labelled ticks and a
    rotated ``label``, on white, ``height`` px tall."""
    px = px or font_px((height, height))
    fnt = font(px)
    bar_w = max(10, px)
    margin = px // 2 + 2
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    values = np.linspace(0, vmax, ticks)
    texts = tick_texts(values)
    text_w = max(_text_size(scratch, t, fnt)[0] for t in texts)
    label_w, label_h = _text_size(scratch, label, fnt)
    tick_len = max(3, px // 3)
    width = bar_w + tick_len + 3 + text_w + 4 + int(px * 1.3)
    out = Image.new("RGB", (width, height), "white")
    inner = max(2, height - 2 * margin)
    ramp = np.linspace(1, 0, inner)[:, None].repeat(bar_w, axis=1)
    out.paste(colorize_image(ramp, cmap), (0, margin))
    draw = ImageDraw.Draw(out)
    draw.rectangle([0, margin, bar_w - 1, margin + inner - 1], outline="black")
    for v, t in zip(values, texts):
        y = margin + int(round((1 - (v / vmax if vmax > 0 else 0)) * (inner - 1)))
        draw.line([bar_w, y, bar_w + tick_len, y], fill="black", width=max(1, px // 12))
        th = _text_size(draw, t, fnt)[1]
        draw.text((bar_w + tick_len + 3, y - th // 2 - 1), t, font=fnt, fill="black")
    # the label, rotated to run along the bar (shrunk to fit its height)
    lab_fnt, _ = _fit_font(scratch, [label], inner, px)
    label_w, label_h = _text_size(scratch, label, lab_fnt)
    strip = Image.new("RGB", (label_w + 4, int(px * 1.3)), "white")
    ImageDraw.Draw(strip).text((2, 0), label, font=lab_fnt, fill="black")
    strip = strip.rotate(90, expand=True)
    out.paste(strip, (width - strip.width, margin + max(0, (inner - strip.height) // 2)))
    return out


@dataclass
class Style:
    """How maps are drawn: colour map, blend weight of the heat map, colour bar."""

    cmap: str = "jet"
    alpha: float = 0.5
    colorbar: bool = True
    full_res: bool = False

    def __post_init__(self):
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ExciteError(f"--alpha must be between 0 and 1, not {self.alpha}")
        colormap_lut(self.cmap)   # unknown names fail here, before any work


def _heat(img: Image.Image, map2d: np.ndarray, vmax: float, style: Style) -> Image.Image:
    """The map (already aligned with ``img``) resized to it, coloured and blended."""
    m = np.asarray(map2d, np.float32)
    if m.shape != (img.height, img.width):
        m = np.asarray(Image.fromarray(np.ascontiguousarray(m), mode="F").resize(img.size, Image.BILINEAR))
    v = np.maximum(np.nan_to_num(m), 0) / vmax if vmax > 0 else np.zeros_like(m)
    return Image.blend(img, colorize_image(v, style.cmap), float(style.alpha))


def labelled_overlay(img: Image.Image, map2d: np.ndarray, caption: Sequence[str], style: Style,
                     vmax: Optional[float] = None, bar_label: str = "excitation") -> Image.Image:
    """One overlay: the image at display size, the heat map blended over it, ``caption``
    lines on top, and (``style.colorbar``) a colour bar 0..``vmax`` (the map's maximum
    when not given) with ticks and ``bar_label``."""
    vmax = map_max(map2d) if vmax is None else float(vmax)
    base = img.convert("RGB")
    size = display_size(base.size, style.full_res)
    if size != base.size:
        base = base.resize(size, Image.BICUBIC)
    px = font_px(size)
    out = caption_band(_heat(base, map2d, vmax, style), caption, px)
    if style.colorbar:
        bar = colorbar(out.height, vmax, bar_label, style.cmap, px)
        canvas = Image.new("RGB", (out.width + bar.width + px // 2, out.height), "white")
        canvas.paste(out, (0, 0))
        canvas.paste(bar, (out.width + px // 2, 0))
        out = canvas
    return _cap(out, style)


def _cap(img: Image.Image, style: Style) -> Image.Image:
    """At most ``MAX_SIDE`` px on the long side unless ``style.full_res``."""
    if style.full_res or max(img.size) <= MAX_SIDE:
        return img
    k = MAX_SIDE / max(img.size)
    return img.resize((max(1, round(img.width * k)), max(1, round(img.height * k))), Image.LANCZOS)


def panel_grid(img: Image.Image, tiles: Sequence[tuple], style: Style, title: Sequence[str] = (),
               columns: int = 4, bar_label: str = "excitation", show_image: bool = True) -> Image.Image:
    """The image (when ``show_image``), then one overlay per tile ``(caption lines, map, vmax)``
    or ``(caption lines, map, vmax, colour bar label)`` (else ``bar_label``),
    in rows of ``columns``; each tile with its caption and colour bar; ``title`` lines above.
    The whole panel is at most ``MAX_SIDE`` px on its long side (unless ``style.full_res``)."""
    base = img.convert("RGB")
    n = len(tiles) + int(show_image)
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    tile_w, tile_h = display_size(base.size, True)
    if not style.full_res:   # the whole panel, not each tile, fits MAX_SIDE
        bar_guess = 1.25 if style.colorbar else 1.0
        k = min(1.0, MAX_SIDE / max(tile_w * cols * bar_guess, tile_h * rows + 40))
        tile_w, tile_h = max(1, int(tile_w * k)), max(1, int(tile_h * k))
    shown = base.resize((tile_w, tile_h), Image.BICUBIC)
    tile_style = Style(style.cmap, style.alpha, style.colorbar, full_res=True)
    px = font_px((tile_w, tile_h))
    rendered = [caption_band(shown, ["image"], px)] if show_image else []
    for caption, map2d, vmax, *label in tiles:
        v = map_max(map2d) if vmax is None else float(vmax)
        over = caption_band(_heat(shown, map2d, v, tile_style), caption, px)
        if style.colorbar:
            bar = colorbar(tile_h, v, label[0] if label else bar_label, style.cmap, px)
            both = Image.new("RGB", (tile_w + bar.width + px // 2, tile_h), "white")
            both.paste(over, (0, 0))
            both.paste(bar, (tile_w + px // 2, 0))
            over = both
        rendered.append(over)
    gap = px // 2
    grid = [rendered[i:i + cols] for i in range(0, len(rendered), cols)]
    width = max(sum(t.width for t in row) + gap * (len(row) - 1) for row in grid)
    title = [t for t in title if t]
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tfnt, tpx = _fit_font(scratch, title, width, int(px * 1.3)) if title else (None, 0)
    head = (int(tpx * 1.3) * len(title) + gap) if title else 0
    canvas = Image.new("RGB", (width, head + len(grid) * (tile_h + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i, t in enumerate(title):
        draw.text((gap, gap // 2 + i * int(tpx * 1.3)), t, font=tfnt, fill="black")
    for r, row in enumerate(grid):
        x = 0
        for tile in row:
            canvas.paste(tile, (x, head + r * (tile_h + gap)))
            x += tile.width + gap
    return _cap(canvas, style)

