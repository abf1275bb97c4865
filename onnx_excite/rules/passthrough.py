"""Ops that hand P through unchanged, or only re-shape it.

Piecewise-identity activations (ReLU and kin) pass P through: the next linear
layer below multiplies by its input activation, which is where the gating
happens. Shape ops move P back to the layout of their input.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ExciteError
from .base import RULES, Context, attr, register


def _identity(ctx: Context, node, p: str, negate=False):
    """P passes through unchanged."""
    return {node.input[0]: p}


def _rectifier(ctx: Context, node, p: str, negate=False):
    """P passes through, gated by the method's ``rectifier`` entry: ``forward-mask`` (P * [lo < x < hi],
    the derivative), ``backward-relu`` (max(P, 0)), ``both``, or ``none``."""
    g, gate = ctx.g, ctx.variant("rectifier")
    if gate in ("backward-relu", "both"):
        p = g.relu(p)
    if gate in ("forward-mask", "both"):
        p = g.mul(p, g.memo(("fwd_mask", node.name), lambda: _rectifier_mask(ctx, node)))
    return {node.input[0]: p}


def _activation(ctx: Context, node, p: str, negate=False):
    """P passes through, or (the method's ``activation`` entry is ``derivative``: grad, guided)
    the op's declared derivative applies to it."""
    if ctx.variant("activation") == "pass":
        return {node.input[0]: p}
    derivative = RULES[node.op_type].derivative
    if derivative is None:
        raise ExciteError(f"method {ctx.method_name!r}: the derivative of {node.op_type} (node {node.name!r}) is not "
                          "implemented; use an excitation/LRP method (mwp, cmwp, lrp-*) on this model")
    return {node.input[0]: derivative(ctx, node, p)}


def _elementwise(factor):
    """A derivative ``(ctx, node, p) -> p * dy/dx`` from ``factor(g, x, y, one, node) -> dy/dx``
    (x, y: the op's input and output as float32; one: the constant 1)."""

    def apply(ctx: Context, node, p: str) -> str:
        def make():
            x, y = ctx.act(node.input[0]), ctx.act(node.output[0])
            return factor(ctx.g, x, y, ctx.g.scalar(1.0), node)

        return ctx.g.mul(p, ctx.g.memo(("derivative", node.name), make))

    return apply


def _channel_window_sum(ctx: Context, t: str, size: int, before: int, after: int) -> str:
    """s[c] = sum of t[c - before .. c + after] over the channel axis 1 (zero outside), as a
    Conv3D of ones over (N, 1, C, H, W)."""
    g = ctx.g
    t5 = g.op("Unsqueeze", [t, g.i64([1])])
    ones = g.const(np.ones((1, 1, size, 1, 1), np.float32), "ones")
    s = g.op("Conv", [t5, ones], kernel_shape=[size, 1, 1], pads=[before, 0, 0, after, 0, 0], hint="lrn_sum")
    return g.op("Squeeze", [s, g.i64([1])])


def _lrn_adjoint(ctx: Context, node, p: str) -> str:
    """The transposed Jacobian of LRN, y_c = x_c d_c^-beta, d_c = bias + alpha/size
    sum_{c' = c-lo}^{c+hi} x_c'^2 (lo = floor((size-1)/2), hi = ceil((size-1)/2)):
    P_in_j = P_j d_j^-beta - (2 alpha beta / size) x_j sum_{c = j-hi}^{j+lo} P_c x_c d_c^(-beta-1)."""
    g = ctx.g
    size = int(attr(node, "size"))
    alpha, beta, bias = (float(attr(node, k, d)) for k, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    lo, hi = (size - 1) // 2, size // 2
    x = ctx.act(node.input[0])

    def powers():
        d = g.add(g.mul(_channel_window_sum(ctx, g.mul(x, x), size, lo, hi), g.scalar(alpha / size)), g.scalar(bias))
        return g.op("Pow", [d, g.scalar(-beta)]), g.op("Pow", [d, g.scalar(-beta - 1.0)])

    d_beta, d_beta1 = g.memo(("lrn_d", node.name), powers)
    back = _channel_window_sum(ctx, g.mul(g.mul(p, x), d_beta1), size, hi, lo)
    return g.sub(g.mul(p, d_beta), g.mul(g.mul(x, back), g.scalar(2.0 * alpha * beta / size)))


def _rectifier_mask(ctx: Context, node) -> str:
    """[x > lo] * [x < hi] as float (Relu: lo = 0, hi = inf): where the derivative is 1."""
    g = ctx.g
    x = ctx.act(node.input[0])
    lo, hi = (0.0, None) if node.op_type == "Relu" else _clip_bounds(ctx.graph, node)
    mask = g.op("Greater", [x, g.scalar(lo)]) if lo is not None else None
    if hi is not None:
        below = g.op("Less", [x, g.scalar(hi)])
        mask = below if mask is None else g.op("And", [mask, below])
    if mask is None:
        return g.scalar(1.0)
    return g.op("Cast", [mask], to=1, hint="relu_mask")


def _clip_bounds(graph, node):
    def bound(index, name):
        if len(node.input) > index and node.input[index]:
            if node.input[index] not in graph.consts:
                raise ExciteError(f"node {node.name!r}: the gradient through Clip needs constant bounds")
            return float(graph.consts[node.input[index]])
        return attr(node, name)
    return bound(1, "min"), bound(2, "max")


def _sigmoid_d(g, x, y, one, node):
    return g.mul(y, g.sub(one, y))


def _tanh_d(g, x, y, one, node):
    return g.sub(one, g.mul(y, y))


def _softplus_d(g, x, y, one, node):
    return g.op("Sigmoid", [x])


def _leaky_relu_d(g, x, y, one, node):
    return g.op("Where", [g.op("Greater", [x, g.scalar(0.0)]), one, g.scalar(float(attr(node, "alpha", 0.01)))])


def _hard_sigmoid_d(g, x, y, one, node):
    alpha, beta = float(attr(node, "alpha", 0.2)), float(attr(node, "beta", 0.5))
    inner = g.add(g.mul(x, g.scalar(alpha)), g.scalar(beta))
    inside = g.op("And", [g.op("Greater", [inner, g.scalar(0.0)]), g.op("Less", [inner, one])])
    return g.op("Where", [inside, g.scalar(alpha), g.scalar(0.0)])


def _hard_swish_d(g, x, y, one, node):
    """x * clip(x/6 + 1/2, 0, 1): 0 below -3, 1 above 3, (2x + 3)/6 between."""
    mid = g.add(g.mul(x, g.scalar(1 / 3)), g.scalar(0.5))
    return g.op("Where", [g.op("Less", [x, g.scalar(-3.0)]), g.scalar(0.0),
                          g.op("Where", [g.op("Greater", [x, g.scalar(3.0)]), one, mid])])


def _gelu_d(g, x, y, one, node):
    """x * Phi(x): Phi(x) + x phi(x) (``approximate="tanh"``: the derivative of
    0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi))."""
    if attr(node, "approximate", "none") in ("tanh", b"tanh"):
        k = math.sqrt(2.0 / math.pi)
        x2 = g.mul(x, x)
        t = g.op("Tanh", [g.mul(g.add(x, g.mul(g.mul(x2, x), g.scalar(0.044715))), g.scalar(k))])
        dt = g.mul(g.sub(one, g.mul(t, t)), g.mul(g.add(one, g.mul(x2, g.scalar(3 * 0.044715))), g.scalar(k)))
        return g.mul(g.add(g.add(one, t), g.mul(x, dt)), g.scalar(0.5))
    cdf = g.mul(g.add(one, g.op("Erf", [g.mul(x, g.scalar(1 / math.sqrt(2.0)))])), g.scalar(0.5))
    pdf = g.mul(g.op("Exp", [g.mul(g.mul(x, x), g.scalar(-0.5))]), g.scalar(1 / math.sqrt(2 * math.pi)))
    return g.add(cdf, g.mul(x, pdf))


_PASS = ("P passes through (where an activation's output can be negative, the next linear layer sees that sign: "
         "the `positive` rule then counts only positive contributions)")

_ACT = dict(inputs=(0,), family="activation", layout="elementwise")
_DERIVATIVES = {"Sigmoid": _sigmoid_d, "Softplus": _softplus_d, "HardSigmoid": _hard_sigmoid_d,
                "LeakyRelu": _leaky_relu_d, "HardSwish": _hard_swish_d, "Tanh": _tanh_d, "Gelu": _gelu_d}

#: The ReLU family and other monotone activations pass P through (where an activation's
#: output can be negative, the sign of that output is seen by the next linear layer: the
#: positive rule then counts only its positive contributions); they differ in what they say
#: about the sign of their output and in their derivative (for grad and guided).
register("Relu", inputs=(0,), keeps_nonneg="always", family="rectifier", layout="elementwise",
         description="P passes through")(_rectifier)
for _op in ("Sigmoid", "Softplus", "HardSigmoid"):
    register(_op, keeps_nonneg="always", derivative=_elementwise(_DERIVATIVES[_op]), description="P passes through",
             roles={"squasher"} if _op == "Sigmoid" else (), **_ACT)(_activation)
for _op in ("LeakyRelu", "PRelu", "Elu", "Celu", "HardSwish", "Tanh", "Gelu", "Softsign", "Mish"):
    register(_op, keeps_nonneg=True, description=_PASS,
             derivative=_elementwise(_DERIVATIVES[_op]) if _op in _DERIVATIVES else None, **_ACT)(_activation)
register("Identity", "Dropout", inputs=(0,), keeps_nonneg=True, family="identity", layout="elementwise",
         roles={"shape-only"}, description=_PASS)(_identity)
register("Cast", inputs=(0,), keeps_nonneg=True, family="identity", layout="elementwise", description=_PASS)(_identity)
register("LRN", keeps_nonneg=True, description=_PASS, derivative=_lrn_adjoint, inputs=(0,), family="activation",
         layout="nchw")(_activation)
register("Selu", "ThresholdedRelu", description=_PASS, **_ACT)(_activation)


def clip_nonneg(graph, node):
    """Clip(x, lo >= 0) is >= 0 whatever x is."""
    lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
    if lo is None:
        lo_attr = attr(node, "min")
        return "always" if lo_attr is not None and lo_attr >= 0 else False
    return "always" if lo in graph.consts and float(graph.consts[lo]) >= 0 else False


register("Clip", inputs=(0,), keeps_nonneg=clip_nonneg, family="rectifier", layout="elementwise",
         description="P passes through (ReLU6 and other clamps)")(_rectifier)


def _reshape_back(ctx: Context, node, p: str, negate=False):
    a = node.input[0]
    return {a: ctx.g.reshape_like(p, a)}


register("Flatten", "Reshape", "Squeeze", "Unsqueeze", inputs=(0,), keeps_nonneg=True, family="shape",
         roles={"shape-only"}, description="P reshaped back; Shape/Gather/Concat subgraphs feeding a Reshape carry no P")(_reshape_back)


@register("Transpose", inputs=(0,), keeps_nonneg=True, family="shape", layout="transpose",
          description="P permuted back (NHWC graphs)")
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


@register("Mul", keeps_nonneg=True, check=mul_check, family="arithmetic", layout="elementwise", roles={"affine"},
          description="by a gate (SE blocks, SiLU = x·sigmoid(x), constant scales): the gate is a per-element scale, P goes to the gated "
                      "features only. A scalar or per-channel constant scale right after a Conv or a dense layer (Gemm / MatMul; "
                      "decomposed BatchNorm) is folded into that layer first")
def mul(ctx: Context, node, p: str, negate=False):
    """The gate (a constant or computed from the features) is a per-element scale: P flows to the
    features. The gradient family follows the product rule instead: P * gate to the features
    and P * features to the gate branch (unbroadcast to each factor's shape)."""
    if ctx.variant("arithmetic") == "excitation":
        return {node.input[1 - _gate_input(ctx.graph, node)]: p}
    g = ctx.g
    out = {}
    for i in (0, 1):
        x, other = node.input[i], node.input[1 - i]
        if ctx.graph.is_const(x) or not ctx.wants(x):
            continue
        q = g.mul(p, ctx.act(other))
        out[x] = _unbroadcast(ctx, q, x, node.output[0])
    return out


def _unbroadcast(ctx: Context, q: str, x: str, y: str) -> str:
    """Sum ``q`` (shaped like the output ``y``) over the axes where ``x`` was broadcast."""
    xs, ys = ctx.graph.shape(x), ctx.graph.shape(y)
    if xs is None or ys is None:
        return q
    lead = len(ys) - len(xs)
    if lead:
        q = ctx.g.op("ReduceSum", [q, ctx.g.i64(list(range(lead)))], keepdims=0, hint="p_unbroadcast")
    axes = [i for i, (d, e) in enumerate(zip(xs, ys[lead:])) if d == 1 and e != 1]
    if not axes:
        return q
    return ctx.g.op("ReduceSum", [q, ctx.g.i64(axes)], keepdims=1, hint="p_unbroadcast")

