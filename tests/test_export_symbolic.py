"""The exported companion model keeps every dim the original left symbolic: a
paddle2onnx-style text-direction classifier (input 3 x 48 x W, W symbolic; depthwise convs
of stride (2, 1) that halve the height and keep the width; a squeeze-excitation gate;
HardSwish) exported in every form (plain, ``--signal top1``, ``--map-size input``, the
Triton ``--serving`` folder, ``--fp16``) runs in plain onnxruntime at W = 96, 224 and 333
with finite non-zero maps, and no value_info or output of the exported file declares a
static dim that the run contradicts, or one where the original's tensor is symbolic, even
when the original carries stale static value_info written at one export width."""
import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnx_excite.cli.app import app

runner = CliRunner()
WIDTHS = (96, 224, 333)
HAS_FP16 = importlib.util.find_spec("onnxconverter_common") is not None


def text_direction_model(batch="N", stale_width=None, stale_batch=False, seed=0):
    """conv 3->16 s2 - HardSwish - 3 x [depthwise 3x3 s(2,1) - HardSwish - (SE gate on the
    second) - pointwise - HardSwish] - GAP - Gemm(2) - Softmax; value_info from ONNX shape
    inference, or, with ``stale_width``, with the W dim of every 4-D tensor written static as
    an exporter that ran at that width would (the convs keep the width after the stem); with
    ``stale_batch`` the output declared for batch 1."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def conv(x, cin, cout, s, k=3, group=1, name=""):
        w = init(f"{name}.w", rng.normal(scale=(2 / (k * k * cin / group)) ** 0.5, size=(cout, cin // group, k, k)))
        b = init(f"{name}.b", rng.normal(scale=0.1, size=cout))
        nodes.append(helper.make_node("Conv", [x, w, b], [name], name=name, pads=[k // 2] * 4, strides=list(s),
                                      kernel_shape=[k, k], group=group))
        return name

    def hswish(x, name):
        nodes.append(helper.make_node("HardSwish", [x], [name], name=name))
        return name

    x = hswish(conv("x", 3, 16, (2, 2), name="stem"), "stem.act")
    cin = 16
    for i, cout in enumerate((32, 48, 64)):
        x = hswish(conv(x, cin, cin, (2, 1), group=cin, name=f"b{i}.dw"), f"b{i}.dw.act")
        if i == 1:
            nodes.append(helper.make_node("GlobalAveragePool", [x], [f"b{i}.se.pool"], name=f"b{i}.se.pool"))
            nodes.append(helper.make_node("Relu", [conv(f"b{i}.se.pool", cin, 4, (1, 1), k=1, name=f"b{i}.se.c1")],
                                          [f"b{i}.se.r"], name=f"b{i}.se.r"))
            gate = conv(f"b{i}.se.r", 4, cin, (1, 1), k=1, name=f"b{i}.se.c2")
            nodes.append(helper.make_node("HardSigmoid", [gate], [f"b{i}.se.gate"], name=f"b{i}.se.gate",
                                          alpha=1 / 6, beta=0.5))
            nodes.append(helper.make_node("Mul", [x, f"b{i}.se.gate"], [f"b{i}.se"], name=f"b{i}.se.mul"))
            x = f"b{i}.se"
        x = hswish(conv(x, cin, cout, (1, 1), k=1, name=f"b{i}.pw"), f"b{i}.pw.act")
        cin = cout
    nodes += [helper.make_node("GlobalAveragePool", [x], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", init("fc.w", rng.normal(size=(2, cin)))], ["logits"], name="fc", transB=1),
              helper.make_node("Softmax", ["logits"], ["prob"], name="softmax")]
    graph = helper.make_graph(nodes, "textdir", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 48, "W"])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [batch, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    if stale_width:
        for vi in model.graph.value_info:
            d = vi.type.tensor_type.shape.dim
            if len(d) == 4 and not d[3].HasField("dim_value"):
                d[3].dim_value = stale_width // 2
    if stale_batch and batch == "N":       # the output declared for batch 1, the input's batch symbolic
        d = model.graph.output[0].type.tensor_type.shape.dim[0]
        d.Clear()
        d.dim_value = 1
    return model


def _dims(vi):
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _feed(session, width, batch):
    x = np.random.default_rng(width).normal(size=(batch, 3, 48, width)).astype(np.float32)
    feed = {"x": x}
    if "excite_signal" in [i.name for i in session.get_inputs()]:
        feed["excite_signal"] = np.eye(2, dtype=np.float32)[[0, 1] * batch][:batch]
    return feed


def _declared_static_dims_hold(path, batch):
    """Every value_info and output of ``path`` with a static dim, run as an output at each
    width: the dim it declares is the dim it has."""
    model = onnx.load(str(path))
    declared = {vi.name: _dims(vi) for vi in list(model.graph.value_info) + list(model.graph.output)}
    declared = {n: d for n, d in declared.items() if d is not None and any(v is not None for v in d)}
    probe = onnx.load(str(path))
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(vi for vi in probe.graph.value_info if vi.name in declared and vi.name not in present)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    for width in (WIDTHS[0], WIDTHS[-1]):
        got = dict(zip(names, sess.run(None, _feed(sess, width, batch))))
        for name, dims in declared.items():
            shape = got[name].shape
            assert len(shape) == len(dims), (name, dims, shape)
            wrong = [(i, d, s) for i, (d, s) in enumerate(zip(dims, shape)) if d is not None and d != s]
            assert not wrong, f"{name}: declares {dims}, is {shape} at W = {width}"
    return model


def _symbolic_kept(original, exported):
    """A tensor of the original (ONNX shape inference from its input alone) and of the
    exported file: no dim the original has symbolic is static in the export."""
    clean = onnx.ModelProto()
    clean.CopyFrom(original)
    del clean.graph.value_info[:]
    for o in clean.graph.output:
        o.type.tensor_type.ClearField("shape")
    clean = onnx.shape_inference.infer_shapes(clean)
    ref = {vi.name: _dims(vi) for vi in list(clean.graph.value_info) + list(clean.graph.output) + list(clean.graph.input)}
    checked = 0
    for vi in list(exported.graph.value_info) + list(exported.graph.output):
        mine, theirs = _dims(vi), ref.get(vi.name)
        if mine is None or theirs is None or len(mine) != len(theirs):
            continue
        checked += 1
        assert not [i for i, (a, b) in enumerate(zip(theirs, mine)) if a is None and b is not None], \
            f"{vi.name}: symbolic in the original {theirs}, static in the export {mine}"
    return checked


FORMS = {"plain": [], "top1": ["--signal", "top1"], "map-size input": ["--map-size", "input"], "serving": None,
         "fp16": ["--fp16"]}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("batch, stale", [("N", None), (1, "value_info"), ("N", "output")])
def test_every_export_form_runs_at_any_width(tmp_path, form, batch, stale):
    if form == "fp16" and not HAS_FP16:
        pytest.skip("the fp16 extra (onnxconverter-common) is not installed")
    original = text_direction_model(batch=batch, stale_width=224 if stale == "value_info" else None,
                                    stale_batch=stale == "output")
    src = tmp_path / "textdir.onnx"
    onnx.save(original, str(src))
    layers = ["b0.pw.act", "b2.pw.act"]        # inside the stride (2,1) stack, and the last feature map
    base = ["export", str(src), "-l", layers[0], "-l", layers[1], "-m", "mwp", "-m", "cmwp", "-m", "grad"]
    if form == "serving":
        res = runner.invoke(app, base + ["--serving", str(tmp_path / "repo"), "--name", "td"])
        path = tmp_path / "repo" / "td" / "1" / "model.onnx"
    else:
        path = tmp_path / "out.onnx"
        res = runner.invoke(app, base + ["-o", str(path)] + FORMS[form])
    assert res.exit_code == 0, res.output
    exported = _declared_static_dims_hold(path, 1 if batch == 1 else 2)
    checked = _symbolic_kept(original, exported)
    assert checked > 10 if len(exported.graph.value_info) else checked <= len(exported.graph.output)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])   # ORT's full optimisation
    n = 1 if batch == 1 else 2
    for width in WIDTHS:
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, _feed(sess, width, n))))
        maps = {k: v for k, v in outs.items() if k.split(":")[0].split("_")[0] in ("mwp", "cmwp", "grad")}
        assert len(maps) == 6, sorted(outs)
        for name, m in maps.items():
            assert np.isfinite(m).all() and np.abs(m).sum() > 0, (name, width)
            assert m.shape[0] == n
            if form == "map-size input":
                assert m.shape[-2:] == (48, width), (name, m.shape)
            else:
                assert m.shape[-1] == (width + 1) // 2, (name, m.shape)     # the width after the stem


def test_the_checks_catch_a_static_dim_written_for_one_width(tmp_path):
    """The two checks above fail on an export whose value_info pins the width (as the
    companion of a model exported at W = 224 would if its stale value_info were kept)."""
    original = text_direction_model()
    onnx.save(original, str(tmp_path / "t.onnx"))
    res = runner.invoke(app, ["export", str(tmp_path / "t.onnx"), "-l", "b0.pw.act", "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 0, res.output
    bad = onnx.load(str(tmp_path / "o.onnx"))
    vi = next(v for v in bad.graph.value_info if v.name == "b0.pw.act")
    vi.type.tensor_type.shape.dim[3].dim_value = 112
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(AssertionError, match="symbolic in the original"):
        _symbolic_kept(original, bad)
    with pytest.raises(AssertionError, match="declares"):
        _declared_static_dims_hold(tmp_path / "bad.onnx", 2)
