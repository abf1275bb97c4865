"""Self-attention: ``Softmax(Q K' s + bias) V`` as exporters write it (MatMul of two activations).

The attention weights A = Softmax(..) >= 0 are a gate computed from the input, as SE gates
and SiLU's sigmoid are (the CP / attention-head rule of Ali et al., ICML 2022): P flows to V
through A, a per-sample, per-head non-negative weight matrix, and Q and K take none. For
``out = A @ V`` (A: (..., T, T'), V: (..., T', D)) the linear layers' excitation applies with
the weight A (``excite_linear``; A >= 0, so A+ = A and A- = 0)::

    positive:  z_itd = A_it V+_td,   Z = A @ V+,   P_V = V+ * (A' @ (P / Z))
    paper:     z_itd = A_it V_td,    Z = A @ V,    P_V = V * (A' @ (P / Z))

(MWP shares each output's P in proportion to the positive contributions A_it V+_td). The
score MatMul ``Q K'`` and the Softmax are a gate branch: they take no P. The Reshape /
Transpose / Gather (``rules.tokens``) / Split nodes exporters put around the heads move P as
for any tensor.

The gradient family (the method's ``arithmetic`` entry ``chain-rule``, as for Mul) takes the
product rule of every MatMul of two activations, ``P_X = P Y'`` and ``P_Y = X' P`` over the last
two axes, and Softmax's derivative ``P_in = y (P - sum(P y))`` over its axis: the true gradient,
the Q and K paths included.
"""
from __future__ import annotations

import numpy as np

from ..errors import ExciteError
from .base import Context, attr, register
from .gates import gate_only
from .linear import excite_linear


def attention_weights(graph, node) -> bool:
    """Whether a MatMul of two activations is ``A @ V``: its first input computed by a Softmax."""
    producer = graph.producer.get(node.input[0])
    return producer is not None and producer.op_type == "Softmax"


def matmul_check(graph, node) -> str | None:
    """The reason a MatMul of two activations cannot be handled, None where it can: ``A @ V``
    with A from a Softmax, or a score product ``Q @ K'`` that only reaches the logits as a gate."""
    if attention_weights(graph, node):
        return None
    if gate_only(graph, node.output[0]):
        return None
    return ("MatMul of two activations that is neither attention weights times values (Softmax(..) @ V) nor "
            "attention scores feeding only a Softmax gate")


def _no_weight_parts(kind: str, weight: np.ndarray) -> np.ndarray:
    """A >= 0: its W and W+ parts are A itself (a marker of ones), its W- part is empty."""
    if kind in ("W", "W+"):
        return weight
    if kind == "W-":
        return np.zeros_like(weight)
    raise KeyError(kind)


def attention_matmul(ctx: Context, node, p: str, negate=False):
    """P through ``A @ V`` to V (A a gate), or, for a score product, none."""
    if ctx.variant("arithmetic") == "chain-rule":
        return _product_rule(ctx, node, p)
    if not attention_weights(ctx.graph, node):
        return {}   # a score product Q K': a gate branch (gate_only), it takes no P
    g = ctx.g
    a, v = ctx.act(node.input[0]), node.input[1]
    rank = ctx.graph.rank(node.input[0])
    a_t = g.memo((node.name, "A'"), lambda: g.op("Transpose", [a], perm=list(range(rank - 2)) + [rank - 1, rank - 2],
                                                  hint="attn_T"))
    out = excite_linear(ctx, node, v, p, np.ones(1, np.float32),
                        forward=lambda x, w: g.op("MatMul", [a, x], hint="z_attn"),
                        transpose=lambda r, w: g.op("MatMul", [a_t, r], hint="p_attn"),
                        negate=negate, part_of=_no_weight_parts)
    return {v: out} if out is not None else {}


def softmax_check(graph, node):
    if not gate_only(graph, node.output[0]):
        return "Softmax whose output reaches the logits other than as attention weights or a Mul gate"
    return None


def _swap_last(g, t: str, rank: int) -> str:
    return g.op("Transpose", [t], perm=list(range(rank - 2)) + [rank - 1, rank - 2], hint="swap_last")


def _product_rule(ctx: Context, node, p: str) -> dict:
    """The gradient of ``X @ Y`` (both activations): P_X = P Y', P_Y = X' P."""
    g, graph = ctx.g, ctx.graph
    x, y = node.input
    rx, ry = graph.rank(x), graph.rank(y)
    if rx is None or rx != ry or rx < 2:
        raise ExciteError(f"node {node.name!r}: the gradient through a MatMul of two activations needs inputs of one "
                          f"known rank (got {rx} and {ry})")
    out = {}
    if x == y:   # X @ X: both terms land on X
        return {x: g.add(g.op("MatMul", [p, _swap_last(g, ctx.act(y), ry)]),
                         g.op("MatMul", [_swap_last(g, ctx.act(x), rx), p]))}
    out[x] = g.op("MatMul", [p, _swap_last(g, ctx.act(y), ry)], hint="grad_mm_a")
    out[y] = g.op("MatMul", [_swap_last(g, ctx.act(x), rx), p], hint="grad_mm_b")
    return out


def softmax_check(graph, node):
    if not gate_only(graph, node.output[0]):
        return "Softmax whose output reaches the logits other than as attention weights or a Mul gate"
    return None


def _softmax_derivative(ctx: Context, node, p: str) -> str:
    """y (P - sum over the axis of P y), y the Softmax's output."""
    g = ctx.g
    y = ctx.act(node.output[0])
    rank = ctx.graph.rank(node.output[0])
    axis = attr(node, "axis", -1) % rank
    dot = g.reduce("ReduceSum", g.mul(p, y), [axis], keepdims=1, hint="softmax_dot")
    return g.mul(y, g.sub(p, dot))


@register("Softmax", inputs=(0,), keeps_nonneg="always", check=softmax_check, family="activation",
          roles={"squasher"}, derivative=_softmax_derivative,
          description="attention weights (`Softmax(Q K' s + bias) @ V`) or another gate: takes no P under the "
                      "excitation / LRP methods; the gradient family applies its derivative `y (P - sum(P y))`")
def softmax(ctx: Context, node, p: str, negate=False):
    """Reached only by the product rule of the gradient family (a gate): the activation rule."""
    from .passthrough import _activation

    return _activation(ctx, node, p, negate)
