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
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
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
