"""Random small ONNX transformer-era classifiers built with onnx.helper (opset 17), for the fuzz.

``random_transformer(seed)`` draws one of three bodies:

* ``vit``: a patch-embedding Conv (k = stride) laid out as tokens (N, T, C) (Reshape to
  (N, C, h*w), the count written or -1, then Transpose), 0-2 constant tokens joined by Concat
  (Expand-ed to the batch), a positional Add, 1-3 pre-norm blocks and a class-token Gather or
  mean-pooled head;
* ``convnext``: 1-3 ConvNeXt blocks (depthwise Conv, channels-last Transpose, LayerNorm,
  token-wise MatMul + bias, GELU, MatMul + bias, layer scale, Transpose back, residual Add),
  sometimes a channels-first LayerNorm + 2x2 stride-2 Conv downsampling, a pooled head;
* ``hybrid``: ConvNeXt blocks, then the ViT's patch embedding and blocks.

A pre-norm block: LayerNorm -> multi-head self-attention (one fused QKV MatMul split by
Reshape / Transpose / Gather, or three MatMuls; Q K' scaled by a Mul or a Div, or Q scaled
before; sometimes a constant relative-position bias added to the logits; Softmax; A @ V; heads
merged by Transpose + Reshape; projection) -> layer scale -> residual Add; LayerNorm -> MLP
(erf GELU or tanh GELU written out) -> layer scale -> residual Add. LayerNorm is the op or
(about a third of the time) the decomposed ReduceMean / Sub / Pow / Sqrt / Div form, which
the library fuses to the op; the reference then runs on ``ref_model``, the same network with
the op (tensor names are the same in both). A conv stem (Conv, Relu or none) may come first.

Returns a ``Case``: model, ref_model, layers (the input and token / feature-map layers),
axes ({layer: channel axis} for the reference), grids ({token layer: its count of leading
constant tokens} where the library lays the map on the patch grid), features (tags).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass
class Case:
    model: onnx.ModelProto
    ref_model: onnx.ModelProto
    layers: list
    axes: dict
    grids: dict
    features: set = field(default_factory=set)


#: every tag ``Case.features`` can hold
FEATURES = {"body_vit", "body_convnext", "body_hybrid", "stem", "layernorm", "layernorm_decomposed",
            "layernorm_square_mul", "layernorm_square_pow", "gelu_erf", "gelu_tanh", "attn_fused", "attn_split",
            "attn_scale_mul", "attn_scale_div", "attn_scale_q", "attn_rel_bias", "layer_scale", "convnext_block",
            "downsample", "patch_1x1", "cls1", "cls2", "pos_embed", "head_cls_gather", "head_mean", "head_gap",
            "softmax"}


class _Net:
    """Names are given by the caller (the same in the op and the decomposed forms)."""

    def __init__(self, rng, decompose: bool):
        self.rng = rng
        self.decompose = decompose
        self.nodes, self.inits = [], []

    def const(self, name, array, dtype=np.float32):
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype), name))
        return name

    def node(self, op, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=f"n_{name}", **attrs))
        return name

    def weight(self, name, shape, fan_in, scale=1.0):
        return self.const(name, self.rng.normal(size=shape) * scale / np.sqrt(max(1, fan_in)))

    def bias(self, name, n):
        return self.const(name, self.rng.normal(size=n) * 0.1)

    def linear(self, x, cin, cout, name, bias=True):
        y = self.node("MatMul", [x, self.weight(f"{name}.w", (cin, cout), cin)], f"{name}.mm" if bias else name)
        return self.node("Add", [y, self.bias(f"{name}.b", cout)], name) if bias else y

    def layernorm(self, x, c, name, decomposed: bool, features):
        """LayerNormalization over the last axis; ``decomposed`` (drawn by the caller whatever
        the form) writes it out unless this net builds the reference twin."""
        gamma = self.const(f"{name}.gamma", self.rng.uniform(0.5, 1.5, c))
        beta = self.const(f"{name}.beta", self.rng.normal(size=c) * 0.1)
        square = self.rng.random() < 0.5   # drawn in both forms: the rng stays in step
        if not (decomposed and self.decompose):
            features.add("layernorm")
            return self.node("LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=1e-5)
        features.update({"layernorm_decomposed", f"layernorm_square_{'mul' if square else 'pow'}"})
        axes = dict(axes=[-1], keepdims=1)
        centred = self.node("Sub", [x, self.node("ReduceMean", [x], f"{name}.mu", **axes)], f"{name}.c")
        sq = (self.node("Mul", [centred, centred], f"{name}.sq") if square else
              self.node("Pow", [centred, self.const(f"{name}.two", 2.0)], f"{name}.sq"))
        var = self.node("ReduceMean", [sq], f"{name}.var", **axes)
        sigma = self.node("Sqrt", [self.node("Add", [var, self.const(f"{name}.eps", 1e-5)], f"{name}.ve")],
                          f"{name}.sigma")
        scaled = self.node("Mul", [self.node("Div", [centred, sigma], f"{name}.hat"), gamma], f"{name}.scaled")
        return self.node("Add", [scaled, beta], name)

    def gelu(self, x, name, form, features):
        features.add(f"gelu_{form}")
        if form == "erf":   # x * (1 + erf(x / sqrt 2)) * 0.5, PyTorch's legacy export of nn.GELU()
            e = self.node("Erf", [self.node("Div", [x, self.const(f"{name}.sqrt2", math.sqrt(2))], f"{name}.div")],
                          f"{name}.erf")
            bracket = self.node("Add", [e, self.const(f"{name}.one", 1.0)], f"{name}.br")
            return self.node("Mul", [self.node("Mul", [x, bracket], f"{name}.xb"), self.const(f"{name}.half", 0.5)], name)
        # tanh: x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) * 0.5
        cube = self.node("Mul", [x, self.node("Mul", [x, x], f"{name}.x2")], f"{name}.x3")
        inner = self.node("Add", [x, self.node("Mul", [cube, self.const(f"{name}.k", 0.044715)], f"{name}.kx3")],
                          f"{name}.inner")
        t = self.node("Tanh", [self.node("Mul", [inner, self.const(f"{name}.s", math.sqrt(2 / math.pi))],
                                         f"{name}.arg")], f"{name}.tanh")
        bracket = self.node("Add", [self.const(f"{name}.one", 1.0), t], f"{name}.br")
        return self.node("Mul", [self.node("Mul", [x, bracket], f"{name}.xb"), self.const(f"{name}.half", 0.5)], name)


def _attention(net: _Net, x, t, c, heads, name, f):
    """Multi-head self-attention of (N, T, C) tokens."""
    r = net.rng
    hd = c // heads
    fused = r.random() < 0.5
    scale_at = str(r.choice(["mul", "div", "q"]))
    rel_bias = r.random() < 0.3
    f.update({f"attn_{'fused' if fused else 'split'}", f"attn_scale_{scale_at}"})
    if fused:
        qkv = net.linear(x, c, 3 * c, f"{name}.qkv")
        qkv = net.node("Reshape", [qkv, net.const(f"{name}.qkv.shape", [0, t, 3, heads, hd], np.int64)],
                       f"{name}.qkv.heads")
        qkv = net.node("Transpose", [qkv], f"{name}.qkv.perm", perm=[2, 0, 3, 1, 4])
        q, k, v = (net.node("Gather", [qkv, net.const(f"{name}.i{j}", j, np.int64)], f"{name}.{n}", axis=0)
                   for j, n in enumerate("qkv"))
        kt = net.node("Transpose", [k], f"{name}.kT", perm=[0, 1, 3, 2])
    else:
        shape = net.const(f"{name}.heads.shape", [0, t, heads, hd], np.int64)
        q, k, v = (net.node("Reshape", [net.linear(x, c, c, f"{name}.{n}.lin"), shape], f"{name}.{n}.heads")
                   for n in "qkv")
        q = net.node("Transpose", [q], f"{name}.q", perm=[0, 2, 1, 3])
        kt = net.node("Transpose", [k], f"{name}.kT", perm=[0, 2, 3, 1])
        v = net.node("Transpose", [v], f"{name}.v", perm=[0, 2, 1, 3])
    if scale_at == "q":
        q = net.node("Mul", [q, net.const(f"{name}.scale", 1 / math.sqrt(hd))], f"{name}.qs")
    s = net.node("MatMul", [q, kt], f"{name}.scores")
    if scale_at == "mul":
        s = net.node("Mul", [s, net.const(f"{name}.scale", 1 / math.sqrt(hd))], f"{name}.scaled")
    elif scale_at == "div":
        s = net.node("Div", [s, net.const(f"{name}.scale", math.sqrt(hd))], f"{name}.scaled")
    if rel_bias:
        f.add("attn_rel_bias")
        s = net.node("Add", [s, net.const(f"{name}.relbias", r.normal(size=(1, heads, t, t)))], f"{name}.biased")
    a = net.node("Softmax", [s], f"{name}.attn", axis=-1)
    o = net.node("Transpose", [net.node("MatMul", [a, v], f"{name}.av")], f"{name}.av.perm", perm=[0, 2, 1, 3])
    o = net.node("Reshape", [o, net.const(f"{name}.merge.shape", [0, t, c], np.int64)], f"{name}.merge")
    return net.linear(o, c, c, f"{name}.proj")


def _layer_scale(net, x, c, name, f, shape=None):
    if net.rng.random() < 0.5:
        return x
    f.add("layer_scale")
    gamma = net.const(f"{name}.gamma", net.rng.uniform(0.2, 1.0, shape or (c,)))
    return net.node("Mul", [gamma, x] if net.rng.random() < 0.5 else [x, gamma], f"{name}")


def _vit_block(net, x, t, c, heads, name, f, gelu):
    r = net.rng
    h = net.layernorm(x, c, f"{name}.ln1", r.random() < 0.35, f)
    h = _layer_scale(net, _attention(net, h, t, c, heads, f"{name}.attn", f), c, f"{name}.ls1", f)
    x = net.node("Add", [x, h], f"{name}.res1")
    hidden = int(c * r.choice([1, 2, 4]))
    h = net.layernorm(x, c, f"{name}.ln2", r.random() < 0.35, f)
    h = net.gelu(net.linear(h, c, hidden, f"{name}.fc1"), f"{name}.gelu", gelu, f)
    h = _layer_scale(net, net.linear(h, hidden, c, f"{name}.fc2"), c, f"{name}.ls2", f)
    return net.node("Add", [x, h], name)


def _convnext_block(net, x, c, name, f, gelu):
    """x (N, C, H, W) -> x + Transpose(layer scale * MLP(LN(Transpose(dwconv x))))."""
    r = net.rng
    k = int(r.choice([3, 5, 7]))
    h = net.node("Conv", [x, net.weight(f"{name}.dw.w", (c, 1, k, k), k * k), net.bias(f"{name}.dw.b", c)],
                 f"{name}.dw", kernel_shape=[k, k], pads=[k // 2] * 4, group=c)
    h = net.node("Transpose", [h], f"{name}.nhwc", perm=[0, 2, 3, 1])
    ln = net.layernorm(h, c, f"{name}.ln", r.random() < 0.35, f)
    e = int(c * r.choice([2, 4]))
    h = net.gelu(net.linear(ln, c, e, f"{name}.fc1"), f"{name}.gelu", gelu, f)
    h = net.linear(h, e, c, f"{name}.fc2")
    if r.random() < 0.5:   # layer scale channels-last, or after the Transpose on (C, 1, 1)
        h = net.node("Transpose", [_layer_scale(net, h, c, f"{name}.ls", f)], f"{name}.nchw", perm=[0, 3, 1, 2])
    else:
        h = _layer_scale(net, net.node("Transpose", [h], f"{name}.nchw", perm=[0, 3, 1, 2]), c, f"{name}.ls", f,
                         shape=(c, 1, 1))
    f.add("convnext_block")
    return net.node("Add", [x, h], name), ln


def _norm_nchw(net, x, c, name, f):
    h = net.node("Transpose", [x], f"{name}.nhwc", perm=[0, 2, 3, 1])
    h = net.layernorm(h, c, name, net.rng.random() < 0.35, f)
    return net.node("Transpose", [h], f"{name}.nchw", perm=[0, 3, 1, 2])


def _build(seed: int, decompose: bool):
    rng = np.random.default_rng(seed)
    net = _Net(rng, decompose)
    f: set = set()
    body = str(rng.choice(["vit", "vit", "convnext", "hybrid"]))
    f.add(f"body_{body}")
    gelu = str(rng.choice(["erf", "erf", "tanh"]))
    cin = int(rng.integers(1, 5))
    patch = int(rng.choice([2, 3, 4]))
    gh, gw = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    down = body != "vit" and rng.random() < 0.4   # one 2x2 stride-2 downsampling in the ConvNeXt part
    hh, ww = gh * patch * (2 if down else 1), gw * patch * (2 if down else 1)
    if body == "convnext":
        hh, ww = int(rng.integers(5, 13)) * (2 if down else 1), int(rng.integers(5, 13)) * (2 if down else 1)
    in_hw = [hh, ww]
    layers, axes, grids = ["input"], {}, {}
    x, c = "input", cin
    if rng.random() < 0.5:   # a conv stem
        m = int(rng.integers(2, 9))
        x = net.node("Conv", [x, net.weight("stem.w", (m, c, 3, 3), 9 * c), net.bias("stem.b", m)], "stem",
                     kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        if rng.random() < 0.6:
            x = net.node("Relu", [x], "stem.relu")
        layers.append(x)
        c = m
        f.add("stem")
    if body in ("convnext", "hybrid"):
        width = int(rng.integers(2, 9))
        x = net.node("Conv", [x, net.weight("cn.stem.w", (width, c, 1, 1), c), net.bias("cn.stem.b", width)], "cn.stem",
                     kernel_shape=[1, 1])
        c = width
        for i in range(int(rng.integers(1, 4))):
            if down and i == 1 or (down and i == 0 and rng.random() < 0.3):
                x = _norm_nchw(net, x, c, f"down{i}.ln", f)
                c2 = int(rng.integers(2, 9))
                x = net.node("Conv", [x, net.weight(f"down{i}.w", (c2, c, 2, 2), 4 * c), net.bias(f"down{i}.b", c2)],
                             f"down{i}", kernel_shape=[2, 2], strides=[2, 2])
                c, down = c2, False
                hh, ww = hh // 2, ww // 2
                f.add("downsample")
            x, ln = _convnext_block(net, x, c, f"cn{i}", f, gelu)
            layers.append(x)
            if rng.random() < 0.5:
                layers.append(ln)
                axes[ln] = 3
        if down:   # not taken yet: downsample after the blocks
            x = _norm_nchw(net, x, c, "down_last.ln", f)
            x = net.node("Conv", [x, net.weight("down_last.w", (c, c, 2, 2), 4 * c), net.bias("down_last.b", c)],
                         "down_last", kernel_shape=[2, 2], strides=[2, 2])
            hh, ww = hh // 2, ww // 2
            f.add("downsample")
            layers.append(x)
    if body == "convnext":
        if rng.random() < 0.5:
            f.add("head_gap")
            x = _norm_nchw(net, net.node("GlobalAveragePool", [x], "pool"), c, "head.ln", f)
            x = net.node("Flatten", [x], "flat")
        else:
            f.add("head_mean")
            x = net.node("ReduceMean", [x], "pool", axes=[2, 3], keepdims=0)
            x = net.layernorm(x, c, "head.ln", rng.random() < 0.35, f)
        feat = c
    else:
        heads = int(rng.integers(1, 4))
        hd = int(rng.integers(2, 5))
        dim = heads * hd
        p = patch if body == "vit" else 1 if rng.random() < 0.3 else patch
        if body == "hybrid" and p != patch:   # 1x1 patches of the ConvNeXt map
            gh, gw = hh, ww
            f.add("patch_1x1")
        x = net.node("Conv", [x, net.weight("patch.w", (dim, c, p, p), c * p * p), net.bias("patch.b", dim)], "patch",
                     kernel_shape=[p, p], strides=[p, p])
        layers.append(x)
        n_patch = gh * gw
        flat = [0, dim, n_patch] if rng.random() < 0.5 else [0, dim, -1]
        x = net.node("Reshape", [x, net.const("patch.shape", flat, np.int64)], "patch.flat")
        x = net.node("Transpose", [x], "patch.tokens", perm=[0, 2, 1])
        n_cls = int(rng.choice([0, 1, 1, 2]))
        if n_cls:
            f.add(f"cls{n_cls}")
            tok = net.const("cls", rng.normal(size=(1, n_cls, dim)))
            batch = net.node("Slice", [net.node("Shape", [x], "shape"), net.const("s0", [0], np.int64),
                                       net.const("s1", [1], np.int64)], "batch")
            shape = net.node("Concat", [batch, net.const("cls.dims", [n_cls, dim], np.int64)], "cls.shape", axis=0)
            tok = net.node("Expand", [tok, shape], "cls.expand")
            x = net.node("Concat", [tok, x], "concat", axis=1)
        t = n_patch + n_cls
        if rng.random() < 0.8:
            f.add("pos_embed")
            x = net.node("Add", [x, net.const("pos", rng.normal(size=(1, t, dim)) * 0.3)], "tokens")
        if n_cls or rng.random() < 0.5:
            layers.append(x)
        depth = int(rng.integers(1, 4))
        for i in range(depth):
            x = _vit_block(net, x, t, dim, heads, f"block{i}", f, gelu)
            if i == depth - 1 or rng.random() < 0.4:
                layers.append(x)
        for name in layers:
            if name.startswith("block") or name in ("tokens", "concat", "patch.tokens"):
                axes[name] = 2
                if n_cls:
                    grids[name] = n_cls
        if rng.random() < 0.7:
            x = net.layernorm(x, dim, "final.ln", rng.random() < 0.35, f)
        if n_cls and rng.random() < 0.75:
            f.add("head_cls_gather")
            x = net.node("Gather", [x, net.const("cls.idx", 0, np.int64)], "pooled", axis=1)
        else:
            f.add("head_mean")
            x = net.node("ReduceMean", [x], "pooled", axes=[1], keepdims=0)
        feat = dim
    k = int(rng.integers(3, 11))
    x = net.node("Gemm", [x, net.weight("head.w", (k, feat), feat), net.bias("head.b", k)], "logits", transB=1)
    if rng.random() < 0.3:
        x = net.node("Softmax", [x], "prob", axis=-1)
        f.add("softmax")
    graph = helper.make_graph(net.nodes, f"random_transformer_{seed}",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", cin, *in_hw])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", k])], net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, layers, axes, grids, f


def random_transformer(seed: int) -> Case:
    model, layers, axes, grids, f = _build(seed, decompose=True)
    ref_model = _build(seed, decompose=False)[0] if "layernorm_decomposed" in f else model
    return Case(model, ref_model, layers, axes, grids, f)


def input_shape(model) -> tuple:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value for d in dims[1:])
