"""Bad input gets one `error:` line, exit status 2, no traceback, and nothing is lost:
output paths, option values, model input types and sizes, image modes, runs that stop
half way and re-runs (issue 10)."""
import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_model
from onnx_excite import ExciteError
from onnx_excite.cli.app import app
from onnx_excite.io.images import load_image, to_rgb

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_error(res, needle=None):
    """Exit 2, exactly one non-empty output line, starting with 'error: ', no traceback."""
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    if needle:
        assert needle in lines[0], lines[0]
    return lines[0]


def _snapshot(*roots):
    """Every file under ``roots`` with its sha256 (to prove nothing was lost or modified)."""
    snap = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            snap[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "in" / "photo.png"
    path.parent.mkdir()
    Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    return path


def _read_only_dir(tmp_path) -> Path:
    """A folder nobody may write to: chmod 555, or (as root, who ignores modes) a folder
    on the read-only /proc file system."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").write_text("x")
    except OSError:
        return ro
    (ro / "probe").unlink()
    return Path("/proc/sys/onnx_excite_no_such_dir")


# ---------------------------------------------------------------- output paths
def test_explain_output_is_an_existing_file(tiny, photo, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("precious")
    before = _snapshot(target, photo.parent, tiny)
    _one_error(_run("explain", tiny, photo, "-l", "r1", "-o", target), "existing file")
    assert _snapshot(target, photo.parent, tiny) == before


def test_explain_and_export_into_a_read_only_folder(tiny, photo, tmp_path):
    ro = _read_only_dir(tmp_path)
    before = _snapshot(photo.parent, tiny)
    _one_error(_run("explain", tiny, photo, "-l", "r1", "-o", ro / "out"))
    _one_error(_run("explain", tiny, photo, "-l", "r1", "-o", ro))
    _one_error(_run("export", tiny, "-l", "r1", "-o", ro / "m.onnx"))
    assert _snapshot(photo.parent, tiny) == before


def test_export_output_names_a_folder(tiny, tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    before = _snapshot(folder, tiny)
    _one_error(_run("export", tiny, "-l", "r1", "-o", folder), "is a folder")
    _one_error(_run("export", tiny, "-l", "r1", "-o", tiny), "overwrite the input model")
    assert _snapshot(folder, tiny) == before


def test_eval_and_demo_output_is_an_existing_file(tmp_path):
    target = tmp_path / "taken"
    target.write_text("precious")
    _one_error(_run("eval", "pointing", "--data", tmp_path, "--methods", "center", "-o", target), "existing file")
    _one_error(_run("demo", "-o", target), "existing file")
    assert target.read_text() == "precious"


# ---------------------------------------------------------------- option values
@pytest.mark.parametrize("args, needle", [
    (["--size", "-5"], "--size"),
    (["--size", "0"], "--size"),
    (["--mean", "0.5,0.5"], "--mean"),
    (["--mean", "a,b,c"], "--mean"),
    (["--std", "0,0,0"], "--std"),
    (["--std", "nan,1,1"], "--std"),
    (["--top", "0"], "--top"),
    (["--top", "2000"], "only 5 classes"),
    (["--batch-size", "0"], "--batch-size"),
    (["--workers", "0"], "--workers"),
    (["--alpha", "1.5"], "--alpha"),
    (["--scale", "log"], "--scale"),
    (["--cmap", "no-such-map"], "colour map"),
    (["-m", "scorecam"], "unknown method"),
])
def test_explain_bad_values(tiny, photo, tmp_path, args, needle):
    out = tmp_path / "out"
    _one_error(_run("explain", tiny, photo, "-l", "r1", "-o", out, *args), needle)
    assert not out.exists() or not any(out.iterdir())   # refused before writing anything


def test_top_beyond_the_class_count_of_the_default_model(photo, tmp_path):
    _one_error(_run("explain", "default", photo, "--top", "2000", "-o", tmp_path / "o"), "only 1000 classes")


def test_bench_bad_values(tiny):
    _one_error(_run("bench", tiny, "-l", "r1", "--runs", "0"), "--runs")
    _one_error(_run("bench", tiny, "-l", "r1", "--batch", "0"), "--batch")


def test_eval_bad_size(tmp_path):
    _one_error(_run("eval", "pointing", "--data", tmp_path, "--methods", "center", "--size", "-5",
                    "-o", tmp_path / "o"), "--size")


def _many_class_model(classes=16):
    from conftest import gap_classifier

    return gap_classifier(classes, width=4, stride=1, seed=1)


def test_large_top_k_warns_with_the_count_first(photo, tmp_path):
    path = tmp_path / "many.onnx"
    onnx.save(_many_class_model(16), str(path))
    res = _run("explain", path, photo, "-l", "r1", "-m", "mwp", "--top", "12", "--size", "16", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines[0].startswith("warning: ") and "12 classes" in lines[0] and "12 maps" in lines[0], lines[0]
    assert len(list((tmp_path / "o").glob("photo.*.mwp.r1.npy"))) == 12


def test_jsonl_never_holds_nan(tmp_path):
    from onnx_excite.io.records import RecordStore

    store = RecordStore(tmp_path)
    with pytest.raises(ValueError):
        store.put({"image": "a.png", "settings": {}, "top5": [{"prob": float("nan")}], "outputs": []})
    assert not (tmp_path / "explanations.jsonl").exists() or "NaN" not in (tmp_path / "explanations.jsonl").read_text()


# ---------------------------------------------------------------- model input types and sizes
def _nhwc_model(dtype, classes=5, seed=0):
    """NHWC input of ``dtype``; inside: Cast to float, x/255, Transpose, conv, relu, GAP, gemm, softmax."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["xf", "s"], ["xs"], name="scale"),
             helper.make_node("Transpose", ["xs"], ["xt"], perm=[0, 3, 1, 2], name="tr"),
             helper.make_node("Conv", ["xt", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W2"], ["logits"], name="fc", transB=1),
             helper.make_node("Softmax", ["logits"], ["prob"], name="softmax")]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("x", dtype, ["N", "H", "W", 3])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", classes])],
                              [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W1"),
                               numpy_helper.from_array(rng.normal(size=(classes, 4)).astype(np.float32), "W2"),
                               numpy_helper.from_array(np.array(1 / 255, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("dtype", [TensorProto.UINT8, TensorProto.FLOAT16])
def test_models_with_uint8_or_float16_input(dtype, photo, tmp_path):
    path = tmp_path / "nhwc.onnx"
    onnx.save(_nhwc_model(dtype), str(path))
    res = _run("explain", path, photo, "-l", "r1", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "o" / "explanations.jsonl").read_text().splitlines()[0])
    # the forward the explanation used == the original model run on what it declares
    img = Image.open(photo).convert("RGB").resize((280, 224), Image.BILINEAR)   # shorter side 224
    pixels = np.asarray(img)[None]
    if dtype == TensorProto.UINT8:
        feed = pixels                                                       # raw uint8 pixels
    else:
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        feed = ((pixels / 255.0 - mean) / std).astype(np.float16)           # normalised, as float16
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs = sess.run(None, {"x": feed})[0][0]          # the model ends in a Softmax
    assert rec["top5"][0]["index"] == int(np.argmax(probs))
    np.testing.assert_allclose([t["prob"] for t in rec["top5"]], np.sort(probs)[::-1], rtol=1e-2, atol=1e-3)
    m = np.load(rec["outputs"][0]["map"])
    assert m.shape == (112, 140) and np.isfinite(m).all() and m.sum() > 0


def test_uint8_model_refuses_mean_std(photo, tmp_path):
    path = tmp_path / "u8.onnx"
    onnx.save(_nhwc_model(TensorProto.UINT8), str(path))
    _one_error(_run("explain", path, photo, "-l", "r1", "--mean", "0,0,0", "-o", tmp_path / "o"), "uint8")


def test_as_input_dtype_rounds_and_clips():
    from onnx_excite.run.runtime import as_input_dtype

    got = as_input_dtype(np.array([-3.0, 0.4, 0.6, 254.5, 300.0]), "tensor(uint8)")
    assert got.dtype == np.uint8 and got.tolist() == [0, 0, 1, 254, 255]
    assert as_input_dtype(np.ones(2), "tensor(float16)").dtype == np.float16


def _positional_model(size=32):
    """A fixed size x size model with a learned positional bias (Add of a 1 x 4 x s/2 x s/2
    constant): it cannot run at any other size."""
    rng = np.random.default_rng(2)
    half = size // 2
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Add", ["c1", "pos"], ["a1"], name="pos"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("Reshape", ["r1", "shape"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W2"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
                              [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W1"),
                               numpy_helper.from_array(rng.normal(size=(1, 4, half, half)).astype(np.float32), "pos"),
                               numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
                               numpy_helper.from_array(rng.normal(size=(3, 4 * half * half)).astype(np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_fixed_size_model_runs_at_its_declared_size(photo, tmp_path):
    path = tmp_path / "fixed32.onnx"
    onnx.save(_positional_model(32), str(path))
    res = _run("explain", path, photo, "-l", "r1", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "o" / "explanations.jsonl").read_text().splitlines()[0])
    assert rec["settings"]["size"] == [32, 32]
    assert np.load(rec["outputs"][0]["map"]).shape == (16, 16)
    assert np.load(rec["outputs"][0]["map_image"]).shape == (40, 50)    # back on the photo
    # --size cannot change a model whose head is not convolutional: one line, no traceback
    _one_error(_run("explain", path, photo, "-l", "r1", "--size", "64", "-o", tmp_path / "o2"), "drop --size")


def test_fixed_size_dense_head_size_override_warns(tiny, photo, tmp_path):
    res = _run("explain", tiny, photo, "-l", "r1", "-m", "mwp", "-o", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert np.load(next((tmp_path / "a").glob("*.mwp.r1.npy"))).shape == (4, 4)     # 8x8 input, stride 2
    res = _run("explain", tiny, photo, "-l", "r1", "-m", "mwp", "--size", "16", "-o", tmp_path / "b")
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.output.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "8x8" in warnings[0] and "--size 16" in warnings[0]
    assert np.load(next((tmp_path / "b").glob("*.mwp.r1.npy"))).shape == (8, 10)    # 16 x 20 input


# ---------------------------------------------------------------- image modes
def test_16bit_greyscale_png_is_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (48, 64, 3)
    np.testing.assert_allclose(rgb[..., 0], ramp / 257.0, atol=0.51)
    assert (rgb == 255).mean() < 0.01
    # mode I holding 16-bit values, and float images in [0, 1]
    np.testing.assert_allclose(np.asarray(to_rgb(Image.fromarray(ramp.astype(np.int32))))[..., 1], ramp / 257.0, atol=0.51)
    f = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    np.testing.assert_allclose(np.asarray(to_rgb(Image.fromarray(f, mode="F")))[..., 2], f * 255, atol=0.51)


def _png16_rgb(path, arr):
    """Write a 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_rgb_png(tmp_path):
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 65536, size=(12, 16, 3)).astype(np.uint16)
    path = tmp_path / "rgb16.png"
    _png16_rgb(path, arr)
    got = np.asarray(load_image(path)).astype(float)
    assert got.shape == (12, 16, 3)
    assert np.abs(got - arr / 257.0).max() <= 1.0


def test_rgba_palette_cmyk_and_exif(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (255, 0, 0, 255)          # left: opaque red; right: fully transparent "black"
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = np.asarray(load_image(tmp_path / "rgba.png"))
    assert (got[:, :5] == (255, 0, 0)).all() and (got[:, 5:] == 255).all()   # composited on white

    pal = Image.new("P", (6, 4))
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 3, 4))
    pal.save(tmp_path / "pal.png")
    got = np.asarray(load_image(tmp_path / "pal.png"))
    assert (got[:, :3] == (0, 255, 0)).all() and (got[:, 3:] == (0, 0, 255)).all()
    pal.save(tmp_path / "pal_t.png", transparency=0)
    got = np.asarray(load_image(tmp_path / "pal_t.png"))
    assert (got[:, 3:] == 255).all() and (got[:, :3] == (0, 255, 0)).all()

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = np.asarray(load_image(tmp_path / "cmyk.jpg")).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60

    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = (255, 0, 0)               # stored: left red, right blue, 40 wide x 20 high
    img[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                        # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    shown = load_image(tmp_path / "rot.jpg")
    assert shown.size == (20, 40)           # portrait, as a viewer shows it
    top, bottom = np.asarray(shown)[:15].mean(axis=(0, 1)), np.asarray(shown)[25:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_every_mode_explains_end_to_end(tiny, tmp_path):
    src = tmp_path / "modes"
    src.mkdir()
    ramp = np.linspace(0, 65535, 30 * 20).reshape(20, 30).astype(np.uint16)
    Image.fromarray(ramp).save(src / "grey16.png")
    _png16_rgb(src / "rgb16.png", np.stack([ramp] * 3, axis=-1))
    Image.new("RGBA", (9, 7), (10, 200, 30, 128)).save(src / "rgba.png")
    Image.new("CMYK", (9, 7), (0, 255, 255, 0)).save(src / "cmyk.jpg")
    Image.new("P", (9, 7), 3).save(src / "pal.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(src / "one.png")
    res = _run("explain", tiny, src, "-l", "r1", "-m", "mwp", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    records = [json.loads(ln) for ln in (tmp_path / "o" / "explanations.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for rec in records:
        out = rec["outputs"][0]
        w, h = Image.open(rec["image"]).size
        assert np.load(out["map_image"]).shape == (h, w)
        assert np.isfinite(np.load(out["map"])).all()
        assert Image.open(out["overlay"]).size[1] >= 256      # small images are enlarged for display


# ---------------------------------------------------------------- runs that stop half way, re-runs
def _three_photos(folder):
    folder.mkdir()
    rng = np.random.default_rng(5)
    for name in ("a", "b", "c"):
        Image.fromarray((rng.random((24, 30, 3)) * 255).astype(np.uint8)).save(folder / f"{name}.png")
    return folder


def _lines(out):
    return [json.loads(ln) for ln in (out / "explanations.jsonl").read_text().splitlines() if ln.strip()]


def test_failure_on_the_second_image_keeps_the_others(tiny, tmp_path, monkeypatch):
    from onnx_excite.run.runtime import Exciter

    src, out = _three_photos(tmp_path / "in"), tmp_path / "out"
    real, calls = Exciter.explain, []

    def flaky(self, x, targets):
        calls.append(1)
        if len(calls) == 2:
            raise ExciteError("ONNX Runtime failed: simulated")
        return real(self, x, targets)

    monkeypatch.setattr(Exciter, "explain", flaky)
    res = _run("explain", tiny, src, "-l", "r1", "-m", "mwp", "--batch-size", "1", "-o", out)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "b.png: ONNX Runtime failed: simulated" in res.output
    assert sorted(Path(r["image"]).name for r in _lines(out)) == ["a.png", "c.png"]
    monkeypatch.setattr(Exciter, "explain", real)
    res = _run("explain", tiny, src, "-l", "r1", "-m", "mwp", "--batch-size", "1", "-o", out)
    assert res.exit_code == 0, res.output
    assert "skipped 2 image(s)" in res.output
    assert sorted(Path(r["image"]).name for r in _lines(out)) == ["a.png", "b.png", "c.png"]


def test_a_run_that_dies_half_way_keeps_what_it_finished(tiny, tmp_path, monkeypatch):
    import onnx_excite.render.overlay as render

    src, out = _three_photos(tmp_path / "in"), tmp_path / "out"
    real = render.panel_grid

    def dies(*args, **kwargs):
        if args[3][0].startswith("b.png"):   # its title: writer threads draw a's and b's panels in either order
            raise KeyboardInterrupt   # the user pressed Ctrl-C while image b was written
        return real(*args, **kwargs)

    monkeypatch.setattr(render, "panel_grid", dies)
    runner.invoke(app, ["explain", str(tiny), str(src), "-l", "r1", "-m", "mwp", "-o", str(out)])
    assert [Path(r["image"]).name for r in _lines(out)] == ["a.png"]
    monkeypatch.setattr(render, "panel_grid", real)
    a_overlay = next(out.glob("a.*.mwp.r1.png"))
    first = a_overlay.stat().st_mtime_ns
    for _ in range(2):   # re-running twice: no duplicates, finished images not redone
        res = _run("explain", tiny, src, "-l", "r1", "-m", "mwp", "-o", out)
        assert res.exit_code == 0, res.output
        assert sorted(Path(r["image"]).name for r in _lines(out)) == ["a.png", "b.png", "c.png"]
    assert a_overlay.stat().st_mtime_ns == first     # a was not redone


def test_rerun_replaces_incomplete_and_keeps_other_settings(tiny, tmp_path):
    src, out = _three_photos(tmp_path / "in"), tmp_path / "out"
    args = ["explain", tiny, src, "-l", "r1", "-m", "mwp", "-o", out]
    assert _run(*args).exit_code == 0
    victim = next(out.glob("b.*.mwp.r1.png"))
    victim.unlink()                                   # an output went missing: b is redone
    res = _run(*args)
    assert res.exit_code == 0 and "skipped 2 image(s)" in res.output and victim.exists()
    assert len(_lines(out)) == 3
    assert _run(*args, "--top", "2").exit_code == 0  # other settings: their own records
    recs = _lines(out)
    assert len(recs) == 6 and sorted(r["settings"]["top"] for r in recs) == [1, 1, 1, 2, 2, 2]


def test_record_store(tmp_path):
    from onnx_excite.io.records import RecordStore, merge, read_records

    (tmp_path / "m.npy").write_bytes(b"x")
    rec = {"image": str(tmp_path / "a.png"), "settings": {"k": 1}, "outputs": [{"map": str(tmp_path / "m.npy")}]}
    store = RecordStore(tmp_path)
    store.put(rec)
    store.put(dict(rec, note="second"))
    assert len(read_records(store.path)) == 1 and store.path.read_text().count("\n") == 1
    assert RecordStore(tmp_path).done(tmp_path / "a.png", {"k": 1})["note"] == "second"
    assert RecordStore(tmp_path).done(tmp_path / "a.png", {"k": 2}) is None
    os.remove(tmp_path / "m.npy")
    assert RecordStore(tmp_path).done(tmp_path / "a.png", {"k": 1}) is None   # outputs missing
    with store.path.open("a") as fh:   # a line cut off by a crash, and a duplicate
        fh.write(json.dumps(rec) + "\n" + '{"image": "b.png", "sett')
    assert len(RecordStore(tmp_path).records) == 1 and store.path.read_text().count("\n") == 1
    other = tmp_path / "w2"
    RecordStore(other).put(dict(rec, image=str(tmp_path / "b.png")))
    assert merge([store.path, other / "explanations.jsonl"], tmp_path / "all.jsonl") == 2


def test_eval_and_demo_into_a_read_only_folder(tmp_path):
    ro = _read_only_dir(tmp_path)
    _one_error(_run("eval", "pointing", "--data", tmp_path, "--methods", "center", "-o", ro / "eval"))
    _one_error(_run("demo", "-o", ro / "demo"))


def test_bench_reports_progress_and_inputs(tiny):
    from onnx_excite.apps.bench import run_bench

    steps, inputs = [], {}
    rows, _ = run_bench(str(tiny), ["r1"], runs=3, progress=lambda *a: steps.append(a), on_inputs=inputs.update)
    assert inputs == {"x": (1, 3, 8, 8)}
    assert [s for s in steps if s[0] == "building"] == [("building", i, 4) for i in range(4)]
    assert [s for s in steps if s[0] == "timing"] == [("timing", i, 3) for i in range(4)]
    assert [r.name for r in rows] == ["forward", "forward+MWP", "forward+c-MWP", "forward+MWP+c-MWP"]
