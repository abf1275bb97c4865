"""Ops that only compute a gate: ``Erf`` and ``Pow`` inside GELU's bracket (opset < 20 exports).

GELU written out, ``x * 0.5 * (1 + erf(x / sqrt 2))`` (``onnx_excite.graph.fuse_gelu``), is a
Mul gate: P goes to ``x`` and the bracket, computed from ``x``, takes none under the excitation
and LRP methods, as the sigmoid of SiLU. Those methods never send P into such a branch; the
gradient family does (the product rule of Mul), and these rules then apply the op's derivative,
which makes the gradient through the decomposed GELU exact::

    erf:        P_in = P * 2 / sqrt(pi) * exp(-u^2)
    u^n:        P_in = P * n * u^(n - 1)          (a constant exponent n)

Anywhere else (an ``Erf`` / ``Pow`` whose output reaches the logits other than as a gate) the
ops are refused.
"""
from __future__ import annotations

import math

import numpy as np

from .base import Context, register
from .passthrough import _activation, _gate_input


def gate_only(graph, name: str, seen=None) -> bool:
    """Whether every path from ``name`` to the logits enters a Mul as its gate input, a Div
    as its divisor or an attention MatMul as its weights ``Softmax(..) @ V`` (so that P under
    the excitation methods never reaches ``name``)."""
    seen = set() if seen is None else seen
    if name == graph.entry:
        return False
    if name in seen:
        return True
    seen.add(name)
    for node in graph.consumers.get(name, []):
        if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] != node.input[1]:
            gate = _gate_input(graph, node)
            if gate is not None and node.input[gate] == name:
                continue
        if node.op_type == "Div" and node.input[1] == name and node.input[0] != name:
            continue
        if (node.op_type == "MatMul" and node.input[0] == name and node.input[1] != name
                and not graph.is_const(node.input[1]) and getattr(graph.producer.get(name), "op_type", "") == "Softmax"):
            continue
        if not all(gate_only(graph, o, seen) for o in node.output if o):
            return False
    return True


def gate_check(graph, node):
    if node.op_type == "Pow" and not (len(node.input) == 2 and graph.is_const(node.input[1])
                                      and np.asarray(graph.consts[node.input[1]]).size == 1):
        return "Pow with an exponent that is not one constant"
    if not gate_only(graph, node.output[0]):
        return (f"{node.op_type} outside a gate (only GELU's erf / x^3 bracket, a branch that reaches the features "
                f"as the gate of a Mul, is supported)")
    return None


def _gate_derivative(ctx: Context, node, p: str) -> str:
    """P times the op's derivative (only the product rule of the gradient family sends P here)."""
    g = ctx.g
    u = ctx.act(node.input[0])
    if node.op_type == "Erf":
        slope = g.mul(g.op("Exp", [g.op("Neg", [g.mul(u, u)])]), g.scalar(2.0 / math.sqrt(math.pi)))
    else:
        n = float(np.asarray(ctx.graph.consts[node.input[1]]).reshape(-1)[0])
        slope = g.mul(g.op("Pow", [u, g.scalar(n - 1.0)]), g.scalar(n))
    return g.mul(p, slope)


@register("Erf", "Pow", inputs=(0,), check=gate_check, family="activation", layout="elementwise",
         derivative=_gate_derivative,
         description="only in a gate branch (GELU written out below opset 20: `x * 0.5 * (1 + erf(x/sqrt2))`, the "
                     "tanh form's `x^3`): takes no P under the excitation / LRP methods; the gradient family applies "
                     "the derivative")
def gate_branch(ctx: Context, node, p: str, negate=False):
    """The activation rule: P passes (never reached under the excitation methods: the branch is a gate)
    or, for the gradient family, the derivative applies."""
    return _activation(ctx, node, p, negate)
