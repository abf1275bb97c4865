"""Ops that hand P through unchanged, or only re-shape it.

Piecewise-identity activations (ReLU and kin) pass P through: the next linear
layer below multiplies by its input activation, which is where the gating
happens. Shape ops move P back to the layout of their input.
"""
from __future__ import annotations

from .base import Context, attr, register

#: Elementwise ops with one data input whose P passes through unchanged.
PASS_THROUGH = ("Relu", "Identity", "Dropout")


@register(*PASS_THROUGH, description="pass-through: P_in = P")
def pass_through(ctx: Context, node, p: str, negate=False):
    """P passes through unchanged."""
    a = node.input[0]
    return {a: p} if ctx.wants(a) else {}


def _reshape_back(ctx: Context, node, p: str, negate=False):
    a = node.input[0]
    return {a: ctx.g.reshape_like(p, a)} if ctx.wants(a) else {}


register("Flatten", "Reshape", "Squeeze", "Unsqueeze",
         description="reshape P back to the input's shape")(_reshape_back)


def _transpose_check(graph, node):
    return None


@register("Transpose", check=_transpose_check, description="transpose P back with the inverse permutation")
def transpose(ctx: Context, node, p: str, negate=False):
    """Undo the permutation."""
    a = node.input[0]
    if not ctx.wants(a):
        return {}
    perm = attr(node, "perm")
    if perm is None:
        perm = list(reversed(range(ctx.graph.rank(a))))
    inverse = [0] * len(perm)
    for i, axis in enumerate(perm):
        inverse[axis] = i
    return {a: ctx.g.op("Transpose", [p], perm=inverse)}
