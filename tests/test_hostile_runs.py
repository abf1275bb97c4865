"""Hostile or careless runs, end to end through the CLI: a Ray address that does not answer,
a 1-channel model fed colour photos, output folders that cannot be created, names that try
to lead out of ``-o``, external data behind a symlink, crafted pickles, runs killed half way
and annotations that disagree with their images."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from conftest import ROOT, gap_classifier, tiny_model
from test_bad_input import _one_error, _run

PY = sys.executable


def _cli(*args, timeout=120, **kw):
    """The CLI in its own process (the real exit status, signals and wall time)."""
    return subprocess.run([PY, "-c", "from onnx_excite.cli.app import main; main()", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), **kw)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# 1. a Ray address that does not answer
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["explain", "eval"])
@pytest.mark.parametrize("address", ["unused-port", "nosuchhost.invalid:6379", "ray://nosuchhost.invalid:10001"])
def test_a_ray_address_that_does_not_answer_is_one_line_at_once(tmp_path, command, address):
    pytest.importorskip("ray")
    if address == "unused-port":
        address = f"127.0.0.1:{_unused_port()}"
    onnx.save(gap_classifier(2, 4, 2, 0), str(tmp_path / "gap.onnx"))
    Image.new("RGB", (20, 10), (200, 30, 30)).save(tmp_path / "p.png")
    if command == "explain":
        args = ["explain", tmp_path / "gap.onnx", tmp_path / "p.png", "-l", "r1"]
    else:
        args = ["eval", "pointing", "--data", tmp_path, "--model", tmp_path / "gap.onnx", "-l", "r1"]
    t0 = time.monotonic()
    res = _cli(*args, "-o", tmp_path / "o", "--ray", address, timeout=90)
    seconds = time.monotonic() - t0
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach Ray at " + address), lines
    assert seconds < 30, seconds
    assert not (tmp_path / "o").exists()            # refused before any work


def test_ray_address_endpoints():
    from onnx_excite.apps.distributed import address_endpoint

    assert address_endpoint(None) is None and address_endpoint("local") is None and address_endpoint("auto") is None
    assert address_endpoint("head:6379") == ("head", 6379)
    assert address_endpoint("ray://10.0.0.2:10001") == ("10.0.0.2", 10001)
    assert address_endpoint("ray://[::1]:10001") == ("::1", 10001)


# ---------------------------------------------------------------------------
# 2. a model with one grey input channel, fed colour photos
# ---------------------------------------------------------------------------
def _grey_model(layout="NCHW", seed=0):
    """conv 1->4 (stride 2) - relu ('r1') - GAP - gemm(3); input (N,1,H,W) or (N,H,W,1)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["xc", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W2"], ["logits"], name="fc", transB=1)]
    if layout == "NHWC":
        nodes.insert(0, helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2], name="tr"))
        shape = ["N", "H", "W", 1]
    else:
        nodes.insert(0, helper.make_node("Identity", ["x"], ["xc"], name="id"))
        shape = ["N", 1, "H", "W"]
    graph = helper.make_graph(nodes, "grey", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "W1"),
                               numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_a_grey_model_explains_colour_photos_as_their_grey_version(tmp_path, layout):
    import onnxruntime as ort

    from onnx_excite.io.images import load_image, preprocess
    from onnx_excite.io.modelinput import GREY_MEAN, GREY_STD

    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    colour = Image.fromarray((rng.random((30, 44, 3)) * 255).astype(np.uint8))
    colour.save(src / "colour.png")
    colour.convert("L").save(src / "grey.png")            # the same photo, made grey beforehand
    Image.fromarray((rng.random((30, 44, 4)) * 255).astype(np.uint8), "RGBA").save(src / "alpha.png")
    model = tmp_path / "grey.onnx"
    onnx.save(_grey_model(layout), str(model))
    res = _run("explain", model, src, "-l", "r1", "-m", "mwp", "-m", "grad", "--size", "30", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "one grey channel" in res.output and f"mean {GREY_MEAN[0]:g} and std {GREY_STD[0]:g}" in res.output
    records = {Path(r["image"]).name: r
               for r in map(json.loads, (tmp_path / "o" / "explanations.jsonl").read_text().splitlines())}
    assert sorted(records) == ["alpha.png", "colour.png", "grey.png"]
    for a, b in zip(records["colour.png"]["outputs"], records["grey.png"]["outputs"]):
        assert a["method"] == b["method"]
        for key in ("map", "map_image"):
            ma, mb = np.load(a[key]), np.load(b[key])
            assert np.isfinite(ma).all() and ma.sum() > 0
            np.testing.assert_array_equal(ma, mb)
        assert np.load(a["map_image"]).shape == (30, 44)
    # the scores explain saw are the model's own on the grey pixels (ImageNet's grey mean/std)
    grey = np.asarray(Image.open(src / "grey.png").resize((44, 30), Image.BILINEAR), np.float64) / 255
    x = ((grey - GREY_MEAN[0]) / GREY_STD[0]).astype(np.float32)[None, None]
    x = x if layout == "NCHW" else x.transpose(0, 2, 3, 1)
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0][0]
    top = records["colour.png"]["top5"][0]
    assert top["index"] == int(np.argmax(logits))
    arr, _ = preprocess(load_image(src / "colour.png"), size=30, mean=GREY_MEAN, std=GREY_STD)
    assert arr.shape == (1, 30, 44)


def test_a_model_of_four_input_channels_is_one_line(tmp_path):
    model = _grey_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4
    onnx.save(model, str(tmp_path / "m4.onnx"))
    Image.new("RGB", (20, 10)).save(tmp_path / "p.png")
    _one_error(_run("explain", tmp_path / "m4.onnx", tmp_path / "p.png", "-l", "r1", "-o", tmp_path / "o"),
               "has 4 channels")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# 3. an output folder that cannot be created: one line, before any work
# ---------------------------------------------------------------------------
def _tiny_voc(root):
    from test_hostile_inputs import _voc

    return _voc(root, ids=("a", "b"))


_O_COMMANDS = {
    "explain": lambda t: ["explain", t["model"], t["photo"], "-l", "r1"],
    "demo": lambda t: ["demo"],
    "export": lambda t: ["export", t["model"], "-l", "r1"],
    "eval pointing": lambda t: ["eval", "pointing", "--data", t["voc"], "--model", t["model"], "-l", "r1"],
    "eval localization": lambda t: ["eval", "localization", "--data", t["voc"], "--model", t["model"], "-l", "r1"],
    "eval faithfulness": lambda t: ["eval", "faithfulness", "--data", t["voc"], "--model", t["model"], "-l", "r1"],
    "eval entities-from-detection": lambda t: ["eval", "entities-from-detection", "--data", t["voc"]],
    "eval grounding": lambda t: ["eval", "grounding", "--data", t["voc"], "--model", t["model"], "-l", "r1"],
    "ground": lambda t: ["ground", t["model"], t["photo"], "red thing", "-l", "r1"],
}


def _refuse_writes_under(monkeypatch, folder: Path) -> None:
    """Make ``folder`` refuse writes as the kernel does for a non-root user in a 0o555 folder:
    ``os.access`` says no and creating anything below it raises PermissionError."""
    import pathlib
    import tempfile

    folder = folder.absolute()

    def below(p) -> bool:
        p = Path(p).absolute()
        return p == folder or folder in p.parents

    real_access, real_mkdir, real_mkstemp = os.access, pathlib.Path.mkdir, tempfile.mkstemp

    def access(p, mode, *a, **k):
        return False if below(p) and mode & os.W_OK else real_access(p, mode, *a, **k)

    def mkdir(self, *a, **k):
        if below(self.parent):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    def mkstemp(*a, dir=None, **k):
        if dir is not None and below(dir):
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
@pytest.mark.parametrize("command", sorted(_O_COMMANDS))
def test_every_output_option_is_checked_before_the_work(tmp_path, command, where, monkeypatch):
    from test_bad_input import _snapshot

    t = {"model": tmp_path / "gap.onnx", "photo": tmp_path / "p.png", "voc": _tiny_voc(tmp_path / "voc")}
    onnx.save(gap_classifier(2, 4, 2, 0), str(t["model"]))
    Image.new("RGB", (20, 10), (200, 30, 30)).save(t["photo"])
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        out, needle = tmp_path / "file" / "sub", "a part of this path is an existing file"
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        if os.geteuid() == 0:   # root writes into 0o555 folders: the kernel's refusal, simulated
            _refuse_writes_under(monkeypatch, tmp_path / "ro")
        out, needle = tmp_path / "ro" / "sub", "cannot create the folder"
    if command == "export":
        out = out / "m.onnx"
    import onnxruntime as ort

    import onnx_excite.apps.eval.datasets as datasets

    work = []      # no model session and no dataset reading before the check

    def session(*a, **k):
        work.append("InferenceSession")
        raise AssertionError("a model session was started")

    def read_dataset(*a, **k):
        work.append("read_dataset")
        raise AssertionError("the dataset was read")

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(datasets, "read_dataset", read_dataset)
    before = _snapshot(tmp_path)
    try:
        line = _one_error(_run(*_O_COMMANDS[command](t), "-o", out))
    finally:
        if where == "read-only":
            os.chmod(tmp_path / "ro", 0o755)
    assert needle in line and str(out.parent if command == "export" else out) in line, line
    assert work == [] and _snapshot(tmp_path) == before and not out.exists()


# ---------------------------------------------------------------------------
# 4. names, external data, pickles and killed runs
# ---------------------------------------------------------------------------
def _renamed(model, renames):
    """``model`` with tensors renamed (every node input/output and graph output)."""
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for out in model.graph.output:
        out.name = renames.get(out.name, out.name)
    return model


def _files_under(root):
    return {p for p in Path(root).rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize("layer", ["../../evil", "/abs/evil", "..", "a/../../b"])
def test_tensor_names_with_path_parts_keep_every_file_inside_the_output(tmp_path, layer):
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    logits = str(tmp_path / "outside" / "logits")         # an absolute output name
    model = _renamed(gap_classifier(2, 4, 2, 0), {"r1": layer, "logits": logits})
    onnx.save(model, str(work / "m.onnx"))
    Image.new("RGB", (20, 10), (200, 30, 30)).save(work / "p.png")
    before = _files_under(tmp_path)
    out = work / "o"
    res = _run("explain", work / "m.onnx", work / "p.png", "-l", layer, "-m", "mwp", "-m", "grad", "-o", out)
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "explanations.jsonl").read_text())
    assert {o["layer"] for o in rec["outputs"]} == {layer}
    for o in rec["outputs"]:
        for key in ("map", "map_image", "overlay"):
            assert Path(o[key]).resolve().parent == out.resolve(), o[key]
            assert np.load(o[key]).size if key != "overlay" else Path(o[key]).is_file()
    res = _run("export", work / "m.onnx", "-l", layer, "-m", "mwp", "-o", work / "e" / "m.excite.onnx",
               "--serving", work / "repo", "--name", "m")
    assert res.exit_code == 0, res.output
    exported = onnx.load(str(work / "e" / "m.excite.onnx"))
    maps = [o.name for o in exported.graph.output if o.name.startswith("mwp")]
    assert len(maps) == 1 and "/" not in maps[0], [o.name for o in exported.graph.output]
    new = _files_under(tmp_path) - before
    assert new and all(out in p.parents or work / "e" in p.parents or work / "repo" in p.parents for p in new), \
        sorted(map(str, new))
    assert not (tmp_path / "outside").exists() and not Path("/abs").exists()


def _external_weights_model(folder, location):
    from onnx import external_data_helper

    model = gap_classifier(2, 4, 2, 0)
    w = next(t for t in model.graph.initializer if t.name == "W2")
    external_data_helper.set_external_data(w, location=location, offset=0, length=4 * 8)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    return folder / "m.onnx"


def test_a_symlinked_external_data_file_leading_out_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(8, dtype=np.float32).tobytes())
    model = _external_weights_model(tmp_path / "m", "w.bin")
    (tmp_path / "m" / "w.bin").symlink_to(secret)          # inside by name, outside by where it leads
    Image.new("RGB", (20, 10)).save(tmp_path / "p.png")
    for args in (["explain", model, tmp_path / "p.png", "-l", "r1", "-o", tmp_path / "o"],
                 ["export", model, "-l", "r1", "-o", tmp_path / "e.onnx"], ["check", model], ["layers", model]):
        line = _one_error(_run(*args))
        assert "w.bin" in line and ("symlink" in line or "outside" in line), line
    assert not (tmp_path / "o").exists() and not (tmp_path / "e.onnx").exists()
    # the same file copied inside the folder is read: the refusal is about the link
    (tmp_path / "m" / "w.bin").unlink()
    (tmp_path / "m" / "w.bin").write_bytes(secret.read_bytes())
    assert _run("check", model).exit_code == 0


def _stack_global(module, name, arg: str) -> bytes:
    """Protocol 4: module and name pushed as strings, STACK_GLOBAL, one-tuple argument, REDUCE."""
    def s(text):
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw             # SHORT_BINUNICODE
    return b"\x80\x04" + s(module) + s(name) + b"\x93" + s(arg) + b"\x85" + b"R" + b"."


def _inst(module, name, arg: str) -> bytes:
    """Protocol 0: MARK, the argument, INST module\\nname\\n (calls the class with the marked args)."""
    return b"(" + b"V" + arg.encode("raw_unicode_escape") + b"\n" + b"i" + module.encode() + b"\n" + name.encode() + b"\n."


@pytest.mark.parametrize("craft", [_stack_global, _inst])
@pytest.mark.parametrize("form", ["zip", "legacy"])
def test_crafted_checkpoint_pickles_are_refused(tmp_path, craft, form):
    import pickle

    from test_mobilenet_v2 import write_zip_checkpoint

    from onnx_excite.models import mobilenet_v2

    # the crafted bytes do call what they name when a plain unpickler reads them
    assert pickle.loads(craft("posixpath", "basename", "/x/evil")) == "evil"
    marker = tmp_path / "pwned"
    evil = craft("os", "system", f"touch {marker}")
    path = tmp_path / "evil.pth"
    if form == "zip":
        write_zip_checkpoint(path, pkl=evil)
    else:
        path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + evil)   # the legacy magic first
    with pytest.raises(ValueError, match="refusing to unpickle global os.system"):
        mobilenet_v2.read_torch_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_explain_killed_half_way_resumes_every_record_once(tmp_path, sig):
    import hashlib
    import signal

    rng = np.random.default_rng(3)
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(12):
        Image.fromarray((rng.random((360, 480, 3)) * 255).astype(np.uint8)).save(src / f"i{i:02d}.png")
    onnx.save(gap_classifier(3, 8, 2, 0), str(tmp_path / "m.onnx"))
    args = [tmp_path / "m.onnx", src, "-l", "r1", "-m", "mwp", "-m", "cmwp", "-m", "grad", "--batch-size", "1",
            "--workers", "1"]
    ref = _run("explain", *args, "-o", tmp_path / "ref")              # one run, never interrupted
    assert ref.exit_code == 0, ref.output
    out = tmp_path / "o"
    jsonl = out / "explanations.jsonl"
    proc = subprocess.Popen([PY, "-c", "from onnx_excite.cli.app import main; main()", "explain",
                             *map(str, args), "-o", str(out)], cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if jsonl.exists() and jsonl.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be stopped half way"
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=60)
    assert proc.returncode != 0
    lines = jsonl.read_bytes().splitlines()
    done = {json.loads(ln)["image"] for ln in lines if ln.strip().endswith(b"}")} if lines else set()
    assert 3 <= len(done) < 12, len(done)

    def sha(p):
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()

    finished = {}
    for ln in lines:
        try:
            rec = json.loads(ln)
        except ValueError:
            continue                                        # a line cut by the kill
        for o in rec["outputs"]:
            for key in ("map", "map_image", "overlay"):
                finished[o[key]] = sha(o[key])
    res = _run("explain", *args, "-o", out)               # resume
    assert res.exit_code == 0, res.output
    records = [json.loads(ln) for ln in jsonl.read_text().splitlines()]
    images = [r["image"] for r in records]
    assert sorted(images) == sorted(str(p) for p in src.iterdir()) and len(set(images)) == 12
    assert {p: sha(p) for p in finished} == finished       # the files of the finished images are intact
    names = {p.name for p in (tmp_path / "ref").iterdir() if p.name != "explanations.jsonl"}
    assert names == {p.name for p in out.iterdir() if p.is_file() and p.name != "explanations.jsonl"
                     and not p.name.startswith(".")}
    for name in names:                                     # and every file equals the uninterrupted run's
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(out / name), np.load(tmp_path / "ref" / name), err_msg=name)
        else:
            assert sha(out / name) == sha(tmp_path / "ref" / name), name


# ---------------------------------------------------------------------------
# 5. annotations whose size disagrees with the image; EXIF-rotated photos
# ---------------------------------------------------------------------------
def test_voc_and_coco_sizes_that_disagree_with_the_image_are_reported(tmp_path):
    from test_hostile_inputs import _coco, _voc, _voc_xml

    from onnx_excite.apps.eval import read_coco, read_voc

    root = _voc(tmp_path / "voc", ids=("a", "b"))
    (root / "Annotations" / "b.xml").write_text(_voc_xml("b.jpg", width="30", height="10"))
    records, problems = read_voc(root)
    assert [r.id for r in records] == ["a"]
    assert problems == [f"{root / 'Annotations' / 'b.xml'}: annotated size 30x10 differs from the image's 20x10 "
                        f"(b.jpg); image skipped"]
    res = _run("eval", "pointing", "--data", root, "--model", "nosuch.onnx", "-l", "r1", "-o", tmp_path / "o")
    assert res.exit_code == 2                               # (the model is checked first: no work at all)
    onnx.save(gap_classifier(2, 4, 2, 0), str(tmp_path / "gap.onnx"))
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"dog": [0]}))
    res = _run("eval", "pointing", "--data", root, "--model", tmp_path / "gap.onnx", "-l", "r1", "--mapping", mapping,
               "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "1 problem(s) in the data were skipped" in res.output and "annotated size 30x10 differs" in res.output
    assert "annotated size 30x10" in json.dumps(json.loads((tmp_path / "o" / "results.json").read_text()))

    coco = tmp_path / "coco"
    coco.mkdir()
    Image.new("RGB", (20, 10)).save(coco / "a.jpg")
    Image.new("RGB", (20, 10)).save(coco / "b.jpg")
    path = _coco(coco, images=[{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10},
                               {"id": 2, "file_name": "b.jpg", "width": 20, "height": 12}])
    records, problems = read_coco(path, coco)
    assert [r.id for r in records] == ["a"]
    assert problems == [f"{path}: image b.jpg annotated as 20x12 but is 20x10; image skipped"]


def test_grounding_annotation_that_disagrees_with_its_photo_is_reported(tmp_path):
    from test_hostile_inputs import _f30k_xml, _flickr

    from onnx_excite.apps.grounding.evaluate import GroundingEvalOptions, run_grounding_eval

    root = _flickr(tmp_path / "f", _f30k_xml())           # 100x50 photo 1.jpg, annotated 100x50
    Image.new("RGB", (80, 50), (30, 200, 30)).save(root / "Images" / "2.jpg")
    (root / "Sentences" / "2.txt").write_text("[/EN#2/people A man] runs .\n")
    (root / "Annotations" / "2.xml").write_text(_f30k_xml())      # says 100x50: the photo is 80x50
    (root / "test.txt").write_text("1\n2\n")
    onnx.save(gap_classifier(2, 4, 2, 0), str(tmp_path / "gap.onnx"))
    vocab = tmp_path / "vocab.tsv"
    vocab.write_text("man\t0\n")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"1": [[0, 0, 50, 50], [10, 10, 40, 40]], "2": [[0, 0, 40, 40]]}))
    res = run_grounding_eval(GroundingEvalOptions(data=str(root), model=str(tmp_path / "gap.onnx"), vocab=str(vocab),
                                                  layer="r1", method="mwp", proposals=str(boxes), gamma="0.5",
                                                  out_dir=str(tmp_path / "o")))
    problems = [p for p in res["problems"] if "2.jpg" in p]
    assert problems == [f"{root / 'Images' / '2.jpg'}: the photo is 80x50, the annotation says 100x50; image skipped"]
    assert res["counts"]["images"] == 1


def _rotated_jpeg(path, stored_wh=(40, 20), orientation=6):
    """A JPEG stored ``stored_wh`` with an EXIF orientation; a bright patch near its top-left."""
    w, h = stored_wh
    img = np.full((h, w, 3), 20, np.uint8)
    img[2:8, 3:12] = 250
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(img).save(path, exif=exif, quality=95)
    return path


def test_an_exif_rotated_photo_is_checked_and_scored_as_displayed(tmp_path):
    from test_hostile_inputs import _voc, _voc_xml

    from onnx_excite.apps.eval import read_voc
    from onnx_excite.io.images import load_image

    root = _voc(tmp_path / "voc", ids=("a", "r", "s"))
    _rotated_jpeg(root / "JPEGImages" / "r.jpg")            # stored 40x20, displayed 20x40
    _rotated_jpeg(root / "JPEGImages" / "s.jpg")
    assert load_image(root / "JPEGImages" / "r.jpg").size == (20, 40)
    # r: annotated for the displayed picture (20 wide, 40 high), a box in its lower half
    (root / "Annotations" / "r.xml").write_text(_voc_xml("r.jpg", width="20", height="40", box=(2, 25, 18, 38)))
    # s: annotated for the stored pixels: reported, naming the orientation
    (root / "Annotations" / "s.xml").write_text(_voc_xml("s.jpg", width="40", height="20"))
    records, problems = read_voc(root)
    by_id = {r.id: r for r in records}
    assert sorted(by_id) == ["a", "r"] and (by_id["r"].width, by_id["r"].height) == (20, 40)
    assert tuple(by_id["r"].objects[0].box) == (2.0, 25.0, 18.0, 38.0)      # in the displayed geometry
    assert problems == [f"{root / 'Annotations' / 's.xml'}: annotated size 40x20 differs from the image's 20x40 "
                        f"(s.jpg, as displayed: EXIF orientation 6); image skipped"]
    # the maps the evaluation scores are on the displayed picture: (height 40, width 20)
    from onnx_excite.apps.eval.cache import cache_key
    from onnx_excite.apps.eval.compute import model_spec

    onnx.save(gap_classifier(2, 4, 2, 0), str(tmp_path / "gap.onnx"))
    spec = model_spec(str(tmp_path / "gap.onnx"), ["r1"], ["mwp"], "positive", "pointing", 40)
    x = spec.input_array(by_id["r"].path)
    assert x.shape[-2:] == (80, 40)                       # shorter side (the width, 20) to 40: portrait
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"dog": [0]}))
    res = _run("eval", "pointing", "--data", root, "--model", tmp_path / "gap.onnx", "-l", "r1", "--methods", "mwp",
               "--mapping", mapping, "--size", "40", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    entry = next((tmp_path / "o").rglob(cache_key(by_id["r"]) + ".npz"))
    with np.load(entry, allow_pickle=False) as z:
        maps = [z[k] for k in z.files if k.startswith("mwp|")]
    assert maps and all(m.shape == (40, 20) for m in maps), [m.shape for m in maps]
