"""Each canonicalize pass on its own: op counts before and after (as ONNX Runtime's fusion
tests do) and, where the pass rewrites computation, the same outputs in onnxruntime."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_excite.graph import canonicalize as C
from onnx_excite.graph.forward import shape_of
from onnx_excite.graph.index import GraphIndex, attr, implicit_inputs


def _model(nodes, inits=(), inputs=None, outputs=None, opset=17, shape=(1, 3, 7, 6)):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
    outputs = outputs or [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)]
    m = helper.make_model(helper.make_graph(nodes, "t", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _copy(m):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def counts(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _init(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype), name)


X = np.random.default_rng(0).normal(size=(1, 3, 7, 6)).astype(np.float32)
W = np.random.default_rng(1).normal(size=(4, 3, 3, 3)).astype(np.float32)


def test_pass_order():
    assert [p.__name__ for p in C.PASSES] == [
        "drop_initializer_inputs", "constants_to_initializers", "fold_constants", "inline_constant_if",
        "name_nodes", "upgrade_opset", "run", "run", "run", "fold_batchnorm", "fold_affine", "split_to_slices", "ceil_pools_to_pads",
        "infer_shapes"]


def test_drop_initializer_inputs():
    m = _model([helper.make_node("Conv", ["x", "W"], ["y"])], [_init("W", W)])
    m.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(W.shape)))
    out = C.drop_initializer_inputs(_copy(m))
    assert [i.name for i in m.graph.input] == ["x", "W"] and [i.name for i in out.graph.input] == ["x"]
    assert counts(out) == counts(m)


def test_constants_to_initializers():
    m = _model([helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W)),
                helper.make_node("Conv", ["x", "W"], ["y"])])
    out = C.constants_to_initializers(_copy(m))
    assert counts(m) == {"Constant": 1, "Conv": 1} and counts(out) == {"Conv": 1}
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), W)


def test_fold_constants():
    m = _model([helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0, 2, 3]),
                helper.make_node("Mul", ["W", "two"], ["W2"]),
                helper.make_node("Conv", ["x", "W2"], ["y"])],
               [_init("Wt", W.transpose(1, 0, 2, 3)), _init("two", 2.0)])
    out = C.fold_constants(_copy(m))
    assert counts(m) == {"Transpose": 1, "Mul": 1, "Conv": 1} and counts(out) == {"Conv": 1}
    np.testing.assert_allclose(_run(out, X)[0], _run(m, X)[0], rtol=1e-6)


def _if_model(cond: bool):
    then_b = helper.make_graph([helper.make_node("Relu", ["c"], ["t"]), helper.make_node("Neg", ["t"], ["t2"])],
                               "then", [], [helper.make_tensor_value_info("t2", TensorProto.FLOAT, None)])
    else_b = helper.make_graph([helper.make_node("Identity", ["c"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    return _model([helper.make_node("Conv", ["x", "W"], ["c"]),
                   helper.make_node("If", ["cond"], ["y"], then_branch=then_b, else_branch=else_b)],
                  [_init("W", W), _init("cond", cond, np.bool_)])


@pytest.mark.parametrize("cond,after", [(True, {"Conv": 1, "Relu": 1, "Neg": 1}), (False, {"Conv": 1, "Identity": 1})])
def test_inline_constant_if(cond, after):
    m = _if_model(cond)
    out = C.inline_constant_if(_copy(m))
    assert counts(m) == {"Conv": 1, "If": 1} and counts(out) == after
    np.testing.assert_allclose(_run(out, X)[0], _run(m, X)[0], rtol=1e-6)


def test_inline_constant_if_renames_clashing_branch_names():
    then_b = helper.make_graph([helper.make_node("Relu", ["c"], ["c2"]), helper.make_node("Neg", ["c2"], ["t"])],
                               "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    m = _model([helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Sigmoid", ["c"], ["c2"]),
                helper.make_node("If", ["cond"], ["y0"], then_branch=then_b, else_branch=then_b),
                helper.make_node("Add", ["y0", "c2"], ["y"])],
               [_init("W", W), _init("cond", True, np.bool_)])
    out = C.inline_constant_if(_copy(m))
    assert counts(out) == {"Conv": 1, "Sigmoid": 1, "Relu": 1, "Neg": 1, "Add": 1}
    assert len({o for n in out.graph.node for o in n.output}) == 5     # still single assignment
    np.testing.assert_allclose(_run(out, X)[0], _run(m, X)[0], rtol=1e-6)


def test_name_nodes():
    m = _model([helper.make_node("Relu", ["x"], ["a"], name="same"), helper.make_node("Relu", ["a"], ["b"], name="same"),
                helper.make_node("Relu", ["b"], ["y"])])
    out = C.name_nodes(_copy(m))
    names = [n.name for n in out.graph.node]
    assert names[0] == "same" and len(set(names)) == 3 and all(names) and counts(out) == counts(m)


def test_upgrade_opset():
    m = _model([helper.make_node("Clip", ["x"], ["y"], min=0.0, max=6.0)], opset=9)   # Clip bounds as attributes
    out = C.upgrade_opset(_copy(m))
    assert C.default_opset(out) == C.MIN_OPSET and counts(out) == {"Clip": 1, "Constant": 2}   # bounds as inputs
    assert len(next(n for n in out.graph.node if n.op_type == "Clip").input) == 3
    np.testing.assert_allclose(_run(out, X)[0], np.clip(X, 0, 6))


def test_fold_batchnorm():
    rng = np.random.default_rng(2)
    bn = [_init("g", rng.uniform(-1, 1, 4)), _init("b", rng.normal(size=4)), _init("m", rng.normal(size=4)),
          _init("v", rng.uniform(0.5, 2, 4))]
    m = _model([helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
                helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")],
               [_init("W", W)] + bn)
    out = C.fold_batchnorm(_copy(m))
    assert counts(m) == {"Conv": 1, "BatchNormalization": 1} and counts(out) == {"Conv": 1}
    np.testing.assert_allclose(_run(out, X)[0], _run(m, X)[0], rtol=1e-4, atol=1e-5)
    # a Conv whose output is also used elsewhere keeps its BatchNormalization
    m.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    assert counts(C.fold_batchnorm(_copy(m))) == {"Conv": 1, "BatchNormalization": 1}


def test_upgrade_opset_upsample_keeps_names_and_values():
    """The version converter turns Upsample-9 into Resize with new output names and half-pixel
    coordinates; the pass gives the names back and keeps Upsample's asymmetric / floor coordinates."""
    scales = {"sc": [1, 1, 2, 1.5], "sc2": [1, 1, 1.5, 2]}
    m = _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                helper.make_node("Upsample", ["r", "sc"], ["up"], name="up", mode="linear"),
                helper.make_node("Upsample", ["up", "sc2"], ["y"], name="up2", mode="nearest")],
               [_init(k, v) for k, v in scales.items()], opset=9, shape=(2, 3, 4, 5))
    m.ir_version = 4
    out = C.upgrade_opset(_copy(m))
    assert counts(m) == {"Relu": 1, "Upsample": 2}
    assert {k: v for k, v in counts(out).items() if k != "Constant"} == {"Relu": 1, "Resize": 2}
    resizes = [n for n in out.graph.node if n.op_type == "Resize"]
    assert [n.output[0] for n in resizes] == ["up", "y"]
    assert {attr(n, "coordinate_transformation_mode") for n in resizes} == {"asymmetric"}
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x)[0], _run(m, x)[0], rtol=1e-6, atol=1e-6)


def test_split_to_slices():
    """Sizes from an input and from opset 18's num_outputs (equal chunks, the last one smaller)."""
    m = _model([helper.make_node("Split", ["x", "sizes"], ["a", "b"], name="s1", axis=1),
                helper.make_node("Split", ["x"], ["c", "d", "e"], name="s2", axis=2, num_outputs=3)],
               [_init("sizes", [1, 2], np.int64)], opset=18,
               outputs=[helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in "abcde"])
    out = C.split_to_slices(_copy(m))
    assert counts(m) == {"Split": 2} and counts(out) == {"Slice": 5}
    for got, want in zip(_run(out, X), _run(m, X)):
        np.testing.assert_array_equal(got, want)


def test_split_to_slices_leaves_unknown_sizes():
    """A Split of a dynamic axis into equal parts stays (check reports it)."""
    m = _model([helper.make_node("Split", ["x"], ["a", "b"], name="s", axis=2, num_outputs=2),
                helper.make_node("Add", ["a", "b"], ["y"], name="add")], opset=18,
               inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", 6])])
    out = C.split_to_slices(_copy(m))
    assert counts(out) == counts(m) == {"Split": 1, "Add": 1}
    from onnx_excite.graph.layers import inspect_model

    problems = inspect_model(m).problems
    assert [(op, name) for op, name, _ in problems] == [("Split", "s")] and "sizes are unknown" in problems[0][2]


def test_ceil_pools_to_pads():
    m = _model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)])
    out = C.ceil_pools_to_pads(_copy(m))
    node = out.graph.node[0]
    assert counts(out) == counts(m) and not attr(node, "ceil_mode", 0) and list(attr(node, "pads")) == [0, 0, 1, 0]
    np.testing.assert_array_equal(_run(out, X)[0], _run(m, X)[0])


def test_infer_shapes():
    m = _model([helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
               [_init("W", W)])
    out = C.infer_shapes(_copy(m))
    shapes = {vi.name: shape_of(vi) for vi in out.graph.value_info}
    assert shapes["c"] == (1, 4, 7, 6) and counts(out) == counts(m)


def test_expose_maxpool_indices_only_where_asked():
    m = _model([helper.make_node("MaxPool", ["x"], ["p1"], name="pool1", kernel_shape=[2, 2]),
                helper.make_node("MaxPool", ["p1"], ["y"], name="pool2", kernel_shape=[2, 2])])
    out = C.expose_maxpool_indices(_copy(m))                      # default: every MaxPool
    assert [len(n.output) for n in out.graph.node] == [2, 2]
    chosen = _copy(m)
    C.expose_maxpool_indices(chosen, [chosen.graph.node[1]])
    assert [len(n.output) for n in chosen.graph.node] == [1, 2] and chosen.graph.node[1].output[1] == "pool2.indices"
    np.testing.assert_array_equal(_run(chosen, X)[0], _run(m, X)[0])


def test_graph_index_counts_subgraph_reads():
    m = _if_model(True)
    index = GraphIndex(m.graph)
    node = index.producer["y"]
    assert implicit_inputs(node) == ["c"] and node in index.consumers["c"]
    assert index.consumer_count("y") == 1 and index.array("cond").item() is True
