"""Flatten -> Gemm heads turned into convolutions: same model at the original size, a class
score map (pooled by log-sum-exp) on larger images, maps that match the reference."""
import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnn_gen import input_shape, random_cnn
from conftest import photo
from excitation_ref import Reference
from onnx_excite import Exciter
from onnx_excite.cli.app import app
from onnx_excite.graph.fullyconv import convert_dense_head

CONVERTIBLE = [s for s in range(40) if convert_dense_head(random_cnn(s)[0])[1]]


def test_some_heads_are_converted():
    assert len(CONVERTIBLE) >= 15


@pytest.mark.parametrize("seed", CONVERTIBLE[:15])
def test_converted_model_is_the_same_at_its_size_and_right_at_others(seed):
    model, layers = random_cnn(seed)
    conv, ok = convert_dense_head(model)
    assert ok
    onnx.checker.check_model(conv, full_check=True)
    shape = input_shape(model)
    x = np.random.default_rng(seed).normal(size=(2,) + shape).astype(np.float32)
    spatial = [l for l in layers if l == "input" or l.startswith(("conv", "relu", "maxpool", "avgpool"))]
    spatial = [l for l in spatial if l in {o for n in conv.graph.node for o in n.output} | {"input"}]
    a = Exciter(model, spatial).explain(x, 1)
    b = Exciter(conv, spatial, input_shapes={"input": [None, *shape]}).explain(x, 1)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    for method in ("mwp", "cmwp"):
        for layer in spatial:
            if a.maps[method][layer].ndim != 3:
                continue
            tol = 1e-5 * np.abs(a.maps["mwp"][layer]).max() + 1e-12
            np.testing.assert_allclose(a.maps[method][layer], b.maps[method][layer], rtol=1e-4, atol=tol)
    c, h, w = shape
    big = np.random.default_rng(seed).normal(size=(1, c, h + 5, w + 9)).astype(np.float32)
    res = Exciter(conv, ["input"], input_shapes={"input": [None, c, h + 5, w + 9]}).explain(big, 0)
    want = Reference(conv).run(big, np.eye(res.logits.shape[1])[[0]], ["input"])
    np.testing.assert_allclose(res.logits, want["logits"], rtol=1e-4, atol=1e-5)
    err = np.abs(res.maps["mwp"]["input"] - want["map"]["input"]).max()
    assert err <= 1e-4 * np.abs(want["map"]["input"]).max()


def test_explain_runs_a_vgg_like_model_on_a_non_square_photo(tmp_path):
    seed = next(s for s in CONVERTIBLE if input_shape(random_cnn(s)[0])[0] == 3)   # an RGB input
    model, _ = random_cnn(seed)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    img = tmp_path / "p.png"
    Image.open(photo("scream.jpg")).convert("RGB").resize((30, 40)).save(img)
    res = CliRunner().invoke(app, ["explain", str(path), str(img), "-l", "input", "-t", "0", "-m", "mwp",
                                   "--size", "24", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    full = np.load(tmp_path / "out" / "p.0.mwp.input.image.npy")
    assert full.shape == (40, 30)
