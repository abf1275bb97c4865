"""Independent float64 numpy reference of the forward pass and of Excitation Backprop.

Written from the equations, not from the library: every linear layer is
excited from its explicit contributions z_ij (``paper``: a_j W+_ij,
``positive``: (a_j W_ij)+), P_in[j] = sum_i z_ij P_i / Z_i with Z_i = sum_j z_ij
and a zero share where Z_i == 0. Loops over kernel offsets keep it readable.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import onnx
from onnx import numpy_helper


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _contrib(a, w, rule):
    """z for activation ``a`` and weight ``w`` (broadcast)."""
    if rule == "paper":
        return a * np.maximum(w, 0)
    return np.maximum(a * w, 0)


def _safe_ratio(p, z):
    out = np.zeros_like(p)
    np.divide(p, z, out=out, where=z != 0)
    return out


# ---------------------------------------------------------------------------
# window geometry shared by conv and pools
# ---------------------------------------------------------------------------
def _out_size(size, k, s, d, pb, pe, ceil=False):
    eff = (k - 1) * d + 1
    if ceil:
        out = math.ceil((size + pb + pe - eff) / s) + 1
        if (out - 1) * s >= size + pb:  # last window must start inside the input or left pad
            out -= 1
        return out
    return (size + pb + pe - eff) // s + 1


def _geometry(node, x_shape, kernel):
    n = len(kernel)
    strides = list(_attr(node, "strides", [1] * n))
    dil = list(_attr(node, "dilations", [1] * n))
    pads = list(_attr(node, "pads", [0] * 2 * n))
    ceil = bool(_attr(node, "ceil_mode", 0))
    outs = [_out_size(x_shape[2 + i], kernel[i], strides[i], dil[i], pads[i], pads[i + n], ceil) for i in range(n)]
    return strides, dil, pads, outs


def _windows(in_hw, kernel, strides, dil, pads, outs):
    """For each output (oy, ox): list of input positions (y, x) of its window, pads excluded."""
    res = {}
    for oy in range(outs[0]):
        for ox in range(outs[1]):
            pos = []
            for ky in range(kernel[0]):
                y = oy * strides[0] + ky * dil[0] - pads[0]
                if not 0 <= y < in_hw[0]:
                    continue
                for kx in range(kernel[1]):
                    x = ox * strides[1] + kx * dil[1] - pads[1]
                    if 0 <= x < in_hw[1]:
                        pos.append((y, x, ky, kx))
            res[(oy, ox)] = pos
    return res


def _conv_patches(node, x, w):
    """Zero-padded input and, per kernel offset, the strided slice that feeds every output."""
    kernel = list(w.shape[2:])
    strides, dil, pads, outs = _geometry(node, x.shape, kernel)
    # pad generously at the end so every slice is in range, whatever the pads
    extra = [max(0, (outs[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - (x.shape[2 + i] + pads[i] + pads[i + 2])) for i in range(2)]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2] + extra[0]), (pads[1], pads[3] + extra[1])))
    offsets = []
    for ky in range(kernel[0]):
        for kx in range(kernel[1]):
            sl = (slice(ky * dil[0], ky * dil[0] + (outs[0] - 1) * strides[0] + 1, strides[0]),
                  slice(kx * dil[1], kx * dil[1] + (outs[1] - 1) * strides[1] + 1, strides[1]))
            offsets.append(((ky, kx), sl))
    return xp, offsets, outs


# ---------------------------------------------------------------------------
# copies and resizes (ONNX semantics, written from the operator specs)
# ---------------------------------------------------------------------------
def _text_attr(node, name, default):
    value = _attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def _pad_widths(node, x, ins):
    """np.pad widths and the mode of a Pad node (pads / axes from inputs, opset 11+)."""
    pads = [int(p) for p in ins[1]]
    axes = [int(a) % x.ndim for a in ins[3]] if len(ins) > 3 and ins[3] is not None else list(range(x.ndim))
    widths = [(0, 0)] * x.ndim
    for i, ax in enumerate(axes):
        widths[ax] = (pads[i], pads[i + len(axes)])
    return widths, _text_attr(node, "mode", "constant")


def _slices(ins):
    """The numpy index of a Slice node: (data, starts, ends, axes, steps)."""
    x = ins[0]
    starts, ends = [int(s) for s in ins[1]], [int(e) for e in ins[2]]
    axes = [int(a) % x.ndim for a in ins[3]] if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = [int(s) for s in ins[4]] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for ax, s, e, st in zip(axes, starts, ends, steps):
        index[ax] = slice(s, e, st)
    return tuple(index)


def _max_axes(node, ins):
    if node.op_type == "GlobalMaxPool":
        return tuple(range(2, ins[0].ndim))
    axes = _attr(node, "axes")
    if axes is None:
        axes = [int(a) for a in ins[1]]
    return tuple(sorted(int(a) % ins[0].ndim for a in axes))


def _source_coordinate(o, n_in, n_out, scale, mode):
    """ONNX Resize: the input coordinate of output index ``o`` along one axis."""
    if mode == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if n_out > 1 else 0.0
    if mode == "align_corners":
        return o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    if mode == "asymmetric":
        return o / scale
    raise NotImplementedError(mode)


def _nearest(xf, mode):
    if mode == "floor":
        return math.floor(xf)
    if mode == "ceil":
        return math.ceil(xf)
    if xf - math.floor(xf) == 0.5:   # a tie
        return math.floor(xf) if mode == "round_prefer_floor" else math.ceil(xf)
    return math.floor(xf + 0.5)


def _resize_matrices(node, ins, opset):
    """{axis: (n_out, n_in) interpolation matrix} for the resized axes of a Resize / Upsample."""
    x = ins[0]
    if node.op_type == "Upsample":
        scales = [float(s) for s in (ins[1] if len(ins) > 1 else _attr(node, "scales"))]
        sizes, coord, nearest = None, "asymmetric", "floor"
    else:
        at = 2 if opset >= 11 else 1
        scales = [float(s) for s in ins[at]] if len(ins) > at and ins[at] is not None and ins[at].size else None
        sizes = [int(s) for s in ins[3]] if len(ins) > 3 and ins[3] is not None and ins[3].size else None
        coord = _text_attr(node, "coordinate_transformation_mode", "half_pixel")
        nearest = _text_attr(node, "nearest_mode", "round_prefer_floor")
    mode = _text_attr(node, "mode", "nearest")
    mats = {}
    for ax in range(x.ndim):
        n_in = x.shape[ax]
        if sizes is not None:
            n_out, scale = sizes[ax], sizes[ax] / n_in
        else:
            n_out, scale = int(math.floor(n_in * scales[ax])), scales[ax]
        if n_out == n_in and scale == 1.0:
            continue
        m = np.zeros((n_out, n_in))
        for o in range(n_out):
            xf = _source_coordinate(o, n_in, n_out, scale, coord)
            if mode == "nearest":
                m[o, min(max(_nearest(xf, nearest), 0), n_in - 1)] = 1.0
            else:
                xf = min(max(xf, 0.0), n_in - 1)
                lo = int(math.floor(xf))
                hi = min(lo + 1, n_in - 1)
                m[o, lo] += 1.0 - (xf - lo)
                m[o, hi] += xf - lo
        mats[ax] = m
    return mats


# ---------------------------------------------------------------------------
# the reference
# ---------------------------------------------------------------------------
def _fresh(g, base):
    """``base``, or ``base`` with a number, not yet a name of ``g``'s initializers."""
    taken = {t.name for t in g.initializer}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _fold_conv_bn(model):
    """The spec folds Conv -> BatchNormalization (sole consumer) into one Conv before any
    rule runs (W' = W * s, s = gamma / sqrt(var + eps)); do the same on a copy."""
    import copy

    model = copy.deepcopy(model)
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in g.initializer}
    uses = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    producer = {o: n for n in g.node for o in n.output}
    remove = []
    for bn in g.node:
        if bn.op_type != "BatchNormalization":
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or uses[conv.output[0]] != 1:
            continue
        gamma, beta, mean, var = (consts[i] for i in bn.input[1:5])
        scale = gamma / np.sqrt(var + _attr(bn, "epsilon", 1e-5))
        w = consts[conv.input[1]] * scale[:, None, None, None]
        b = consts[conv.input[2]] if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0])
        names = (_fresh(g, f"ref_fold_w_{bn.name}"), _fresh(g, f"ref_fold_b_{bn.name}"))
        g.initializer.extend([numpy_helper.from_array(w, names[0]), numpy_helper.from_array((b - mean) * scale + beta, names[1])])
        del conv.input[1:]
        conv.input.extend(names)
        conv.output[0] = bn.output[0]
        remove.append(bn)
    for bn in remove:
        g.node.remove(bn)
    return model


def _affine_after(op, c_first, w, b, c, c_per_unit):
    """(W, b) of y_k = W_k x + b_k followed by ``op(y, c)`` (``c_first``: ``op(c, y)``), c one
    value per unit k (``c_per_unit``: c shaped to scale W's unit axis): y * c -> (c W, c b);
    y / c -> (W / c, b / c); y + c -> (W, b + c); y - c -> (W, b - c); c - y -> (-W, c - b)."""
    if op == "Mul":
        return w * c_per_unit, b * c
    if op == "Div":
        return w / c_per_unit, b / c
    if op == "Add":
        return w, b + c
    return (-w, c - b) if c_first else (w, b - c)


def _conv_layer(node, consts):
    """(W (M, C/g, k...), b (M,)) in float64 when ``node`` is a Conv with constant weight and
    bias (if any), else None."""
    if node is None or node.op_type != "Conv" or node.input[1] not in consts:
        return None
    if len(node.input) > 2 and node.input[2] and node.input[2] not in consts:
        return None
    w = consts[node.input[1]].astype(np.float64)
    b = consts[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0])
    return w, b


def _fold_affine(model):
    """The spec also folds a BatchNorm written decomposed after a Conv or a dense layer (see
    :func:`_dense_layer`): while the layer's output feeds exactly one node (and is no graph
    output) and that node is Mul / Div / Add / Sub of it and a float constant c that broadcasts
    to the output as one value per output unit k or a scalar ((1, C, 1, ..., 1) for a Conv,
    (1, M) for a dense layer), the node becomes part of the layer (y_k = W_k x + b_k; see
    :func:`_affine_after`; a Div by a c with zeros, or of c by y, is not folded). A dense layer
    becomes Gemm(x, W, b). One node at a time, on a copy, in float64."""
    import copy

    model = copy.deepcopy(model)
    g = model.graph
    ranks = _ranks(model)
    graph_outputs = {o.name for o in g.output}
    k = 0
    while True:
        consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        uses = {}
        for n in g.node:
            for i in n.input:
                uses[i] = uses.get(i, 0) + 1
        producer = {o: n for n in g.node for o in n.output}
        folded = False
        for node in g.node:
            if node.op_type not in ("Mul", "Div", "Add", "Sub") or len(node.input) != 2:
                continue
            for pos in (0, 1):
                y, c_name = node.input[pos], node.input[1 - pos]
                layer = producer.get(y)
                if uses.get(y) != 1 or y in graph_outputs or c_name not in consts or consts[c_name].dtype.kind != "f":
                    continue
                conv = layer is not None and layer.op_type == "Conv"
                found = _conv_layer(layer, consts) if conv else _dense_layer(layer, consts, ranks)
                if found is None:
                    continue
                w, b = found
                units = w.shape[0] if conv else w.shape[1]
                out_shape = (1, units) + (1,) * (w.ndim - 2) if conv else (1, units)
                if consts[c_name].ndim > len(out_shape):
                    continue
                try:
                    c = np.broadcast_to(consts[c_name], out_shape).reshape(units).astype(np.float64)
                except ValueError:   # per pixel / per sample: not one value per unit
                    continue
                if node.op_type == "Div" and (pos == 1 or (c == 0).any()):
                    continue
                # W (K, M) of a dense layer: c scales its columns as it is
                w, b = _affine_after(node.op_type, pos == 1, w, b, c, c.reshape((units,) + (1,) * (w.ndim - 1)) if conv else c)
                k += 1
                if conv:
                    names = (_fresh(g, f"ref_affine_w{k}"), _fresh(g, f"ref_affine_b{k}"))
                    g.initializer.extend([numpy_helper.from_array(w, names[0]), numpy_helper.from_array(b, names[1])])
                    del layer.input[1:]
                    layer.input.extend(names)
                else:
                    _as_gemm(g, layer, w, b, f"affine{k}")
                    ranks[node.output[0]] = 2
                layer.output[0] = node.output[0]
                g.node.remove(node)
                folded = True
                break
            if folded:
                break
        if not folded:
            return model


def _dense_layer(node, consts, ranks):
    """(W (K, M), b (M,)) in float64 when ``node`` is a dense layer the spec folds into, else None:
    Gemm with a constant B, transA = 0 and a constant C (if any) that is a scalar or one value per
    output feature (y = alpha A B' + beta C, so W = alpha B', b = beta C); MatMul with a constant
    2-D B and a 2-D A (W = B, b = 0)."""
    if node is None or node.op_type not in ("Gemm", "MatMul") or node.input[1] not in consts:
        return None
    bm = consts[node.input[1]]
    if bm.dtype.kind != "f" or bm.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return (bm.astype(np.float64), np.zeros(bm.shape[1])) if ranks.get(node.input[0]) == 2 else None
    if _attr(node, "transA", 0):
        return None
    w = _attr(node, "alpha", 1.0) * (bm.T if _attr(node, "transB", 0) else bm).astype(np.float64)
    b = np.zeros(w.shape[1])
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in consts:
            return None
        try:
            b = _attr(node, "beta", 1.0) * np.broadcast_to(consts[node.input[2]], (1, w.shape[1])).reshape(-1).astype(np.float64)
        except ValueError:
            return None
    return w, b


def _as_gemm(g, node, w, b, tag):
    """Rewrite ``node`` in place as Gemm(x, W, b) with W (K, M), transB = 0, alpha = beta = 1."""
    names = (_fresh(g, f"ref_dense_w_{tag}"), _fresh(g, f"ref_dense_b_{tag}"))
    g.initializer.extend([numpy_helper.from_array(w, names[0]), numpy_helper.from_array(b, names[1])])
    x = node.input[0]
    del node.input[:]
    node.input.extend([x, *names])
    del node.attribute[:]
    node.op_type = "Gemm"


def _ranks(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    return {vi.name: len(vi.type.tensor_type.shape.dim)
            for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
            if vi.type.tensor_type.HasField("shape")}


def _fold_dense_bn(model):
    """The spec folds a BatchNormalization on the (N, M) output of a dense layer (see
    :func:`_dense_layer`; its output feeds only the BatchNormalization and is no graph output)
    into that layer: y = s (W x + b - mean) + beta, s = gamma / sqrt(var + eps), written as
    Gemm(x, W * s, (b - mean) * s + beta). On a copy."""
    import copy

    model = copy.deepcopy(model)
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    ranks = _ranks(model)
    graph_outputs = {o.name for o in g.output}
    uses = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    producer = {o: n for n in g.node for o in n.output}
    for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
        dense = producer.get(bn.input[0])
        y = bn.input[0]
        if uses.get(y) != 1 or y in graph_outputs or any(p not in consts for p in bn.input[1:5]):
            continue
        found = _dense_layer(dense, consts, ranks)
        if found is None:
            continue
        w, b = found
        gamma, beta, mean, var = (consts[i].astype(np.float64) for i in bn.input[1:5])
        s = gamma / np.sqrt(var + _attr(bn, "epsilon", 1e-5))
        _as_gemm(g, dense, w * s[None, :], (b - mean) * s + beta, bn.name or bn.output[0])
        dense.output[0] = bn.output[0]
        g.node.remove(bn)
    return model


def fold_like_the_spec(model):
    """Every fold the spec makes before any rule runs: BatchNorm (node or decomposed) into the
    Conv or the dense layer before it, repeated until nothing changes (a BatchNormalization
    behind a bias Add folds once the Add has)."""
    while True:
        before = len(model.graph.node)
        model = _fold_affine(_fold_dense_bn(_fold_conv_bn(model)))
        if len(model.graph.node) == before:
            return model


class Reference:
    def __init__(self, model: onnx.ModelProto):
        model = fold_like_the_spec(model)
        self.model = model
        self.consts = {t.name: numpy_helper.to_array(t).astype(np.float64) if numpy_helper.to_array(t).dtype.kind == "f"
                       else numpy_helper.to_array(t) for t in model.graph.initializer}
        self.nodes = list(model.graph.node)
        self.opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
        self.producer = {o: n for n in self.nodes for o in n.output}

    # -- forward ------------------------------------------------------------
    def forward(self, x):
        v = dict(self.consts)
        v[self.model.graph.input[0].name] = np.asarray(x, np.float64)
        self.windows = {}
        self.near_ties = False
        for node in self.nodes:
            ins = [v[i] if i else None for i in node.input]
            out = self._fwd(node, ins)
            if node.op_type == "Split":
                v.update(zip(node.output, out))
            else:
                v[node.output[0]] = out
        self.values = v
        return v

    def _fwd(self, node, ins):
        op = node.op_type
        if op == "Conv":
            x, w = ins[0], ins[1]
            b = ins[2] if len(ins) > 2 and ins[2] is not None else None
            g = _attr(node, "group", 1)
            m, cg = w.shape[:2]
            xp, offsets, outs = _conv_patches(node, x, w)
            y = np.zeros((x.shape[0], m) + tuple(outs))
            for (ky, kx), sl in offsets:
                patch = xp[(slice(None), slice(None)) + sl]
                for gi in range(g):
                    ms = slice(gi * m // g, (gi + 1) * m // g)
                    cs = slice(gi * cg, (gi + 1) * cg)
                    y[:, ms] += np.einsum("nchw,mc->nmhw", patch[:, cs], w[ms, :, ky, kx])
            if b is not None:
                y += b[None, :, None, None]
            return y
        if op == "Gemm":
            a, bm = ins[0], ins[1]
            if _attr(node, "transA", 0):
                a = a.T
            bm = bm.T if _attr(node, "transB", 0) else bm
            y = _attr(node, "alpha", 1.0) * a @ bm
            if len(ins) > 2 and ins[2] is not None:
                y = y + _attr(node, "beta", 1.0) * ins[2]
            return y
        if op == "MatMul":
            return ins[0] @ ins[1]
        if op in ("Add", "Sum"):
            return sum(ins)
        if op == "Relu":
            return np.maximum(ins[0], 0)
        if op == "Sigmoid":
            return 1 / (1 + np.exp(-ins[0]))
        if op == "Unsqueeze":
            return np.expand_dims(ins[0], tuple(int(a) for a in ins[1]))
        if op == "Transpose":
            return ins[0].transpose(_attr(node, "perm"))
        if op == "LeakyRelu":
            return np.where(ins[0] > 0, ins[0], _attr(node, "alpha", 0.01) * ins[0])
        if op == "HardSwish":
            return ins[0] * np.clip(ins[0] / 6 + 0.5, 0, 1)
        if op == "Tanh":
            return np.tanh(ins[0])
        if op == "Softplus":
            return np.logaddexp(0, ins[0])
        if op == "HardSigmoid":
            return np.clip(_attr(node, "alpha", 0.2) * ins[0] + _attr(node, "beta", 0.5), 0, 1)
        if op == "Elu":
            return np.where(ins[0] > 0, ins[0], _attr(node, "alpha", 1.0) * np.expm1(np.minimum(ins[0], 0)))
        if op == "Celu":
            al = _attr(node, "alpha", 1.0)
            return np.maximum(ins[0], 0) + np.minimum(0, al * np.expm1(np.minimum(ins[0], 0) / al))
        if op == "Selu":
            al, gamma = _attr(node, "alpha", 1.67326319217681884765625), _attr(node, "gamma", 1.05070102214813232421875)
            return gamma * np.where(ins[0] > 0, ins[0], al * np.expm1(np.minimum(ins[0], 0)))
        if op == "Gelu":
            return 0.5 * ins[0] * (1 + np.vectorize(math.erf)(ins[0] / math.sqrt(2)))
        if op == "Softsign":
            return ins[0] / (1 + np.abs(ins[0]))
        if op == "Mish":
            return ins[0] * np.tanh(np.logaddexp(0, ins[0]))
        if op == "ThresholdedRelu":
            return np.where(ins[0] > _attr(node, "alpha", 1.0), ins[0], 0.0)
        if op == "PRelu":
            return np.where(ins[0] >= 0, ins[0], ins[1] * ins[0])
        if op == "Cast":   # float to float: the reference stays in float64
            return ins[0].astype(np.float64)
        if op == "Squeeze":
            return np.squeeze(ins[0], axis=tuple(int(a) for a in ins[1]) if len(ins) > 1 and ins[1] is not None else None)
        if op == "ReduceMean":
            axes = tuple(_attr(node, "axes") or [int(a) for a in ins[1]])
            return ins[0].mean(axis=axes, keepdims=bool(_attr(node, "keepdims", 1)))
        if op == "Pad":
            widths, mode = _pad_widths(node, ins[0], ins)
            if mode == "constant":
                value = float(ins[2]) if len(ins) > 2 and ins[2] is not None and ins[2].size else 0.0
                return np.pad(ins[0], widths, constant_values=value)
            return np.pad(ins[0], widths, mode=mode)
        if op == "LRN":
            x = ins[0]
            size = _attr(node, "size")
            alpha, beta, bias = _attr(node, "alpha", 1e-4), _attr(node, "beta", 0.75), _attr(node, "bias", 1.0)
            sq = np.pad(x ** 2, ((0, 0), ((size - 1) // 2, size - 1 - (size - 1) // 2), (0, 0), (0, 0)))
            acc = sum(sq[:, i:i + x.shape[1]] for i in range(size))
            return x / (bias + alpha / size * acc) ** beta
        if op == "Mul":
            return ins[0] * ins[1]
        if op == "Concat":
            return np.concatenate(ins, axis=_attr(node, "axis"))
        if op == "BatchNormalization":
            x, gamma, beta, mean, var = ins
            shape = (-1,) + (1,) * (x.ndim - 2)
            eps = _attr(node, "epsilon", 1e-5)
            return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * gamma.reshape(shape) + beta.reshape(shape)
        if op == "Clip":
            lo = ins[1] if len(ins) > 1 and ins[1] is not None else -np.inf
            hi = ins[2] if len(ins) > 2 and ins[2] is not None else np.inf
            return np.clip(ins[0], lo, hi)
        if op in ("Identity", "Dropout"):
            return ins[0]
        if op == "Softmax":
            z = ins[0] - ins[0].max(axis=-1, keepdims=True)
            return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
        if op == "Flatten":
            axis = _attr(node, "axis", 1)
            return ins[0].reshape(int(np.prod(ins[0].shape[:axis])), -1)
        if op == "Reshape":
            shape = [ins[0].shape[i] if s == 0 else s for i, s in enumerate(ins[1].astype(int))]
            return ins[0].reshape(shape)
        if op == "GlobalAveragePool":
            return ins[0].mean(axis=(2, 3), keepdims=True)
        if op == "ReduceLogSumExp":
            axes = tuple(_attr(node, "axes") or [int(a) for a in ins[1]])
            keep = bool(_attr(node, "keepdims", 1))
            top = ins[0].max(axis=axes, keepdims=True)
            out = np.log(np.exp(ins[0] - top).sum(axis=axes, keepdims=True)) + top
            return out if keep else out.squeeze(axes)
        if op in ("MaxPool", "AveragePool"):
            x = ins[0]
            kernel = list(_attr(node, "kernel_shape"))
            strides, dil, pads, outs = _geometry(node, x.shape, kernel)
            win = _windows(x.shape[2:], kernel, strides, dil, pads, outs)
            self.windows[node.name or node.output[0]] = win
            y = np.zeros(x.shape[:2] + tuple(outs))
            cip = _attr(node, "count_include_pad", 0)
            for (oy, ox), pos in win.items():
                vals = np.stack([x[:, :, yy, xx] for (yy, xx, _, _) in pos], axis=-1)
                if op == "MaxPool":
                    y[:, :, oy, ox] = vals.max(axis=-1)
                    if vals.shape[-1] > 1:
                        top2 = np.sort(vals, axis=-1)[..., -2:]
                        close = np.abs(top2[..., 1] - top2[..., 0]) <= 1e-5 * np.abs(top2[..., 1])
                        # a tie between non-zero values that float32 rounding may break either way
                        self.near_ties |= bool(np.any(close & (top2[..., 1] != 0)))
                else:
                    if cip:
                        # window clipped to the padded input (ceil-mode overhang is not counted)
                        count = 1
                        for i, (o, k) in enumerate(zip((oy, ox), kernel)):
                            start = o * strides[i] - pads[i]
                            end = min(start + (k - 1) * dil[i] + 1, x.shape[2 + i] + pads[i + 2])
                            count *= len(range(start, end, dil[i]))
                    else:
                        count = len(pos)
                    y[:, :, oy, ox] = vals.sum(axis=-1) / count
            return y
        # -- ops of third-party exports (issue 11) --
        if op == "Sub":
            return ins[0] - ins[1]
        if op == "Div":
            return ins[0] / ins[1]
        if op == "Cast":
            return ins[0].astype(np.float64)
        if op == "Sqrt":
            return np.sqrt(ins[0])
        if op == "Constant":
            value = numpy_helper.to_array(_attr(node, "value"))
            return value.astype(np.float64) if value.dtype.kind == "f" else value
        if op == "ConstantOfShape":
            value = _attr(node, "value")
            fill = numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
            return np.full([int(d) for d in ins[0]], fill, dtype=np.asarray(fill).dtype)
        if op == "Equal":
            return ins[0] == ins[1]
        if op == "Where":
            return np.where(ins[0], ins[1], ins[2])
        if op == "Mod":
            return np.mod(ins[0], ins[1])
        if op == "Gather":
            return np.take(ins[0], ins[1], axis=_attr(node, "axis", 0))
        if op == "Erf":
            return np.vectorize(math.erf)(ins[0])
        if op == "Pow":
            return ins[0] ** ins[1]
        if op == "LayerNormalization":
            axes = tuple(range(_attr(node, "axis", -1) % ins[0].ndim, ins[0].ndim))
            centred = ins[0] - ins[0].mean(axis=axes, keepdims=True)
            sigma = np.sqrt((centred ** 2).mean(axis=axes, keepdims=True) + _attr(node, "epsilon", 1e-5))
            return centred / sigma * ins[1] + (ins[2] if len(ins) > 2 and ins[2] is not None else 0.0)
        if op == "Shape":
            return np.array(ins[0].shape, np.int64)
        if op == "ReduceSum":
            axes = tuple(_attr(node, "axes") or [int(a) for a in ins[1]])
            return ins[0].sum(axis=axes, keepdims=bool(_attr(node, "keepdims", 1)))
        if op in ("GlobalMaxPool", "ReduceMax"):
            axes = _max_axes(node, ins)
            return ins[0].max(axis=axes, keepdims=op == "GlobalMaxPool" or bool(_attr(node, "keepdims", 1)))
        if op == "Slice":
            return ins[0][_slices(ins)]
        if op == "Split":
            axis = _attr(node, "axis", 0)
            sizes = [int(v) for v in ins[1]] if len(ins) > 1 and ins[1] is not None else None
            if sizes is None:
                k = len(node.output)
                chunk = -(-ins[0].shape[axis] // k)
                sizes = [min(chunk, ins[0].shape[axis] - i * chunk) for i in range(k)]
            return np.split(ins[0], np.cumsum(sizes)[:-1], axis=axis)
        if op == "Expand":
            return ins[0] * np.ones([int(d) for d in ins[1]])
        if op == "Tile":
            return np.tile(ins[0], [int(r) for r in ins[1]])
        if op == "Mean":
            return sum(ins) / len(ins)
        if op == "Max":
            return functools.reduce(np.maximum, ins)
        if op == "Einsum":
            return np.einsum(_attr(node, "equation").decode(), *ins)
        if op in ("Resize", "Upsample"):
            y = ins[0]
            for axis, m in _resize_matrices(node, ins, self.opset).items():
                y = np.moveaxis(np.tensordot(m, np.moveaxis(y, axis, 0), axes=1), 0, axis)
            return y
        raise NotImplementedError(op)

    # -- excitation ---------------------------------------------------------
    def _data_inputs(self, node):
        if node.op_type in ("Conv", "Gemm", "MatMul", "Reshape", "Dropout", "Clip", "BatchNormalization", "Unsqueeze",
                            "ReduceLogSumExp", "Pad", "ReduceMean", "ReduceSum", "ReduceMax", "Slice", "Expand", "Tile",
                            "Resize", "Upsample", "Split", "Div"):
            return [node.input[0]]
        return [i for i in node.input if i and i not in self.consts]

    def _ancestor(self, source, tensor):
        """Whether ``tensor`` is computed from ``source``."""
        stack, seen = [tensor], set()
        while stack:
            t = stack.pop()
            if t == source:
                return True
            if t in seen:
                continue
            seen.add(t)
            node = self.producer.get(t)
            if node is not None:
                stack.extend(i for i in node.input if i)
        return False

    def classifier(self, entry):
        """The linear layers below the logits on each branch (summed heads: several)."""
        found, todo = [], [entry]
        while todo:
            node = self.producer[todo.pop()]
            if node.op_type in ("Conv", "Gemm", "MatMul", "Einsum"):
                found.append(node)
                continue
            ins = self._data_inputs(node)
            todo.extend(ins if node.op_type in ("Add", "Sum") else ins[:1])
        return found

    def excite(self, node, p, rule, negate=False):
        """{input name: P} for the node's data inputs."""
        v = self.values
        op = node.op_type
        a = v[node.input[0]]
        sign = -1.0 if negate else 1.0
        if op == "Split":   # p: the P of every piece; concatenated back
            return {node.input[0]: np.concatenate(p, axis=_attr(node, "axis", 0))}
        if op == "Conv":
            w = sign * v[node.input[1]]
            g = _attr(node, "group", 1)
            m, cg = w.shape[:2]
            ap, offsets, outs = _conv_patches(node, a, w)
            mg = m // g

            def contributions():
                # z_ij per kernel offset, all groups at once: (N, g, Mg, Cg, Ho, Wo);
                # padding has a = 0, so its z is 0
                for (ky, kx), sl in offsets:
                    patch = ap[(slice(None), slice(None)) + sl]
                    patch = patch.reshape(patch.shape[0], g, 1, cg, *patch.shape[2:])
                    wk = w[:, :, ky, kx].reshape(1, g, mg, cg, 1, 1)
                    yield sl, _contrib(patch, wk, rule)

            n_ = p.shape[0]
            z_sum = np.zeros(p.shape)
            for sl, z in contributions():
                z_sum += z.sum(axis=3).reshape(z_sum.shape)
            r = _safe_ratio(p, z_sum).reshape(n_, g, mg, 1, *p.shape[2:])
            p_in = np.zeros(ap.shape)
            for sl, z in contributions():
                p_in[(slice(None), slice(None)) + sl] += (z * r).sum(axis=2).reshape(n_, g * cg, *p.shape[2:])
            pads = list(_attr(node, "pads", [0, 0, 0, 0]))
            return {node.input[0]: p_in[:, :, pads[0]:pads[0] + a.shape[2], pads[1]:pads[1] + a.shape[3]]}
        if op == "MatMul" and node.input[1] not in self.consts:
            # attention A @ V: A (a Softmax's output) is a per-sample non-negative weight,
            # z_itd = contrib(V_td, A_it), P_V[t, d] = sum_i z_itd P_id / Z_id
            att, val = v[node.input[0]], v[node.input[1]]
            z = _contrib(val[..., None, :, :], att[..., :, :, None], rule)   # (..., i, t, d)
            r = _safe_ratio(p, z.sum(axis=-2))
            return {node.input[1]: (z * r[..., :, None, :]).sum(axis=-3)}
        if op == "Gather":   # one constant index: P back at that position
            axis = _attr(node, "axis", 0) % a.ndim
            out = np.zeros(a.shape)
            index = [slice(None)] * a.ndim
            index[axis] = int(v[node.input[1]])
            out[tuple(index)] = p
            return {node.input[0]: out}
        if op in ("Gemm", "MatMul"):
            bm = v[node.input[1]]
            if op == "Gemm":
                bm = (bm.T if _attr(node, "transB", 0) else bm) * _attr(node, "alpha", 1.0)
            w = sign * bm  # (K, M)
            z = _contrib(a[..., :, None], w, rule)  # (..., K, M): a token-wise layer on any rank
            r = _safe_ratio(p, z.sum(axis=-2))
            return {node.input[0]: (z * r[..., None, :]).sum(axis=-1)}
        if op == "LayerNormalization":
            # sigma per token a constant (Ali et al. 2022): y = M x + beta with the explicit
            # C x C matrix M_ij = (gamma_i / sigma)(delta_ij - 1/C), z_ij = contrib(x_j, M_ij)
            axis = _attr(node, "axis", -1) % a.ndim
            lead, c = a.shape[:axis], int(np.prod(a.shape[axis:]))
            x = a.reshape(lead + (c,))
            sigma = np.sqrt(x.var(axis=-1, keepdims=True) + _attr(node, "epsilon", 1e-5))[..., None]   # (..., 1, 1)
            m = sign * v[node.input[1]].reshape(-1)[:, None] * (np.eye(c) - 1.0 / c) / sigma           # (..., C, C)
            z = _contrib(x[..., None, :], m, rule)                                                     # (..., i, j)
            r = _safe_ratio(p.reshape(lead + (c,)), z.sum(axis=-1))
            return {node.input[0]: (z * r[..., :, None]).sum(axis=-2).reshape(a.shape)}
        if op in ("Relu", "Clip", "Sigmoid", "Identity", "Dropout", "Softmax", "LRN", "LeakyRelu", "HardSwish", "Tanh",
                  "Softplus", "HardSigmoid", "Elu", "Celu", "Selu", "Gelu", "Softsign", "Mish", "ThresholdedRelu",
                  "PRelu", "Cast"):
            return {node.input[0]: p}   # element-wise activations pass P through
        if op in ("Erf", "Pow"):
            return {}   # only in a gate branch (GELU's bracket), which the Mul gate hands no P
        if op == "ReduceMean":   # a spatial mean: proportional to the (positive) inputs, like GAP
            axes = tuple(_attr(node, "axes") or [int(x) for x in v[node.input[1]]])
            act = np.maximum(a, 0) if rule == "positive" else a
            pk = p if _attr(node, "keepdims", 1) else np.expand_dims(p, axes)
            return {node.input[0]: act * _safe_ratio(pk, act.sum(axis=axes, keepdims=True))}
        if op == "Transpose":
            return {node.input[0]: p.transpose(np.argsort(_attr(node, "perm")))}
        if op in ("Pad", "Slice", "Tile"):
            # every output cell is a copy of one input cell (or of the pad constant): P goes back to
            # the cell it was copied from, copies summed; read the sources off an index array
            index = np.arange(a.size).reshape(a.shape)
            if op == "Pad":
                widths, mode = _pad_widths(node, a, [v.get(i) if i else None for i in node.input])
                src = np.pad(index, widths, constant_values=-1) if mode == "constant" else np.pad(index, widths, mode=mode)
            elif op == "Slice":
                src = index[_slices([a] + [v[i] if i else None for i in node.input[1:]])]
            else:
                src = np.tile(index, [int(r) for r in v[node.input[1]]])
            keep = src >= 0
            return {node.input[0]: np.bincount(src[keep], weights=p[keep], minlength=a.size).reshape(a.shape)}
        if op == "BatchNormalization":
            gamma, var = v[node.input[1]], v[node.input[4]]
            s = sign * gamma / np.sqrt(var + _attr(node, "epsilon", 1e-5))
            z = _contrib(a, s.reshape((-1,) + (1,) * (a.ndim - 2)), rule)   # one contribution per output
            return {node.input[0]: z * _safe_ratio(p, z)}
        if op == "Mul":
            # a gate (a constant, or a tensor computed from the other input) scales the features
            x, gate = node.input
            if gate not in self.consts and (x in self.consts or self._ancestor(gate, x)):
                x, gate = gate, x
            return {x: p}
        if op == "Concat":
            axis = _attr(node, "axis")
            sizes = np.cumsum([v[i].shape[axis] for i in node.input])[:-1]
            out = {}
            for i, piece in zip(node.input, np.split(p, sizes, axis=axis)):
                out[i] = out.get(i, 0) + piece
            return out
        if op in ("Flatten", "Reshape", "Unsqueeze", "Squeeze"):
            return {node.input[0]: p.reshape(a.shape)}
        if op in ("Add", "Sum"):
            data = [i for i in node.input if i not in self.consts]
            if len(data) == 1:
                return {data[0]: p}
            parts = [np.maximum(v[i], 0) if rule == "positive" else v[i] for i in data]
            r = _safe_ratio(p, sum(parts))
            out = {}
            for i, part in zip(data, parts):
                out[i] = out.get(i, 0) + part * r
            return out
        if op == "MaxPool":
            win = self.windows[node.name or node.output[0]]
            p_in = np.zeros(a.shape)
            n_, c_ = a.shape[:2]
            for (oy, ox), pos in win.items():
                vals = np.stack([a[:, :, yy, xx] for (yy, xx, _, _) in pos], axis=-1)
                first = vals.argmax(axis=-1)  # first maximum in row-major scan order
                for k, (yy, xx, _, _) in enumerate(pos):
                    p_in[:, :, yy, xx] += np.where(first == k, p[:, :, oy, ox], 0.0)
            return {node.input[0]: p_in}
        if op == "ReduceLogSumExp":
            # the softmax over the pooled positions shares P out (the fully convolutional head)
            axes = tuple(_attr(node, "axes") or [int(x) for x in v[node.input[1]]])
            e = np.exp(a - a.max(axis=axes, keepdims=True))
            return {node.input[0]: np.expand_dims(p, axes) * e / e.sum(axis=axes, keepdims=True)}
        if op in ("AveragePool", "GlobalAveragePool"):
            act = np.maximum(a, 0) if rule == "positive" else a
            if op == "GlobalAveragePool":
                r = _safe_ratio(p, act.sum(axis=(2, 3), keepdims=True))
                return {node.input[0]: act * r}
            win = self.windows[node.name or node.output[0]]
            p_in = np.zeros(a.shape)
            for (oy, ox), pos in win.items():
                s = sum(act[:, :, yy, xx] for (yy, xx, _, _) in pos)
                r = _safe_ratio(p[:, :, oy, ox], s)
                for (yy, xx, _, _) in pos:
                    p_in[:, :, yy, xx] += act[:, :, yy, xx] * r
            return {node.input[0]: p_in}
        # -- ops of third-party exports (issue 11) --
        if op == "Sub" and not any(i in self.consts for i in node.input[:2]):
            # x - y of two tensors: contributions x and -y, z = (a w)+ (positive) or a w+ (paper)
            x, y = node.input[0], node.input[1]
            cx = _contrib(v[x], 1.0, rule)
            cy = _contrib(v[y], -1.0, rule)
            r = _safe_ratio(p, cx + cy)
            return {x: cx * r, y: cy * r}
        if op in ("Sub", "Div"):
            # x - c, c - x, x / c: one input cell per output cell, an affine map: P passes
            x = node.input[0] if op == "Div" or node.input[1] in self.consts else node.input[1]
            return {x: p}
        if op == "Cast":
            return {node.input[0]: p}
        if op == "ReduceSum":
            axes = tuple(_attr(node, "axes") or [int(x) for x in v[node.input[1]]])
            act = np.maximum(a, 0) if rule == "positive" else a
            pk = p if _attr(node, "keepdims", 1) else np.expand_dims(p, axes)
            return {node.input[0]: act * _safe_ratio(pk, act.sum(axis=axes, keepdims=True))}
        if op in ("GlobalMaxPool", "ReduceMax"):
            axes = _max_axes(node, [a] + [v.get(i) for i in node.input[1:]])
            kept = [i for i in range(a.ndim) if i not in axes]
            moved = np.transpose(a, kept + list(axes))
            flat = moved.reshape(moved.shape[:len(kept)] + (-1,))
            first = flat.argmax(axis=-1)   # the first maximum in row-major order
            onehot = (np.arange(flat.shape[-1]) == first[..., None]).astype(np.float64)
            routed = (onehot * p.reshape(first.shape)[..., None]).reshape(moved.shape)
            return {node.input[0]: np.transpose(routed, np.argsort(kept + list(axes)))}
        if op == "Expand":
            out = p
            while out.ndim > a.ndim:
                out = out.sum(axis=0)
            for i, d in enumerate(a.shape):
                if d == 1 and out.shape[i] != 1:
                    out = out.sum(axis=i, keepdims=True)
            return {node.input[0]: out}
        if op == "Mean":
            data = [i for i in node.input if i not in self.consts]
            parts = [np.maximum(v[i], 0) if rule == "positive" else v[i] for i in data]
            r = _safe_ratio(p, sum(parts))
            return {i: part * r for i, part in zip(data, parts)}
        if op == "Max":
            data = [i for i in node.input if i not in self.consts]
            if len(data) == 1:
                return {data[0]: p}
            first = np.stack([v[i] for i in data]).argmax(axis=0)
            out = {}
            for k, i in enumerate(data):
                out[i] = out.get(i, 0) + np.where(first == k, p, 0.0)
            return out
        if op == "Einsum":
            # brute force: the Jacobian M[o, j] of the linear map (one weight entry each), then
            # z_oj = contrib(a_j, M_oj), P_in[j] = sum_o z_oj P_o / Z_o
            eq = _attr(node, "equation").decode().replace(" ", "")
            lhs, out_term = eq.split("->")
            terms = lhs.split(",")
            d = 0 if node.input[1] in self.consts else 1
            a, w = v[node.input[d]], sign * v[node.input[1 - d]]
            basis = np.eye(a.size).reshape((a.size,) + a.shape)
            terms[d] = "Z" + terms[d]
            ops = [basis, w] if d == 0 else [w, basis]
            jac = np.einsum(",".join(terms) + "->Z" + out_term, *ops).reshape(a.size, -1).T   # (outputs, inputs)
            z = _contrib(a.reshape(1, -1), jac, rule)
            r = _safe_ratio(p.reshape(-1), z.sum(axis=1))
            return {node.input[d]: (z * r[:, None]).sum(axis=0).reshape(a.shape)}
        if op in ("Resize", "Upsample"):
            mats = _resize_matrices(node, [v.get(i) if i else None for i in node.input], self.opset)
            axes = sorted(mats)
            full = mats[axes[0]]
            for ax in axes[1:]:
                full = np.kron(full, mats[ax])   # (out positions, in positions), row-major over the axes
            kept = [i for i in range(a.ndim) if i not in axes]
            am = np.transpose(a, kept + axes).reshape([a.shape[i] for i in kept] + [-1])
            pm = np.transpose(p, kept + axes).reshape([p.shape[i] for i in kept] + [-1])
            if _text_attr(node, "mode", "nearest") == "nearest":
                p_in = pm @ full   # every output copies one source: its P goes there
            else:
                z = _contrib(am[..., None, :], full, rule)                   # (..., out, in)
                r = _safe_ratio(pm, z.sum(axis=-1))
                p_in = (z * r[..., None]).sum(axis=-2)
            p_in = p_in.reshape([a.shape[i] for i in kept] + [a.shape[i] for i in axes])
            return {node.input[0]: np.transpose(p_in, np.argsort(kept + axes))}
        raise NotImplementedError(op)

    def entry(self):
        out = self.model.graph.output[0].name
        node = self.producer.get(out)
        while node is not None and node.op_type == "Softmax":
            out = node.input[0]
            node = self.producer.get(out)
        return out

    def run(self, x, signal, layers, rule="positive", contrastive=False, channel_axes=None, entry=None):
        """Forward, then P at every tensor down to the inputs; maps at ``layers``: P summed
        over the channel axis (``channel_axes[layer]``, default 1). The signal enters at
        ``entry`` (default: the first output, below a Softmax)."""
        self.forward(x)
        entry = entry or self.entry()
        clf = self.classifier(entry) if contrastive else None
        pending = {entry: [np.asarray(signal, np.float64)]}
        P = {}
        for node in reversed(self.nodes):
            if node.op_type == "Split":   # P of the pieces, concatenated back
                if not any(o in pending for o in node.output):
                    continue
                pieces = [sum(pending.pop(o)) if o in pending else np.zeros(self.values[o].shape) for o in node.output]
                P.update(zip(node.output, pieces))
                for k, q in self.excite(node, pieces, rule).items():
                    pending.setdefault(k, []).append(q)
                continue
            out = node.output[0]
            if out not in pending:
                continue
            p = sum(pending.pop(out))
            P[out] = p
            sent = self.excite(node, p, rule)
            if clf is not None and any(node is c for c in clf):
                dual = self.excite(node, p, rule, negate=True)
                sent = {k: sent[k] - dual[k] for k in sent}
            for k, q in sent.items():
                pending.setdefault(k, []).append(q)
        for k, qs in pending.items():
            P[k] = sum(qs)
        res = {"logits": self.values[entry], "P": {}, "map": {}, "map_unclipped": {}}
        for layer in layers:
            p = P[layer]
            m = p.sum(axis=(channel_axes or {}).get(layer, 1)) if p.ndim >= 3 else p
            res["P"][layer] = p
            res["map_unclipped"][layer] = m
            res["map"][layer] = np.maximum(m, 0) if contrastive else m
        return res


def excitation_reference(model, x, signal, layers, rule="positive", contrastive=False, channel_axes=None):
    return Reference(model).run(x, signal, layers, rule=rule, contrastive=contrastive, channel_axes=channel_axes)
