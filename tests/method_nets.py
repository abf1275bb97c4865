"""Small ONNX nets for the attention-method tests: netgen variants and a Concat net."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import netgen


def concat_net(seed):
    """Two conv branches of the input (3x3 + ReLU, and a signed 1x1), Concat, MaxPool, a
    3x3 conv + ReLU with a residual Add of the pool, ReLU, GlobalAveragePool + Gemm head."""
    rng = np.random.default_rng(seed)
    inits = []

    def w(name, shape, bias=False):
        arr = rng.normal(size=shape) * (0.1 if bias else np.sqrt(2.0 / max(1, int(np.prod(shape[1:])))))
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["input", w("a.weight", (4, 3, 3, 3)), w("a.bias", (4,), True)], ["a"], name="a", **conv),
        helper.make_node("Relu", ["a"], ["ar"], name="ar"),
        helper.make_node("Conv", ["input", w("b.weight", (3, 3, 1, 1))], ["b"], name="b", kernel_shape=[1, 1]),
        helper.make_node("Concat", ["ar", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("MaxPool", ["cat"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool", w("c.weight", (7, 7, 3, 3))], ["c"], name="c", **conv),
        helper.make_node("Relu", ["c"], ["cr"], name="cr"),
        helper.make_node("Add", ["cr", "pool"], ["res"], name="res"),
        helper.make_node("Relu", ["res"], ["top"], name="top"),
        helper.make_node("GlobalAveragePool", ["top"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", w("fc.weight", (5, 7)), w("fc.bias", (5,), True)], ["logits"], name="fc",
                         transB=1),
    ]
    graph = helper.make_graph(nodes, "concat_net", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 10, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, ["input", "ar", "b", "cat", "pool", "res", "top"]


NETS = {
    "plain": lambda s: netgen.random_cnn(s, residual=False),
    "signed": lambda s: netgen.random_cnn(s, signed=True),
    "residual": lambda s: netgen.random_cnn(s, residual=True),
    "nobias": lambda s: netgen.random_cnn(s, bias=False, residual=True),
}


BLOCKS = ("resnet_block", "mobilenet_block")  # tests/test_blocks.py: BatchNorm, ReLU6 (Clip), depthwise


def net(kind, seed):
    """(model, layers) of a test net: "concat", "reduce_mean", a block of
    tests/test_blocks.py, or a netgen kind of ``NETS``."""
    if kind == "concat":
        return concat_net(seed)
    if kind in BLOCKS:
        import test_blocks

        return getattr(test_blocks, kind)(seed)
    if kind == "reduce_mean":  # a GAP head exported as ReduceMean (Keras/TF style)
        model = reduce_mean_head(netgen.random_cnn(seed, head="gap_gemm", residual=True))
        return model, netgen.layer_names(model, spatial_only=False)
    model = NETS[kind](seed)
    return model, netgen.layer_names(model, spatial_only=False)


def feature_layers(model, layers) -> list:
    """The layers Grad-CAM is defined at: those with positions (rank >= 3), the model input left out."""
    import method_ref

    g = method_ref.Graph(model)
    shape = (1,) + tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    vals = g.forward(np.zeros(shape))
    return [layer for layer in layers if layer not in g.inputs and vals[layer].ndim >= 3]


def num_classes(model) -> int:
    """K of the logits (from the declared output shape, else from a forward pass)."""
    k = netgen.num_classes(model)
    if k:
        return k
    import method_ref

    g = method_ref.Graph(model)
    shape = (1,) + tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    return int(g.forward(np.zeros(shape))[g.logits_name()].shape[1])


def reduce_mean_head(model):
    """The same net with its GlobalAveragePool -> Flatten replaced by one
    ReduceMean(axes=[2, 3], keepdims=0) (how Keras/TF exports a global pool)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    gap = next(n for n in nodes if n.op_type == "GlobalAveragePool")
    flat = next(n for n in nodes if n.op_type == "Flatten" and n.input[0] == gap.output[0])
    mean = helper.make_node("ReduceMean", [gap.input[0]], [flat.output[0]], name="mean", axes=[2, 3], keepdims=0)
    del m.graph.node[:]
    for n in nodes:
        if n is gap:
            m.graph.node.append(mean)
        elif n is not flat:
            m.graph.node.append(n)
    onnx.checker.check_model(m, full_check=True)
    return m
