"""One scorer per protocol: which classes of an image are evaluated, the items scored from
their maps, the summaries.

A scorer is plain data (picklable): the same object scores images in this process or on a
Ray worker, so both paths give the same items.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from . import metrics
from .datasets import ImageRecord


@dataclass
class Selection:
    """The classes of one image to explain, the unmapped classes it counts, or why it is skipped."""

    classes: list = field(default_factory=list)
    unmapped: list = field(default_factory=list)
    skip: Optional[str] = None


def blurred(method: str, upsampled: np.ndarray, blur: bool) -> np.ndarray:
    """The paper's Gaussian blur (sigma = 0.02 max(W, H)) of an upsampled map, for the methods
    declared with it (grad, deconv, guided, LRP, c-grad, c-deconv); the map as it is otherwise."""
    from ...methods import get_any_method
    from ...render.postprocess import blur_sigma, gaussian_blur

    if not blur or not get_any_method(method).blur:
        return upsampled
    h, w = upsampled.shape
    return gaussian_blur(upsampled, blur_sigma(w, h)).astype(np.float32)


@dataclass
class PointingScorer:
    """Pointing game (Zhang et al. 4.1): per (image, class present) pair, the maximum of the
    map upsampled to the image is a hit when within ``tolerance`` px of an object of the class."""

    labels: list            # (label, method, layer); a baseline ("center") or black-box method ("rise") has no layer
    evaluated: set          # dataset classes with a mapping
    tolerance: float = 15
    blur: bool = True       # see :func:`blurred`
    protocol: str = "pointing"

    def select(self, rec: ImageRecord) -> Selection:
        present = rec.classes()
        classes = [c for c in present if c in self.evaluated]
        sel = Selection(classes, [c for c in present if c not in self.evaluated])
        if not classes:
            sel.skip = "no mapped class present" if present else "no objects"
        return sel

    def score(self, rec: ImageRecord, classes: Sequence[str], maps: dict) -> list[dict]:
        items = []
        for c in classes:
            objs = rec.objects_of(c)
            item = {"image": rec.id, "class": c, "difficult": metrics.is_difficult(rec, c), "hits": {}, "points": {}}
            for label, method, layer in self.labels:
                if method == "center":
                    point = metrics.center_point(rec.width, rec.height)
                else:
                    point = metrics.max_point(blurred(method, metrics.upsample(maps[(method, layer, c)], rec.width,
                                                                                rec.height), self.blur))
                item["points"][label] = list(point)
                item["hits"][label] = metrics.pointing_hit(point, objs, self.tolerance)
            items.append(item)
        return items

    def summarize(self, items: list) -> dict:
        return {lab: metrics.pointing_summary(items, lab) for lab, _, _ in self.labels}


@dataclass
class LocalizationScorer:
    """Dominant-object localization (4.2): the map of the image's dominant class, at ``size`` x
    ``size``, thresholded at alpha x its mean for every alpha of the grid; a box with IoU >= 0.5
    with a box of the class is correct. Alpha is chosen on the ``held`` images."""

    labels: list
    evaluated: set
    held: set
    size: int = 224
    among: Optional[set] = None     # dominant among these classes (None: among all)
    blur: bool = True               # see :func:`blurred`
    protocol: str = "localization"

    def select(self, rec: ImageRecord) -> Selection:
        dom = metrics.dominant_class(rec, self.among)
        if dom is None:
            return Selection(skip="no objects")
        if dom not in self.evaluated:
            return Selection(unmapped=[dom], skip=f"dominant class {dom!r} is not mapped")
        return Selection([dom])

    def score(self, rec: ImageRecord, classes: Sequence[str], maps: dict) -> list[dict]:
        (dom,) = classes
        gt = [o.box for o in rec.objects_of(dom)]
        item = {"image": rec.id, "class": dom, "held_out": rec.id in self.held, "correct": {}}
        for label, method, layer in self.labels:
            m = (metrics.center_map(self.size, self.size) if method == "center"
                 else blurred(method, metrics.upsample(maps[(method, layer, dom)], self.size, self.size), self.blur))
            item["correct"][label] = [bool(v) for v in metrics.localization_curve(m, (rec.width, rec.height), gt)]
        return [item]

    def summarize(self, items: list) -> dict:
        return {lab: metrics.localization_summary(items, lab) for lab, _, _ in self.labels}
