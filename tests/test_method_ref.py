"""Self-checks of tests/method_ref.py (the float64 reference of the attention methods):
finite differences, closed forms on tiny MLPs, conservation, linearity, and the contrastive
identities the paper states (c-grad = 0, c-cam ~ cam)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import method_ref as mr
import netgen
from method_nets import net as _net, num_classes, reduce_mean_head
from reference import excitation_reference


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

def _signal(model, batch=2, seed=0, kind="onehot"):
    k = num_classes(model)
    rng = np.random.default_rng(seed)
    if kind == "onehot":
        return np.eye(k)[rng.integers(0, k, size=batch)]
    return rng.random((batch, k))


def _input(model, seed=0, batch=2, signed=True):
    return netgen.random_input(model, batch=batch, seed=seed, nonneg=not signed).astype(np.float64)


def _abs_weights(model):
    """The same net with every weight replaced by its absolute value (biases kept)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name.endswith(".weight"):
            t.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(t)), t.name))
    return m


def _mlp(w1, b1, w2, b2=None, name="mlp"):
    """x (N, J) -> Gemm(W1, b1) -> Relu -> Gemm(W2[, b2]) = logits (weights stored (in, out))."""
    inits = [numpy_helper.from_array(np.asarray(w1, np.float32), "W1"),
             numpy_helper.from_array(np.asarray(b1, np.float32), "b1"),
             numpy_helper.from_array(np.asarray(w2, np.float32), "W2")]
    fc2 = ["h", "W2"]
    if b2 is not None:
        inits.append(numpy_helper.from_array(np.asarray(b2, np.float32), "b2"))
        fc2.append("b2")
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["z1"], name="fc1"),
             helper.make_node("Relu", ["z1"], ["h"], name="relu1"),
             helper.make_node("Gemm", fc2, ["logits"], name="fc2")]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w1.shape[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", w2.shape[1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _f32(a):
    return np.asarray(a, np.float32).astype(np.float64)


# ----------------------------------------------------------------------------------------
# grad = finite differences
# ----------------------------------------------------------------------------------------

def _kink_margin(g, vals):
    """Smallest distance of the forward pass to a ReLU or MaxPool kink (exact zeros of a
    ReLU input and exact ties are stable under small perturbations and ignored)."""
    from reference import _pool_windows

    margin = np.inf
    for n in g.nodes:
        x = vals[n.input[0]] if n.input else None
        if n.op_type == "Relu":
            nz = np.abs(x[x != 0])
            if nz.size:
                margin = min(margin, nz.min())
        if n.op_type == "Clip":
            lo, hi = g.clip_bounds(n, [vals[i] if i else None for i in n.input])
            dist = np.minimum(np.abs(x - lo), np.abs(x - hi))
            dist = dist[dist != 0]
            if dist.size:
                margin = min(margin, dist.min())
        if n.op_type == "MaxPool":
            _, win = _pool_windows(n, x.shape)
            cand = np.sort(g._maxpool_candidates(x, win), axis=0)
            gap = cand[-1] - cand[-2]
            gap = gap[np.isfinite(gap) & (gap != 0)]
            if gap.size:
                margin = min(margin, gap.min())
    return margin


def _untied(t):
    """Flat indices of the non-zero elements of ``t`` whose value occurs once in their
    (sample, channel) plane. A repeated value of an intermediate tensor (copies made by
    overlapping MaxPool windows, zeros of dead ReLUs) can tie in a MaxPool window above, and
    an exact zero can be the input of a ReLU above (through an Add of two dead units);
    perturbing such an element alone sits on the kink, where the derivative is one-sided.
    (Perturbing the input moves all copies together, so the input keeps every element.)"""
    planes = t.reshape(t.shape[0] * t.shape[1], -1) if t.ndim >= 3 else t.reshape(1, -1)
    keep = np.zeros(planes.shape, bool)
    for i, row in enumerate(planes):
        _, inv, counts = np.unique(row, return_inverse=True, return_counts=True)
        keep[i] = (counts[inv] == 1) & (row != 0)
    return np.flatnonzero(keep.ravel())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["plain", "signed", "residual", "concat", "resnet_block", "mobilenet_block"])
def test_grad_equals_finite_differences(kind, seed):
    model, layers = _net(kind, seed)
    e = _signal(model, batch=1, seed=seed, kind="dense")
    g = mr.Graph(model)
    h = 1e-6
    scale = 5.0 if kind == "mobilenet_block" else 1.0   # some ReLU6 inputs above 6
    for attempt in range(10):  # an input whose forward pass stays 100 h away from any kink
        x = scale * _input(model, seed=100 * seed + attempt, batch=1)
        vals = g.forward(x)
        if _kink_margin(g, vals) > 1e2 * h:
            break
    else:
        raise AssertionError("no input away from the ReLU/MaxPool kinks in 10 draws")
    if kind == "mobilenet_block":
        assert any((vals[n.input[0]] > 6).any() for n in g.nodes if n.op_type == "Clip")
    res = mr.method_reference(model, x, e, layers, "grad")
    logits = g.logits_name()
    rng = np.random.default_rng(seed)
    checked = 0
    for layer in layers:
        base = vals[layer]
        flat = _untied(base) if layer != "input" else np.arange(base.size)
        for idx in rng.choice(flat, size=min(20, flat.size), replace=False):
            plus, minus = base.copy(), base.copy()
            plus.flat[idx] += h
            minus.flat[idx] -= h
            fp = (e * g.forward(x, {layer: plus})[logits]).sum()
            fm = (e * g.forward(x, {layer: minus})[logits]).sum()
            fd = (fp - fm) / (2 * h)
            got = res["P"][layer].flat[idx]
            assert abs(got - fd) <= 1e-6 * max(1.0, abs(fd)), (kind, seed, layer, idx, got, fd)
            checked += 1
    assert checked >= 3 * len(layers) // 2


def test_finite_difference_check_can_fail():
    """The finite-difference comparison detects a wrong rule: deconv (no forward ReLU mask)
    is not the gradient on a net with dead units."""
    model = netgen.random_cnn(2, residual=False)
    layers = netgen.layer_names(model)
    x = _input(model, seed=2, batch=1)
    e = _signal(model, batch=1, kind="dense")
    grad = mr.method_reference(model, x, e, layers, "grad")["P"]["input"]
    deconv = mr.method_reference(model, x, e, layers, "deconv")["P"]["input"]
    assert np.abs(grad - deconv).max() > 1e-3 * np.abs(grad).max()


# ----------------------------------------------------------------------------------------
# closed forms on a 2-layer MLP
# ----------------------------------------------------------------------------------------

def _mlp_case(seed, bias=True):
    rng = np.random.default_rng(seed)
    w1, w2 = _f32(rng.normal(size=(6, 5))), _f32(rng.normal(size=(5, 4)))
    b1 = _f32(rng.normal(size=5) * 0.3) if bias else np.zeros(5)
    x = rng.normal(size=(3, 6))
    e = rng.normal(size=(3, 4))
    return _mlp(w1, b1, w2), x, e, w1, b1, w2


@pytest.mark.parametrize("seed", range(5))
def test_backprop_family_closed_form_on_mlp(seed):
    model, x, e, w1, b1, w2 = _mlp_case(seed)
    z1 = x @ w1 + b1
    top = e @ w2.T                                  # signal at h (= at the ReLU output)
    want = {"grad": (top * (z1 > 0)) @ w1.T,
            "deconv": np.maximum(top, 0) @ w1.T,
            "guided": (np.maximum(top, 0) * (z1 > 0)) @ w1.T}
    for method, exp in want.items():
        res = mr.method_reference(model, x, e, ["x", "h"], method)
        np.testing.assert_allclose(res["P"]["x"], exp, rtol=1e-10, atol=1e-12, err_msg=method)
        np.testing.assert_allclose(res["P"]["h"], top, rtol=1e-12, err_msg=method)
        np.testing.assert_array_equal(res["map"]["x"], np.abs(res["P"]["x"]))


@pytest.mark.parametrize("seed", range(5))
def test_lrp_closed_form_on_mlp(seed):
    """LRP-epsilon and -z+ from the explicit contributions z_jk of every connection."""
    model, x, e, w1, b1, w2 = _mlp_case(seed)
    z1 = x @ w1 + b1
    h = np.maximum(z1, 0)
    s = h @ w2
    r_top = e * s

    def eps_layer(a, w, b, r):
        z = a @ w + b
        d = z + 1e-6 * np.abs(z).max(axis=1, keepdims=True) * np.where(z >= 0, 1, -1)
        contrib = a[:, :, None] * w[None]           # (N, J, K)
        return np.einsum("njk,nk->nj", contrib, r / d)

    def zplus_layer(a, w, r):
        contrib = np.maximum(a[:, :, None] * w[None], 0)
        Z = contrib.sum(axis=1)
        ratio = np.divide(r, Z, out=np.zeros_like(r), where=Z != 0)
        return np.einsum("njk,nk->nj", contrib, ratio)

    got = mr.method_reference(model, x, e, ["x", "h"], "lrp-epsilon")["P"]
    r_h = eps_layer(h, w2, 0.0, r_top)
    np.testing.assert_allclose(got["h"], r_h, rtol=1e-10)
    np.testing.assert_allclose(got["x"], eps_layer(x, w1, b1, r_h), rtol=1e-9, atol=1e-12)
    got = mr.method_reference(model, x, e, ["x", "h"], "lrp-zplus")["P"]
    r_h = zplus_layer(h, w2, r_top)
    np.testing.assert_allclose(got["h"], r_h, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got["x"], zplus_layer(x, w1, r_h), rtol=1e-9, atol=1e-13)


def test_lrp_epsilon_bias_takes_its_share():
    """sum R_in = sum_i (z_i - b_i) / d_i R_i: the bias's share is dropped."""
    model, x, e, w1, b1, w2 = _mlp_case(7)
    res = mr.method_reference(model, x, e, ["x", "h"], "lrp-epsilon")["P"]
    z1 = x @ w1 + b1
    d = z1 + 1e-6 * np.abs(z1).max(axis=1, keepdims=True) * np.where(z1 >= 0, 1, -1)
    r_z1 = res["h"]                                  # the ReLU passes R
    np.testing.assert_allclose(res["x"].sum(axis=1), ((z1 - b1) / d * r_z1).sum(axis=1), rtol=1e-9)
    assert np.abs(res["x"].sum(axis=1) - r_z1.sum(axis=1)).max() > 1e-3  # not conserved with a bias


# ----------------------------------------------------------------------------------------
# guided / deconv vs grad
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_guided_equals_grad_without_negative_weights(seed):
    """With W >= 0 and e >= 0 every backward signal is >= 0, so the backward ReLU is the
    identity: guided == grad, and deconv (no forward mask) >= grad."""
    model = _abs_weights(netgen.random_cnn(seed, residual=True))
    layers = netgen.layer_names(model)
    x = _input(model, seed=seed)
    e = _signal(model, seed=seed, kind="dense")
    grad = mr.method_reference(model, x, e, layers, "grad")["P"]
    guided = mr.method_reference(model, x, e, layers, "guided")["P"]
    deconv = mr.method_reference(model, x, e, layers, "deconv")["P"]
    for layer in layers:
        np.testing.assert_allclose(guided[layer], grad[layer], rtol=1e-12, atol=1e-15)
        assert (deconv[layer] >= grad[layer] - 1e-12).all()
        assert (grad[layer] >= 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_guided_differs_from_grad_with_negative_weights(seed):
    model = netgen.random_cnn(seed, residual=False)
    x = _input(model, seed=seed)
    e = _signal(model, seed=seed)
    grad = mr.method_reference(model, x, e, ["input"], "grad")["P"]["input"]
    guided = mr.method_reference(model, x, e, ["input"], "guided")["P"]["input"]
    assert np.abs(grad - guided).max() > 1e-6 * np.abs(grad).max()


# ----------------------------------------------------------------------------------------
# linearity in the signal
# ----------------------------------------------------------------------------------------

LINEAR_METHODS = ("grad", "lrp-epsilon", "lrp-zplus", "mwp", "cmwp", "cmwp-nonorm")


@pytest.mark.parametrize("method", LINEAR_METHODS)
@pytest.mark.parametrize("kind", ["signed", "residual", "concat", "resnet_block", "mobilenet_block"])
def test_linear_in_the_signal(method, kind):
    model, layers = _net(kind, 3)
    x = _input(model, seed=3)
    e1, e2 = _signal(model, seed=1, kind="dense"), _signal(model, seed=2, kind="dense") - 0.5
    p1 = mr.method_reference(model, x, e1, layers, method)["P"]
    p2 = mr.method_reference(model, x, e2, layers, method)["P"]
    p12 = mr.method_reference(model, x, 2.0 * e1 - 3.0 * e2, layers, method)["P"]
    for layer in layers:
        exp = 2.0 * p1[layer] - 3.0 * p2[layer]
        np.testing.assert_allclose(p12[layer], exp, rtol=1e-9, atol=1e-12 * max(1.0, np.abs(exp).max()))


@pytest.mark.parametrize("method", ["deconv", "guided"])
def test_backward_relu_methods_are_homogeneous_not_linear(method):
    model, layers = _net("residual", 5)
    x = _input(model, seed=5)
    e = _signal(model, seed=5, kind="dense") - 0.5
    p = mr.method_reference(model, x, e, ["input"], method)["P"]["input"]
    p3 = mr.method_reference(model, x, 3.0 * e, ["input"], method)["P"]["input"]
    pneg = mr.method_reference(model, x, -e, ["input"], method)["P"]["input"]
    np.testing.assert_allclose(p3, 3.0 * p, rtol=1e-12, atol=1e-15)
    assert np.abs(pneg + p).max() > 1e-3 * np.abs(p).max()


# ----------------------------------------------------------------------------------------
# LRP conservation and relations
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_lrp_zplus_conserves_the_score(seed):
    """Bias-free ReLU net: Z_i > 0 wherever R_i != 0, so every layer of a chain holds
    sum e * s exactly (the skip of a residual block carries part of it: plain nets only)."""
    model = netgen.random_cnn(seed, bias=False, residual=False, signed=False)
    layers = netgen.layer_names(model)
    x = _input(model, seed=seed)
    e = _signal(model, seed=seed, kind="dense")
    res = mr.method_reference(model, x, e, layers, "lrp-zplus")
    total = (e * res["logits"]).sum(axis=1)
    for layer in layers:
        got = res["P"][layer].reshape(len(x), -1).sum(axis=1)
        np.testing.assert_allclose(got, total, rtol=1e-9, err_msg=layer)


@pytest.mark.parametrize("seed", range(5))
def test_lrp_epsilon_conserves_bias_free(seed):
    model = netgen.random_cnn(seed, bias=False, residual=False, signed=True)
    layers = netgen.layer_names(model)
    x = _input(model, seed=seed)
    e = _signal(model, seed=seed, kind="dense")
    res = mr.method_reference(model, x, e, layers, "lrp-epsilon")
    total = (e * res["logits"]).sum(axis=1)
    for layer in layers:
        got = res["P"][layer].reshape(len(x), -1).sum(axis=1)
        np.testing.assert_allclose(got, total, rtol=1e-4, atol=1e-9 * np.abs(total).max(), err_msg=layer)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", ["signed", "nobias", "concat"])
def test_lrp_epsilon_is_gradient_times_input_bias_free(kind, seed, monkeypatch):
    """Bias-free piecewise-linear nets: LRP-0 gives R_t = t * d(e.s)/dt at every tensor
    (Ancona et al. 2018). Exact as eps -> 0 (eps = 1e-14 here); with the default 1e-6 the
    stabiliser damps what passes through weakly activated units (|z_i| ~ eps max|z|)."""
    model, layers = _net(kind, seed)
    if kind == "concat":  # strip the biases
        for n in model.graph.node:
            if n.op_type in ("Conv", "Gemm") and len(n.input) > 2:
                del n.input[2:]
    elif kind == "signed":
        model = netgen.random_cnn(seed, signed=True, bias=False)
        layers = netgen.layer_names(model, spatial_only=False)
    x = _input(model, seed=seed)
    e = _signal(model, seed=seed, kind="dense")
    vals = mr.forward_values(model, x)
    grad = mr.method_reference(model, x, e, layers, "grad")["P"]
    lrp = mr.method_reference(model, x, e, layers, "lrp-epsilon")["P"]
    monkeypatch.setattr(mr, "LRP_EPS", 1e-14)
    lrp0 = mr.method_reference(model, x, e, layers, "lrp-epsilon")["P"]
    for layer in layers:
        gx = vals[layer] * grad[layer]
        scale = np.abs(gx).max()
        assert np.abs(lrp0[layer] - gx).max() <= 1e-9 * scale + 1e-15, layer
        assert np.abs(lrp[layer] - gx).max() <= 1e-2 * scale + 1e-15, layer


@pytest.mark.parametrize("seed", range(4))
def test_lrp_zplus_is_positive_excitation_of_the_score(seed):
    """alpha1-beta0 == Excitation Backprop (positive rule, tests/reference.py) fed e * s."""
    model = netgen.random_cnn(seed, signed=True, residual=True)
    layers = netgen.layer_names(model, spatial_only=False)
    x = _input(model, seed=seed)
    e = _signal(model, seed=seed, kind="dense")
    res = mr.method_reference(model, x, e, layers, "lrp-zplus")
    ref = excitation_reference(model, x, e * res["logits"], layers, rule="positive")
    for layer in layers:
        np.testing.assert_allclose(res["P"][layer], ref["P"][layer], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rule", ["positive", "paper"])
@pytest.mark.parametrize("seed", range(3))
def test_mwp_and_cmwp_match_the_excitation_reference(seed, rule):
    model, layers = _net("concat", seed) if seed == 0 else _net("residual", seed)
    if seed == 0:  # tests/reference.py has no Concat
        layers = [l for l in layers if l not in ("ar", "b", "cat")]
        from excitation_ref import excitation_reference as other
    else:
        other = excitation_reference
    x = _input(model, seed=seed, signed=(rule == "positive"))
    e = _signal(model, seed=seed, kind="dense")
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        got = mr.method_reference(model, x, e, layers, method, rule=rule)
        want = other(model, x, e, layers, rule=rule, contrastive=contrastive)
        for layer in layers:
            np.testing.assert_allclose(got["P"][layer], want["P"][layer], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(got["map"][layer], want["map"][layer], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------
# contrastive variants
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["signed", "residual", "concat", "resnet_block", "mobilenet_block"])
def test_c_grad_is_exactly_zero(kind, seed):
    model, layers = _net(kind, seed)
    x = _input(model, seed=seed)
    e = _signal(model, seed=seed)
    res = mr.method_reference(model, x, e, layers, "c-grad")
    for layer in layers:
        assert (res["map"][layer] == 0).all()
        np.testing.assert_array_equal(res["P_dual"][layer], -res["P"][layer])
        assert np.abs(res["P"][layer]).max() > 0 or layer != "input"


@pytest.mark.parametrize("seed", range(4))
def test_c_deconv_is_not_zero_and_follows_its_definition(seed):
    model, layers = _net("residual", seed)
    x = _input(model, seed=seed)
    e = _signal(model, seed=seed)
    res = mr.method_reference(model, x, e, ["input"], "c-deconv")
    deconv = mr.method_reference(model, x, e, ["input"], "deconv")["map"]["input"]
    np.testing.assert_array_equal(mr.channel_absmax(res["P"]["input"]), deconv)
    m_t, m_d = mr.channel_absmax(res["P"]["input"]), mr.channel_absmax(res["P_dual"]["input"])
    n_t = m_t / m_t.sum(axis=(1, 2), keepdims=True)
    n_d = m_d / m_d.sum(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(res["map"]["input"], np.maximum(n_t - n_d, 0), rtol=1e-12, atol=1e-15)
    assert res["map"]["input"].max() > 0


def _gap_net(seed):
    model = netgen.random_cnn(seed, head="gap_gemm", hidden=False)
    return model, netgen.layer_names(model)


@pytest.mark.parametrize("seed", range(6))
def test_cam_is_hw_times_grad_times_feature(seed):
    model, _ = _gap_net(seed)
    g = mr.Graph(model)
    feat, _ = mr.cam_head(g)
    x = _input(model, seed=seed)
    e = _signal(model, seed=seed, kind="dense")
    cam = mr.method_reference(model, x, e, [feat], "cam")["map"][feat]
    vals = g.forward(x)
    grad = mr.method_reference(model, x, e, [feat], "grad")["P"][feat]
    hw = np.prod(vals[feat].shape[2:])
    np.testing.assert_allclose(cam, hw * (vals[feat] * grad).sum(axis=1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_c_cam_has_the_arg_max_of_cam(seed):
    model, _ = _gap_net(seed)
    feat, _ = mr.cam_head(mr.Graph(model))
    x = _input(model, seed=seed, batch=3)
    e = _signal(model, batch=3, seed=seed)
    cam = mr.method_reference(model, x, e, [feat], "cam")["map"][feat]
    ccam = mr.method_reference(model, x, e, [feat], "c-cam")["map"][feat]
    for n in range(len(x)):
        if cam[n].max() > 0:
            assert np.argmax(ccam[n]) == np.argmax(cam[n])
            np.testing.assert_allclose(ccam[n], 2 * np.maximum(cam[n], 0) / np.abs(cam[n]).sum(), rtol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_reduce_mean_head_equals_global_pool_head(seed):
    """ReduceMean over H, W (keepdims=0) is GlobalAveragePool + Flatten for every method."""
    model, _ = _gap_net(seed)
    other = reduce_mean_head(model)
    layers = [l for l in netgen.layer_names(model) if l != "gap"]
    feat, _ = mr.cam_head(mr.Graph(other))
    x = _input(model, seed=seed)
    e = _signal(model, seed=seed, kind="dense")
    for method in mr.METHODS:
        at = [feat] if method in ("cam", "c-cam") else [l for l in layers if l != "input"] if method in mr.GRAD_CAM \
            else layers
        a = mr.method_reference(model, x, e, at, method)["map"]
        b = mr.method_reference(other, x, e, at, method)["map"]
        for layer in at:
            np.testing.assert_allclose(b[layer], a[layer], rtol=1e-10, atol=1e-15, err_msg=f"{method} {layer}")


@pytest.mark.parametrize("seed", range(4))
def test_grad_cam_at_the_last_feature_map_is_clipped_cam_over_hw(seed):
    """The gradient at the input F of a GAP + linear head is W'e / (H W) at every position, so
    Grad-CAM's weights are CAM's over H W: gradcam = max(cam, 0) / (H W)."""
    model, _ = _gap_net(seed)
    feat, _ = mr.cam_head(mr.Graph(model))
    x = _input(model, seed=seed)
    e = _signal(model, seed=seed, kind="dense") - 0.5
    if mr.method_reference(model, x, e, [feat], "cam")["map"][feat].max() <= 0:
        e = -e   # CAM is linear in e: a signal whose map has positive values
    cam = mr.method_reference(model, x, e, [feat], "cam")["map"][feat]
    gradcam = mr.method_reference(model, x, e, [feat], "gradcam")["map"][feat]
    hw = np.prod(cam.shape[1:])
    assert cam.max() > 0
    np.testing.assert_allclose(gradcam, np.maximum(cam, 0) / hw, rtol=1e-12, atol=1e-15)


def test_grad_cam_map_by_hand():
    """One sample, two channels, two positions; Grad-CAM++ with a zero gradient and a zero denominator."""
    A = np.array([[[1.0, 3.0], [2.0, -4.0]]])          # (N, C, positions): S = 4, -2
    g = np.array([[[0.5, 1.5], [0.0, 1.0]]])
    # Grad-CAM: alpha = (1, 0.5); map = 1 * (1, 3) + 0.5 * (2, -4) = (2, 1)
    np.testing.assert_allclose(mr.grad_cam_map(A, g), [[2.0, 1.0]])
    # Grad-CAM++: channel 0: alpha = 1 / (2 + 4 g) = 1/4, 1/8 -> w0 = 0.5/4 + 1.5/8 = 0.3125;
    # channel 1: g = 0 gives 0 (0/0), g = 1: 2 + (-2)(1) = 0 -> 0 -> w1 = 0
    np.testing.assert_allclose(mr.grad_cam_map(A, g, plus=True), [[0.3125, 0.9375]])
    # channels last (tokens): the same numbers
    np.testing.assert_allclose(mr.grad_cam_map(A.transpose(0, 2, 1), g.transpose(0, 2, 1), channel_axis=2), [[2.0, 1.0]])
    # negative maps are clipped
    np.testing.assert_allclose(mr.grad_cam_map(A, -g), [[0.0, 0.0]])


def test_grad_cam_not_applicable_at_the_input_or_without_positions():
    model, layers = _net("signed", 1)   # ends in relu_hidden, a (N, C) layer
    x, e = _input(model), _signal(model)
    for method in mr.GRAD_CAM:
        with pytest.raises(mr.MethodNotApplicable, match="model's input 'input'"):
            mr.method_reference(model, x, e, ["input"], method)
        with pytest.raises(mr.MethodNotApplicable, match="'relu_hidden' has rank 2"):
            mr.method_reference(model, x, e, ["relu_hidden"], method)


def test_cam_not_applicable_says_why():
    hidden = netgen.random_cnn(1, head="gap_gemm", hidden=True)
    flat = netgen.random_cnn(1, head="flatten_gemm", hidden=False)
    x = _input(flat, batch=1)
    with pytest.raises(mr.MethodNotApplicable, match="fed by Relu"):
        mr.method_reference(hidden, _input(hidden, batch=1), _signal(hidden, batch=1), ["input"], "cam")
    with pytest.raises(mr.MethodNotApplicable, match="not by a global average pool"):
        mr.method_reference(flat, x, _signal(flat, batch=1), ["input"], "cam")
    model, _ = _gap_net(1)
    with pytest.raises(mr.MethodNotApplicable, match="only at the last feature map"):
        mr.method_reference(model, _input(model, batch=1), _signal(model, batch=1), ["input"], "c-cam")


# ----------------------------------------------------------------------------------------
# ablations of c-MWP
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_cmwp_nonorm_closed_form_on_mlp(seed):
    """No Z: at the classifier (h W2)+ - (-h W2)+ = h W2 (h >= 0), so P_h = h * (W2 e);
    below, P_x[j] = sum_k (x_j W1_jk)+ P_h[k]."""
    model, x, e, w1, b1, w2 = _mlp_case(seed)
    h = np.maximum(x @ w1 + b1, 0)
    p_h = h * (e @ w2.T)
    p_x = np.einsum("njk,nk->nj", np.maximum(x[:, :, None] * w1[None], 0), p_h)
    got = mr.method_reference(model, x, e, ["x", "h"], "cmwp-nonorm")
    np.testing.assert_allclose(got["P"]["h"], p_h, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got["P"]["x"], p_x, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(got["map"]["x"], np.maximum(p_x, 0), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("seed", range(4))
def test_cmwp_nonorm_differs_from_cmwp(seed):
    model, layers = _net("residual", seed)
    x = _input(model, seed=seed)
    e = _signal(model, seed=seed)
    a = mr.method_reference(model, x, e, ["input"], "cmwp")["P"]["input"]
    b = mr.method_reference(model, x, e, ["input"], "cmwp-nonorm")["P"]["input"]
    # not a rescaling of c-MWP: the cosine of the two signals is clearly below 1
    cos = (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())
    assert cos < 0.999


@pytest.mark.parametrize("seed", range(4))
def test_cmwp_postnorm_is_cmwp_where_mass_is_conserved(seed):
    """Bias-free ReLU net, non-negative input, one-hot signal of a class with positive and
    negative contributions: both passes keep mass 1 at every layer, so postnorm == cmwp."""
    model = netgen.random_cnn(seed, bias=False, residual=False)
    layers = netgen.layer_names(model)
    x = _input(model, seed=seed, signed=False)
    e = _signal(model, seed=seed)
    post = mr.method_reference(model, x, e, layers, "cmwp-postnorm")
    cmwp = mr.method_reference(model, x, e, layers, "cmwp")
    for layer in layers:
        for key in ("P", "P_dual"):
            mass = post[key][layer].reshape(len(x), -1).sum(axis=1)
            np.testing.assert_allclose(mass, 1.0, rtol=1e-9, err_msg=f"{key} {layer}")
        np.testing.assert_allclose(post["map"][layer], cmwp["map"][layer], rtol=1e-8, atol=1e-12)


def test_cmwp_postnorm_differs_where_a_pass_loses_mass():
    """Hidden unit 1 has only negative inputs but a positive bias: it is active with Z = 0,
    so the MWP mass sent to it is lost. The target class routes most of its signal there
    (and some to unit 2), the dual all of it to unit 0: the separately normalised maps
    differ from c-MWP."""
    w1 = np.array([[1.0, -1.0, 0.5], [0.5, -0.5, 1.0], [0.2, -2.0, 0.3]])
    b1 = np.array([0.0, 3.0, 0.0])
    w2 = np.array([[-1.0, 0.3], [2.0, 0.1], [1.0, -0.2]])
    model = _mlp(w1, b1, w2)
    x = np.array([[1.0, 0.5, 0.25]])
    e = np.array([[1.0, 0.0]])
    post = mr.method_reference(model, x, e, ["x"], "cmwp-postnorm")
    cmwp = mr.method_reference(model, x, e, ["x"], "cmwp")
    mass_t, mass_d = post["P"]["x"].sum(), post["P_dual"]["x"].sum()
    assert mass_t < 0.5 < mass_d                       # the target pass lost mass
    np.testing.assert_allclose(post["map"]["x"],
                               np.maximum(post["P"]["x"] / mass_t - post["P_dual"]["x"] / mass_d, 0), rtol=1e-12)
    assert np.abs(post["map"]["x"] - cmwp["map"]["x"]).max() > 0.1
