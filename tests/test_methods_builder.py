"""Every registered method through the companion-graph builder (issue 12, phase 2), beyond
tests/test_builder_vs_method_ref.py (which compares each with tests/method_ref.py):

* grad equals float64 finite differences at intermediate layers on the coverage zoo
  (smooth activations, SE / SiLU gates through the product rule, LRN, ReLU6, ceil-mode
  MaxPool, unfolded BatchNorm, NHWC Transpose/Pad), where method_ref.py has no branch;
* every method runs without NaN on the zoo and on the default model, or is refused with one
  clear error naming the reason (CAM off a global-pool + linear head);
* several methods in one build give the maps each gives alone (shared pieces are shared
  correctly); c-grad is 0, c-cam has cam's arg-max, the ablations differ from c-MWP;
* LRP conservation on bias-free nets; the mass diagnostics follow ``Method.mass``.
"""
import re

import numpy as np
import pytest

import netgen
import test_blocks as tb
from excitation_ref import Reference
from method_nets import net, num_classes
from onnx_excite import Exciter
from onnx_excite.errors import ExciteError
from onnx_excite.methods import METHODS, get_method

ZOO = dict(tb.ZOO, se_silu_concat=tb.se_silu_concat, resnet_block=tb.resnet_block, mobilenet_block=tb.mobilenet_block)


def _input(model, seed, batch=2):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).normal(size=(batch, *shape)).astype(np.float32)


def _forward_with(ref: Reference, x, layer, value):
    """The reference forward pass (float64) with tensor ``layer`` replaced by ``value``."""
    v = dict(ref.consts)
    v[ref.model.graph.input[0].name] = np.asarray(x, np.float64)
    if layer in v:
        v[layer] = value
    ref.windows, ref.near_ties = {}, False
    for node in ref.nodes:
        out = ref._fwd(node, [v[i] if i else None for i in node.input])
        outs = dict(zip(node.output, out)) if node.op_type == "Split" else {node.output[0]: out}
        v.update({k: (value if k == layer else o) for k, o in outs.items()})
    return v


def assert_grad_equals_finite_differences(arch, ref, x, vals, entry, e, grads, layers):
    """grads[layer] (the library's grad at ``layer``) against float64 central finite differences of
    the reference forward along random directions."""
    rng = np.random.default_rng(1)
    h = 1e-7   # small: a random direction moves every unit, a kink (ReLU, MaxPool tie) must not be crossed
    for layer in layers:
        g = grads[layer].astype(np.float64)
        base = vals[layer]
        assert g.shape == base.shape, (arch, layer)
        for _ in range(3):
            # directions that keep exact zeros (dead ReLUs) at 0: ties of zeros in a MaxPool
            # window are a kink where finite differences have no single value
            d = rng.normal(size=base.shape) * (base != 0)
            plus = (_forward_with(ref, x, layer, base + h * d)[entry] * e).sum()
            minus = (_forward_with(ref, x, layer, base - h * d)[entry] * e).sum()
            fd = (plus - minus) / (2 * h)
            assert abs((g * d).sum() - fd) <= 2e-4 * (np.abs(g).sum() * np.abs(d).max() + 1e-6), (arch, layer, fd)


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_grad_cam_on_the_zoo_weights_the_checked_gradient(arch):
    """Grad-CAM and Grad-CAM++ beyond method_ref.py's op set (smooth activations, SE gates, LRN,
    an NHWC layer of a TF-style graph): the maps are tests/method_ref.py's float64 formulas
    (``grad_cam_map``) applied to the reference forward's activation and to the library's grad at
    the layer, which test_grad_equals_finite_differences checks against finite differences."""
    import method_ref as mr

    model, layers = ZOO[arch](0)
    layers = [layer for layer in layers if layer != "input"]
    x = _input(model, 0)
    ref = Reference(model)
    vals = ref.forward(x.astype(np.float64))
    k = vals[ref.entry()].shape[1]
    e = np.eye(k, dtype=np.float32)[[1 % k, 0]]
    ex = Exciter(model, layers, methods=("grad", "gradcam", "gradcam++"), channels=True)
    res = ex.explain(x, e)
    for layer in layers:
        axis = ex.built.layouts[layer].axis
        for name, plus in (("gradcam", False), ("gradcam++", True)):
            want = mr.grad_cam_map(vals[layer], res.channels["grad"][layer], plus, channel_axis=axis)
            got = res.maps[name][layer]
            assert got.shape == want.shape and np.abs(want).max() > 0, (arch, name, layer)
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (arch, name, layer)


def _cam_layer(model):
    from onnx_excite.graph.builder import cam_feature_map
    from onnx_excite.graph.canonicalize import canonicalize

    return cam_feature_map(canonicalize(model))


def _own_layer(model, method):
    from onnx_excite.graph.builder import method_layer
    from onnx_excite.graph.canonicalize import canonicalize

    return method_layer(canonicalize(model), method)


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_grad_equals_finite_differences(arch):
    model, layers = ZOO[arch](0)
    x = _input(model, 0, batch=1).astype(np.float64)
    ref = Reference(model)
    vals = ref.forward(x)
    entry = ref.entry()
    k = vals[entry].shape[1]
    e = np.eye(k)[[1 % k]]
    res = Exciter(model, layers, methods=("grad",), channels=True).explain(x.astype(np.float32), e.astype(np.float32))
    assert_grad_equals_finite_differences(arch, ref, x, vals, entry, e, res.channels["grad"], layers)


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_every_method_runs_without_nan_on_the_zoo(arch):
    model, layers = ZOO[arch](1)
    x = _input(model, 1)
    for name in METHODS:
        method = get_method(name)
        use = layers
        if method.layers in ("last-feature-map", "attention-tokens"):   # cam's, rollout's own layer
            try:
                use = [_own_layer(model, method)]
            except ExciteError:  # the builder refuses too, naming the method and the reason
                with pytest.raises(ExciteError, match=f"^{name}[: ]"):
                    Exciter(model, layers, methods=(name,))
                continue
        if method.layers == "feature-maps":   # Grad-CAM: one error line at the input, the other layers mapped
            with pytest.raises(ExciteError, match="^" + re.escape(name) + ": .*model's input 'input'"):
                Exciter(model, layers, methods=(name,))
            use = [layer for layer in layers if layer != "input"]
        ex = Exciter(model, use, methods=(name,))
        signal = np.eye(ex.num_classes, dtype=np.float32)[[0, ex.num_classes - 1]]
        res = ex.explain(x, signal)
        for layer in use:
            m = res.maps[name][layer]
            assert m.shape[0] == 2 and np.isfinite(m).all(), (arch, name, layer)
            if method.clip:
                assert (m >= 0).all()


def test_every_method_on_the_default_model_matches_method_ref():
    """The default model (MobileNetV2: ReLU6, depthwise, residual Adds, GAP + Gemm) at 64 x 64:
    every method finite, not all zero (c-grad excepted: exactly 0) and equal to the float64
    reference of tests/method_ref.py."""
    import onnx

    import method_ref as mr
    from onnx_excite.models import mobilenet_v2

    try:
        mobilenet_v2.find_weights()
    except mobilenet_v2.ModelUnavailableError as exc:  # same policy as tests/test_mobilenet_v2.py
        pytest.skip(f"MobileNetV2 weights not installed ({exc})")
    path = str(mobilenet_v2.load_default_model())
    model = onnx.load(path)
    x = np.random.default_rng(0).uniform(-2, 2, size=(1, 3, 64, 64)).astype(np.float32)
    signal = np.zeros((1, 1000), np.float32)
    signal[0, 281] = 1
    feature = _cam_layer(model)
    plain = [m for m in METHODS if get_method(m).layers == "any"]
    runs = [(plain, ["input", "features.13"]), (["cam", "c-cam"], [feature]),
            (["gradcam", "gradcam++"], ["features.13", feature])]
    for methods, layers in runs:
        res = Exciter(path, layers, methods=methods).explain(x, signal)
        for name in methods:
            want = mr.method_reference(model, x.astype(np.float64), signal, layers, name)
            for layer in layers:
                m = res.maps[name][layer]
                assert np.isfinite(m).all() and m.ndim == 3, (name, layer)
                assert (np.abs(m).max() > 0) == (name != "c-grad"), (name, layer)
                scale = max(np.abs(want["map"][layer]).max(), np.abs(want["P"][layer]).max())
                assert np.abs(m - want["map"][layer]).max() <= 1e-3 * scale + 1e-7, (name, layer)


@pytest.mark.parametrize("kind,seed", [("residual", 0), ("concat", 2), ("mobilenet_block", 1)])
def test_methods_built_together_equal_methods_built_alone(kind, seed):
    model, layers = net(kind, seed)
    x = _input(model, seed)
    k = num_classes(model)
    signal = np.eye(k, dtype=np.float32)[[0, k - 1]]
    plain = [m for m in METHODS if get_method(m).layers == "any"]
    runs = [(plain, layers), (["grad", "gradcam", "gradcam++", "guided"], [layer for layer in layers if layer != "input"])]
    for methods, use in runs:
        together = Exciter(model, use, methods=methods).explain(x, signal)
        for name in methods:
            alone = Exciter(model, use, methods=(name,)).explain(x, signal)
            for layer in use:
                np.testing.assert_allclose(together.maps[name][layer], alone.maps[name][layer], rtol=1e-5, atol=1e-7,
                                           err_msg=f"{name} {layer}")


def test_contrastive_baselines_and_ablations():
    model, layers = net("residual", 0)
    x = _input(model, 0)
    k = num_classes(model)
    signal = np.eye(k, dtype=np.float32)[[0, 1]]
    res = Exciter(model, layers, methods=("c-grad", "grad", "cmwp", "cmwp-nonorm", "cmwp-postnorm")).explain(x, signal)
    differs = {"cmwp-nonorm": False, "cmwp-postnorm": False}
    for layer in layers:
        assert not res.maps["c-grad"][layer].any()          # the dual gradient is -g: |.| forgets the sign
        assert res.maps["grad"][layer].any()
        c = res.maps["cmwp"][layer]
        for ablation in differs:   # their exact definitions: tests/test_builder_vs_method_ref.py
            a = res.maps[ablation][layer]
            assert a.shape == c.shape and (a >= 0).all()
            differs[ablation] |= not np.allclose(a, c / signal.sum(axis=1)[:, None, None], rtol=1e-3, atol=1e-6)
    assert all(differs.values()), differs
    model, _ = net("concat", 2)   # a GlobalAveragePool + Gemm head
    x = _input(model, 2)
    signal = np.eye(num_classes(model), dtype=np.float32)[[0, 1]]
    feature = _cam_layer(model)
    res = Exciter(model, [feature], methods=("cam", "c-cam")).explain(x, signal)
    cam, ccam = res.maps["cam"][feature], res.maps["c-cam"][feature]
    for i in range(len(x)):
        if cam[i].max() > 0:
            assert np.unravel_index(cam[i].argmax(), cam[i].shape) == np.unravel_index(ccam[i].argmax(), ccam[i].shape)
            # c-cam = 2 max(cam, 0) / |cam|_1
            np.testing.assert_allclose(ccam[i], 2 * np.maximum(cam[i], 0) / np.abs(cam[i]).sum(), rtol=1e-4, atol=1e-7)


def test_lrp_conservation_and_mass_diagnostics():
    model = netgen.random_cnn(3, bias=False, residual=True, allow_maxpool=False)
    layers = netgen.layer_names(model, spatial_only=False)
    x = np.abs(_input(model, 3))
    k = num_classes(model)
    ex = Exciter(model, layers, methods=("lrp-zplus", "lrp-epsilon", "mwp"), diagnostics=True)
    # the predicted class: a positive score, so z+ has Z > 0 wherever relevance arrives
    signal = np.eye(k, dtype=np.float32)[ex.logits(x).argmax(axis=1)]
    res = ex.explain(x, signal)
    score = (signal * res.logits).sum(axis=1)
    assert (score > 0).all()
    layer = "input"   # a cut of the graph (a layer inside a residual branch gets only its share)
    for name in ("lrp-zplus", "lrp-epsilon"):   # "score" mass: e . s
        lost = res.lost[name][layer]
        assert np.all(np.abs(lost) <= 1e-3 * score + 1e-5), (name, lost, score)
    assert np.all(np.abs(res.lost["mwp"][layer]) <= 1e-4)   # "signal" mass: sum e


def test_cam_refuses_with_the_reason():
    model, layers = net("concat", 2)
    feature = _cam_layer(model)
    other = next(layer for layer in layers if layer != feature)
    with pytest.raises(ExciteError, match=f"cam: defined only at the last feature map '{feature}', not at '{other}'"):
        Exciter(model, [other], methods=("cam",))
    model, layers = tb.squeezenet_fire(0)   # logits = Flatten(GAP(conv classifier)): no linear head
    with pytest.raises(ExciteError, match="c-cam: the logits .* do not come from a Gemm/MatMul classifier"):
        Exciter(model, layers[-1:], methods=("c-cam",))


def test_unknown_method_names_the_choices():
    model, layers = net("residual", 0)
    with pytest.raises(ExciteError, match=r"unknown method 'gradd' \(did you mean 'grad'\?\); choose from mwp, cmwp"):
        Exciter(model, layers, methods=("gradd",))


@pytest.mark.parametrize("size", [3, 5])   # ORT runs odd sizes only
def test_grad_through_strong_lrn_equals_finite_differences(size):
    """LRN with alpha = 1: the cross-channel term of its Jacobian matters."""
    g = tb.G(size)
    x = g.op("Relu", [g.conv("input", 4, 7)])
    lrn = g.op("LRN", [x], "lrn", size=size, alpha=1.0, beta=0.75, bias=1.0)
    model = g.model(g.head(lrn, 7))
    inp = _input(model, size, batch=1).astype(np.float64) * 2
    ref = Reference(model)
    vals = ref.forward(inp)
    entry = ref.entry()
    e = np.eye(vals[entry].shape[1])[[2]]
    res = Exciter(model, ["input", x], methods=("grad",), channels=True).explain(inp.astype(np.float32),
                                                                              e.astype(np.float32))
    for layer in ("input", x):
        got, base = res.channels["grad"][layer].astype(np.float64), vals[layer]
        num = np.zeros_like(base)
        for ix in zip(*np.nonzero(base)):
            d = np.zeros_like(base)
            d[ix] = 1e-6
            num[ix] = ((_forward_with(ref, inp, layer, base + d)[entry] - _forward_with(ref, inp, layer, base - d)[entry])
                       * e).sum() / 2e-6
        mask = base != 0
        np.testing.assert_allclose(got[mask], num[mask], rtol=1e-3, atol=1e-4 * np.abs(num).max())


def test_dynamic_spatial_sizes_give_the_static_maps():
    """With symbolic H, W the pool divisors (grad's 1/count) come from the runtime shape."""
    import onnx

    model, layers = net("concat", 2)
    dyn = onnx.ModelProto()
    dyn.CopyFrom(model)
    for d in dyn.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.ClearField("dim_value")
        d.dim_param = "S"
    x = _input(model, 2)
    signal = np.eye(num_classes(model), dtype=np.float32)[[0, 3]]
    for name in ("grad", "guided", "lrp-epsilon", "cam"):
        use = [_cam_layer(model)] if name == "cam" else layers
        static = Exciter(model, use, methods=(name,)).explain(x, signal).maps[name]
        dynamic = Exciter(dyn, use, methods=(name,)).explain(x, signal).maps[name]
        for layer in use:
            np.testing.assert_allclose(dynamic[layer], static[layer], rtol=1e-6, atol=1e-9, err_msg=f"{name} {layer}")


@pytest.mark.parametrize("pads", [[0, 0, 0, 0], [1, 0, 0, 0]])   # 5 x 5: the last column's windows overhang
def test_grad_through_a_ceil_mode_average_pool_that_counts_pads(pads):
    """AveragePool(ceil_mode=1, count_include_pad=1) whose last windows run past the input and its
    declared pads: ONNX Runtime divides those by the cells inside the declared padding, not by the
    kernel size; grad (and Grad-CAM above it) use the same divisor: equal to float64 finite
    differences of the reference forward (which agrees with ONNX Runtime's)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import method_ref as mr

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(3, 2 * 3 * 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "k"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("AveragePool", ["c"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2],
                              ceil_mode=1, count_include_pad=1, pads=pads),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "w"], ["logits"], name="fc", transB=1)]
    k = numpy_helper.from_array(rng.normal(size=(2, 2, 1, 1)).astype(np.float32), "k")
    graph = helper.make_graph(nodes, "ceil_pool", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 2, 5, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3])], [w, k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    x = rng.normal(size=(2, 2, 5, 5))
    e = rng.random((2, 3))
    res = Exciter(model, ["c"], methods=("grad", "gradcam"), channels=True).explain(x.astype(np.float32),
                                                                                   e.astype(np.float32))
    g = mr.Graph(model)
    vals = g.forward(x)
    h, fd = 1e-6, np.zeros_like(vals["c"])
    for idx in np.ndindex(fd.shape):   # the net is linear: central differences are exact up to rounding
        up, down = vals["c"].copy(), vals["c"].copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = ((g.forward(x, {"c": up})["logits"] - g.forward(x, {"c": down})["logits"]) * e).sum() / (2 * h)
    np.testing.assert_allclose(res.channels["grad"]["c"], fd, rtol=1e-4, atol=1e-5 * np.abs(fd).max())
    want = mr.method_reference(model, x, e, ["c"], "gradcam")["map"]["c"]
    assert np.abs(res.maps["gradcam"]["c"] - want).max() <= 1e-4 * np.abs(want).max()
