"""Ops seen in third-party exports (issue 11), in graphs built like the exporters write them, vs the
float64 reference (tests/excitation_ref.py): Sub / Div by constants (decomposed BatchNorm, paddle's
hard-swish, in-graph pixel normalisation of a uint8 NHWC input), Pad edge / reflect / wrap, ReduceMean /
ReduceMax over NHWC axes, Resize (nearest, linear; input resize, FPN head) and opset-9 Upsample,
GlobalMaxPool, Slice on channels, Split, Sum of three, Mean, Max, Expand, Tile, Einsum (1x1 conv, dense).

Every graph: channel-resolved P at every layer, the input included, for both rules, MWP and c-MWP;
``check`` reports nothing; conservation where every op on the way conserves P."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from excitation_ref import Reference
from onnx_excite import Exciter
from onnx_excite.cli.app import app
from onnx_excite.graph.layers import inspect_model
from test_blocks import G


def _ints(g, values, base):
    name = g.t(base)
    g.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


def _model(g, out, shape, opset=17, dtype=TensorProto.FLOAT, classes=6):
    graph = helper.make_graph(g.nodes, "export_ops", [helper.make_tensor_value_info("input", dtype, ["N", *shape])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def decomposed_bn_hardswish(seed):
    """Conv -> (x - m) / s * gamma + beta (a BatchNorm as tf2onnx / paddle write it; canonicalize folds it
    into the Conv, the reference folds it on its own) -> paddle's hard-swish x * clip(x + 3, 0, 6) / 6 ->
    c - x -> ReLU -> (x - m) / s again, after the ReLU (a pre-activation BatchNorm: no Conv to fold it into,
    the element-wise Sub / Div rules) -> L2 normalisation over channels -> Conv."""
    g = G(seed)
    c = g.conv("input", 4, 6)
    r = g.rng
    centred = g.op("Sub", [c, g.init(r.normal(size=(1, 6, 1, 1)) * 0.1, "mean")], "centred")
    scaled = g.op("Div", [centred, g.init(r.uniform(0.5, 2, (1, 6, 1, 1)), "std")], "scaled")
    bn = g.op("Add", [g.op("Mul", [scaled, g.init(r.uniform(-1.5, 1.5, (1, 6, 1, 1)), "gamma")]),
                      g.init(r.normal(size=(1, 6, 1, 1)) * 0.1, "beta")], "bn")
    gate = g.op("Clip", [g.op("Add", [bn, g.init(3.0, "three")]), g.init(0.0, "lo"), g.init(6.0, "hi")], "gate")
    hswish = g.op("Div", [g.op("Mul", [bn, gate]), g.init(6.0, "six")], "hswish")
    flipped = g.op("Relu", [g.op("Sub", [g.init(0.25, "c"), hswish], "flipped")])
    centred2 = g.op("Sub", [flipped, g.init(r.normal(size=(1, 6, 1, 1)) * 0.1, "mean")], "centred")
    scaled2 = g.op("Div", [centred2, g.init(r.uniform(0.5, 2, (1, 6, 1, 1)), "std")], "scaled")
    # L2 normalisation over channels: x / sqrt(sum x^2 + eps), a divisor computed from x (a gate)
    norm = g.op("Sqrt", [g.op("Add", [g.op("ReduceSum", [g.op("Mul", [scaled2, scaled2], "sq"), _ints(g, [1], "axes")],
                                           "ssq", keepdims=1), g.init(1e-3, "eps")])], "l2")
    unit = g.op("Div", [scaled2, norm], "unit")
    top = g.op("Relu", [g.conv(unit, 6, 5)])
    return (g.model(g.head(top, 5)), ["input", bn, hswish, flipped, centred2, scaled2, unit], (4, 10, 9), 17, set())


def pad_modes(seed):
    """Reflect padding of the input (as models that pad their input do), edge and wrap padding inside."""
    g = G(seed)
    x = g.op("Pad", ["input", _ints(g, [0, 0, 2, 1, 0, 0, 1, 2], "pads")], "reflect", mode="reflect")
    c1 = g.op("Relu", [g.op("Conv", [x, g.init(g.rng.normal(size=(6, 4, 3, 3)) / 6)], "conv")])
    e = g.op("Pad", [c1, _ints(g, [1, 2, 2, 0], "pads"), "", _ints(g, [2, 3], "axes")], "edge", mode="edge")
    c2 = g.op("Relu", [g.op("Conv", [e, g.init(g.rng.normal(size=(5, 6, 3, 3)) / 7)], "conv", strides=[2, 1])])
    w = g.op("Pad", [c2, _ints(g, [0, 0, 1, 2, 0, 0, 2, 1], "pads")], "wrap", mode="wrap")
    top = g.op("Relu", [g.conv(w, 5, 5, k=3)])
    return g.model_at(g.head(top, 5), 19), ["input", x, c1, e, c2, w], (4, 10, 9), 19, set()


def nhwc_reductions(seed):
    """tf2onnx: NHWC input, Transpose, Conv, Transpose back, a linear Resize of the NHWC tensor,
    ReduceMean and ReduceMax over [1, 2] (the global pools of Keras), Concat, MatMul + Add."""
    g = G(seed, c=4, hw=(8, 7))
    nchw = g.op("Transpose", ["input"], "to_nchw", perm=[0, 3, 1, 2])
    c = g.op("Relu", [g.conv(nchw, 4, 6)])
    small = g.op("Transpose", [c], "to_nhwc", perm=[0, 2, 3, 1])
    nhwc = g.op("Resize", [small, "", g.init([1, 2, 1.5, 1], "scales")], "up_nhwc", mode="linear")   # tf.image.resize
    mean = g.op("ReduceMean", [nhwc, _ints(g, [1, 2], "axes")], "gap", keepdims=0)
    mx = g.op("ReduceMax", [nhwc, _ints(g, [1, 2], "axes")], "gmp", keepdims=0)
    feat = g.op("Concat", [mean, mx], "feat", axis=1)
    mm = g.op("MatMul", [feat, g.init(g.rng.normal(size=(12, 6)) / 3)], "dense")
    out = g.op("Add", [mm, g.init(g.rng.normal(size=6) * 0.1, "b")], "logits")
    return _model(g, out, (8, 7, 4), 18), ["input", nchw, c, small, nhwc], (8, 7, 4), 18, {"input", small, nhwc}


def resize_fpn(seed):
    """A model that resizes its input (linear, pytorch_half_pixel, sizes) and an FPN-like head: nearest x2
    (PyTorch: asymmetric / floor) added to the lateral, linear align_corners x1.5, nearest half_pixel
    round_prefer_ceil (TF)."""
    g = G(seed)
    # PyTorch's interpolate(x, size=(12, 12)): sizes = Concat(Shape(x)[:2], [12, 12]), computed in the graph
    lead = g.op("Slice", [g.op("Shape", ["input"], "shape"), _ints(g, [0], "st"), _ints(g, [2], "en")], "lead")
    sizes = g.op("Concat", [lead, _ints(g, [12, 12], "hw")], "sizes", axis=0)
    big = g.op("Resize", ["input", "", "", sizes], "resized", mode="linear",
               coordinate_transformation_mode="pytorch_half_pixel")
    c1 = g.op("Relu", [g.conv(big, 4, 6, stride=2)])          # 6 x 6
    c2 = g.op("Relu", [g.conv(c1, 6, 6, stride=2)])           # 3 x 3
    up = g.op("Resize", [c2, "", g.init([1, 1, 2, 2], "scales")], "up", mode="nearest",
              coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    fpn = g.op("Add", [c1, up], "fpn")
    up2 = g.op("Resize", [fpn, "", g.init([1, 1, 1.5, 1.5], "scales")], "up2", mode="linear",
               coordinate_transformation_mode="align_corners")   # 9 x 9
    c3 = g.op("Relu", [g.conv(up2, 6, 5)])
    up3 = g.op("Resize", [c3, "", g.init([1, 1, 1.5, 1.5], "scales")], "up3", mode="nearest",
               coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_ceil")
    top = g.op("Relu", [g.conv(up3, 5, 5, stride=2)])
    return g.model(g.head(top, 5)), ["input", big, c1, c2, up, fpn, up2, c3, up3], (4, 10, 9), 17, set()


def upsample_opset9(seed):
    """An old export: opset 9 Upsample (nearest and linear), converted by canonicalize."""
    g = G(seed)
    c = g.op("Relu", [g.conv("input", 4, 6, stride=2)])
    up = g.op("Upsample", [c, g.init([1, 1, 2, 2], "scales")], "up", mode="nearest")
    c2 = g.op("Relu", [g.conv(up, 6, 5)])
    up2 = g.op("Upsample", [c2, g.init([1, 1, 1.5, 2], "scales")], "up2", mode="linear")
    top = g.op("Relu", [g.conv(up2, 5, 5)])
    flat = g.op("Flatten", [g.op("GlobalAveragePool", [top], "gap")], "flat")
    head = g.op("Gemm", [flat, g.init(g.rng.normal(size=(6, 5)) / 2), g.init(g.rng.normal(size=6) * 0.1, "b")],
                "logits", transB=1)   # Gemm-9 needs its C
    graph = helper.make_graph(g.nodes, "up9", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 10, 9])],
                              [helper.make_tensor_value_info(head, TensorProto.FLOAT, ["N", 6])], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    m.ir_version = 4
    onnx.checker.check_model(m)
    return m, ["input", c, up, c2, up2], (4, 10, 9), 9, set()


def gmp_slice_split_merge(seed):
    """Split into three (num_outputs), Sum of three, Mean, element-wise Max, a strided Slice on channels,
    a plain channel Slice, a Split with sizes, GlobalMaxPool."""
    g = G(seed)
    x = g.op("Relu", [g.conv("input", 4, 9)])
    pieces = [g.t("piece") for _ in range(3)]
    g.nodes.append(helper.make_node("Split", [x], pieces, name="split3", axis=1, num_outputs=3))
    s = g.op("Sum", pieces, "sum3")
    m = g.op("Mean", [s, g.op("Relu", [g.conv(pieces[2], 3, 3)])], "mean")
    mx = g.op("Max", [m, pieces[1], g.conv(pieces[0], 3, 3, k=1)], "max")
    strided = g.op("Slice", [x, _ints(g, [1], "st"), _ints(g, [9], "en"), _ints(g, [1], "ax"), _ints(g, [2], "sp")], "strided")
    plain = g.op("Slice", [x, _ints(g, [2], "st"), _ints(g, [2**63 - 1], "en"), _ints(g, [1], "ax")], "plain")
    left, right = g.t("left"), g.t("right")
    g.nodes.append(helper.make_node("Split", [plain, _ints(g, [3, 4], "split")], [left, right], name="split2", axis=1))
    cat = g.op("Concat", [mx, g.op("Relu", [g.conv(strided, 4, 3)]), right], "cat", axis=1)
    gmp = g.op("Flatten", [g.op("GlobalMaxPool", [cat], "gmp")], "flat")
    out = g.op("Gemm", [gmp, g.init(g.rng.normal(size=(6, 10)) / 3)], "logits", transB=1)
    return (g.model_at(out, 18), ["input", x, pieces[0], pieces[1], s, m, mx, strided, plain, right, cat],
            (4, 10, 9), 18, set())


def poolformer_mixer(seed):
    """PoolFormer's token mixer, x + (AvgPool(x) - x): a Sub of two tensors (the subtrahend signed
    through the residual), on signed features."""
    g = G(seed)
    x = g.conv("input", 4, 6)
    pooled = g.op("AveragePool", [x], "pool", kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                  count_include_pad=0)
    mixed = g.op("Add", [x, g.op("Sub", [pooled, x], "mix")], "res")
    r = g.op("Relu", [g.conv(mixed, 6, 6)])
    flat = g.op("Flatten", [g.op("GlobalAveragePool", [r], "gap")], "flat")
    out = g.op("Gemm", [flat, g.init(g.rng.normal(size=(6, 6)) / 3)], "logits", transB=1)
    return g.model_at(out, 17), ["input", x, pooled, mixed, r], (4, 10, 9), 17, set()


def expand_tile(seed):
    """A per-channel descriptor broadcast back onto the map (Expand by a constant shape, and by a shape
    computed in the graph, as PyTorch's expand_as) and added; channels tiled (Tile)."""
    g = G(seed)
    x = g.op("Relu", [g.conv("input", 4, 6)])
    d = g.op("Relu", [g.conv(g.op("GlobalAveragePool", [x], "gap"), 6, 6, k=1)])
    e = g.op("Expand", [d, _ints(g, [1, 6, 10, 9], "shape")], "expand")
    s = g.op("Add", [x, e], "sum")
    s = g.op("Add", [s, g.op("Expand", [d, g.op("Shape", [s], "shape_of")], "expand_as")], "sum")   # d.expand_as(s)
    t = g.op("Tile", [s, _ints(g, [1, 2, 1, 1], "reps")], "tile")
    top = g.op("Relu", [g.conv(t, 12, 5)])
    return g.model(g.head(top, 5)), ["input", x, d, e, s, t], (4, 10, 9), 17, set()


def einsum_layers(seed):
    """Einsum as exporters write a 1x1 conv (NHWC 'nhwc,cd->nhwd', NCHW with the weight first
    'oc,nchw->nohw') and the dense classifier ('nc,kc->nk')."""
    g = G(seed, c=4, hw=(8, 7))
    eq = "nhwc,cd->nhwd" if seed % 2 == 0 else "...c,cd->...d"   # keras' Dense on a 4-D tensor
    e1 = g.op("Relu", [g.op("Einsum", ["input", g.init(g.rng.normal(size=(4, 6)) / 2)], "e1", equation=eq)])
    t = g.op("Transpose", [e1], "to_nchw", perm=[0, 3, 1, 2])
    c = g.op("Relu", [g.conv(t, 6, 6)])
    e2 = g.op("Relu", [g.op("Einsum", [g.init(g.rng.normal(size=(5, 6)) / 2), c], "e2", equation="oc,nchw->nohw")])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [e2], "gap")], "flat")
    out = g.op("Einsum", [f, g.init(g.rng.normal(size=(6, 5)))], "logits", equation="nc,kc->nk")
    return _model(g, out, (8, 7, 4), 17), ["input", e1, t, c, e2], (8, 7, 4), 17, {"input", e1}


def uint8_normalised(seed):
    """Raw uint8 NHWC pixels normalised inside the graph: Cast -> Sub mean -> Div std -> Transpose."""
    g = G(seed, c=3, hw=(9, 9))
    f = g.op("Cast", ["input"], "cast", to=TensorProto.FLOAT)
    norm = g.op("Div", [g.op("Sub", [f, g.init([123.7, 116.3, 103.5], "mean")], "centred"),
                        g.init([58.4, 57.1, 57.4], "std")], "norm")
    nchw = g.op("Transpose", [norm], "to_nchw", perm=[0, 3, 1, 2])
    c = g.op("Relu", [g.conv(nchw, 3, 6, stride=2)])
    top = g.op("Relu", [g.conv(c, 6, 5)])
    return (_model(g, g.head(top, 5), (9, 9, 3), 17, dtype=TensorProto.UINT8),
            ["input", f, norm, nchw, c], (9, 9, 3), 17, {"input", f, norm})


def _model_at(self, out, opset):
    return _model(self, out, (self.c, *self.hw), opset)


G.model_at = _model_at

GRAPHS = {"decomposed_bn_hardswish": decomposed_bn_hardswish, "pad_modes": pad_modes, "nhwc_reductions": nhwc_reductions,
          "resize_fpn": resize_fpn, "upsample_opset9": upsample_opset9, "gmp_slice_split_merge": gmp_slice_split_merge,
          "expand_tile": expand_tile, "einsum_layers": einsum_layers, "uint8_normalised": uint8_normalised,
          "poolformer_mixer": poolformer_mixer}


def _input(model, shape, seed, batch=2):
    rng = np.random.default_rng(seed)
    if model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8:
        return rng.integers(0, 256, size=(batch, *shape)).astype(np.uint8)
    return rng.normal(size=(batch, *shape)).astype(np.float32)


@pytest.mark.parametrize("rule", ["positive", "paper"])
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("arch", sorted(GRAPHS))
def test_export_ops_match_reference(arch, seed, rule):
    model, layers, shape, _, nhwc = GRAPHS[arch](seed)
    x = _input(model, shape, seed)
    if rule == "paper" and arch == "decomposed_bn_hardswish":
        # with the BatchNorm folded, the literal rule's Z = sum a W+ at the signed input cancels
        # (2.1e-4 off in float32 against 2e-4; as in test_excitation.py, which feeds it |x|)
        x = np.abs(x)
    ex = Exciter(model, layers, methods=("mwp", "cmwp"), rule=rule, channels=True)
    signal = np.random.default_rng(seed + 10).random((2, ex.num_classes)).astype(np.float32)
    res = ex.explain(x, signal)
    ref = Reference(model)
    axes = {layer: 3 for layer in nhwc}   # NHWC layers: the reference's map sums over axis 3
    plain = ref.run(x, signal, layers, rule=rule, channel_axes=axes)
    np.testing.assert_allclose(res.logits, plain["logits"], rtol=1e-4, atol=1e-4)
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, signal, layers, rule=rule, contrastive=True, channel_axes=axes) if contrastive else plain
        for layer in layers:
            exp = want["P"][layer]
            scale = max(np.abs(exp).max(), np.abs(plain["P"][layer]).max(), 1e-12)
            got = res.channels[method][layer]
            assert got.shape == exp.shape, (arch, layer, method)
            assert np.abs(got - exp).max() <= 2e-4 * scale, (arch, layer, method, np.abs(got - exp).max() / scale)
            hw = exp.shape[1:3] if layer in nhwc else exp.shape[2:4]
            assert res.maps[method][layer].shape == (2, *hw), (arch, layer, method)   # maps are (N, H, W)
            assert np.abs(res.maps[method][layer] - want["map"][layer]).max() <= 2e-4 * scale * exp.shape[axes.get(layer, 1)]


@pytest.mark.parametrize("arch", sorted(GRAPHS))
def test_check_reports_nothing(arch, tmp_path):
    model, _, _, _, _ = GRAPHS[arch](0)
    assert inspect_model(model).problems == []
    path = tmp_path / f"{arch}.onnx"
    onnx.save(model, str(path))
    res = CliRunner().invoke(app, ["check", str(path)])
    assert res.exit_code == 0 and res.output.startswith("ok"), res.output


CONSERVING = ["pad_modes", "resize_fpn", "upsample_opset9", "gmp_slice_split_merge", "expand_tile", "einsum_layers",
              "nhwc_reductions"]


@pytest.mark.parametrize("arch", CONSERVING)
def test_conservation(arch):
    """Bias-free, non-negative input, signal on classes with a positive logit: the total P at the input
    equals the signal's sum (copies, slices, splits, resizes, maxima and merges lose nothing)."""
    model, _, shape, _, _ = GRAPHS[arch](0)
    for t in model.graph.initializer:
        if t.name.startswith("b"):
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    x = np.abs(_input(model, shape, 1))
    ex = Exciter(model, ["input"], methods=("mwp",), channels=True)
    signal = (ex.logits(x) > 0).astype(np.float32)
    assert signal.sum() > 0
    res = ex.explain(x, signal)
    np.testing.assert_allclose(res.channels["mwp"]["input"].reshape(2, -1).sum(1), signal.sum(1), rtol=1e-4)


def test_uint8_model_explained_from_raw_pixels(tmp_path):
    """`explain` feeds a uint8 model raw 0..255 pixels (the graph normalises them); the library takes
    integral floats for it as they are."""
    from importlib import resources

    model, layers, shape, _, _ = uint8_normalised(0)
    path = tmp_path / "uint8.onnx"
    onnx.save(model, str(path))
    photo = resources.files("onnx_excite").joinpath("data", "samples", "dog.jpg")
    res = CliRunner().invoke(app, ["explain", str(path), str(photo), "-l", layers[3], "-t", "1", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    maps = sorted((tmp_path / "out").rglob("*.npy"))
    assert maps and all(np.isfinite(np.load(m)).all() for m in maps)
    ex = Exciter(model, [layers[3]], methods=("mwp",))
    raw = _input(model, shape, 0)
    np.testing.assert_array_equal(ex.logits(raw.astype(np.float32)), ex.logits(raw))   # integral floats are fine


RESIZE_CASES = [
    (dict(mode="linear", antialias=1), [1, 1, 0.5, 0.6], 18),                       # torchvision antialiased downscale
    (dict(mode="linear", coordinate_transformation_mode="half_pixel_symmetric"), [1, 1, 1.7, 2.5], 19),
    (dict(mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn"), [1, 1, 2, 3], 17),
    (dict(mode="nearest", nearest_mode="ceil", coordinate_transformation_mode="align_corners"), [1, 1, 0.5, 1.5], 17),
    (dict(mode="linear", coordinate_transformation_mode="asymmetric"), [1, 1, 0.7, 1.3], 17),
    (dict(mode="nearest"), [1, 1, 0.5, 3.0], 17),
    (dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), [1, 1, 0.1, 0.6], 17),
]


@pytest.mark.parametrize("attrs,scales,opset", RESIZE_CASES)
def test_resize_weights_reproduce_onnxruntime(attrs, scales, opset):
    """The per-axis weights of the Resize rule reproduce ONNX Runtime's output of the node, for modes the
    float64 reference of the tests does not implement (antialias, half_pixel_symmetric,
    tf_half_pixel_for_nn, ceil) and an output size where float32 and float64 disagree (10 * 0.7)."""
    import onnxruntime as ort

    from onnx_excite.graph.canonicalize import canonicalize
    from onnx_excite.rules.resize import _matrices, _plan, resize_check

    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", **attrs)
    graph = helper.make_graph([node], "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 10, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(scales, np.float32), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    view = canonicalize(model)
    (resize_node,) = view.nodes
    assert resize_check(view, resize_node) is None
    mats = _matrices(view, resize_node, _plan(view, resize_node))
    x = np.random.default_rng(0).normal(size=(2, 3, 10, 9)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = np.einsum("oh,nchw->ncow", mats[2], x.astype(np.float64))
    got = np.einsum("pw,nchw->nchp", mats[3], got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cubic_resize_is_refused():
    model, _, _, _, _ = resize_fpn(0)
    for node in model.graph.node:
        if node.op_type == "Resize" and node.output[0].startswith("up2"):
            for a in node.attribute:
                if a.name == "mode":
                    a.s = b"cubic"
    problems = inspect_model(model).problems
    assert len(problems) == 1 and problems[0][0] == "Resize" and "cubic" in problems[0][2]


def _one_node_classifier(op, inputs, inits, attrs=None, in_shape=("N", 4, 6, 6)):
    """x -> Relu -> <op> -> GlobalAveragePool -> Flatten -> Gemm: the op sits on the signal's path."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node(op, inputs, ["y"], name="op", **(attrs or {})),
             helper.make_node("GlobalAveragePool", ["y"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w"], ["logits"], name="fc", transB=1)]
    inits = dict(inits)
    inits.setdefault("w", np.ones((3, 4), np.float32))
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m


REFUSED = {
    "sub_of_itself": ("Sub", ["r", "r"], {}, {}, "Sub of a tensor from itself"),
    "pad_negative": ("Pad", ["r", "p"], {"p": np.array([0, 0, -1, 0, 0, 0, 0, 0], np.int64)}, {"mode": "edge"}, "negative pads"),
    "resize_cubic": ("Resize", ["r", "", "s"], {"s": np.array([1, 1, 2, 2], np.float32)}, {"mode": "cubic"}, "cubic"),
    "resize_batch": ("Resize", ["r", "", "s"], {"s": np.array([2, 1, 1, 1], np.float32)}, {"mode": "nearest"}, "batch axis"),
    "einsum_diagonal": ("Einsum", ["r", "e"], {"e": np.ones((6, 6), np.float32)}, {"equation": "nchh,hh->nch"}, "repeated index"),
    "reduce_max_batch": ("ReduceMax", ["r", "a"], {"a": np.array([0], np.int64)}, {}, "batch axis"),
    "tile_batch": ("Tile", ["r", "t"], {"t": np.array([2, 1, 1, 1], np.int64)}, {}, "batch axis"),
    # only the dividend is declared as carrying P: c / x is on the path with no data input, checked anyway
    "div_constant_by_tensor": ("Div", ["c", "r"], {"c": np.array(2.0, np.float32)}, {}, "Div of a constant by a tensor"),
    "div_by_independent_tensor": ("Div", ["r", "x"], {}, {}, "neither a constant nor computed from the dividend"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_variants_are_reported(case):
    op, inputs, inits, attrs, reason = REFUSED[case]
    problems = inspect_model(_one_node_classifier(op, inputs, inits, attrs)).problems
    assert [(p[0], p[1]) for p in problems] == [(op, "op")] and reason in problems[0][2], problems


def test_a_cut_path_is_reported_not_silently_dropped():
    """Below c / x no layer gets P: check names the Div, and asking for a layer below it fails on the
    Div, not with a bare "does not feed the logits"."""
    from onnx_excite.errors import UnsupportedModelError

    m = _one_node_classifier("Div", ["c", "r"], {"c": np.array(2.0, np.float32)})
    report = inspect_model(m)
    assert "r" not in [info.name for info in report.layers]
    with pytest.raises(UnsupportedModelError, match="Div of a constant by a tensor"):
        Exciter(m, ["r"])


def test_mul_gate_declared_narrowly_is_reported(monkeypatch):
    """A Mul declared with a narrow data input (``inputs=(0,)``) meets Mul(constant, x): its own check
    passes (a constant gate), yet x carries no P under that declaration, so check reports the Mul;
    with the real declaration (every non-constant input) the same graph is fine. Mul of two
    independent tensors is reported by the Mul check."""
    import dataclasses

    from onnx_excite.rules import RULES

    m = _one_node_classifier("Mul", ["s", "r"], {"s": np.full((1, 4, 1, 1), 0.5, np.float32)})
    assert inspect_model(m).problems == []
    monkeypatch.setitem(RULES, "Mul", dataclasses.replace(RULES["Mul"], inputs=(0,)))
    problems = inspect_model(m).problems
    assert [(p[0], p[1]) for p in problems] == [("Mul", "op")] and "'r'" in problems[0][2], problems
    monkeypatch.undo()
    nodes = [helper.make_node("Mul", ["x", "z"], ["y"], name="op"),
             helper.make_node("GlobalAveragePool", ["y"], ["g"], name="gap"), helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w"], ["logits"], name="fc", transB=1)]
    two = helper.make_model(helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4, 6, 6]) for n in ("x", "z")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.ones((3, 4), np.float32), "w")]), opset_imports=[helper.make_opsetid("", 18)])
    two.ir_version = 8
    problems = inspect_model(two).problems
    assert [(p[0], p[1]) for p in problems] == [("Mul", "op")] and "two independent tensors" in problems[0][2]


def test_declarations_keep_nonneg():
    """keeps_nonneg as declared: Resize, Slice, Tile, GlobalMaxPool, ReduceMax, edge Pad keep x >= 0; Max(x, 0)
    is >= 0 for any x; x / c only for c >= 0; Sub never; a constant Pad with a negative value does not."""
    from onnx_excite.graph.canonicalize import canonicalize

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Resize", ["r", "", "sc"], ["up"], name="up", mode="linear"),
             helper.make_node("Resize", ["x", "", "sc"], ["up_signed"], name="up_signed", mode="linear"),
             helper.make_node("Div", ["r", "pos"], ["div_pos"], name="div_pos"),
             helper.make_node("Div", ["r", "neg"], ["div_neg"], name="div_neg"),
             helper.make_node("Sub", ["r", "pos"], ["sub"], name="sub"),
             helper.make_node("Slice", ["up", "st", "en", "ax"], ["sl"], name="sl"),
             helper.make_node("Tile", ["sl", "reps"], ["tiled"], name="tile"),
             helper.make_node("GlobalMaxPool", ["r"], ["gmp"], name="gmp"),
             helper.make_node("GlobalMaxPool", ["x"], ["gmp_signed"], name="gmp_signed"),
             helper.make_node("ReduceMax", ["r", "ax"], ["rmax"], name="rmax"),
             helper.make_node("Max", ["x", "zero"], ["max0"], name="max0"),
             helper.make_node("Max", ["x", "neg"], ["max_neg"], name="max_neg"),
             helper.make_node("Max", ["r", "up"], ["max_rr"], name="max_rr"),
             helper.make_node("Pad", ["r", "pads"], ["edge"], name="edge", mode="edge"),
             helper.make_node("Pad", ["r", "pads", "neg"], ["padneg"], name="padneg")]
    inits = {"sc": np.array([1, 1, 1, 1], np.float32), "pos": np.array(2.0, np.float32), "neg": np.array(-2.0, np.float32),
             "zero": np.array(0.0, np.float32), "st": np.array([1], np.int64), "en": np.array([3], np.int64),
             "ax": np.array([1], np.int64), "reps": np.array([1, 2, 1, 1], np.int64),
             "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}
    outs = [n.output[0] for n in nodes]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    view = canonicalize(m, logits="up")
    from onnx_excite.rules import proves_nonneg
    proven = {o for o in outs if proves_nonneg(view, o)}
    assert proven == {"r", "up", "div_pos", "sl", "tiled", "gmp", "rmax", "max0", "max_rr", "edge"}, proven


FLOAT16_CLOSE = {"pad_modes", "resize_fpn", "einsum_layers", "expand_tile", "decomposed_bn_hardswish"}


@pytest.mark.parametrize("arch", sorted(set(GRAPHS) - {"uint8_normalised", "upsample_opset9"}))
def test_float16_models(arch):
    """The same graphs in float16: the companion model passes the full checker, runs, and its maps are finite;
    where no arg-max can flip in half precision they agree with the float32 model (same rounded weights)."""
    from onnx_excite.graph.builder import build_excitation_model

    m16, layers, shape, _, _ = GRAPHS[arch](0)
    m32 = onnx.ModelProto.FromString(m16.SerializeToString())
    for t16, t32 in zip(m16.graph.initializer, m32.graph.initializer):
        value = numpy_helper.to_array(t16)
        if value.dtype == np.float32 and not t16.name.startswith("scales"):   # Resize scales stay float32
            t16.CopyFrom(numpy_helper.from_array(value.astype(np.float16), t16.name))
            t32.CopyFrom(numpy_helper.from_array(value.astype(np.float16).astype(np.float32), t32.name))
    for value in list(m16.graph.input) + list(m16.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    x = np.abs(_input(m16, shape, 0)).astype(np.float16)
    onnx.checker.check_model(build_excitation_model(m16, layers, methods=("mwp", "cmwp")).model, full_check=True)
    res16 = Exciter(m16, layers).explain(x, [1, 3])
    res32 = Exciter(m32, layers).explain(x.astype(np.float32), [1, 3])
    for method in ("mwp", "cmwp"):
        for layer in layers:
            got, want = res16.maps[method][layer], res32.maps[method][layer]
            assert got.dtype == np.float32 and np.isfinite(got).all() and got.shape == want.shape
            if arch in FLOAT16_CLOSE:
                assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max(), (layer, method)


@pytest.mark.parametrize("arch", sorted(GRAPHS))
def test_companion_graphs_stay_on_cuda(arch):
    """Static check against onnxruntime-gpu's kernel registry (no GPU needed): what the rules of these
    ops emit (ArgMax, ScatterElements, Einsum, the per-axis matrices, Where) has CUDA kernels. The one
    CPU fallback is the model's own forward Mean node, which has no CUDA kernel."""
    from onnx_excite.graph.builder import build_excitation_model
    from onnx_excite.run.cuda_coverage import check_cuda

    model, layers, _, _, _ = GRAPHS[arch](0)
    built = build_excitation_model(model, layers, methods=("mwp", "cmwp"))
    found = [(f.kind, f.op_type) for f in check_cuda(built.model) if f.kind in ("fallback", "limit")]
    own_means = [("fallback", "Mean")] * sum(n.op_type == "Mean" for n in model.graph.node)
    assert found == own_means, found


GRAD_REFUSED = {"decomposed_bn_hardswish": "L2 normalisation"}   # a Div by a gate computed from the features


@pytest.mark.parametrize("arch", sorted(set(GRAPHS) - {"uint8_normalised"}))
def test_grad_through_export_ops_equals_finite_differences(arch):
    """The gradient family through Sub (``c - x``: -P), Div by a constant (P / c), Mean (P / n),
    Pad modes, Resize, Slice/Split/Expand/Tile, Max, Einsum: the library's grad at every layer
    equals float64 central finite differences of the reference forward; a Div by a gate is refused."""
    from test_methods_builder import assert_grad_equals_finite_differences

    from onnx_excite.errors import ExciteError

    model, layers, shape, _, nhwc = GRAPHS[arch](0)
    if arch == "nhwc_reductions":
        # the x2 linear Resize output holds exact copies (clamped border rows), and one channel's
        # ReduceMax is tied between two of them: a kink where finite differences have no single value
        layers = layers[:-1]
    x = _input(model, shape, 0, batch=1).astype(np.float64)
    ref = Reference(model)
    vals = ref.forward(x)
    entry = ref.entry()
    k = vals[entry].shape[1]
    e = np.eye(k)[[1 % k]]
    if arch in GRAD_REFUSED:
        with pytest.raises(ExciteError, match="gradient-family"):
            Exciter(model, layers, methods=("grad",), channels=True)
        return
    res = Exciter(model, layers, methods=("grad",), channels=True).explain(x.astype(np.float32), e.astype(np.float32))
    assert_grad_equals_finite_differences(arch, ref, x, vals, entry, e, res.channels["grad"], layers)
