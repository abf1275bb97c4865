"""The companion graph (Exciter, float32, ONNX Runtime) against tests/method_ref.py for every
registered method (a new method joins this test without an edit; rollout, which these CNNs do
not have, is refused here and compared on vision transformers in tests/test_rollout.py)."""
import re

import numpy as np
import pytest

import method_ref as mr
from method_nets import feature_layers, net, num_classes
from onnx_excite import Exciter
from onnx_excite.errors import ExciteError
from onnx_excite.methods import METHODS, get_method

KINDS = [("residual", 0), ("signed", 1), ("concat", 2), ("resnet_block", 0), ("mobilenet_block", 1),
         ("reduce_mean", 3)]


@pytest.mark.parametrize("kind,seed", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_builder_matches_method_ref(method, kind, seed):
    model, layers = net(kind, seed)
    if get_method(method).layers in ("last-feature-map", "attention-tokens"):   # cam's; rollout's (none here)
        try:
            layers = [mr.method_layer(model, method)]
        except mr.MethodNotApplicable:  # the builder must refuse too, with one clear error
            with pytest.raises(ExciteError):
                Exciter(model, layers, methods=(method,))
            return
    if get_method(method).layers == "feature-maps":   # Grad-CAM: refused at the input and at rank-2 layers
        for layer in set(layers) - set(feature_layers(model, layers)):
            with pytest.raises(mr.MethodNotApplicable):
                mr.method_reference(model, np.zeros((1,) + _shape(model)), np.zeros((1, num_classes(model))),
                                    [layer], method)
            with pytest.raises(ExciteError, match="^" + re.escape(method) + ": "):
                Exciter(model, [layer], methods=(method,))
        layers = feature_layers(model, layers)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2,) + _shape(model)).astype(np.float32)
    k = num_classes(model)
    signal = np.eye(k, dtype=np.float32)[rng.integers(0, k, size=2)]
    for rule in ("positive", "paper") if get_method(method).linear.parts is None else ("positive",):
        # the paper rule's Z = sum a W+ cancels on signed inputs (a 1e-7 perturbation of the
        # input moves its map by 1e-3): compare it on non-negative images only
        xr = np.abs(x) if rule == "paper" else x
        got = Exciter(model, layers, methods=(method,), rule=rule).explain(xr, signal).maps[method]
        want = mr.method_reference(model, xr.astype(np.float64), signal, layers, method, rule=rule)
        for layer in layers:
            scale = max(np.abs(want["map"][layer]).max(), np.abs(want["P"][layer]).max())
            err = np.abs(got[layer] - want["map"][layer]).max()
            assert err <= 1e-4 * scale + 1e-7, (method, rule, layer, err, scale)


def _shape(model):
    return tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
