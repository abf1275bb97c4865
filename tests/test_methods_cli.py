"""Every registered method through the commands: explain (with the paper's blur and
--no-blur), eval (--methods, --blur/--no-blur), bench --method, export; bad names in one line."""
import json

import numpy as np
import onnx
from typer.testing import CliRunner

from conftest import VOC_SAMPLE, photo
from onnx_excite.cli.app import app
from onnx_excite.render.postprocess import blur_sigma, gaussian_blur

runner = CliRunner()


def test_explain_grad_is_blurred_unless_no_blur(tmp_path):
    outs = {}
    for flag in ("--blur", "--no-blur"):
        out = tmp_path / flag.strip("-")
        res = runner.invoke(app, ["explain", "default", str(photo("dog.jpg")), "-t", "249", "-m", "grad",
                                  "-m", "lrp-epsilon", "-m", "mwp", flag, "-o", str(out)])
        assert res.exit_code == 0, res.output
        outs[flag] = out
    for method, blurred in (("grad", True), ("lrp-epsilon", True), ("mwp", False)):
        sharp = np.load(outs["--no-blur"] / f"dog.249.{method}.features.13.image.npy").astype(np.float32)
        soft = np.load(outs["--blur"] / f"dog.249.{method}.features.13.image.npy").astype(np.float32)
        if not blurred:
            np.testing.assert_array_equal(soft, sharp)
            continue
        h, w = sharp.shape
        # the stored map is max(blur(upsampled), 0); --no-blur stores max(upsampled, 0)
        assert not np.allclose(soft, sharp)
        assert soft.max() <= sharp.max() * 1.001   # a blur never raises the maximum
        assert abs(blur_sigma(w, h) - 0.02 * max(w, h)) < 1e-9
    layer_map = np.load(outs["--blur"] / "dog.249.grad.features.13.npy")
    assert layer_map.ndim == 2 and (layer_map >= 0).all()   # max |g| over channels
    record = json.loads((outs["--blur"] / "explanations.jsonl").read_text().splitlines()[0])
    assert {o["method"] for o in record["outputs"]} == {"grad", "lrp-epsilon", "mwp"}


def test_gaussian_blur_preserves_mass():
    m = np.random.default_rng(0).random((20, 30))
    assert abs(gaussian_blur(m, 2.0).sum() - m.sum()) < 1e-9 * m.sum()


def test_eval_takes_every_method_and_the_blur_flag(tmp_path):
    common = ["--data", str(VOC_SAMPLE), "--mapping", "voc_sample_to_imagenet"]
    res = runner.invoke(app, ["eval", "pointing", *common, "--methods", "grad,deconv,lrp-zplus,cmwp-postnorm,center",
                              "-o", str(tmp_path / "blur")])
    assert res.exit_code == 0, res.output
    res2 = runner.invoke(app, ["eval", "pointing", *common, "--methods", "grad,deconv,lrp-zplus,cmwp-postnorm,center",
                               "--no-blur", "-o", str(tmp_path / "sharp")])
    assert res2.exit_code == 0, res2.output
    blur = json.loads((tmp_path / "blur" / "results.json").read_text())
    sharp = json.loads((tmp_path / "sharp" / "results.json").read_text())
    assert blur["settings"]["blur"] is True and sharp["settings"]["blur"] is False
    for label in ("grad:features.13", "deconv:features.13", "lrp-zplus:features.13", "cmwp-postnorm:features.13"):
        assert label in blur["summary"]
    points = lambda res, label: [it["points"][label] for it in res["items"]]  # noqa: E731
    assert points(blur, "grad:features.13") != points(sharp, "grad:features.13")           # blurred
    assert points(blur, "cmwp-postnorm:features.13") == points(sharp, "cmwp-postnorm:features.13")   # not
    res = runner.invoke(app, ["eval", "localization", *common, "--methods", "cam,c-cam", "--layer", "features.18",
                              "-o", str(tmp_path / "cam")])
    assert res.exit_code == 0, res.output
    assert "cam:features.18" in res.output
    own = runner.invoke(app, ["eval", "pointing", *common, "--methods", "cam", "-o", str(tmp_path / "own")])
    assert own.exit_code == 0 and "cam:features.18" in own.output, own.output   # no layer named: CAM's own
    bad = runner.invoke(app, ["eval", "pointing", *common, "--methods", "cam", "--layer", "features.13",
                              "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines()[-1] == (
        "error: cam: defined only at the last feature map 'features.18', not at 'features.13'")
    bad = runner.invoke(app, ["eval", "pointing", *common, "--methods", "gard", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "unknown method 'gard' (did you mean 'grad'?)" in bad.output


def test_bench_method_ratio_to_mwp(tiny_path):
    res = runner.invoke(app, ["bench", str(tiny_path), "--layer", "x", "--runs", "2", "--method", "guided",
                              "--method", "c-deconv"])
    assert res.exit_code == 0, res.output
    assert "forward+guided" in res.output and "forward+c-deconv" in res.output and "x fwd+MWP" in res.output
    bad = runner.invoke(app, ["bench", str(tiny_path), "--layer", "x", "--method", "nope"])
    assert bad.exit_code == 2 and bad.output.strip().startswith("error: unknown method 'nope'")


def test_export_any_method(tmp_path, tiny_path):
    out = tmp_path / "companion.onnx"
    res = runner.invoke(app, ["export", str(tiny_path), "-o", str(out), "-l", "x", "-m", "guided", "-m", "lrp-epsilon",
                              "-m", "c-deconv"])
    assert res.exit_code == 0, res.output
    names = {o.name for o in onnx.load(str(out)).graph.output}
    assert {"guided:x", "lrp-epsilon:x", "c-deconv:x"} <= names
