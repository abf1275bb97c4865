"""Box geometry and the paper's proposal score.

Boxes are ``(x1, y1, x2, y2)`` in pixel coordinates of the original image, half-open:
the box covers pixels ``x1 <= x < x2``, ``y1 <= y < y2``; its area is
``(x2 - x1) * (y2 - y1)``.
"""
from __future__ import annotations

import numpy as np

#: the gammas the paper searches: [0 : 0.25 : 1]
GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def as_boxes(boxes) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return arr


def areas(boxes) -> np.ndarray:
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def iou_matrix(a, b) -> np.ndarray:
    """IoU of every box of ``a`` (M) with every box of ``b`` (N): M x N; 0 where the union is empty."""
    a, b = as_boxes(a), as_boxes(b)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = areas(a)[:, None] + areas(b)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def union_box(boxes) -> np.ndarray:
    """The smallest box holding all ``boxes``."""
    b = as_boxes(boxes)
    return np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])


def integral_image(map2d: np.ndarray) -> np.ndarray:
    """``I`` of shape (H+1, W+1) with ``I[y, x] = sum(map[:y, :x])`` (float64)."""
    m = np.asarray(map2d, dtype=np.float64)
    out = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    out[1:, 1:] = m.cumsum(0).cumsum(1)
    return out


def snap_boxes(boxes, width: int, height: int) -> np.ndarray:
    """Integer pixel boxes clipped to the image, at least one pixel wide and high."""
    b = np.rint(as_boxes(boxes)).astype(np.int64)
    b[:, 0] = np.clip(b[:, 0], 0, width - 1)
    b[:, 1] = np.clip(b[:, 1], 0, height - 1)
    b[:, 2] = np.clip(np.maximum(b[:, 2], b[:, 0] + 1), 1, width)
    b[:, 3] = np.clip(np.maximum(b[:, 3], b[:, 1] + 1), 1, height)
    return b


def box_sums(map2d: np.ndarray, boxes) -> np.ndarray:
    """S_R: the sum of the map inside each box (snapped to whole pixels), by the integral image."""
    h, w = map2d.shape
    b = snap_boxes(boxes, w, h)
    ii = integral_image(map2d)
    return ii[b[:, 3], b[:, 2]] - ii[b[:, 1], b[:, 2]] - ii[b[:, 3], b[:, 0]] + ii[b[:, 1], b[:, 0]]


def proposal_scores(map2d: np.ndarray, boxes, gamma: float = 0.5) -> np.ndarray:
    """The paper's f(R) = S_R / A_R^gamma: S_R the map's sum inside R, A_R its area
    (in pixels, after snapping). gamma = 0 favours large boxes, gamma = 1 the densest."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], not {gamma}")
    h, w = map2d.shape
    b = snap_boxes(boxes, w, h)
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float64)
    return box_sums(map2d, b) / area ** gamma


def nms(boxes, scores, iou_threshold: float = 0.7) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first. A box
    is dropped when its IoU with a kept, better-scored box is above ``iou_threshold``.
    Ties keep the earlier box (a stable sort), so scores all equal keep the input order."""
    b = as_boxes(boxes)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(b), dtype=bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        if len(keep) == len(b):
            break
        suppressed |= iou_matrix(b[i:i + 1], b)[0] > iou_threshold
        suppressed[i] = True
    return np.asarray(keep, dtype=np.int64)


def rank_boxes(map2d: np.ndarray | None, boxes, gamma: float = 0.5, iou_threshold: float = 0.7):
    """(ranked boxes, their scores) after scoring and NMS. ``map2d=None`` ranks the
    proposals in their own order (the "proposal base"): scores are ``-position``."""
    b = as_boxes(boxes)
    scores = -np.arange(len(b), dtype=np.float64) if map2d is None else proposal_scores(map2d, b, gamma)
    keep = nms(b, scores, iou_threshold)
    return b[keep], scores[keep]
