"""Einsum of one activation with one constant weight: a linear layer.

Exporters write a 1x1 convolution as ``"nchw,oc->nohw"`` or ``"bhwc,cd->bhwd"``
and a dense layer as ``"bi,ij->bj"`` / ``"bi,ji->bj"``. Such an Einsum is
``y = E(a, W)``; its adjoint is the Einsum ``"<out>,<weight>-><activation>"``.
The linear rule of :func:`~.linear.excite_linear` applies with that pair as
forward and transpose:

    Z = E(a, W+),        P_in = a * E^T(P / Z, W+)   (positive rule adds the a- W- half)

Accepted: two operands, one of them a constant; no letter repeated inside an
operand (no diagonals); every letter of the weight also in the activation or
the output (each (input, output) pair is weighted by one weight entry) and
every letter of the activation in the weight or the output.
"""
from __future__ import annotations

import re

import numpy as np

from .base import Context, attr, register
from .linear import excite_linear


def _terms(equation: str):
    """(operand terms, output term) as lists of tokens ('...' is one token)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    ins = [re.findall(r"\.\.\.|[A-Za-z]", t) for t in lhs.split(",")]
    if not arrow:   # implicit output: the letters seen once, sorted, after the ellipsis
        letters = [t for term in ins for t in term if t != "..."]
        rhs_tokens = (["..."] if any("..." in t for t in ins) else []) + sorted(c for c in set(letters) if letters.count(c) == 1)
    else:
        rhs_tokens = re.findall(r"\.\.\.|[A-Za-z]", rhs)
    return ins, rhs_tokens


def plan(graph, node):
    """(data index, weight index, data term, weight term, output term) or a reason string."""
    equation = attr(node, "equation")
    ins, out = _terms(equation or "")
    if len(node.input) != 2 or len(ins) != 2:
        return "only an Einsum of two operands is supported"
    consts = [graph.is_const(i) for i in node.input]
    if consts.count(True) != 1:
        return "an Einsum needs exactly one constant operand (the weight)"
    w_i = consts.index(True)
    d_i = 1 - w_i
    data, weight = ins[d_i], ins[w_i]
    for term in (data, weight, out):
        if len(set(term)) != len(term):
            return f"repeated index in {equation!r} (diagonals are not supported)"
    if "..." in weight:
        return "an ellipsis in the weight's indices is not supported"
    if not set(weight) <= set(data) | set(out):
        return f"the weight has an index summed over on its own in {equation!r}"
    if not set(data) <= set(weight) | set(out):
        return f"the activation has an index summed over on its own in {equation!r}"
    return d_i, w_i, data, weight, out


def einsum_check(graph, node):
    found = plan(graph, node)
    return found if isinstance(found, str) else None


@register("Einsum", check=einsum_check, weighted=True, family="linear", layout="einsum",
          description="of one activation and one constant weight (`nhwc,cd->nhwd`, `nchw,oc->nohw` 1x1 convs, `nc,kc->nk` dense): "
                      "linear, with the Einsum and its adjoint Einsum; can be the contrastive classifier")
def einsum(ctx: Context, node, p: str, negate=False):
    """Linear rule with the Einsum and its adjoint Einsum."""
    d_i, w_i, data, weight, out = plan(ctx.graph, node)
    a = node.input[d_i]
    g = ctx.g
    forward_eq = ",".join("".join(t) for t in ((data, weight) if d_i == 0 else (weight, data))) + "->" + "".join(out)
    adjoint_eq = f"{''.join(out)},{''.join(weight)}->{''.join(data)}"

    def forward(x, wp):
        w = g.const(wp.astype(np.float32), "w")
        return g.op("Einsum", [x, w] if d_i == 0 else [w, x], equation=forward_eq, hint="z_einsum")

    def transpose(r, wp):
        return g.op("Einsum", [r, g.const(wp.astype(np.float32), "w")], equation=adjoint_eq, hint="p_einsum")

    w = ctx.graph.consts[node.input[w_i]].astype(np.float64)
    return {a: excite_linear(ctx, node, a, p, w, forward=forward, transpose=transpose, negate=negate)}
