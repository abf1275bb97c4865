"""Degenerate inputs never give NaN/Inf; graph hygiene (opsets, dynamic dims, ceil-mode pools)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnn_gen import input_shape, random_cnn
from conftest import tiny_model
from excitation_ref import Reference
from onnx_excite import Exciter, ExciteError, build_excitation_model


def _all_finite(res):
    for per_layer in list(res.maps.values()) + list(res.channels.values()):
        for v in per_layer.values():
            assert np.isfinite(v).all()


@pytest.mark.parametrize("rule", ["positive", "paper"])
@pytest.mark.parametrize("seed", range(8))
def test_no_nan_on_degenerate_inputs(seed, rule):
    model, layers = random_cnn(seed)
    ex = Exciter(model, layers, rule=rule, channels=True)
    shape = (2,) + input_shape(model)
    rng = np.random.default_rng(seed)
    cases = {
        "zeros": np.zeros(shape, np.float32),
        "negative": -np.abs(rng.normal(size=shape)).astype(np.float32),   # dead ReLUs everywhere
        "huge": (rng.normal(size=shape) * 1e30).astype(np.float32),
        "tiny": (rng.normal(size=shape) * 1e-30).astype(np.float32),
        "denormal": np.full(shape, 1e-40, np.float32),
    }
    for name, x in cases.items():
        logits = ex.logits(x)
        if not np.isfinite(logits).all():
            continue  # the forward itself overflowed: nothing to explain
        _all_finite(ex.explain(x, rng.random((2, ex.num_classes)).astype(np.float32)))


def test_zero_weight_rows_and_all_zero_model():
    model = tiny_model(softmax=False)
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[1:3] = 0  # two dead filters
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "W1"))
    w2 = numpy_helper.to_array(model.graph.initializer[1]).copy()
    w2[4] = 0    # a class with no weights at all
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(w2, "W2"))
    ex = Exciter(model, ["x", "r1", "p1"], channels=True)
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    res = ex.explain(x, np.ones((3, 5), np.float32))
    _all_finite(res)
    assert np.all(res.channels["mwp"]["r1"][:, 1:3] == 0)
    res = ex.explain(x, 4)
    assert all(np.all(v == 0) for v in res.maps["mwp"].values())


def _conv_model(opset, dynamic_hw=False, init_as_input=False):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    fc = rng.normal(size=(4, 6)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", strides=[2, 2], pads=[0, 1, 1, 0]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc")]
    hw = ["H", "W"] if dynamic_hw else [9, 10]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3] + hw)]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")]
    if init_as_input:
        inputs += [helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]),
                   helper.make_tensor_value_info("fc", TensorProto.FLOAT, [4, 6])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset <= 14 else 8
    return model


@pytest.mark.parametrize("opset", [11, 13, 17, 19, 20])
def test_opsets_on_input(opset):
    model = _conv_model(opset, init_as_input=opset == 11)
    x = np.random.default_rng(1).random((2, 3, 9, 10)).astype(np.float32)
    ex = Exciter(model, ["x", "r"])
    want = Reference(_conv_model(17)).run(x, np.eye(6)[[1, 2]], ["x", "r"])
    res = ex.explain(x, [1, 2])
    for layer in ("x", "r"):
        np.testing.assert_allclose(res.maps["mwp"][layer], want["map"][layer], rtol=1e-4, atol=1e-6)
    built = build_excitation_model(model, ["r"])
    assert 17 <= built.model.opset_import[0].version <= 20 and built.model.ir_version <= 10


def test_dynamic_spatial_dims_use_sliced_adjoint():
    """With symbolic H, W the strided ConvTranspose is cut to the input size at run time:
    one exported model serves every image size."""
    model = _conv_model(17, dynamic_hw=True)
    built = build_excitation_model(model, ["x"], methods=("mwp",))
    sess = ort.InferenceSession(built.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for hw in [(9, 10), (16, 11), (7, 7)]:
        x = np.random.default_rng(2).random((1, 3) + hw).astype(np.float32)
        sig = np.eye(6, dtype=np.float32)[[3]]
        got = sess.run(["mwp:x"], {"x": x, "excite_signal": sig})[0]
        static = _conv_model(17)
        static.graph.input[0].type.tensor_type.shape.dim[2].dim_value = hw[0]
        static.graph.input[0].type.tensor_type.shape.dim[3].dim_value = hw[1]
        want = Reference(static).run(x, sig, ["x"])["map"]["x"]
        assert got.shape == (1,) + hw
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_ceil_mode_pool_whose_last_window_starts_in_the_padding():
    """onnx's shape inference keeps such a window, ORT drops it; the canonical graph must
    agree with ORT (the forward and the maps)."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2, 1, 3, 3)).astype(np.float32)
    fc = rng.normal(size=(2, 4)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
             helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "fc"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 11, 11])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.random((2, 1, 11, 11)).astype(np.float32)
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ex = Exciter(model, ["x", "r", "p"])
    np.testing.assert_allclose(ex.logits(x), plain, rtol=1e-5)
    want = Reference(model).run(x, np.eye(4)[[0, 3]], ["x", "r", "p"])
    res = ex.explain(x, [0, 3])
    assert res.maps["mwp"]["p"].shape == (2, 6, 6)
    for layer in ("x", "r", "p"):
        np.testing.assert_allclose(res.maps["mwp"][layer], want["map"][layer], rtol=1e-4, atol=1e-7)


def test_bad_targets_and_unsupported_ops():
    ex = Exciter(tiny_model(), ["r1"])
    x = np.zeros((2, 3, 8, 8), np.float32)
    for bad in (7, [1], np.zeros((2, 4)), "dog"):
        with pytest.raises(ExciteError):
            ex.explain(x, bad)
    model = tiny_model()
    model.graph.node[1].op_type = "Hardmax"
    with pytest.raises(ExciteError, match="Hardmax"):
        build_excitation_model(model, ["x"])
    with pytest.raises(ExciteError, match="classifier"):
        build_excitation_model(tiny_model(), ["logits"], methods=("cmwp",))


def test_missing_onnxruntime_names_the_extra(monkeypatch, tiny_path):
    """Without onnxruntime one line says which extra to install (and no traceback in the CLI)."""
    import sys

    from typer.testing import CliRunner

    from onnx_excite.cli.app import app

    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # import fails as if not installed
    with pytest.raises(ExciteError, match=r"onnx-excite\[cpu\].*onnx-excite\[gpu\]"):
        Exciter(tiny_model(), ["x"])
    res = CliRunner().invoke(app, ["bench", str(tiny_path), "-l", "x", "--runs", "1"])
    assert res.exit_code == 2 and "pip install 'onnx-excite[cpu]'" in res.output and "Traceback" not in res.output


def test_external_data_and_nameless_duplicate_nodes(tmp_path):
    """A model saved with external data (`.onnx` + `.onnx.data`) whose nodes have empty and
    duplicate names; the user's files are not modified."""
    model = tiny_model()
    for node in model.graph.node:
        node.name = "" if node.op_type != "Relu" else "dup"
    model.graph.node[0].name = "dup"
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert "ext.onnx.data" in before
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    want = Reference(tiny_model()).run(x, np.eye(5)[[0, 4]], ["x", "r1"])
    res = Exciter(str(path), ["x", "r1"]).explain(x, [0, 4])
    for layer in ("x", "r1"):
        np.testing.assert_allclose(res.maps["mwp"][layer], want["map"][layer], rtol=1e-4, atol=1e-7)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("opset", [21, 22])
def test_newest_opsets_on_input(opset):
    model = _conv_model(opset)
    model.ir_version = 10
    x = np.random.default_rng(1).random((2, 3, 9, 10)).astype(np.float32)
    want = Reference(_conv_model(17)).run(x, np.eye(6)[[1, 2]], ["x"])
    res = Exciter(model, ["x"]).explain(x, [1, 2])
    np.testing.assert_allclose(res.maps["mwp"]["x"], want["map"]["x"], rtol=1e-4, atol=1e-6)
    built = build_excitation_model(model, ["x"])
    assert built.model.ir_version <= 10


def test_shape_subgraph_feeding_reshape():
    """PyTorch-style flatten: Shape -> Gather -> Unsqueeze -> Concat -> Reshape; dynamic batch."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    fc = rng.normal(size=(4 * 6 * 6, 5)).astype(np.float32)
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Shape", ["r"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsq"),
             helper.make_node("Concat", ["n1", "minus1"], ["newshape"], name="cat", axis=0),
             helper.make_node("Reshape", ["r", "newshape"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc"), i64("zero", 0),
                               i64("axes0", [0]), i64("minus1", [-1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.random((3, 3, 8, 8), dtype=np.float32)
    res = Exciter(model, ["x", "r"]).explain(x, [0, 1, 4])
    ref_model = helper.make_model(helper.make_graph(
        [nodes[0], nodes[1], helper.make_node("Flatten", ["r"], ["f"], name="flatten"), nodes[7]], "g",
        list(graph.input), list(graph.output), [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")]),
        opset_imports=[helper.make_opsetid("", 17)])
    want = Reference(ref_model).run(x, np.eye(5)[[0, 1, 4]], ["x", "r"])
    for layer in ("x", "r"):
        np.testing.assert_allclose(res.maps["mwp"][layer], want["map"][layer], rtol=1e-4, atol=1e-7)


def test_float16_model_excitation_runs_in_float32():
    """A float16 model: the forward stays in float16, the excitation branch casts the
    activations to float32; maps agree with the float32 model to half precision."""
    m16 = tiny_model(softmax=False)
    for t in m16.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    m16.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    m16.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    m32 = tiny_model(softmax=False)
    for t in m32.graph.initializer:   # the same (rounded) weights in float32
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16).astype(np.float32), t.name))
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float16)
    built = build_excitation_model(m16, ["x", "r1"], methods=("mwp", "cmwp"))
    onnx.checker.check_model(built.model, full_check=True)
    res16 = Exciter(m16, ["x", "r1"]).explain(x, [1, 3])
    res32 = Exciter(m32, ["x", "r1"]).explain(x.astype(np.float32), [1, 3])
    assert res16.logits.dtype == np.float16
    for method in ("mwp", "cmwp"):
        for layer in ("x", "r1"):
            got, want = res16.maps[method][layer], res32.maps[method][layer]
            assert got.dtype == np.float32 and np.isfinite(got).all()
            assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


@pytest.mark.parametrize("scale", [1.0, 1e6, 1e12])
def test_zero_z_loses_its_share_exactly_under_a_large_signal(scale):
    """R = P / Max(Z, 2**-64) needs no mask: where Z == 0 every term z_ij of the adjoint is 0.
    Here filter 1 has only negative weights and a positive bias, so on a non-negative input
    its ReLU output is alive (P reaches it from the classifier) but its Z is 0, and class 2
    has only negative weights. The lost shares stay exactly 0 and everything finite for a
    signal up to 1e12, and the maps are linear in the signal (class 2 adds nothing)."""
    model = tiny_model(softmax=False)
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[1] = -np.abs(w1[1])
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "W1"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([0.1, 2.0, 0.1, 0.1], np.float32), "B1"))
    model.graph.node[0].input.append("B1")
    w2 = numpy_helper.to_array(model.graph.initializer[1]).copy()
    w2[2] = -np.abs(w2[2])
    w2[0] = np.abs(w2[0])
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(w2, "W2"))
    ex = Exciter(model, ["x", "r1"], channels=True, diagnostics=True)
    x = (0.02 * np.abs(np.random.default_rng(1).normal(size=(2, 3, 8, 8)))).astype(np.float32)  # bias 2 wins
    signal = np.array([[1, 0, 1, 0, 0]] * 2, np.float32)
    unit = ex.explain(x, signal)
    big = ex.explain(x, scale * signal)
    _all_finite(big)
    for method in ("mwp", "cmwp"):
        for layer in ("x", "r1"):
            ref = scale * unit.channels[method][layer]
            np.testing.assert_allclose(big.channels[method][layer], ref, rtol=2e-5, atol=1e-5 * np.abs(ref).max())
    first = ex.explain(x, np.array([[1, 0, 0, 0, 0]] * 2, np.float32))
    for layer in ("x", "r1"):                                 # class 2 (Z == 0) adds exactly nothing
        np.testing.assert_array_equal(unit.channels["mwp"][layer], first.channels["mwp"][layer])
    assert np.all(first.channels["mwp"]["r1"][:, 1].sum(axis=(1, 2)) > 0)   # the dead-Z filter gets P ...
    assert np.all(0 < first.lost["mwp"]["x"]) and np.all(first.lost["mwp"]["x"] < 1)   # ... lost below it
