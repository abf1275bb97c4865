"""Ops that merge several tensors: Add / Sum (residual or bias) and Concat.

A sum y = x_1 + ... + x_n splits P in proportion to its inputs:
``paper``: P_k = x_k / sum_k x_k * P;  ``positive``: P_k = x_k+ / sum_k x_k+ * P,
exactly 0 where the denominator is 0. Constant inputs are biases: they take
no share, and with one non-constant input P passes through.
"""
from __future__ import annotations

import numpy as np

from ..methods import LRP_EPSILON
from .base import Context, attr, proves_nonneg, register


def _sum_check(graph, node):
    if node.op_type == "Add":
        shapes = [graph.shape(i) for i in node.input if not graph.is_const(i)]
        if len(shapes) == 2 and (None in shapes or shapes[0] != shapes[1]):
            if None in shapes:
                return None
            return f"residual Add of differently shaped tensors {shapes[0]} and {shapes[1]} (broadcast) is not supported"
    return None


_SUM = "split in proportion `x_k / sum x` (`x_k+ / sum x+` for `positive`); constant summands are biases and take no share"


@register("Sum", keeps_nonneg=True, check=_sum_check, family="add", layout="elementwise", roles={"bias"}, description=_SUM)
@register("Add", keeps_nonneg=True, check=_sum_check, family="add", layout="elementwise", roles={"bias", "affine"},
          description=_SUM)
def add(ctx: Context, node, p: str, negate=False):
    """Split P over the non-constant summands by the method's ``add`` rule variant (unit
    weights): P_k = sum_parts act(x_k) * R, R = P / Z, Z = sum_parts sum_k act(x_k)
    (+ the constant summands when the bias is "in-Z"); a ``W-`` part of a unit weight is
    empty. MWP: x_k+ / sum x+ (``positive``), x_k / sum x (``paper``); the gradient family
    copies P to every summand."""
    g = ctx.g
    variant = ctx.variant("add")
    data = [i for i in node.input if i and not ctx.graph.is_const(i)]
    consts = [i for i in node.input if i and ctx.graph.is_const(i)]
    in_z = variant.bias == "in-Z" and consts
    if len(data) == 1 and not in_z:
        return {data[0]: p}
    parts = [act for act, kind in variant.resolve(ctx.rule) if kind != "W-"]

    def summand(act, x):
        if act == "a+":   # x+ = x where x is provably >= 0 (a ResNet's identity branch)
            return ctx.act(x) if proves_nonneg(ctx.graph, x) else g.memo(("a+", x), lambda: g.relu(ctx.act(x)))
        return g.memo(("a-", x), lambda: g.negative_part(ctx.act(x))) if act == "a-" else ctx.act(x)

    rectified = _rectified_sum(ctx, node, data) if parts == ["a+"] and variant.normalise == "Z" and not in_z else None
    if rectified is not None:
        # S = x_o + x+ and x+ = S - x_o, read from the sum's Relu output (see _rectified_sum)
        x_o, x, out = rectified
        s = g.memo(("rectified_sum", node.name), lambda: g.op("Max", [ctx.act(out), ctx.act(x_o)], hint="sum_pos"))
        r = g.divide(p, g.memo((node.name, "sum_divisor", "rectified"), lambda: g.safe_divisor(s, signed=False)))
        out_p = {}
        if ctx.wants(x_o):
            out_p[x_o] = g.mul(ctx.act(x_o), r)
        if ctx.wants(x):
            out_p[x] = g.mul(g.memo(("a+ of sum", x), lambda: g.op("Sub", [s, ctx.act(x_o)], hint="a_pos")), r)
        return out_p
    if variant.normalise == "none":
        r = p
    else:
        def divisor():
            z = g.sum([summand(act, x) for act in parts for x in data])
            if in_z:
                z = g.add(z, g.const(sum(ctx.graph.consts[c].astype(np.float64) for c in consts).astype(np.float32), "bias"))
            if variant.normalise == "Z+eps":
                return g.safe_divisor(g.epsilon_stabilised(z, LRP_EPSILON), signed=True)
            return g.safe_divisor(z, signed=any(act in ("a", "1") for act in parts))

        key = (node.name, "sum_divisor", tuple(parts), variant.normalise, bool(in_z))
        r = g.divide(p, g.memo(key, divisor))
    out = {}
    for x in data:
        if not ctx.wants(x):
            continue
        for act in parts:
            share = r if act == "1" else g.mul(summand(act, x), r)
            out[x] = g.add(out[x], share) if x in out else share
    return out


def _rectified_sum(ctx: Context, node, data):
    """``(x_o, x, out)`` when ``y = x_o + x`` (two data inputs) feeds nothing but ``out =
    Relu(y)``, ``x_o`` is provably >= 0 and ``x`` is not: a ResNet block's identity branch
    plus its last conv. Then, exactly, ``x_o + x+ = Max(out, x_o)`` (y > 0: out = y; else
    x <= -x_o <= 0) and ``x+ = Max(out, x_o) - x_o``, so the positive split needs neither
    ``x`` nor ``y``. ONNX Runtime runs that conv, the Add and the Relu as one fused kernel
    whose only output is ``out``; reading ``x`` made it compute and store them apart (a
    ResNet-50 forward 19 % slower at batch 1 with those conv outputs read)."""
    if len(data) != 2 or len(node.input) != 2:
        return None
    users = ctx.graph.consumers.get(node.output[0], [])
    outputs = {o.name for o in ctx.graph.model.graph.output}
    if len(users) != 1 or users[0].op_type != "Relu" or node.output[0] in outputs:
        return None
    nonneg = [proves_nonneg(ctx.graph, x) for x in data]
    if nonneg.count(True) != 1:
        return None
    x_o, x = (data[0], data[1]) if nonneg[0] else (data[1], data[0])
    return x_o, x, users[0].output[0]


@register("Concat", keeps_nonneg=True, family="shape", layout="elementwise", description="P split back to the inputs")
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
