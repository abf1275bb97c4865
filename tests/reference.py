"""Independent float64 numpy reference: ONNX forward interpreter + Excitation Backprop.

Written from the equations only (no import of ``onnx_excite``), for the tests to check the
library against.

forward_reference(model, x) -> {tensor name: float64 array}
    every graph input and node output (initializers excluded).
excitation_reference(model, x, signal, layers, rule="positive", contrastive=False) -> dict
    {"logits": (N, K), "P": {layer: P}, "map": {layer: map}, "map_unclipped": {layer: map}}

Rules (a = a layer's input activation, W its weight, bias ignored, R_i = P_i / Z_i with
R_i = 0 exactly where Z_i == 0):
  paper:    Z_i = sum_j a_j W+_ij,                P_in[j] = a_j sum_i W+_ij R_i
  positive: z_ij = max(a_j W_ij, 0), Z_i = sum_j z_ij,  P_in[j] = sum_i z_ij R_i
The positive rule is evaluated exactly through z_ij = a+_j W+_ij + a-_j W-_ij (a- = min(a,0),
W- = min(W,0)), which avoids materialising z for big layers; ``explicit_linear_rule`` is the
brute-force version on a dense matrix (used by the self-check tests).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

RULES = ("positive", "paper")
PASS_THROUGH = ("Relu", "Dropout", "Identity", "Softmax")
LINEAR = ("Conv", "Gemm", "MatMul")


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------

def _attrs(node):
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        out[a.name] = v
    return out


def _safe_div(p, z):
    """p / z, exactly 0 where z == 0."""
    nz = z != 0
    return np.where(nz, p / np.where(nz, z, 1.0), 0.0)


def _unbroadcast(p, shape):
    """Sums a broadcast P back to ``shape``."""
    shape = tuple(shape)
    if p.shape == shape:
        return p
    while p.ndim > len(shape):
        p = p.sum(axis=0)
    for ax, n in enumerate(shape):
        if n == 1 and p.shape[ax] != 1:
            p = p.sum(axis=ax, keepdims=True)
    return p


def _pos(a):
    return np.maximum(a, 0.0)


def _neg(a):
    return np.minimum(a, 0.0)


def _linear_rule(a, w, p_out, fwd, adj, rule):
    """Excitation rule for a bias-free linear map y = fwd(a, w) with adjoint adj(r, w)."""
    wp = _pos(w)
    if rule == "paper":
        z = fwd(a, wp)
        return a * adj(_safe_div(p_out, z), wp)
    if rule == "positive":
        ap, an = _pos(a), _neg(a)
        if not an.any():  # the a- W- half is exactly 0 (every post-ReLU layer): skip it
            z = fwd(ap, wp)
            return ap * adj(_safe_div(p_out, z), wp)
        wn = _neg(w)
        z = fwd(ap, wp) + fwd(an, wn)
        r = _safe_div(p_out, z)
        return ap * adj(r, wp) + an * adj(r, wn)
    raise ValueError(f"unknown rule {rule!r} (use one of {RULES})")


def explicit_linear_rule(a, w, p_out, rule):
    """Brute force on a dense layer y_i = sum_j a_j w[j, i]: a (N, J), w (J, I), p_out (N, I).
    Materialises z[n, j, i]; only for small layers (self-checks)."""
    a = np.asarray(a, np.float64)
    w = np.asarray(w, np.float64)
    if rule == "paper":
        z = a[:, :, None] * _pos(w)[None]
        zs = np.einsum("nj,ji->ni", a, _pos(w))
    else:
        z = np.maximum(a[:, :, None] * w[None], 0.0)
        zs = z.sum(axis=1)
    r = _safe_div(p_out, zs)
    return np.einsum("nji,ni->nj", z, r)


# ----------------------------------------------------------------------------------------
# geometry (ONNX semantics, 2-D spatial, auto_pad NOTSET / VALID)
# ----------------------------------------------------------------------------------------

def _spatial_attrs(node, x_ndim, kernel=None):
    at = _attrs(node)
    ns = x_ndim - 2
    if ns != 2:
        raise NotImplementedError(f"{node.op_type} {node.name!r}: only 2-D spatial inputs are supported")
    auto_pad = at.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", ""):
        raise NotImplementedError(f"{node.op_type} {node.name!r}: auto_pad={auto_pad} is not supported")
    k = list(at.get("kernel_shape", kernel if kernel is not None else []))
    s = list(at.get("strides", [1] * ns))
    d = list(at.get("dilations", [1] * ns))
    pads = list(at.get("pads", [0] * (2 * ns))) if auto_pad != "VALID" else [0] * (2 * ns)
    return at, k, s, d, pads


def _out_size(size, k, s, d, pb, pe, ceil_mode=False):
    span = size + pb + pe - d * (k - 1) - 1
    if not ceil_mode:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= size + pb:  # the last window must start inside the input or begin padding
        out -= 1
    return out


class _Windows:
    """Sliding-window bookkeeping for pools: the input padded so every window (ceil_mode
    included) is a plain strided slice; ``real`` marks input elements, ``declared`` marks
    input + declared padding."""

    def __init__(self, in_hw, k, s, d, pads, ceil_mode):
        H, W = in_hw
        self.k, self.s, self.d = k, s, d
        self.pt, self.pl = pads[0], pads[1]
        self.H, self.W = H, W
        self.Ho = _out_size(H, k[0], s[0], d[0], pads[0], pads[2], ceil_mode)
        self.Wo = _out_size(W, k[1], s[1], d[1], pads[1], pads[3], ceil_mode)
        need_h = (self.Ho - 1) * s[0] + d[0] * (k[0] - 1) + 1
        need_w = (self.Wo - 1) * s[1] + d[1] * (k[1] - 1) + 1
        self.Hp = max(need_h, pads[0] + H + pads[2])
        self.Wp = max(need_w, pads[1] + W + pads[3])
        self.real = np.zeros((self.Hp, self.Wp), bool)
        self.real[self.pt:self.pt + H, self.pl:self.pl + W] = True
        self.declared = np.zeros((self.Hp, self.Wp), bool)
        self.declared[:pads[0] + H + pads[2], :pads[1] + W + pads[3]] = True

    def offsets(self):
        """(ky, kx) in row-major scan order with the slices selecting that offset of every window."""
        for ky in range(self.k[0]):
            for kx in range(self.k[1]):
                y0, x0 = ky * self.d[0], kx * self.d[1]
                yield (slice(y0, y0 + self.s[0] * (self.Ho - 1) + 1, self.s[0]),
                       slice(x0, x0 + self.s[1] * (self.Wo - 1) + 1, self.s[1]))

    def pad(self, x, value=0.0):
        out = np.full(x.shape[:2] + (self.Hp, self.Wp), value, dtype=np.float64)
        out[:, :, self.pt:self.pt + self.H, self.pl:self.pl + self.W] = x
        return out

    def crop(self, xp):
        return xp[:, :, self.pt:self.pt + self.H, self.pl:self.pl + self.W]

    def window_sum(self, x):
        xp = self.pad(x)
        out = np.zeros(x.shape[:2] + (self.Ho, self.Wo))
        for sy, sx in self.offsets():
            out += xp[:, :, sy, sx]
        return out

    def window_scatter(self, r):
        """Adjoint of window_sum: every window's value added to each of its real elements."""
        gp = np.zeros(r.shape[:2] + (self.Hp, self.Wp))
        for sy, sx in self.offsets():
            gp[:, :, sy, sx] += r
        return self.crop(gp)

    def count(self, mask):
        out = np.zeros((self.Ho, self.Wo))
        for sy, sx in self.offsets():
            out += mask[sy, sx]
        return out


def _conv_geometry(node, x_shape, w_shape):
    at, k, s, d, pads = _spatial_attrs(node, len(x_shape), kernel=w_shape[2:])
    H, W = x_shape[2:]
    Ho = _out_size(H, k[0], s[0], d[0], pads[0], pads[2])
    Wo = _out_size(W, k[1], s[1], d[1], pads[1], pads[3])
    return int(at.get("group", 1)), k, s, d, pads, Ho, Wo


def _conv_slices(k, s, d, Ho, Wo):
    for ky in range(k[0]):
        for kx in range(k[1]):
            y0, x0 = ky * d[0], kx * d[1]
            yield ky, kx, (slice(y0, y0 + s[0] * (Ho - 1) + 1, s[0]), slice(x0, x0 + s[1] * (Wo - 1) + 1, s[1]))


def _conv_fwd(x, w, geo):
    """Bias-free Conv (groups allowed): im2col (one strided slice per kernel offset) + matmul."""
    group, k, s, d, pads, Ho, Wo = geo
    N = x.shape[0]
    O, Cg = w.shape[:2]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    xg = xp.reshape(N, group, Cg, xp.shape[2], xp.shape[3])
    cols = np.stack([xg[:, :, :, sy, sx] for _, _, (sy, sx) in _conv_slices(k, s, d, Ho, Wo)], axis=3)
    cols = cols.reshape(N, group, Cg * k[0] * k[1], Ho * Wo)
    wm = w.reshape(group, O // group, Cg * k[0] * k[1])
    return np.matmul(wm[None], cols).reshape(N, O, Ho, Wo)


def _conv_adj(r, w, geo, x_shape):
    """Adjoint (transpose) of _conv_fwd: col2im of W^T r."""
    group, k, s, d, pads, Ho, Wo = geo
    N, C, H, W = x_shape
    O, Cg = w.shape[:2]
    kk = k[0] * k[1]
    Hp, Wp = H + pads[0] + pads[2], W + pads[1] + pads[3]
    wm = w.reshape(group, O // group, Cg * kk)
    cols = np.matmul(np.swapaxes(wm, 1, 2)[None], r.reshape(N, group, O // group, Ho * Wo))
    cols = cols.reshape(N, group, Cg, kk, Ho, Wo)
    gp = np.zeros((N, group, Cg, Hp, Wp))
    for idx, (_, _, (sy, sx)) in enumerate(_conv_slices(k, s, d, Ho, Wo)):
        gp[:, :, :, sy, sx] += cols[:, :, :, idx]
    return gp.reshape(N, C, Hp, Wp)[:, :, pads[0]:pads[0] + H, pads[1]:pads[1] + W]


def _pool_windows(node, x_shape):
    at, k, s, d, pads = _spatial_attrs(node, len(x_shape))
    return at, _Windows(x_shape[2:], k, s, d, pads, bool(at.get("ceil_mode", 0)))


# ----------------------------------------------------------------------------------------
# graph
# ----------------------------------------------------------------------------------------

class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.inits = {}
        for t in g.initializer:
            arr = numpy_helper.to_array(t)
            self.inits[t.name] = arr.astype(np.float64) if arr.dtype.kind == "f" else arr
        self.inputs = [i.name for i in g.input if i.name not in self.inits]
        self.nodes = self._toposort(list(g.node))
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.output = g.output[0].name
        self.const = set(self.inits)
        for n in self.nodes:
            if all((not i) or i in self.const for i in n.input):
                self.const.update(o for o in n.output if o)

    def _toposort(self, nodes):
        avail = set(self.inits) | set(self.inputs) | {""}
        order, pending = [], list(range(len(nodes)))
        while pending:
            progressed, rest = False, []
            for idx in pending:
                n = nodes[idx]
                if all(i in avail for i in n.input):
                    order.append(n)
                    avail.update(n.output)
                    progressed = True
                else:
                    rest.append(idx)
            if not progressed:
                raise ValueError("graph has a cycle or a missing input")
            pending = rest
        return order

    def logits_name(self):
        """The input of a trailing Softmax (skipping Identity/Dropout after it), else the output."""
        name = self.output
        cur = name
        while cur in self.producer and self.producer[cur].op_type in ("Softmax", "Identity", "Dropout"):
            node = self.producer[cur]
            cur = node.input[0]
            if node.op_type == "Softmax":
                name = cur
        return name

    # ---------------------------------------------------------------- forward
    def forward(self, x):
        vals = dict(self.inits)
        if isinstance(x, dict):
            for k, v in x.items():
                vals[k] = np.asarray(v, np.float64)
        else:
            vals[self.inputs[0]] = np.asarray(x, np.float64)
        for n in self.nodes:
            outs = self._forward_node(n, [vals[i] if i else None for i in n.input])
            for name, v in zip(n.output, outs):
                if name:
                    vals[name] = v
        return vals

    def _forward_node(self, n, ins):
        op = n.op_type
        at = _attrs(n)
        x = ins[0] if ins else None
        if op == "Conv":
            w = ins[1]
            geo = _conv_geometry(n, x.shape, w.shape)
            y = _conv_fwd(x, w, geo)
            if len(ins) > 2 and ins[2] is not None:
                y = y + ins[2].reshape(1, -1, 1, 1)
            return [y]
        if op == "Gemm":
            a = x.T if at.get("transA", 0) else x
            b = ins[1].T if at.get("transB", 0) else ins[1]
            y = at.get("alpha", 1.0) * (a @ b)
            if len(ins) > 2 and ins[2] is not None:
                y = y + at.get("beta", 1.0) * ins[2]
            return [y]
        if op == "MatMul":
            return [np.matmul(x, ins[1])]
        if op == "Add":
            return [ins[0] + ins[1]]
        if op == "Relu":
            return [np.maximum(x, 0.0)]
        if op in ("Identity",):
            return [x]
        if op == "Dropout":
            return [x, np.ones(x.shape, bool)]
        if op == "MaxPool":
            _, win = _pool_windows(n, x.shape)
            if int(at.get("storage_order", 0)) != 0 or len(n.output) > 1 and n.output[1]:
                raise NotImplementedError("MaxPool Indices output is not supported")
            return [self._maxpool_candidates(x, win).max(axis=0)]
        if op == "AveragePool":
            _, win = _pool_windows(n, x.shape)
            if any(v != 1 for v in win.d):
                raise NotImplementedError("AveragePool with dilations")
            total = win.window_sum(x)
            # divisor: real elements, or (count_include_pad) elements of input + declared pads
            # (a ceil_mode window reaching past the declared end padding is cut there)
            mask = win.declared if at.get("count_include_pad", 0) else win.real
            return [total / win.count(mask)[None, None]]
        if op == "GlobalAveragePool":
            return [x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)]
        if op == "Flatten":
            axis = at.get("axis", 1)
            axis = axis + x.ndim if axis < 0 else axis
            lead = int(np.prod(x.shape[:axis])) if axis > 0 else 1
            return [x.reshape(lead, -1)]
        if op == "Reshape":
            shape = [int(v) for v in ins[1]]
            if not at.get("allowzero", 0):
                shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
            return [x.reshape(shape)]
        if op == "Softmax":
            if self.opset >= 13:
                axis = at.get("axis", -1)
                e = np.exp(x - x.max(axis=axis, keepdims=True))
                return [e / e.sum(axis=axis, keepdims=True)]
            axis = at.get("axis", 1)
            axis = axis + x.ndim if axis < 0 else axis
            x2 = x.reshape(int(np.prod(x.shape[:axis])), -1)
            e = np.exp(x2 - x2.max(axis=1, keepdims=True))
            return [(e / e.sum(axis=1, keepdims=True)).reshape(x.shape)]
        if op == "Constant":
            if "value" in at:
                v = numpy_helper.to_array(at["value"])
                return [v.astype(np.float64) if v.dtype.kind == "f" else v]
            for key in ("value_float", "value_floats"):
                if key in at:
                    return [np.asarray(at[key], np.float64)]
            for key in ("value_int", "value_ints"):
                if key in at:
                    return [np.asarray(at[key], np.int64)]
            raise NotImplementedError(f"Constant {n.name!r}: unsupported attribute {list(at)}")
        raise NotImplementedError(f"op {op} ({n.name!r}) is not supported by the reference")

    @staticmethod
    def _maxpool_candidates(x, win):
        xp = win.pad(x, value=-np.inf)
        return np.stack([xp[:, :, sy, sx] for sy, sx in win.offsets()])

    # ---------------------------------------------------------------- backward
    def linear_parts(self, n, vals):
        """(activation name, a, W_eff, fwd, adj, to_act) for a linear node; fwd/adj act on
        a matrix view of the activation and to_act maps P back to the activation's layout."""
        op = n.op_type
        at = _attrs(n)
        if op == "Conv":
            if n.input[1] not in self.const or n.input[0] in self.const:
                raise NotImplementedError(f"Conv {n.name!r}: weights must be constant")
            x, w = vals[n.input[0]], vals[n.input[1]]
            geo = _conv_geometry(n, x.shape, w.shape)
            return (n.input[0], x, w, lambda a, w_: _conv_fwd(a, w_, geo),
                    lambda r, w_: _conv_adj(r, w_, geo, x.shape), lambda p: p)
        if op in ("Gemm", "MatMul"):
            if n.input[1] not in self.const or n.input[0] in self.const:
                raise NotImplementedError(f"{op} {n.name!r}: the activation must be input A, B constant")
            x, b = vals[n.input[0]], vals[n.input[1]]
            if op == "Gemm":
                w = at.get("alpha", 1.0) * (b.T if at.get("transB", 0) else b)
                if at.get("transA", 0):
                    a, to_act = x.T, (lambda p: p.T)
                else:
                    a, to_act = x, (lambda p: p)
            else:
                if b.ndim != 2:
                    raise NotImplementedError(f"MatMul {n.name!r}: B must be 2-D")
                a, w = x.reshape(-1, x.shape[-1]), b
                to_act = (lambda p, shp=x.shape: p.reshape(shp))
            return (n.input[0], a, w, lambda a_, w_: a_ @ w_, lambda r, w_: r @ w_.T, to_act)
        raise AssertionError(op)

    def backward_node(self, n, vals, p_out, rule, dual=False):
        """{input name: P contribution} for one node given P at its (first) output."""
        op = n.op_type
        non_const = [i for i in n.input if i and i not in self.const]
        if op in LINEAR:
            name, a, w, fwd, adj, to_act = self.linear_parts(n, vals)
            # Gemm with transA: the activation is A = a.T but Y = a @ w, so P_out needs no transpose
            p2 = p_out.reshape(-1, w.shape[1]) if op == "MatMul" else p_out
            p_in = _linear_rule(a, w, p2, fwd, adj, rule)
            if dual:
                p_in = p_in - _linear_rule(a, -w, p2, fwd, adj, rule)
            return {name: to_act(p_in)}
        if op in PASS_THROUGH:
            return {n.input[0]: p_out}
        if op in ("Flatten", "Reshape"):
            return {n.input[0]: p_out.reshape(vals[n.input[0]].shape)}
        if op == "Add":
            if len(non_const) == 1:
                name = non_const[0]
                return {name: _unbroadcast(p_out, vals[name].shape)}
            x1, x2 = vals[n.input[0]], vals[n.input[1]]
            if rule == "positive":
                x1, x2 = _pos(x1), _pos(x2)
            r = _safe_div(p_out, x1 + x2)
            out = {}
            for name, xi in ((n.input[0], x1), (n.input[1], x2)):
                out[name] = out.get(name, 0.0) + _unbroadcast(xi * r, vals[name].shape)
            return out
        if op == "MaxPool":
            x = vals[n.input[0]]
            _, win = _pool_windows(n, x.shape)
            arg = self._maxpool_candidates(x, win).argmax(axis=0)  # first maximum, row-major scan
            gp = np.zeros(x.shape[:2] + (win.Hp, win.Wp))
            for idx, (sy, sx) in enumerate(win.offsets()):
                gp[:, :, sy, sx] += np.where(arg == idx, p_out, 0.0)
            return {n.input[0]: win.crop(gp)}
        if op == "AveragePool":
            x = vals[n.input[0]]
            _, win = _pool_windows(n, x.shape)
            a = _pos(x) if rule == "positive" else x
            r = _safe_div(p_out, win.window_sum(a))
            return {n.input[0]: a * win.window_scatter(r)}
        if op == "GlobalAveragePool":
            x = vals[n.input[0]]
            a = _pos(x) if rule == "positive" else x
            axes = tuple(range(2, x.ndim))
            r = _safe_div(p_out, a.sum(axis=axes, keepdims=True))
            return {n.input[0]: a * r}
        raise NotImplementedError(f"no excitation rule for op {op} ({n.name!r})")

    def classifier(self, logits):
        """The last Conv/Gemm/MatMul before the logits, walking down through pass-through ops."""
        cur = logits
        while cur in self.producer:
            n = self.producer[cur]
            if n.op_type in LINEAR:
                return n
            if n.op_type in PASS_THROUGH + ("Flatten", "Reshape"):
                cur = n.input[0]
            elif n.op_type == "Add":
                nc = [i for i in n.input if i not in self.const]
                if len(nc) != 1:
                    break
                cur = nc[0]
            else:
                break
        raise ValueError("no Conv/Gemm/MatMul classifier found below the logits")


def forward_reference(model: onnx.ModelProto, x) -> dict:
    """All graph inputs and node outputs (float64) for input ``x`` (array for the first
    graph input, or a {name: array} dict)."""
    g = _Graph(model)
    vals = g.forward(x)
    return {k: v for k, v in vals.items() if k not in g.inits}


def excitation_reference(model: onnx.ModelProto, x, signal, layers, rule: str = "positive",
                         contrastive: bool = False) -> dict:
    """Excitation Backprop from ``signal`` (N, K) at the logits down to ``layers``.

    Returns {"logits", "P": {layer: P (forward shape)}, "map": {layer: ...},
    "map_unclipped": {layer: ...}}; map = channel sum (axis 1) for rank >= 3, P itself for
    rank 2; with ``contrastive`` the map is max(channel sum, 0) and P is the propagated
    difference target - dual (below the classifier)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}")
    g = _Graph(model)
    vals = g.forward(x)
    logits = g.logits_name()
    lv = vals[logits]
    signal = np.asarray(signal, np.float64)
    if signal.shape != lv.shape:
        raise ValueError(f"signal shape {signal.shape} != logits shape {lv.shape}")
    for layer in layers:
        if layer not in vals:
            raise KeyError(f"layer {layer!r} is not a tensor of the graph")
    clf = g.classifier(logits) if contrastive else None

    P = {logits: signal.copy()}
    for n in reversed(g.nodes):
        if n.output[0] not in P:
            continue  # not upstream of the logits (or only a secondary output such as a Dropout mask)
        sent = g.backward_node(n, vals, P[n.output[0]], rule, dual=(n is clf))
        for name, p in sent.items():
            if name in g.const:
                continue
            P[name] = P[name] + p if name in P else np.array(p, dtype=np.float64)

    res = {"logits": lv, "P": {}, "map": {}, "map_unclipped": {}}
    for layer in layers:
        p = P.get(layer)
        if p is None:
            p = np.zeros(vals[layer].shape)
        res["P"][layer] = p
        m = p.sum(axis=1) if p.ndim >= 3 else p
        res["map_unclipped"][layer] = m
        res["map"][layer] = np.maximum(m, 0.0) if contrastive else m
    return res
