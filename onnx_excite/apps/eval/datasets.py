"""Detection-style datasets as a list of images with labelled boxes (and masks).

Two layouts are read:

* PASCAL VOC: ``ROOT/Annotations/<id>.xml``, ``ROOT/JPEGImages/<file>``,
  ``ROOT/ImageSets/Main/<split>.txt`` listing the ids (:func:`read_voc`);
* COCO instances JSON (``images``, ``annotations``, ``categories``), parsed with the
  ``json`` module; segmentation polygons (and RLE) become masks, rasterised with Pillow,
  otherwise the boxes are used (:func:`read_coco`).

Both return ``(records, problems)``: a list of :class:`ImageRecord` sorted by id and a list
of one-line messages, each naming the file concerned. A malformed annotation file, an
image that is missing or unreadable, or an object whose box is invalid or lies entirely
outside its image is skipped with a message; everything else is read. Boxes reaching past
the border are clipped to the image (also reported).

Hostile or broken files end in one :class:`ExciteError` line naming the file, the record and
the field, before anything is used: an id or image name leading outside its folder
(:mod:`onnx_excite.io.paths`), an id of the wrong JSON type, a size that is not a finite
number, a COCO RLE whose ``size`` claims more pixels than its image or whose ``counts`` are
malformed. XML entity expansion is stopped by the parser (expat's amplification limit; an
external entity is an undefined one): such a file is malformed.

Coordinates are kept as the files give them (VOC's are 1-based and inclusive, COCO's are
0-based with ``[x, y, w, h]``; neither is shifted): a box is the continuous rectangle
``xmin <= x <= xmax, ymin <= y <= ymax`` in pixel units, clipped to ``[0, width] x [0, height]``.
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from ...errors import ExciteError
from ...io.paths import inside

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")


class Mask:
    """An instance mask kept as its source (polygons or COCO RLE) and rasterised on demand.

    ``array()`` is a ``(height, width)`` bool array; pixel ``(row, col)`` is the unit square
    whose top-left corner is ``(col, row)``. Keeping the polygons rather than the pixels keeps
    large datasets (COCO val: ~290k instances) small in memory.
    """

    def __init__(self, width: int, height: int, polygons: Optional[list] = None, rle: Optional[dict] = None):
        self.width, self.height = int(width), int(height)
        self.polygons = polygons
        self.rle = rle

    def array(self) -> np.ndarray:
        if self.rle is not None:
            return decode_rle(self.rle, self.width, self.height)
        img = Image.new("L", (self.width, self.height), 0)
        draw = ImageDraw.Draw(img)
        for poly in self.polygons or []:
            pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)]
            if len(pts) >= 3:
                draw.polygon(pts, fill=1, outline=1)
        return np.asarray(img, dtype=bool)

    def area(self) -> int:
        return int(self.array().sum())

    def __repr__(self) -> str:
        kind = "rle" if self.rle is not None else f"{len(self.polygons or [])} polygon(s)"
        return f"Mask({self.width}x{self.height}, {kind})"


@dataclass
class Obj:
    """One annotated object: class name, box ``(xmin, ymin, xmax, ymax)``, VOC difficult flag, optional mask."""

    name: str
    box: tuple
    difficult: bool = False
    mask: Optional[Mask] = None


@dataclass
class ImageRecord:
    """One image: ``id`` as reports show it, ``key`` its full name in the dataset (VOC id, COCO
    ``file_name``; unique in the dataset, where COCO ids, the file stems, may repeat)."""

    id: str
    path: Path
    width: int
    height: int
    objects: list = field(default_factory=list)
    key: str = ""

    def classes(self, include_difficult: bool = False) -> list[str]:
        """Sorted class names present (by default: with at least one non-difficult object)."""
        return sorted({o.name for o in self.objects if include_difficult or not o.difficult})

    def objects_of(self, name: str) -> list[Obj]:
        return [o for o in self.objects if o.name == name]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
#: EXIF orientations that turn the picture a quarter (its displayed width is the stored height)
QUARTER_TURNS = (5, 6, 7, 8)


def _image_size(path: Path) -> tuple:
    """(width, height) as the picture is displayed (EXIF orientation applied, as
    :func:`~onnx_excite.io.images.load_image` applies it: a phone's portrait photo stored
    landscape with orientation 6 is portrait), from the file header; ExciteError naming the
    file when unreadable. Annotations are checked against this size and maps are computed
    on the displayed picture, so boxes and maps share one geometry."""
    if not path.is_file():
        raise ExciteError(f"{path}: image not found")
    try:
        with Image.open(path) as img:
            w, h = img.size
            try:
                orientation = img.getexif().get(0x0112)
            except Exception:   # a malformed EXIF block: no orientation read
                orientation = None
            return (h, w) if orientation in QUARTER_TURNS else (w, h)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExciteError(f"{path}: cannot read image ({reason})") from None


def _as_displayed(path: Path) -> str:
    """', as displayed (EXIF orientation N)' for a picture its EXIF turns a quarter, else ''."""
    try:
        with Image.open(path) as img:
            orientation = img.getexif().get(0x0112)
    except Exception:
        return ""
    return f", as displayed: EXIF orientation {orientation}" if orientation in QUARTER_TURNS else ""


def clip_box(box, width: int, height: int):
    """``(clipped box or None, was_clipped)``: None when nothing of the box lies inside the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    c = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))
    if not (c[2] > c[0] and c[3] > c[1]):
        return None, True
    return c, c != (x0, y0, x1, y1)


def _fmt_box(box) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def _add_object(rec: ImageRecord, name: str, box, difficult: bool, mask, where: str, problems: list) -> None:
    if not all(math.isfinite(v) for v in box) or box[2] < box[0] or box[3] < box[1]:
        problems.append(f"{where}: {name!r} box {_fmt_box(box)} is invalid (xmax < xmin or ymax < ymin); object skipped")
        return
    clipped, changed = clip_box(box, rec.width, rec.height)
    if clipped is None:
        problems.append(f"{where}: {name!r} box {_fmt_box(box)} lies outside the {rec.width}x{rec.height} image; object skipped")
        return
    if changed:
        problems.append(f"{where}: {name!r} box {_fmt_box(box)} clipped to the {rec.width}x{rec.height} image: {_fmt_box(clipped)}")
    rec.objects.append(Obj(name, clipped, bool(difficult), mask))


# ---------------------------------------------------------------------------
# PASCAL VOC
# ---------------------------------------------------------------------------
def voc_ids(root: Path, split: Optional[str] = None) -> tuple:
    """(ids, source): the ids listed in ImageSets/Main/<split>.txt (first token of each line);
    without a split: test.txt, val.txt, trainval.txt, whichever exists first, else every
    Annotations/*.xml."""
    main = root / "ImageSets" / "Main"
    if split is not None:
        candidates = [main / f"{split}.txt"] if not str(split).endswith(".txt") else [Path(split)]
        if not candidates[0].is_file():
            raise ExciteError(f"{candidates[0]}: no such image set")
    else:
        candidates = [main / f"{s}.txt" for s in ("test", "val", "trainval")]
    for path in candidates:
        if path.is_file():
            ids = []
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split()
                if parts and parts[0] not in ids:
                    ids.append(parts[0])
            return ids, path
    ann = root / "Annotations"
    if not ann.is_dir():
        raise ExciteError(f"{root}: not a VOC folder (no Annotations/ and no ImageSets/Main/*.txt)")
    return sorted(p.stem for p in ann.glob("*.xml")), ann


def _text(node, tag: str):
    child = node.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def _finite(text: str, what: str) -> float:
    """``float(text)``: ExciteError naming ``what`` when it is infinite or NaN (TypeError/ValueError
    when it is no number, for the caller to handle)."""
    value = float(text)
    if not math.isfinite(value):
        raise ExciteError(f"{what} {text!r} is not a finite number")
    return value


def read_voc_xml(xml_path: Path, image_dir: Path, problems: list, image_id: Optional[str] = None) -> Optional[ImageRecord]:
    """One VOC annotation file, or None (with a message in ``problems``) when it cannot be used."""
    image_id = image_id or xml_path.stem
    if not xml_path.is_file():
        problems.append(f"{xml_path}: annotation file not found; image skipped")
        return None
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        problems.append(f"{xml_path}: malformed XML ({exc}); image skipped")
        return None
    filename = _text(root, "filename")
    path = inside(image_dir, filename, f"{xml_path}: <filename>") if filename else None
    if path is None or not path.is_file():
        alt = [image_dir / f"{image_id}{s}" for s in IMAGE_SUFFIXES]
        path = next((p for p in alt if p.is_file()), path or alt[0])
    try:
        actual = _image_size(path)
    except ExciteError as exc:
        problems.append(f"{xml_path}: {exc}; image skipped")
        return None
    size = root.find("size")
    try:
        width, height = (int(_finite(_text(size, t), f"{xml_path}: <size>/<{t}>")) for t in ("width", "height"))
    except (TypeError, ValueError, AttributeError):
        width, height = actual
    if width <= 0 or height <= 0:
        width, height = actual
    if (width, height) != tuple(actual):
        problems.append(f"{xml_path}: annotated size {width}x{height} differs from the image's {actual[0]}x{actual[1]} "
                        f"({path.name}{_as_displayed(path)}); image skipped")
        return None
    rec = ImageRecord(image_id, path, width, height, [], image_id)
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        if not name:
            problems.append(f"{xml_path}: object {k} has no name; object skipped")
            continue
        bb = obj.find("bndbox")
        try:
            box = tuple(float(_text(bb, t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError, AttributeError):
            problems.append(f"{xml_path}: {name!r} object {k} has no readable bndbox; object skipped")
            continue
        try:
            difficult = int(float(_text(obj, "difficult") or 0)) != 0
        except ValueError:
            difficult = False
        _add_object(rec, name, box, difficult, None, str(xml_path), problems)
    return rec


def read_voc(root, split: Optional[str] = None, image_dir=None) -> tuple:
    """``(records, problems)`` for a PASCAL VOC folder (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise ExciteError(f"{root}: no such folder")
    ids, source = voc_ids(root, split)
    xmls = [inside(root / "Annotations", i, f"{source}: image id") for i in ids]
    image_dir = Path(image_dir) if image_dir else root / "JPEGImages"
    problems: list = []
    records = []
    for image_id, xml_path in zip(ids, xmls):
        rec = read_voc_xml(xml_path.with_name(xml_path.name + ".xml"), image_dir, problems, image_id)
        if rec is not None:
            records.append(rec)
    records.sort(key=lambda r: r.id)
    return records, problems


# ---------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------
def decode_rle(rle: dict, width: int, height: int) -> np.ndarray:
    """A COCO run-length encoding (``counts`` as a list or as the compressed string) as a
    ``(height, width)`` bool array. Runs alternate 0s and 1s, starting with 0s, column-major."""
    try:
        h, w, counts = rle_runs(rle, width, height)
    except ValueError as exc:
        raise ExciteError(f"RLE {exc}") from None
    flat = np.zeros(h * w, dtype=bool)
    pos, val = 0, False
    for c in counts:
        if val:
            flat[pos:pos + c] = True
        pos += c
        val = not val
    mask = flat.reshape(w, h).T
    if (h, w) != (height, width):
        out = np.zeros((height, width), bool)
        out[:min(h, height), :min(w, width)] = mask[:height, :width]
        mask = out
    return mask


def rle_runs(rle: dict, width: int, height: int) -> tuple:
    """``(h, w, runs)`` of a COCO RLE, checked against its ``width`` x ``height`` image:
    ValueError naming the field when ``size`` is not two integers claiming at most the image's
    pixels, or ``counts`` is neither a list of non-negative integers nor a well-formed
    compressed string, or its runs cover more pixels than ``size``."""
    size = rle.get("size", [height, width])
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)):
        raise ValueError(f"size {size!r} is not [height, width]")
    h, w = size
    if h * w > width * height:
        raise ValueError(f"size {h}x{w} claims {h * w} pixels, more than its {width}x{height} image has")
    counts = rle.get("counts")
    if isinstance(counts, str):
        counts = _rle_string_counts(counts)
    elif isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool)
                                          or isinstance(c, float) and c.is_integer() for c in counts):
        counts = [int(c) for c in counts]
    else:
        raise ValueError("counts is neither a list of integers nor a compressed RLE string")
    if any(c < 0 for c in counts):
        raise ValueError("counts holds a negative run")
    if sum(counts) > h * w:
        raise ValueError(f"counts cover {sum(counts)} pixels, more than its size {h}x{w}")
    return h, w, counts


def _rle_string_counts(s: str) -> list[int]:
    """pycocotools' compressed RLE string (maskApi.c rleFrString): 5-bit groups with a
    continuation bit, offset by 48; from the third run on each value is a delta to the one two back.
    ValueError for a character outside the alphabet, a run of more than 64 bits or a cut-off run."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p == len(s):
                raise ValueError("counts: the compressed string ends inside a run")
            if k == 13:
                raise ValueError("counts: a run of more than 64 bits")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"counts: character {s[p]!r} is not of the compressed RLE alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def coco_image_dir(json_path: Path, images: Sequence[dict]) -> Path:
    """Where the images of a COCO file are: the first of ``<json dir>``, ``<json dir>/JPEGImages``,
    ``<json dir>/images``, ``<json dir>/../<split>`` (``instances_val2017.json`` -> ``val2017``),
    ``<json dir>/../images/<split>`` that holds the first image listed."""
    here = json_path.parent
    split = json_path.stem.split("_", 1)[1] if "_" in json_path.stem else json_path.stem
    candidates = [here, here / "JPEGImages", here / "images", here.parent / split, here.parent / "images" / split,
                  here.parent / "JPEGImages", here.parent / "images"]
    names = [im.get("file_name") for im in images[:20] if isinstance(im, dict) and isinstance(im.get("file_name"), str)]
    for cand in candidates:
        if any((cand / n).is_file() for n in names):
            return cand
    return here


def _coco_id(value, what: str):
    """``value`` when it can be an id (a number, a string or null), else ExciteError naming ``what``."""
    if isinstance(value, (list, dict)):
        raise ExciteError(f"{what} must be a number or a string, not {'a list' if isinstance(value, list) else 'an object'}")
    return value


def read_coco(json_path, image_dir=None, use_masks: bool = True) -> tuple:
    """``(records, problems)`` for a COCO instances file. Record ids are the image file stems
    (``2007_000027.jpg`` -> ``2007_000027``); an annotation's ``difficult`` field is honoured
    when present (COCO has none; ``iscrowd`` regions are kept as ordinary objects)."""
    json_path = Path(json_path)
    if json_path.is_dir():
        found = sorted(json_path.glob("instances*.json")) or sorted(json_path.glob("annotations/instances*.json"))
        if len(found) != 1:
            raise ExciteError(f"{json_path}: expected one instances*.json in this folder, found {len(found)}")
        json_path = found[0]
    if not json_path.is_file():
        raise ExciteError(f"{json_path}: no such COCO annotation file")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExciteError(f"{json_path}: malformed JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ExciteError(f"{json_path}: not a COCO instances file (no 'images' list)")
    for name in ("categories", "annotations"):
        if not isinstance(data.get(name) or [], list):
            raise ExciteError(f"{json_path}: {name} must be a list, not {type(data[name]).__name__}")
    problems: list = []
    images = data["images"]
    image_dir = Path(image_dir) if image_dir else coco_image_dir(json_path, images)

    categories = {}
    for k, cat in enumerate(data.get("categories") or []):
        if isinstance(cat, dict) and "id" in cat and isinstance(cat.get("name"), str):
            categories[_coco_id(cat["id"], f"{json_path}: categories[{k}]: id")] = cat["name"]
        else:
            problems.append(f"{json_path}: categories[{k}] has no id or name; skipped")

    records: dict = {}
    for k, im in enumerate(images):
        if isinstance(im, dict):
            named = f" ({im['file_name']!r})" if isinstance(im.get("file_name"), str) else ""
            if "id" in im:
                _coco_id(im["id"], f"{json_path}: images[{k}]{named}: id")
            for side in ("width", "height"):
                if isinstance(im.get(side), float) and not math.isfinite(im[side]):
                    raise ExciteError(f"{json_path}: images[{k}]{named}: {side} {im[side]} is not a finite number")
        try:
            iid, fname = im["id"], im["file_name"]
            if not isinstance(fname, str):
                raise TypeError
        except (KeyError, TypeError):
            problems.append(f"{json_path}: images[{k}] has no id or file_name; skipped")
            continue
        path = inside(image_dir, fname, f"{json_path}: images[{k}] file_name")
        try:
            actual = _image_size(path)
        except ExciteError as exc:
            problems.append(f"{json_path}: {exc}; image skipped")
            continue
        width, height = im.get("width"), im.get("height")
        if not (isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0):
            width, height = actual
        if (int(width), int(height)) != tuple(actual):
            problems.append(f"{json_path}: image {fname} annotated as {width}x{height} but is {actual[0]}x{actual[1]}"
                            f"{_as_displayed(path)}; image skipped")
            continue
        if iid in records:
            problems.append(f"{json_path}: images[{k}] repeats image id {iid}; skipped")
            continue
        records[iid] = ImageRecord(Path(fname).stem, path, int(width), int(height), [], fname)

    known_ids = {im.get("id") for im in images if isinstance(im, dict)}
    for k, ann in enumerate(data.get("annotations") or []):
        where = f"{json_path}: annotations[{k}]"
        if not isinstance(ann, dict):
            problems.append(f"{where} is not an object; skipped")
            continue
        rec = records.get(_coco_id(ann.get("image_id"), f"{where}: image_id"))
        if rec is None:
            if ann.get("image_id") not in known_ids:
                problems.append(f"{where} refers to unknown image id {ann.get('image_id')!r}; skipped")
            continue  # the image itself was skipped (already reported)
        name = categories.get(_coco_id(ann.get("category_id"), f"{where}: category_id"))
        if name is None:
            problems.append(f"{where} refers to unknown category id {ann.get('category_id')!r}; skipped")
            continue
        bbox = ann.get("bbox")
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            problems.append(f"{where} ({name!r}, {rec.path.name}) has no readable bbox; skipped")
            continue
        mask = None
        seg = ann.get("segmentation") if use_masks else None
        if isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):
            polys = [p for p in seg if len(p) >= 6 and all(isinstance(v, (int, float)) for v in p)]
            if polys:
                mask = Mask(rec.width, rec.height, polygons=polys)
        elif isinstance(seg, dict) and "counts" in seg:
            try:
                rle_runs(seg, rec.width, rec.height)
            except ValueError as exc:
                raise ExciteError(f"{where} ({rec.path.name}): segmentation {exc}") from None
            mask = Mask(rec.width, rec.height, rle=seg)
        _add_object(rec, name, (x, y, x + w, y + h), bool(ann.get("difficult", 0)), mask,
                    f"{where} ({rec.path.name})", problems)
    out = sorted(records.values(), key=lambda r: r.id)
    return out, problems


def read_dataset(data, fmt: str = "voc", split: Optional[str] = None, image_dir=None) -> tuple:
    """``(records, problems)`` for ``fmt`` ``"voc"`` (a VOC folder) or ``"coco"`` (a COCO JSON file,
    or a folder holding one instances*.json)."""
    if fmt == "voc":
        return read_voc(data, split=split, image_dir=image_dir)
    if fmt == "coco":
        return read_coco(data, image_dir=image_dir)
    raise ExciteError(f"unknown dataset format {fmt!r}; use voc or coco")
