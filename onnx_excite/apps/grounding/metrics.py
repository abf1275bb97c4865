"""Phrase-localization metrics (Plummer et al. 2015; the paper's Table 4).

A ranked box is a *hit* for a query when its IoU with the ground truth is >= 0.5. The
ground truth of a phrase with several boxes is, by default, their **union box**
(``gt="union"``, the Flickr30k Entities protocol); ``gt="any"`` counts a hit with any
one of its boxes instead.

* recall@k: the fraction of queries with a hit among their first k boxes;
* AP of one query: the mean, over the hit positions r of its ranked list, of the
  precision at r (hits within the first r / r); 0 when the list holds no hit;
  mAP: the mean AP over queries ("per-phrase mAP");
* per type: the same over the queries of each phrase type (a query with several types
  counts in each);
* small instances: the queries whose ground-truth (union) box covers less than
  ``small_fraction`` of the image (10 % by default);
* upper bound: the fraction of queries with a hit anywhere in the list (the proposals'
  recall after NMS; NMS depends on the order, so two rankings of the same proposals
  can keep slightly different sets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .scoring import areas, iou_matrix, union_box

KS = (1, 5, 10)


def hit_list(ranked_boxes, gt_boxes, gt: str = "union", threshold: float = 0.5) -> np.ndarray:
    """Per ranked box, whether it hits the ground truth (bool array)."""
    ranked = np.asarray(ranked_boxes, dtype=np.float64).reshape(-1, 4)
    gtb = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if len(ranked) == 0:
        return np.zeros(0, dtype=bool)
    if gt == "union":
        return iou_matrix(ranked, union_box(gtb)[None])[:, 0] >= threshold
    if gt == "any":
        return (iou_matrix(ranked, gtb) >= threshold).any(axis=1)
    raise ValueError(f"gt must be 'union' or 'any', not {gt!r}")


def average_precision(hits: Sequence[bool]) -> float:
    """Non-interpolated AP of one ranked list: mean precision at the hit positions."""
    h = np.asarray(hits, dtype=bool)
    if not h.any():
        return 0.0
    ranks = np.nonzero(h)[0] + 1
    return float(np.mean(np.cumsum(h)[ranks - 1] / ranks))


def is_small(gt_boxes, width: int, height: int, small_fraction: float = 0.1) -> bool:
    return float(areas(union_box(gt_boxes)[None])[0]) < small_fraction * width * height


@dataclass
class Scored:
    """One query's outcome for one ranking."""

    types: list
    small: bool
    hits: np.ndarray


def summarize(items: Iterable[Scored], ks: Sequence[int] = KS) -> dict:
    """``{"n", "recall@k"..., "mAP", "upper_bound"}`` over the items (None when empty)."""
    items = list(items)
    out: dict = {"n": len(items)}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean([bool(s.hits[:k].any()) for s in items])) if items else None
    out["mAP"] = float(np.mean([average_precision(s.hits) for s in items])) if items else None
    out["upper_bound"] = float(np.mean([bool(s.hits.any()) for s in items])) if items else None
    return out


def breakdown(items: Sequence[Scored], ks: Sequence[int] = KS) -> dict:
    """Overall, per type and small-instance summaries."""
    types = sorted({t for s in items for t in s.types})
    return {"all": summarize(items, ks),
            "small": summarize([s for s in items if s.small], ks),
            "types": {t: summarize([s for s in items if t in s.types], ks) for t in types}}
