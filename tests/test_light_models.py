"""The structure-only real architectures shipped with onnx (backend test data, `light_*.onnx`:
AlexNet, DenseNet-121, Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG19, ZFNet-512)
pass `check` and are explained with finite maps. Their weights are constants built with
ConstantOfShape, folded at canonicalization."""
import os

import numpy as np
import onnx
import pytest

from onnx_excite import Exciter
from onnx_excite.graph.layers import inspect_model

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
MODELS = sorted(f for f in os.listdir(LIGHT) if f.endswith(".onnx")) if os.path.isdir(LIGHT) else []


def test_the_light_models_are_there():
    assert len(MODELS) >= 9, MODELS


@pytest.mark.parametrize("name", MODELS)
def test_light_model_is_supported_and_explained(name):
    path = os.path.join(LIGHT, name)
    report = inspect_model(path)
    assert report.ok, report.problems
    spatial = [l.name for l in report.layers if l.shape and len(l.shape) == 4]
    layers = [report.layers[0].name, spatial[len(spatial) // 2]]
    ex = Exciter(path, layers, methods=("mwp", "cmwp"))
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    res = ex.explain(x, 1)
    for method in ("mwp", "cmwp"):
        for layer in layers:
            m = res.maps[method][layer]
            assert np.isfinite(m).all() and m.sum() > 0, (method, layer)
