"""On a GPU (onnxruntime-gpu with a usable CUDA provider): maps on CUDA equal the CPU's,
every float node really runs on CUDA (ORT's profiler names each node's provider), I/O
binding, and the serving model. Skipped when no GPU is usable -- the only skip allowed."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from conftest import tiny_model
from onnx_excite import Exciter, build_excitation_model
from onnx_excite.targets.plain import make_serving_model
from test_blocks import BLOCKS, ZOO


def _cuda_usable() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        sess = ort.InferenceSession(tiny_model().SerializeToString(), providers=["CUDAExecutionProvider"])
    except Exception:
        return False
    return "CUDAExecutionProvider" in sess.get_providers()


pytestmark = pytest.mark.skipif(not _cuda_usable(), reason="no usable GPU (CUDA provider absent or cannot start)")

# the CUDA provider may use TF32 tensor cores for float32 convolutions and GEMMs
TOL = 5e-3


def _rel(got, want):
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


@pytest.mark.parametrize("arch", ["tiny", "resnet", "mobilenet_v2", "inception_lrn", "densenet"])
def test_maps_on_cuda_equal_cpu(arch):
    model, layers = (tiny_model(), ["r1", "x"]) if arch == "tiny" else (BLOCKS | ZOO)[arch](0)
    shape = [d.dim_value or 4 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.abs(np.random.default_rng(0).normal(size=shape)).astype(np.float32)
    cpu = Exciter(model, layers, device="cpu")
    gpu = Exciter(model, layers, device="cuda")
    assert gpu.providers[0] == "CUDAExecutionProvider" and gpu.io_binding
    target = cpu.logits(x).argmax(1)
    a, b = cpu.explain(x, target), gpu.explain(x, target)
    for method in a.maps:
        for layer in layers:
            assert _rel(b.maps[method][layer], a.maps[method][layer]) < TOL, (method, layer)


def _placement(model_proto, feeds, tmp_path) -> list[tuple[str, str, str]]:
    """(node, op, provider) of every kernel run, from ORT's profile."""
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "profile")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # node names stay ours
    sess = ort.InferenceSession(model_proto.SerializeToString(), opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    return [(e["name"].removesuffix("_kernel_time"), e["args"].get("op_name", "?"), e["args"].get("provider", "?"))
            for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


@pytest.mark.parametrize("arch", ["mobilenet_v2", "inception_lrn", "squeezenet_fire"])
def test_every_float_node_runs_on_cuda(arch, tmp_path):
    """The dynamic counterpart of `check --provider cuda`: ORT may keep small int64 shape
    computations on the CPU on purpose; no float computation may leave the GPU."""
    model, layers = (BLOCKS | ZOO)[arch](0)
    built = build_excitation_model(model, layers, methods=("mwp", "cmwp"))
    serving = make_serving_model(built, signal="top1", map_size="input", normalize="max")
    shape = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    import onnx

    for proto in (built.model, serving.model):
        feeds = {built.inputs[0]: x}
        if any(i.name == built.signal for i in proto.graph.input):
            feeds[built.signal] = np.eye(built.num_classes, dtype=np.float32)[[0, 1]]
        types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(proto).graph.value_info}
        outputs = {n.name: list(n.output) for n in proto.graph.node}
        on_cpu = [(name, op) for name, op, prov in _placement(proto, feeds, tmp_path) if prov != "CUDAExecutionProvider"
                  and any(types.get(o, TensorProto.FLOAT) in (TensorProto.FLOAT, TensorProto.FLOAT16)
                          for o in outputs.get(name, [None]))]   # an unknown node counts as float
        assert on_cpu == []


def test_default_model_and_serving_on_cuda():
    mobilenet_v2 = pytest.importorskip("onnx_excite.models.mobilenet_v2")
    path = str(mobilenet_v2.load_default_model())
    x = np.random.default_rng(2).normal(size=(8, 3, 224, 224)).astype(np.float32)
    cpu = Exciter(path, ["features.13"], device="cpu")
    gpu = Exciter(path, ["features.13"], device="cuda")
    target = cpu.logits(x).argmax(1)
    a, b = cpu.explain(x, target), gpu.explain(x, target)
    for method in a.maps:
        assert _rel(b.maps[method]["features.13"], a.maps[method]["features.13"]) < TOL
    built = build_excitation_model(path, ["features.13"], methods=("mwp", "cmwp"))
    serving = make_serving_model(built, signal="top1")
    sess = ort.InferenceSession(serving.model.SerializeToString(), providers=["CUDAExecutionProvider"])
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    np.testing.assert_array_equal(got["classes"][:, 0], target)
    for method in ("mwp", "cmwp"):
        assert _rel(got[f"{method}_features.13"][:, 0], a.maps[method]["features.13"]) < TOL
