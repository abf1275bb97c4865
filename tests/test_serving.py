"""Serving artefacts: the signal inside the graph, maps resized/normalised in the graph,
dynamic batch, float16 forward, the Triton model folder, device selection and I/O binding."""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_model
from onnx_excite import Exciter, build_excitation_model
from onnx_excite.cli.app import app
from onnx_excite.run.devices import DeviceUnavailableError, check_providers
from onnx_excite.errors import ExciteError
from onnx_excite.render.maps import upsample
from onnx_excite.graph.options import BuildOptions
from onnx_excite.targets.export import export
from onnx_excite.targets.fp16 import forward_to_float16
from onnx_excite.targets.options import ExportOptions
from onnx_excite.targets.plain import make_batch_dynamic, make_serving_model
from onnx_excite.targets.triton import triton_config
from test_blocks import BLOCKS, ZOO

runner = CliRunner()
SAMPLES = Path(__file__).resolve().parents[1] / "onnx_excite" / "data" / "samples"


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _rel(got, want):
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("arch", ["tiny", "inception_lrn", "mobilenet_v2"])
def test_topk_signal_in_the_graph_equals_exciter(arch, k):
    model, layers = (tiny_model(), ["r1", "x"]) if arch == "tiny" else (BLOCKS | ZOO)[arch](0)
    shape = [d.dim_value or 3 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    built = build_excitation_model(model, layers, methods=("mwp", "cmwp"))
    serving = make_serving_model(built, signal=f"topk:{k}" if k > 1 else "top1")
    assert [i.name for i in serving.model.graph.input] == built.inputs      # the image alone
    outs = _run(serving.model, {built.inputs[0]: x})
    ex = Exciter(model, layers, methods=("mwp", "cmwp"))
    logits = ex.logits(x)
    want_classes = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(outs["classes"], want_classes)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(outs["scores"], np.take_along_axis(probs, want_classes, 1), rtol=1e-5, atol=1e-7)
    for j in range(k):
        res = ex.explain(x, want_classes[:, j])
        for (method, layer), name in serving.maps.items():
            assert outs[name].shape[:2] == (shape[0], k)
            assert _rel(outs[name][:, j], res.maps[method][layer]) < 1e-5, (name, j)


def test_map_size_input_and_normalize():
    model, layers = BLOCKS["mobilenet_v2"](0)     # maps at 5x5 (stride 2) and 10x9 for a 10x9 input
    shape = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.abs(np.random.default_rng(2).normal(size=shape)).astype(np.float32)
    built = build_excitation_model(model, layers, methods=("mwp", "cmwp"))
    signal = np.eye(built.num_classes, dtype=np.float32)[[1, 2]]
    plain = _run(built.model, {built.inputs[0]: x, built.signal: signal})
    size = (shape[3], shape[2])
    assert {plain[name].shape[1:] for name in built.maps.values()} == {(5, 5), (10, 9)}
    for resize in ("bilinear", "bicubic"):
        s = make_serving_model(built, map_size="input", resize=resize)
        outs = _run(s.model, {built.inputs[0]: x, built.signal: signal})
        for (method, layer), name in s.maps.items():
            small = plain[built.maps[(method, layer)]]
            assert outs[name].shape == (2, shape[2], shape[3])
            for n in range(2):   # PIL's resampling (half-pixel centres) as the independent reference
                want = upsample(small[n], size, resize)
                assert _rel(outs[name][n], want) < 1e-5, (resize, name)
    for norm in ("max", "sum"):
        s = make_serving_model(built, normalize=norm)
        outs = _run(s.model, {built.inputs[0]: x, built.signal: signal})
        for (method, layer), name in s.maps.items():
            m = plain[built.maps[(method, layer)]]
            den = np.abs(m).max(axis=(1, 2), keepdims=True) if norm == "max" else np.abs(m).sum(axis=(1, 2), keepdims=True)
            want = np.where(den > 0, m / np.where(den > 0, den, 1), 0)
            np.testing.assert_allclose(outs[name], want, rtol=1e-5, atol=1e-7)
    # a map that is 0 everywhere stays 0 (no NaN): zero input, bias-free tiny net
    tiny = build_excitation_model(tiny_model(), ["r1"], methods=("mwp",))
    s = make_serving_model(tiny, signal="top1", map_size="input", normalize="max")
    out = _run(s.model, {"x": np.zeros((2, 3, 8, 8), np.float32)})["mwp_r1"]
    assert out.shape == (2, 1, 8, 8) and np.isfinite(out).all() and not out.any()


def test_bad_serving_options():
    # a score map (N, K, h, w) as output: the client must send the signal
    conv = helper.make_node("Conv", ["x", "W"], ["scores_map"], name="conv", pads=[1, 1, 1, 1])
    w = numpy_helper.from_array(np.ones((5, 3, 3, 3), np.float32), "W")
    fcn = helper.make_model(helper.make_graph([conv], "fcn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                                              [helper.make_tensor_value_info("scores_map", TensorProto.FLOAT, ["N", 5, 6, 6])], [w]),
                            opset_imports=[helper.make_opsetid("", 17)])
    fcn.ir_version = 8
    with pytest.raises(ExciteError, match="needs N x K logits"):
        make_serving_model(build_excitation_model(fcn, ["x"], methods=("mwp",)), signal="top1")
    built = build_excitation_model(tiny_model(), ["r1"], methods=("mwp",))
    for kw, msg in ((dict(signal="top0"), "unknown signal"), (dict(signal="topk:9"), "only 5 classes"),
                    (dict(map_size="full"), "unknown map size"), (dict(normalize="l2"), "unknown normalization"),
                    (dict(map_size="input", resize="nearest"), "unknown resize mode")):
        with pytest.raises(ExciteError, match=msg):
            make_serving_model(built, **kw)


def _fixed_batch_model(reshape_batch: bool):
    """conv - relu - GAP - Reshape(1, -1) or Flatten - Gemm, input fixed at batch 1."""
    rng = np.random.default_rng(0)
    head = (helper.make_node("Reshape", ["g", "shape"], ["f"], name="bake") if reshape_batch
            else helper.make_node("Flatten", ["g"], ["f"], name="flat"))
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"), head,
             helper.make_node("Gemm", ["f", "F"], ["logits"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=(5, 4)).astype(np.float32), "F"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    graph = helper.make_graph(nodes, "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_dynamic_batch_when_safe_and_said_when_not(tmp_path):
    x = np.random.default_rng(3).normal(size=(3, 3, 6, 6)).astype(np.float32)
    safe = _fixed_batch_model(reshape_batch=False)
    dyn, note = make_batch_dynamic(safe)
    assert "made dynamic (was fixed at 1)" in note
    assert dyn.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert safe.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1    # the input proto is untouched
    exp = export(safe, tmp_path / "safe.onnx", ExportOptions(build=BuildOptions(layers=["r"], methods=("mwp",)),
                                                             signal="top1"))
    batched = _run(exp.model, {"x": x})
    for n in range(3):   # batch of 3 == three runs of 1
        one = _run(exp.model, {"x": x[n:n + 1]})
        np.testing.assert_array_equal(batched["classes"][n], one["classes"][0])
        np.testing.assert_allclose(batched["mwp_r"][n], one["mwp_r"][0], rtol=1e-5, atol=1e-7)
    baked = _fixed_batch_model(reshape_batch=True)
    kept, note = make_batch_dynamic(baked)
    assert "batch kept at 1" in note and "'bake'" in note and "[1, -1]" in note
    assert kept.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    exp = export(baked, tmp_path / "baked.onnx", ExportOptions(build=BuildOptions(layers=["r"], methods=("mwp",)),
                                                               triton_dir=tmp_path / "triton"))
    assert any("batch kept at 1" in n for n in exp.notes)
    assert exp.serving.inputs[0].dims[0] == 1
    assert "max_batch_size: 0" in triton_config(exp.serving, "baked")


def test_fp16_forward_maps_match_float32():
    for model, layers in (BLOCKS["resnet"](0), ZOO["inception_lrn"](1), (tiny_model(), ["r1", "x"])):
        half = forward_to_float16(model)
        types = {t.data_type for t in half.graph.initializer}
        assert TensorProto.FLOAT16 in types and half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
        shape = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = np.abs(np.random.default_rng(4).normal(size=shape)).astype(np.float32)
        full, low = Exciter(model, layers), Exciter(half, layers)
        target = full.logits(x).argmax(1)
        a, b = full.explain(x, target), low.explain(x, target)
        for method in a.maps:
            for layer in layers:
                # stated tolerance: 1% of the float32 map's largest value
                assert _rel(b.maps[method][layer], a.maps[method][layer]) < 1e-2, (method, layer)
    already = tiny_model()
    already.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    with pytest.raises(ExciteError, match="float32 models"):
        forward_to_float16(already)


def test_triton_folder_parses_with_tritons_schema_and_runs(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2   # the `serve` extra, part of `test`

    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    res = runner.invoke(app, ["export", str(path), "-l", "r1", "--signal", "topk:2",
                              "--map-size", "input", "--normalize", "max", "--serving", str(tmp_path / "repo"),
                              "--name", "tiny_excite", "--max-batch-size", "16"])
    assert res.exit_code == 0, res.output
    folder = tmp_path / "repo" / "tiny_excite"
    text = (folder / "config.pbtxt").read_text()
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.name == "tiny_excite" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert cfg.HasField("dynamic_batching")
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert [i.name for i in cfg.input] == ["x"] and list(cfg.input[0].dims) == [3, 8, 8]
    assert [o.name for o in cfg.output] == ["classes", "scores", "mwp_r1", "cmwp_r1"]
    assert list(cfg.output[2].dims) == [2, 8, 8]
    # each commented-out accelerator block is valid Triton config once uncommented
    for tag in ("[cuda-graphs]", "[tensorrt]"):
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if tag in line) + 1
        block = []
        for line in lines[start:]:
            if not line.startswith("# ") or line.startswith("# ["):
                break
            block.append(line[2:])
        opt = text_format.Parse(text + "\n".join(block) + "\n", model_config_pb2.ModelConfig())
        assert opt.HasField("optimization")
    # the model runs in plain onnxruntime with the config's names, types and dims
    np_types = {model_config_pb2.TYPE_FP32: np.float32, model_config_pb2.TYPE_INT64: np.int64}
    sess = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.random.default_rng(5).normal(size=(2, *i.dims)).astype(np_types[i.data_type]) for i in cfg.input}
    values = sess.run([o.name for o in cfg.output], feeds)
    for o, v in zip(cfg.output, values):
        assert v.dtype == np_types[o.data_type] and v.shape == (2, *o.dims), o.name


def test_top1_default_model_from_an_image_alone_equals_exciter(tmp_path):
    """The exported --signal top1 MobileNetV2 in plain onnxruntime == Exciter's maps of the top-1 class."""
    mobilenet_v2 = pytest.importorskip("onnx_excite.models.mobilenet_v2")
    try:
        path = str(mobilenet_v2.load_default_model())
    except mobilenet_v2.ModelUnavailableError as exc:
        pytest.fail(f"default model weights missing: {exc}")
    out = tmp_path / "served.onnx"
    res = runner.invoke(app, ["export", path, "-o", str(out), "-l", "features.13", "--signal", "top1"])
    assert res.exit_code == 0, res.output
    img = Image.open(SAMPLES / "dog.jpg").convert("RGB").resize((224, 224), Image.BILINEAR)
    x = ((np.asarray(img, np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    # any image size (fully convolutional): batch and spatial dims symbolic, the class dim known
    shapes = {o.name: o.shape for o in sess.get_outputs()}
    assert shapes["classes"][1] == 1 and shapes["mwp_features.13"][1] == 1
    assert all(isinstance(d, str) or d is None for d in shapes["mwp_features.13"][2:])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    ex = Exciter(path, ["features.13"], methods=("mwp", "cmwp"))
    top = int(ex.logits(x).argmax())
    assert got["classes"][0, 0] == top
    want = ex.explain(x, top)
    for method in ("mwp", "cmwp"):
        assert _rel(got[f"{method}_features.13"][0, 0], want.maps[method]["features.13"][0]) < 1e-5


def test_device_selection_says_when_cuda_is_missing(tmp_path):
    model = tiny_model()
    cpu = Exciter(model, ["r1"], device="cpu")
    assert cpu.providers == ["CPUExecutionProvider"] and not cpu.io_binding
    if "CUDAExecutionProvider" in ort.get_available_providers():   # a GPU build: CUDA really in use
        assert "CUDAExecutionProvider" in Exciter(model, ["r1"], device="cuda").providers
    else:
        with pytest.raises(DeviceUnavailableError, match="no CUDA provider"):
            Exciter(model, ["r1"], device="cuda")
        with pytest.warns(UserWarning), pytest.raises(DeviceUnavailableError, match="could not start it"):
            Exciter(model, ["r1"], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])   # ORT drops it
    with pytest.raises(ExciteError, match="unknown device"):
        Exciter(model, ["r1"], device="tpu")

    class DroppedCuda:   # what ORT does when the CUDA provider fails to start: runs on the CPU
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(DeviceUnavailableError, match="could not start it"):
        check_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], DroppedCuda())
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    res = runner.invoke(app, ["explain", str(path), str(img), "-l", "r1", "--size", "8", "-o", str(tmp_path / "o"),
                              "--device", "cpu", "--mean", "0,0,0", "--std", "1,1,1"])
    assert res.exit_code == 0, res.output
    assert "providers: CPUExecutionProvider" in res.output
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        res = runner.invoke(app, ["explain", str(path), str(img), "-l", "r1", "--device", "cuda", "-o", str(tmp_path / "o")])
        assert res.exit_code == 2 and "error: --device cuda" in res.output


def test_cuda_libraries_are_preloaded_once_quietly_and_their_failure_is_named(monkeypatch, capsys):
    """Where this onnxruntime lists CUDA, the first CUDA provider list preloads the CUDA and
    cuDNN libraries (ORT's preload_dlls: pip's nvidia-* packages, then the default paths),
    once per process and without printing (the library never prints); what it reported
    goes into the error line when a session then drops CUDA. The CPU build and
    ``--device cpu`` never call it."""
    from onnx_excite.run import devices

    calls = []

    def fake_preload():
        calls.append(1)
        print("Failed to load libcublasLt.so.13: libcublasLt.so.13: cannot open shared object file")
        print("Please follow https://onnxruntime.ai/docs/install/#cuda-and-cudnn to install CUDA.")

    monkeypatch.setattr(devices, "_preload_report", None)
    monkeypatch.setattr(ort, "preload_dlls", fake_preload, raising=False)
    assert devices.providers_for("cpu") == ["CPUExecutionProvider"] and not calls
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    for device in ("auto", "cuda", "auto"):
        assert devices.providers_for(device) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert calls == [1]
    assert capsys.readouterr().out == ""

    class DroppedCuda:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(DeviceUnavailableError, match=r"missing \(Failed to load libcublasLt\.so\.13"):
        devices.check_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], DroppedCuda())

    def broken_preload():
        raise RuntimeError("Invalid parameter of directory=x. The directory does not exist!")

    monkeypatch.setattr(devices, "_preload_report", None)
    monkeypatch.setattr(ort, "preload_dlls", broken_preload, raising=False)
    assert devices.providers_for("auto")[0] == "CUDAExecutionProvider"   # a failing preload stops nothing
    with pytest.raises(DeviceUnavailableError, match="RuntimeError: Invalid parameter"):
        devices.check_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], DroppedCuda())


def test_the_real_preload_is_quiet_on_this_build(monkeypatch, capsys):
    """The installed onnxruntime's own preload_dlls runs through `preload_cuda` without output
    and without raising (a CPU build has no CUDA version and returns at once)."""
    from onnx_excite.run import devices

    monkeypatch.setattr(devices, "_preload_report", None)
    report = devices.preload_cuda()
    assert isinstance(report, list)
    assert capsys.readouterr().out == ""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert report == []


def test_io_binding_path_equals_plain_run(monkeypatch):
    x = np.random.default_rng(6).normal(size=(4, 3, 8, 8)).astype(np.float32)
    plain = Exciter(tiny_model(), ["r1", "x"], methods=("mwp", "cmwp"), io_binding=False)
    bound = Exciter(tiny_model(), ["r1", "x"], methods=("mwp", "cmwp"), io_binding=True)
    calls = []
    real = bound.session.run_with_iobinding
    monkeypatch.setattr(bound.session, "run_with_iobinding", lambda b, *a: calls.append(b) or real(b, *a))
    y = np.random.default_rng(7).normal(size=(4, 3, 8, 8)).astype(np.float32)
    first = bound.explain(x, [0, 1, 2, 3])
    kept = first.maps["mwp"]["x"].copy()
    for batch, targets in ((y, [4, 3, 2, 1]), (x, [0, 1, 2, 3]), (y[:2], [0, 0])):   # new data, same buffers
        a, b = plain.explain(batch, targets), bound.explain(batch, targets)
        np.testing.assert_array_equal(a.logits, b.logits)
        for method in a.maps:
            for layer in a.maps[method]:
                np.testing.assert_array_equal(a.maps[method][layer], b.maps[method][layer])
    assert len(calls) == 4 and calls[0] is calls[1] is calls[2] and calls[3] is not calls[0]   # one binding per shape
    np.testing.assert_array_equal(first.maps["mwp"]["x"], kept)      # earlier results are not overwritten


def test_bench_device_reports_latency_throughput_and_providers(tmp_path):
    from onnx_excite.apps.bench_device import run_device_bench

    rows, providers = run_device_bench(tiny_model(), ["r1"], device="cpu", batches=(1, 3), runs=2, warmup=1)
    assert providers == ["CPUExecutionProvider"]
    variants = ("forward", "forward+MWP", "forward+c-MWP", "forward+MWP+c-MWP")
    assert [(r.variant, r.batch) for r in rows] == [(v, b) for b in (1, 3) for v in variants]
    for r in rows:
        assert r.median_ms > 0 and r.images_per_s == pytest.approx(r.batch / (r.median_ms / 1e3))
        assert r.peak_mib is None and r.memory_ratio is None     # memory is reported on CUDA only
    assert all(r.throughput_ratio == 1.0 for r in rows if r.variant == "forward")
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    res = runner.invoke(app, ["bench-device", str(path), "-l", "r1", "--device", "cpu", "--batch", "2", "--runs", "1"])
    assert res.exit_code == 0 and "providers: CPUExecutionProvider" in res.output, res.output
    res = runner.invoke(app, ["bench-device", str(path), "-l", "r1", "--batch", "0"])
    assert res.exit_code == 2 and "error:" in res.output
    res = runner.invoke(app, ["bench-device", str(path), "-l", "r1", "--device", "cpu", "--batch", "1", "--runs", "1",
                              "--share-adjoints", "all"])
    assert res.exit_code == 0 and "forward+MWP+c-MWP" in res.output, res.output
    res = runner.invoke(app, ["bench-device", str(path), "-l", "r1", "--share-adjoints", "some"])
    assert res.exit_code == 2 and res.output.count("error:") == 1


def test_export_cli_options_and_errors(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    before = path.read_bytes()
    for args, msg in ((["--signal", "top0"], "unknown signal"), (["--map-size", "full"], "unknown map size"),
                      (["--normalize", "l2"], "unknown normalization"), (["--resize", "nearest"], "unknown resize mode"),
                      (["--signal", "top1", "--channels"], "--channels is for the plain companion model")):
        res = runner.invoke(app, ["export", str(path), "-o", str(tmp_path / "o.onnx"), "-l", "r1", *args])
        assert res.exit_code == 2 and res.output.startswith("error: ") and msg in res.output, (args, res.output)
    res = runner.invoke(app, ["export", str(path), "-l", "r1"])
    assert res.exit_code == 2 and "give -o/--output FILE and/or --serving DIR" in res.output
    out = tmp_path / "half.onnx"
    res = runner.invoke(app, ["export", str(path), "-o", str(out), "-l", "r1", "--fp16", "--signal", "top1"])
    assert res.exit_code == 0 and "forward converted to float16" in res.output, res.output
    half = onnx.load(str(out))
    assert any(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer)
    x = np.random.default_rng(7).normal(size=(2, 3, 8, 8)).astype(np.float32)
    got = _run(half, {"x": x})
    want = Exciter(tiny_model(), ["r1"], methods=("mwp",)).explain(x, got["classes"][:, 0])
    assert _rel(got["mwp_r1"][:, 0], want.maps["mwp"]["r1"]) < 1e-2
    assert path.read_bytes() == before     # the user's model is never modified


def test_fp16_without_the_extra_names_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)   # as if not installed
    with pytest.raises(ExciteError, match=r"pip install 'onnx-excite\[fp16\]'"):
        forward_to_float16(tiny_model())


def test_serving_names_never_clash_with_the_models():
    model = tiny_model(softmax=False)
    for node in model.graph.node:            # the model already has tensors called scores / mwp_r1
        node.output[:] = ["scores" if o == "logits" else o for o in node.output]
        node.input[:] = ["scores" if i == "logits" else i for i in node.input]
    model.graph.output[0].name = "scores"
    built = build_excitation_model(model, ["r1"], methods=("mwp",))
    s = make_serving_model(built, signal="top1")
    assert s.classes == "classes" and s.scores == "scores_2"
    onnx.checker.check_model(s.model, full_check=True)
    out = _run(s.model, {"x": np.ones((1, 3, 8, 8), np.float32)})
    assert set(out) == {"classes", "scores_2", "mwp_r1"}
