"""Element-wise ops: Sub and Div by a constant, Mean and Max of several tensors.

``x - c``, ``c - x`` and ``x / c`` are per-element affine maps of one tensor:
like ``Mul`` by a constant and a bias ``Add`` they hand P to ``x`` unchanged
(a decomposed BatchNorm ``(x - m) / s``, paddle's hard-swish
``x * clip(x + 3, 0, 6) / 6``, the scaling of tf2onnx graphs, the
normalisation of the pixels inside the graph). ``x / g`` where the divisor is
computed from ``x`` is a gate, as for ``Mul``.

``Mean`` of tensors is their sum scaled by 1/n: P is split as for ``Sum``.
``Max`` of tensors routes each cell's P to the input that holds the maximum
(the first one on ties), as MaxPool does over a window.
"""
from __future__ import annotations

from ..errors import ExciteError
from ..methods import LRP_EPSILON
from .base import Context, proves_nonneg, register
from .merge import add as _proportional_split
from .passthrough import _depends_on


def _data(graph, node):
    return [i for i in node.input if i and not graph.is_const(i)]


def _same_shape_check(graph, data, out):
    shapes = [graph.shape(x) for x in data]
    want = graph.shape(out)
    if want is None or any(s is None for s in shapes):
        return None
    for x, s in zip(data, shapes):
        if len(s) != len(want) or any(a is not None and b is not None and a != b for a, b in zip(s, want)):
            return f"input {x!r} of shape {s} is broadcast to {want}; only equally shaped tensors are supported"
    return None


def sub_check(graph, node):
    data = _data(graph, node)
    if len(data) > 1 and node.input[0] == node.input[1]:
        return "Sub of a tensor from itself"
    return _same_shape_check(graph, data, node.output[0])


@register("Sub", check=sub_check, family="arithmetic", layout="elementwise", roles={"affine"},
          description="`x - c`, `c - x` (decomposed BatchNorm, pixel normalisation inside the graph): per-element affine, "
                      "P passes to `x` as for Mul by a constant and a bias Add; `x - y` of two tensors (PoolFormer's `pool(x) - x`) is the sum rule over x and -y (`x+` and `y-` share P for `positive`). A decomposed "
                      "BatchNorm right after a Conv or a dense layer (scalar or per-channel constants) is folded into that layer first")
def sub(ctx: Context, node, p: str, negate=False):
    """P_in = P: each output cell is an affine function of one input cell. The gradient
    rule (the method's ``arithmetic`` entry) takes the derivative: -P for ``c - x``.
    ``x - y`` of two tensors is the sum ``x + (-1) y`` (:func:`_signed_sum`)."""
    data = _data(ctx.graph, node)
    if not data:
        return {}
    if len(data) == 2:
        return _signed_sum(ctx, [(node.input[0], 1.0), (node.input[1], -1.0)], p, node)
    if ctx.variant("arithmetic") == "chain-rule" and data[0] == node.input[1] and data[0] != node.input[0]:
        return {data[0]: ctx.g.op("Neg", [p], hint="p_neg")}
    return {data[0]: p}


def _part_weight(kind: str, w: float) -> float:
    return {"W": w, "W+": max(w, 0.0), "W-": min(w, 0.0), "1": 1.0}[kind]


def _signed_sum(ctx: Context, terms, p: str, node):
    """The sum rule over summands with weights +-1 (PoolFormer's ``pool(x) - x``), by the
    method's ``add`` variant: each part (act, weight) contributes act(x_k) * w_k(part) with
    w(W+) = max(w, 0), w(W-) = min(w, 0); Z = the sum of the contributions, P_k = sum over its
    parts of act(x_k) w_k R, R = P / Z (or P where the variant does not normalise).
    ``positive``: x+ and y- share P in proportion (a subtrahend takes a share where it is
    negative); ``paper``: x takes it all (a W+ of -1 is 0); the gradient: P and -P."""
    g = ctx.g
    variant = ctx.variant("add")
    parts = variant.resolve(ctx.rule)

    def act(kind, x):
        if kind == "a+":
            return ctx.act(x) if proves_nonneg(ctx.graph, x) else g.memo(("a+", x), lambda: g.relu(ctx.act(x)))
        if kind == "a-":
            return g.memo(("a-", x), lambda: g.negative_part(ctx.act(x)))
        return ctx.act(x) if kind == "a" else None   # "1": a unit factor

    def contribution(a_kind, w_kind, x, w):
        weight = _part_weight(w_kind, w)
        if weight == 0.0:
            return None
        factor = act(a_kind, x)
        if factor is None:
            return g.scalar(weight)
        return factor if weight == 1.0 else g.mul(factor, g.scalar(weight))

    pieces = {x: [c for a_kind, w_kind in parts if (c := contribution(a_kind, w_kind, x, w)) is not None]
              for x, w in terms}
    if variant.normalise == "none":
        r = p
    else:
        def divisor():
            z = g.sum([c for cs in pieces.values() for c in cs])
            if variant.normalise == "Z+eps":
                return g.safe_divisor(g.epsilon_stabilised(z, LRP_EPSILON), signed=True)
            return g.safe_divisor(z, signed=any(a in ("a", "1") or w == "W" for a, w in parts))

        r = g.divide(p, g.memo((node.name, "signed_sum_divisor", parts, variant.normalise), divisor))
    out = {}
    for x, _ in terms:
        if ctx.wants(x) and pieces[x]:
            shares = [g.mul(c, r) for c in pieces[x]]
            out[x] = g.sum(shares)
    return out


def div_check(graph, node):
    x, d = node.input[0], node.input[1]
    if graph.is_const(x):
        return "Div of a constant by a tensor (a reciprocal is not affine)"
    if not graph.is_const(d) and not _depends_on(graph, d, x):
        return "Div by a tensor that is neither a constant nor computed from the dividend"
    return _same_shape_check(graph, [x], node.output[0])


def div_nonneg(graph, node):
    """x / d >= 0 where x >= 0 (the declared input) and the divisor is provably >= 0 too."""
    return proves_nonneg(graph, node.input[1])


# only the dividend carries P (a divisor gate's subgraph is not excited); a constant divided
# by a tensor declares no input that carries P: div_check reports it (the builder checks
# every node on the path, also those whose declared inputs are all constants)
@register("Div", inputs=(0,), keeps_nonneg=div_nonneg, check=div_check, family="arithmetic", layout="elementwise",
          roles={"affine"},
          description="`x / c`, or `x / g` with a gate `g` computed from `x` (L2 normalisation, paddle's hard-swish "
                      "`x·clip(x+3, 0, 6)/6`): P passes to `x`, the divisor takes none; `c / x` is refused. `x / c` "
                      "right after a Conv or a dense layer (decomposed BatchNorm, scalar or per-channel c) is folded into that layer first")
def div(ctx: Context, node, p: str, negate=False):
    """P_in = P for the dividend; the divisor (a constant or a gate) takes no share. The
    chain rule (the method's ``arithmetic`` entry) takes the derivative, P / c, and refuses a divisor
    computed from the features (its derivative would need the gate branch)."""
    if ctx.variant("arithmetic") == "chain-rule":
        d = node.input[1]
        if not ctx.graph.is_const(d):
            raise ExciteError(f"node {node.name!r}: the gradient-family methods cannot pass a Div by a tensor "
                              f"computed from the features (e.g. L2 normalisation); use an excitation method")
        return {node.input[0]: ctx.g.op("Div", [p, ctx.act(d)], hint="p_div")}
    return {node.input[0]: p}


def mean_check(graph, node):
    return _same_shape_check(graph, _data(graph, node), node.output[0])


@register("Mean", keeps_nonneg=True, check=mean_check, family="arithmetic", layout="elementwise",
          description="split in proportion `x_k / sum x` (`x_k+ / sum x+` for `positive`); constant summands are biases and take no share")
def mean(ctx: Context, node, p: str, negate=False):
    """As Add/Sum (the 1/n scales every share alike); the chain rule copies P / n."""
    if ctx.variant("arithmetic") == "chain-rule":
        n = len([i for i in node.input if i])
        p = ctx.g.mul(p, ctx.g.scalar(1.0 / n))
    return _proportional_split(ctx, node, p, negate)


def max_check(graph, node):
    return _same_shape_check(graph, _data(graph, node), node.output[0])


def max_nonneg(graph, node):
    """max(x_1, .., x_n) >= 0 as soon as one input is >= 0 (``Max(x, 0)`` is a ReLU)."""
    return "always" if any(proves_nonneg(graph, i) for i in node.input if i) else False


@register("Max", keeps_nonneg=max_nonneg, check=max_check, layout="elementwise",
          description="each cell's P goes to the input holding the maximum (the first on ties); constants take none")
def max_(ctx: Context, node, p: str, negate=False):
    """P_k = P where x_k is the first arg-max over the non-constant inputs, else 0."""
    g = ctx.g
    data = _data(ctx.graph, node)
    if len(data) == 1:
        return {data[0]: p}

    def first_argmax():
        stacked = g.op("Concat", [g.op("Unsqueeze", [ctx.act(x), g.i64([0])]) for x in data], axis=0)
        return g.op("ArgMax", [stacked], axis=0, keepdims=0, select_last_index=0, hint="max_winner")

    winner = g.memo((node.name, "argmax"), first_argmax)
    zero = g.scalar(0.0)
    out = {}
    for k, x in enumerate(data):
        if ctx.wants(x):
            share = g.op("Where", [g.op("Equal", [winner, g.i64(k)]), p, zero], hint="p_max")
            out[x] = g.add(out[x], share) if x in out else share
    return out
