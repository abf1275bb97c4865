"""Ops that hand P through unchanged, or only re-shape it.

Piecewise-identity activations (ReLU and kin) pass P through: the next linear
layer below multiplies by its input activation, which is where the gating
happens. Shape ops move P back to the layout of their input.
"""
from __future__ import annotations

from .base import Context, attr, register

#: Elementwise ops with one data input whose P passes through unchanged: the ReLU family
#: and other monotone activations (where an activation's output can be negative, the
#: sign of that output is seen by the next linear layer: the positive rule then
#: counts only its positive contributions), plus Identity, Dropout, Cast, LRN.
PASS_THROUGH = ("Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
                "Sigmoid", "Tanh", "Gelu", "Softplus", "Softsign", "Mish", "ThresholdedRelu",
                "Identity", "Dropout", "Cast", "LRN")


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


def _gate_input(graph, node):
    """Of Mul(x, g), the index of the gate g: a constant, or a tensor computed from x."""
    a, b = node.input[0], node.input[1]
    if graph.is_const(b):
        return 1
    if graph.is_const(a):
        return 0
    if _depends_on(graph, b, a):
        return 1
    if _depends_on(graph, a, b):
        return 0
    return None


def _depends_on(graph, tensor, source, limit=10000):
    stack, seen = [tensor], set()
    while stack and len(seen) < limit:
        t = stack.pop()
        if t == source:
            return True
        if t in seen:
            continue
        seen.add(t)
        node = graph.producer.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return False


def mul_check(graph, node):
    if _gate_input(graph, node) is None:
        return "Mul of two independent tensors (neither is a constant nor a gate computed from the other)"
    return None


@register("Mul", check=mul_check,
          description="gating (SE blocks, SiLU = x*sigmoid(x), constant scales): P passes to the gated input")
def mul(ctx: Context, node, p: str, negate=False):
    """The gate (a constant or computed from the features) is a per-element scale: P flows to the features."""
    x = node.input[1 - _gate_input(ctx.graph, node)]
    return {x: p} if ctx.wants(x) else {}
