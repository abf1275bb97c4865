"""The two evaluation protocols of Zhang et al. (ECCV 2016), sections 4.1 and 4.2, in numpy.

Pointing game (4.1)
    The map for a ground-truth class is upsampled (bicubic) to the image; its maximum point
    (the first in row-major order when several pixels tie) is a *hit* when it lies within
    ``tolerance`` pixels of an annotated object of that class (Euclidean distance to the box,
    0 inside it; to the nearest mask pixel for objects with a mask), else a *miss*.
    Accuracy per class = hits / (hits + misses); the score is the mean over classes.
    The *difficult* subset holds the (image, class) pairs where the class's objects cover less
    than a quarter of the image (union of its boxes, or of its masks) and at least one other
    class is present. The *center* baseline always points at the image center.

Dominant-object localization (4.2)
    The map of the image's dominant class (largest union area of its boxes), computed on the
    image resized to 224x224 and upsampled to 224x224, is thresholded at ``alpha * mean(map)``;
    the tightest box around the pixels above is scaled back to the image and is correct when its
    IoU with some box of that class is >= 0.5. ``alpha`` sweeps ``np.arange(0, 10.5, 0.5)``;
    the best one is chosen on a held-out split only and the error is reported on the rest.

Conventions: a point is a pixel ``(x, y)`` = (column, row), compared with boxes in the
annotation's own coordinates (see datasets.py); a box from a map is the continuous rectangle
covering its pixels, ``(c0, r0, c1 + 1, r1 + 1)``.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

#: the paper's alpha grid, [0:0.5:10]
ALPHAS = np.arange(0, 10.5, 0.5)
IOU_THRESHOLD = 0.5


# ---------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------
def upsample(map2d: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic resize of a float map to ``(height, width)`` through a Pillow 'F' image."""
    m = np.ascontiguousarray(np.nan_to_num(np.asarray(map2d, np.float32), nan=0.0, posinf=0.0, neginf=0.0))
    if m.shape == (height, width):
        return m.copy()
    img = Image.fromarray(m, mode="F")
    return np.asarray(img.resize((int(width), int(height)), Image.BICUBIC), dtype=np.float32)


def max_point(map2d: np.ndarray) -> tuple:
    """``(x, y)`` of the maximum; ties go to the first in row-major order; NaN never wins."""
    m = np.asarray(map2d, np.float64)
    m = np.where(np.isnan(m), -np.inf, m)
    idx = int(np.argmax(m))  # argmax returns the first occurrence
    y, x = divmod(idx, m.shape[1])
    return int(x), int(y)


def center_point(width: int, height: int) -> tuple:
    """The center baseline's point: pixel ``(width // 2, height // 2)``."""
    return int(width) // 2, int(height) // 2


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------
def point_box_distance(point, box) -> float:
    """Euclidean distance from ``(x, y)`` to the rectangle ``(xmin, ymin, xmax, ymax)``; 0 inside or on it."""
    x, y = point
    x0, y0, x1, y1 = box
    dx = max(x0 - x, 0.0, x - x1)
    dy = max(y0 - y, 0.0, y - y1)
    return float(np.hypot(dx, dy))


def point_mask_distance(point, mask: np.ndarray) -> float:
    """Euclidean distance from pixel ``(x, y)`` to the nearest True pixel of ``mask``; inf when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return float("inf")
    x, y = point
    return float(np.sqrt(np.min((xs - x) ** 2 + (ys - y) ** 2)))


def object_distance(point, obj) -> float:
    """Distance to an annotated object: its mask when it has one, else its box."""
    if getattr(obj, "mask", None) is not None:
        return point_mask_distance(point, obj.mask.array())
    return point_box_distance(point, obj.box)


def pointing_hit(point, objects: Sequence, tolerance: float = 15) -> bool:
    """Hit when the point lies within ``tolerance`` pixels of any of ``objects`` (the class's)."""
    return any(object_distance(point, o) <= tolerance for o in objects)


def box_area(box) -> float:
    x0, y0, x1, y1 = box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def union_area(boxes: Iterable) -> float:
    """Exact area of a union of rectangles (coordinate compression)."""
    boxes = [tuple(map(float, b)) for b in boxes if box_area(b) > 0]
    if not boxes:
        return 0.0
    xs = np.unique([v for b in boxes for v in (b[0], b[2])])
    ys = np.unique([v for b in boxes for v in (b[1], b[3])])
    cover = np.zeros((len(ys) - 1, len(xs) - 1), bool)
    for x0, y0, x1, y1 in boxes:
        i0, i1 = np.searchsorted(xs, x0), np.searchsorted(xs, x1)
        j0, j1 = np.searchsorted(ys, y0), np.searchsorted(ys, y1)
        cover[j0:j1, i0:i1] = True
    cell = np.outer(np.diff(ys), np.diff(xs))
    return float(cell[cover].sum())


def class_area(objects: Sequence, width: int, height: int) -> float:
    """Area covered by a class's objects: exact union of boxes; pixel count of the union of
    masks; with both kinds, pixels of the masks and of the boxes' covered pixel squares."""
    with_mask = [o for o in objects if getattr(o, "mask", None) is not None]
    if not with_mask:
        return union_area(o.box for o in objects)
    canvas = np.zeros((height, width), bool)
    for o in with_mask:
        canvas |= o.mask.array()
    for o in objects:
        if getattr(o, "mask", None) is None:
            x0, y0, x1, y1 = o.box
            canvas[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
    return float(canvas.sum())


def is_difficult(record, name: str) -> bool:
    """The paper's difficult subset: the class covers less than 1/4 of the image and at
    least one other class is present (classes with a non-difficult object)."""
    objs = record.objects_of(name)
    small = class_area(objs, record.width, record.height) < record.width * record.height / 4.0
    others = [c for c in record.classes() if c != name]
    return bool(small and others)


def iou(a, b) -> float:
    """Intersection over union of two ``(xmin, ymin, xmax, ymax)`` boxes (continuous, no +1)."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, ix) * max(0.0, iy)
    union = box_area(a) + box_area(b) - inter
    return float(inter / union) if union > 0 else 0.0


def tightest_box(binary: np.ndarray) -> Optional[tuple]:
    """``(c0, r0, c1 + 1, r1 + 1)`` around the True pixels, or None when there are none."""
    rows = np.flatnonzero(binary.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(binary.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def threshold_box(map2d: np.ndarray, alpha: float) -> Optional[tuple]:
    """Tightest box around the pixels strictly above ``alpha * mean(map)``."""
    m = np.asarray(map2d, np.float64)
    return tightest_box(m > alpha * m.mean())


def scale_box(box, from_size, to_size) -> tuple:
    """A box in a ``from_size`` = (w, h) frame rescaled to ``to_size``."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def localization_correct(box, gt_boxes: Sequence, threshold: float = IOU_THRESHOLD) -> bool:
    return box is not None and any(iou(box, g) >= threshold for g in gt_boxes)


def localization_curve(map224: np.ndarray, image_size, gt_boxes: Sequence, alphas=ALPHAS) -> np.ndarray:
    """Per alpha, whether the box from ``map224`` (the map at the 224x224 input, upsampled to it)
    scaled to ``image_size`` = (w, h) is correct."""
    m = np.maximum(np.asarray(map224, np.float64), 0.0)  # bicubic overshoot below 0 is no evidence
    h, w = m.shape
    out = np.zeros(len(alphas), bool)
    for k, a in enumerate(alphas):
        box = threshold_box(m, float(a))
        out[k] = box is not None and localization_correct(scale_box(box, (w, h), image_size), gt_boxes)
    return out


def center_map(width: int = 224, height: int = 224) -> np.ndarray:
    """The center baseline's map for localization: a cone, 1 at the center falling linearly to 0
    at the corners; thresholding it at alpha * mean gives centered boxes whose size alpha tunes."""
    ys = (np.arange(height) + 0.5 - height / 2) / (height / 2)
    xs = (np.arange(width) + 0.5 - width / 2) / (width / 2)
    r = np.sqrt(xs[None, :] ** 2 + ys[:, None] ** 2) / np.sqrt(2)
    return np.maximum(1.0 - r, 0.0)


def dominant_class(record, among: Optional[Iterable[str]] = None) -> Optional[str]:
    """The class with the largest union area of its boxes (ties: first by name), among the
    classes present (non-difficult objects), optionally restricted to ``among``."""
    allowed = None if among is None else set(among)
    best, best_area = None, -1.0
    for name in record.classes():
        if allowed is not None and name not in allowed:
            continue
        area = union_area(o.box for o in record.objects_of(name))
        if area > best_area:
            best, best_area = name, area
    return best


# ---------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------
def held_out_ids(ids: Sequence[str], fraction: float = 0.2, seed: int = 0) -> set:
    """A seeded random ``fraction`` of ``ids`` (at least one, and at least one left out when
    there are two or more); independent of the order the ids come in."""
    ids = sorted(set(ids))
    if not ids or fraction <= 0:
        return set()
    n = int(round(fraction * len(ids)))
    n = min(max(n, 1), max(len(ids) - 1, 1))
    perm = np.random.default_rng(seed).permutation(len(ids))
    return {ids[i] for i in perm[:n]}


def select_alpha(correct: np.ndarray, held_out: np.ndarray, alphas=ALPHAS) -> dict:
    """Choose alpha on the held-out rows of ``correct`` (n_images x n_alphas, bool) only:
    the lowest held-out error, ties to the smallest alpha. Returns the chosen alpha, its
    index, held-out and test errors (test = the other rows) and both error curves."""
    correct = np.asarray(correct, bool).reshape(-1, len(alphas))
    held_out = np.asarray(held_out, bool)
    held, test = correct[held_out], correct[~held_out]
    held_err = 1.0 - held.mean(axis=0) if len(held) else np.full(len(alphas), np.nan)
    test_err = 1.0 - test.mean(axis=0) if len(test) else np.full(len(alphas), np.nan)
    k = int(np.nanargmin(held_err)) if len(held) else 0
    return {"alpha": float(alphas[k]), "index": k,
            "held_out_error": None if not len(held) else float(held_err[k]),
            "error": None if not len(test) else float(test_err[k]),
            "n_held_out": int(len(held)), "n_test": int(len(test)),
            "curve": {"alpha": [float(a) for a in alphas],
                      "held_out_error": [None if np.isnan(v) else float(v) for v in held_err],
                      "test_error": [None if np.isnan(v) else float(v) for v in test_err]}}


def _acc(h: int, m: int) -> Optional[float]:
    return h / (h + m) if h + m else None


def pointing_summary(items: Sequence[dict], method: str) -> dict:
    """Per-class and mean accuracy over ``items`` (dicts with ``class``, ``difficult`` and
    ``hits[method]``), all pairs and the difficult subset."""
    per: dict = {}
    for it in items:
        if method not in it["hits"]:
            continue
        c = per.setdefault(it["class"], {"hits": 0, "misses": 0, "difficult_hits": 0, "difficult_misses": 0})
        hit = bool(it["hits"][method])
        c["hits" if hit else "misses"] += 1
        if it["difficult"]:
            c["difficult_hits" if hit else "difficult_misses"] += 1
    for c in per.values():
        c["accuracy"] = _acc(c["hits"], c["misses"])
        c["difficult_accuracy"] = _acc(c["difficult_hits"], c["difficult_misses"])
    all_acc = [c["accuracy"] for c in per.values() if c["accuracy"] is not None]
    diff_acc = [c["difficult_accuracy"] for c in per.values() if c["difficult_accuracy"] is not None]
    return {"per_class": dict(sorted(per.items())),
            "mean_accuracy": float(np.mean(all_acc)) if all_acc else None,
            "mean_accuracy_difficult": float(np.mean(diff_acc)) if diff_acc else None,
            "n_classes": len(all_acc), "n_classes_difficult": len(diff_acc),
            "hits": sum(c["hits"] for c in per.values()), "misses": sum(c["misses"] for c in per.values()),
            "difficult_hits": sum(c["difficult_hits"] for c in per.values()),
            "difficult_misses": sum(c["difficult_misses"] for c in per.values())}


def localization_summary(items: Sequence[dict], method: str, alphas=ALPHAS) -> dict:
    """Alpha chosen on the held-out items, error on the others; per dominant class, the test
    items' errors at that alpha. ``items``: dicts with ``class``, ``held_out`` and
    ``correct[method]`` (one bool per alpha)."""
    rows = [it for it in items if method in it["correct"]]
    if not rows:
        return {"alpha": None, "error": None, "held_out_error": None, "n_held_out": 0, "n_test": 0,
                "curve": None, "per_class": {}}
    correct = np.array([it["correct"][method] for it in rows], bool)
    held = np.array([bool(it["held_out"]) for it in rows])
    out = select_alpha(correct, held, alphas)
    per: dict = {}
    for it, row, h in zip(rows, correct, held):
        if h:
            continue
        c = per.setdefault(it["class"], {"correct": 0, "wrong": 0})
        c["correct" if row[out["index"]] else "wrong"] += 1
    for c in per.values():
        c["error"] = c["wrong"] / (c["correct"] + c["wrong"])
    out["per_class"] = dict(sorted(per.items()))
    return out
