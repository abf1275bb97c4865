"""An export never writes the input model, its external data or outside the folders named,
and checks every path before it creates anything."""
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_excite.errors import ExciteError
from onnx_excite.graph.options import BuildOptions
from onnx_excite.targets.export import export
from onnx_excite.targets.options import ExportOptions


def _classifier(path: Path, external: bool = False) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], [w, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def _bytes(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_hard_link_of_the_input_is_refused(tmp_path):
    src = _classifier(tmp_path / "m.onnx")
    os.link(src, tmp_path / "link.onnx")
    before = _bytes(tmp_path)
    with pytest.raises(ExciteError, match="refusing to overwrite the input model"):
        export(str(src), tmp_path / "link.onnx", ExportOptions(build=BuildOptions(layers=["r"])))
    assert _bytes(tmp_path) == before


def test_the_inputs_external_data_file_is_refused(tmp_path):
    src = _classifier(tmp_path / "m.onnx", external=True)
    assert (tmp_path / "m.onnx.data").exists()
    before = _bytes(tmp_path)
    with pytest.raises(ExciteError, match="refusing to overwrite the input model or its data"):
        export(str(src), tmp_path / "m.onnx.data", ExportOptions(build=BuildOptions(layers=["r"])))
    assert _bytes(tmp_path) == before


@pytest.mark.parametrize("name", ["..", ".", "../escaped", ".hidden", "a/b"])
def test_a_triton_name_outside_the_repository_is_refused_before_anything_is_created(tmp_path, name):
    src = _classifier(tmp_path / "m.onnx")
    repo = tmp_path / "repo"
    with pytest.raises(ExciteError, match="Triton model name"):
        export(str(src), None, ExportOptions(build=BuildOptions(layers=["r"]), triton_dir=repo, triton_name=name))
    assert not repo.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_triton_folder_that_holds_the_input_is_refused(tmp_path):
    folder = tmp_path / "repo" / "m" / "1"
    folder.mkdir(parents=True)
    src = _classifier(folder / "model.onnx")
    before = _bytes(tmp_path)
    with pytest.raises(ExciteError, match="refusing to overwrite the input model"):
        export(str(src), None, ExportOptions(build=BuildOptions(layers=["r"]), triton_dir=tmp_path / "repo",
                                             triton_name="m"))
    assert _bytes(tmp_path) == before


def test_a_good_export_still_writes(tmp_path):
    src = _classifier(tmp_path / "m.onnx", external=True)
    before = (tmp_path / "m.onnx.data").read_bytes()
    res = export(str(src), tmp_path / "out.onnx", ExportOptions(build=BuildOptions(layers=["r"]), triton_dir=tmp_path / "r"))
    assert (tmp_path / "out.onnx").exists() and (tmp_path / "r" / "m_excite" / "1" / "model.onnx").exists()
    assert (tmp_path / "m.onnx.data").read_bytes() == before and res.written
