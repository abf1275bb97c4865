"""Grounding building blocks: vocabulary, phrase parsing, scoring, NMS, metrics, the
Flickr30k Entities reader and the proposal sources, on constructed cases with exact answers."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnx_excite.errors import ExciteError
from onnx_excite.apps.grounding import metrics, scoring
from onnx_excite.apps.grounding.flickr30k import (AnnotationError, parse_sentence, read_annotation,
                                             read_flickr30k_entities)
from onnx_excite.apps.grounding.phrases import parse_phrase, singular_forms
from onnx_excite.apps.grounding.proposals import (BoxesFile, ProposalError, SelectiveSearch, proposal_source,
                                             read_boxes_file)
from onnx_excite.apps.grounding.vocabulary import (Vocabulary, VocabularyError, imagenet_vocabulary,
                                              load_vocabulary)
from onnx_excite.models.profiles import imagenet_class_names

TINY = Path(__file__).resolve().parent / "data" / "flickr30k_tiny"
SAMPLES = Path(__file__).resolve().parents[1] / "onnx_excite" / "data" / "samples"


# ---------------------------------------------------------------- vocabulary
@pytest.fixture(scope="module")
def vocab():
    return imagenet_vocabulary()


def test_imagenet_vocabulary_hypernyms(vocab):
    names = imagenet_class_names()
    assert vocab["dog"] == tuple(range(151, 269))            # all 118 breeds
    assert names[151].startswith("Chihuahua") and names[268] == "Mexican hairless"
    assert 934 not in vocab["dog"] and 269 not in vocab["dog"]  # not "hot dog", not the timber wolf
    assert vocab["cat"] == (281, 282, 283, 284, 285)
    assert [names[i].split(",")[0] for i in vocab["cat"]] == ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"]
    cars = [names[i].split(",")[0] for i in vocab["car"]]
    assert "sports car" in cars and "convertible" in cars and "cab" in cars
    assert not {"passenger car", "freight car"} & set(cars)   # railway cars are not cars
    assert vocab["puppy"] == vocab["dog"] and vocab["horse"] == (339,)


def test_imagenet_vocabulary_names_and_head_nouns(vocab):
    assert vocab["golden retriever"] == (207,)
    assert vocab["retriever"] == (205, 206, 207, 208, 209)    # head noun of every "... retriever"
    assert vocab["eagle"] == (22,) and vocab["bald eagle"] == (22,)
    assert vocab["shark"] == (2, 3, 4)
    assert vocab["tabby"] == (281,)
    assert "man" not in vocab and "white" not in vocab and "brown" not in vocab


def test_vocabulary_from_class_names_rules():
    v = Vocabulary.from_class_names(["red fox, Vulpes vulpes", "fox terrier", "kit fox"], groups={"canine": [0, 1]})
    assert v["fox"] == (0, 2) and v["terrier"] == (1,) and v["red fox"] == (0,) and v["vulpes"] == (0,)
    assert v["canine"] == (0, 1) and v.max_words == 2 and v.num_classes == 3


def test_vocabulary_files(tmp_path):
    (tmp_path / "v.json").write_text(json.dumps({"Dog": [1, 2], "hot dog": 3}))
    v = load_vocabulary(tmp_path / "v.json", num_classes=4)
    assert v["dog"] == (1, 2) and v["hot dog"] == (3,)
    (tmp_path / "names.json").write_text(json.dumps(["tabby cat", "golden retriever"]))
    v = load_vocabulary(tmp_path / "names.json")
    assert v["cat"] == (0,) and v["retriever"] == (1,) and v["golden retriever"] == (1,)
    (tmp_path / "v.tsv").write_text("# word\tindices\ndog\t1,2\ncat\t0\t3\n\ndog\t4\n")
    v = load_vocabulary(tmp_path / "v.tsv")
    assert v["dog"] == (1, 2, 4) and v["cat"] == (0, 3)
    bad = {"bad.json": "{not json", "str.json": json.dumps({"dog": ["one"]}), "x.tsv": "dog\tx\n",
           "one.tsv": "dog\n", "empty.tsv": "# nothing\n", "neg.json": json.dumps({"dog": [-1]})}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(VocabularyError):
            load_vocabulary(tmp_path / name)
    with pytest.raises(VocabularyError, match="out of range"):
        load_vocabulary(tmp_path / "v.json", num_classes=3)
    with pytest.raises(VocabularyError, match="no such"):
        load_vocabulary(tmp_path / "missing.json")


# ---------------------------------------------------------------- phrases
def test_parse_phrase(vocab):
    p = parse_phrase("A golden retriever and two dogs", vocab)
    assert p.keys == ["golden retriever", "dog"] and p.stop == ["a", "and", "two"] and p.oov == []
    p = parse_phrase("the brown horse", vocab)
    assert p.keys == ["horse"] and p.oov == ["brown"] and p.stop == ["the"]
    p = parse_phrase("Two puppies chase the bald eagles", vocab)
    assert p.keys == ["puppy", "bald eagle"]
    p = parse_phrase("a man's T-shirt", vocab)                # the longest key wins: "t shirt", not "shirt"
    assert p.keys == ["t shirt"] and p.oov == ["man's"] and vocab["shirt"] == (610,)
    p = parse_phrase("a woman's smile", vocab)
    assert p.keys == [] and p.oov == ["woman's", "smile"]
    assert parse_phrase("", vocab).keys == []
    assert singular_forms("buses")[:1] == ["bus"] or "bus" in singular_forms("buses")
    assert "man" in singular_forms("men") and "puppy" in singular_forms("puppies")


# ---------------------------------------------------------------- scoring
def test_box_sums_match_brute_force():
    rng = np.random.default_rng(0)
    m = rng.random((37, 53))
    boxes = np.array([[0, 0, 53, 37], [3, 4, 10, 20], [52, 36, 53, 37], [10.4, 5.6, 20.2, 9.5]])
    sums = scoring.box_sums(m, boxes)
    expected = [m.sum(), m[4:20, 3:10].sum(), m[36, 52], m[6:10, 10:20].sum()]  # the last snaps to (10, 6, 20, 10)
    np.testing.assert_allclose(sums, expected, rtol=1e-12)


def test_proposal_score_formula():
    m = np.zeros((10, 10))
    m[2:4, 2:4] = 1.0                                    # 4 units of mass in a 2x2 square
    boxes = [[2, 2, 4, 4], [0, 0, 10, 10], [2, 2, 6, 4]]  # areas 4, 100, 8; sums 4, 4, 4
    for gamma in scoring.GAMMAS:
        np.testing.assert_allclose(scoring.proposal_scores(m, boxes, gamma), [4 / 4 ** gamma, 4 / 100 ** gamma, 4 / 8 ** gamma])
    # gamma = 0 ranks by mass alone (a tie: the first box stays first), gamma = 1 by density
    assert scoring.rank_boxes(m, boxes, gamma=1.0)[0][0].tolist() == [2, 2, 4, 4]
    with pytest.raises(ValueError):
        scoring.proposal_scores(m, boxes, 1.5)


def test_iou_and_nms():
    a = [[0, 0, 10, 10]]
    b = [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]]
    np.testing.assert_allclose(scoring.iou_matrix(a, b)[0], [1.0, 50 / 150, 0.0, 0.0])
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [0, 0, 10, 20], [30, 30, 40, 40]], float)
    scores = np.array([0.5, 0.9, 0.8, 0.1])
    # box 1 (best) suppresses box 0 (IoU 10/11 > 0.7); box 2 overlaps box 1 by 11/20 <= 0.7 and stays
    assert scoring.nms(boxes, scores, 0.7).tolist() == [1, 2, 3]
    assert scoring.nms(boxes, scores, 0.5).tolist() == [1, 3]
    ranked, s = scoring.rank_boxes(None, boxes)              # the proposal order, NMS applied
    assert ranked.tolist() == boxes[[0, 2, 3]].tolist() and s.tolist() == [0, -2, -3]


# ---------------------------------------------------------------- metrics
def test_hits_union_versus_any():
    gt = [[0, 0, 10, 10], [90, 0, 100, 10]]                  # two far-apart boxes: union (0, 0, 100, 10)
    ranked = [[0, 0, 10, 10], [0, 0, 100, 10], [0, 0, 60, 10]]
    assert metrics.hit_list(ranked, gt, "any").tolist() == [True, False, False]  # IoU 1, 0.1, 0.1
    assert metrics.hit_list(ranked, gt, "union").tolist() == [False, True, True]  # IoU 0.1, 1, 0.6
    assert metrics.hit_list([], gt).tolist() == []
    with pytest.raises(ValueError):
        metrics.hit_list(ranked, gt, "best")


def test_average_precision_and_recall():
    assert metrics.average_precision([False, True, False, True]) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert metrics.average_precision([True, True]) == 1.0
    assert metrics.average_precision([False, False]) == 0.0
    items = [metrics.Scored(["people"], False, np.array([True, False])),
             metrics.Scored(["people", "clothing"], True, np.array([False, False, True])),
             metrics.Scored(["clothing"], True, np.array([False] * 12))]
    s = metrics.summarize(items, ks=(1, 2, 3))
    assert s["n"] == 3 and s["recall@1"] == pytest.approx(1 / 3) and s["recall@2"] == pytest.approx(1 / 3)
    assert s["recall@3"] == pytest.approx(2 / 3) and s["upper_bound"] == pytest.approx(2 / 3)
    assert s["mAP"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    b = metrics.breakdown(items, ks=(1,))
    assert b["small"]["n"] == 2 and b["small"]["recall@1"] == 0.0
    assert b["types"]["people"]["recall@1"] == 0.5 and b["types"]["clothing"]["n"] == 2
    assert metrics.summarize([])["recall@1"] is None
    assert metrics.is_small([[0, 0, 10, 10]], 100, 100) and not metrics.is_small([[0, 0, 40, 40]], 100, 100)


# ---------------------------------------------------------------- Flickr30k Entities
def test_parse_sentence_markup():
    s = parse_sentence("[/EN#255543/people A woman] holds [/EN#255545/bodyparts/people a man 's arm] at "
                       "[/EN#255549/scene a formal event] .")
    assert s.text == "A woman holds a man 's arm at a formal event ."
    assert [(p.text, p.entity, p.types, p.first_word) for p in s.phrases] == [
        ("A woman", "255543", ["people"], 0), ("a man 's arm", "255545", ["bodyparts", "people"], 3),
        ("a formal event", "255549", ["scene"], 8)]
    assert parse_sentence("[/EN#0/notvisual them]").phrases[0].entity == "0"
    for bad in ["[/EN#12/people a man", "a man] runs", "[EN#12/people a man]", "[/EN#1/people a [/EN#2/other b]]",
                "[/EN#x/people a man]"]:
        with pytest.raises(AnnotationError):
            parse_sentence(bad)


def test_read_annotation(tmp_path):
    f = tmp_path / "a.xml"
    f.write_text("<annotation><size><width>100</width><height>50</height><depth>3</depth></size>"
                 "<object><name>7</name><name>9</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>"
                 "<object><name>9</name><bndbox><xmin>51</xmin><ymin>11</ymin><xmax>60</xmax><ymax>50</ymax></bndbox></object>"
                 "<object><name>8</name><nobndbox>1</nobndbox><scene>0</scene></object>"
                 "<object><name>6</name><nobndbox>0</nobndbox><scene>1</scene></object></annotation>")
    a = read_annotation(f)
    assert (a.width, a.height) == (100, 50)
    assert a.boxes["7"].tolist() == [[0, 1, 10, 20]]                       # 1-based inclusive -> 0-based half-open
    assert a.boxes["9"].tolist() == [[0, 1, 10, 20], [50, 10, 60, 50]]     # a box shared by two entities
    assert a.nobox == {"8"} and a.scene == {"6"}
    for text in ["<annotation>", "<annotation><object><name>1</name></object></annotation>",
                 "<annotation><size><width>1</width><height>1</height></size><object><name>1</name><bndbox>"
                 "<xmin>5</xmin><ymin>1</ymin><xmax>2</xmax><ymax>1</ymax></bndbox></object></annotation>"]:
        f.write_text(text)
        with pytest.raises(AnnotationError):
            read_annotation(f)


def test_read_tiny_dataset():
    images, problems = read_flickr30k_entities(TINY, "test", SAMPLES)
    assert problems == [] and [i.image_id for i in images] == ["dog", "horses", "eagle"]
    assert [len(i.queries) for i in images] == [10, 9, 6]
    skipped = {}
    for img in images:
        for k, v in img.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped == {"scene": 8, "notvisual": 1, "nobox": 1}
    herd = [q for q in images[1].queries if q.text == "Five horses"][0]
    assert len(herd.boxes) == 5 and herd.union.tolist() == [0, 123, 394, 271]
    feet = [q for q in images[2].queries if q.text == "yellow feet"][0]
    assert feet.types == ["bodyparts", "animals"]


def test_dataset_problems_are_reported(tmp_path):
    with pytest.raises(AnnotationError, match="not a Flickr30k Entities folder"):
        read_flickr30k_entities(tmp_path)
    (tmp_path / "Sentences").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Sentences" / "x.txt").write_text("[/EN#1/people a man\n")
    (tmp_path / "Annotations" / "x.xml").write_text("<annotation><size><width>4</width><height>4</height></size></annotation>")
    (tmp_path / "Annotations" / "y.xml").write_text("<annotation><size><width>4</width><height>4</height></size></annotation>")
    images, problems = read_flickr30k_entities(tmp_path, "all", SAMPLES)
    assert images == [] and len(problems) == 2
    assert "not closed" in problems[0] and "y.txt" in problems[1]
    with pytest.raises(AnnotationError, match="split file"):
        read_flickr30k_entities(tmp_path, "test")


# ---------------------------------------------------------------- proposals
def test_boxes_files(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps([[0, 0, 5, 5], [1, 1, 3, 4]]))
    assert read_boxes_file(tmp_path / "one.json").tolist() == [[0, 0, 5, 5], [1, 1, 3, 4]]
    (tmp_path / "obj.json").write_text(json.dumps({"boxes": [[0, 0, 5, 5]]}))
    assert read_boxes_file(tmp_path / "obj.json").shape == (1, 4)
    (tmp_path / "keyed.json").write_text(json.dumps({"a": [[0, 0, 5, 5]], "b": []}))
    src = BoxesFile(tmp_path / "keyed.json")
    assert src.boxes(None, "a").tolist() == [[0, 0, 5, 5]] and src.boxes(None, "b").shape == (0, 4)
    with pytest.raises(ProposalError, match="no boxes for image"):
        src.boxes(None, "c")
    (tmp_path / "b.csv").write_text("image,x1,y1,x2,y2\na,0,0,2,2\na,1,1,3,3\nb,0,0,1,1\n")
    both = read_boxes_file(tmp_path / "b.csv")
    assert both["a"].tolist() == [[0, 0, 2, 2], [1, 1, 3, 3]] and both["b"].shape == (1, 4)
    folder = tmp_path / "per_image"
    folder.mkdir()
    (folder / "dog.csv").write_text("x1,y1,x2,y2\n0,0,2,2\n")
    assert proposal_source(folder).boxes(None, "dog").tolist() == [[0, 0, 2, 2]]
    for name, text in {"bad.json": "[[0, 0, 5]]", "inv.json": "[[5, 0, 1, 5]]", "nan.json": "[[0, 0, NaN, 5]]",
                       "cols.csv": "a,b\n1,2\n", "txt.txt": "0 0 1 1"}.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ProposalError):
            read_boxes_file(tmp_path / name)
    with pytest.raises(ProposalError, match="neither a boxes file"):
        proposal_source("no-such-generator")


def test_selective_search_finds_objects():
    img = np.full((120, 160, 3), (90, 140, 90), np.uint8)
    rng = np.random.default_rng(0)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    img[20:60, 15:55] = (200, 30, 30)                # a red square
    img[70:110, 90:150] = (30, 30, 200)              # a blue rectangle
    pil = Image.fromarray(img)
    ss = SelectiveSearch(scales=(50, 100), max_boxes=200)
    boxes = ss.boxes(pil)
    assert 0 < len(boxes) <= 200
    ious = scoring.iou_matrix([[15, 20, 55, 60], [90, 70, 150, 110]], boxes)
    assert ious.max(axis=1).min() > 0.9
    np.testing.assert_array_equal(boxes, ss.boxes(pil))              # deterministic (fixed seed)
    big = SelectiveSearch(scales=(50,), max_side=80).boxes(pil.resize((320, 240)))  # downscaled, boxes scaled back
    assert big[:, 2].max() <= 320 and big[:, 3].max() <= 240 and big[:, 2].max() > 200


def test_selective_search_without_scikit_image(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ProposalError, match=r"onnx-excite\[ground\]"):
        SelectiveSearch().boxes(Image.new("RGB", (20, 20)))
    with pytest.raises(ExciteError):
        proposal_source("selective-search").boxes(Image.new("RGB", (20, 20)), "x")


def test_detection_dataset_to_entities(tmp_path):
    from onnx_excite.apps.grounding.convert import detection_to_entities

    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    objs = {"a": [("dog", (89, 149, 206, 358)), ("dog", (300, 40, 400, 120)), ("potted plant", (10, 10, 50, 60))],
            "b": [("bicycle", (85, 73, 379, 280))], "c": [("dog", (1, 1, 100, 100))]}
    for image_id, items in objs.items():
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes((SAMPLES / "dog.jpg").read_bytes())
        body = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                       f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in items)
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>512</width><height>384</height>"
            f"<depth>3</depth></size>{body}</annotation>")
    out = tmp_path / "entities"
    res = detection_to_entities(voc, out, mapping={"dog": [151, 152], "bicycle": [444]}, val_every=2)
    assert (res["images"], res["phrases"], res["val"], res["test"]) == (3, 4, 2, 1)
    assert json.loads((out / "vocabulary.json").read_text()) == {"bicycle": [444], "dog": [151, 152]}
    assert res["unmapped"] == ["potted plant"]
    assert (out / "val.txt").read_text().split() == ["a", "c"] and (out / "test.txt").read_text().split() == ["b"]
    images, problems = read_flickr30k_entities(out, "all")
    assert problems == []
    a = images[0]
    assert a.image_path == out / "Images" / "a.jpg" and a.image_path.resolve() == (voc / "JPEGImages" / "a.jpg").resolve()
    dog = [q for q in a.queries if q.text == "the dog"][0]
    assert dog.types == ["dog"] and dog.boxes.tolist() == [[89, 149, 206, 358], [300, 40, 400, 120]]  # boxes kept
    assert [q.text for q in a.queries] == ["the dog", "the potted plant"] and a.queries[1].types == ["potted_plant"]
    with pytest.raises(ExciteError, match="val-every"):
        detection_to_entities(voc, out, val_every=1)
