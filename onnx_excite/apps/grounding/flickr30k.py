"""Reader for the Flickr30k Entities format (Plummer et al., ICCV 2015).

A dataset folder holds::

    Sentences/<image id>.txt     five captions, one a line, phrases marked up as
                                 "[/EN#<entity id>/<type>[/<type>...] words of the phrase]"
    Annotations/<image id>.xml   VOC-like: <size>, and <object>s with one or more <name>
                                 (entity ids) and either a <bndbox> (1-based, inclusive
                                 pixel coordinates) or <nobndbox>/<scene> flags
    train.txt, val.txt, test.txt (optional) image ids of the official splits
    images: <id>.jpg in Images/, flickr30k-images/, images/ or given with ``image_dir``

As in the dataset's own ``flickr30k_entities_utils.py``: boxes are converted to 0-based
coordinates (here half-open: ``x1 = xmin - 1, x2 = xmax``, so the area is the inclusive
pixel count), an entity may have several boxes, an entity flagged ``nobndbox`` is not
visible and one flagged ``scene`` is the whole scene; entity id 0 (type ``notvisual``)
has no annotation. An ``<object>`` with several ``<name>`` elements gives its box to every
named entity (the official utility reads only the first name; later evaluation code, e.g.
MDETR's, reads all). Phrase types are the markup's ``/``-separated list after the id.

A phrase is a grounding *query* when its entity has at least one box; the others are
counted by reason (``notvisual``, ``nobox``, ``scene``, ``unannotated``) and not scored,
which is the protocol of Plummer et al. and of the paper.

An annotation whose size or box coordinates are not finite numbers, or with a box lying
entirely outside its image, is refused (the image is skipped with a message); image ids of a
split file must name files inside the folder (:mod:`onnx_excite.io.paths`). XML entity
expansion is stopped by the parser (expat's amplification limit): such a file is malformed.
"""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import ExciteError
from ...io.paths import inside


class AnnotationError(ExciteError):
    """A sentence or annotation file that does not follow the Flickr30k Entities format."""


@dataclass
class MarkedPhrase:
    text: str
    entity: str
    types: list[str]
    first_word: int          # index of the phrase's first word in the plain sentence


@dataclass
class Sentence:
    text: str                 # without the markup
    phrases: list[MarkedPhrase]


@dataclass
class Annotation:
    width: int
    height: int
    boxes: dict[str, np.ndarray] = field(default_factory=dict)   # entity id -> (n, 4) half-open, 0-based
    scene: set = field(default_factory=set)
    nobox: set = field(default_factory=set)


@dataclass
class Query:
    """One phrase to ground: its text, entity, types and ground-truth boxes."""

    image_id: str
    sentence: int
    text: str
    entity: str
    types: list[str]
    boxes: np.ndarray

    @property
    def union(self) -> np.ndarray:
        b = self.boxes
        return np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])


@dataclass
class EntityImage:
    image_id: str
    image_path: Path | None
    width: int
    height: int
    queries: list[Query]
    skipped: Counter          # reason -> phrases not scored


_OPEN = re.compile(r"^\[/EN#(\d+)((?:/[^/\s\]]+)+)$")


def parse_sentence(line: str, where: str = "sentence") -> Sentence:
    """One caption with ``[/EN#id/type phrase words]`` markup -> plain text and phrases."""
    words: list[str] = []
    phrases: list[MarkedPhrase] = []
    current: list[str] | None = None
    head = None
    for token in line.split():
        if current is None:
            if token.startswith("["):
                m = _OPEN.match(token)
                if not m:
                    raise AnnotationError(f"{where}: cannot read the phrase opening {token!r} "
                                          "(expected '[/EN#<id>/<type>')")
                head = (m.group(1), [t for t in m.group(2).split("/") if t], len(words))
                current = []
                continue
            if token.endswith("]") and token != "]":
                raise AnnotationError(f"{where}: {token!r} closes a phrase that was never opened")
            words.append(token)
        else:
            if token.startswith("[/EN#"):
                raise AnnotationError(f"{where}: a phrase opens inside another phrase ({token!r})")
            closing = token.endswith("]")
            word = token[:-1] if closing else token
            if word:
                current.append(word)
                words.append(word)
            if closing:
                if not current:
                    raise AnnotationError(f"{where}: empty phrase for entity {head[0]}")
                phrases.append(MarkedPhrase(" ".join(current), head[0], head[1], head[2]))
                current = None
    if current is not None:
        raise AnnotationError(f"{where}: phrase for entity {head[0]} is not closed with ']'")
    return Sentence(" ".join(words), phrases)


def read_sentences(path) -> list[Sentence]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read ({exc})") from None
    return [parse_sentence(line, f"{path}:{i}") for i, line in enumerate(lines, start=1) if line.strip()]


def _int(elem, tag: str, where: str) -> int:
    node = elem.find(tag)
    if node is None or node.text is None:
        raise AnnotationError(f"{where}: missing <{tag}>")
    try:
        value = float(node.text.strip())
    except ValueError:
        raise AnnotationError(f"{where}: <{tag}> is not a number ({node.text.strip()!r})") from None
    if not math.isfinite(value):
        raise AnnotationError(f"{where}: <{tag}> is not a finite number ({node.text.strip()!r})")
    return int(value)


def read_annotation(path) -> Annotation:
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise AnnotationError(f"{path}: malformed XML ({exc})") from None
    size = root.find("size")
    if size is None:
        raise AnnotationError(f"{path}: missing <size>")
    ann = Annotation(_int(size, "width", str(path)), _int(size, "height", str(path)))
    if ann.width <= 0 or ann.height <= 0:
        raise AnnotationError(f"{path}: image size {ann.width}x{ann.height} is not positive")
    boxes: dict[str, list] = {}
    for k, obj in enumerate(root.findall("object")):
        where = f"{path}: object {k}"
        names = [n.text.strip() for n in obj.findall("name") if n.text and n.text.strip()]
        if not names:
            raise AnnotationError(f"{where} has no <name>")
        bnd = obj.find("bndbox")
        if bnd is not None:
            xmin, ymin = _int(bnd, "xmin", where), _int(bnd, "ymin", where)
            xmax, ymax = _int(bnd, "xmax", where), _int(bnd, "ymax", where)
            if xmax < xmin or ymax < ymin:
                raise AnnotationError(f"{where}: box ({xmin}, {ymin}, {xmax}, {ymax}) has xmax < xmin or ymax < ymin")
            box = [max(0, xmin - 1), max(0, ymin - 1), min(ann.width, xmax), min(ann.height, ymax)]
            if box[2] <= box[0] or box[3] <= box[1]:
                raise AnnotationError(f"{where}: box ({xmin}, {ymin}, {xmax}, {ymax}) lies outside the "
                                      f"{ann.width}x{ann.height} image")
            for name in names:
                boxes.setdefault(name, []).append(box)
            continue
        for tag, target in (("nobndbox", ann.nobox), ("scene", ann.scene)):
            node = obj.find(tag)
            if node is not None and node.text and node.text.strip() not in ("", "0"):
                target.update(names)
    ann.boxes = {k: np.asarray(v, dtype=np.float64) for k, v in boxes.items()}
    return ann


def _find_image(image_dirs: list[Path], image_id: str) -> Path | None:
    for folder in image_dirs:
        for suffix in (".jpg", ".jpeg", ".png"):
            p = folder / f"{image_id}{suffix}"
            if p.is_file():
                return p
    return None


def skip_reason(entity: str, ann: Annotation) -> str | None:
    """Why a phrase of this entity is not a query (None when it is one)."""
    if entity in ann.boxes:
        return None
    if entity == "0":
        return "notvisual"
    if entity in ann.nobox:
        return "nobox"
    if entity in ann.scene:
        return "scene"
    return "unannotated"


def read_image(root: Path, image_id: str, image_dirs: list[Path]) -> EntityImage:
    sentences = read_sentences(root / "Sentences" / f"{image_id}.txt")
    ann = read_annotation(root / "Annotations" / f"{image_id}.xml")
    queries, skipped = [], Counter()
    for s, sentence in enumerate(sentences):
        for ph in sentence.phrases:
            reason = skip_reason(ph.entity, ann)
            if reason:
                skipped[reason] += 1
            else:
                queries.append(Query(image_id, s, ph.text, ph.entity, ph.types, ann.boxes[ph.entity]))
    return EntityImage(image_id, _find_image(image_dirs, image_id), ann.width, ann.height, queries, skipped)


def split_ids(root, split: str | None) -> list[str]:
    """Image ids of ``split`` (``<root>/<split>.txt``), or every annotated image for None / 'all'."""
    root = Path(root)
    if split in (None, "all"):
        return sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    f = root / f"{split}.txt"
    if not f.is_file():
        raise AnnotationError(f"{root}: no split file {split}.txt (use --split all to read every image)")
    ids = [line.strip() for line in f.read_text().splitlines() if line.strip()]
    for image_id in ids:
        inside(root / "Annotations", image_id, f"{f}: image id")
    return ids


def read_flickr30k_entities(root, split: str | None = None, image_dir=None, limit: int | None = None):
    """``(images, problems)``: the readable :class:`EntityImage` s of a split, and one message
    per image that could not be used (missing or malformed files, missing photo)."""
    root = Path(root)
    if not (root / "Sentences").is_dir() or not (root / "Annotations").is_dir():
        raise AnnotationError(f"{root}: not a Flickr30k Entities folder (needs Sentences/ and Annotations/)")
    dirs = [Path(image_dir)] if image_dir else [root / d for d in ("Images", "flickr30k-images", "images", "flickr30k_images")]
    if image_dir and not Path(image_dir).is_dir():
        raise AnnotationError(f"{image_dir}: no such image folder")
    images, problems = [], []
    for image_id in split_ids(root, split)[:limit]:
        try:
            img = read_image(root, image_id, dirs)
        except AnnotationError as exc:
            problems.append(f"{exc}; image skipped")
            continue
        except FileNotFoundError as exc:
            problems.append(f"{exc.filename}: not found; image skipped")
            continue
        if img.image_path is None:
            problems.append(f"{image_id}: photo not found in {', '.join(str(d) for d in dirs)}; image skipped")
            continue
        images.append(img)
    return images, problems
