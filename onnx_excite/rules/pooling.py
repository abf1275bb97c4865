"""MaxPool: all of an output's P goes to the arg-max of its window.

The forward MaxPool's ``Indices`` output (flat indices over the whole input
tensor, batch and channel included; added by the canonicalize pass
:func:`~onnx_excite.graph.canonicalize.expose_maxpool_indices`) says where each
maximum came from; P is scattered back with ``ScatterElements(reduction='add')``
so overlapping windows accumulate.
"""
from __future__ import annotations

import numpy as np
import onnx.numpy_helper

from ..errors import ExciteError
from .base import Context, attr, register


def maxpool_check(graph, node):
    if attr(node, "storage_order", 0) != 0:
        return "storage_order=1 is not supported"
    return None


@register("MaxPool", inputs=(0,), keeps_nonneg=True, check=maxpool_check, layout="nchw", description="all of P to the window's arg-max (overlapping windows, ceil_mode): MaxPool Indices + ScatterElements(add)")
def max_pool(ctx: Context, node, p: str, negate=False):
    """Route P to the window maxima, accumulating over overlapping windows."""
    a = node.input[0]
    if len(node.output) < 2 or not node.output[1]:
        raise ExciteError(f"internal: MaxPool {node.name!r} has no Indices output (canonicalize adds it)")
    g = ctx.g
    flat = g.i64([-1])
    indices = node.output[1]
    # the element count as Shape(Reshape(a, [-1])): ReduceProd has no int64 CUDA kernel
    zeros = g.op("ConstantOfShape", [g.shape(g.op("Reshape", [a, flat]))],
                 value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
    routed = g.op("ScatterElements", [zeros, g.op("Reshape", [indices, flat]), g.op("Reshape", [p, flat])],
                  axis=0, reduction="add", hint="p_unpool")
    return {a: g.reshape_like(routed, a)}
