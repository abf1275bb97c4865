"""A detection dataset (PASCAL VOC folder or COCO JSON) as grounding queries in the
Flickr30k Entities format: for every class present in an image, one entity with all
the boxes of that class and one sentence ``[/EN#<id>/<class> the <class name>] .``.

The phrase type is the class, so the grounding report breaks results down per class.
Photos are linked (symlinks) into ``<out>/Images``; every ``val_every``-th image (in id
order) goes to ``val.txt`` (the held-out split on which gamma is chosen), the others to
``test.txt``. With a class mapping (the evaluation's JSON files, e.g. the bundled
``voc_sample_to_imagenet``), ``vocabulary.json`` maps each mapped class's phrase word to
its model outputs, for ``eval grounding --vocab``.

Everything is checked before anything is created: every file written resolves inside
``out_dir`` (:func:`onnx_excite.io.paths.output_inside`), ``out_dir`` is not the dataset's
folder, two images may not share an id, and a file already where a photo link goes is
kept (the run refuses) unless it is a link, which is replaced.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from xml.sax.saxutils import escape

from ...errors import ExciteError
from ...io.checks import creatable_dir
from ...io.paths import inside, output_inside
from .vocabulary import words_of


def _type_name(cls: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", cls).strip("_") or "object"


def _output_files(records, data, fmt: str, out: Path) -> dict:
    """Every path the conversion writes, checked (see the module docstring): record id ->
    (sentences, annotation, photo link), and the split and vocabulary files by name."""
    source = Path(data) if fmt == "voc" or Path(data).is_dir() else Path(data).parent
    if out.resolve() == source.resolve():
        raise ExciteError(f"{out}: the output folder is the dataset's own folder; choose another -o")
    seen: dict = {}
    for rec in records:
        if rec.id in seen:
            raise ExciteError(f"{data}: images {seen[rec.id].key or seen[rec.id].path} and {rec.key or rec.path} "
                              f"share the id {rec.id!r}; their queries would overwrite each other")
        seen[rec.id] = rec
    files = {rec.id: (output_inside(out, f"Sentences/{rec.id}.txt", "output"),
                      output_inside(out, f"Annotations/{rec.id}.xml", "output"),
                      inside(out, f"Images/{rec.id}{Path(rec.path).suffix.lower()}", "output"))  # a link: replaced
             for rec in records}
    files.update((name, output_inside(out, name, "output")) for name in ("val.txt", "test.txt", "vocabulary.json"))
    for _, _, link in (v for k, v in files.items() if isinstance(v, tuple)):
        if link.exists() and not link.is_symlink():
            raise ExciteError(f"{link}: a file that is not a photo link is in the way; remove it or choose another -o")
    return files


def detection_to_entities(data, out_dir, fmt: str = "voc", split: str | None = None, image_dir=None,
                          mapping=None, val_every: int = 5) -> dict:
    """Write the dataset under ``out_dir``; returns counts and the problems met reading it."""
    from ..eval.datasets import read_dataset
    from ..eval.mapping import resolve_mapping

    if val_every < 2:
        raise ExciteError("--val-every must be at least 2 (every n-th image is held out)")
    creatable_dir(out_dir, "-o")        # before the dataset is read; nothing is created yet
    records, problems = read_dataset(data, fmt=fmt, split=split, image_dir=image_dir)
    if not records:
        raise ExciteError(f"{data}: no readable image" + (f" (first problem: {problems[0]})" if problems else ""))
    out = Path(out_dir)
    records = sorted(records, key=lambda r: r.id)
    files = _output_files(records, data, fmt, out)
    entity, phrases, val, test = 0, 0, [], []
    classes = sorted({o.name for r in records for o in r.objects})
    for k, rec in enumerate(records):
        sentences, annotation, link = files[rec.id]
        for path in (sentences, annotation, link):
            path.parent.mkdir(parents=True, exist_ok=True)
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
        sentences.write_text("\n".join(lines) + "\n")
        annotation.write_text(
            f"<annotation>\n<filename>{escape(Path(rec.path).name)}</filename>\n<size>\n<width>{rec.width}</width>\n"
            f"<height>{rec.height}</height>\n<depth>3</depth>\n</size>\n" + "\n".join(objects) + "\n</annotation>\n")
        if link.is_symlink():  # a link of an earlier run (a file there was refused above)
            link.unlink()
        os.symlink(Path(rec.path).resolve(), link)
        (val if k % val_every == 0 else test).append(rec.id)
    files["val.txt"].write_text("\n".join(val) + "\n")
    files["test.txt"].write_text("\n".join(test) + "\n")
    summary = {"images": len(records), "phrases": phrases, "classes": len(classes), "val": len(val), "test": len(test),
               "problems": problems, "out": str(out)}
    if mapping is not None:
        cmap = resolve_mapping(mapping, classes)
        vocab = {" ".join(words_of(c)): list(v) for c, v in sorted(cmap.indices.items()) if words_of(c)}
        files["vocabulary.json"].write_text(json.dumps(vocab, indent=1))
        summary.update(vocabulary=str(out / "vocabulary.json"), mapped=len(vocab), unmapped=sorted(cmap.unmapped))
    return summary
