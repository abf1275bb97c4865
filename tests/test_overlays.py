"""Overlays and panels a person can read: captions, colour bar ticks and label, shared or
per-map scaling, alpha, colour maps (matplotlib or built in), clipping, size caps; explain
and bench print what they did (issue 10)."""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_model
from onnx_excite import ExciteError
from onnx_excite.render import overlay as render
from onnx_excite.cli.app import app
from onnx_excite.apps.explain import sample_images

runner = CliRunner()
DOG = next(p for p in sample_images() if p.name == "dog.jpg")


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    return path


def _records(out):
    return [json.loads(ln) for ln in (Path(out) / "explanations.jsonl").read_text().splitlines()]


def _blob_map(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-((yy - h * 0.6) ** 2 + (xx - w * 0.3) ** 2) / (2 * (0.15 * min(h, w)) ** 2)).astype(np.float32)


def test_caption_band_holds_white_text_and_leaves_the_rest():
    img = Image.new("RGB", (300, 300), (90, 90, 90))
    style = render.Style(alpha=0.0, colorbar=False)
    out = np.asarray(render.labelled_overlay(img, _blob_map(300, 300), ["malamute  p=0.54", "MWP · features.13"], style))
    assert out.shape == (300, 300, 3)
    band_rows = np.where((out != 90).any(axis=(1, 2)))[0]
    assert band_rows.min() == 0 and 20 < band_rows.max() < 80   # a band at the top, two lines
    band = out[: band_rows.max() + 1]
    assert (band.min(axis=2) > 200).sum() > 100                   # white text drawn in it
    assert (out[band_rows.max() + 1:] == 90).all()                # alpha 0: the rest is the photo


def test_font_grows_with_the_image():
    assert render.font_px((224, 224)) < render.font_px((800, 600)) < render.font_px((3000, 2000))
    heights = []
    for side in (300, 1200):
        img = Image.new("RGB", (side, side), (90, 90, 90))
        out = np.asarray(render.caption_band(img, ["malamute  p=0.54"]))
        heights.append(int(np.where((out != 90).any(axis=(1, 2)))[0].max()))
    assert heights[1] > 2.5 * heights[0]


def test_colour_bar_has_ticks_and_a_label():
    bar = render.colorbar(400, 0.02, "excitation", px=16)
    arr = np.asarray(bar)
    # the ramp: its top is the hottest colour, its bottom the coldest
    lut = render.colormap_lut("jet")
    col = arr[:, 2]
    assert np.abs(col[12].astype(int) - lut[-1]).max() <= 8 and np.abs(col[-12].astype(int) - lut[0]).max() <= 8
    bar_w = max(10, 16)
    ticks = np.where((arr[:, bar_w + 1] < 60).all(axis=1))[0]
    groups = np.split(ticks, np.where(np.diff(ticks) > 1)[0] + 1)
    assert len(groups) == 5                                        # 0, 1/4, 1/2, 3/4, 1 x vmax
    label_strip = arr[:, -14:]
    assert (label_strip.min(axis=2) < 100).sum() > 50               # the rotated label is drawn
    assert render.tick_texts(np.linspace(0, 0.02, 5)) == ["0.0000", "0.0050", "0.0100", "0.0150", "0.0200"]


@pytest.mark.parametrize("vmax", [0.54, 0.02, 0.0041, 3.0, 250.0, 7e-4, 3e5, 1e-9])
def test_tick_labels_share_one_format_and_read_back_as_the_values(vmax):
    values = np.linspace(0, vmax, 5)
    texts = render.tick_texts(values)
    scientific = ["e" in t for t in texts]
    assert len(set(scientific)) == 1                                   # one form for every tick
    if not scientific[0]:
        assert len({len(t.split(".")[1]) if "." in t else 0 for t in texts}) == 1   # the same decimals
    else:
        assert texts[0] == "0.0e+00"
    got = np.array([float(t) for t in texts])
    step = values[1]
    np.testing.assert_allclose(got, values, rtol=0, atol=0.1 * step)   # two significant digits of the step
    assert len(set(texts)) == 5                                         # distinct ticks


def test_an_lrp_epsilon_overlay_says_relevance_from_the_method_declaration(monkeypatch):
    """The caption and colour bar text of an overlay come from the method's declaration
    (Method.label, Method.quantity), not from one word for every method."""
    import dataclasses

    from onnx_excite import methods

    lrp = methods.METHODS["lrp-epsilon"]
    assert render.bar_label("lrp-epsilon") == "relevance" == lrp.quantity
    assert render.bar_label("lrp-epsilon", shared=True) == "relevance (shared scale)"
    assert render.map_caption(render.class_head("malamute", 0.541), "lrp-epsilon", "features.13", "paper") == [
        "malamute  p=0.54", "lrp-epsilon · features.13 · paper rule"]
    # a changed declaration changes the text: it is read from the declaration, not a table
    monkeypatch.setitem(methods.METHODS, "lrp-epsilon", dataclasses.replace(lrp, quantity="relevance R", display="LRP-ε"))
    assert render.bar_label("lrp-epsilon") == "relevance R"
    assert render.map_caption("", "lrp-epsilon", "x") == ["LRP-ε · x"]
    labels = {name: render.bar_label(name) for name in methods.METHODS}
    assert labels["mwp"] == "winning probability" and labels["grad"] == "|gradient|"
    assert labels["cam"] == "class activation" and labels["cmwp"].startswith("contrastive")
    assert all(labels.values()) and "excitation" not in labels.values()
    with pytest.raises(ValueError, match="quantity"):   # a method must say what its maps hold
        dataclasses.replace(lrp, quantity="")


def test_alpha_and_colour_maps():
    img = Image.new("RGB", (256, 256), (0, 128, 0))
    m = _blob_map(256, 256)
    y, x = np.unravel_index(m.argmax(), m.shape)
    full = np.asarray(render.labelled_overlay(img, m, [], render.Style(alpha=1.0, colorbar=False)))
    assert tuple(full[y, x]) == tuple(render.colormap_lut("jet")[255])
    none = np.asarray(render.labelled_overlay(img, m, [], render.Style(alpha=0.0, colorbar=False)))
    assert (none == (0, 128, 0)).all()
    import matplotlib

    viridis = np.asarray(render.labelled_overlay(img, m, [], render.Style(cmap="viridis", alpha=1.0, colorbar=False)))
    expected = np.round(np.asarray(matplotlib.colormaps["viridis"](1.0))[:3] * 255)
    assert np.abs(viridis[y, x].astype(int) - expected).max() <= 1
    with pytest.raises(ExciteError, match="unknown colour map 'viridiss'; did you mean viridis"):
        render.Style(cmap="viridiss")


def test_without_matplotlib_the_built_in_map_works_and_others_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib raises ImportError
    render.colormap_lut.cache_clear()
    try:
        assert render.colormap_lut("jet").shape == (256, 3)
        with pytest.raises(ExciteError, match=r"onnx-excite\[plot\]"):
            render.colormap_lut("viridis")
    finally:
        render.colormap_lut.cache_clear()


def _many_class_model(path, classes=8):
    from conftest import gap_classifier

    onnx.save(gap_classifier(classes, width=6, stride=2, seed=4), str(path))
    return path


@pytest.mark.parametrize("scale", ["shared", "max"])
def test_shared_and_per_map_scales(tmp_path, scale):
    model = _many_class_model(tmp_path / "m.onnx")
    src = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(src)
    res = _run("explain", model, src, "-l", "r1", "--top", "3", "--size", "32", "--scale", scale,
               "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    outs = _records(tmp_path / "o")[0]["outputs"]
    assert len(outs) == 6 and len({o["panel"] for o in outs}) == 3
    classes_panel = {o["classes_panel"] for o in outs}          # all three classes side by side
    assert len(classes_panel) == 1 and Image.open(classes_panel.pop()).size[1] > 3 * 256
    for method in ("mwp", "cmwp"):
        group = [o for o in outs if o["method"] == method]
        own = [float(np.load(o["map_image"]).astype(np.float32).max()) for o in group]
        vmax = [o["vmax"] for o in group]
        if scale == "shared":      # one scale for the image's three classes: the largest maximum
            np.testing.assert_allclose(vmax, [max(own)] * 3, rtol=2e-3)
        else:
            np.testing.assert_allclose(vmax, own, rtol=2e-3)
        assert all(o["label"] for o in group) and all(0 <= o["prob"] <= 1 for o in group)


def test_maps_clipped_at_zero_and_the_top_prediction_printed(tmp_path):
    res = _run("explain", "default", DOG, "-m", "cmwp", "--top", "1", "-o", tmp_path)
    assert res.exit_code == 0, res.output
    assert "dog.jpg: malamute (0." in res.output                        # as `demo` prints it
    out = _records(tmp_path)[0]["outputs"][0]
    from onnx_excite.render.maps import to_image_space
    from onnx_excite.io.images import Prepared

    w, h = Image.open(DOG).size
    raw = to_image_space(np.load(out["map"]), Prepared((w, h), (round(w * 224 / h), 224)))
    assert raw.min() < 0                                                # bicubic overshoot exists...
    stored = np.load(out["map_image"])
    assert stored.dtype == np.float16 and stored.shape == (h, w)
    assert stored.min() >= 0                                           # ...and is clipped


def test_large_photos_are_capped_unless_full_res(tiny, tmp_path):
    big = tmp_path / "big.png"
    yy, xx = np.mgrid[0:2000, 0:3000]
    Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)).save(big)
    res = _run("explain", tiny, big, "-l", "r1", "-m", "mwp", "-o", tmp_path / "capped")
    assert res.exit_code == 0, res.output
    out = _records(tmp_path / "capped")[0]["outputs"][0]
    stored = np.load(out["map_image"])
    assert stored.shape == (1067, 1600) and stored.dtype == np.float16
    assert max(Image.open(out["overlay"]).size) <= 1600 and max(Image.open(out["panel"]).size) <= 1600
    res = _run("explain", tiny, big, "-l", "r1", "-m", "mwp", "--full-res", "-o", tmp_path / "full")
    assert res.exit_code == 0, res.output
    out = _records(tmp_path / "full")[0]["outputs"][0]
    assert np.load(out["map_image"]).shape == (2000, 3000)
    assert Image.open(out["overlay"]).size[1] == 2000


def test_bench_says_which_input_it_used(tiny):
    res = _run("bench", tiny, "-l", "r1", "--runs", "2")
    assert res.exit_code == 0, res.output
    assert "input used: x 1x3x8x8" in res.output


def test_written_pngs_hold_the_rendered_pixels_exactly(tmp_path):
    """The PNG settings of explain's files (zlib's run-length strategy) are lossless: the file
    decodes to the very pixels rendered, as Pillow's default PNG settings would."""
    photo = Image.open(DOG).convert("RGB")
    over = render.labelled_overlay(photo, _blob_map(photo.height, photo.width), ["dog  p=0.90", "MWP · x"],
                                   render.Style())
    render.save_png(over, tmp_path / "fast.png")
    over.save(tmp_path / "default.png")
    fast, default = (np.asarray(Image.open(tmp_path / n)) for n in ("fast.png", "default.png"))
    assert np.array_equal(fast, np.asarray(over)) and np.array_equal(fast, default)
    assert Image.open(tmp_path / "fast.png").format == "PNG"


@pytest.mark.parametrize("cmap", ["jet", "viridis"])
def test_colorize_is_the_table_lookup_of_rounded_clipped_values(cmap):
    """colorize (Pillow's palette conversion for 2-D maps) = the colour table indexed by
    rint(255 v), v clipped to [0, 1], NaN as 0: 2-D and 1-D, with NaN, infinities, values
    out of range and the ties between two indices."""
    pytest.importorskip("matplotlib") if cmap != "jet" else None
    rng = np.random.default_rng(0)
    v = (rng.random((37, 53)) * 1.4 - 0.2).astype(np.float32)
    v.flat[:8] = [np.nan, np.inf, -np.inf, -1.0, 0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0]
    lut = render.colormap_lut(cmap)
    expected = lut[np.clip(np.rint(np.clip(np.nan_to_num(v.astype(np.float64), nan=0.0), 0, 1) * 255), 0, 255)
                   .astype(np.intp)]
    assert np.array_equal(render.colorize(v, cmap), expected)
    assert np.array_equal(render.colorize(v[0], cmap), expected[0])
    assert np.array_equal(np.asarray(render.colorize_image(v, cmap)), expected)
