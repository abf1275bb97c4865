"""Pictures and files of a grounding: the phrase map under the top boxes, and the boxes JSON."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .core import Grounding

#: rank 1 red, then orange, yellow, green, cyan ...
BOX_COLOURS = [(230, 25, 25), (255, 140, 0), (255, 225, 25), (60, 180, 75), (70, 240, 240), (0, 130, 200),
               (145, 30, 180), (240, 50, 230), (210, 245, 60), (250, 190, 190)]


def grounding_overlay(image: Image.Image, result: Grounding, top: int = 5, alpha: float = 0.5) -> Image.Image:
    """The phrase map blended over the image (the plain image when there is no map),
    the first ``top`` boxes drawn with their rank (rank 1 thickest), the phrase as caption."""
    from ...render.maps import overlay

    img = image.convert("RGB")
    base = overlay(img, result.phrase_map, alpha) if result.phrase_map is not None else img.copy()
    caption_h = 16
    canvas = Image.new("RGB", (base.width, base.height + caption_h), "white")
    canvas.paste(base, (0, caption_h))
    draw = ImageDraw.Draw(canvas)
    words = ", ".join(result.phrase.keys) or "no vocabulary word"
    draw.text((3, 2), f'"{result.phrase.text}" -> {words}', fill="black")
    n = min(top, len(result.boxes))
    for rank in range(n - 1, -1, -1):  # rank 1 drawn last, on top
        x1, y1, x2, y2 = (float(v) for v in result.boxes[rank])
        colour = BOX_COLOURS[rank % len(BOX_COLOURS)]
        width = 4 if rank == 0 else 2
        draw.rectangle([x1, y1 + caption_h, max(x1, x2 - 1), max(y1, y2 - 1) + caption_h], outline=colour, width=width)
        label = str(rank + 1)
        tx, ty = x1 + 2, y1 + caption_h + 1
        draw.rectangle([tx - 1, ty - 1, tx + 7 * len(label) + 1, ty + 11], fill=colour)
        draw.text((tx, ty), label, fill="black")
    return canvas


def write_grounding(image: Image.Image, result: Grounding, out_dir, stem: str, top: int = 5,
                    extra: dict | None = None) -> dict:
    """``<stem>.boxes.json`` (the first ``top`` ranked boxes with scores, the words used and
    skipped), ``<stem>.png`` (the overlay) and ``<stem>.map.npy`` (the phrase map);
    returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"boxes": out_dir / f"{stem}.boxes.json", "overlay": out_dir / f"{stem}.png"}
    record = {**(extra or {}), "image_size": list(image.size), **result.to_json(top)}
    paths["boxes"].write_text(json.dumps(record, indent=2))
    grounding_overlay(image, result, top).save(paths["overlay"])
    if result.phrase_map is not None:
        paths["map"] = out_dir / f"{stem}.map.npy"
        np.save(paths["map"], result.phrase_map.astype(np.float32))
    return {k: str(v) for k, v in paths.items()}
