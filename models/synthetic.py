"""Synthetic models with random weights: reproducible shapes for benchmarks and demos."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VGG16_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16(seed: int = 0, num_classes: int = 1000, size: int = 224) -> onnx.ModelProto:
    """A full-width VGG16-shaped classifier (He-initialised random weights).

    Tensor names: ``conv{b}_{i}`` / ``relu{b}_{i}`` for block b, layer i, ``pool1``..``pool5``,
    ``fc6``, ``fc7``, ``fc8`` (the logits).
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, channels, block, idx = "input", 3, 1, 1
    for v in VGG16_CONFIG:
        if v == "M":
            out = f"pool{block}"
            nodes.append(helper.make_node("MaxPool", [x], [out], name=out, kernel_shape=[2, 2], strides=[2, 2]))
            x, block, idx = out, block + 1, 1
            continue
        w = (rng.standard_normal((v, channels, 3, 3)) * np.sqrt(2.0 / (channels * 9))).astype(np.float32)
        wn, bn = f"conv{block}_{idx}.weight", f"conv{block}_{idx}.bias"
        inits += [numpy_helper.from_array(w, wn), numpy_helper.from_array(np.full(v, 0.01, np.float32), bn)]
        conv, relu = f"conv{block}_{idx}", f"relu{block}_{idx}"
        nodes.append(helper.make_node("Conv", [x, wn, bn], [conv], name=conv, kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [conv], [relu], name=relu))
        x, channels, idx = relu, v, idx + 1
    nodes.append(helper.make_node("Flatten", [x], ["flatten"], name="flatten"))
    x = "flatten"
    side = size // 32
    dims = [512 * side * side, 4096, 4096, num_classes]
    for j in range(3):
        name = f"fc{j + 6}"
        w = (rng.standard_normal((dims[j + 1], dims[j])) * np.sqrt(2.0 / dims[j])).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"{name}.weight"),
                  numpy_helper.from_array(np.zeros(dims[j + 1], np.float32), f"{name}.bias")]
        nodes.append(helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [name], name=name, transB=1))
        x = name
        if j < 2:
            nodes.append(helper.make_node("Relu", [x], [f"relu{j + 6}"], name=f"relu{j + 6}"))
            x = f"relu{j + 6}"
    graph = helper.make_graph(nodes, "vgg16_random",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", num_classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx-excite")
    model.ir_version = 8
    return model




def _he(rng, shape, fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def resnet50(seed: int = 0, num_classes: int = 1000) -> onnx.ModelProto:
    """A ResNet-50-shaped classifier (torchvision v1.5 layout, BatchNorm folded, random weights).

    Tensor names: ``stem`` (after conv1 + ReLU), ``maxpool``, ``layer{i}.{j}`` for the
    output of block j of stage i, ``layer1``..``layer4`` for each stage's output,
    ``pool``, ``logits``. Input ``input`` (N, 3, H, W), H and W free.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, cin, cout, k, stride, name, out, relu=True):
        w = _he(rng, (cout, cin, k, k), cin * k * k)
        if not relu:  # the last conv of a block: small, so the residual sum stays moderate
            w *= 0.2
        inits.extend([numpy_helper.from_array(w, f"{name}.weight"),
                       numpy_helper.from_array(np.full(cout, 0.01, np.float32), f"{name}.bias")])
        y = out if not relu else f"{name}.out"
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [y], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        if relu:
            nodes.append(helper.make_node("Relu", [y], [out], name=f"{out}.relu"))
        return out

    x = conv("input", 3, 64, 7, 2, "conv1", "stem")
    nodes.append(helper.make_node("MaxPool", [x], ["maxpool"], name="maxpool", kernel_shape=[3, 3],
                                  strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "maxpool", 64
    for i, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for j in range(blocks):
            p, stride = f"layer{i}.{j}", (2 if i > 1 and j == 0 else 1)
            h = conv(x, cin, width, 1, 1, f"{p}.conv1", f"{p}.relu1")
            h = conv(h, width, width, 3, stride, f"{p}.conv2", f"{p}.relu2")
            h = conv(h, width, width * 4, 1, 1, f"{p}.conv3", f"{p}.bn3", relu=False)
            skip = x if j > 0 else conv(x, cin, width * 4, 1, stride, f"{p}.downsample", f"{p}.downsample", relu=False)
            nodes.append(helper.make_node("Add", [h, skip], [f"{p}.add"], name=f"{p}.add"))
            out = f"layer{i}" if j == blocks - 1 else p
            nodes.append(helper.make_node("Relu", [f"{p}.add"], [out], name=f"{p}.relu"))
            x, cin = out, width * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flatten"], name="flatten"))
    inits.extend([numpy_helper.from_array(_he(rng, (num_classes, cin), cin), "fc.weight"),
                  numpy_helper.from_array(np.zeros(num_classes, np.float32), "fc.bias")])
    nodes.append(helper.make_node("Gemm", ["flatten", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet50_random",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx-excite")
    model.ir_version = 8
    return model


def mobilenet_v2_state_dict(seed: int = 0, num_classes: int = 1000) -> dict[str, np.ndarray]:
    """Random weights under torchvision's MobileNetV2 state-dict names and shapes."""
    from .mobilenet_v2 import INVERTED_RESIDUAL_SETTING

    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}

    def conv_bn(conv, bn, cout, cin_per_group, k):
        sd[f"{conv}.weight"] = _he(rng, (cout, cin_per_group, k, k), cin_per_group * k * k)
        sd[f"{bn}.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        sd[f"{bn}.bias"] = rng.uniform(-0.1, 0.2, cout).astype(np.float32)
        sd[f"{bn}.running_mean"] = rng.uniform(-0.1, 0.1, cout).astype(np.float32)
        sd[f"{bn}.running_var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        sd[f"{bn}.num_batches_tracked"] = np.asarray(0, np.int64)

    conv_bn("features.0.0", "features.0.1", 32, 3, 3)
    cin, idx = 32, 1
    for t, c, n, _ in INVERTED_RESIDUAL_SETTING:
        for _ in range(n):
            p, hidden, j = f"features.{idx}", cin * t, 0
            if t != 1:
                conv_bn(f"{p}.conv.0.0", f"{p}.conv.0.1", hidden, cin, 1)
                j = 1
            conv_bn(f"{p}.conv.{j}.0", f"{p}.conv.{j}.1", hidden, 1, 3)
            conv_bn(f"{p}.conv.{j + 1}", f"{p}.conv.{j + 2}", c, hidden, 1)
            cin, idx = c, idx + 1
    conv_bn("features.18.0", "features.18.1", 1280, cin, 1)
    sd["classifier.1.weight"] = _he(rng, (num_classes, 1280), 1280)
    sd["classifier.1.bias"] = np.zeros(num_classes, np.float32)
    return sd


def mobilenet_v2(seed: int = 0, num_classes: int = 1000) -> onnx.ModelProto:
    """The default model's MobileNetV2 graph (same names: ``features.0``..``features.18``,
    ``pool``, ``logits``) with random weights; no weights package needed."""
    from .mobilenet_v2 import build_mobilenet_v2

    return build_mobilenet_v2(mobilenet_v2_state_dict(seed, num_classes))


def tiny_cnn(seed: int = 0, num_classes: int = 10) -> onnx.ModelProto:
    """A small conv net for tests: conv1 (8) -> relu -> pool1 -> conv2 (16, stride 2) -> relu ->
    GlobalAveragePool -> fc (``logits``). Input (N, 3, 32, 32)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_he(rng, (8, 3, 3, 3), 27), "conv1.weight"),
             numpy_helper.from_array(_he(rng, (16, 8, 3, 3), 72), "conv2.weight"),
             numpy_helper.from_array(_he(rng, (num_classes, 16), 16), "fc.weight"),
             numpy_helper.from_array(np.zeros(num_classes, np.float32), "fc.bias")]
    nodes = [helper.make_node("Conv", ["input", "conv1.weight"], ["conv1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["pool1", "conv2.weight"], ["conv2"], name="conv2", kernel_shape=[3, 3],
                              pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["relu2"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flatten"], name="flatten"),
             helper.make_node("Gemm", ["flatten", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "tiny_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx-excite")
    model.ir_version = 8
    return model


class _Graph:
    """The node and initializer lists a recipe written without torch appends to, and the small
    builders the transformer recipes share (a constant, an int64 constant, a one-output node,
    a last-axis LayerNorm, a Linear as MatMul + bias with scaled normal weights)."""

    def __init__(self, rng):
        self.rng, self.nodes, self.inits = rng, [], []

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def i64(self, name, values):
        return self.const(name, np.array(values, np.int64))

    def node(self, op, ins, name, **kw):
        self.nodes.append(helper.make_node(op, ins, [name], name=name, **kw))
        return name

    def norm(self, x, c, name, epsilon):
        return self.node("LayerNormalization", [x, self.const(f"{name}.weight", np.ones(c, np.float32)),
                                                self.const(f"{name}.bias", np.zeros(c, np.float32))],
                         name, axis=-1, epsilon=epsilon)

    def linear(self, x, cin, cout, name, bias=True):
        w = self.const(f"{name}.weight", (self.rng.standard_normal((cin, cout)) / np.sqrt(cin)).astype(np.float32))
        y = self.node("MatMul", [x, w], f"{name}.mm" if bias else name)
        return self.node("Add", [y, self.const(f"{name}.bias", np.zeros(cout, np.float32))], name) if bias else y


def vit(seed: int = 0, num_classes: int = 1000, size: int = 224, patch: int = 16, dim: int = 384, depth: int = 12,
        heads: int = 6, mlp: int = 1536) -> onnx.ModelProto:
    """A ViT-S/16-shaped classifier (random weights) as PyTorch's exporter writes one: a patch
    Conv, a class token joined by Concat, a positional Add, ``depth`` pre-norm blocks
    (LayerNormalization, one fused QKV MatMul split into heads, ``Softmax(Q K' / sqrt(d)) V``,
    the erf GELU written out) and the class token's Gemm head.

    Tensor names: ``tokens`` (after the positional Add), ``block{i}`` (block i's output; the
    map layer ``block{depth-2}`` is the last block's input), ``logits``. Input (N, 3, size, size).
    """
    rng = np.random.default_rng(seed)
    grid, hd = size // patch, dim // heads
    t = grid * grid + 1
    g = _Graph(rng)
    nodes, inits, const, node, linear = g.nodes, g.inits, g.const, g.node, g.linear

    def norm(x, name):
        return g.norm(x, dim, name, 1e-6)

    pw = const("patch.weight", _he(rng, (dim, 3, patch, patch), 3 * patch * patch))
    x = node("Conv", ["input", pw], "patch", kernel_shape=[patch, patch], strides=[patch, patch])
    x = node("Reshape", [x, const("patch.shape", np.array([0, dim, grid * grid], np.int64))], "patch.flat")
    x = node("Transpose", [x], "patch.tokens", perm=[0, 2, 1])
    cls = const("cls_token", (rng.standard_normal((1, 1, dim)) * 0.02).astype(np.float32))
    cls = node("Expand", [cls, node("Concat", [node("Slice", [node("Shape", [x], "shape"), const("s0", np.array([0], np.int64)),
                                                              const("s1", np.array([1], np.int64))], "batch"),
                                             const("one_dim", np.array([1, dim], np.int64))], "cls.shape", axis=0)],
               "cls.expand")
    x = node("Concat", [cls, x], "concat", axis=1)
    x = node("Add", [x, const("pos_embed", (rng.standard_normal((1, t, dim)) * 0.02).astype(np.float32))], "tokens")
    heads_shape = const("heads.shape", np.array([0, t, 3, heads, hd], np.int64))
    merge_shape = const("merge.shape", np.array([0, t, dim], np.int64))
    scale = const("attn.scale", np.array(1.0 / np.sqrt(hd), np.float32))
    half, one = const("half", np.array(0.5, np.float32)), const("one", np.array(1.0, np.float32))
    sqrt2 = const("sqrt2", np.array(np.sqrt(2.0), np.float32))
    for i in range(depth):
        b = f"blocks.{i}"
        h = linear(norm(x, f"{b}.norm1"), dim, 3 * dim, f"{b}.qkv")
        h = node("Transpose", [node("Reshape", [h, heads_shape], f"{b}.qkv.heads")], f"{b}.qkv.perm", perm=[2, 0, 3, 1, 4])
        q, k, v = (node("Gather", [h, const(f"{b}.idx{j}", np.array(j, np.int64))], f"{b}.{n}", axis=0)
                   for j, n in enumerate("qkv"))
        s_ = node("Mul", [node("MatMul", [q, node("Transpose", [k], f"{b}.kT", perm=[0, 1, 3, 2])], f"{b}.scores"), scale],
                  f"{b}.scaled")
        a = node("Softmax", [s_], f"{b}.attn", axis=-1)
        o = node("Transpose", [node("MatMul", [a, v], f"{b}.av")], f"{b}.av.perm", perm=[0, 2, 1, 3])
        o = linear(node("Reshape", [o, merge_shape], f"{b}.merge"), dim, dim, f"{b}.proj")
        x = node("Add", [x, o], f"{b}.res1")
        h = linear(norm(x, f"{b}.norm2"), dim, mlp, f"{b}.fc1")
        gelu = node("Mul", [node("Mul", [h, node("Add", [node("Erf", [node("Div", [h, sqrt2], f"{b}.gelu.div")], f"{b}.gelu.erf"),
                                                         one], f"{b}.gelu.add")], f"{b}.gelu.mul"), half], f"{b}.gelu")
        x = node("Add", [x, linear(gelu, mlp, dim, f"{b}.fc2")], f"block{i}")
    x = node("Gather", [norm(x, "norm"), const("cls.idx", np.array(0, np.int64))], "cls", axis=1)
    hw = const("head.weight", (rng.standard_normal((num_classes, dim)) / np.sqrt(dim)).astype(np.float32))
    nodes.append(helper.make_node("Gemm", [x, hw, const("head.bias", np.zeros(num_classes, np.float32))], ["logits"],
                                  name="head", transB=1))
    graph = helper.make_graph(nodes, "vit",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx-excite")
    model.ir_version = 8
    return model


def convnext(seed: int = 0, num_classes: int = 1000, size: int = 224, depths=(3, 3, 9, 3),
             dims=(96, 192, 384, 768)) -> onnx.ModelProto:
    """A ConvNeXt-T-shaped classifier (random weights) as PyTorch's exporter writes one: a 4x4
    stride-4 stem with a channels-first LayerNorm (Transpose, LayerNormalization, Transpose),
    blocks of a 7x7 depthwise Conv, channels-last LayerNorm, Linear 4C, the erf GELU, Linear C,
    layer scale and the residual Add; 2x2 stride-2 downsampling behind a LayerNorm; global pool,
    LayerNorm, Gemm.

    Tensor names: ``stage{s}`` (stage s's output; ``stage3`` is the last feature map, the map
    layer), ``logits``. Input (N, 3, size, size).
    """
    rng = np.random.default_rng(seed)
    g = _Graph(rng)
    nodes, inits, const, node, linear = g.nodes, g.inits, g.const, g.node, g.linear

    def norm(x, c, name):
        return g.norm(x, c, name, 1e-6)

    def norm_nchw(x, c, name):
        x = node("Transpose", [x], f"{name}.nhwc", perm=[0, 2, 3, 1])
        return node("Transpose", [norm(x, c, name)], f"{name}.nchw", perm=[0, 3, 1, 2])

    half, one = const("half", np.array(0.5, np.float32)), const("one", np.array(1.0, np.float32))
    sqrt2 = const("sqrt2", np.array(np.sqrt(2.0), np.float32))
    x = node("Conv", ["input", const("stem.weight", _he(rng, (dims[0], 3, 4, 4), 48)),
                      const("stem.bias", np.zeros(dims[0], np.float32))], "stem", kernel_shape=[4, 4], strides=[4, 4])
    x = norm_nchw(x, dims[0], "stem.norm")
    for s_, (depth, c) in enumerate(zip(depths, dims)):
        if s_ > 0:
            x = norm_nchw(x, dims[s_ - 1], f"down{s_}.norm")
            x = node("Conv", [x, const(f"down{s_}.weight", _he(rng, (c, dims[s_ - 1], 2, 2), 4 * dims[s_ - 1])),
                              const(f"down{s_}.bias", np.zeros(c, np.float32))], f"down{s_}", kernel_shape=[2, 2],
                     strides=[2, 2])
        for b in range(depth):
            n = f"stage{s_}.{b}"
            h = node("Conv", [x, const(f"{n}.dw.weight", _he(rng, (c, 1, 7, 7), 49)),
                              const(f"{n}.dw.bias", np.zeros(c, np.float32))], f"{n}.dw", kernel_shape=[7, 7],
                     pads=[3, 3, 3, 3], group=c)
            h = linear(norm(node("Transpose", [h], f"{n}.nhwc", perm=[0, 2, 3, 1]), c, f"{n}.norm"), c, 4 * c, f"{n}.fc1")
            h = node("Mul", [node("Mul", [h, node("Add", [node("Erf", [node("Div", [h, sqrt2], f"{n}.gelu.div")],
                                                               f"{n}.gelu.erf"), one], f"{n}.gelu.add")],
                                  f"{n}.gelu.mul"), half], f"{n}.gelu")
            h = node("Mul", [linear(h, 4 * c, c, f"{n}.fc2"), const(f"{n}.gamma", np.full(c, 0.5, np.float32))],
                     f"{n}.scale")
            x = node("Add", [x, node("Transpose", [h], f"{n}.nchw", perm=[0, 3, 1, 2])], n)
        x = node("Identity", [x], f"stage{s_}")
    x = node("GlobalAveragePool", [x], "pool")
    x = node("Flatten", [norm_nchw(x, dims[-1], "head.norm")], "flatten")
    hw = const("head.weight", (rng.standard_normal((num_classes, dims[-1])) / np.sqrt(dims[-1])).astype(np.float32))
    nodes.append(helper.make_node("Gemm", [x, hw, const("head.bias", np.zeros(num_classes, np.float32))], ["logits"],
                                  name="head", transB=1))
    graph = helper.make_graph(nodes, "convnext",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx-excite")
    model.ir_version = 8
    return model


def _swin_relative_index(ws: int) -> np.ndarray:
    """(T, T) index into the ((2 ws - 1)^2, heads) relative position bias table (Swin's
    ``relative_position_index``), T = ws * ws."""
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def _swin_mask(h: int, w: int, ws: int, shift: int, value: float) -> np.ndarray:
    """(1, nW, 1, T, T): ``value`` where two tokens of a shifted window come from different
    regions of the rolled map, 0 elsewhere (Swin's attention mask)."""
    img = np.zeros((h, w))
    region = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[hs, wsl] = region
            region += 1
    windows = img.reshape(h // ws, ws, w // ws, ws).transpose(0, 2, 1, 3).reshape(-1, ws * ws)
    mask = np.where(windows[:, None, :] != windows[:, :, None], value, 0.0)
    return mask[None, :, None].astype(np.float32)


def swin(seed: int = 0, num_classes: int = 1000, size: int = 224, patch: int = 4, dim: int = 96, depths=(2, 2, 6, 2),
         heads=(3, 6, 12, 24), window: int = 7, mlp_ratio: int = 4, mask_value: float = -100.0) -> onnx.ModelProto:
    """A Swin-T-shaped classifier (random weights) as torchvision's model exports: a ``patch`` x
    ``patch`` stride-``patch`` Conv, channels-last (N, H, W, C) with a LayerNorm; stages of
    pre-norm blocks of window attention (the map cut into ``window`` x ``window`` windows by
    Reshape / Transpose, one fused QKV MatMul split into heads, Q scaled, ``Q K'`` plus the
    relative position bias (a constant), every second block with windows shifted by half a
    window: the map rolled by Slice + Concat, the shifted-window mask (``mask_value`` between
    regions) added to the logits, rolled back), an MLP with the erf GELU; patch merging between
    stages (four strided Slices, Concat, LayerNorm, Linear without bias); final LayerNorm,
    global pool, Gemm. Where a window covers the whole map, its blocks do not shift.

    Tensor names: ``stem`` (after the first norm), ``stage{s}`` (stage s's output), ``merge{s}``
    (stage s's input, after the patch merging; ``merge3`` is the last stage's input, the map
    layer), ``features`` (NCHW after the final norm), ``logits``. Input (N, 3, size, size).
    """
    rng = np.random.default_rng(seed)
    g = _Graph(rng)
    nodes, inits, const, i64, node, linear = g.nodes, g.inits, g.const, g.i64, g.node, g.linear

    def norm(x, c, name):
        return g.norm(x, c, name, 1e-5)

    def roll(x, shift, hw, name):
        """torch.roll(x, (shift, shift), dims=(1, 2)) as the exporter writes it: Slice + Concat per axis."""
        for axis in (1, 2):
            cut = (-shift) % hw
            a = node("Slice", [x, i64(f"{name}.{axis}.s0", [cut]), i64(f"{name}.{axis}.e0", [hw]),
                               i64(f"{name}.{axis}.ax", [axis])], f"{name}.{axis}.tail")
            b = node("Slice", [x, i64(f"{name}.{axis}.s1", [0]), i64(f"{name}.{axis}.e1", [cut]),
                               i64(f"{name}.{axis}.ax1", [axis])], f"{name}.{axis}.head")
            x = node("Concat", [a, b], f"{name}.{axis}", axis=axis)
        return x

    half, one = const("half", np.array(0.5, np.float32)), const("one", np.array(1.0, np.float32))
    sqrt2 = const("sqrt2", np.array(np.sqrt(2.0), np.float32))
    side = size // patch
    x = node("Conv", ["input", const("patch.weight", _he(rng, (dim, 3, patch, patch), 3 * patch * patch)),
                      const("patch.bias", np.zeros(dim, np.float32))], "patch", kernel_shape=[patch, patch],
             strides=[patch, patch])
    x = norm(node("Transpose", [x], "patch.nhwc", perm=[0, 2, 3, 1]), dim, "stem")
    c = dim
    for s_, (depth, nh) in enumerate(zip(depths, heads)):
        if s_ > 0:   # patch merging: (N, H, W, C) -> (N, H/2, W/2, 2C)
            parts = [node("Slice", [x, i64(f"merge{s_}.s{j}", [dy, dx]), i64(f"merge{s_}.e{j}", [side, side]),
                                    i64(f"merge{s_}.ax{j}", [1, 2]), i64(f"merge{s_}.st{j}", [2, 2])], f"merge{s_}.x{j}")
                     for j, (dy, dx) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)])]
            x = norm(node("Concat", parts, f"merge{s_}.cat", axis=-1), 4 * c, f"merge{s_}.norm")
            x = linear(x, 4 * c, 2 * c, f"merge{s_}", bias=False)
            c, side = 2 * c, side // 2
        ws = min(window, side)
        if side % ws:
            raise ValueError(f"stage {s_}: a {side}x{side} map is not cut into {ws}x{ws} windows")
        tw, hd, nw = ws * ws, c // nh, (side // ws) ** 2
        rel_index = _swin_relative_index(ws)
        table = (rng.standard_normal(((2 * ws - 1) ** 2, nh)) * 0.02).astype(np.float32)
        for b in range(depth):
            n = f"stage{s_}.{b}"
            shift = ws // 2 if b % 2 == 1 and ws < side else 0
            h = norm(x, c, f"{n}.norm1")
            if shift:
                h = roll(h, -shift, side, f"{n}.roll")
            h = node("Reshape", [h, i64(f"{n}.win.shape", [-1, side // ws, ws, side // ws, ws, c])], f"{n}.win")
            h = node("Transpose", [h], f"{n}.win.perm", perm=[0, 1, 3, 2, 4, 5])
            h = node("Reshape", [h, i64(f"{n}.tokens.shape", [-1, tw, c])], f"{n}.tokens")
            qkv = linear(h, c, 3 * c, f"{n}.qkv")
            qkv = node("Transpose", [node("Reshape", [qkv, i64(f"{n}.qkv.shape", [-1, tw, 3, nh, hd])], f"{n}.qkv.heads")],
                       f"{n}.qkv.perm", perm=[2, 0, 3, 1, 4])
            q, k, v = (node("Gather", [qkv, i64(f"{n}.idx{j}", j)], f"{n}.{m}", axis=0) for j, m in enumerate("qkv"))
            q = node("Mul", [q, const(f"{n}.scale", np.array(hd ** -0.5, np.float32))], f"{n}.q.scaled")
            logits = node("MatMul", [q, node("Transpose", [k], f"{n}.kT", perm=[0, 1, 3, 2])], f"{n}.scores")
            # the bias table's entries laid out per head and token pair: a constant added to the logits
            bias = table[rel_index.reshape(-1)].reshape(tw, tw, nh).transpose(2, 0, 1)[None]
            logits = node("Add", [logits, const(f"{n}.rel_bias", bias)], f"{n}.biased")
            if shift:
                logits = node("Reshape", [logits, i64(f"{n}.mask.in", [-1, nw, nh, tw, tw])], f"{n}.by_window")
                logits = node("Add", [logits, const(f"{n}.mask", _swin_mask(side, side, ws, shift, mask_value))],
                              f"{n}.masked")
                logits = node("Reshape", [logits, i64(f"{n}.mask.out", [-1, nh, tw, tw])], f"{n}.masked.flat")
            a = node("Softmax", [logits], f"{n}.attn", axis=-1)
            o = node("Transpose", [node("MatMul", [a, v], f"{n}.av")], f"{n}.av.perm", perm=[0, 2, 1, 3])
            o = linear(node("Reshape", [o, i64(f"{n}.merge.shape", [-1, tw, c])], f"{n}.heads_merged"), c, c,
                       f"{n}.proj")
            o = node("Reshape", [o, i64(f"{n}.unwin.shape", [-1, side // ws, side // ws, ws, ws, c])], f"{n}.unwin")
            o = node("Transpose", [o], f"{n}.unwin.perm", perm=[0, 1, 3, 2, 4, 5])
            o = node("Reshape", [o, i64(f"{n}.map.shape", [-1, side, side, c])], f"{n}.map")
            if shift:
                o = roll(o, shift, side, f"{n}.unroll")
            x = node("Add", [x, o], f"{n}.res1")
            h = linear(norm(x, c, f"{n}.norm2"), c, mlp_ratio * c, f"{n}.fc1")
            h = node("Mul", [node("Mul", [h, node("Add", [node("Erf", [node("Div", [h, sqrt2], f"{n}.gelu.div")],
                                                               f"{n}.gelu.erf"), one], f"{n}.gelu.add")],
                                  f"{n}.gelu.mul"), half], f"{n}.gelu")
            x = node("Add", [x, linear(h, mlp_ratio * c, c, f"{n}.fc2")], n)
        x = node("Identity", [x], f"stage{s_}")
    x = node("Transpose", [norm(x, c, "head.norm")], "features", perm=[0, 3, 1, 2])
    x = node("Flatten", [node("GlobalAveragePool", [x], "pool")], "flatten")
    hw = const("head.weight", (rng.standard_normal((num_classes, c)) / np.sqrt(c)).astype(np.float32))
    nodes.append(helper.make_node("Gemm", [x, hw, const("head.bias", np.zeros(num_classes, np.float32))], ["logits"],
                                  name="head", transB=1))
    graph = helper.make_graph(nodes, "swin",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx-excite")
    model.ir_version = 8
    return model


RECIPES = {"vgg16-random": vgg16, "resnet50-random": resnet50, "mobilenetv2-random": mobilenet_v2,
           "tiny-cnn": tiny_cnn, "vit-s16-random": vit,
           "convnext-t-random": convnext, "swin-t-random": swin}
#: each recipe's map layer when none is given (the issue's benchmark shapes)
RECIPE_LAYERS = {"vgg16-random": ["pool4"], "resnet50-random": ["layer3"], "mobilenetv2-random": ["features.13"],
                 "tiny-cnn": ["pool1"], "vit-s16-random": ["block10"],
                 "convnext-t-random": ["stage3"], "swin-t-random": ["merge3"]}
