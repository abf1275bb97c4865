"""Ops that merge several tensors: Add / Sum (residual or bias) and Concat.

A sum y = x_1 + ... + x_n splits P in proportion to its inputs:
``paper``: P_k = x_k / sum_k x_k * P;  ``positive``: P_k = x_k+ / sum_k x_k+ * P,
exactly 0 where the denominator is 0. Constant inputs are biases: they take
no share, and with one non-constant input P passes through.
"""
from __future__ import annotations

from .base import Context, attr, register


def _sum_check(graph, node):
    if node.op_type == "Add":
        shapes = [graph.shape(i) for i in node.input if not graph.is_const(i)]
        if len(shapes) == 2 and (None in shapes or shapes[0] != shapes[1]):
            if None in shapes:
                return None
            return f"residual Add of differently shaped tensors {shapes[0]} and {shapes[1]} (broadcast) is not supported"
    return None


@register("Add", "Sum", keeps_nonneg=True, check=_sum_check,
          description="split in proportion `x_k / sum x` (`x_k+ / sum x+` for `positive`); constant summands are biases and take no share")
def add(ctx: Context, node, p: str, negate=False):
    """Split P over the non-constant summands in proportion to them."""
    g = ctx.g
    data = [i for i in node.input if i and not ctx.graph.is_const(i)]
    if len(data) == 1:
        return {data[0]: p}
    if ctx.rule == "positive":
        parts = [g.memo(("a+", x), lambda x=x: g.relu(ctx.act(x))) for x in data]
    else:
        parts = [ctx.act(x) for x in data]
    inv = g.memo((node.name, "inv_sum"), lambda: g.safe_reciprocal(g.sum(parts), signed=ctx.rule == "paper"))
    r = g.mul(p, inv)
    out = {}
    for x, part in zip(data, parts):
        if ctx.wants(x):
            share = g.mul(part, r)
            out[x] = g.add(out[x], share) if x in out else share
    return out


@register("Concat", keeps_nonneg=True, description="P split back to the inputs")
def concat(ctx: Context, node, p: str, negate=False):
    """Slice P back along the concat axis."""
    g = ctx.g
    axis = attr(node, "axis")
    sizes = [g.op("Gather", [g.shape(x), g.i64([axis])], axis=0) for x in node.input]
    pieces = g.op("Split", [p, g.op("Concat", sizes, axis=0)], axis=axis, outputs=len(node.input))
    pieces = pieces if isinstance(pieces, list) else [pieces]
    out = {}
    for x, piece in zip(node.input, pieces):
        if ctx.wants(x):
            out[x] = g.add(out[x], piece) if x in out else piece
    return out
