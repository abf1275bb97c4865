"""Gather of constant positions: the class token picked at a ViT's head, Q / K / V taken out of
a fused in-projection.

``y = Gather(x, i, axis)`` with a constant scalar index copies one slice of ``x``: its P goes
back to that slice and the rest of ``x`` gets none (a Pad of zeros around it). Several Gathers
of one tensor (Q, K and V) add their shares.
"""
from __future__ import annotations

import numpy as np

from .base import Context, attr, register


def gather_check(graph, node):
    if len(node.input) < 2 or not graph.is_const(node.input[1]):
        return "the indices are not a constant"
    if np.asarray(graph.consts[node.input[1]]).ndim != 0:
        return "only one constant (scalar) index is supported"
    rank = graph.rank(node.input[0])
    if rank is None:
        return "input rank unknown"
    if graph.static_dims(node.input[0], [attr(node, "axis", 0) % rank]) is None:
        return "the gathered axis has a dynamic size (fix the input shape)"
    return None


@register("Gather", inputs=(0,), keeps_nonneg=True, check=gather_check,
          description="of one constant index (the class token at a ViT's head; Q, K, V out of a fused projection): P "
                      "placed back at that position, zeros elsewhere")
def gather(ctx: Context, node, p: str, negate=False):
    """P back at the gathered position of the axis (Unsqueeze + Pad with zeros)."""
    g = ctx.g
    x = node.input[0]
    rank = ctx.graph.rank(x)
    axis = attr(node, "axis", 0) % rank
    size = ctx.graph.static_dims(x, [axis])[0]
    index = int(np.asarray(ctx.graph.consts[node.input[1]])) % size
    pads = [0] * (2 * rank)
    pads[axis], pads[rank + axis] = index, size - 1 - index
    placed = g.op("Unsqueeze", [p, g.i64([axis])])
    return {x: g.op("Pad", [placed, g.i64(pads)], hint="p_gather") if size > 1 else placed}
