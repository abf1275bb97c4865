"""tests/method_ref.py on the default model (ImageNet MobileNetV2: folded Conv, ReLU6 Clip,
depthwise convs, residual Adds, GAP + Gemm head), at a 64 x 64 input to keep it quick:
every method finite, grad = finite differences, the CAM and contrastive identities."""
import numpy as np
import onnx
import pytest

import method_ref as mr
from onnx_excite.models import mobilenet_v2


@pytest.fixture(scope="module")
def model():
    try:
        mobilenet_v2.find_weights()
    except mobilenet_v2.ModelUnavailableError as exc:  # same policy as tests/test_mobilenet_v2.py
        pytest.skip(f"MobileNetV2 weights not installed ({exc})")
    return onnx.load(str(mobilenet_v2.load_default_model()))


@pytest.fixture(scope="module")
def case(model):
    g = mr.Graph(model)
    x = np.random.default_rng(0).uniform(-2, 2, size=(1, 3, 64, 64))
    vals = g.forward(x)
    k = int(vals[g.logits_name()].argmax())
    feat, _ = mr.cam_head(g)
    return g, x, np.eye(vals[g.logits_name()].shape[1])[[k]], vals, feat


def test_every_method_is_finite_on_the_default_model(model, case):
    g, x, e, vals, feat = case
    assert feat == "features.18"
    layers = ["input", "features.13", feat]
    for method in mr.METHODS:
        at = [feat] if method in ("cam", "c-cam") else layers[1:] if method in mr.GRAD_CAM else layers
        res = mr.method_reference(model, x, e, at, method)
        for layer in at:
            m = res["map"][layer]
            assert np.isfinite(m).all(), (method, layer)
            if method == "c-grad":
                assert (m == 0).all()
            elif not (method == "c-deconv" and layer == feat):  # no rectifier above the last map
                assert np.abs(m).max() > 0, (method, layer)


def test_grad_equals_finite_differences_on_the_default_model(model, case):
    g, x, e, vals, feat = case
    res = mr.method_reference(model, x, e, ["input", "features.13"], "grad")["P"]
    logits = g.logits_name()
    rng = np.random.default_rng(1)
    h = 1e-6
    for layer in ("input", "features.13"):
        base = vals[layer]
        idx = rng.choice(np.flatnonzero((base.ravel() != 0) & (base.ravel() != 6)), size=4, replace=False)
        idx = np.concatenate([idx, [int(np.abs(res[layer]).argmax())]])  # and the largest gradient
        for i in idx:
            plus, minus = base.copy(), base.copy()
            plus.flat[i] += h
            minus.flat[i] -= h
            fd = ((e * g.forward(x, {layer: plus})[logits]).sum() - (e * g.forward(x, {layer: minus})[logits]).sum()) / (2 * h)
            assert abs(res[layer].flat[i] - fd) <= 1e-5 * max(abs(fd), np.abs(res[layer]).max()), (layer, i)


def test_cam_identities_on_the_default_model(model, case):
    g, x, e, vals, feat = case
    cam = mr.method_reference(model, x, e, [feat], "cam")["map"][feat]
    grad = mr.method_reference(model, x, e, [feat], "grad")["P"][feat]
    hw = np.prod(vals[feat].shape[2:])
    np.testing.assert_allclose(cam, hw * (vals[feat] * grad).sum(axis=1), rtol=1e-9, atol=1e-12)
    ccam = mr.method_reference(model, x, e, [feat], "c-cam")["map"][feat]
    assert cam.max() > 0 and np.argmax(ccam) == np.argmax(cam)
