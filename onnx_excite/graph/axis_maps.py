"""Linear maps that act on one axis of a tensor, y[.., o, ..] = sum_i M[o, i] x[.., i, ..].

Copies (Pad in edge / reflect / wrap mode, strided Slice, Tile, nearest Resize) are
such maps with a 0/1 matrix ``M`` (one 1 per row: the source of each output
cell); linear Resize is one with the interpolation weights. The adjoint
``M^T`` returns P to the input: every copy's P is summed back into the cell it
was copied from.
"""
from __future__ import annotations

import numpy as np

from .emitter import Emitter


def apply_along_axis(g: Emitter, x: str, m: np.ndarray, axis: int, rank: int, hint: str = "axis_map") -> str:
    """``y[.., o, ..] = sum_i m[o, i] x[.., i, ..]`` over ``axis`` of a rank-``rank`` tensor, as a MatMul."""
    axis = axis % rank
    if rank >= 2 and axis == rank - 2:
        return g.op("MatMul", [g.const(np.ascontiguousarray(m, np.float32), "axis_m"), x], hint=hint)
    if axis == rank - 1:
        return g.op("MatMul", [x, g.const(np.ascontiguousarray(m.T, np.float32), "axis_mT")], hint=hint)
    perm = list(range(rank))
    perm[axis], perm[rank - 1] = rank - 1, axis   # a swap: its own inverse
    moved = g.op("Transpose", [x], perm=perm)
    y = g.op("MatMul", [moved, g.const(np.ascontiguousarray(m.T, np.float32), "axis_mT")], hint=hint)
    return g.op("Transpose", [y], perm=perm)


def selection_matrix(src, n_in: int) -> np.ndarray:
    """(len(src), n_in) 0/1 matrix with M[o, src[o]] = 1; a source < 0 (constant padding) is a zero row."""
    src = np.asarray(src, dtype=np.int64)
    m = np.zeros((len(src), n_in), dtype=np.float64)
    rows = np.nonzero(src >= 0)[0]
    m[rows, src[rows]] = 1.0
    return m


def route_back(g: Emitter, p: str, maps: dict[int, np.ndarray], rank: int) -> str:
    """P at the input of a copy op given per-axis forward matrices: apply every ``M^T``."""
    for axis, m in sorted(maps.items()):
        p = apply_along_axis(g, p, m.T, axis, rank, hint="p_route")
    return p
