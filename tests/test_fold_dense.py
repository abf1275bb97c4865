"""A BatchNorm after a dense layer (PyTorch ``Linear -> BatchNorm1d``: Gemm -> BatchNormalization on
(N, M); Keras ``Dense -> BatchNormalization``: MatMul -> Add(bias) -> Mul -> Add) is folded into the
dense layer by ``canonicalize.fold_batchnorm`` / ``fold_affine``, as after a Conv: the same head
written four ways (BatchNormalization node, decomposed after a Gemm with alpha / beta, Keras-style MatMul
chains, folded by hand) gives the same logits and maps; the maps match the float64 reference
(tests/excitation_ref.py, which folds on its own); what the spec leaves alone stays; folded names give
one clear error."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from excitation_ref import Reference
from test_canonicalize_passes import _copy, _model
from test_fold_affine import (_counts, _one_error_line, _ort, _outputs, assert_matches_reference, assert_same_explanations,
                             classifier_model, random_input)
from onnx_excite import Exciter
from onnx_excite.graph import canonicalize as C
from onnx_excite.cli.app import app
from onnx_excite.errors import ExciteError

#: batchnorm: Gemm (transB=1) -> BatchNormalization; gemm_mul_add: Gemm (transB=0, alpha=2, beta=0.25)
#: -> Mul -> Add; keras: MatMul -> Add(bias) -> Mul -> Add; keras_sub_div: MatMul -> Add(bias) -> Sub
#: mean -> Div std -> Mul gamma -> Add beta; bias_add_batchnorm: MatMul -> Add(bias) -> BatchNormalization;
#: folded: one Gemm with the BatchNorm folded by hand
FORMS = ("batchnorm", "gemm_mul_add", "keras", "keras_sub_div", "bias_add_batchnorm", "folded")
UNFOLDED = FORMS[:-1]
EPS = 1e-3
SHAPE = (3, 8, 6)
HIDDEN, CLASSES = 10, 5
#: tensors every form has: the BatchNorm's output keeps its name, the dense layer's output vanishes
LAYERS = ["input", "crelu", "flat", "bn", "hrelu"]


def dense_bn_net(seed: int, form: str, dtype=np.float32) -> onnx.ModelProto:
    """input -> Conv -> Relu -> MaxPool -> Flatten (72) -> dense (10) -> BatchNorm -> Relu -> Gemm (5).
    The same random weights in every form (gammas of both signs, at least one negative); per-feature
    constants alternate between the (M,) and (1, M) layouts."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float64).astype(dtype), name))
        return name

    def op(op_type, inputs, out, **attrs):
        nodes.append(helper.make_node(op_type, inputs, [out], name=f"n_{out}", **attrs))
        return out

    conv = op("Conv", ["input", const("cw", rng.normal(size=(6, 3, 3, 3)) / 4), const("cb", rng.normal(size=6) * 0.1)],
              "conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    pool = op("MaxPool", [op("Relu", [conv], "crelu")], "pool", kernel_shape=[2, 2], strides=[2, 2])
    flat = op("Flatten", [pool], "flat")
    features = 6 * 4 * 3
    w1, b1 = rng.normal(size=(HIDDEN, features)) / np.sqrt(features), rng.normal(size=HIDDEN) * 0.1
    w1, b1 = w1.astype(dtype).astype(np.float64), b1.astype(dtype).astype(np.float64)   # exact in every layout
    sign = np.where(rng.random(HIDDEN) < 0.4, -1.0, 1.0)
    sign[0] = -1.0
    gamma, beta = sign * rng.uniform(0.3, 1.5, HIDDEN), rng.normal(size=HIDDEN) * 0.2
    mean, var = rng.normal(size=HIDDEN) * 0.2, rng.uniform(0.3, 2.0, HIDDEN)
    scale = gamma / np.sqrt(var + EPS)
    shift = beta - mean * scale
    if form == "batchnorm":
        fc = op("Gemm", [flat, const("w1", w1), const("b1", b1)], "fc1", transB=1)
        op("BatchNormalization", [fc, const("gamma", gamma), const("beta", beta), const("mean", mean), const("var", var)],
           "bn", epsilon=EPS)
    elif form == "gemm_mul_add":   # alpha * (B / alpha) and beta * (C / beta): powers of two, the same numbers
        fc = op("Gemm", [flat, const("w1", w1.T / 2), const("b1", b1 * 4)], "fc1", alpha=2.0, beta=0.25)
        op("Add", [op("Mul", [fc, const("scale", scale)], "bn_scaled"), const("shift", shift.reshape(1, -1))], "bn")
    elif form == "keras":
        fc = op("Add", [op("MatMul", [flat, const("w1", w1.T)], "fc1_mm"), const("b1", b1)], "fc1")
        op("Add", [op("Mul", [fc, const("scale", scale.reshape(1, -1))], "bn_scaled"), const("shift", shift)], "bn")
    elif form == "keras_sub_div":
        fc = op("Add", [op("MatMul", [flat, const("w1", w1.T)], "fc1_mm"), const("b1", b1.reshape(1, -1))], "fc1")
        std = np.sqrt(var.astype(dtype) + dtype(EPS)).astype(np.float64)
        centred = op("Sub", [fc, const("mean", mean)], "bn_centred")
        scaled = op("Div", [centred, const("std", std.reshape(1, -1))], "bn_scaled")
        op("Add", [op("Mul", [scaled, const("gamma", gamma)], "bn_gamma"), const("beta", beta.reshape(1, -1))], "bn")
    elif form == "bias_add_batchnorm":
        fc = op("Add", [op("MatMul", [flat, const("w1", w1.T)], "fc1_mm"), const("b1", b1)], "fc1")
        op("BatchNormalization", [fc, const("gamma", gamma), const("beta", beta), const("mean", mean), const("var", var)],
           "bn", epsilon=EPS)
    else:
        op("Gemm", [flat, const("w1", w1 * scale[:, None]), const("b1", (b1 - mean) * scale + beta)], "bn", transB=1)
    relu = op("Relu", ["bn"], "hrelu")
    op("Gemm", [relu, const("w2", rng.normal(size=(CLASSES, HIDDEN)) / 3), const("b2", rng.normal(size=CLASSES) * 0.1)],
       "logits", transB=1)
    return classifier_model(nodes, inits, f"dense_bn_{form}", SHAPE, CLASSES, dtype)


def _input(seed, rule, batch=2):
    return random_input(200 + seed, rule, SHAPE, batch)




def _fold(model):
    return C.fold_affine(C.fold_batchnorm(_copy(model)))


# ---------------------------------------------------------------------------
# 1. exporter independence
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["positive", "paper"])
@pytest.mark.parametrize("seed", range(3))
def test_same_maps_whatever_the_exporter_wrote(seed, rule):
    """Every form gives the logits and the MWP / c-MWP maps of the network with the BatchNorm folded by
    hand, at the input, the Conv's ReLU, the dense layer's input, the BatchNorm's output and its ReLU."""
    x = _input(seed, rule)
    signal = np.random.default_rng(seed).random((2, CLASSES)).astype(np.float32)
    results = {form: Exciter(dense_bn_net(seed, form), LAYERS, methods=("mwp", "cmwp"), rule=rule).explain(x, signal)
               for form in FORMS}
    assert_same_explanations(results, "folded", UNFOLDED, LAYERS)


def test_the_forms_really_differ_before_canonicalization():
    """The files differ (so the test above compares something), and a negative gamma makes the
    per-element rules give other maps than the fold: the unfolded head, excited as it is written,
    differs from the folded one at the Conv's ReLU."""
    counts = {form: _counts(dense_bn_net(0, form)) for form in FORMS}
    assert counts["batchnorm"]["BatchNormalization"] == 1 and counts["keras"]["MatMul"] == 1
    assert sum(counts["keras_sub_div"].get(o, 0) for o in ("Sub", "Div", "Mul", "Add")) == 5
    assert counts["folded"] == {"Conv": 1, "Relu": 2, "MaxPool": 1, "Flatten": 1, "Gemm": 2}
    x, signal = _input(0, "positive"), np.random.default_rng(0).random((2, CLASSES)).astype(np.float32)
    folded = Exciter(dense_bn_net(0, "folded"), ["crelu"]).explain(x, signal).maps["mwp"]["crelu"]
    saved = C.PASSES[:]
    try:   # the same model without the two folding passes
        C.PASSES[:] = [p for p in saved if p not in (C.fold_batchnorm, C.fold_affine)]
        unfolded = Exciter(dense_bn_net(0, "keras"), ["crelu"]).explain(x, signal).maps["mwp"]["crelu"]
    finally:
        C.PASSES[:] = saved
    assert np.abs(unfolded - folded).max() > 1e-3 * np.abs(folded).max()


# ---------------------------------------------------------------------------
# 2. vs the float64 reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["positive", "paper"])
@pytest.mark.parametrize("form", UNFOLDED)
@pytest.mark.parametrize("seed", range(2))
def test_unfolded_model_matches_reference(seed, form, rule):
    model = dense_bn_net(seed, form)
    x = _input(seed, rule)
    signal = np.random.default_rng(seed + 7).random((2, CLASSES)).astype(np.float32)
    ref = Reference(model)
    assert _counts(ref.model) == {"Conv": 1, "Relu": 2, "MaxPool": 1, "Flatten": 1, "Gemm": 2}   # folded on its own
    assert_matches_reference(model, ref, LAYERS, x, signal, rule, form)


# ---------------------------------------------------------------------------
# 3. what is not folded
# ---------------------------------------------------------------------------
RNG = np.random.default_rng(11)
W = RNG.normal(size=(4, 6)).astype(np.float32)
B = RNG.normal(size=4).astype(np.float32)
BN = {"g": RNG.uniform(-1, 1, 4), "be": RNG.normal(size=4), "mu": RNG.normal(size=4), "v": RNG.uniform(0.5, 2, 4)}


def _dense_then(nodes, consts, outputs=None, layer="gemm", bias=True):
    """x -> dense layer (4 features, output ``g``) -> ``nodes``; the last node's output is the graph
    output. ``layer``: gemm (x (2, 6), transB=1), gemm_transA (x (6, 2)), matmul (x (2, 6)),
    matmul_3d (x (2, 3, 6))."""
    shapes = {"gemm": [2, 6], "gemm_transA": [6, 2], "matmul": [2, 6], "matmul_3d": [2, 3, 6]}
    inits = [numpy_helper.from_array(W if layer.startswith("gemm") else W.T.copy(), "W")]
    if layer.startswith("gemm"):
        attrs = {"transB": 1, **({"transA": 1} if layer == "gemm_transA" else {})}
        dense = helper.make_node("Gemm", ["x", "W"] + (["B"] if bias else []), ["g"], name="dense", **attrs)
        inits += [numpy_helper.from_array(B, "B")] if bias else []
    else:
        dense = helper.make_node("MatMul", ["x", "W"], ["g"], name="dense")
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()]
    return _model([dense] + nodes, inits, outputs=_outputs(nodes, outputs), shape=shapes[layer])


def _x(layer):
    shapes = {"gemm": (2, 6), "gemm_transA": (6, 2), "matmul": (2, 6), "matmul_3d": (2, 3, 6)}
    return np.random.default_rng(3).normal(size=shapes[layer]).astype(np.float32)


def _bn_node(x="g", y="y"):
    return helper.make_node("BatchNormalization", [x, "g_", "be", "mu", "v"], [y], epsilon=1e-3)


BN_CONSTS = {"g_": BN["g"], "be": BN["be"], "mu": BN["mu"], "v": BN["v"]}
NOT_FOLDED = {
    "two_consumers": ([helper.make_node("Mul", ["g", "k"], ["y"]), helper.make_node("Relu", ["g"], ["r"]),
                       helper.make_node("Add", ["y", "r"], ["z"])], {"k": RNG.normal(size=4)}, None, "gemm"),
    "dense_is_graph_output": ([helper.make_node("Mul", ["g", "k"], ["y"])], {"k": RNG.normal(size=(1, 4))}, ["y", "g"], "gemm"),
    "per_element": ([helper.make_node("Mul", ["g", "k"], ["y"])], {"k": RNG.normal(size=(2, 4))}, None, "gemm"),
    "per_sample": ([helper.make_node("Add", ["g", "k"], ["y"])], {"k": RNG.normal(size=(2, 1))}, None, "matmul"),
    "rank_above_output": ([helper.make_node("Add", ["g", "k"], ["y"])], {"k": RNG.normal(size=(1, 1, 4))}, None, "gemm"),
    "div_by_zero": ([helper.make_node("Div", ["g", "k"], ["y"])], {"k": [0.5, 0.0, 2.0, 1.0]}, None, "gemm"),
    "constant_divided_by_dense": ([helper.make_node("Div", ["k", "g"], ["y"])], {"k": 2.0}, None, "matmul"),
    "transA": ([helper.make_node("Mul", ["g", "k"], ["y"])], {"k": RNG.normal(size=4)}, None, "gemm_transA"),
    "matmul_3d_input": ([helper.make_node("Mul", ["g", "k"], ["y"])], {"k": RNG.normal(size=4)}, None, "matmul_3d"),
    "batchnorm_two_consumers": ([_bn_node(), helper.make_node("Relu", ["g"], ["r"]), helper.make_node("Add", ["y", "r"], ["z"])],
                                BN_CONSTS, None, "gemm"),
    "batchnorm_dense_is_graph_output": ([_bn_node()], BN_CONSTS, ["y", "g"], "matmul"),
    "batchnorm_transA": ([_bn_node()], BN_CONSTS, None, "gemm_transA"),
}


@pytest.mark.parametrize("case", sorted(NOT_FOLDED))
def test_not_folded(case):
    nodes, consts, outputs, layer = NOT_FOLDED[case]
    model = _dense_then(nodes, consts, outputs, layer)
    _ort(model, _x(layer))   # a valid model
    out = _fold(model)
    assert _counts(out) == _counts(model) and [n.input[1] for n in out.graph.node if n.op_type in ("Gemm", "MatMul")] == ["W"]
    view = C.canonicalize(model, logits=nodes[-1].output[0])       # the whole pipeline leaves it too
    assert _counts(view.model) == _counts(model) and view.folded == {}


def test_a_gemm_whose_bias_varies_over_the_batch_is_left():
    """C of shape (N, 1) is a per-sample offset, not a per-feature bias: the Gemm does not fold."""
    model = _dense_then([helper.make_node("Mul", ["g", "k"], ["y"])], {"k": RNG.normal(size=4)})
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "B"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([[1.0], [-2.0]], np.float32), "B"))
    _ort(model, _x("gemm"))
    assert _counts(_fold(model)) == _counts(model)


def test_a_chain_stops_at_the_first_op_it_cannot_fold():
    """MatMul -> Add bias (folded) -> Mul per feature (folded) -> Add per element (left)."""
    model = _dense_then([helper.make_node("Add", ["g", "b"], ["a"]), helper.make_node("Mul", ["a", "s"], ["m"]),
                         helper.make_node("Add", ["m", "p"], ["y"])],
                        {"b": RNG.normal(size=4), "s": RNG.normal(size=(1, 4)), "p": RNG.normal(size=(2, 4))}, layer="matmul")
    out = C.fold_affine(_copy(model))
    assert _counts(out) == {"Gemm": 1, "Add": 1}
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert gemm.output[0] == "m" and C.folded_names(out) == {"g": "m", "a": "m"}
    np.testing.assert_allclose(_ort(out, _x("matmul"))[0], _ort(model, _x("matmul"))[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# 4. the passes alone
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("form,dropped,trans_b", [("batchnorm", 1, 1), ("gemm_mul_add", 2, 0), ("keras", 3, 0),
                                                  ("keras_sub_div", 5, 0), ("bias_add_batchnorm", 2, 0)])
def test_passes_keep_the_forward_outputs(form, dropped, trans_b):
    """One Gemm per dense layer, fewer nodes, the same outputs; the folded Gemm has alpha = beta = 1 (no
    attribute), transB as the Gemm had it (0 for a MatMul), and the BatchNorm's output name."""
    model = dense_bn_net(3, form)
    out = _fold(model)
    onnx.checker.check_model(out, full_check=True)
    assert len(out.graph.node) == len(model.graph.node) - dropped
    assert _counts(out) == {"Conv": 1, "Relu": 2, "MaxPool": 1, "Flatten": 1, "Gemm": 2}
    gemm = next(n for n in out.graph.node if n.output[0] == "bn")
    assert gemm.op_type == "Gemm" and {a.name for a in gemm.attribute} <= {"transB"}
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert C.attr(gemm, "transB", 0) == trans_b and values[gemm.input[1]].shape == ((HIDDEN, 72) if trans_b else (72, HIDDEN))
    assert not {"w1", "b1", "scale", "shift", "gamma", "mean"} & set(values)   # replaced constants dropped
    x = np.random.default_rng(9).normal(size=(3, *SHAPE)).astype(np.float32)
    np.testing.assert_allclose(_ort(out, x)[0], _ort(model, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_scalars_and_constant_minus_x_on_a_gemm(bias):
    """Gemm (alpha 0.5, beta 2) -> s * x -> k - x -> x / d -> t + x: with W = alpha W_B^T, b = beta C,
    W' = -s W / d, b' = (k - s b) / d + t per output feature; a bias-free Gemm gets one."""
    s, d, k, t = 2.5, -0.5, RNG.normal(size=4), RNG.normal(size=(1, 4))
    model = _dense_then([helper.make_node("Mul", ["s", "g"], ["m"]), helper.make_node("Sub", ["k", "m"], ["f"]),
                         helper.make_node("Div", ["f", "d"], ["q"]), helper.make_node("Add", ["t", "q"], ["y"])],
                        {"s": s, "k": k, "d": [d], "t": t}, bias=bias)
    dense = model.graph.node[0]
    dense.attribute.extend([helper.make_attribute("alpha", 0.5), helper.make_attribute("beta", 2.0)])
    out = C.fold_affine(_copy(model))
    assert _counts(out) == {"Gemm": 1}
    (gemm,) = out.graph.node
    assert gemm.output[0] == "y" and len(gemm.input) == 3 and C.attr(gemm, "transB") == 1
    values = {tn.name: numpy_helper.to_array(tn) for tn in out.graph.initializer}
    b = 2.0 * B.astype(np.float64) if bias else np.zeros(4)
    np.testing.assert_allclose(values[gemm.input[1]], -s * 0.5 * W.astype(np.float64) / d, rtol=1e-6)
    np.testing.assert_allclose(values[gemm.input[2]], (k.astype(np.float32) - s * b) / d + t.astype(np.float32).ravel(),
                               rtol=1e-5)
    assert set(values) == set(gemm.input[1:]) and C.folded_names(out) == {"g": "y", "m": "y", "f": "y", "q": "y"}
    np.testing.assert_allclose(_ort(out, _x("gemm"))[0], _ort(model, _x("gemm"))[0], rtol=1e-5, atol=1e-5)


def test_float16_dense_stays_float16():
    model = dense_bn_net(4, "keras_sub_div", dtype=np.float16)
    out = _fold(model)
    assert len(out.graph.node) == len(model.graph.node) - 5
    gemm = next(n for n in out.graph.node if n.output[0] == "bn")
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert all(values[i].dtype == np.float16 for i in gemm.input[1:])
    x = np.random.default_rng(9).normal(size=(2, *SHAPE)).astype(np.float16)
    got, want = _ort(out, x)[0].astype(np.float32), _ort(model, x)[0].astype(np.float32)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


def test_batchnorm_then_scale_folds_both():
    """MatMul -> BatchNormalization -> Mul by a scalar: both passes, one Gemm, the names recorded."""
    model = _dense_then([_bn_node(y="bn"), helper.make_node("Mul", ["bn", "s"], ["y"])], dict(BN_CONSTS, s=-3.0),
                        layer="matmul")
    out = _fold(model)
    assert _counts(out) == {"Gemm": 1} and C.folded_names(out) == {"g": "y", "bn": "y"}
    np.testing.assert_allclose(_ort(out, _x("matmul"))[0], _ort(model, _x("matmul"))[0], rtol=1e-4, atol=1e-5)


def test_conv_bias_add_then_batchnorm_folds_too():
    """The chain may end in a BatchNormalization for a Conv as well: Conv -> Add per channel ->
    BatchNormalization becomes one Conv with the same outputs."""
    rng = np.random.default_rng(6)
    w, x = rng.normal(size=(4, 3, 3, 3)).astype(np.float32), rng.normal(size=(2, 3, 7, 6)).astype(np.float32)
    consts = {"W": w, "k": rng.normal(size=(1, 4, 1, 1)), **BN_CONSTS}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "k"], ["a"], name="add"), _bn_node("a", "y")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 7, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = _fold(model)
    assert _counts(out) == {"Conv": 1} and C.folded_names(out) == {"c": "y", "a": "y"}
    np.testing.assert_allclose(_ort(out, x)[0], _ort(model, x)[0], rtol=1e-4, atol=1e-5)
    assert _counts(Reference(model).model) == {"Conv": 1}   # the reference folds it on its own


# ---------------------------------------------------------------------------
# names that vanish by folding
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("form,layer", [("batchnorm", "fc1"), ("keras", "fc1_mm"), ("keras", "fc1"), ("bias_add_batchnorm", "fc1"),
                                        ("keras_sub_div", "bn_gamma"), ("gemm_mul_add", "bn_scaled")])
def test_a_folded_layer_name_is_one_clear_error(form, layer, tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(dense_bn_net(0, form), str(path))
    res = CliRunner().invoke(app, ["export", str(path), "-o", str(tmp_path / "o.onnx"), "--layer", layer])
    line = _one_error_line(res)
    assert f"layer {layer!r} was folded into the Gemm that now outputs 'bn'" in line, line
    with pytest.raises(ExciteError, match="was folded into the Gemm that now outputs 'bn'"):
        Exciter(str(path), [layer])


def test_a_folded_logits_name_is_one_clear_error():
    with pytest.raises(ExciteError, match="logits 'bn_scaled' was folded into the Gemm that now outputs 'bn'"):
        C.canonicalize(dense_bn_net(0, "keras"), logits="bn_scaled")


def _torch_export(module, x):
    """``module`` exported by PyTorch's TorchScript exporter in eval mode, without its constant
    folding (so the BatchNorms stay nodes, as a user's export may have them)."""
    import io
    import warnings

    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the legacy exporter announces its deprecation
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=17, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return onnx.load_from_string(buf.getvalue())


def test_pytorch_linear_batchnorm1d_export_gives_the_maps_of_the_folded_network():
    """A real exporter's output: PyTorch writes Conv -> BatchNorm2d and Linear -> BatchNorm1d as
    BatchNormalization nodes. Canonicalized, both are folded (no BatchNormalization left), and the
    maps equal those of the same network with both BatchNorms folded into the weights by hand in
    torch before export, for both rules, MWP and c-MWP, at the input."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 5))
    with torch.no_grad():
        for bn in (net[1], net[5]):   # non-trivial statistics, some negative gammas
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.normal_()
    net.eval()
    folded = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                 torch.nn.Linear(4 * 6 * 6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5)).eval()
    with torch.no_grad():
        for layer, bn, target in ((net[0], net[1], folded[0]), (net[4], net[5], folded[3])):
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            target.weight.copy_(layer.weight * s.reshape(-1, *([1] * (layer.weight.dim() - 1))))
            target.bias.copy_((layer.bias - bn.running_mean) * s + bn.bias)
        folded[5].load_state_dict(net[7].state_dict())
    x = torch.randn(2, 3, 8, 8)
    exported, by_hand = _torch_export(net, x), _torch_export(folded, x)
    assert _counts(exported)["BatchNormalization"] == 2
    assert "BatchNormalization" not in _counts(C.canonicalize(exported).model)
    signal = np.random.default_rng(3).random((2, 5)).astype(np.float32)
    for rule in ("positive", "paper"):
        xs = x.numpy() if rule == "positive" else np.abs(x.numpy())
        got = Exciter(exported, ["input"], methods=("mwp", "cmwp"), rule=rule).explain(xs, signal)
        want = Exciter(by_hand, ["input"], methods=("mwp", "cmwp"), rule=rule).explain(xs, signal)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-4, atol=1e-5)
        for method in ("mwp", "cmwp"):
            exp = want.maps[method]["input"]
            assert np.abs(got.maps[method]["input"] - exp).max() <= 1e-4 * np.abs(exp).max(), (rule, method)
