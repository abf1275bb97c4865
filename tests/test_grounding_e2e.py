"""Grounding end to end with the default model: the library, `onnx-excite ground` and
`onnx-excite eval grounding` on the hand-made Flickr30k Entities-format dataset."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from onnx_excite.cli.app import app
from onnx_excite.apps.grounding import Grounder, scoring
from onnx_excite.apps.grounding.core import class_weights
from onnx_excite.apps.grounding.flickr30k import read_flickr30k_entities

runner = CliRunner()
TINY = Path(__file__).resolve().parent / "data" / "flickr30k_tiny"
SAMPLES = Path(__file__).resolve().parents[1] / "onnx_excite" / "data" / "samples"


@pytest.fixture(scope="module")
def grounder():
    return Grounder("default")


@pytest.fixture(scope="module")
def dataset():
    images, problems = read_flickr30k_entities(TINY, "test", SAMPLES)
    assert not problems
    return {img.image_id: img for img in images}


def _gt(dataset, image, text):
    return next(q.boxes for q in dataset[image].queries if q.text == text)


def test_class_weights():
    logits = np.array([0.0, 1.0, 2.0, 3.0])
    w = class_weights(logits, [1, 3])
    np.testing.assert_allclose(w, np.exp([1, 3]) / np.exp([1, 3]).sum())
    np.testing.assert_allclose(class_weights(None, [0, 1, 2, 3]), 0.25)
    assert class_weights(logits, [2]).tolist() == [1.0]


@pytest.mark.parametrize("image,phrase,text", [("dog", "a dog", "A dog"), ("dog", "a bicycle", "A bicycle"),
                                               ("horses", "the horses", "Horses"),  # "white" is out of vocabulary: any horse
                                               ("eagle", "an eagle", "An eagle")])
def test_phrase_map_peaks_on_the_object(grounder, dataset, image, phrase, text):
    photo = Image.open(SAMPLES / f"{image}.jpg").convert("RGB")
    parsed = grounder.parse(phrase)
    maps = grounder.word_maps(photo, parsed.words)
    pmap = grounder.phrase_map(parsed, maps)
    assert pmap.shape == (photo.height, photo.width) and pmap.min() >= 0
    assert pmap.sum() == pytest.approx(1.0, rel=1e-6)
    y, x = np.unravel_index(np.argmax(pmap), pmap.shape)
    # inside one of the phrase's boxes (for "the horses": one of the five horses)
    assert any(x1 <= x < x2 and y1 <= y < y2 for x1, y1, x2, y2 in _gt(dataset, image, text)), (phrase, (x, y))


def test_phrase_map_is_the_mean_of_word_maps(grounder):
    photo = Image.open(SAMPLES / "dog.jpg").convert("RGB")
    parsed = grounder.parse("a dog and a bicycle")
    assert parsed.keys == ["dog", "bicycle"]
    maps = grounder.word_maps(photo, parsed.words)
    np.testing.assert_allclose(grounder.phrase_map(parsed, maps), (maps["dog"] + maps["bicycle"]) / 2)
    assert grounder.phrase_map(grounder.parse("a man"), {}) is None


def test_ground_ranks_given_boxes(grounder, dataset):
    photo = Image.open(SAMPLES / "dog.jpg").convert("RGB")
    dog, bike = _gt(dataset, "dog", "A dog")[0], _gt(dataset, "dog", "A bicycle")[0]
    boxes = np.array([[0, 0, 60, 60], bike, dog, [400, 300, 500, 380]])
    res = grounder.ground(photo, "a dog", boxes)
    assert res.boxes[0].tolist() == dog.tolist() and res.proposals == 4
    assert np.all(np.diff(res.scores) <= 0)
    res = grounder.ground(photo, "a red bicycle", boxes)
    assert res.boxes[0].tolist() == bike.tolist() and res.phrase.oov == ["red"]
    none = grounder.ground(photo, "a man", boxes)
    assert len(none.boxes) == 0 and none.phrase_map is None and none.phrase.oov == ["man"]


def test_ground_cli(tmp_path, dataset):
    boxes = tmp_path / "boxes.json"
    dog = _gt(dataset, "dog", "A dog")[0].tolist()
    boxes.write_text(json.dumps([[0, 0, 60, 60], dog, [300, 40, 470, 120], [400, 300, 500, 380]]))
    out = tmp_path / "out"
    res = runner.invoke(app, ["ground", "default", str(SAMPLES / "dog.jpg"), "a brown dog", "a man",
                              "--proposals", str(boxes), "--top", "3", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "out of vocabulary: brown" in res.output and "no word of 'a man'" in res.output
    rec = json.loads((out / "dog.a_brown_dog.boxes.json").read_text())
    assert rec["words"] == ["dog"] and rec["out_of_vocabulary"] == ["brown"] and rec["proposals"] == 4
    assert len(rec["boxes"]) == 3 and rec["boxes"][0]["box"] == dog and rec["boxes"][0]["rank"] == 1
    overlay = Image.open(out / "dog.a_brown_dog.png")
    assert overlay.size[0] == 512 and overlay.size[1] > 384
    assert np.load(out / "dog.a_brown_dog.map.npy").shape == (384, 512)
    assert json.loads((out / "dog.a_man.boxes.json").read_text())["boxes"] == []


def test_ground_cli_selective_search(tmp_path):
    res = runner.invoke(app, ["ground", "default", str(SAMPLES / "eagle.jpg"), "an eagle", "--top", "2", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "eagle.an_eagle.boxes.json").read_text())
    assert rec["proposals"] > 100 and len(rec["boxes"]) == 2


def test_ground_cli_errors(tmp_path, tiny_path):
    img = str(SAMPLES / "dog.jpg")
    (tmp_path / "bad.json").write_text("[[1, 2, 3]]")
    (tmp_path / "ok.json").write_text("[[1, 2, 30, 40]]")
    (tmp_path / "vocab.json").write_text(json.dumps({"dog": [2000]}))
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image")
    cases = [
        (["ground", "default", img, "a dog", "--gamma", "2"], "--gamma must be in [0, 1]"),
        (["ground", "default", img, "a dog", "--gamma", "high"], "--gamma must be a number"),
        (["ground", "default", img, "a dog", "--proposals", str(tmp_path / "bad.json")], "lists of 4 numbers"),
        (["ground", "default", img, "a dog", "--proposals", "edge-boxes"], "neither a boxes file"),
        (["ground", "default", img, "a dog", "--vocab", str(tmp_path / "nope.json")], "no such vocabulary file"),
        (["ground", "default", img, "a dog", "--vocab", str(tmp_path / "vocab.json")], "the model has 1000 outputs"),
        (["ground", "default", str(tmp_path / "corrupt.jpg"), "a dog"], "cannot read image"),
        (["ground", "default", img, "a dog", "--top", "0"], "--top must be at least 1"),
        (["ground", "default", img, "a dog", "--weights", "softmax"], "class weights must be"),
        (["ground", "default", img, "a dog", "-m", "scorecam", "--proposals", str(tmp_path / "ok.json")], "unknown method"),
        (["ground", "default", img, "a dog", "-l", "nosuch", "--proposals", str(tmp_path / "ok.json")], "unknown layer"),
        (["ground", str(tiny_path), img, "a dog", "-l", "r1"], "has no class names"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "error:" in res.output and message in res.output, (args, res.output)
    before = tiny_path.read_bytes()
    res = runner.invoke(app, ["ground", str(tiny_path), img, "alpha", "-l", "r1", "--vocab", str(tmp_path / "vocab.json")])
    assert res.exit_code == 2 and "model has 5 outputs" in res.output
    assert tiny_path.read_bytes() == before and onnx.load(str(tiny_path)) is not None


def test_eval_grounding_beats_proposal_base(tmp_path):
    out = tmp_path / "eval"
    res = runner.invoke(app, ["eval", "grounding", "--data", str(TINY), "--images", str(SAMPLES), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "proposal base" in res.output and "R@10" in res.output
    results = json.loads((out / "results.json").read_text())
    assert results["counts"]["queries"] == 25 and results["counts"]["images"] == 3
    assert results["counts"]["not_scored"] == {"scene": 8, "notvisual": 1, "nobox": 1}
    assert results["settings"]["gamma"] == 0.5 and "no held-out split" in results["settings"]["gamma_choice"]
    ours, base = results["summary"]["cmwp (gamma 0.5)"]["all"], results["summary"]["proposal base"]["all"]
    assert ours["recall@10"] > base["recall@10"]
    assert ours["mAP"] > base["mAP"]
    for ranking in (ours, base):                                # recall@k grows with k up to the upper bound
        assert 0 <= ranking["recall@1"] <= ranking["recall@5"] <= ranking["recall@10"] <= ranking["upper_bound"] <= 1
    assert set(results["summary"]["proposal base"]["types"]) == {"animals", "bodyparts", "other", "vehicles"}
    assert results["summary"]["proposal base"]["small"]["n"] == results["counts"]["small"] > 0
    assert (out / "results.md").exists() and (out / "queries.csv").exists()
    cached = sorted(p.name for p in (out / "proposals" / "selective-search").iterdir())
    assert cached == ["dog.json", "eagle.json", "horses.json"]
    # a re-run reuses the cached proposals and, with the same gamma, gives the same numbers
    res = runner.invoke(app, ["eval", "grounding", "--data", str(TINY), "--images", str(SAMPLES), "-o", str(out),
                              "--gamma", "0.5", "--method", "mwp"])
    assert res.exit_code == 0, res.output
    again = json.loads((out / "results.json").read_text())
    assert again["summary"]["proposal base"] == results["summary"]["proposal base"]


def test_eval_grounding_chooses_gamma_on_held_out(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("Sentences", "Annotations"):
        (data / sub).mkdir()
        for f in (TINY / sub).iterdir():
            (data / sub / f.name).write_bytes(f.read_bytes())
    (data / "val.txt").write_text("dog\n")
    (data / "test.txt").write_text("horses\neagle\n")
    boxes = tmp_path / "boxes.json"   # a user boxes file keyed by image id, with the ground truth hidden among others
    rng = np.random.default_rng(0)
    keyed = {}
    for image_id, (w, h) in {"dog": (512, 384), "horses": (512, 339), "eagle": (512, 339)}.items():
        xy = rng.uniform(0, [w - 40, h - 40], size=(40, 2))
        wh = rng.uniform(20, 200, size=(40, 2))
        random_boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1)
        gts = [b for q in read_flickr30k_entities(TINY, "test", SAMPLES)[0][["dog", "horses", "eagle"].index(image_id)].queries
               for b in q.boxes.tolist()]
        keyed[image_id] = np.concatenate([random_boxes, gts]).tolist()
    boxes.write_text(json.dumps(keyed))
    out = tmp_path / "eval"
    res = runner.invoke(app, ["eval", "grounding", "--data", str(data), "--images", str(SAMPLES), "--proposals", str(boxes),
                              "-o", str(out)])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert "held-out split 'val'" in results["settings"]["gamma_choice"]
    assert results["settings"]["gamma"] in scoring.GAMMAS
    assert results["counts"]["images"] == 2 and results["counts"]["queries"] == 15


def test_eval_grounding_errors(tmp_path):
    res = runner.invoke(app, ["eval", "grounding", "--data", str(tmp_path), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a Flickr30k Entities folder" in res.output
    res = runner.invoke(app, ["eval", "grounding", "--data", str(TINY), "--images", str(SAMPLES), "--gamma", "x"])
    assert res.exit_code == 2 and "--gamma must be" in res.output
    res = runner.invoke(app, ["eval", "grounding", "--data", str(TINY), "--images", str(SAMPLES), "--gt", "best"])
    assert res.exit_code == 2 and "--gt must be" in res.output
    res = runner.invoke(app, ["eval", "grounding", "--data", str(TINY), "--split", "val"])
    assert res.exit_code == 2 and "no split file val.txt" in res.output
    res = runner.invoke(app, ["eval", "grounding", "--data", str(TINY)])   # photos not beside the annotations
    assert res.exit_code == 2 and "photo not found" in res.output


def test_any_model_with_a_vocabulary_file(tmp_path, tiny_path):
    """A 5-class model with no class names: the vocabulary comes from a file; a word over
    two classes gets the signal (1/2, 1/2) (uniform weights), so by MWP's linearity in the
    signal its map is the mean of the two one-class maps."""
    from onnx_excite.graph.canonicalize import first_input_name
    from onnx_excite.render.maps import to_image_space
    from onnx_excite.run.runtime import Exciter

    vocab = tmp_path / "vocab.tsv"
    vocab.write_text("alpha\t0\nbeta\t1,2\n")
    photo = Image.open(SAMPLES / "dog.jpg").convert("RGB")
    g = Grounder(str(tiny_path), vocab=vocab, method="mwp", layer="r1", weights="uniform")
    maps = g.word_maps(photo, g.parse("the beta").words)
    arr, prepared = g.prepare(photo)
    ex = Exciter(g.model, ["r1"], methods=("mwp",), input_shapes={first_input_name(g.model): [None, *arr.shape]})
    one_class = ex.explain(np.stack([arr, arr]), np.eye(5, dtype=np.float32)[[1, 2]]).maps["mwp"]["r1"]
    expected = np.maximum(to_image_space((one_class[0] + one_class[1]) / 2, prepared), 0).astype(np.float64)
    np.testing.assert_allclose(maps["beta"], expected / expected.sum(), rtol=1e-4, atol=1e-9)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([[0, 0, 256, 192], [256, 192, 512, 384], [0, 0, 512, 384]]))
    res = runner.invoke(app, ["ground", str(tiny_path), str(SAMPLES / "dog.jpg"), "an alpha and a beta", "-l", "r1",
                              "--vocab", str(vocab), "--proposals", str(boxes), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "out" / "dog.an_alpha_and_a_beta.boxes.json").read_text())
    assert rec["words"] == ["alpha", "beta"] and len(rec["boxes"]) == 3
