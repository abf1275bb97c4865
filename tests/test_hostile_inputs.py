"""Hostile or careless datasets, annotations, images and checkpoints: names in data files
stay inside their folder, nothing outside ``-o`` is written or removed, cache entries
belong to one image, malformed fields end in one error line (no traceback, hang or huge
allocation), huge images are refused before decoding, and the checkpoint reader bounds
what it builds by the file's size."""
import io
import json
import math
import os
import pickle
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import gap_classifier
from test_bad_input import _one_error, _run, _snapshot
from test_mobilenet_v2 import _P, write_zip_checkpoint
from onnx_excite import ExciteError
from onnx_excite.apps.eval import read_coco, read_voc, run_evaluation
from onnx_excite.apps.eval.cache import MapCache
from onnx_excite.apps.eval.datasets import ImageRecord
from onnx_excite.apps.grounding.convert import detection_to_entities
from onnx_excite.apps.grounding.flickr30k import read_flickr30k_entities
from onnx_excite.apps.grounding.proposals import BoxesFile, ProposalError, read_boxes_file
from onnx_excite.io.images import load_image
from onnx_excite.io.paths import inside
from onnx_excite.models import mobilenet_v2


# ---------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------
def _voc_xml(filename="a.jpg", width="20", height="10", box=(2, 2, 8, 8), name="dog"):
    xmin, ymin, xmax, ymax = box
    return (f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size><object><name>{name}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object></annotation>")


def _voc(root, ids=("a",), listed=None):
    """A VOC folder with 20x10 images ``<id>.jpg``; ImageSets/Main/test.txt lists ``listed`` (default: ids)."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (20, 10), (200, 30, 30)).save(root / "JPEGImages" / f"{i}.jpg")
        (root / "Annotations" / f"{i}.xml").write_text(_voc_xml(f"{i}.jpg"))
    if listed is not False:
        (root / "ImageSets/Main/test.txt").write_text("\n".join(listed if listed is not None else ids) + "\n")
    return root


def _victim(tmp_path):
    """Files outside every dataset and output folder: a readable VOC record ``evil``."""
    victim = tmp_path / "victim"
    victim.mkdir()
    Image.new("RGB", (20, 10)).save(victim / "evil.jpg")
    (victim / "evil.xml").write_text(_voc_xml("evil.jpg"))
    return victim


def _coco(folder, images=None, annotations=None, categories=None):
    """A COCO file ``instances_x.json`` in ``folder`` with its 20x10 images."""
    folder.mkdir(parents=True, exist_ok=True)
    images = images if images is not None else [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10}]
    for im in images:
        if isinstance(im.get("file_name"), str) and not os.path.isabs(im["file_name"]) and ".." not in im["file_name"]:
            (folder / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 10)).save(folder / im["file_name"])
    data = {"images": images,
            "annotations": annotations if annotations is not None else
            [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 6]}],
            "categories": categories if categories is not None else [{"id": 1, "name": "dog"}]}
    path = folder / "instances_x.json"
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------
# paths: names in data files stay inside their folder, outputs inside -o
# ---------------------------------------------------------------------------
def test_inside_refuses_absolute_parent_nul_and_symlinked_folders(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "out").symlink_to(tmp_path / "elsewhere")
    assert inside(root, "sub/x.jpg", "name") == root / "sub" / "x.jpg"
    for bad, why in [("/etc/passwd", "absolute"), ("../x", ".."), ("sub/../../x", ".."), ("a\x00b", "NUL"),
                     ("out/x.jpg", "outside"), ("", "empty")]:
        with pytest.raises(ExciteError, match=why) as info:
            inside(root, bad, "the field")
        assert "the field" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("how", ["absolute", "parent"])
def test_voc_ids_that_leave_the_folder_write_and_delete_nothing(tmp_path, how):
    victim = _victim(tmp_path)
    bad = str(victim / "evil") if how == "absolute" else "../../victim/evil"
    root = _voc(tmp_path / "voc", listed=["a", bad])
    before = _snapshot(victim, root)
    line = _one_error(_run("eval", "entities-from-detection", "--data", root, "-o", tmp_path / "out"), "test.txt")
    assert repr(bad) in line
    assert _snapshot(victim, root) == before and sorted(p.name for p in victim.iterdir()) == ["evil.jpg", "evil.xml"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["absolute", "parent"])
def test_voc_filename_outside_the_image_folder(tmp_path, how):
    victim = _victim(tmp_path)
    root = _voc(tmp_path / "voc")
    bad = str(victim / "evil.jpg") if how == "absolute" else "../../victim/evil.jpg"
    (root / "Annotations" / "a.xml").write_text(_voc_xml(bad))
    line = _one_error(_run("eval", "entities-from-detection", "--data", root, "-o", tmp_path / "out"), "a.xml")
    assert "<filename>" in line and repr(bad) in line
    assert not (tmp_path / "out").exists()


def test_coco_file_name_outside_the_image_folder(tmp_path):
    _victim(tmp_path)
    path = _coco(tmp_path / "coco", images=[{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10},
                                            {"id": 2, "file_name": "../victim/evil.jpg", "width": 20, "height": 10}])
    line = _one_error(_run("eval", "entities-from-detection", "--data", path, "--format", "coco",
                           "-o", tmp_path / "out"), "instances_x.json")
    assert "images[1]" in line and "file_name" in line
    assert not (tmp_path / "out").exists()


def test_flickr30k_and_boxes_names_outside_their_folder(tmp_path):
    _victim(tmp_path)
    root = tmp_path / "f30k"
    for sub in ("Sentences", "Annotations", "Images"):
        (root / sub).mkdir(parents=True)
    (root / "test.txt").write_text("../../victim/evil\n")
    with pytest.raises(ExciteError, match=r"test.txt.*'\.\./\.\./victim/evil'"):
        read_flickr30k_entities(root, "test")
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    (tmp_path / "evil.json").write_text("[[1, 2, 3, 4]]")
    with pytest.raises(ExciteError, match="'../evil.json'"):
        BoxesFile(boxes).boxes(None, "../evil")


def test_outputs_stay_inside_out_and_foreign_files_are_kept(tmp_path):
    victim = _victim(tmp_path)
    root = _voc(tmp_path / "voc")
    out = tmp_path / "out"
    res = _run("eval", "entities-from-detection", "--data", root, "-o", out)
    assert res.exit_code == 0, res.output
    assert (out / "Images" / "a.jpg").resolve() == (root / "JPEGImages" / "a.jpg").resolve()
    again = _run("eval", "entities-from-detection", "--data", root, "-o", out)   # its own links are replaced
    assert again.exit_code == 0, again.output
    # a photo of the user's where a link would go is never removed
    (out / "Images" / "a.jpg").unlink()
    (out / "Images" / "a.jpg").write_bytes(b"mine")
    _one_error(_run("eval", "entities-from-detection", "--data", root, "-o", out), "a.jpg")
    assert (out / "Images" / "a.jpg").read_bytes() == b"mine"
    # a link planted in -o does not lead the writes outside it
    before = _snapshot(victim)
    other = tmp_path / "other"
    other.mkdir()
    (other / "Sentences").symlink_to(victim)
    _one_error(_run("eval", "entities-from-detection", "--data", root, "-o", other), "outside")
    assert _snapshot(victim) == before and sorted(p.name for p in victim.iterdir()) == ["evil.jpg", "evil.xml"]


def test_images_sharing_an_id_are_refused_by_the_conversion(tmp_path):
    path = _coco(tmp_path / "coco", images=[{"id": 1, "file_name": "train/x.jpg", "width": 20, "height": 10},
                                            {"id": 2, "file_name": "val/x.jpg", "width": 20, "height": 10}],
                 annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 6]},
                              {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 3, 3]}])
    with pytest.raises(ExciteError, match="train/x.jpg and val/x.jpg share the id 'x'"):
        detection_to_entities(path, tmp_path / "out", fmt="coco")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# the map cache: one entry per image
# ---------------------------------------------------------------------------
def test_cache_keys_do_not_collide(tmp_path):
    cache = MapCache(tmp_path, "pointing", "meta")
    a, b = ImageRecord("x y", tmp_path / "1.jpg", 1, 1), ImageRecord("x_y", tmp_path / "2.jpg", 1, 1)
    assert cache.path(a) != cache.path(b) and cache.path(a).parent == tmp_path / "pointing"
    assert cache.path(a).name.startswith("x_y-")
    path = _coco(tmp_path / "coco", images=[{"id": 1, "file_name": "train/x.jpg", "width": 20, "height": 10},
                                            {"id": 2, "file_name": "val/x.jpg", "width": 20, "height": 10}],
                 annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 6]},
                              {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 3, 3]}])
    recs, _ = read_coco(path)
    assert [r.id for r in recs] == ["x", "x"] and cache.path(recs[0]) != cache.path(recs[1])
    assert len(cache.path(ImageRecord("y" * 400, tmp_path, 1, 1)).name) < 120


@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_a_fresh_cache_computes_every_image(tmp_path, fmt):
    model = tmp_path / "gap.onnx"
    onnx.save(gap_classifier(2, 4, 2, 0), str(model))
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"dog": [0]}))
    if fmt == "voc":
        data = _voc(tmp_path / "voc", ids=("x y", "x_y"), listed=False)
    else:
        data = _coco(tmp_path / "coco", images=[{"id": 1, "file_name": "train/x.jpg", "width": 20, "height": 10},
                                                {"id": 2, "file_name": "val/x.jpg", "width": 20, "height": 10}],
                     annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 6]},
                                  {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 3, 3]}])
    res = run_evaluation("pointing", data, fmt, str(model), methods=["mwp"], layers=["r1"], mapping=mapping,
                         out_dir=tmp_path / "out")
    assert res.counts["maps_computed"] == 2 and res.counts["maps_cached"] == 0
    assert len(list((tmp_path / "out" / "cache" / "pointing").glob("*.npz"))) == 2


# ---------------------------------------------------------------------------
# annotation fields: one error line, no traceback, hang or huge allocation
# ---------------------------------------------------------------------------
def test_voc_non_finite_size(tmp_path):
    root = _voc(tmp_path / "voc")
    (root / "Annotations" / "a.xml").write_text(_voc_xml(width="1e999"))
    with pytest.raises(ExciteError, match=r"a\.xml.*<width>.*1e999"):
        read_voc(root)


_RLE = {"counts": [20, 30, 150], "size": [10, 20]}


@pytest.mark.parametrize("change, needle", [
    (lambda d: d["images"][0].update(width=math.inf), "images[0] ('a.jpg'): width"),
    (lambda d: d["images"][0].update(height=-math.inf), "images[0] ('a.jpg'): height"),
    (lambda d: d["annotations"][0].update(image_id={}), "annotations[0]: image_id"),
    (lambda d: d["annotations"][0].update(category_id=[1]), "annotations[0]: category_id"),
    (lambda d: d.update(categories=5), "categories"),
    (lambda d: d.update(annotations={"a": 1}), "annotations"),
    (lambda d: d["images"][0].update(id=[1]), "images[0] ('a.jpg'): id"),
    (lambda d: d["categories"][0].update(id=[1]), "categories[0]: id"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": "0a", "size": [10, 20]}), "counts"),  # IndexError
    (lambda d: d["annotations"][0].update(segmentation={"counts": "0\x01", "size": [10, 20]}), "counts"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": "o" * 5000, "size": [10, 20]}), "counts"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": [1, "x"], "size": [10, 20]}), "counts"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": [1, math.inf], "size": [10, 20]}), "counts"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": [1, -5, 200], "size": [10, 20]}), "counts"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": [150, 150], "size": [10, 20]}), "counts"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": 7, "size": [10, 20]}), "counts"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": [1], "size": [200000, 200000]}), "size"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": [1], "size": "big"}), "size"),
])
def test_coco_fields_of_the_wrong_type_or_range(tmp_path, change, needle):
    path = _coco(tmp_path / "coco")
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    start = time.perf_counter()
    with pytest.raises(ExciteError) as info:
        read_coco(path)
    assert time.perf_counter() - start < 5
    msg = str(info.value)
    assert msg.startswith(str(path)) and needle in msg and "\n" not in msg, msg


def test_coco_rle_still_decodes(tmp_path):
    path = _coco(tmp_path / "coco")
    data = json.loads(path.read_text())
    data["annotations"][0]["segmentation"] = _RLE
    path.write_text(json.dumps(data))
    (rec,), problems = read_coco(path)
    mask = rec.objects[0].mask.array()
    assert mask.shape == (10, 20) and mask.sum() == 30 and mask[:, 2].all() and not mask[:, 5].any()


def _flickr(root, xml):
    for sub in ("Sentences", "Annotations", "Images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "Sentences" / "1.txt").write_text("[/EN#1/people A man] runs .\n")
    (root / "Annotations" / "1.xml").write_text(xml)
    Image.new("RGB", (100, 50)).save(root / "Images" / "1.jpg")
    (root / "test.txt").write_text("1\n")
    return root


def _f30k_xml(width="100", box=(10, 10, 40, 40)):
    return (f"<annotation><size><width>{width}</width><height>50</height><depth>3</depth></size>"
            f"<object><name>1</name><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax>"
            f"<ymax>{box[3]}</ymax></bndbox></object></annotation>")


@pytest.mark.parametrize("xml, needle", [(_f30k_xml(width="1e999"), "<width>"),
                                         (_f30k_xml(box=(500, 10, 600, 40)), "outside the 100x50 image"),
                                         (_f30k_xml(box=(10, "nan", 40, 40)), "<ymin>")])
def test_flickr30k_bad_sizes_and_boxes_skip_the_image(tmp_path, xml, needle):
    images, problems = read_flickr30k_entities(_flickr(tmp_path / "f", xml), "test")
    assert images == [] and len(problems) == 1 and "1.xml" in problems[0] and needle in problems[0], problems


def test_boxes_csv_row_without_its_image(tmp_path):
    f = tmp_path / "boxes.csv"
    f.write_text("x1,y1,x2,y2,image\n1,2,3,4,a\n1,2,3,4\n")
    with pytest.raises(ProposalError, match=r"boxes.csv:3: .*image"):
        read_boxes_file(f)


_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
           + "".join(f'<!ENTITY lol{i} "{("&lol%d;" % (i - 1) if i > 1 else "&lol;") * 10}">' for i in range(1, 10))
           + "]>")


def test_xml_entities_are_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    laughs = _LAUGHS + _voc_xml(filename="&lol9;").replace("<annotation>", "<annotation>", 1)
    external = (f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]>'
                + _voc_xml(name="&x;"))
    for i, xml in enumerate([laughs, external]):
        root = _voc(tmp_path / f"voc{i}")
        (root / "Annotations" / "a.xml").write_text(xml)
        start = time.perf_counter()
        recs, problems = read_voc(root)
        assert time.perf_counter() - start < 5
        assert recs == [] and "a.xml: malformed XML" in problems[0], problems
        f30k = _flickr(tmp_path / f"f{i}", xml.replace("<filename>", "<x>").replace("</filename>", "</x>"))
        images, problems = read_flickr30k_entities(f30k, "test")
        assert images == [] and "malformed XML" in problems[0] and "s3cret" not in problems[0]


# ---------------------------------------------------------------------------
# images: capped by pixels before decoding; EXIF orientation
# ---------------------------------------------------------------------------
def _png_header_only(path, width, height):
    """A PNG whose header claims ``width`` x ``height`` (its pixel data is one empty row)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b""))
    return path


def test_huge_and_extreme_images_are_refused_before_decoding(tmp_path):
    big = _png_header_only(tmp_path / "big.png", 30000, 30000)
    with pytest.raises(ExciteError, match=f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels"):
        load_image(big)
    strip = tmp_path / "strip.png"
    Image.new("L", (1, 4_000_000)).save(strip)
    with pytest.raises(ExciteError, match=r"1x4000000.*sides"):
        load_image(strip)
    onnx.save(gap_classifier(2, 4, 2, 0), str(tmp_path / "gap.onnx"))
    for path, needle in ((big, "scale it down first"), (strip, "crop it first")):
        res = _run("explain", tmp_path / "gap.onnx", path, "-l", "r1", "-o", tmp_path / "o")
        assert res.exit_code != 0 and (res.exception is None or isinstance(res.exception, SystemExit))
        text = " ".join(res.output.split())
        assert "Traceback" not in text and f"error: {path}" in text and needle in text, text


def test_exif_orientation_maps_land_on_the_displayed_image(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[2:8, 3:12] = (250, 250, 250)           # stored: a bright patch near the top-left of a 40 x 20 picture
    exif = Image.Exif()
    exif[0x0112] = 6                           # displayed rotated 90 degrees clockwise: 20 x 40
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(img).save(src / "rot.jpg", exif=exif, quality=95)
    load_image(src / "rot.jpg").save(src / "shown.png")     # the pixels as a viewer shows them
    onnx.save(gap_classifier(2, 4, 2, 0), str(tmp_path / "gap.onnx"))
    res = _run("explain", tmp_path / "gap.onnx", src, "-l", "r1", "-m", "mwp", "--size", "40", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    records = {Path(r["image"]).name: r["outputs"][0]
               for r in map(json.loads, (tmp_path / "o" / "explanations.jsonl").read_text().splitlines())}
    rot, shown = (np.load(records[n]["map_image"]) for n in ("rot.jpg", "shown.png"))
    assert rot.shape == shown.shape == (40, 20)
    np.testing.assert_array_equal(rot, shown)
    assert Image.open(records["rot.jpg"]["overlay"]).size[0] < Image.open(records["rot.jpg"]["overlay"]).size[1]


# ---------------------------------------------------------------------------
# the checkpoint reader
# ---------------------------------------------------------------------------
def test_checkpoint_stride_zero_tensor_is_bounded_by_the_file(tmp_path):
    entries = {"w": ("FloatStorage", "s0", 12, 0, (100000, 100000), (0, 0))}    # 40 GB from one float
    start = time.perf_counter()
    with pytest.raises(ValueError, match="file"):
        mobilenet_v2.read_torch_state_dict(write_zip_checkpoint(tmp_path / "a.pth", entries=entries))
    assert time.perf_counter() - start < 5


def test_checkpoint_storage_larger_than_the_file(tmp_path):
    numel = 50_000_000 // 4
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:   # 50 MB of zeros in ~50 kB
        zf.writestr("archive/data.pkl", _P().state_dict({"w": ("FloatStorage", "s0", numel, 0, (2,), (1,))}))
        zf.writestr("archive/data/s0", bytes(numel * 4))
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ValueError, match="file"):
        mobilenet_v2.read_torch_state_dict(path)


def test_checkpoint_allowed_globals_with_bad_arguments(tmp_path):
    bad = []
    p = _P()
    p.glob("collections", "OrderedDict")
    p.tup((5,))
    bad.append(bytes(p.b) + b"R.")                                   # OrderedDict(5)
    p = _P()
    p.glob("torch._utils", "_rebuild_tensor_v2")
    p.tup((1,))
    bad.append(bytes(p.b) + b"R.")                                   # _rebuild_tensor_v2(1)
    p = _P()
    p.glob("collections", "OrderedDict")
    p.b += b")R("
    p.str("w")
    p.tensor("FloatStorage", "s0", 12, 0, (2,), (1,))
    p.b += b"}("                                                    # BUILD on the tensor: a new size
    p.str("size")
    p.tup((100000, 100000))
    bad.append(bytes(p.b) + b"ubu.")
    for k, pkl in enumerate(bad):
        path = write_zip_checkpoint(tmp_path / f"{k}.pth", pkl=pkl)
        with pytest.raises(ValueError, match="torch checkpoint"):
            mobilenet_v2.read_torch_state_dict(path)
    legacy = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, legacy, protocol=2)
    legacy.write(bad[0])
    (tmp_path / "legacy.pth").write_bytes(legacy.getvalue())
    with pytest.raises(ValueError, match="torch checkpoint"):
        mobilenet_v2.read_torch_state_dict(tmp_path / "legacy.pth")


def test_default_weights_pinned_by_their_full_digest(monkeypatch, tmp_path):
    assert len(mobilenet_v2.WEIGHTS_SHA256) == 64
    assert mobilenet_v2._sha256(mobilenet_v2.find_weights()) == mobilenet_v2.WEIGHTS_SHA256
    wrong = mobilenet_v2.WEIGHTS_SHA256[:-1] + ("0" if mobilenet_v2.WEIGHTS_SHA256[-1] != "0" else "1")
    monkeypatch.setattr(mobilenet_v2, "WEIGHTS_SHA256", wrong)
    with pytest.raises(mobilenet_v2.ModelUnavailableError, match="damaged"):
        mobilenet_v2.load_default_model(tmp_path / "cache", rebuild=True)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    from onnx import TensorProto

    (tmp_path / "secret.bin").write_bytes(np.ones(64 * 5, np.float32).tobytes())
    model = gap_classifier(2, 4, 2, 0)
    for location in ("../secret.bin", str(tmp_path / "secret.bin")):
        w = next(t for t in model.graph.initializer if t.name == "W2")
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        del w.external_data[:]
        w.external_data.add(key="location", value=location)
        (tmp_path / "m").mkdir(exist_ok=True)
        (tmp_path / "m" / "gap.onnx").write_bytes(model.SerializeToString())
        Image.new("RGB", (20, 10)).save(tmp_path / "p.png")
        res = _run("explain", tmp_path / "m" / "gap.onnx", tmp_path / "p.png", "-l", "r1", "-o", tmp_path / "o")
        text = " ".join(res.output.split())
        assert res.exit_code != 0 and "Traceback" not in text and "error:" in text, text
        assert "outside" in text or "absolute" in text, text
