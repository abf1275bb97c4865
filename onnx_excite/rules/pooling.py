"""MaxPool: all of an output's P goes to the arg-max of its window.

The forward MaxPool is given its ``Indices`` output (flat indices over the
whole input tensor, batch and channel included); P is scattered back with
``ScatterElements(reduction='add')`` so overlapping windows accumulate.
"""
from __future__ import annotations

import numpy as np
import onnx.numpy_helper

from .base import Context, attr, register


def maxpool_check(graph, node):
    if attr(node, "storage_order", 0) != 0:
        return "storage_order=1 is not supported"
    return None


def forward_indices(ctx: Context, node) -> str:
    """Name of the forward node's Indices output, adding the output if missing."""
    if len(node.output) < 2 or not node.output[1]:
        name = ctx.g.fresh(f"{node.name}_indices")
        if len(node.output) < 2:
            node.output.append(name)
        else:
            node.output[1] = name
    return node.output[1]


@register("MaxPool", check=maxpool_check, description="winner-take-all: P goes to the arg-max of each window (Indices + ScatterElements add)")
def max_pool(ctx: Context, node, p: str, negate=False):
    """Route P to the window maxima, accumulating over overlapping windows."""
    a = node.input[0]
    if not ctx.wants(a):
        return {}
    g = ctx.g
    flat = g.i64([-1])
    indices = forward_indices(ctx, node)
    # the element count as Shape(Reshape(a, [-1])): ReduceProd has no int64 CUDA kernel
    zeros = g.op("ConstantOfShape", [g.shape(g.op("Reshape", [a, flat]))],
                 value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
    routed = g.op("ScatterElements", [zeros, g.op("Reshape", [indices, flat]), g.op("Reshape", [p, flat])],
                  axis=0, reduction="add", hint="p_unpool")
    return {a: g.reshape_like(routed, a)}
