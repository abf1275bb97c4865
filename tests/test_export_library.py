"""The library's export(): it writes the model (and the Triton folder), checks every file it
wrote with onnx.checker, removes them when a check fails, goes through external data past
protobuf's limit, and never touches the input model."""
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import tiny_model
from onnx_excite import ExciteError, build_excitation_model
from onnx_excite.graph.options import BuildOptions
from onnx_excite.io import modelfile
from onnx_excite.targets import export as export_module
from onnx_excite.targets.export import TARGETS, export
from onnx_excite.targets.options import ExportOptions

OPTIONS = ExportOptions(build=BuildOptions(layers=["r1"], methods=("mwp", "cmwp")))


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_export_writes_the_companion_model_the_builder_builds(tmp_path, tiny_path):
    before = _digest(tiny_path)
    out = tmp_path / "companion.onnx"
    result = export(str(tiny_path), out, OPTIONS)
    assert result.written == [out] and result.serving is None and result.folder is None
    onnx.checker.check_model(str(out), full_check=True)
    built = build_excitation_model(str(tiny_path), ["r1"], ("mwp", "cmwp"))
    assert onnx.load(str(out)).SerializeToString() == result.model.SerializeToString()
    assert [o.name for o in onnx.load(str(out)).graph.output] == [o.name for o in built.model.graph.output]
    assert _digest(tiny_path) == before                      # the input file is untouched
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    e = np.eye(2, 5, dtype=np.float32)
    sess = ort.InferenceSession(built.model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {built.inputs[0]: x, built.signal: e})))
    got = _run(out, {built.inputs[0]: x, built.signal: e})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_export_never_touches_the_input_proto_nor_overwrites_the_input_file(tmp_path, tiny_path):
    model = tiny_model()
    before = model.SerializeToString()
    export(model, tmp_path / "a.onnx", ExportOptions.of(OPTIONS, signal="top1", map_size="input", normalize="max"))
    assert model.SerializeToString() == before
    with pytest.raises(ExciteError, match="refusing to overwrite the input model"):
        export(str(tiny_path), tiny_path, OPTIONS)


def test_export_writes_the_triton_folder_and_checks_both_files(tmp_path, tiny_path, monkeypatch):
    checked = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda path, **kw: (checked.append(path), real(path, **kw)))
    out = tmp_path / "serving.onnx"
    result = export(str(tiny_path), out, ExportOptions.of(OPTIONS, triton_dir=tmp_path / "repo", signal="top1"))
    folder = tmp_path / "repo" / f"{tiny_path.stem}_excite"
    assert result.folder == folder and result.written == [out, folder / "1" / "model.onnx"]
    assert checked == [str(out), str(folder / "1" / "model.onnx")]
    assert (folder / "config.pbtxt").read_text().startswith("name: ")
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["x"]       # the serving form: the image alone


def test_a_failing_check_removes_what_the_export_wrote(tmp_path, tiny_path, monkeypatch):
    def broken(path, **kw):
        if str(path).endswith("model.onnx"):
            raise onnx.checker.ValidationError("a node without its input\nmore detail")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    out = tmp_path / "serving.onnx"
    with pytest.raises(ExciteError) as err:
        export(str(tiny_path), out, ExportOptions.of(OPTIONS, triton_dir=tmp_path / "repo"))
    assert str(err.value) == "internal: the built model fails onnx.checker: a node without its input"
    assert not out.exists() and not (tmp_path / "repo" / f"{tiny_path.stem}_excite" / "1" / "model.onnx").exists()


def test_past_the_protobuf_limit_the_weights_go_beside_the_file_and_are_removed_on_failure(tmp_path, tiny_path,
                                                                                       monkeypatch):
    monkeypatch.setattr(modelfile, "PROTOBUF_LIMIT", 64)
    out = tmp_path / "big.onnx"
    export(str(tiny_path), out, OPTIONS)
    data = tmp_path / "big.onnx.data"
    assert data.stat().st_size > 0
    x = np.zeros((1, 3, 8, 8), np.float32)
    assert set(_run(out, {"x": x, "excite_signal": np.eye(1, 5, dtype=np.float32)})) >= {"mwp:r1", "cmwp:r1"}
    monkeypatch.setattr(export_module, "_check", lambda path: (_ for _ in ()).throw(ExciteError("internal: bad")))
    with pytest.raises(ExciteError, match="internal: bad"):
        export(str(tiny_path), out, OPTIONS)
    assert not out.exists() and not data.exists()


def test_bad_options_fail_before_anything_is_written(tmp_path, tiny_path, dense_path):
    cases = [(ExportOptions.of(OPTIONS, signal="top7"), "unknown signal 'top7'"),
             (ExportOptions.of(OPTIONS, normalize="l2"), "unknown normalization 'l2'"),
             (ExportOptions(build=BuildOptions(layers=["r1"], channels=True), signal="top1"), "--channels is for the plain"),
             (ExportOptions(), "no map layer given")]
    dense = tmp_path / "dense" / "dense.onnx"   # no feature map: no layer to suggest
    dense.parent.mkdir()
    import shutil

    for options, message in cases:
        model = tiny_path
        if message == "no map layer given":
            shutil.copy(dense_path, dense)
            model = dense
        with pytest.raises(ExciteError, match=message):
            export(str(model), tmp_path / "o.onnx", options)
    with pytest.raises(ExciteError, match="give -o/--output FILE and/or --serving DIR"):
        export(str(tiny_path), None, OPTIONS)
    assert sorted(tmp_path.iterdir()) == sorted([tiny_path, dense_path, dense.parent])
    assert list(dense.parent.iterdir()) == [dense]


def test_every_target_has_the_same_four_steps():
    assert list(TARGETS) == ["plain", "fp16", "triton"]
    for target in TARGETS.values():
        assert all(callable(getattr(target, step)) for step in ("wanted", "prepare", "finish", "write"))
    assert [name for name, t in TARGETS.items() if t.wanted(OPTIONS)] == ["plain"]
    both = ExportOptions.of(OPTIONS, fp16=True, triton_dir="repo")
    assert [name for name, t in TARGETS.items() if t.wanted(both)] == ["plain", "fp16", "triton"]
