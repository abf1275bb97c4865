"""Independent float64 numpy reference of every attention method of issue 12.

Written from the definitions below, without importing ``onnx_excite``. The forward pass and
the convolution/pool geometry (``_Graph``, ``_conv_adj`` ...) come from ``tests/reference.py``
(test code, itself written from the ONNX spec); the backward rules here are new.

    method_reference(model, x, signal, layers, method, rule="positive") -> dict
        {"logits": (N, K), "P": {layer: P (forward shape)}, "map": {layer: map},
         "P_dual": {layer: P of the separate dual pass} (separate-dual methods only)}
    cam_reference(model, x, signal, layers) -> same dict (raises MethodNotApplicable)
    forward_values(model, x, override=None) -> {tensor: float64 array}

Notation: the signal e (N, K) enters at the logits s (the input of a trailing Softmax). P_t is
the top-down signal at tensor t (same shape as t). At a linear layer (Conv, Gemm incl.
alpha/transB, MatMul) with input activation a, weight W, bias b, output y = W a + b:
fwd(a, W) is the bias-free layer, adj(r, W) its transpose (transposed convolution). "Pools"
(AveragePool with its exact divisor cnt_i, GlobalAveragePool and ReduceMean over H, W with
cnt = H*W) are the linear
layers y_i = sum_{j in window i} a_j / cnt_i; a residual Add is y = x1 + x2 (+ constant).
Flatten/Reshape reshape P, Concat splits it, Identity/Dropout pass it; MaxPool routes P_out
to the first maximum of each window (row-major scan) in every method. A Conv followed by a
BatchNormalization (its sole consumer) is folded into one Conv first, and likewise a dense
layer (Gemm / MatMul) followed by a BatchNormalization or a per-feature Mul/Div/Add/Sub chain
into one Gemm (excitation_ref.fold_like_the_spec, as the library's canonicalization does); a BatchNormalization left over is the per-channel linear layer
y = s x + t (s = gamma / sqrt(var + eps), t = beta - mean s: weight s, bias t). Clip
(ReLU6) is a rectifier like Relu: the gradient's mask is [lo < x < hi], deconv rectifies P
there, LRP and MWP pass P. Safe division: a term with a zero denominator contributes 0.

grad      P_top = e. Linear: P_in = adj(P, W) (negative weights included, bias irrelevant).
          Relu(x): P_in = P * [x > 0]. Pools: P_in = scatter(P / cnt). Add: P to every data
          input (unbroadcast). This is d(e . s)/dt.
          map = max over channels of |P| (axis 1; at the input: over the colour channels).
deconv    as grad, but Relu: P_in = max(P, 0) (Zeiler-Fergus: rectify the backward signal,
          no forward mask). map as grad.
guided    as grad, Relu: P_in = max(P, 0) * [x > 0] (both). map as grad.
lrp-epsilon  P_top = e * s (the relevance of the target score). Linear and pools:
          z_i = sum_j z_ij + b_i with z_ij = a_j W_ij (pools: a_j / cnt_i, no bias),
          d_i = z_i + eps_i sign(z_i) (sign(0) = +1),
          eps_i = 1e-6 * max_{i'} |z_i'| over the node's outputs of the same sample,
          R_in[j] = sum_i z_ij R_i / d_i = a_j adj(R / d, W)_j.
          Bias: included in z_i, so it takes its share b_i R_i / d_i, which is dropped; a
          constant addend of an Add (MatMul + Add bias) likewise. Add of data tensors:
          R_k = x_k R / d with z = x1 + x2 (+ const). Relu passes R. Conservation
          sum R_in = sum R_out holds for bias-free nets up to the epsilon factor
          |z_i| / (|z_i| + eps_i).
lrp-zplus  alpha1-beta0: P_top = e * s; z+_ij = max(a_j W_ij, 0) (= a+ W+ + a- W-),
          R_in[j] = sum_i z+_ij R_i / Z_i, Z_i = sum_j z+_ij; bias ignored (not in Z).
          Pools: a+ / cnt; Add: x_k+ / sum x+ (a constant addend is ignored: pass-through).
          Conservation exact wherever Z_i > 0 (always for bias-free nets). With signal
          e * s this is the ``positive`` Excitation Backprop rule (cross-checked in tests).
          map (both LRP) = sum over channels.
cam       Zhou et al.: only for logits = Gemm/MatMul(+bias) of Flatten(GlobalAveragePool(F))
          (Identity/Dropout/Reshape allowed between; or a ReduceMean over H, W); only at layer F:
          map = sum_c (W^T e)_c F_c (no clip); equals H*W * sum_c F_c * grad_c at F.
          Elsewhere MethodNotApplicable with the reason.
gradcam   Selvaraju et al. (ICCV 2017) at a layer with activation A (N, C, positions...): g = the
          grad P at A (d(e . s)/dA, from grad's sweep), alpha_c = mean of g_c over the positions,
          map = max(sum_c alpha_c A_c, 0). Not at the model's input (its colour channels are no
          features) nor at a layer without positions (rank 2): MethodNotApplicable.
gradcam++ Chattopadhyay et al. (WACV 2018), the exponential-score closed form (as
          pytorch-grad-cam): alpha^c_ij = g_ij^2 / (2 g_ij^2 + S_c g_ij^3), S_c = sum_ij A_c,ij,
          0 where the denominator is 0; w_c = sum_ij alpha^c_ij max(g_c,ij, 0);
          map = max(sum_c w_c A_c, 0). Same layers as gradcam. ``grad_cam_map`` computes both
          from (A, g) at any channel axis (token layers: the patch tokens given).
mwp       P_top = e; the excitation rule (``positive``: z+_ij as lrp-zplus; ``paper``:
          z_ij = a_j W+_ij), normalised by Z; pools/Add proportional to a+ (positive) or a
          (paper). map = sum over channels.
cmwp      at the classifier (first Conv/Gemm/MatMul below the logits):
          P_in = rule(W) - rule(-W), then MWP below; map = max(sum over channels, 0).
c-grad    separate dual pass: the same method from the negated classifier (-W at the
c-deconv  classifier, the rest unchanged); map_t and map_d each L1-normalised per sample
c-cam     (m / sum |m|), subtracted, clipped at 0: max(m_t/|m_t|_1 - m_d/|m_d|_1, 0).
          c-grad is identically 0: the dual gradient is exactly -g, and |.| forgets the sign
          (the paper's observation). c-cam = 2 max(cam, 0) / |cam|_1 (same arg-max as cam
          where cam has a positive value). c-deconv is not trivial: the backward ReLUs see
          W^T e for the target and -W^T e for the dual.
cmwp-nonorm   as cmwp (difference at the classifier's input propagated) but the linear
          layers (Conv/Gemm/MatMul) do not divide by Z: P_in[j] = sum_i z_ij P_i.
          Parameter-free ops (pools, Add) keep their MWP rule.
cmwp-postnorm MWP from the target and MWP from the negated classifier computed separately
          (each normalised by Z), each map L1-normalised, subtracted, clipped at 0. Where
          both passes conserve their mass it equals cmwp / sum(e) (per sample); it differs
          where the two passes lose different mass at units with Z = 0.

rollout   Abnar & Zuidema (ACL 2020), attention rollout; no signal, no sweep. For the attention
          blocks l = 1..L (a Softmax whose output A_l (N, heads, T, T) is the first input of a
          MatMul), in graph order: Abar_l = mean over heads of A_l, B_l = 0.5 Abar_l + 0.5 I with
          every row divided by its sum, R = B_L ... B_1 (T x T matrices, multiplied out in
          full); map = R[cls, patch tokens] on the h x w grid, where ``tokens = (cls, first
          patch, h, w)`` is given by the caller (the test knows how its model lays out its
          tokens). A model without such a Softmax: MethodNotApplicable.

Map post-processing (the paper; onnx_excite.render.postprocess): bicubic upsampling to the image for
every method, and a Gaussian blur sigma = 0.02 * max(W, H) for grad, deconv, guided and LRP
(and, our choice, for c-grad and c-deconv).
"""
from __future__ import annotations

import numpy as np
import onnx

from excitation_ref import Reference, fold_like_the_spec
from reference import LINEAR, _attrs, _Graph, _pool_windows, _safe_div, _unbroadcast

METHODS = ("grad", "deconv", "guided", "lrp-epsilon", "lrp-zplus", "cam", "mwp", "cmwp",
           "c-grad", "c-deconv", "c-cam", "cmwp-nonorm", "cmwp-postnorm", "gradcam", "gradcam++")
TOKEN_METHODS = ("rollout",)   # maps of the forward attention weights (no sweep): rollout_reference
GRAD_CAM = ("gradcam", "gradcam++")
LRP_EPS = 1e-6
PASS = ("Identity", "Dropout", "Softmax")


class MethodNotApplicable(ValueError):
    """The method is not defined for this model or layer (the message says why)."""


# ----------------------------------------------------------------------------------------
# forward (reference.py's interpreter + Concat + overriding a tensor for finite differences)
# ----------------------------------------------------------------------------------------

class Graph(_Graph):
    """reference.py's interpreter on the model with every Conv -> BatchNormalization (sole
    consumer), and every per-channel constant Mul / Div / Add / Sub chain after a Conv, folded
    into one Conv, and the same after a dense layer folded into one Gemm (as the library's
    canonicalization does), plus Concat, Clip and unfolded
    BatchNormalization (a per-channel affine map y = s x + t)."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__(fold_like_the_spec(model))

    def _forward_node(self, n, ins):
        if n.op_type == "Concat":
            return [np.concatenate(ins, axis=int(_attrs(n)["axis"]))]
        if n.op_type == "Clip":
            lo, hi = self.clip_bounds(n, ins)
            return [np.clip(ins[0], lo, hi)]
        if n.op_type == "BatchNormalization":
            s, t = self.bn_affine(n, ins)
            return [ins[0] * s + t]
        if n.op_type == "ReduceMean":
            axes, keep = self.mean_axes(n, ins)
            return [ins[0].mean(axis=axes, keepdims=keep)]
        return super()._forward_node(n, ins)

    def mean_axes(self, n, ins):
        """(axes, keepdims) of a ReduceMean over the spatial axes (attribute, or input 1 from
        opset 18)."""
        at = _attrs(n)
        rank = ins[0].ndim
        axes = at.get("axes") if "axes" in at else (ins[1] if len(ins) > 1 and ins[1] is not None else None)
        if axes is None:
            raise NotImplementedError(f"ReduceMean {n.name!r} over all axes")
        axes = tuple(sorted(int(a) % rank for a in axes))
        if axes != tuple(range(2, rank)):
            raise NotImplementedError(f"ReduceMean {n.name!r}: only over the spatial axes, got {axes}")
        return axes, bool(at.get("keepdims", 1))

    def clip_bounds(self, n, ins):
        at = _attrs(n)
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else at.get("min", -np.inf)
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else at.get("max", np.inf)
        return float(lo), float(hi)

    def bn_affine(self, n, ins):
        """(s, t) broadcast over (N, C, ...): s = gamma / sqrt(var + eps), t = beta - mean s."""
        x, gamma, beta, mean, var = ins[:5]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        s = gamma / np.sqrt(var + _attrs(n).get("epsilon", 1e-5))
        return s.reshape(shape), (beta - mean * s).reshape(shape)

    def linear_parts(self, n, vals):
        if n.op_type == "BatchNormalization":
            s, _ = self.bn_affine(n, [vals[i] for i in n.input])
            return (n.input[0], vals[n.input[0]], s, lambda a, w: a * w, lambda r, w: r * w, lambda p: p)
        return super().linear_parts(n, vals)

    def forward(self, x, override=None):
        """All tensors; ``override`` {tensor: value} replaces a computed tensor (its
        consumers see the new value)."""
        override = override or {}
        vals = dict(self.inits)
        vals[self.inputs[0]] = np.asarray(override.get(self.inputs[0], x), np.float64)
        for n in self.nodes:
            outs = self._forward_node(n, [vals[i] if i else None for i in n.input])
            for name, v in zip(n.output, outs):
                if name:
                    vals[name] = np.asarray(override[name], np.float64) if name in override else v
        return vals


def forward_values(model: onnx.ModelProto, x, override=None) -> dict:
    return Graph(model).forward(x, override)


# ----------------------------------------------------------------------------------------
# per-layer rules
# ----------------------------------------------------------------------------------------

def _sample_max_abs(z):
    return np.abs(z).reshape(z.shape[0], -1).max(axis=1).reshape((-1,) + (1,) * (z.ndim - 1))


def _stabilised(z):
    """d = z + eps * max|z| (same sample) * sign(z), sign(0) = +1."""
    return z + LRP_EPS * _sample_max_abs(z) * np.where(z >= 0, 1.0, -1.0)


def _bias(g, n, vals, shape):
    """The constant term of a Conv/Gemm/BatchNormalization node broadcast to its output
    shape (0 for MatMul)."""
    at = _attrs(n)
    if n.op_type == "BatchNormalization":
        return np.broadcast_to(g.bn_affine(n, [vals[i] for i in n.input])[1], shape)
    if n.op_type == "Conv" and len(n.input) > 2 and n.input[2]:
        return np.broadcast_to(vals[n.input[2]].reshape(1, -1, 1, 1), shape)
    if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2]:
        return np.broadcast_to(at.get("beta", 1.0) * vals[n.input[2]], shape)
    return np.zeros(shape)


def _pool_parts(g, n, vals):
    """(a, scatter, window_sum, cnt) for AveragePool / GlobalAveragePool / spatial
    ReduceMean: y = window_sum(a) / cnt, scatter = adjoint of window_sum."""
    x = vals[n.input[0]]
    if n.op_type == "ReduceMean":
        axes, keep = g.mean_axes(n, [vals[i] if i else None for i in n.input])
        cnt = float(np.prod([x.shape[a] for a in axes]))

        def scatter(r):
            return np.broadcast_to(r if keep else np.expand_dims(r, axes), x.shape).copy()

        return x, scatter, (lambda a: a.sum(axis=axes, keepdims=keep)), cnt
    if n.op_type == "GlobalAveragePool":
        axes = tuple(range(2, x.ndim))
        cnt = float(np.prod(x.shape[2:]))
        return x, (lambda r: np.broadcast_to(r, x.shape).copy()), (lambda a: a.sum(axis=axes, keepdims=True)), cnt
    at, win = _pool_windows(n, x.shape)
    mask = win.declared if at.get("count_include_pad", 0) else win.real
    cnt = win.count(mask)[None, None]
    return x, win.window_scatter, win.window_sum, cnt


class Rules:
    """Backward rules; subclasses change the ones their method defines differently."""

    excitation = "positive"

    def __init__(self, rule="positive"):
        if rule not in ("positive", "paper"):
            raise ValueError(f"unknown rule {rule!r}")
        self.excitation = rule

    # gradient defaults --------------------------------------------------------------
    def linear(self, a, w, b, p, fwd, adj):
        return adj(p, w)

    def relu(self, x, p):
        return p * (x > 0)

    def clip(self, x, p, lo, hi):
        """Clip (ReLU6 ...): the gradient's mask is lo < x < hi."""
        return p * ((x > lo) & (x < hi))

    def pool(self, a, scatter, wsum, cnt, p):
        return scatter(p / cnt)

    def add(self, xs, const, p):
        return [p for _ in xs]


class GradRules(Rules):
    pass


class DeconvRules(Rules):
    def relu(self, x, p):
        return np.maximum(p, 0.0)

    def clip(self, x, p, lo, hi):
        return np.maximum(p, 0.0)


class GuidedRules(Rules):
    def relu(self, x, p):
        return np.maximum(p, 0.0) * (x > 0)

    def clip(self, x, p, lo, hi):
        return np.maximum(p, 0.0) * ((x > lo) & (x < hi))


class LrpEpsilonRules(Rules):
    def linear(self, a, w, b, p, fwd, adj):
        d = _stabilised(fwd(a, w) + b)
        return a * adj(_safe_div(p, d), w)

    def relu(self, x, p):
        return p

    def clip(self, x, p, lo, hi):
        return p

    def pool(self, a, scatter, wsum, cnt, p):
        d = _stabilised(wsum(a) / cnt)
        return a * scatter(_safe_div(p, cnt * d))

    def add(self, xs, const, p):
        d = _stabilised(sum(xs) + const)
        r = _safe_div(p, d)
        return [x * r for x in xs]


class ExcitationRules(Rules):
    """Z-normalised contributions: lrp-zplus (= positive rule) and MWP (positive / paper)."""

    normalise_linear = True

    def _act(self, a):
        return np.maximum(a, 0.0) if self.excitation == "positive" else a

    def linear(self, a, w, b, p, fwd, adj):
        wp, wn = np.maximum(w, 0.0), np.minimum(w, 0.0)
        if self.excitation == "positive":
            parts = [(np.maximum(a, 0.0), wp), (np.minimum(a, 0.0), wn)]
        else:
            parts = [(a, wp)]
        if self.normalise_linear:
            z = sum(fwd(act, wt) for act, wt in parts)
            r = _safe_div(p, z)
        else:
            r = p
        return sum(act * adj(r, wt) for act, wt in parts)

    def relu(self, x, p):
        return p

    def clip(self, x, p, lo, hi):
        return p

    def pool(self, a, scatter, wsum, cnt, p):
        act = self._act(a)
        return act * scatter(_safe_div(p, wsum(act)))

    def add(self, xs, const, p):
        if len(xs) == 1:
            return [p]  # a constant addend (bias) is ignored
        acts = [self._act(x) for x in xs]
        r = _safe_div(p, sum(acts))
        return [act * r for act in acts]


class NoNormRules(ExcitationRules):
    normalise_linear = False


# ----------------------------------------------------------------------------------------
# the backward sweep
# ----------------------------------------------------------------------------------------

def _backward_node(g, n, vals, p_out, rules, classifier_sign):
    """{data input: P} for node ``n``. ``classifier_sign``: 1, -1 (negated classifier) or
    "difference" (rule(W) - rule(-W)); only used at the classifier node."""
    op = n.op_type
    data = [i for i in n.input if i and i not in g.const]
    if op in LINEAR or op == "BatchNormalization":
        name, a, w, fwd, adj, to_act = g.linear_parts(n, vals)
        p2 = p_out.reshape(-1, w.shape[1]) if op == "MatMul" else p_out
        b = _bias(g, n, vals, p2.shape)
        if classifier_sign == "difference":
            p_in = rules.linear(a, w, b, p2, fwd, adj) - rules.linear(a, -w, -b, p2, fwd, adj)
        else:
            s = float(classifier_sign)
            p_in = rules.linear(a, s * w, s * b, p2, fwd, adj)
        return {name: to_act(p_in)}
    if op == "Relu":
        return {n.input[0]: rules.relu(vals[n.input[0]], p_out)}
    if op == "Clip":
        lo, hi = g.clip_bounds(n, [vals[i] if i else None for i in n.input])
        return {n.input[0]: rules.clip(vals[n.input[0]], p_out, lo, hi)}
    if op in PASS:
        return {n.input[0]: p_out}
    if op in ("Flatten", "Reshape"):
        return {n.input[0]: p_out.reshape(vals[n.input[0]].shape)}
    if op == "Concat":
        axis = int(_attrs(n)["axis"])
        sizes = np.cumsum([vals[i].shape[axis] for i in n.input])[:-1]
        out = {}
        for name, piece in zip(n.input, np.split(p_out, sizes, axis=axis)):
            out[name] = out.get(name, 0.0) + piece
        return out
    if op == "Add":
        xs = [vals[i] for i in data]
        const = sum((vals[i] for i in n.input if i and i in g.const), np.zeros(()))
        shares = rules.add([np.broadcast_to(x, p_out.shape) for x in xs], const, p_out)
        out = {}
        for name, share in zip(data, shares):
            out[name] = out.get(name, 0.0) + _unbroadcast(share, vals[name].shape)
        return out
    if op == "MaxPool":
        x = vals[n.input[0]]
        _, win = _pool_windows(n, x.shape)
        arg = g._maxpool_candidates(x, win).argmax(axis=0)  # first maximum, row-major scan
        gp = np.zeros(x.shape[:2] + (win.Hp, win.Wp))
        for idx, (sy, sx) in enumerate(win.offsets()):
            gp[:, :, sy, sx] += np.where(arg == idx, p_out, 0.0)
        return {n.input[0]: win.crop(gp)}
    if op in ("AveragePool", "GlobalAveragePool", "ReduceMean"):
        a, scatter, wsum, cnt = _pool_parts(g, n, vals)
        return {n.input[0]: rules.pool(a, scatter, wsum, cnt, p_out)}
    raise NotImplementedError(f"no rule for op {op} ({n.name!r})")


def sweep(g, vals, top, rules, classifier=None, classifier_sign=1):
    """P at every tensor upstream of the logits."""
    P = {g.logits_name(): np.asarray(top, np.float64)}
    for n in reversed(g.nodes):
        if n.output[0] not in P:
            continue
        sign = classifier_sign if n is classifier else 1
        for name, p in _backward_node(g, n, vals, P[n.output[0]], rules, sign).items():
            if name in g.const:
                continue
            P[name] = P[name] + p if name in P else np.array(p, dtype=np.float64)
    return P


# ----------------------------------------------------------------------------------------
# maps
# ----------------------------------------------------------------------------------------

def channel_sum(p):
    return p.sum(axis=1) if p.ndim >= 3 else p


def channel_absmax(p):
    return np.abs(p).max(axis=1) if p.ndim >= 3 else np.abs(p)


def l1_normalise(m):
    """m / sum |m| per sample (a zero map stays zero)."""
    s = np.abs(m).reshape(m.shape[0], -1).sum(axis=1).reshape((-1,) + (1,) * (m.ndim - 1))
    return _safe_div(m, s)


def contrast(m_target, m_dual):
    return np.maximum(l1_normalise(m_target) - l1_normalise(m_dual), 0.0)


_BASE = {  # method -> (rules class, top signal, map reduction)
    "grad": (GradRules, "e", channel_absmax),
    "deconv": (DeconvRules, "e", channel_absmax),
    "guided": (GuidedRules, "e", channel_absmax),
    "lrp-epsilon": (LrpEpsilonRules, "e*s", channel_sum),
    "lrp-zplus": (ExcitationRules, "e*s", channel_sum),
    "mwp": (ExcitationRules, "e", channel_sum),
    "cmwp": (ExcitationRules, "e", channel_sum),
    "cmwp-nonorm": (NoNormRules, "e", channel_sum),
}
_SEPARATE_DUAL = {"c-grad": "grad", "c-deconv": "deconv", "cmwp-postnorm": "mwp"}


def method_reference(model: onnx.ModelProto, x, signal, layers, method: str, rule: str = "positive",
                     tokens=None) -> dict:
    """Maps of ``method`` at ``layers`` for input ``x`` and signal ``signal`` (N, K) (``tokens``:
    rollout's token layout, see :func:`rollout_reference`; it ignores the signal)."""
    if method == "rollout":
        return rollout_reference(model, x, layers, tokens)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS + TOKEN_METHODS}")
    if method == "cam":
        return cam_reference(model, x, signal, layers)
    if method == "c-cam":
        return _c_cam(model, x, signal, layers)
    if method in GRAD_CAM:
        return _grad_cam(model, x, signal, layers, plus=method == "gradcam++")
    g = Graph(model)
    vals = g.forward(x)
    logits = g.logits_name()
    s = vals[logits]
    e = np.asarray(signal, np.float64)
    if e.shape != s.shape:
        raise ValueError(f"signal shape {e.shape} != logits shape {s.shape}")
    for layer in layers:
        if layer not in vals:
            raise KeyError(f"layer {layer!r} is not a tensor of the graph")
    base = _SEPARATE_DUAL.get(method, method)
    cls, top_kind, reduce = _BASE[base]
    rules = cls(rule)
    top = e * s if top_kind == "e*s" else e
    res = {"logits": s, "P": {}, "map": {}}

    def at(P, layer):
        return P.get(layer, np.zeros(vals[layer].shape))

    if method in _SEPARATE_DUAL:
        clf = g.classifier(logits)
        P_t = sweep(g, vals, top, rules)
        P_d = sweep(g, vals, top, rules, classifier=clf, classifier_sign=-1)
        res["P_dual"] = {}
        for layer in layers:
            res["P"][layer], res["P_dual"][layer] = at(P_t, layer), at(P_d, layer)
            res["map"][layer] = contrast(reduce(at(P_t, layer)), reduce(at(P_d, layer)))
        return res
    contrastive = method in ("cmwp", "cmwp-nonorm")
    clf = g.classifier(logits) if contrastive else None
    P = sweep(g, vals, top, rules, classifier=clf, classifier_sign="difference" if contrastive else 1)
    for layer in layers:
        p = at(P, layer)
        res["P"][layer] = p
        m = reduce(p)
        res["map"][layer] = np.maximum(m, 0.0) if contrastive else m
    return res


# ----------------------------------------------------------------------------------------
# CAM
# ----------------------------------------------------------------------------------------

def cam_head(g: Graph):
    """(feature map F, classifier node) of a GlobalAveragePool + linear head, or
    MethodNotApplicable naming why not."""
    logits = g.logits_name()
    cur = logits
    node = g.producer.get(cur)
    if node is not None and node.op_type == "Add":
        data = [i for i in node.input if i not in g.const]
        if len(data) == 1:
            cur = data[0]
            node = g.producer.get(cur)
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        raise MethodNotApplicable(f"cam: the logits {logits!r} do not come from a Gemm/MatMul classifier "
                                  f"(found {node.op_type if node is not None else 'a graph input'})")
    clf = node
    cur = clf.input[0]
    while True:
        node = g.producer.get(cur)
        if node is None:
            raise MethodNotApplicable("cam: no GlobalAveragePool before the classifier")
        if node.op_type in ("Flatten", "Reshape", "Identity", "Dropout"):
            cur = node.input[0]
            continue
        if node.op_type == "GlobalAveragePool":
            return node.input[0], clf
        if node.op_type == "ReduceMean":  # a global average pool when over H, W of a 4-D map
            at = _attrs(node)
            axes = at.get("axes", g.inits.get(node.input[1]) if len(node.input) > 1 else None)
            if axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]:
                return node.input[0], clf
            raise MethodNotApplicable(f"cam: the ReduceMean {node.name!r} before the classifier is not over "
                                      "the spatial axes")
        raise MethodNotApplicable(f"cam: the classifier {clf.name!r} is fed by {node.op_type} {node.name!r}, "
                                  "not by a global average pool of the last feature map")


def _cam_maps(model, x, signal, layers, sign=1.0):
    g = Graph(model)
    vals = g.forward(x)
    feat, clf = cam_head(g)
    for layer in layers:
        if layer != feat:
            raise MethodNotApplicable(f"cam: defined only at the last feature map {feat!r}, not at {layer!r}")
    _, _, w, _, _, _ = g.linear_parts(clf, vals)  # (C, K), alpha / transB folded in
    e = np.asarray(signal, np.float64)
    cw = sign * (e @ w.T)  # (N, C): the signal's combination of class weights
    F = vals[feat]
    cam = np.einsum("nc,nc...->n...", cw, F)
    return vals[g.logits_name()], feat, cam


def cam_reference(model, x, signal, layers) -> dict:
    s, feat, cam = _cam_maps(model, x, signal, layers)
    return {"logits": s, "P": {feat: cam}, "map": {feat: cam}}


def _c_cam(model, x, signal, layers) -> dict:
    s, feat, cam = _cam_maps(model, x, signal, layers)
    _, _, dual = _cam_maps(model, x, signal, layers, sign=-1.0)
    return {"logits": s, "P": {feat: cam}, "P_dual": {feat: dual}, "map": {feat: contrast(cam, dual)}}


# ----------------------------------------------------------------------------------------
# attention rollout
# ----------------------------------------------------------------------------------------

def attention_probabilities(model: onnx.ModelProto, x) -> list:
    """The float64 attention weights A_l (N, heads, T, T) of every Softmax that feeds a MatMul as
    its first input, in graph order (excitation_ref's forward), or MethodNotApplicable."""
    ref = Reference(model)
    names = _attention_names(ref)
    vals = ref.forward(x)
    return [vals[name] for name in names]


def _attention_names(ref: Reference) -> list:
    names = [n.output[0] for n in ref.nodes if n.op_type == "Softmax"
             and any(m.op_type == "MatMul" and m.input[0] == n.output[0] for m in ref.nodes)]
    if not names:
        raise MethodNotApplicable("rollout needs self-attention: no Softmax feeds a MatMul")
    return names


def rollout_matrix(weights) -> np.ndarray:
    """R = B_L ... B_1 (N, T, T), B_l = rows-normalised 0.5 mean_heads(A_l) + 0.5 I."""
    r = None
    for a in weights:
        if a.ndim != 4 or a.shape[2] != a.shape[3]:
            raise MethodNotApplicable(f"rollout: attention weights of shape {a.shape}, not (N, heads, T, T)")
        b = 0.5 * a.mean(axis=1) + 0.5 * np.eye(a.shape[-1])
        b = b / b.sum(axis=-1, keepdims=True)
        r = b if r is None else np.einsum("nij,njk->nik", b, r)   # the later block on the left
    return r


def rollout_reference(model: onnx.ModelProto, x, layers, tokens) -> dict:
    """The rollout map (N, h, w) at every one of ``layers`` (the rollout is one map);
    ``tokens = (cls, first_patch, h, w)``: the class token's index and where the h * w patch
    tokens (row-major) start."""
    weights = attention_probabilities(model, np.asarray(x, np.float64))
    if tokens is None:
        raise ValueError("rollout_reference needs the token layout tokens=(cls, first_patch, h, w)")
    cls, first, h, w = tokens
    r = rollout_matrix(weights)
    m = r[:, cls, first:first + h * w].reshape(len(r), h, w)
    return {"rollout": r, "map": {layer: m for layer in layers}, "P": {}}


def method_layer(model: onnx.ModelProto, method: str) -> str:
    """The one layer of a method defined at one (cam: the last feature map), or
    MethodNotApplicable; rollout only where the model has no attention (its layer, the
    tokens the first block reads, is named by the tests that have attention)."""
    if method in ("cam", "c-cam"):
        return cam_head(Graph(model))[0]
    if method == "rollout":
        _attention_names(Reference(model))   # MethodNotApplicable without attention
        raise ValueError("the rollout reference does not look for its layer in a model with attention: name it")
    raise ValueError(f"{method!r} is defined at any layer")


# ----------------------------------------------------------------------------------------
# Grad-CAM, Grad-CAM++
# ----------------------------------------------------------------------------------------

def grad_cam_map(A, g, plus=False, channel_axis=1):
    """Grad-CAM (``plus``: Grad-CAM++) of activation ``A`` with gradient ``g`` (same shape, batch
    first, channels at ``channel_axis``, every other axis a position), in float64."""
    A = np.moveaxis(np.asarray(A, np.float64), channel_axis, 1)
    g = np.moveaxis(np.asarray(g, np.float64), channel_axis, 1)
    n, c = A.shape[:2]
    A2, g2 = A.reshape(n, c, -1), g.reshape(n, c, -1)     # (N, C, positions)
    if plus:
        S = A2.sum(axis=2, keepdims=True)
        num = g2 ** 2
        alpha = _safe_div(num, 2.0 * num + S * g2 ** 3)
        w = (alpha * np.maximum(g2, 0.0)).sum(axis=2)
    else:
        w = g2.mean(axis=2)
    cam = np.einsum("nc,ncp->np", w, A2).reshape((n,) + A.shape[2:])
    return np.maximum(cam, 0.0)


def _grad_cam(model, x, signal, layers, plus=False) -> dict:
    name = "gradcam++" if plus else "gradcam"
    g = Graph(model)
    for layer in layers:
        if layer in g.inputs:
            raise MethodNotApplicable(f"{name}: a class activation map of a feature layer, not of the model's "
                                      f"input {layer!r}")
    vals = g.forward(x)
    logits = g.logits_name()
    for layer in layers:
        if vals[layer].ndim < 3:
            raise MethodNotApplicable(f"{name}: needs a layer with positions; {layer!r} has rank {vals[layer].ndim}")
    P = sweep(g, vals, np.asarray(signal, np.float64), GradRules())
    res = {"logits": vals[logits], "P": {}, "map": {}}
    for layer in layers:
        grad = P.get(layer, np.zeros(vals[layer].shape))
        res["P"][layer] = grad
        res["map"][layer] = grad_cam_map(vals[layer], grad, plus)
    return res
