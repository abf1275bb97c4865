"""explain / demo end to end on real photos, images and maps helpers."""
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import photo
from onnx_excite import ExciteError
from onnx_excite.cli.app import app
from onnx_excite.io.images import Prepared, load_image, preprocess, resized_size
from onnx_excite.render.maps import normalize, overlay, panel, to_image_space, upsample

runner = CliRunner()
DOG_BOX = (67, 133, 220, 373)   # the dog in the bundled dog.jpg (512x384), drawn by hand: x0, y0, x1, y1


def test_load_image_errors_are_one_line(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    half = photo("dog.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(half[: len(half) // 2])
    for name in ("text.jpg", "truncated.jpg", "missing.jpg"):
        with pytest.raises(ExciteError) as info:
            load_image(tmp_path / name)
        msg = str(info.value)
        assert name in msg and "\n" not in msg


def test_preprocess_geometry_and_layouts():
    assert resized_size((768, 576), 224, "shorter") == (299, 224)
    assert resized_size((352, 448), 224, "shorter") == (224, 285)
    img = Image.new("RGB", (6, 4), (255, 0, 0))
    chw, info = preprocess(img, size=4, resize="shorter", mean=(0, 0, 0), std=(1, 1, 1))
    assert chw.shape == (3, 4, 6) and info.resized_size == (6, 4)
    assert np.allclose(chw[0], 1) and np.allclose(chw[1:], 0)
    hwc, _ = preprocess(img, size=4, resize="shorter", mean=(0, 0, 0), std=(1, 1, 1), layout="NHWC", channel_order="BGR")
    assert hwc.shape == (4, 6, 3) and np.allclose(hwc[..., 2], 1) and np.allclose(hwc[..., :2], 0)


def test_maps_helpers():
    assert np.all(normalize(np.zeros((3, 3))) == 0)
    np.testing.assert_allclose(upsample(np.full((3, 4), 2.0), (40, 30)), 2.0, rtol=1e-6)
    hot = np.zeros((7, 7), np.float32)
    hot[1, 5] = 1  # top-right region of a centre crop
    info = Prepared(original_size=(200, 100), resized_size=(200, 100), crop_box=(50, 0, 150, 100))
    full = to_image_space(hot, info)
    y, x = np.unravel_index(full.argmax(), full.shape)
    assert full.shape == (100, 200) and 120 <= x <= 150 and 5 <= y <= 30
    img = Image.new("RGB", (50, 40))
    assert overlay(img, np.random.rand(5, 6), colorbar=True).size[1] == 40
    assert panel(img, [("a", np.random.rand(5, 6)), ("b", np.random.rand(5, 6))]).size == (150, 54)


def test_explain_dog_default_model(tmp_path):
    res = runner.invoke(app, ["explain", "default", str(photo("dog.jpg")), "--top", "1", "-m", "cmwp",
                              "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "explanations.jsonl").read_text().splitlines()[0])
    assert 151 <= record["top5"][0]["index"] <= 268   # a dog breed
    out = record["outputs"][0]
    full = np.load(out["map_image"])
    assert full.shape == (384, 512)                     # the photo's own size and aspect ratio
    assert np.load(out["map"]).shape == (14, 19)        # features.13 of a 224 x 299 input
    y, x = np.unravel_index(full.argmax(), full.shape)
    x0, y0, x1, y1 = DOG_BOX
    assert x0 <= x <= x1 and y0 <= y <= y1, (x, y)
    assert Image.open(out["overlay"]).size[1] == 384


def test_explain_folder_with_a_bad_file_goes_on(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "broken.jpg").write_bytes(b"garbage")
    Image.open(photo("scream.jpg")).save(src / "scream.png")   # non-square, portrait
    res = runner.invoke(app, ["explain", "default", str(src), "-t", "0", "-m", "mwp", "--no-colorbar",
                              "-o", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "broken.jpg" in res.output and "1 input(s) could not be read" in res.output
    assert "Traceback" not in res.output
    maps = list((tmp_path / "out").glob("scream.0.mwp.*.image.npy"))
    assert len(maps) == 1 and np.load(maps[0]).shape == (448, 352)
    overlay_png = Image.open(str(maps[0]).replace(".image.npy", ".png"))
    assert overlay_png.size == (352, 448)   # no colour bar: exactly the image


def test_demo_writes_overlays_and_summary(tmp_path):
    res = runner.invoke(app, ["demo", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary) == 3 and all(len(r["top5"]) == 5 for r in summary)
    assert {r["top5"][0]["index"] for r in summary if "eagle" in r["image"]} <= {21, 22}
    assert len(list(tmp_path.glob("*.features.13.png"))) == 6    # MWP and c-MWP overlays
    assert len(list(tmp_path.glob("*.panel.png"))) == 3


def test_batches_globs_and_combined_targets(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    img = Image.open(photo("dog.jpg"))
    img.save(src / "a.jpg", quality=95)
    img.transpose(Image.FLIP_LEFT_RIGHT).save(src / "b.jpg", quality=95)
    one, two = tmp_path / "one", tmp_path / "two"
    for out, bs in ((one, "1"), (two, "2")):
        res = runner.invoke(app, ["explain", "default", str(src / "*.jpg"), "-t", "249", "-t", "malamute",
                                  "-t", "Siberian husky", "-m", "mwp", "--batch-size", bs, "-o", str(out)])
        assert res.exit_code == 0, res.output
    for name in ("a.249.mwp.features.13.npy", "b.250.mwp.features.13.npy"):
        np.testing.assert_allclose(np.load(one / name), np.load(two / name), rtol=1e-5, atol=1e-8)
    res = runner.invoke(app, ["explain", "default", str(src / "a.jpg"), "-t", "249", "-t", "250", "--combine",
                              "-m", "mwp", "-o", str(tmp_path / "comb")])
    assert res.exit_code == 0, res.output
    combined = np.load(tmp_path / "comb" / "a.249+250.mwp.features.13.npy")
    separate = np.load(one / "a.249.mwp.features.13.npy") + np.load(one / "a.250.mwp.features.13.npy")
    np.testing.assert_allclose(combined, separate, rtol=1e-4, atol=1e-8)   # linear in the signal
    bad = runner.invoke(app, ["explain", "default", str(src / "*.png"), "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no file matches" in bad.output


def test_a_model_without_profile_says_the_layer_and_preprocessing_it_assumed(tmp_path, tiny_path):
    """No --layer, no --mean/--std: one warning names the layer the graph suggests, one the
    normalisation assumed; with --mean/--std given the second is not said."""
    from PIL import Image
    from typer.testing import CliRunner

    from onnx_excite.cli.app import app

    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(image)
    res = CliRunner().invoke(app, ["explain", str(tiny_path), str(image), "-o", str(tmp_path / "o")],
                             env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert "no --layer given: maps at 'p1'" in res.output
    assert "normalised with mean 0.485,0.456,0.406 and std 0.229,0.224,0.225" in res.output
    res = CliRunner().invoke(app, ["explain", str(tiny_path), str(image), "-o", str(tmp_path / "o2"), "-l", "p1",
                                   "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "no profile" not in res.output and "no --layer" not in res.output, res.output
