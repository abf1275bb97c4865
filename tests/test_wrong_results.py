"""Issue 11's wrong results: NHWC map layers, the choice of the logits among several outputs,
constant-condition If. Maps are compared with the float64 reference (tests/excitation_ref.py)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from excitation_ref import Reference
from onnx_excite import Exciter, build_excitation_model
from onnx_excite.graph.canonicalize import canonicalize, resolve_logits
from onnx_excite.cli.app import app
from onnx_excite.errors import ExciteError
from onnx_excite.graph.layers import inspect_model

runner = CliRunner()


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "m", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _init(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype), name)


def _compare(got, exp):
    scale = np.abs(exp).max()
    assert got.shape == exp.shape
    assert np.abs(got - exp).max() <= 1e-4 * max(scale, 1e-12), np.abs(got - exp).max() / scale


# ---------------------------------------------------------------------------
# NHWC map layers
# ---------------------------------------------------------------------------
def nhwc_model(seed=0, h=9, w=7, c=3, k=5):
    """Keras/tf2onnx style: NHWC input, per-channel scale and shift, Transpose to NCHW, Conv,
    ReLU, MaxPool, GlobalAveragePool, Flatten, Gemm."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Mul", ["image", "scale"], ["scaled"], name="scale"),
        helper.make_node("Add", ["scaled", "shift"], ["normed"], name="shift"),
        helper.make_node("Transpose", ["normed"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p1"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "W2"], ["logits"], name="fc", transB=1),
    ]
    inits = [_init("scale", rng.uniform(0.5, 2, c)), _init("shift", rng.normal(size=c) * 0.1),
             _init("W1", rng.normal(size=(6, c, 3, 3)) / 5), _init("W2", rng.normal(size=(k, 6)))]
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", h, w, c])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])], inits)


def test_nhwc_input_map_is_n_h_w_and_matches_reference():
    model = nhwc_model()
    x = np.random.default_rng(1).normal(size=(2, 9, 7, 3)).astype(np.float32)
    layers = ["image", "normed", "r1"]
    ex = Exciter(model, layers, methods=("mwp", "cmwp"))
    assert ex.built.layouts["image"].axis == 3 and ex.built.layouts["normed"].axis == 3
    assert ex.built.layouts["r1"].axis == 1
    signal = np.random.default_rng(2).random((2, 5)).astype(np.float32)
    res = ex.explain(x, signal)
    ref = Reference(model)
    axes = {"image": 3, "normed": 3}
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, signal, layers, contrastive=contrastive, channel_axes=axes)
        for layer in layers:
            _compare(res.maps[method][layer], want["map"][layer])
    assert res.maps["mwp"]["image"].shape == (2, 9, 7)          # (N, H, W), not (N, W, C)
    assert res.maps["mwp"]["r1"].shape == (2, 9, 7)


def test_layers_and_check_show_the_layout(tmp_path):
    path = tmp_path / "nhwc.onnx"
    onnx.save(nhwc_model(), str(path))
    info = {i.name: i.layout.describe() for i in inspect_model(str(path)).layers}
    assert info["image"] == "NHWC" and info["normed"] == "NHWC" and info["r1"] == "NCHW" and info["flat"] == "-"
    res = runner.invoke(app, ["layers", str(path)])
    assert res.exit_code == 0 and "NHWC" in res.output and "layout" in res.output, res.output
    res = runner.invoke(app, ["check", str(path)])   # ok and the count; the list is `layers`'
    assert res.exit_code == 0 and res.output.startswith("ok: ") and "candidate map layers" in res.output, res.output
    assert "?x9x7x3" not in res.output and "image" not in res.output, res.output


def test_layout_through_a_transpose_back_to_nhwc():
    """A tensor transposed back to NHWC (before a TF-style Reshape flatten) has channels at 3."""
    from onnx_excite.graph.layout import channel_axis

    model = nhwc_model()
    graph = canonicalize(model)
    assert channel_axis(graph, "image").axis == 3
    assert channel_axis(graph, "nchw").axis == 1 and channel_axis(graph, "logits").axis is None


# ---------------------------------------------------------------------------
# which output holds the logits
# ---------------------------------------------------------------------------
def two_output_model(seed=0, k=5, softmax=False, features_first=True):
    """Outputs (features N x 16, logits N x k): conv - relu - GAP - flatten - Gemm(16) = features
    - relu - Gemm(k) = logits [- Softmax]."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "W2"], ["feat"], name="fc1", transB=1),
        helper.make_node("Relu", ["feat"], ["feat_relu"], name="relu2"),
        helper.make_node("Gemm", ["feat_relu", "W3"], ["logits"], name="fc2", transB=1),
    ]
    last = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], name="softmax"))
        last = "prob"
    inits = [_init("W1", rng.normal(size=(6, 3, 3, 3)) / 5), _init("W2", rng.normal(size=(16, 6))),
             _init("W3", rng.normal(size=(k, 16)) / 4)]
    outs = [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 16]),
            helper.make_tensor_value_info(last, TensorProto.FLOAT, ["N", k])]
    if not features_first:
        outs.reverse()
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])], outs, inits)


@pytest.mark.parametrize("softmax,features_first,reason", [
    (False, True, "computed by the last Gemm/MatMul"),
    (False, False, "computed by the last Gemm/MatMul"),
    (True, True, "fed by a Softmax"),
])
def test_logits_chosen_among_several_outputs(softmax, features_first, reason):
    model = two_output_model(softmax=softmax, features_first=features_first)
    choice = canonicalize(model).logits
    assert choice.tensor == "logits" and choice.reason == reason and choice.chosen_among_several
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    ex = Exciter(model, ["x", "r1"])
    assert ex.built.logits == "logits" and ex.num_classes == 5 and ex.built.logits_choice.reason == reason
    signal = np.eye(5, dtype=np.float32)[[1, 3]]
    res = ex.explain(x, signal)
    want = Reference(model).run(x, signal, ["x", "r1"], entry="logits")
    for layer in ("x", "r1"):
        _compare(res.maps["mwp"][layer], want["map"][layer])


def test_logits_given_by_name_and_the_widest_rule():
    model = two_output_model()
    ex = Exciter(model, ["r1"], logits="feat", methods=("mwp",))
    assert ex.built.logits == "feat" and ex.num_classes == 16 and ex.built.logits_choice.reason == "given"
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    signal = np.random.default_rng(1).random((2, 16)).astype(np.float32)
    want = Reference(model).run(x, signal, ["r1"], entry="feat")
    _compare(ex.explain(x, signal).maps["mwp"]["r1"], want["map"]["r1"])
    with pytest.raises(ExciteError, match="logits 'fet' is not a tensor of the model.*did you mean 'feat'"):
        build_excitation_model(model, ["r1"], logits="fet")
    # no Softmax, no Gemm: the widest float 2-D output
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["narrow"], name="f1"),
             helper.make_node("Conv", ["x", "W"], ["c"], name="conv", kernel_shape=[8, 8]),
             helper.make_node("Flatten", ["c"], ["wide"], name="f2")]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
               [helper.make_tensor_value_info("narrow", TensorProto.FLOAT, ["N", 3]),
                helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["N", 7])],
               [_init("W", np.ones((7, 3, 8, 8)))])
    choice = resolve_logits(canonicalize(m).model)
    assert choice.tensor == "wide" and choice.reason == "the widest output"


def test_every_command_takes_logits(tmp_path):
    path = tmp_path / "two.onnx"
    onnx.save(two_output_model(), str(path))
    for args in (["layers", str(path)], ["check", str(path)]):
        default = runner.invoke(app, args)
        assert default.exit_code == 0 and "logits = 'logits' (computed by the last Gemm/MatMul" in default.output
        chosen = runner.invoke(app, args + ["--logits", "feat"])
        assert chosen.exit_code == 0 and "note:" not in chosen.output, chosen.output
        assert "fc2" not in chosen.output and "feat_relu" not in chosen.output
        alias = runner.invoke(app, args + ["--output", "feat"])   # the older, hidden name
        assert alias.exit_code == 0 and alias.output == chosen.output
    out = tmp_path / "companion.onnx"
    res = runner.invoke(app, ["export", str(path), "-o", str(out), "-l", "r1", "--logits", "feat"])
    assert res.exit_code == 0 and "excite_signal (N x 16)" in res.output, res.output
    res = runner.invoke(app, ["export", str(path), "-o", str(out), "-l", "r1"])
    assert res.exit_code == 0 and "excite_signal (N x 5)" in res.output and "note: logits = 'logits'" in res.output
    res = runner.invoke(app, ["bench", str(path), "-l", "r1", "--logits", "feat", "--runs", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["check", str(path), "--logits", "nope"])
    assert res.exit_code == 2 and res.output.startswith("error: logits 'nope'")
    for command in (["eval", "pointing"], ["eval", "localization"], ["explain"]):
        assert "--logits" in runner.invoke(app, command + ["--help"]).output


def test_explain_and_export_resolve_layers_alike(tmp_path):
    """`explain` resolves the logits and validates layers as `export` does (the fully
    convolutional rewrite of its dense head keeps the features output)."""
    from PIL import Image

    path = tmp_path / "two.onnx"
    onnx.save(two_output_model(), str(path))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for logits in ([], ["--logits", "feat"], ["--logits", "logits"]):
        out = tmp_path / f"out{len(logits)}{logits[-1] if logits else ''}"
        exp = runner.invoke(app, ["export", str(path), "-o", str(tmp_path / "c.onnx"), "-l", "r1"] + logits)
        res = runner.invoke(app, ["explain", str(path), str(tmp_path / "a.png"), "-l", "r1", "-o", str(out)] + logits)
        assert exp.exit_code == 0 and res.exit_code == 0, (exp.output, res.output)
        assert np.load(next(out.glob("*.mwp.r1.npy"))).ndim == 2


# ---------------------------------------------------------------------------
# constant-condition If
# ---------------------------------------------------------------------------
def _if_model(cond_value: bool, constant_cond: bool = True):
    """x - conv1 - relu - If(cond){conv2 - relu | identity} - GAP - flatten - Gemm."""
    rng = np.random.default_rng(3)
    then_branch = helper.make_graph(
        [helper.make_node("Conv", ["r1", "W2"], ["t_c"], name="t_conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["t_c"], ["t_r"], name="t_relu")],
        "then", [], [helper.make_tensor_value_info("t_r", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["r1"], ["e_r"], name="e_id")],
        "else", [], [helper.make_tensor_value_info("e_r", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    inits = [_init("W1", rng.normal(size=(4, 3, 3, 3)) / 5), _init("W2", rng.normal(size=(4, 4, 3, 3)) / 5),
             _init("W3", rng.normal(size=(5, 4)))]
    if constant_cond:
        nodes.append(helper.make_node("Constant", [], ["cond"], name="cond",
                                      value=numpy_helper.from_array(np.array(cond_value))))
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    else:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
                  helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    nodes += [helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then_branch, else_branch=else_branch),
              helper.make_node("GlobalAveragePool", ["branch"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
              helper.make_node("Gemm", ["flat", "W3"], ["logits"], name="fc", transB=1)]
    return _model(nodes, inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)


def _flat_equivalent(model):
    """The If replaced by the then-branch's nodes by hand: what the reference runs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    for n in m.graph.node:
        if n.op_type == "Constant":
            continue
        if n.op_type == "If":
            nodes += [helper.make_node("Conv", ["r1", "W2"], ["t_c"], name="t_conv", pads=[1, 1, 1, 1]),
                      helper.make_node("Relu", ["t_c"], ["branch"], name="t_relu")]
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def test_constant_if_is_inlined_and_its_layers_are_explained(tmp_path):
    model = _if_model(True)
    path = tmp_path / "if.onnx"
    onnx.save(model, str(path))
    res = runner.invoke(app, ["check", str(path)])
    assert res.exit_code == 0 and res.output.startswith("ok"), res.output
    listed = {info.name for info in inspect_model(str(path)).layers}
    assert {"x", "r1", "t_c", "branch"} <= listed             # the branch's layers are there
    graph = canonicalize(model)
    assert [n.op_type for n in graph.nodes].count("If") == 0
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    signal = np.random.default_rng(1).random((2, 5)).astype(np.float32)
    layers = ["x", "r1", "t_c"]
    got = Exciter(model, layers, methods=("mwp", "cmwp")).explain(x, signal)
    ref = Reference(_flat_equivalent(model))
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, signal, layers, contrastive=contrastive)
        for layer in layers:
            _compare(got.maps[method][layer], want["map"][layer])


def test_constant_false_if_takes_the_else_branch():
    graph = canonicalize(_if_model(False))
    assert [n.op_type for n in graph.nodes] == ["Conv", "Relu", "Identity", "GlobalAveragePool", "Flatten", "Gemm"]


def test_data_dependent_if_is_reported_not_skipped(tmp_path):
    path = tmp_path / "if_dyn.onnx"
    onnx.save(_if_model(True, constant_cond=False), str(path))
    res = runner.invoke(app, ["check", str(path)])
    assert res.exit_code == 1 and "unsupported: If 'if'" in res.output, res.output
