"""Random small ONNX CNNs built with onnx.helper (opset 17), for tests against the reference."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


class _Net:
    def __init__(self, rng):
        self.rng = rng
        self.nodes, self.inits, self.layers = [], [], []
        self.count = 0

    def name(self, base):
        self.count += 1
        return f"{base}{self.count}"

    def weight(self, shape, base, scale=1.0):
        name = self.name(base)
        w = self.rng.normal(size=shape) * scale / np.sqrt(max(1, int(np.prod(shape[1:]))))
        self.inits.append(numpy_helper.from_array(w.astype(np.float32), name))
        return name

    def node(self, op, inputs, base, **attrs):
        out = self.name(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out


def _conv_out(size, k, s, d, pb, pe):
    return (size + pb + pe - (k - 1) * d - 1) // s + 1


def random_cnn(seed: int, bias: bool = True, signed: bool = False, softmax: bool | None = None, groups: bool = True):
    """(model, layers): a random conv/pool stack with a Gemm/MatMul head.

    ``signed`` leaves some convs without a following ReLU, so later layers see
    negative inputs. ``layers`` are good candidate map layers, input included.
    """
    rng = np.random.default_rng(seed)
    net = _Net(rng)
    c = int(rng.integers(1, 5))
    h, w = int(rng.integers(8, 20)), int(rng.integers(8, 20))
    x = "input"
    net.layers.append(x)
    shape = [c, h, w]
    for _ in range(int(rng.integers(2, 5))):
        kind = rng.choice(["conv", "conv", "maxpool", "avgpool"])
        c, h, w = shape
        if kind == "conv":
            k = int(rng.choice([1, 3, 5]))
            s = int(rng.choice([1, 2]))
            d = int(rng.choice([1, 1, 2])) if k > 1 else 1
            pads = [int(v) for v in rng.integers(0, k // 2 + 2, size=4)] if k > 1 else [0, 0, 0, 0]
            g = 1
            m = int(rng.integers(2, 9))
            if groups and c > 1 and rng.random() < 0.3:
                g = c
                m = c * int(rng.integers(1, 3))
            ho, wo = _conv_out(h, k, s, d, pads[0], pads[2]), _conv_out(w, k, s, d, pads[1], pads[3])
            if ho < 2 or wo < 2:
                continue
            ins = [x, net.weight((m, c // g, k, k), "W")]
            if bias:
                b = net.name("b")
                net.inits.append(numpy_helper.from_array((rng.normal(size=m) * 0.1).astype(np.float32), b))
                ins.append(b)
            x = net.node("Conv", ins, "conv", kernel_shape=[k, k], strides=[s, s], dilations=[d, d], pads=pads, group=g)
            net.layers.append(x)
            if not (signed and rng.random() < 0.5):
                x = net.node("Relu", [x], "relu")
                net.layers.append(x)
            shape = _infer(net, x, seed)
        else:
            k = int(rng.choice([2, 3]))
            s = int(rng.choice([1, 2]))
            p = int(rng.integers(0, k // 2 + 1))
            pads = [p, p, int(rng.integers(0, p + 1)), p]
            ceil = int(rng.integers(0, 2))
            if ceil and any(-(-(n + pads[i] + pads[i + 2] - k) // s) * s >= n + pads[i] for i, n in enumerate((h, w))):
                ceil = 0  # onnx shape inference and ORT disagree on this window (see canonicalize)
            ho, wo = _conv_out(h, k, s, 1, pads[0], pads[2]), _conv_out(w, k, s, 1, pads[1], pads[3])
            if ho < 2 or wo < 2:
                continue
            attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=pads, ceil_mode=ceil)
            if kind == "maxpool":
                x = net.node("MaxPool", [x], "maxpool", **attrs)
            else:
                x = net.node("AveragePool", [x], "avgpool", count_include_pad=int(rng.integers(0, 2)), **attrs)
            net.layers.append(x)
            shape = _infer(net, x, seed)
        if rng.random() < 0.15:
            x = net.node(str(rng.choice(["Identity", "Dropout"])), [x], "pass")
    c, h, w = shape
    k_classes = int(rng.integers(3, 11))
    head = rng.choice(["flatten_gemm", "gap_gemm", "flatten_matmul"])
    if head == "gap_gemm":
        x = net.node("GlobalAveragePool", [x], "gap")
        net.layers.append(x)
        feat = c
    else:
        feat = c * h * w
    x = net.node("Flatten", [x], "flatten")
    if rng.random() < 0.4:
        hidden = int(rng.integers(4, 12))
        ins = [x, net.weight((hidden, feat), "W")] + ([_bias(net, rng, hidden)] if bias else [])
        x = net.node("Gemm", ins, "fc", transB=1)
        x = net.node("Relu", [x], "relu")
        net.layers.append(x)
        feat = hidden
    if head == "flatten_matmul":
        x = net.node("MatMul", [x, net.weight((feat, k_classes), "W")], "matmul")
        if bias:
            x = net.node("Add", [x, _bias(net, rng, k_classes)], "logits")
    else:
        trans_b = int(rng.integers(0, 2))
        wshape = (k_classes, feat) if trans_b else (feat, k_classes)
        wname = net.weight(wshape, "W")
        alpha = float(rng.choice([1.0, 0.5, 2.0]))
        ins = [x, wname] + ([_bias(net, rng, k_classes)] if bias else [])
        x = net.node("Gemm", ins, "gemm", transB=trans_b, alpha=alpha, beta=float(rng.choice([1.0, 0.5])))
    softmax = bool(rng.integers(0, 2)) if softmax is None else softmax
    if softmax:
        x = net.node("Softmax", [x], "softmax", axis=-1)
    return _finish(net, x, seed=seed), net.layers


def _bias(net, rng, n):
    b = net.name("bias")
    net.inits.append(numpy_helper.from_array((rng.normal(size=n) * 0.1).astype(np.float32), b))
    return b


def _finish(net, out, seed=0, rank=2):
    c, h, w = _input_shape(seed)
    graph = helper.make_graph(net.nodes, "random_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, h, w])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N"] + [None] * (rank - 1))], net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _input_shape(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 5))
    h, w = int(rng.integers(8, 20)), int(rng.integers(8, 20))
    return c, h, w


def _infer(net, x, seed):
    """The real (ONNX Runtime) shape of ``x``: onnx's shape inference keeps ceil-mode
    windows that start in the right padding, ORT drops them."""
    import onnxruntime as ort

    model = _finish(net, x, seed=seed, rank=4)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": np.zeros((1,) + _input_shape(seed), np.float32)})[0]
    return list(y.shape[1:])


def input_shape(model) -> tuple:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value for d in dims[1:])
