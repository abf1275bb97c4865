"""The positive rule on the real ImageNet MobileNetV2 (signed pixels, linear bottlenecks,
residual sums of signed branches): float32 maps from ONNX Runtime agree with the float64
numpy reference of the same rule, at the 14x14 layer and at the input, MWP and c-MWP."""
import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import photo
from excitation_ref import Reference
from onnx_excite import Exciter
from onnx_excite.models import mobilenet_v2


@pytest.fixture(scope="module")
def model_path():
    try:
        return str(mobilenet_v2.load_default_model())
    except mobilenet_v2.ModelUnavailableError as exc:
        pytest.fail(f"default model weights missing: {exc}")  # CI installs them: never skip silently


def test_positive_rule_float32_matches_float64_on_mobilenet_v2(model_path):
    img = Image.open(photo("dog.jpg")).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = ((np.asarray(img, np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    layers = ["features.13", "input"]
    ex = Exciter(model_path, layers, methods=("mwp", "cmwp"), rule="positive")
    target = int(ex.logits(x).argmax())
    assert 151 <= target <= 268  # a dog breed
    res = ex.explain(x, target)
    ref = Reference(onnx.load(model_path))
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, np.eye(1000)[[target]], layers, rule="positive", contrastive=contrastive)
        for layer in layers:
            got, exp = res.maps[method][layer].ravel(), want["map"][layer].ravel()
            assert np.corrcoef(got, exp)[0, 1] >= 0.999, (method, layer)
            assert np.abs(got - exp).max() <= 1e-3 * np.abs(exp).max(), (method, layer)
