"""The canonicalize passes and prover hooks behind the ops of third-party exports, one by one:
split_to_slices (op counts before / after, same values), the opset conversion of Upsample (names and
values kept), the non-negativity prover consulting the registry's keeps_nonneg."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_excite.canonicalize import canonicalize, split_to_slices
from onnx_excite.inspect import inspect_model


def _model(nodes, inits, in_shape, outs, opset=18):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_split_to_slices_counts_and_values():
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b"], name="s1", axis=1),
             helper.make_node("Split", ["x"], ["c", "d", "e"], name="s2", axis=2, num_outputs=3)]
    model = _model(nodes, {"sizes": np.array([2, 3], np.int64)}, ["N", 5, 7], ["a", "b", "c", "d", "e"])
    x = np.random.default_rng(0).normal(size=(2, 5, 7)).astype(np.float32)
    want = _run(model, x)
    out = split_to_slices(onnx.ModelProto.FromString(model.SerializeToString()))
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Split") == 0 and ops.count("Slice") == 5
    for got, exp in zip(_run(out, x), want):
        np.testing.assert_array_equal(got, exp)


def test_split_of_unknown_size_is_left_and_reported():
    nodes = [helper.make_node("Split", ["x"], ["a", "b"], name="s", axis=2, num_outputs=2),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model = _model(nodes, {}, ["N", 3, "W"], ["y"])
    out = split_to_slices(onnx.ModelProto.FromString(model.SerializeToString()))
    assert [n.op_type for n in out.graph.node] == ["Split", "Add"]
    problems = inspect_model(model).problems
    assert [(op, name) for op, name, _ in problems] == [("Split", "s")]
    assert "sizes are unknown" in problems[0][2]


def test_upsample_opset9_keeps_names_and_values():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Upsample", ["r", "sc"], ["up"], name="up", mode="linear"),
             helper.make_node("Upsample", ["up", "sc2"], ["y"], name="up2", mode="nearest")]
    model = _model(nodes, {"sc": np.array([1, 1, 2, 1.5], np.float32), "sc2": np.array([1, 1, 1.5, 2], np.float32)},
                   [2, 3, 4, 5], ["y"], opset=9)
    model.ir_version = 4
    graph = canonicalize(model)
    assert [n.op_type for n in graph.nodes if n.op_type != "Constant"] == ["Relu", "Resize", "Resize"]
    assert [n.output[0] for n in graph.nodes if n.op_type == "Resize"] == ["up", "y"]
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(_run(graph.model, x)[0], _run(model, x)[0], rtol=1e-6, atol=1e-6)


def test_prover_consults_keeps_nonneg():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Resize", ["r", "", "sc"], ["up"], name="up", mode="linear"),
             helper.make_node("Resize", ["x", "", "sc"], ["up_signed"], name="up_signed", mode="linear"),
             helper.make_node("Div", ["r", "pos"], ["div_pos"], name="div_pos"),
             helper.make_node("Div", ["r", "neg"], ["div_neg"], name="div_neg"),
             helper.make_node("Sub", ["r", "pos"], ["sub"], name="sub"),
             helper.make_node("Slice", ["up", "st", "en", "ax"], ["sl"], name="sl"),
             helper.make_node("Tile", ["sl", "reps"], ["tiled"], name="tile")]
    inits = {"sc": np.array([1, 1, 2, 2], np.float32), "pos": np.array(2.0, np.float32), "neg": np.array(-2.0, np.float32),
             "st": np.array([1], np.int64), "en": np.array([3], np.int64), "ax": np.array([1], np.int64),
             "reps": np.array([1, 2, 1, 1], np.int64)}
    graph = canonicalize(_model(nodes, inits, [1, 4, 3, 3], ["up", "up_signed", "div_pos", "div_neg", "sub", "tiled"]))
    assert graph.nonneg("up") and graph.nonneg("sl") and graph.nonneg("tiled")
    assert not graph.nonneg("up_signed") and not graph.nonneg("div_neg") and not graph.nonneg("sub")
