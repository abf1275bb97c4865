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


def resnet50(seed: int = 0, num_classes: int = 1000, size: int = 224) -> onnx.ModelProto:
    """A ResNet-50-shaped classifier (bottleneck blocks 3-4-6-3, BatchNorm folded into the
    convs, He-initialised random weights): the benchmark's second architecture.

    Tensor names: ``stem`` (after conv1+ReLU), ``pool1``, ``layer{s}.{b}`` (the output of
    block b of stage s, after the residual ReLU), ``gap``, ``fc`` (the logits).
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, cin, cout, k, stride, name, relu=True):
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.weight"),
                      numpy_helper.from_array(np.full(cout, 0.01, np.float32), f"{name}.bias")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [name], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    x = conv("input", 3, 64, 7, 2, "conv1")
    nodes.append(helper.make_node("Identity", [x], ["stem"], name="stem"))
    nodes.append(helper.make_node("MaxPool", ["stem"], ["pool1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1]))
    x, cin = "pool1", 64
    for s, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            stride = 2 if b == 0 and s > 1 else 1
            p = f"layer{s}.{b}"
            y = conv(x, cin, width, 1, 1, f"{p}.conv1")
            y = conv(y, width, width, 3, stride, f"{p}.conv2")
            y = conv(y, width, width * 4, 1, 1, f"{p}.conv3", relu=False)
            skip = conv(x, cin, width * 4, 1, stride, f"{p}.downsample", relu=False) if b == 0 else x
            nodes.append(helper.make_node("Add", [y, skip], [f"{p}.sum"], name=f"{p}.sum"))
            nodes.append(helper.make_node("Relu", [f"{p}.sum"], [p], name=p))
            x, cin = p, width * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flatten"], name="flatten"))
    w = (rng.standard_normal((num_classes, cin)) * np.sqrt(1.0 / cin)).astype(np.float32)
    inits.extend([numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(np.zeros(num_classes, np.float32), "fc.bias")])
    nodes.append(helper.make_node("Gemm", ["flatten", "fc.weight", "fc.bias"], ["fc"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet50_random",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("fc", TensorProto.FLOAT, ["N", num_classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx-excite")
    model.ir_version = 8
    return model


RECIPES = {"vgg16-random": vgg16, "resnet50-random": resnet50}
