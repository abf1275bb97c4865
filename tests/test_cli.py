"""CLI behaviour through typer's runner: outputs, and one-line errors with non-zero exit."""
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
from typer.testing import CliRunner

from onnx_excite import Exciter
from onnx_excite.cli.app import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(result):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = result.output.strip()
    assert "Traceback" not in text
    lines = [l for l in text.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


def test_layers_lists_candidates(tiny_path):
    res = _run("layers", tiny_path)
    assert res.exit_code == 0, res.output
    for name in ("x", "r1", "p1", "logits"):
        assert name in res.output


def test_check_ok(tiny_path):
    res = _run("check", tiny_path)
    assert res.exit_code == 0 and res.output.startswith("ok")


def test_check_reports_unsupported(tmp_path):
    from conftest import tiny_model

    model = tiny_model()
    model.graph.node[1].op_type = "Hardmax"   # no excitation rule: must be refused, not guessed
    path = tmp_path / "elu.onnx"
    onnx.save(model, str(path))
    res = _run("check", path)
    assert res.exit_code == 1
    assert "Hardmax" in res.output and "relu1" in res.output


def test_export_runs_in_plain_onnxruntime(tiny_path, tmp_path):
    before = hashlib.sha256(tiny_path.read_bytes()).hexdigest()
    out = tmp_path / "companion.onnx"
    res = _run("export", tiny_path, "-o", out, "--layer", "r1", "--layer", "x", "-m", "mwp", "--contrastive")
    assert res.exit_code == 0, res.output
    assert hashlib.sha256(tiny_path.read_bytes()).hexdigest() == before  # input model untouched
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    sig = np.zeros((2, 5), np.float32)
    sig[0, 1] = sig[1, 3] = 1
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x, "excite_signal": sig})))
    ref = Exciter(str(tiny_path), ["r1", "x"]).explain(x, [1, 3])
    for method in ("mwp", "cmwp"):
        for layer in ("r1", "x"):
            np.testing.assert_allclose(got[f"{method}:{layer}"], ref.maps[method][layer], rtol=1e-6, atol=1e-9)


def test_export_refuses_to_overwrite_input(tiny_path):
    before = tiny_path.read_bytes()
    line = _one_error_line(_run("export", tiny_path, "-o", tiny_path, "--layer", "r1"))
    assert "overwrite" in line
    assert tiny_path.read_bytes() == before


def test_unknown_layer(tiny_path, tmp_path):
    line = _one_error_line(_run("export", tiny_path, "-o", tmp_path / "o.onnx", "--layer", "r2"))
    assert "unknown layer 'r2'" in line


def test_missing_and_corrupt_model(tmp_path):
    assert "no such model file" in _one_error_line(_run("layers", tmp_path / "nope.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
    assert "not a readable ONNX model" in _one_error_line(_run("check", bad))


def test_bench_prints_ratios(tiny_path):
    res = _run("bench", tiny_path, "--layer", "x", "--runs", "2")
    assert res.exit_code == 0, res.output
    for variant in ("forward", "forward+MWP", "forward+c-MWP"):
        assert variant in res.output


def test_explain_lists_max_3_top_classes_up_to_5(tmp_path, tiny_path):
    """Each image's line lists max(3, --top) classes (the record keeps 5), in the record's order."""
    import json

    from PIL import Image

    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(image)
    for top, shown in ((1, 3), (4, 4), (5, 5)):
        out = tmp_path / f"o{top}"
        res = _run("explain", tiny_path, image, "-l", "p1", "--top", top, "-m", "mwp", "-o", out)
        assert res.exit_code == 0, res.output
        (line,) = [l for l in res.output.splitlines() if l.startswith("img.png: ")]
        record = json.loads((out / "explanations.jsonl").read_text().splitlines()[0])
        want = ", ".join(f"{t['label']} ({t['prob']:.2f})" for t in record["top5"][:shown])
        assert line == f"img.png: {want}" and len(line.split("), ")) == shown


def test_export_and_explain_default_to_the_same_methods_and_contrastive_adds_variants(tiny_path, tmp_path):
    from onnx_excite.methods import DEFAULT_METHODS, METHODS

    res = _run("export", tiny_path, "-o", tmp_path / "a.onnx", "-l", "r1")
    assert res.exit_code == 0, res.output
    outs = [o.name for o in onnx.load(str(tmp_path / "a.onnx")).graph.output]
    assert [o for o in outs if ":" in o] == [f"{m}:r1" for m in DEFAULT_METHODS]
    from PIL import Image

    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    res = _run("explain", tiny_path, image, "-l", "r1", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert sorted(p.name.split(".")[2] for p in (tmp_path / "o").glob("img.*.r1.png")) == sorted(DEFAULT_METHODS)
    # --contrastive: each -m method's declared contrastive variant, after the methods named
    res = _run("export", tiny_path, "-o", tmp_path / "b.onnx", "-l", "r1", "-m", "grad", "-m", "mwp", "--contrastive")
    assert res.exit_code == 0, res.output
    outs = [o.name for o in onnx.load(str(tmp_path / "b.onnx")).graph.output]
    assert [o for o in outs if ":" in o] == ["grad:r1", "mwp:r1", "c-grad:r1", "cmwp:r1"]
    for m in METHODS.values():   # every declared variant is a contrastive method of the same family
        if m.contrastive_variant:
            v = METHODS[m.contrastive_variant]
            assert v.contrastive and not m.contrastive and v.relu == m.relu and v.linear == m.linear
    # no-ops and impossible requests are one error line
    for args in (("export", tiny_path, "-o", tmp_path / "c.onnx", "-l", "r1", "--contrastive"),
                 ("explain", tiny_path, image, "-l", "r1", "--contrastive", "-o", tmp_path / "o2"),
                 ("export", tiny_path, "-o", tmp_path / "d.onnx", "-l", "r1", "-m", "guided", "--contrastive")):
        line = _one_error_line(_run(*args))
        assert "--contrastive" in line
    assert not (tmp_path / "c.onnx").exists() and not (tmp_path / "o2").exists()


def _layer_rows(output: str) -> dict:
    """layer -> (shape, stride) from the `layers` table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) >= 5 and cells[0] and cells[0] != "layer (tensor name)":
            rows[cells[0]] = (cells[2], cells[3])
    return rows


def test_layers_shows_sizes_and_strides_at_the_size_explain_uses(tmp_path, tiny_path):
    from conftest import gap_classifier

    env = {"COLUMNS": "200"}
    # dynamic H, W: the shorter side explain resizes to (224), conv 3x3 stride 3 pad 1 -> floor((224+2-3)/3)+1 = 75
    path = tmp_path / "any.onnx"
    onnx.save(gap_classifier(5, 4, 3, seed=0), str(path))
    res = runner.invoke(app, ["layers", str(path)], env=env)
    assert res.exit_code == 0, res.output
    rows = _layer_rows(res.output)
    assert rows["x"] == ("?x3x224x224", "/1") and rows["r1"] == ("?x4x75x75", "/2.99")
    title = " ".join(res.output.split())
    assert rows["logits"][1] == "-" and "224x224 input (explain resizes the shorter side to 224" in title
    # a fixed 8x8 input: its own size; conv stride 2 with pads (1, 0, 0, 1) -> 4x4, the 3x3/1 pool keeps it
    rows = _layer_rows(runner.invoke(app, ["layers", str(tiny_path)], env=env).output)
    assert rows["x"] == ("?x3x8x8", "/1") and rows["r1"] == ("?x4x4x4", "/2") and rows["p1"] == ("?x4x4x4", "/2")
    # the default model: features.13 is the 14x14 map of a 224 input, /16 (MobileNetV2's fourth stride-2 stage)
    res = runner.invoke(app, ["layers", "default"], env=env)
    rows = _layer_rows(res.output)
    assert rows["features.13"] == ("?x96x14x14", "/16") and rows["features.18"] == ("?x1280x7x7", "/32")
    assert not any("?x?" in shape for shape, _ in rows.values() if shape.count("x") == 3)
