"""The library takes a photo: ``Exciter.explain`` on paths and PIL images prepares them as
``onnx-excite explain`` does (the same arrays, so the same maps as the array path, bit for
bit), explains each photo's top-1 class by default, takes class names like ``-t``, and the
``Explanation`` puts the maps on the photos and draws the CLI's overlay."""
import json

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import gap_classifier, photo, tiny_model
from onnx_excite import Exciter, ExciteError
from onnx_excite.apps.explain import ExplainOptions, explain_setup
from onnx_excite.cli.app import app
from onnx_excite.io.images import load_image
from onnx_excite.render.overlay import Style, display_size

DOG, EAGLE, HORSES, SCREAM = photo("dog.jpg"), photo("eagle.jpg"), photo("horses.jpg"), photo("scream.jpg")


@pytest.fixture(scope="module")
def ex():
    return Exciter("default", methods=("mwp", "cmwp", "lrp-epsilon"))


def _cli_arrays(model, paths):
    """The model inputs the CLI's explain pipeline makes of ``paths`` (explain_setup.preprocess)."""
    setup = explain_setup(ExplainOptions(model=model))
    return np.stack([setup.preprocess(load_image(p))[0] for p in paths])


def _same(a, b):
    assert a.maps.keys() == b.maps.keys()
    np.testing.assert_array_equal(a.logits, b.logits)
    for method in a.maps:
        for layer in a.maps[method]:
            np.testing.assert_array_equal(a.maps[method][layer], b.maps[method][layer])


def test_paths_and_pil_images_give_the_maps_of_the_arrays_the_cli_makes(ex):
    x = _cli_arrays("default", [EAGLE, HORSES])
    assert x.shape == (2, 3, 224, 338)                     # shorter side 224, no crop, NCHW
    by_path = ex.explain([EAGLE, str(HORSES)])              # a Path and a str
    top1 = [int(np.argsort(-row)[0]) for row in ex.logits(x)]
    by_array = ex.explain(x, top1)
    _same(by_path, by_array)
    assert by_path.signal.argmax(axis=1).tolist() == top1 and by_path.signal.sum() == 2
    _same(ex.explain(Image.open(EAGLE)), ex.explain(x[:1], top1[0]))   # a PIL image, as opened
    one = ex.explain(DOG)
    assert one.maps["cmwp"]["features.13"].shape == (1, 14, 19) and one.images[0].size == (512, 384)
    # the in-graph top-1 (one run) explains the same class with the same maps
    _same(Exciter("default", methods=("mwp", "cmwp", "lrp-epsilon"), top1=True).explain(DOG), one)


def test_a_model_without_profile_is_prepared_as_the_cli_prepares_it(tmp_path):
    fixed, anysize = tmp_path / "fixed.onnx", tmp_path / "any.onnx"
    onnx.save(tiny_model(), str(fixed))                              # input fixed at 8x8: "exact"
    onnx.save(gap_classifier(6, 4, 2, seed=1), str(anysize))          # any size: shorter side 224
    for path, layer, shape in ((fixed, "r1", (1, 3, 8, 8)), (anysize, "r1", (1, 3, 285, 224))):
        ex = Exciter(path, [layer], methods=("mwp", "grad"))
        x = _cli_arrays(str(path), [SCREAM])
        assert x.shape == shape
        _same(ex.explain(SCREAM, 2), ex.explain(x, 2))


def test_the_maps_on_the_photo_and_the_overlay_are_those_explain_writes(ex, tmp_path):
    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["explain", "default", str(DOG), "-m", "mwp", "-m", "lrp-epsilon", "-o", str(out)])
    assert res.exit_code == 0, res.output
    lib = ex.explain(DOG)
    on_photo = lib.image_maps()
    for method in ("mwp", "lrp-epsilon"):
        stem = out / f"dog.249.{method}.features.13"
        layer_map = np.load(f"{stem}.npy")   # the CLI's own session (static shapes): equal to rounding
        np.testing.assert_allclose(lib.maps[method]["features.13"][0], layer_map, rtol=0,
                                   atol=1e-5 * np.abs(layer_map).max())
        image_map = np.load(f"{stem}.image.npy").astype(np.float32)   # stored as float16
        got = on_photo[method]["features.13"][0]
        assert got.shape == image_map.shape == (384, 512) and got.dtype == np.float32 and got.min() >= 0
        np.testing.assert_allclose(got, image_map, rtol=2e-3, atol=2e-3 * image_map.max())
        drawn = lib.overlay(method, "features.13", 0)
        written = Image.open(f"{stem}.png")
        assert drawn.mode == "RGB" and drawn.size == written.size
        assert np.abs(np.asarray(drawn, np.int16) - np.asarray(written.convert("RGB"), np.int16)).mean() < 0.5
    # defaults: the first method and layer; without a colour bar the photo's display size
    assert np.array_equal(np.asarray(lib.overlay()), np.asarray(lib.overlay("mwp", "features.13")))
    plain = lib.overlay("cmwp", index=0, style=Style(colorbar=False))
    assert plain.mode == "RGB" and plain.size == display_size((512, 384)) == (512, 384)
    assert lib.image_maps(full_res=True)["cmwp"]["features.13"][0].shape == (384, 512)


def test_targets_take_class_names_as_explain_does(ex, tmp_path):
    x = _cli_arrays("default", [DOG])
    by_name = ex.explain(DOG, "malamute")
    _same(by_name, ex.explain(x, 249))
    assert ex.explain(DOG, "Alaskan malamute").signal.argmax() == 249          # a synonym
    pair = ex.explain([EAGLE, HORSES], ["bald eagle", "sorrel"])               # one name per photo
    assert pair.signal.argmax(axis=1).tolist() == [ex.class_index("bald eagle"), ex.class_index("sorrel")]
    _same(ex.explain(x, "malamute"), by_name)                                   # names on arrays too
    with pytest.raises(ExciteError) as caught:
        ex.explain(DOG, "malamut")
    res = CliRunner().invoke(app, ["explain", "default", str(DOG), "-t", "malamut", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == f"error: {caught.value}"     # the CLI's error, word for word
    assert "'malamute' (249)" in str(caught.value)
    with pytest.raises(ExciteError, match="out of range"):
        ex.explain(DOG, 1000)


def test_photos_errors_are_one_line(ex, tmp_path):
    with pytest.raises(ExciteError, match="2 sizes .* one at a time"):
        ex.explain([DOG, EAGLE])                                   # 224x298 and 224x338
    with pytest.raises(ExciteError, match="no such file"):
        ex.explain(tmp_path / "missing.jpg")
    arrays = ex.explain(_cli_arrays("default", [DOG]), 249)
    for call in (arrays.image_maps, arrays.overlay):
        with pytest.raises(ExciteError, match="needs the photos"):
            call()
    res = ex.explain(DOG)
    for kwargs, words in (({"method": "grad"}, "no 'grad' maps"), ({"layer": "features.3"}, "no maps at layer"),
                          ({"index": 1}, "out of range")):
        with pytest.raises(ExciteError, match=words):
            res.overlay(**kwargs)
    with pytest.raises(ExciteError, match="no targets given"):    # arrays: the top-1 needs top1=True, as before
        ex.explain(_cli_arrays("default", [DOG]))
