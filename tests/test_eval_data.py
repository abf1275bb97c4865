"""Datasets (VOC, COCO), class mappings and run_evaluation end to end on tests/data/voc_sample
(10 photos of the project's VOC-layout sample with their VOC XML and COCO JSON annotations)."""
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import onnx_excite
from conftest import VOC_SAMPLE
from onnx_excite import ExciteError
from onnx_excite.apps.eval import read_coco, read_dataset, read_voc, resolve_mapping, run_evaluation
from onnx_excite.apps.eval import metrics as M
from onnx_excite.apps.eval.mapping import bundled_mappings

VOC = VOC_SAMPLE
COCO = VOC / "instances_coco.json"
IMAGENET = json.loads((Path(onnx_excite.__file__).parent / "data" / "imagenet_classes.json").read_text())


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def voc_subset(dst, ids, listed=None):
    """A VOC folder in ``dst`` with the sample's annotations and images of ``ids``."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for i in ids:
        shutil.copy(VOC / "Annotations" / f"{i}.xml", dst / "Annotations")
        shutil.copy(VOC / "JPEGImages" / f"{i}.jpg", dst / "JPEGImages")
    (dst / "ImageSets/Main/test.txt").write_text("\n".join(listed or ids) + "\n")
    return dst


def sample_ids(n=None):
    ids = (VOC / "ImageSets/Main/test.txt").read_text().split()
    return ids[:n] if n else ids


def tiny_gap_model(num_classes=4, seed=0):
    """conv 3->6 s2 - relu - conv 6->8 s2 - relu ('feat') - global avg pool - gemm: any input size."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(6, 3, 3, 3)).astype(np.float32) * 0.5
    w2 = rng.normal(size=(8, 6, 3, 3)).astype(np.float32) * 0.5
    w3 = rng.normal(size=(num_classes, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["feat"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["feat"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W3"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny_gap",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
                               numpy_helper.from_array(w3, "W3")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


TINY_MAPPING = {"mapping": {"chair": [0], "cabinetry": [1, 2], "diningtable": 3, "pillow": [2, 3], "sofa": 1},
                "unmapped": ["person"]}


# ---------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------
def test_voc_and_coco_agree_on_the_sample():
    voc, p_voc = read_voc(VOC)
    coco, p_coco = read_coco(COCO)
    assert len(voc) == len(coco) == 10
    assert sum(len(r.objects) for r in voc) == sum(len(r.objects) for r in coco) == 95
    pairs_voc = {(r.id, c) for r in voc for c in r.classes()}
    pairs_coco = {(r.id, c) for r in coco for c in r.classes()}
    assert pairs_voc == pairs_coco and len(pairs_voc) == 71
    assert len({c for _, c in pairs_voc}) == 27
    boxes = lambda recs: sorted((r.id, o.name, o.box) for r in recs for o in r.objects)
    assert boxes(voc) == boxes(coco)
    assert all(r.path.is_file() and (r.width, r.height) == (640, 480) for r in voc + coco)
    # the five boxes with ymax = 481 are clipped to the image, and reported, naming their files
    for problems in (p_voc, p_coco):
        assert len(problems) == 5 and all("clipped" in p for p in problems)
    assert sum("2007_000061.xml" in p for p in p_voc) == 2 and sum("2007_000272.xml" in p for p in p_voc) == 1
    assert all("instances_coco.json" in p for p in p_coco)
    r61 = next(r for r in voc if r.id == "2007_000061")
    assert (30.0, 97.0, 415.0, 480.0) in [o.box for o in r61.objects_of("chair")]
    assert max(o.box[3] for r in voc for o in r.objects) == 480
    assert not any(o.difficult for r in voc for o in r.objects)


def test_voc_problems_are_reported_and_the_rest_read(tmp_path):
    ids = sample_ids(5)
    root = voc_subset(tmp_path / "voc", ids, listed=ids + ["9999_000000"])
    (root / "Annotations" / f"{ids[1]}.xml").write_text("<annotation><object><name>chair</name>")   # malformed
    (root / "JPEGImages" / f"{ids[2]}.jpg").unlink()                                                # missing image
    tree = ET.parse(root / "Annotations" / f"{ids[3]}.xml")
    obj = tree.getroot().find("object")
    obj.find("bndbox/xmin").text, obj.find("bndbox/xmax").text = "700", "800"                      # outside the image
    tree.write(root / "Annotations" / f"{ids[3]}.xml")
    recs, problems = read_voc(root)
    assert [r.id for r in recs] == [ids[0], ids[3], ids[4]]
    text = "\n".join(problems)
    assert f"{ids[1]}.xml: malformed XML" in text
    assert f"{ids[2]}.jpg: image not found" in text
    assert "9999_000000.xml: annotation file not found" in text
    assert f"{ids[3]}.xml" in text and "outside the 640x480 image" in text
    original = len(read_voc(VOC)[0][3].objects)
    assert len(recs[1].objects) == original - 1
    with pytest.raises(ExciteError, match="no such image set"):
        read_voc(root, split="train")


def test_coco_problems_are_reported_and_the_rest_read(tmp_path):
    data = json.loads(COCO.read_text())
    keep = {im["id"] for im in data["images"][:4]}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    for im in data["images"]:
        if im["id"] != data["images"][1]["id"]:   # the second image's file is left out: missing
            shutil.copy(VOC / "JPEGImages" / im["file_name"], tmp_path)
    n_first = sum(a["image_id"] == data["images"][0]["id"] for a in data["annotations"])
    first = data["images"][0]["id"]
    data["annotations"] += [
        {"id": 9001, "image_id": first, "category_id": 1, "bbox": "oops"},
        {"id": 9002, "image_id": first, "category_id": 999, "bbox": [1, 1, 5, 5]},
        {"id": 9003, "image_id": 424242, "category_id": 1, "bbox": [1, 1, 5, 5]},
    ]
    path = tmp_path / "instances_test.json"
    path.write_text(json.dumps(data))
    recs, problems = read_coco(path)
    assert len(recs) == 3 and len(recs[0].objects) == n_first
    text = "\n".join(problems)
    assert data["images"][1]["file_name"] + ": image not found" in text
    assert "has no readable bbox" in text and "unknown category id 999" in text and "unknown image id 424242" in text
    # evaluated: the three readable images, every (image, class) pair of them
    res = run_evaluation("pointing", path, "coco", None, methods=["center"], out_dir=tmp_path / "out")
    assert res.counts["images_evaluated"] == 3 and res.problems == problems
    assert res.counts["items"] == sum(len(r.classes()) for r in recs)
    assert "problem(s) reading the data" in (tmp_path / "out" / "results.md").read_text()
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ExciteError, match="broken.json: malformed JSON"):
        read_coco(bad)


def test_coco_polygon_masks_decide_hits(tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "a.jpg")
    tri = [10, 10, 90, 10, 10, 70]   # a right triangle in the box (10, 10, 90, 70)
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
            "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 80, 60], "segmentation": [tri]},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5]}]}
    (tmp_path / "instances_x.json").write_text(json.dumps(data))
    (rec,), problems = read_dataset(tmp_path / "instances_x.json", "coco")
    assert problems == []
    thing = rec.objects_of("thing")[0]
    mask = thing.mask.array()
    assert mask.shape == (80, 100) and mask[12, 12] and not mask[65, 85]
    assert 2300 < mask.sum() < 2600                          # half of 80 x 60, plus the outline
    assert rec.objects_of("other")[0].mask is None
    # (85, 65) is inside the box but ~30 px from the hypotenuse: a miss with the mask
    assert M.point_box_distance((85, 65), thing.box) == 0
    assert not M.pointing_hit((85, 65), [thing], 15)
    assert M.pointing_hit((20, 20), [thing], 0)
    assert M.class_area([thing], 100, 80) == mask.sum()


# ---------------------------------------------------------------------------
# mappings
# ---------------------------------------------------------------------------
def test_mapping_resolution_rules():
    names = ["tench, Tinca tinca", "Studio Couch, day bed", "crane", "crane", "chair"]
    m = resolve_mapping({"mapping": {"sofa": ["studio couch", 4], "Bottle": {"indices": [0], "names": ["tench"]}},
                         "unmapped": {"chair": "not this one"}},
                        ["sofa", "bottle", "3", "studio couch", "CRANE", "chair", "person"], 5, names)
    assert m.indices == {"sofa": (1, 4), "bottle": (0,), "3": (3,), "studio couch": (1,), "CRANE": (2, 3)}
    assert m.how == {"sofa": "file", "bottle": "file", "3": "index", "studio couch": "name", "CRANE": "name"}
    assert set(m.unmapped) == {"chair", "person"} and m.unmapped["chair"] == "not this one"
    sig = m.signal(["sofa", "CRANE"], 5)
    assert sig.tolist() == [[0, 1, 0, 0, 1], [0, 0, 1, 1, 0]]
    with pytest.raises(ExciteError, match="out of range"):
        resolve_mapping({"sofa": [7]}, ["sofa"], 5, names)
    with pytest.raises(ExciteError, match="not 'goldfish'"):
        resolve_mapping({"sofa": {"indices": [0], "names": ["goldfish"]}}, ["sofa"], 5, names)
    with pytest.raises(ExciteError, match="no model class named"):
        resolve_mapping({"sofa": ["divan"]}, ["sofa"], 5, names)
    with pytest.raises(ExciteError, match="no such mapping file"):
        resolve_mapping("does_not_exist", ["sofa"], 5, names)
    # no mapping: direct matches only
    m = resolve_mapping(None, ["chair", "7", "door"], 10, None)
    assert m.indices == {"7": (7,)} and set(m.unmapped) == {"chair", "door"}


VOC20 = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
         "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
COCO80 = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
          "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
          "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
          "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
          "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
          "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
          "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
          "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
          "teddy bear", "hair drier", "toothbrush"]


@pytest.mark.parametrize("name", ["voc_sample_to_imagenet", "voc20_to_imagenet", "coco80_to_imagenet"])
def test_bundled_mappings_check_against_imagenet(name):
    assert name in bundled_mappings()
    from onnx_excite.apps.eval.mapping import read_mapping_file

    data, _ = read_mapping_file(name)
    classes = {"voc20_to_imagenet": VOC20, "coco80_to_imagenet": COCO80}.get(name)
    if classes is None:
        classes = sorted(c["name"] for c in json.loads(COCO.read_text())["categories"])   # all 30 kept
        assert len(classes) == 30
    assert set(data["mapping"]) | set(data["unmapped"]) == set(classes)        # every class decided
    assert not set(data["mapping"]) & set(data["unmapped"])
    m = resolve_mapping(name, classes, 1000, IMAGENET)       # checks every index against its listed name
    assert set(m.indices) == set(data["mapping"]) and set(m.unmapped) == set(data["unmapped"])
    for cls, entry in data["mapping"].items():
        assert [IMAGENET[i].split(",")[0] for i in entry["indices"]] == entry["names"], cls
    assert "person" in m.unmapped
    if name == "voc_sample_to_imagenet":
        assert m.indices["bookcase"] == (453,) and m.indices["pillow"] == (721,)
        assert m.indices["bottle"] == (440, 720, 737, 898, 907)
        assert m.indices["chair"] == (423, 559, 765) and m.indices["diningtable"] == (532,)
        assert set(m.indices["tvmonitor"]) == {664, 851, 782} and m.indices["sofa"] == (831,)
        assert {"door", "countertop"} <= set(m.unmapped)
    if name == "coco80_to_imagenet":
        assert "kite" in m.unmapped                 # ImageNet's kite is the bird
        assert m.indices["dog"] == tuple(range(151, 269)) and m.indices["cat"] == tuple(range(281, 286))


# ---------------------------------------------------------------------------
# the center baseline on the sample, against an independent count
# ---------------------------------------------------------------------------
def test_center_baseline_matches_independent_count(tmp_path):
    # independent: plain ElementTree over the XML files, center (320, 240), 15 px
    hits, pairs = {}, {}
    for xml in sorted((VOC / "Annotations").glob("*.xml")):
        root = ET.parse(xml).getroot()
        by_class = {}
        for obj in root.findall("object"):
            bb = [float(obj.find(f"bndbox/{t}").text) for t in ("xmin", "ymin", "xmax", "ymax")]
            by_class.setdefault(obj.find("name").text, []).append(bb)
        for cls, boxes in by_class.items():
            near = any(((max(x0 - 320, 0, 320 - x1)) ** 2 + (max(y0 - 240, 0, 240 - y1)) ** 2) <= 15 ** 2
                       for x0, y0, x1, y1 in boxes)
            hits[cls] = hits.get(cls, 0) + near
            pairs[cls] = pairs.get(cls, 0) + 1
    expected = np.mean([hits[c] / pairs[c] for c in pairs])
    # the same count written out: 18 hits in 71 (image, class) pairs over 27 classes
    assert (sum(hits.values()), sum(pairs.values()), len(pairs)) == (18, 71, 27)
    assert hits["chair"] == 4 and pairs["chair"] == 6 and hits["sofa"] == 1 and pairs["sofa"] == 2

    res = run_evaluation("pointing", VOC, "voc", model=None, methods=["center"], out_dir=tmp_path)
    s = res.summary["center"]
    assert s["mean_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert s["mean_accuracy"] == pytest.approx(0.18641975308641975, abs=1e-12)
    assert (s["hits"], s["hits"] + s["misses"]) == (18, 71)
    assert {c: v["hits"] for c, v in s["per_class"].items()} == hits
    assert res.counts["maps_computed"] == 0
    coco = run_evaluation("pointing", COCO, "coco", model=None, methods=["center"], out_dir=tmp_path / "coco")
    assert coco.summary["center"]["per_class"] == s["per_class"]


# ---------------------------------------------------------------------------
# run_evaluation end to end with a tiny random model
# ---------------------------------------------------------------------------
@pytest.fixture
def tiny_setup(tmp_path):
    # six images (dominant classes sofa, chair, cabinetry, countertop, cabinetry, chair), then two broken ones
    ids = ["2007_000042", "2007_000061", "2007_000121", "2007_000123", "2007_000129", "2007_000170",
           "2007_000027", "2007_000032"]
    root = voc_subset(tmp_path / "voc", ids)
    (root / "Annotations" / f"{ids[6]}.xml").write_text("<annotation><size>")       # malformed XML
    (root / "JPEGImages" / f"{ids[7]}.jpg").unlink()                                   # missing image
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_gap_model(), str(model))
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(TINY_MAPPING))
    return root, model, mapping, ids


def test_run_evaluation_pointing_end_to_end(tiny_setup, tmp_path):
    root, model, mapping, ids = tiny_setup
    out = tmp_path / "out"
    res = run_evaluation("pointing", root, "voc", str(model), methods=["cmwp", "mwp", "center"], layers=["feat"],
                         mapping=mapping, out_dir=out)
    # the two broken items are reported, the four others evaluated
    text = "\n".join(res.problems)
    assert f"{ids[6]}.xml: malformed XML" in text and f"{ids[7]}.jpg: image not found" in text
    assert res.counts["images_read"] == 6
    assert set(res.summary) == {"cmwp:feat", "mwp:feat", "center"}
    recs = read_voc(root)[0]
    mapped = set(TINY_MAPPING["mapping"])
    pairs = {(r.id, c) for r in recs for c in r.classes() if c in mapped}
    assert {(it["image"], it["class"]) for it in res.items} == pairs
    assert res.counts["images_evaluated"] == len({i for i, _ in pairs})
    assert res.unmapped["person"] == 1 and res.unmapped["tap"] == 3     # (image, class) pairs skipped
    assert all(0 <= it["points"]["cmwp:feat"][0] < 640 and 0 <= it["points"]["cmwp:feat"][1] < 480 for it in res.items)
    for label in res.summary:
        s = res.summary[label]
        assert s["hits"] + s["misses"] == len(pairs) and 0 <= s["mean_accuracy"] <= 1
    for name in ("results.md", "results.csv", "results.json", "pointing_per_class.png"):
        assert (out / name).is_file()
    md = (out / "results.md").read_text()
    assert "| cmwp:feat |" in md and "| chair |" in md
    assert Image.open(out / "pointing_per_class.png").size[0] > 100
    assert len(list((out / "cache" / "pointing").glob("*.npz"))) == res.counts["images_evaluated"]
    assert res.counts["maps_computed"] == res.counts["images_evaluated"]

    # another tolerance: maps from the cache, the same points
    again = run_evaluation("pointing", root, "voc", str(model), methods=["cmwp", "mwp", "center"], layers=["feat"],
                           mapping=mapping, out_dir=out, tolerance=0)
    assert again.counts["maps_computed"] == 0
    assert again.counts["maps_cached"] == res.counts["images_evaluated"]
    assert [it["points"] for it in again.items] == [it["points"] for it in res.items]
    assert again.summary["cmwp:feat"]["hits"] <= res.summary["cmwp:feat"]["hits"]


def test_run_evaluation_localization_end_to_end(tiny_setup, tmp_path):
    root, model, mapping, ids = tiny_setup
    kw = dict(methods=["cmwp", "center"], layers=["feat"], mapping=mapping, held_out=0.5)
    res = run_evaluation("localization", root, "voc", str(model), out_dir=tmp_path / "loc", **kw)
    recs = read_voc(root)[0]
    mapped = set(TINY_MAPPING["mapping"])
    doms = {r.id: M.dominant_class(r) for r in recs}
    assert {it["image"]: it["class"] for it in res.items} == {i: c for i, c in doms.items() if c in mapped}
    assert len(res.skipped) == sum(c not in mapped for c in doms.values())
    for it in res.items:
        assert len(it["correct"]["cmwp:feat"]) == len(M.ALPHAS)
    held = [it for it in res.items if it["held_out"]]
    assert 1 <= len(held) < len(res.items)
    for label, s in res.summary.items():
        assert s["n_held_out"] == len(held) and s["n_test"] == len(res.items) - len(held)
        assert s["alpha"] in M.ALPHAS
        again = M.select_alpha(np.array([it["correct"][label] for it in res.items]),
                               np.array([it["held_out"] for it in res.items]))
        assert again["alpha"] == s["alpha"] and again["error"] == s["error"]
    for name in ("results.md", "results.csv", "alpha_error.png", "localization_per_class.png"):
        assert (tmp_path / "loc" / name).is_file()


def test_run_evaluation_rejects_bad_arguments(tmp_path):
    with pytest.raises(ExciteError, match="unknown protocol"):
        run_evaluation("detection", tmp_path, "voc", None, methods=["center"], out_dir=tmp_path)
    with pytest.raises(ExciteError, match="unknown method"):
        run_evaluation("pointing", tmp_path, "voc", None, methods=["scorecam"], out_dir=tmp_path)
    with pytest.raises(ExciteError, match="not a VOC folder"):
        run_evaluation("pointing", tmp_path, "voc", None, methods=["center"], out_dir=tmp_path / "o")
    with pytest.raises(ExciteError, match="unknown dataset format"):
        run_evaluation("pointing", tmp_path, "kitti", None, methods=["center"], out_dir=tmp_path / "o")


def test_run_evaluation_default_model_few_images(tmp_path):
    """The default MobileNetV2 (features.13) with the bundled sample mapping on three images."""
    from onnx_excite.models import mobilenet_v2

    mobilenet_v2.load_default_model()    # the README's install command installs the weights
    ids = ["2007_000042", "2007_000061", "2007_000170"]
    res = run_evaluation("pointing", VOC, "voc", "default", methods=["cmwp", "center"], mapping="voc_sample_to_imagenet",
                         out_dir=tmp_path, ids=ids)
    assert res.settings["layers"] == ["features.13"] and res.settings["input"] == "shorter side 224"
    assert res.counts["images_evaluated"] == 3 and res.counts["maps_computed"] == 3
    assert "door" in res.unmapped and res.unmapped["tap"] == 1
    cache = np.load(next((tmp_path / "cache" / "pointing").glob("2007_000061-*.npz")))
    assert cache["cmwp|features.13|chair"].shape == (14, 19)          # 640x480 -> 299x224 -> 14x19 at stride 16
    assert cache["idx|chair"].tolist() == [423, 559, 765]
    assert res.summary["cmwp:features.13"]["n_classes"] == len({it["class"] for it in res.items})


def test_model_errors_stop_the_run(tiny_setup, tmp_path):
    root, model, mapping, _ = tiny_setup
    with pytest.raises(ExciteError, match="nosuchlayer"):
        run_evaluation("pointing", root, "voc", str(model), methods=["cmwp"], layers=["nosuchlayer"], mapping=mapping,
                       out_dir=tmp_path / "o")
    with pytest.raises(ExciteError, match="out of range"):   # an ImageNet mapping on a 4-class model
        run_evaluation("pointing", root, "voc", str(model), methods=["cmwp"], layers=["feat"],
                       mapping="voc_sample_to_imagenet", out_dir=tmp_path / "o")
