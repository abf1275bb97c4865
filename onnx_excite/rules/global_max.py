"""GlobalMaxPool and ReduceMax: all of an output's P goes to the arg-max of what it reduces.

The reduced axes are moved last and flattened; ``ArgMax`` (the first maximum in
row-major order on ties, as MaxPool's indices) picks the winner and
``ScatterElements`` writes P there, 0 elsewhere.
"""
from __future__ import annotations

import numpy as np
import onnx.numpy_helper

from .base import Context, attr, register


def _reduced_axes(graph, node):
    rank = graph.rank(node.input[0])
    if rank is None:
        return None
    if node.op_type == "GlobalMaxPool":
        return list(range(2, rank))
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = graph.consts.get(node.input[1])
        if value is None:
            return None
        axes = [int(v) for v in np.ravel(value)]
    if not axes:
        return None if attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(a % rank for a in axes)


def global_max_check(graph, node):
    axes = _reduced_axes(graph, node)
    if axes is None:
        return "axes or input rank unknown"
    if 0 in axes:
        return "a max over the batch axis is not supported"
    return None


_GLOBAL_MAX = ("over any non-batch axes (NHWC `[1, 2]` too), winner-take-all: P goes to the arg-max over the reduced "
               "axes (the first on ties; ArgMax + ScatterElements)")


@register("ReduceMax", inputs=(0,), keeps_nonneg=True, check=global_max_check, description=_GLOBAL_MAX)
@register("GlobalMaxPool", inputs=(0,), keeps_nonneg=True, check=global_max_check, layout="nchw",
          description=_GLOBAL_MAX)
def global_max(ctx: Context, node, p: str, negate=False):
    """P_in[j] = P where j is the (first) maximum of its reduced slice, else 0."""
    a = node.input[0]
    g = ctx.g
    rank = ctx.graph.rank(a)
    reduced = _reduced_axes(ctx.graph, node)
    kept = [i for i in range(rank) if i not in reduced]
    perm = kept + reduced

    def first_argmax():
        x = ctx.act(a)   # float32 (ArgMax has no float16 kernel on every provider)
        moved = x if perm == list(range(rank)) else g.op("Transpose", [x], perm=perm)
        flat = g.op("Reshape", [moved, g.i64([0] * len(kept) + [-1])], hint="max_flat")
        return moved, flat, g.op("ArgMax", [flat], axis=len(kept), keepdims=1, select_last_index=0, hint="max_winner")

    moved, flat, winner = g.memo((node.name, "argmax"), first_argmax)
    zeros = g.op("ConstantOfShape", [g.op("Shape", [flat])], value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
    routed = g.op("ScatterElements", [zeros, winner, g.op("Reshape", [p, g.op("Shape", [winner])])],
                  axis=len(kept), hint="p_unmax")
    routed = g.reshape_like(routed, moved)
    if perm != list(range(rank)):
        inverse = [perm.index(i) for i in range(rank)]
        routed = g.op("Transpose", [routed], perm=inverse)
    return {a: routed}
