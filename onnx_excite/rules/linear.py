"""Linear layers: Conv, Gemm, MatMul, AveragePool, GlobalAveragePool, ReduceMean.

All share one excitation (:func:`excite_linear`); each op only says how to
apply itself with a modified weight (``forward``) and how to apply the
transpose (``transpose``).

Rule ``paper`` (Zhang et al. 2016), a = layer input, W+ = max(W, 0)::

    Z_i = sum_j a_j W+_ij,        P_in[j] = a_j * sum_i W+_ij P_i / Z_i

Rule ``positive`` (default), z_ij = (a_j W_ij)+ = a+_j W+_ij + a-_j W-_ij::

    Z_i = sum_j z_ij,             P_in[j] = sum_i z_ij P_i / Z_i
                                          = a+_j (W+^T R)_j + a-_j (W-^T R)_j,  R = P / Z

where a term with Z_i == 0 contributes exactly 0. Where ``a`` is provably
non-negative the a- half is zero and is not emitted. Bias is ignored.
Pools are linear layers with equal positive weights over their window, so
their share is a_j / sum(window) whatever the count the pool divides by.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper

from ..errors import ExciteError
from ..graph.canonicalize import batchnorm_affine
from ..graph.emitter import derived, source_weight
from ..methods import LRP_EPSILON
from .base import Context, attr, proves_nonneg, register


# ---------------------------------------------------------------------------
# convolution-shaped ops
# ---------------------------------------------------------------------------
class ConvSpec:
    """Geometry of a conv-like op over ``k`` spatial axes, with explicit pads."""

    def __init__(self, kernel, strides, dilations, pads, group, in_spatial, out_spatial):
        self.kernel, self.strides, self.dilations = list(kernel), list(strides), list(dilations)
        self.pads, self.group = list(pads), group
        self.in_spatial, self.out_spatial = in_spatial, out_spatial  # lists of int|None, or None

    @property
    def n(self):
        return len(self.kernel)

    def _flipped(self, w):
        return _flip_transpose(w, self.group)

    def conv(self, ctx: Context, x: str, w: np.ndarray) -> str:
        return ctx.g.op("Conv", [x, ctx.g.weight(w, "w")], hint="z_conv",
                        kernel_shape=self.kernel, strides=self.strides, dilations=self.dilations,
                        pads=self.pads, group=self.group)

    def conv_transpose(self, ctx: Context, r: str, w: np.ndarray, like: str) -> str:
        """The adjoint of :meth:`conv`, cut to the spatial size of ``like`` (the conv input).

        Pads are emitted symmetric (min of begin/end) and the rest is sliced off:
        asymmetric-pad ConvTranspose falls back to the CPU in CUDA builds.
        ``output_padding`` is exact when sizes are static, else ``stride - 1``
        followed by a slice to the dynamic input size.
        """
        g = ctx.g
        n = self.n
        if all(s == 1 for s in self.strides):
            flipped_pads = [(k - 1) * d - p for k, d, p in zip(self.kernel * 2, self.dilations * 2, self.pads)]
            if min(flipped_pads) >= 0:
                # stride 1: the adjoint is a plain Conv with the kernel transposed and flipped,
                # which runs on ORT's fast (NCHWc) convolution path
                wt = g.weight(w, "wT", layout=("flipT", self.group, tuple(w.shape)), compute=self._flipped)
                return g.op("Conv", [r, wt], hint="p_conv",
                            kernel_shape=self.kernel, strides=self.strides, dilations=self.dilations,
                            pads=flipped_pads, group=self.group)
        sym, out_pad, starts, need_slice = [], [], [], False
        for i in range(n):
            pb, pe = self.pads[i], self.pads[i + n]
            s, d, k = self.strides[i], self.dilations[i], self.kernel[i]
            m = min(pb, pe)
            sym.append(m)
            start = pb - m
            starts.append(start)
            size_in = self.in_spatial[i] if self.in_spatial else None
            size_out = self.out_spatial[i] if self.out_spatial else None
            if size_in is not None and size_out is not None:
                full = s * (size_out - 1) + (k - 1) * d + 1 - 2 * m
                op = max(0, start + size_in - full)
                if op >= max(s, d):
                    raise ExciteError(f"internal: output_padding {op} out of range (stride {s}, dilation {d})")
                out_pad.append(op)
                need_slice |= start > 0 or full + op != size_in
            else:
                out_pad.append(s - 1 if s > 1 else 0)
                need_slice = True
        y = g.op("ConvTranspose", [r, g.weight(w, "w")], hint="p_convT",
                 kernel_shape=self.kernel, strides=self.strides, dilations=self.dilations,
                 pads=sym + sym, group=self.group, output_padding=out_pad if any(out_pad) else None)
        if not need_slice:
            return y
        axes = list(range(2, 2 + n))
        static = self.in_spatial is not None and all(v is not None for v in self.in_spatial)
        if static:
            ends = g.i64([st + size for st, size in zip(starts, self.in_spatial)])
        else:
            sizes = g.op("Gather", [g.shape(like), g.i64(axes)], axis=0)
            ends = g.op("Add", [sizes, g.i64(starts)])
        return g.op("Slice", [y, g.i64(starts), ends, g.i64(axes)], hint="p_slice")


def _flip_transpose(w: np.ndarray, group: int) -> np.ndarray:
    """Weight (M, C/g, k...) of a conv -> weight (C, M/g, k...) of its stride-1 adjoint conv."""
    m, cg = w.shape[:2]
    k = w.shape[2:]
    wt = w.reshape((group, m // group, cg) + k).swapaxes(1, 2).reshape((group * cg, m // group) + k)
    return np.ascontiguousarray(np.flip(wt, axis=tuple(range(2, w.ndim))))


def _spatial(ctx_graph, name, n):
    s = ctx_graph.shape(name)
    if s is None or len(s) != n + 2:
        return None
    return list(s[2:])


def explicit_pads(node, kernel, strides, dilations, in_spatial):
    """Pads as [begin..., end...], resolving auto_pad with static input sizes."""
    n = len(kernel)
    auto = attr(node, "auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return list(attr(node, "pads", [0] * (2 * n)))
    if auto == "VALID":
        return [0] * (2 * n)
    if in_spatial is None or any(v is None for v in in_spatial):
        raise ExciteError(f"node {node.name!r}: auto_pad={auto} needs static spatial input sizes (pass input_shapes)")
    begin, end = [], []
    for i in range(n):
        eff = (kernel[i] - 1) * dilations[i] + 1
        out = -(-in_spatial[i] // strides[i])
        total = max((out - 1) * strides[i] + eff - in_spatial[i], 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin + end


def conv_spec(graph, node) -> ConvSpec:
    w = graph.consts[node.input[1]]
    n = w.ndim - 2
    kernel = list(attr(node, "kernel_shape", w.shape[2:]))
    strides = list(attr(node, "strides", [1] * n))
    dilations = list(attr(node, "dilations", [1] * n))
    in_sp = _spatial(graph, node.input[0], n)
    pads = explicit_pads(node, kernel, strides, dilations, in_sp)
    return ConvSpec(kernel, strides, dilations, pads, attr(node, "group", 1), in_sp, _spatial(graph, node.output[0], n))


def pool_spec(graph, node, channels: int) -> ConvSpec:
    kernel = list(attr(node, "kernel_shape"))
    n = len(kernel)
    strides = list(attr(node, "strides", [1] * n))
    dilations = list(attr(node, "dilations", [1] * n))
    in_sp = _spatial(graph, node.input[0], n)
    out_sp = _spatial(graph, node.output[0], n)
    pads = explicit_pads(node, kernel, strides, dilations, in_sp)
    if attr(node, "ceil_mode", 0):
        # the extra windows of ceil mode read padding at the end: widen the end pads
        for i in range(n):
            eff = (kernel[i] - 1) * dilations[i] + 1
            extra = (out_sp[i] - 1) * strides[i] + eff - (in_sp[i] + pads[i] + pads[i + n])
            pads[i + n] += max(extra, 0)
    return ConvSpec(kernel, strides, dilations, pads, channels, in_sp, out_sp)


# ---------------------------------------------------------------------------
# the one excitation every linear op shares
# ---------------------------------------------------------------------------
def _weight_of(kind: str, w: np.ndarray) -> np.ndarray:
    """The part ``kind`` of ``w`` (W, W+ = max(W, 0), W- = min(W, 0), 1), only that one computed."""
    if kind == "W":
        return w
    if kind == "W+":
        return derived(w, np.maximum(w, 0), "W+")
    if kind == "W-":
        return derived(w, np.minimum(w, 0), "W-")
    if kind == "1":
        return np.ones_like(w)
    raise KeyError(kind)


#: parts whose forward sum is >= 0 whatever the sign of the activation
_NONNEG_PARTS = {("a+", "W+"), ("a-", "W-"), ("a+", "1"), ("1", "W+"), ("1", "1")}


def excite_linear(ctx: Context, node, a: str, p: str, weight: np.ndarray, forward, transpose, negate=False,
                  family: str = "linear", bias: np.ndarray | None = None, count=None, part_of=None) -> str | None:
    """P at the input ``a`` of a linear node, given P at its output, by the method's rule
    variant for ``family`` (:class:`~onnx_excite.methods.RuleVariant`)::

        Z = sum_parts fwd(act, weight) (+ b when the bias is "in-Z"),
        R = P / Z ("Z"), P / (Z + eps max|Z| sign Z) ("Z+eps") or P ("none"),
        P_in = sum_parts act * adj(R, weight),   a zero denominator contributes 0.

    ``forward(x, w)`` applies the node with weight ``w`` to ``x`` (no bias);
    ``transpose(r, w)`` applies its adjoint. ``negate`` uses -W (and -b): the dual.
    ``count`` (pools: the divisor, a number or tensor of the output's shape) scales the
    un-normalised adjoint of a pool whose ``weight`` is its window of ones. ``part_of(kind, w)``
    (default: elementwise W+ / W- of the array) gives a structured weight's parts, for a linear
    map whose W+ is not max(w, 0) of its parameters (LayerNormalization). Z (through
    its safe divisor) is emitted once per node, weight sign and parts, shared by every sweep and method
    (mwp, cmwp, cmwp-postnorm and, with the positive rule, lrp-zplus).
    Excitation (``--rule positive``): parts a+ W+ + a- W-; where ``a`` is provably
    non-negative the a- half is zero and a+ = a, neither is emitted.
    """
    g = ctx.g
    variant = ctx.variant(family)
    parts = variant.resolve(ctx.rule)
    nonneg = not ctx.signed(a) if ctx.rule == "positive" else proves_nonneg(ctx.graph, a)
    a = ctx.act(a)  # float32 even in a float16 model: tiny Z must not underflow
    w = -weight if negate else weight
    terms, labels = [], []
    for act, kind in parts:
        if act == "a-" and nonneg:
            continue   # a- = 0: the half is empty (and its weight part never computed)
        wk = (part_of or _weight_of)(kind, w)
        if not wk.any():
            continue
        if act == "a+":
            x = a if nonneg else g.memo(("a+", a), lambda: g.relu(a))
        elif act == "a-":
            x = g.memo(("a-", a), lambda: g.negative_part(a))
        else:
            x = None if act == "1" else a
        terms.append((x, wk))
        labels.append((act, kind))
    if not terms:
        return None  # no contribution anywhere: all of P is lost here
    if variant.normalise == "none":
        r = p
        if count is not None and any(lab[1] != "1" for lab in labels):  # a pool's weight 1/count
            if callable(count):
                count = count()
            scaled = g.op("Div", [p, count if isinstance(count, str) else g.scalar(float(count))])
            return g.sum([(transpose(scaled if lab[1] != "1" else r, wp) if x is None
                           else g.mul(x, transpose(scaled if lab[1] != "1" else r, wp)))
                          for (x, wp), lab in zip(terms, labels)])
    else:
        if any(x is None for x, _ in terms):
            raise ExciteError(f"internal: rule variant {variant} normalises a unit-activation part")
        b = None
        if variant.bias == "in-Z" and bias is not None and np.any(bias):
            b = -bias if negate else bias
        key = (node.name, negate, tuple(labels), variant.normalise, variant.bias, "z_divisor")

        def divisor():
            z = g.sum([forward(x, wp) for x, wp in terms])
            if b is not None:
                z = g.add(z, g.const(b.astype(np.float32), "bias"))
            if variant.normalise == "Z+eps":
                return g.safe_divisor(g.epsilon_stabilised(z, LRP_EPSILON), signed=True)
            return g.safe_divisor(z, signed=any(lab not in _NONNEG_PARTS for lab in labels))

        r = g.divide(p, g.memo(key, divisor))
    return g.sum([transpose(r, wp) if x is None else g.mul(x, transpose(r, wp)) for x, wp in terms])


# ---------------------------------------------------------------------------
# Conv
# ---------------------------------------------------------------------------
def _weight_check(graph, node):
    if len(node.input) < 2 or node.input[1] not in graph.consts:
        return "the weight is not a constant initializer"
    if graph.is_const(node.input[0]):
        return "the data input is a constant"
    return None


def conv_check(graph, node):
    reason = _weight_check(graph, node)
    if reason:
        return reason
    w = graph.consts[node.input[1]]
    if w.ndim < 3:
        return f"weight of rank {w.ndim}"
    auto = attr(node, "auto_pad", "NOTSET")
    if auto.startswith("SAME") and graph.static_dims(node.input[0], range(2, w.ndim)) is None:
        return f"auto_pad={auto} with dynamic spatial sizes (fix the input shape)"
    return None


@register("Conv", inputs=(0,), check=conv_check, weighted=True, family="linear", layout="nchw", roles={"mac"},
          description="linear (pads incl. asymmetric, strides, dilations, groups); the adjoint is a ConvTranspose of W+ "
                      "with symmetric pads + Slice, or for stride 1 a Conv with the flipped, transposed kernel (ORT's fast path)")
def conv(ctx: Context, node, p: str, negate=False):
    """Linear rule through Conv (any groups, strides, dilations, pads) and ConvTranspose of W+."""
    a = node.input[0]
    spec = conv_spec(ctx.graph, node)
    w = source_weight(ctx.graph.consts, node.input[1])  # float32: clamping commutes with rounding to float32
    bias = None
    if len(node.input) > 2 and node.input[2] in ctx.graph.consts:
        bias = ctx.graph.consts[node.input[2]].astype(np.float64).reshape((1, -1) + (1,) * (w.ndim - 2))
    out = excite_linear(ctx, node, a, p, w,
                        forward=lambda x, wp: spec.conv(ctx, x, wp),
                        transpose=lambda r, wp: spec.conv_transpose(ctx, r, wp, like=a), negate=negate, bias=bias)
    return {a: out}


# ---------------------------------------------------------------------------
# Gemm and MatMul
# ---------------------------------------------------------------------------
def _dense(ctx: Context, node, a: str, p: str, w: np.ndarray, negate: bool, bias=None):
    """``y = a @ w`` with ``w`` of shape (K, M): forward a @ W', transpose r @ W'^T.

    For 2-D activations Z and the transpose are Gemms; Z reads W'+ in the layout the model
    stores W in (for Gemm transB=1: (M, K)), the adjoint W'+ in the other layout, so that
    ONNX Runtime prepacks both (see ``transpose``).
    """
    g = ctx.g
    two_d = ctx.graph.rank(a) == 2

    def flipped(wp) -> bool:
        """Whether W'+ (K, M) lies in memory as (M, K): the model's Gemm with transB=1."""
        return not wp.flags.c_contiguous and wp.T.flags.c_contiguous

    def as_laid(wp):
        """W'+ in the layout it has in memory (a Gemm reads it with transB = flipped)."""
        return g.weight(wp, "w", layout=("T",), compute=lambda a: a.T) if flipped(wp) else g.weight(wp, "w")

    def other_layout(wp):
        """W'+ in the other layout: (K, M) for a flipped one, else (M, K)."""
        return g.weight(wp, "wT") if flipped(wp) else transposed(wp)

    def transposed(wp):
        return g.weight(wp, "wT", layout=("T",), compute=lambda a: np.ascontiguousarray(a.T))

    def forward(x, wp):
        if two_d:
            return g.op("Gemm", [x, as_laid(wp)], hint="z_gemm", transB=int(flipped(wp)))
        return g.op("MatMul", [x, g.weight(wp, "w")], hint="z_mm")

    def transpose(r, wp):
        # W'+ in the other layout than Z's, with the same transB: each Gemm reads a weight of
        # its own. ONNX Runtime prepacks a Gemm's constant B only where no other node reads
        # it; one B shared by Z and the adjoint runs unpacked, 1.7-2.2x slower at batch 1
        # (1000 x 1280 and 4096 x 8192 measured). Derived in the graph, the file still holds
        # the model's weight once; ORT folds the Transpose at load.
        if two_d:
            return g.op("Gemm", [r, other_layout(wp)], hint="p_gemm", transB=int(flipped(wp)))
        return g.op("MatMul", [r, transposed(wp)], hint="p_mm")

    return excite_linear(ctx, node, a, p, w, forward=forward, transpose=transpose, negate=negate, bias=bias)


def dense_check(graph, node):
    if node.op_type == "MatMul" and len(node.input) > 1 and not graph.is_const(node.input[1]) \
            and not graph.is_const(node.input[0]):
        from .attention import matmul_check

        return matmul_check(graph, node)
    reason = _weight_check(graph, node)
    if reason:
        return reason
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return "transA=1 (activation transposed) is not supported"
    if node.op_type == "MatMul" and graph.consts[node.input[1]].ndim != 2:
        return "only 2-D constant weights are supported"
    return None


def dense_weight(graph, node) -> np.ndarray:
    """The (K_in, K_out) weight: B for MatMul, alpha * B' for Gemm (a negative alpha flips W+)."""
    if node.op_type == "MatMul":
        return source_weight(graph.consts, node.input[1])
    alpha = float(attr(node, "alpha", 1.0))
    if alpha == 1.0:  # no copy: W+ is then taken once, in float32, and shared by Z and the adjoint
        return source_weight(graph.consts, node.input[1], transposed=bool(attr(node, "transB", 0)))
    b = graph.consts[node.input[1]]
    b = b.T if attr(node, "transB", 0) else b
    return (b.astype(np.float64) * alpha).astype(np.float32)


_DENSE = ("linear, W = alpha * B' for Gemm (transB honoured), B for MatMul (2-D constant; on an input of any rank: "
          "token-wise); a bias Add passes P through. On a 2-D input (Gemm: transA = 0), a BatchNorm or per-feature "
          "Mul/Div/Add/Sub (bias Add, decomposed BatchNorm) right after it is folded into one Gemm first")


@register("MatMul", check=dense_check, weighted=True, family="linear", roles={"mac", "classifier"},
          description=_DENSE + ". Of two activations: self-attention `Softmax(..) @ V` (P to V through the attention "
                      "weights, a gate) and its score product `Q K'` (a gate branch, no P)")
def matmul(ctx: Context, node, p: str, negate=False):
    """The dense rule; of two activations, the attention rule (``rules.attention``)."""
    if not ctx.graph.is_const(node.input[1]):
        from .attention import attention_matmul

        return attention_matmul(ctx, node, p, negate)
    return dense(ctx, node, p, negate)


@register("Gemm", inputs=(0,), check=dense_check, weighted=True, family="linear", roles={"mac", "classifier"},
          description=_DENSE)
def dense(ctx: Context, node, p: str, negate=False):
    """Linear rule through Gemm / MatMul with a constant weight."""
    a = node.input[0]
    bias = None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in ctx.graph.consts:
        bias = ctx.graph.consts[node.input[2]].astype(np.float64) * float(attr(node, "beta", 1.0))
    return {a: _dense(ctx, node, a, p, dense_weight(ctx.graph, node), negate, bias)}


# ---------------------------------------------------------------------------
# pools
# ---------------------------------------------------------------------------
def _channels(graph, name):
    s = graph.shape(name)
    return None if s is None or len(s) < 3 else s[1]


def avgpool_check(graph, node):
    if _channels(graph, node.input[0]) is None:
        return "the channel count of the input is unknown"
    if attr(node, "ceil_mode", 0):
        n = len(attr(node, "kernel_shape"))
        if graph.static_dims(node.input[0], range(2, 2 + n)) is None or graph.static_dims(node.output[0], range(2, 2 + n)) is None:
            return "ceil_mode=1 with dynamic spatial sizes (fix the input shape)"
    return None


@register("AveragePool", inputs=(0,), keeps_nonneg=True, check=avgpool_check, family="pool", layout="nchw",
          description="proportional to the inputs in each window (a+ for `positive`); count_include_pad either way, ceil_mode")
def average_pool(ctx: Context, node, p: str, negate=False):
    """Share P over each window in proportion to the inputs (count_include_pad cancels out)."""
    a = node.input[0]
    c = _channels(ctx.graph, a)
    spec = pool_spec(ctx.graph, node, c)
    ones = np.ones([c, 1] + spec.kernel)

    def count():
        """The pool's divisor: the window size, or (count_include_pad=0 with padding) the
        number of non-pad elements per window; with count_include_pad=1 the declared pads count
        but not the end of a ceil-mode window past them (ONNX Runtime's divisor there)."""
        if attr(node, "count_include_pad", 0):
            declared = explicit_pads(node, spec.kernel, spec.strides, spec.dilations, spec.in_spatial)
            if declared == list(spec.pads):
                return float(np.prod(spec.kernel))
            return ctx.g.const(_declared_window_counts(spec, declared), "pool_count")
        if not any(spec.pads):
            return float(np.prod(spec.kernel))
        g = ctx.g
        ones_like = g.op("ConstantOfShape", [g.shape(a)], value=onnx.numpy_helper.from_array(np.ones(1, np.float32)))
        return spec.conv(ctx, ones_like, ones)

    out = excite_linear(ctx, node, a, p, ones,
                        forward=lambda x, wp: spec.conv(ctx, x, wp),
                        transpose=lambda r, wp: spec.conv_transpose(ctx, r, wp, like=a), family="pool", count=count)
    return {a: out}


def _declared_window_counts(spec: ConvSpec, declared: list[int]) -> np.ndarray:
    """(1, 1, *out) float32: per window, its cells inside the input widened by the ``declared``
    pads (static sizes: a ceil-mode pool has them, :func:`avgpool_check`)."""
    n = len(spec.kernel)
    per_axis = []
    for i in range(n):
        lo, hi = -declared[i], spec.in_spatial[i] + declared[i + n]
        starts = np.arange(spec.out_spatial[i]) * spec.strides[i] - declared[i]
        cells = starts[:, None] + np.arange(spec.kernel[i])[None, :] * spec.dilations[i]
        per_axis.append(((cells >= lo) & (cells < hi)).sum(axis=1))
    counts = per_axis[0]
    for c in per_axis[1:]:
        counts = np.multiply.outer(counts, c)
    return counts.reshape((1, 1) + counts.shape).astype(np.float32)


def _global_pool(ctx: Context, node, a: str, p: str, axes: list[int]):
    g = ctx.g

    def count():
        """The number of positions averaged (H*W), static where the shape is known; 1 for a sum."""
        if node.op_type == "ReduceSum":
            return 1.0
        dims = ctx.graph.static_dims(a, axes)
        if dims is not None:
            return float(np.prod(dims))
        sizes = g.op("Cast", [g.op("Gather", [g.shape(a), g.i64(axes)], axis=0)], to=onnx.TensorProto.FLOAT)
        return g.op("ReduceProd", [sizes], keepdims=1, hint="count")   # float: CUDA has no int64 ReduceProd

    def transpose(r, wp):  # the adjoint of a window sum over all positions: broadcast
        return r if ctx.variant("pool").resolve(ctx.rule)[0][0] != "1" else g.op(
            "Expand", [r, g.shape(a)], hint="p_broadcast")

    out = excite_linear(
        ctx, node, a, p, np.ones(1),
        forward=lambda x, wp: g.op("ReduceSum", [x, g.i64(axes)], keepdims=1, hint="z_sum"),
        transpose=transpose, family="pool", count=count)
    return {a: out}


def global_pool_check(graph, node):
    if graph.rank(node.input[0]) is None:
        return "input rank unknown (shape inference cannot see through the ops above it)"
    return None


@register("GlobalAveragePool", inputs=(0,), keeps_nonneg=True, check=global_pool_check, family="pool", layout="nchw",
          roles={"global-pool"}, description="proportional to the inputs over all positions (a+ for `positive`)")
def global_average_pool(ctx: Context, node, p: str, negate=False):
    """Share P over all positions in proportion to the inputs."""
    a = node.input[0]
    rank = ctx.graph.rank(a)
    return _global_pool(ctx, node, a, p, list(range(2, rank)))


def reduce_axes(graph, node):
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = graph.consts.get(node.input[1])
        axes = None if axes is None else [int(v) for v in np.ravel(axes)]
    return axes


def reduce_mean_check(graph, node):
    rank = graph.rank(node.input[0])
    axes = reduce_axes(graph, node)
    if rank is None or axes is None:
        return "axes or input rank unknown"
    axes = sorted(a % rank for a in axes)
    if not axes or 0 in axes:
        return "a reduction over the batch axis is not supported"
    return None


_REDUCE_MEAN = "over any non-batch axes (NCHW `[2, 3]`, NHWC `[1, 2]`): proportional to the inputs (a+ for `positive`)"


@register("ReduceSum", inputs=(0,), keeps_nonneg=True, check=reduce_mean_check, family="pool", description=_REDUCE_MEAN)
@register("ReduceMean", inputs=(0,), keeps_nonneg=True, check=reduce_mean_check, family="pool", roles={"mean"},
          description=_REDUCE_MEAN)
def reduce_mean(ctx: Context, node, p: str, negate=False):
    """Mean or sum over positions (how newer exporters and tf2onnx write global pooling): the
    weights are equal and positive, so P is shared in proportion to the inputs whatever the axes."""
    a = node.input[0]
    rank = ctx.graph.rank(a)
    axes = sorted(x % rank for x in reduce_axes(ctx.graph, node))
    if not attr(node, "keepdims", 1):
        p = ctx.g.op("Unsqueeze", [p, ctx.g.i64(axes)])
    return _global_pool(ctx, node, a, p, axes)


# ---------------------------------------------------------------------------
# BatchNormalization left unfolded: a per-channel linear layer
# ---------------------------------------------------------------------------
def batchnorm_check(graph, node):
    if attr(node, "training_mode", 0):
        return "training_mode=1 (normalises with the batch's own statistics): export the model in eval mode"
    if any(p not in graph.consts for p in node.input[1:5]):
        return "BatchNormalization parameters are not constants"
    if graph.rank(node.input[0]) is None:
        return "input rank unknown"
    return None


@register("BatchNormalization", inputs=(0,), check=batchnorm_check, family="linear", layout="nchw",
          description="folded into the preceding Conv or dense layer (Gemm / MatMul) (in float64, before W+ is taken); "
                      "elsewhere a per-channel linear layer")
def batch_normalization(ctx: Context, node, p: str, negate=False):
    """Diagonal linear rule with weight s = gamma / sqrt(var + eps); the shift is a bias."""
    a = node.input[0]
    gamma, beta, mean, var = (ctx.graph.consts[i].astype(np.float64) for i in node.input[1:5])
    rank = ctx.graph.rank(a)
    scale, shift = batchnorm_affine(gamma, beta, mean, var, attr(node, "epsilon", 1e-5))
    scale = scale.reshape((-1,) + (1,) * (rank - 2))
    shift = shift.reshape((1, -1) + (1,) * (rank - 2))
    g = ctx.g

    def diag(x, wp):
        return g.op("Mul", [x, g.const(wp.astype(np.float32), "scale")])

    return {a: excite_linear(ctx, node, a, p, scale, forward=diag, transpose=diag, negate=negate, bias=shift)}


@register("ReduceLogSumExp", inputs=(0,), check=reduce_mean_check, family="pool",
          description="P shared by softmax over positions (the pool of a fully convolutional head)")
def reduce_log_sum_exp(ctx: Context, node, p: str, negate=False):
    """y = log sum exp(x): P is shared out in proportion to exp(x - y), which sums to 1."""
    a = node.input[0]
    g = ctx.g
    rank = ctx.graph.rank(a)
    axes = sorted(x % rank for x in reduce_axes(ctx.graph, node))
    y = ctx.act(node.output[0])
    if not attr(node, "keepdims", 1):
        p = g.op("Unsqueeze", [p, g.i64(axes)])
        y = g.memo(("unsq", y), lambda: g.op("Unsqueeze", [y, g.i64(axes)]))
    weights = g.memo((node.name, "softmax"), lambda: g.op("Exp", [g.sub(ctx.act(a), y)], hint="pos_softmax"))
    return {a: g.mul(p, weights)}
