"""The README stays true: its "Run the exported model yourself" blocks run as written, and
its first two ```bash blocks are the install and test commands .ci/run runs."""
import re
import shlex
import shutil

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from conftest import ROOT, photo
from onnx_excite import Exciter
from onnx_excite.cli.app import app
from onnx_excite.io.images import preprocess

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start: end if end > 0 else None]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def test_run_the_exported_model_yourself(tmp_path, monkeypatch):
    section = _section("Run the exported model yourself")
    (command,), (code,) = _blocks(section, "bash"), _blocks(section, "python")
    args = shlex.split(command.strip())
    assert args[:2] == ["onnx-excite", "export"]
    shutil.copy(photo("dog.jpg"), tmp_path / "dog.jpg")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, args[1:])
    assert res.exit_code == 0, res.output
    ns: dict = {}
    exec(compile(code, "README.md (Run the exported model yourself)", "exec"), ns)

    # the snippet's preprocessing is the one explain uses for the default model
    want_x, _ = preprocess(Image.open("dog.jpg").convert("RGB"), size=224, resize="shorter")
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
    first, second = _blocks(README, "bash")[:2]
    assert "pip install -e \".[cpu,test]\"" in first and "onnx-excite demo" in first
    assert second.strip().endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci and "mktemp -d" in ci and "git clone" in ci
