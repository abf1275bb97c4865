"""Real-architecture building blocks vs the numpy reference: residual + BatchNorm (folded and
unfolded), MobileNetV2 inverted residual (depthwise, ReLU6, linear bottleneck), SE gate,
SiLU, Concat."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from excitation_ref import Reference
from onnx_excite import Exciter
from onnx_excite.graph.canonicalize import canonicalize
from onnx_excite.graph.index import GraphIndex


class G:
    """A tiny graph-building helper for tests."""

    def __init__(self, seed, c=4, hw=(10, 9)):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0
        self.c, self.hw = c, hw

    def t(self, base):
        self.n += 1
        return f"{base}{self.n}"

    def init(self, arr, base="w"):
        name = self.t(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def op(self, op, inputs, base=None, **attrs):
        out = self.t(base or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n_{out}", **attrs))
        return out

    def conv(self, x, cin, cout, k=3, group=1, stride=1, bias=True):
        w = self.init(self.rng.normal(size=(cout, cin // group, k, k)) / np.sqrt(cin // group * k * k))
        ins = [x, w] + ([self.init(self.rng.normal(size=cout) * 0.1, "b")] if bias else [])
        return self.op("Conv", ins, "conv", kernel_shape=[k, k], pads=[k // 2] * 4, group=group, strides=[stride, stride])

    def bn(self, x, c):
        r = self.rng
        params = [self.init(r.uniform(-1.5, 1.5, c), "gamma"), self.init(r.normal(size=c) * 0.1, "beta"),
                  self.init(r.normal(size=c) * 0.1, "mean"), self.init(r.uniform(0.5, 2, c), "var")]
        return self.op("BatchNormalization", [x] + params, "bn", epsilon=1e-5)

    def relu6(self, x):
        return self.op("Clip", [x, self.init(0.0, "lo"), self.init(6.0, "hi")], "relu6")

    def head(self, x, c, k=6):
        g = self.op("GlobalAveragePool", [x], "gap")
        f = self.op("Flatten", [g], "flat")
        return self.op("Gemm", [f, self.init(self.rng.normal(size=(k, c)) / np.sqrt(c))], "logits", transB=1)

    def model(self, out):
        graph = helper.make_graph(self.nodes, "blocks",
                                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", self.c, *self.hw])],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", None])], self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def resnet_block(seed):
    g = G(seed)
    stem = g.op("Relu", [g.bn(g.conv("input", 4, 8, bias=False), 8)])
    y = g.op("Relu", [g.bn(g.conv(stem, 8, 8, bias=False), 8)])
    y = g.bn(g.conv(y, 8, 8, bias=False), 8)
    s = g.op("Add", [y, stem], "sum")
    s = g.bn(s, 8)                     # a BatchNorm after an Add: not foldable, its own rule
    out = g.op("Relu", [s])
    return g.model(g.head(out, 8)), ["input", stem, s, out]


def mobilenet_block(seed):
    g = G(seed)
    x = g.relu6(g.bn(g.conv("input", 4, 8, stride=2), 8))
    e = g.relu6(g.bn(g.conv(x, 8, 24, k=1), 24))
    d = g.relu6(g.bn(g.conv(e, 24, 24, k=3, group=24), 24))
    p = g.bn(g.conv(d, 24, 8, k=1), 8)                 # linear bottleneck: signed
    s = g.op("Add", [x, p], "res")                     # residual of a signed branch
    top = g.relu6(g.bn(g.conv(s, 8, 16, k=1), 16))
    return g.model(g.head(top, 16)), ["input", x, e, d, s, top]


def resnet_v1_blocks(seed):
    """Two torchvision-style blocks, ``Relu(identity + conv branch)``, summands in either
    order; the first block's output goes through a MaxPool, which routes P to units where
    the sum was <= 0 (windows of zeros), then a downsample block (both summands convs)."""
    g = G(seed)
    stem = g.op("Relu", [g.bn(g.conv("input", 4, 8, bias=False), 8)])
    y = g.bn(g.conv(g.op("Relu", [g.bn(g.conv(stem, 8, 8, bias=False), 8)]), 8, 8, bias=False), 8)
    out1 = g.op("Relu", [g.op("Add", [stem, y], "sum")])
    pooled = g.op("MaxPool", [out1], "pool", kernel_shape=[2, 2], strides=[1, 1])
    y2 = g.bn(g.conv(g.op("Relu", [g.conv(pooled, 8, 8)]), 8, 8), 8)
    out2 = g.op("Relu", [g.op("Add", [y2, pooled], "sum")])
    down = g.conv(out2, 8, 12, k=1, stride=2)
    y3 = g.conv(g.op("Relu", [g.conv(out2, 8, 12, stride=2)]), 12, 12)
    out3 = g.op("Relu", [g.op("Add", [y3, down], "sum")])
    return g.model(g.head(out3, 12)), ["input", stem, out1, pooled, out2, out3]


BLOCKS = {"resnet": resnet_block, "mobilenet_v2": mobilenet_block, "se_silu_concat": lambda seed: se_silu_concat(seed),
          "resnet_v1": resnet_v1_blocks}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_block_matches_reference(block, seed):
    model, layers = BLOCKS[block](seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 4, 10, 9)).astype(np.float32)
    ex = Exciter(model, layers, methods=("mwp", "cmwp"))
    signal = rng.random((2, 6)).astype(np.float32)
    res = ex.explain(x, signal)
    ref = Reference(model)
    np.testing.assert_allclose(res.logits, ref.forward(x)[ref.entry()], rtol=1e-4, atol=1e-5)
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, signal, layers, contrastive=contrastive)
        for layer in layers:
            got, exp = res.maps[method][layer], want["map"][layer]
            scale = max(np.abs(exp).max(), np.abs(want["P"][layer]).max())
            assert np.abs(got - exp).max() <= 1e-4 * scale, (block, layer, method)


@pytest.mark.parametrize("rule", ["positive", "paper"])
def test_rectified_residual_sum_reads_only_the_block_output(rule):
    """`Relu(identity + conv)` with the identity >= 0: the positive split takes x_o + x+ =
    Max(out, x_o) and x+ from the block output, never the conv branch's own output (which
    ONNX Runtime fuses with the Add and the Relu); exact against the float64 reference,
    units with a sum <= 0 included (the MaxPool routes P there). The downsample block
    (two signed summands) and the paper rule still read both summands."""
    model, layers = resnet_v1_blocks(3)
    graph = canonicalize(model)
    sums = [n for n in graph.nodes if n.op_type == "Add"]
    ex = Exciter(model, layers, methods=("mwp", "cmwp"), rule=rule)
    built = GraphIndex(ex.built.model.graph)
    branch = [[i for i in n.input if graph.producer[i].op_type == "Conv"] for n in sums]
    read = [any(built.consumer_count(i) > 1 for i in ins) for ins in branch]
    assert read == ([False, False, True] if rule == "positive" else [True, True, True]), read
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 10, 9)).astype(np.float32)
    signal = rng.random((2, 6)).astype(np.float32)
    res = ex.explain(x, signal)
    ref = Reference(model)
    fwd = ref.forward(x)
    assert (fwd[sums[0].output[0]] <= 0).mean() > 0.2       # units the Max(out, x_o) form must get right
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, signal, layers, rule=rule, contrastive=contrastive)
        for layer in layers:
            got, exp = res.maps[method][layer], want["map"][layer]
            scale = max(np.abs(exp).max(), np.abs(want["P"][layer]).max())
            assert np.abs(got - exp).max() <= 1e-4 * scale, (layer, method)


def se_silu_concat(seed):
    g = G(seed)
    a = g.op("Relu", [g.conv("input", 4, 6)])
    b = g.conv("input", 4, 5, k=1)
    b = g.op("Mul", [b, g.op("Sigmoid", [b])], "silu")
    cat = g.op("Concat", [a, b], "cat", axis=1)
    sq = g.op("Flatten", [g.op("GlobalAveragePool", [cat], "sq")])
    ex = g.op("Relu", [g.op("Gemm", [sq, g.init(g.rng.normal(size=(3, 11)))], "fc1", transB=1)])
    gate = g.op("Sigmoid", [g.op("Gemm", [ex, g.init(g.rng.normal(size=(11, 3)))], "fc2", transB=1)])
    axes = g.t("axes")
    g.inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), axes))
    gate = g.op("Unsqueeze", [gate, axes], "gate4d")
    se = g.op("Mul", [cat, gate], "se")
    se_c = g.op("Relu", [g.conv(se, 11, 7)])
    return g.model(g.head(se_c, 7)), ["input", a, b, cat, se, se_c]


def test_batchnorm_after_conv_is_folded():
    model, _ = resnet_block(0)
    graph = canonicalize(model)
    ops = [n.op_type for n in graph.nodes]
    assert ops.count("BatchNormalization") == 1   # only the one after the Add remains
    x = np.random.default_rng(0).normal(size=(1, 4, 10, 9)).astype(np.float32)
    np.testing.assert_allclose(Exciter(model, ["input"]).logits(x), Reference(model).forward(x)[Reference(model).entry()], rtol=1e-4, atol=1e-5)


def squeezenet_fire(seed):
    g = G(seed)
    x = g.op("Relu", [g.conv("input", 4, 8, stride=2)])
    x = g.op("MaxPool", [x], "pool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    sq = g.op("Relu", [g.conv(x, 8, 4, k=1)], "squeeze")
    e1 = g.op("Relu", [g.conv(sq, 4, 6, k=1)], "expand1x1")
    e3 = g.op("Relu", [g.conv(sq, 4, 6, k=3)], "expand3x3")
    fire = g.op("Concat", [e1, e3], "fire", axis=1)
    cls = g.op("Relu", [g.conv(fire, 12, 6, k=1)], "conv10")       # SqueezeNet's conv classifier
    out = g.op("Flatten", [g.op("GlobalAveragePool", [cls], "gap")], "logits")
    return g.model(out), ["input", x, sq, fire, cls]


def densenet_block(seed):
    g = G(seed)
    x0 = g.op("Relu", [g.conv("input", 4, 6)])
    h1 = g.conv(g.op("Relu", [g.bn(x0, 6)]), 6, 3, bias=False)      # pre-activation BN-ReLU-conv
    x1 = g.op("Concat", [x0, h1], "dense", axis=1)
    h2 = g.conv(g.op("Relu", [g.bn(x1, 9)]), 9, 3, bias=False)
    x2 = g.op("Concat", [x1, h2], "dense", axis=1)
    t = g.op("AveragePool", [g.conv(x2, 12, 8, k=1)], "transition", kernel_shape=[2, 2], strides=[2, 2])
    return g.model(g.head(g.op("Relu", [t]), 8)), ["input", x0, x1, x2, t]


def inception_lrn(seed):
    g = G(seed)
    x = g.op("Relu", [g.conv("input", 4, 8)])
    x = g.op("LRN", [x], "lrn", size=5, alpha=1e-4, beta=0.75, bias=1.0)
    b1 = g.op("Relu", [g.conv(x, 8, 4, k=1)])
    b2 = g.op("Relu", [g.conv(g.op("Relu", [g.conv(x, 8, 3, k=1)]), 3, 5, k=3)])
    b3 = g.op("Relu", [g.conv(g.op("MaxPool", [x], "pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 8, 3, k=1)])
    cat = g.op("Concat", [b1, b2, b3], "inception", axis=1)
    return g.model(g.head(cat, 12)), ["input", x, b2, cat]


def tf_nhwc(seed):
    """Keras/tf2onnx style: NHWC input, Transpose to NCHW, explicit Pad (SAME), Transpose back
    before a Reshape flatten and a MatMul + Add dense layer."""
    g = G(seed, c=4, hw=(9, 9))
    nchw = g.op("Transpose", ["input"], "to_nchw", perm=[0, 3, 1, 2])
    padded = g.op("Pad", [nchw, g.init(np.array([0, 0, 0, 1, 0, 0, 1, 0]), "pads")], "pad")
    c1 = g.op("Relu", [g.op("Conv", [padded, g.init(g.rng.normal(size=(6, 4, 2, 2)) / 4)], "conv", strides=[2, 2])])
    nhwc = g.op("Transpose", [c1], "to_nhwc", perm=[0, 2, 3, 1])
    flat = g.op("Reshape", [nhwc, g.init(np.array([-1, 5 * 5 * 6]), "shape")], "flatten")
    mm = g.op("MatMul", [flat, g.init(g.rng.normal(size=(150, 6)) / 12)], "dense")
    out = g.op("Add", [mm, g.init(g.rng.normal(size=6) * 0.1, "bias")], "logits")
    graph = helper.make_graph(g.nodes, "nhwc", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 9, 9, 4])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 6])], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    for t in m.graph.initializer:   # integer constants
        if t.name.startswith(("pads", "shape")):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int64), t.name))
    onnx.checker.check_model(m, full_check=True)
    return m, ["input", padded, c1, nhwc]


def activations_reducemean(seed):
    """Non-ReLU activations (LeakyRelu, HardSwish, Tanh) and a ReduceMean global pool (how newer
    PyTorch exporters write it), keepdims=0, axes as an input (opset 18)."""
    g = G(seed)
    a = g.op("LeakyRelu", [g.conv("input", 4, 6)], "leaky", alpha=0.1)
    b = g.op("HardSwish", [g.conv(a, 6, 6, k=1)], "hswish")
    c = g.op("Tanh", [g.conv(b, 6, 5, k=3)], "tanh")
    axes = g.t("axes")
    g.inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), axes))
    pooled = g.op("ReduceMean", [c, axes], "mean", keepdims=0)
    out = g.op("Gemm", [pooled, g.init(g.rng.normal(size=(6, 5)))], "logits", transB=1)
    graph = helper.make_graph(g.nodes, "acts", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 10, 9])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 6])], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m, ["input", a, b, c]


#: per architecture, the layers that are NHWC (channels at axis 3): their maps sum over axis 3
NHWC_LAYERS = {"tf_nhwc": lambda layer: layer == "input" or layer.startswith("to_nhwc")}

ZOO = {"activations_reducemean": activations_reducemean, "squeezenet_fire": squeezenet_fire, "densenet": densenet_block, "inception_lrn": inception_lrn, "tf_nhwc": tf_nhwc}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("arch", sorted(ZOO))
def test_zoo_matches_reference(arch, seed):
    model, layers = ZOO[arch](seed)
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = rng.normal(size=(2, *shape)).astype(np.float32)
    ex = Exciter(model, layers, methods=("mwp", "cmwp"))
    signal = rng.random((2, ex.num_classes)).astype(np.float32)
    res = ex.explain(x, signal)
    ref = Reference(model)
    nhwc = NHWC_LAYERS.get(arch, lambda layer: False)
    axes = {layer: 3 for layer in layers if nhwc(layer)}
    plain = ref.run(x, signal, layers, channel_axes=axes)
    np.testing.assert_allclose(res.logits, plain["logits"], rtol=1e-4, atol=1e-5)
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, signal, layers, contrastive=contrastive, channel_axes=axes) if contrastive else plain
        for layer in layers:
            got, exp = res.maps[method][layer], want["map"][layer]
            scale = max(np.abs(exp).max(), np.abs(plain["P"][layer]).max())
            assert np.abs(got - exp).max() <= 1e-4 * scale, (arch, layer, method)


@pytest.mark.parametrize("arch", ["resnet", "densenet", "squeezenet_fire"])
def test_conservation_through_residual_and_concat(arch):
    """Bias-free, non-negative input, signal on classes with a positive logit: the total P at
    a layer that every path crosses equals the signal's sum."""
    model, layers = (BLOCKS | ZOO)[arch](0)
    for t in model.graph.initializer:   # remove every bias / BN shift; BN scales positive
        if t.name.startswith(("b", "beta", "mean")):
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
        if t.name.startswith("gamma"):
            # a negative scale after a residual sum sends P to units whose summands are all
            # negative: the positive rule drops that share (Z = 0), as it should
            t.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(t)), t.name))
    x = np.abs(np.random.default_rng(1).normal(size=(2, 4, 10, 9))).astype(np.float32)
    ex = Exciter(model, ["input"], methods=("mwp",), channels=True)
    logits = ex.logits(x)
    signal = (logits > 0).astype(np.float32)
    res = ex.explain(x, signal)
    np.testing.assert_allclose(res.channels["mwp"]["input"].reshape(2, -1).sum(1), signal.sum(1), rtol=1e-4)
