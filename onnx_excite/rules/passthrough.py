"""Ops that hand P through unchanged, or only re-shape it.

Piecewise-identity activations (ReLU and kin) pass P through: the next linear
layer below multiplies by its input activation, which is where the gating
happens. Shape ops move P back to the layout of their input.
"""
from __future__ import annotations

from .base import Context, attr, register


def _pass(ctx: Context, node, p: str, negate=False):
    """P passes through unchanged."""
    return {node.input[0]: p}


_PASS = ("P passes through (where an activation's output can be negative, the next linear layer sees that sign: "
         "the `positive` rule then counts only positive contributions)")

#: Elementwise ops with one data input whose P passes through unchanged: the ReLU family
#: and other monotone activations (where an activation's output can be negative, the
#: sign of that output is seen by the next linear layer: the positive rule then counts
#: only its positive contributions), plus Identity, Dropout, Cast, LRN. They differ only
#: in what they say about the sign of their output.
register("Relu", "Sigmoid", "Softplus", "HardSigmoid", inputs=(0,), keeps_nonneg="always",
         description="P passes through")(_pass)
register("LeakyRelu", "PRelu", "Elu", "Celu", "HardSwish", "Tanh", "Gelu", "Softsign", "Mish",
         "Identity", "Dropout", "Cast", "LRN", inputs=(0,), keeps_nonneg=True, description=_PASS)(_pass)
register("Selu", "ThresholdedRelu", inputs=(0,), description=_PASS)(_pass)


def clip_nonneg(graph, node):
    """Clip(x, lo >= 0) is >= 0 whatever x is."""
    lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
    if lo is None:
        lo_attr = attr(node, "min")
        return "always" if lo_attr is not None and lo_attr >= 0 else False
    return "always" if lo in graph.consts and float(graph.consts[lo]) >= 0 else False


register("Clip", inputs=(0,), keeps_nonneg=clip_nonneg, description="P passes through (ReLU6 and other clamps)")(_pass)


def _reshape_back(ctx: Context, node, p: str, negate=False):
    a = node.input[0]
    return {a: ctx.g.reshape_like(p, a)}


register("Flatten", "Reshape", "Squeeze", "Unsqueeze", inputs=(0,), keeps_nonneg=True,
         description="P reshaped back; Shape/Gather/Concat subgraphs feeding a Reshape carry no P")(_reshape_back)


@register("Transpose", inputs=(0,), keeps_nonneg=True, description="P permuted back (NHWC graphs)")
def transpose(ctx: Context, node, p: str, negate=False):
    """Undo the permutation."""
    a = node.input[0]
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


@register("Mul", keeps_nonneg=True, check=mul_check,
          description="by a gate (SE blocks, SiLU = x·sigmoid(x), constant scales): the gate is a per-element scale, P goes to the gated features only")
def mul(ctx: Context, node, p: str, negate=False):
    """The gate (a constant or computed from the features) is a per-element scale: P flows to the features."""
    return {node.input[1 - _gate_input(ctx.graph, node)]: p}
