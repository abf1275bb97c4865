"""A BatchNorm written decomposed after a Conv (tf2onnx / paddle2onnx: Sub mean, Div std, Mul gamma,
Add beta, or only Mul + Add) is folded into the Conv by ``canonicalize.fold_affine``, so the maps do
not depend on how the exporter wrote the BatchNorm: the same network written three ways gives the same
maps; the maps match the float64 reference (tests/excitation_ref.py, which folds the chain on its own);
what the spec leaves alone stays; names that vanish by folding give one clear error."""
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from excitation_ref import Reference
from test_canonicalize_passes import _copy, _model
from onnx_excite import Exciter
from onnx_excite.graph import canonicalize as C
from onnx_excite.cli.app import app
from onnx_excite.errors import ExciteError

FORMS = ("batchnorm", "sub_div_mul_add", "mul_add")
EPS = 1e-3
#: (cin, cout, kernel, stride, group, bias, relu after the BatchNorm)
BLOCKS = [(3, 6, 3, 1, 1, True, True),
          (6, 8, 3, 2, 1, True, False),     # a linear bottleneck: signed output feeding the next Conv
          (8, 8, 3, 1, 8, False, True),     # depthwise, bias-free: the fold gives it a bias
          (8, 7, 1, 1, 1, True, True)]
#: tensors every form has (the BatchNorm outputs keep their names; the Conv outputs vanish by folding)
LAYERS = ["input", "bn1", "relu1", "bn2", "bn3", "relu3", "relu4"]
SHAPE = (3, 10, 9)


def conv_bn_net(seed: int, form: str, dtype=np.float32) -> onnx.ModelProto:
    """The same random Conv + BatchNorm network (negative gammas included) with each BatchNorm written
    as ``BatchNormalization`` (``batchnorm``), as tf2onnx / paddle2onnx decompose it
    (``(x - mean) / sqrt(var + eps) * gamma + beta``) or as one scale and shift (``mul_add``).
    Constants alternate between the (1, C, 1, 1) and (C, 1, 1) layouts."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, value, shape=None):
        value = np.asarray(value, np.float64)
        inits.append(numpy_helper.from_array((value.reshape(shape) if shape else value).astype(dtype), name))
        return name

    def op(op_type, inputs, out, **attrs):
        nodes.append(helper.make_node(op_type, inputs, [out], name=f"n_{out}", **attrs))
        return out

    x = "input"
    for i, (cin, cout, k, stride, group, bias, relu) in enumerate(BLOCKS, 1):
        w = rng.normal(size=(cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)
        ins = [x, const(f"w{i}", w)] + ([const(f"b{i}", rng.normal(size=cout) * 0.1)] if bias else [])
        c = op("Conv", ins, f"conv{i}", kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2, group=group)
        sign = np.where(rng.random(cout) < 0.4, -1.0, 1.0)
        sign[0] = -1.0                                    # at least one negative gamma per BatchNorm
        gamma, beta = sign * rng.uniform(0.3, 1.5, cout), rng.normal(size=cout) * 0.2
        mean, var = rng.normal(size=cout) * 0.2, rng.uniform(0.3, 2.0, cout)
        out = f"bn{i}"
        layout = (1, cout, 1, 1) if i % 2 else (cout, 1, 1)
        if form == "batchnorm":
            op("BatchNormalization", [c, *(const(f"{p}{i}", v) for p, v in
                                           (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var)))],
               out, epsilon=EPS)
        elif form == "sub_div_mul_add":
            std = np.sqrt(var.astype(dtype) + dtype(EPS)).astype(np.float64)
            centred = op("Sub", [c, const(f"mean{i}", mean, layout)], f"bn{i}_centred")
            scaled = op("Div", [centred, const(f"std{i}", std, layout)], f"bn{i}_scaled")
            op("Add", [op("Mul", [scaled, const(f"gamma{i}", gamma, layout)], f"bn{i}_gamma"),
                       const(f"beta{i}", beta, layout)], out)
        else:
            scale = gamma / np.sqrt(var + EPS)
            op("Add", [op("Mul", [c, const(f"scale{i}", scale, layout)], f"bn{i}_scaled"),
                       const(f"shift{i}", beta - mean * scale, layout)], out)
        x = op("Relu", [out], f"relu{i}") if relu else out
    flat = op("Flatten", [op("GlobalAveragePool", [x], "gap")], "flat")
    op("Gemm", [flat, const("fc_w", rng.normal(size=(5, 7)) / 2), const("fc_b", rng.normal(size=5) * 0.1)],
       "logits", transB=1)
    return classifier_model(nodes, inits, f"conv_bn_{form}", SHAPE, 5, dtype)


def classifier_model(nodes, inits, name, shape, classes, dtype=np.float32):
    """``nodes`` from "input" (N, *shape) to "logits" (N, classes) as a checked opset-17 model."""
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", elem, ["N", *shape])],
                              [helper.make_tensor_value_info("logits", elem, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def random_input(seed, rule, shape, batch=2):
    """A signed input, |x| for the paper rule (its Z = sum a W+ cancels on signed inputs)."""
    x = np.random.default_rng(seed).normal(size=(batch, *shape)).astype(np.float32)
    return np.abs(x) if rule == "paper" else x


def _input(seed, rule, batch=2):
    return random_input(100 + seed, rule, SHAPE, batch)


def _ort(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _counts(model):
    out = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


# ---------------------------------------------------------------------------
# 1. exporter independence
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["positive", "paper"])
@pytest.mark.parametrize("seed", range(3))
def test_same_maps_whatever_the_exporter_wrote(seed, rule):
    """BatchNormalization, Sub/Div/Mul/Add and Mul/Add: equal logits and equal MWP / c-MWP maps at the
    input and at the inner layers (the BatchNorms' outputs and the ReLUs after them)."""
    x = _input(seed, rule)
    signal = np.random.default_rng(seed).random((2, 5)).astype(np.float32)
    results = {form: Exciter(conv_bn_net(seed, form), LAYERS, methods=("mwp", "cmwp"), rule=rule).explain(x, signal)
               for form in FORMS}
    assert_same_explanations(results, "batchnorm", FORMS[1:], LAYERS)


def assert_same_explanations(results, base, forms, layers):
    """``results[form]`` (Explanations of one network written in several forms) equal
    ``results[base]``: logits, MWP and c-MWP maps at ``layers`` (to 1e-5 of each map's peak)."""
    want = results[base]
    for form in forms:
        got = results[form]
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-6)
        for method in ("mwp", "cmwp"):
            for layer in layers:
                exp = want.maps[method][layer]
                scale = max(np.abs(exp).max(), 1e-12)
                err = np.abs(got.maps[method][layer] - exp).max()
                assert err <= 1e-5 * scale, (form, method, layer, err / scale)


def test_the_forms_really_differ_before_canonicalization():
    """The three files are written differently (so the test above compares something): 4 BatchNorms,
    16 and 8 element-wise ops."""
    assert _counts(conv_bn_net(0, "batchnorm"))["BatchNormalization"] == 4
    assert sum(_counts(conv_bn_net(0, "sub_div_mul_add")).get(o, 0) for o in ("Sub", "Div", "Mul", "Add")) == 16
    assert sum(_counts(conv_bn_net(0, "mul_add")).get(o, 0) for o in ("Mul", "Add")) == 8


# ---------------------------------------------------------------------------
# 2. vs the float64 reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["positive", "paper"])
@pytest.mark.parametrize("form", FORMS[1:])
@pytest.mark.parametrize("seed", range(2))
def test_decomposed_model_matches_reference(seed, form, rule):
    model = conv_bn_net(seed, form)
    x = _input(seed, rule)
    signal = np.random.default_rng(seed + 7).random((2, 5)).astype(np.float32)
    ref = Reference(model)
    assert not any(n.op_type in ("Sub", "Div", "Mul") for n in ref.nodes)   # the reference folded on its own
    assert_matches_reference(model, ref, LAYERS, x, signal, rule, form)


def assert_matches_reference(model, ref, layers, x, signal, rule, label):
    """Logits, MWP and c-MWP maps of the library at ``layers`` against the float64 reference
    ``ref`` (to 1e-4 of the larger of the map's and P's peak)."""
    res = Exciter(model, layers, methods=("mwp", "cmwp"), rule=rule).explain(x, signal)
    np.testing.assert_allclose(res.logits, ref.forward(x)[ref.entry()], rtol=1e-4, atol=1e-5)
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, signal, layers, rule=rule, contrastive=contrastive)
        for layer in layers:
            exp = want["map"][layer]
            scale = max(np.abs(exp).max(), np.abs(want["P"][layer]).max())
            assert np.abs(res.maps[method][layer] - exp).max() <= 1e-4 * scale, (label, method, layer)


# ---------------------------------------------------------------------------
# 3. what is not folded
# ---------------------------------------------------------------------------
RNG = np.random.default_rng(5)
W = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
B = RNG.normal(size=4).astype(np.float32)
X = RNG.normal(size=(2, 3, 7, 6)).astype(np.float32)


def _conv_then(nodes, consts, outputs=None, bias=True):
    """x -> Conv (4 channels, 7 x 6) -> ``nodes``; the last node's output is the graph output."""
    conv = helper.make_node("Conv", ["x", "W"] + (["B"] if bias else []), ["c"], name="conv", pads=[1, 1, 1, 1])
    inits = [numpy_helper.from_array(W, "W")] + ([numpy_helper.from_array(B, "B")] if bias else [])
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()]
    return _model([conv] + nodes, inits, outputs=_outputs(nodes, outputs), shape=(2, 3, 7, 6))


def _outputs(nodes, names=None):
    """Untyped-shape float value infos for ``names`` (default: the last node's output)."""
    return [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in (names or [nodes[-1].output[0]])]


NOT_FOLDED = {
    "per_pixel": ([helper.make_node("Mul", ["c", "k"], ["y"])], {"k": RNG.normal(size=(1, 4, 7, 6))}, None),
    "per_pixel_shared_over_channels": ([helper.make_node("Add", ["c", "k"], ["y"])], {"k": RNG.normal(size=(1, 1, 7, 6))}, None),
    "vector_along_width": ([helper.make_node("Mul", ["c", "k"], ["y"])], {"k": RNG.normal(size=6)}, None),
    "rank_above_output": ([helper.make_node("Add", ["c", "k"], ["y"])], {"k": RNG.normal(size=(1, 1, 4, 1, 1))}, None),
    "per_channel_on_batch_axis": ([helper.make_node("Mul", ["c", "k"], ["y"])], {"k": [[[[1.5]]], [[[2.0]]]]}, None),
    "two_consumers": ([helper.make_node("Mul", ["c", "k"], ["y"]), helper.make_node("Relu", ["c"], ["r"]),
                       helper.make_node("Add", ["y", "r"], ["z"])], {"k": RNG.normal(size=(1, 4, 1, 1))}, None),
    "square": ([helper.make_node("Mul", ["c", "c"], ["y"])], {}, None),
    "div_by_zero": ([helper.make_node("Div", ["c", "k"], ["y"])], {"k": [[[0.5]], [[0.0]], [[2.0]], [[1.0]]]}, None),
    "constant_divided_by_conv": ([helper.make_node("Div", ["k", "c"], ["y"])], {"k": 2.0}, None),
    "conv_is_graph_output": ([helper.make_node("Mul", ["c", "k"], ["y"])], {"k": RNG.normal(size=(4, 1, 1))}, ["y", "c"]),
}


@pytest.mark.parametrize("case", sorted(NOT_FOLDED))
def test_not_folded(case):
    nodes, consts, outputs = NOT_FOLDED[case]
    model = _conv_then(nodes, consts, outputs)
    _ort(model, X)   # a valid model
    out = C.fold_affine(_copy(model))
    assert _counts(out) == _counts(model) and [n.input[1] for n in out.graph.node if n.op_type == "Conv"] == ["W"]
    view = C.canonicalize(model, logits=nodes[-1].output[0])       # the whole pipeline leaves it too
    assert _counts(view.model) == _counts(model) and view.folded == {}


def test_a_chain_stops_at_the_first_op_it_cannot_fold():
    """Conv -> Mul per channel (folded) -> Add per pixel (left): one Conv and the Add, same outputs."""
    model = _conv_then([helper.make_node("Mul", ["c", "s"], ["m"]), helper.make_node("Add", ["m", "p"], ["y"])],
                       {"s": RNG.normal(size=(1, 4, 1, 1)), "p": RNG.normal(size=(1, 1, 7, 6))})
    out = C.fold_affine(_copy(model))
    assert _counts(out) == {"Conv": 1, "Add": 1}
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert conv.output[0] == "m" and C.folded_names(out) == {"c": "m"}
    np.testing.assert_allclose(_ort(out, X)[0], _ort(model, X)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# 4. scalars and c - x
# ---------------------------------------------------------------------------
SCALAR_CHAIN = ([helper.make_node("Mul", ["s", "c"], ["m"]),          # s * x, scalar
                 helper.make_node("Sub", ["k", "m"], ["flipped"]),     # c - x, per channel (C, 1, 1)
                 helper.make_node("Div", ["flipped", "d"], ["q"]),     # x / d, scalar of rank 1
                 helper.make_node("Add", ["t", "q"], ["y"])],          # c + x, per channel (1, C, 1, 1)
                {"s": 2.5, "k": RNG.normal(size=(4, 1, 1)), "d": [-0.5], "t": RNG.normal(size=(1, 4, 1, 1))})


@pytest.mark.parametrize("bias", [True, False])
def test_scalars_and_constant_minus_x(bias):
    """W' = -s W / d and b' = (k - s b) / d + t, per output channel; a bias-free Conv gets one."""
    nodes, consts = SCALAR_CHAIN
    model = _conv_then(nodes, consts, bias=bias)
    out = C.fold_affine(_copy(model))
    assert _counts(out) == {"Conv": 1}
    (conv,) = out.graph.node
    assert conv.output[0] == "y" and len(conv.input) == 3
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    s, k, d, t = 2.5, consts["k"].reshape(4), -0.5, consts["t"].reshape(4)
    b = B.astype(np.float64) if bias else np.zeros(4)
    np.testing.assert_allclose(values[conv.input[1]], -s * W.astype(np.float64) / d, rtol=1e-6)
    np.testing.assert_allclose(values[conv.input[2]], (k.astype(np.float32) - s * b) / d + t.astype(np.float32), rtol=1e-5)
    assert values[conv.input[1]].dtype == np.float32 and set(values) == set(conv.input[1:])   # old constants dropped
    assert C.folded_names(out) == {"c": "y", "m": "y", "flipped": "y", "q": "y"}
    np.testing.assert_allclose(_ort(out, X)[0], _ort(model, X)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["positive", "paper"])
def test_scalar_chain_maps_match_reference(rule):
    """The chain in a classifier: maps at the input and at the chain's end match the reference."""
    nodes, consts = SCALAR_CHAIN
    head = [helper.make_node("Relu", ["y"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    model = _conv_then(nodes + head, dict(consts, fc=RNG.normal(size=(3, 4))))
    x = np.abs(X) if rule == "paper" else X
    signal = np.array([[1, 0, 0], [0.2, 0.5, 0.3]], np.float32)
    res = Exciter(model, ["x", "y", "r"], methods=("mwp", "cmwp"), rule=rule).explain(x, signal)
    ref = Reference(model)
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, signal, ["x", "y", "r"], rule=rule, contrastive=contrastive)
        for layer in ("x", "y", "r"):
            exp = want["map"][layer]
            scale = max(np.abs(exp).max(), np.abs(want["P"][layer]).max())
            assert np.abs(res.maps[method][layer] - exp).max() <= 1e-4 * scale, (method, layer)


# ---------------------------------------------------------------------------
# 5. the pass alone
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("form,dropped", [("sub_div_mul_add", 16), ("mul_add", 8)])
def test_pass_keeps_the_forward_outputs(form, dropped):
    model = conv_bn_net(3, form)
    out = C.fold_affine(_copy(model))
    onnx.checker.check_model(out, full_check=True)
    assert len(out.graph.node) == len(model.graph.node) - dropped
    assert _counts(out) == {"Conv": 4, "Relu": 3, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    x = np.random.default_rng(9).normal(size=(3, *SHAPE)).astype(np.float32)
    np.testing.assert_allclose(_ort(out, x)[0], _ort(model, x)[0], rtol=1e-5, atol=1e-5)
    assert [n.output[0] for n in out.graph.node if n.op_type == "Conv"] == ["bn1", "bn2", "bn3", "bn4"]


def test_float16_model_stays_float16():
    model = conv_bn_net(4, "sub_div_mul_add", dtype=np.float16)
    out = C.fold_affine(_copy(model))
    assert len(out.graph.node) == len(model.graph.node) - 16
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert all(values[i].dtype == np.float16 for n in convs for i in n.input[1:])
    x = np.random.default_rng(9).normal(size=(2, *SHAPE)).astype(np.float16)
    got, want = _ort(out, x)[0].astype(np.float32), _ort(model, x)[0].astype(np.float32)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


def test_batchnorm_then_scale_folds_both():
    """Conv -> BatchNormalization -> Mul by a scalar: fold_batchnorm then fold_affine, one Conv; the
    Conv's original output is recorded as folded into the last tensor. (fold_batchnorm alone, on unnamed
    nodes, once dropped every unnamed node with the BatchNorm.)"""
    rng = np.random.default_rng(2)
    bn = {"g": rng.uniform(-1, 1, 4), "be": rng.normal(size=4), "mu": rng.normal(size=4), "v": rng.uniform(0.5, 2, 4)}
    model = _conv_then([helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "v"], ["bn"]),
                        helper.make_node("Mul", ["bn", "s"], ["y"])], dict(bn, s=-3.0))   # unnamed, as before name_nodes
    out = C.fold_affine(C.fold_batchnorm(_copy(model)))
    assert _counts(out) == {"Conv": 1} and C.folded_names(out) == {"c": "y", "bn": "y"}
    np.testing.assert_allclose(_ort(out, X)[0], _ort(model, X)[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# names that vanish by folding; the user's model
# ---------------------------------------------------------------------------
def _one_error_line(result):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("form,layer,into", [("sub_div_mul_add", "conv2", "bn2"), ("sub_div_mul_add", "bn3_scaled", "bn3"),
                                             ("mul_add", "conv1", "bn1"), ("batchnorm", "conv4", "bn4")])
def test_a_folded_layer_name_is_one_clear_error(form, layer, into, tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(conv_bn_net(0, form), str(path))
    res = CliRunner().invoke(app, ["export", str(path), "-o", str(tmp_path / "o.onnx"), "--layer", layer])
    line = _one_error_line(res)
    assert f"layer {layer!r} was folded into" in line and repr(into) in line, line
    with pytest.raises(ExciteError, match=f"was folded into the Conv that now outputs {into!r}"):
        Exciter(str(path), [layer])


def test_a_folded_logits_name_is_one_clear_error():
    with pytest.raises(ExciteError, match="logits 'bn2_gamma' was folded into the Conv that now outputs 'bn2'"):
        C.canonicalize(conv_bn_net(0, "sub_div_mul_add"), logits="bn2_gamma")


def test_user_model_is_never_modified(tmp_path):
    """canonicalize works on a copy: the file (hashed) and an in-memory proto are unchanged, and the
    fold records stay out of the canonical and the companion model."""
    from onnx_excite.graph.builder import build_excitation_model

    model = conv_bn_net(1, "sub_div_mul_add")
    path = tmp_path / "net.onnx"
    onnx.save(model, str(path))
    before, proto_before = hashlib.sha256(path.read_bytes()).hexdigest(), model.SerializeToString()
    res = CliRunner().invoke(app, ["export", str(path), "-o", str(tmp_path / "o.onnx"), "--layer", "bn2"])
    assert res.exit_code == 0, res.output
    Exciter(str(path), LAYERS).explain(_input(1, "positive"), [1, 2])
    built = build_excitation_model(model, LAYERS)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert model.SerializeToString() == proto_before
    view = C.canonicalize(model)
    assert view.folded and not C.folded_names(view.model) and not C.folded_names(built.model)
    assert not any(p.key.startswith(C.FOLDED_KEY) for p in onnx.load(str(tmp_path / "o.onnx")).metadata_props)


def test_batchnorm_in_training_mode_is_neither_folded_nor_excited():
    """BatchNormalization(training_mode=1) normalises with the batch's own statistics: no fixed
    affine map to fold or to excite through. The fold leaves it; the rule refuses it with one
    line that says what to do."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=(5, 144)).astype(np.float32), "F")]
    inits += [numpy_helper.from_array(np.full(4, v, np.float32), n) for n, v in (("g", 1.5), ("b", 0.1), ("m", 0.2), ("v", 2.0))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn", "rm", "rv"], name="bnode",
                              training_mode=1),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "F"], ["y"], name="fc", transB=1)]
    model = helper.make_model(helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert _counts(C.fold_batchnorm(_copy(model)))["BatchNormalization"] == 1
    with pytest.raises(ExciteError, match="training_mode=1.*eval mode"):
        Exciter(model, ["x"])
