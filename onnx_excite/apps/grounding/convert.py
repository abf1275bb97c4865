"""A detection dataset (PASCAL VOC folder or COCO JSON) as grounding queries in the
Flickr30k Entities format: for every class present in an image, one entity with all
the boxes of that class and one sentence ``[/EN#<id>/<class> the <class name>] .``.

The phrase type is the class, so the grounding report breaks results down per class.
Photos are linked (symlinks) into ``<out>/Images``; every ``val_every``-th image (in id
order) goes to ``val.txt`` (the held-out split on which gamma is chosen), the others to
``test.txt``. With a class mapping (the evaluation's JSON files, e.g. the bundled
``voc_sample_to_imagenet``), ``vocabulary.json`` maps each mapped class's phrase word to
its model outputs, for ``eval grounding --vocab``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from xml.sax.saxutils import escape

from ...errors import ExciteError
from .vocabulary import words_of


def _type_name(cls: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", cls).strip("_") or "object"


def detection_to_entities(data, out_dir, fmt: str = "voc", split: str | None = None, image_dir=None,
                          mapping=None, val_every: int = 5) -> dict:
    """Write the dataset under ``out_dir``; returns counts and the problems met reading it."""
    from ..eval.datasets import read_dataset
    from ..eval.mapping import resolve_mapping

    if val_every < 2:
        raise ExciteError("--val-every must be at least 2 (every n-th image is held out)")
    records, problems = read_dataset(data, fmt=fmt, split=split, image_dir=image_dir)
    if not records:
        raise ExciteError(f"{data}: no readable image" + (f" (first problem: {problems[0]})" if problems else ""))
    out = Path(out_dir)
    for sub in ("Sentences", "Annotations", "Images"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    entity, phrases, val, test = 0, 0, [], []
    classes = sorted({o.name for r in records for o in r.objects})
    for k, rec in enumerate(sorted(records, key=lambda r: r.id)):
        lines, objects = [], []
        for cls in sorted({o.name for o in rec.objects}):
            entity += 1
            text = " ".join(words_of(cls)) or "object"
            lines.append(f"[/EN#{entity}/{_type_name(cls)} the {text}] .")
            for o in rec.objects_of(cls):
                x1, y1, x2, y2 = o.box
                xmin, ymin = int(round(x1)) + 1, int(round(y1)) + 1
                xmax, ymax = max(xmin, int(round(x2))), max(ymin, int(round(y2)))
                objects.append(f"<object>\n<name>{entity}</name>\n<bndbox>\n<xmin>{xmin}</xmin>\n<ymin>{ymin}</ymin>\n"
                               f"<xmax>{xmax}</xmax>\n<ymax>{ymax}</ymax>\n</bndbox>\n</object>")
        phrases += len(lines)
        (out / "Sentences" / f"{rec.id}.txt").write_text("\n".join(lines) + "\n")
        (out / "Annotations" / f"{rec.id}.xml").write_text(
            f"<annotation>\n<filename>{escape(Path(rec.path).name)}</filename>\n<size>\n<width>{rec.width}</width>\n"
            f"<height>{rec.height}</height>\n<depth>3</depth>\n</size>\n" + "\n".join(objects) + "\n</annotation>\n")
        link = out / "Images" / f"{rec.id}{Path(rec.path).suffix.lower()}"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(Path(rec.path).resolve(), link)
        (val if k % val_every == 0 else test).append(rec.id)
    (out / "val.txt").write_text("\n".join(val) + "\n")
    (out / "test.txt").write_text("\n".join(test) + "\n")
    summary = {"images": len(records), "phrases": phrases, "classes": len(classes), "val": len(val), "test": len(test),
               "problems": problems, "out": str(out)}
    if mapping is not None:
        cmap = resolve_mapping(mapping, classes)
        vocab = {" ".join(words_of(c)): list(v) for c, v in sorted(cmap.indices.items()) if words_of(c)}
        (out / "vocabulary.json").write_text(json.dumps(vocab, indent=1))
        summary.update(vocabulary=str(out / "vocabulary.json"), mapped=len(vocab), unmapped=sorted(cmap.unmapped))
    return summary
