"""Weights derived in the graph (``derive_weights``) against weights stored as initializers.

W+ = Relu(W), W- = Min(W, 0), -W, transposes, the flipped stride-1 adjoint kernel (grouped
too) and the float32 Cast of a float16 weight are computed from the model's own
initializer; ONNX Runtime folds them at session load. The maps must equal those of the
stored weights, the file must hold each weight once, and the optimised graph must not run
any derivation per call.
"""
from __future__ import annotations

import cnn_gen
import netgen
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import test_blocks as tb
from onnx import helper, numpy_helper

from onnx_excite import build_excitation_model
from onnx_excite.run.cuda_coverage import fallbacks
from onnx_excite.errors import ExciteError
from onnx_excite.graph.emitter import (
    Emitter,
    SourcedArray,
    WeightOrigin,
    derived,
    origin_of,
    source_weight,
    with_origin,
)
from onnx_excite.methods import METHODS

DERIVATION_OPS = {"Relu", "Min", "Neg", "Transpose", "Slice", "Cast", "Reshape"}


def _outputs(model, feeds, optimized_path=None):
    opts = ort.SessionOptions()
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _methods(model, layers):
    keep = []
    for m in METHODS:
        try:
            build_excitation_model(model, layers, methods=(m,), derive_weights=False)
        except ExciteError:   # refused at these layers (CAM off the last feature map)
            continue
        keep.append(m)
    return tuple(keep)


def _compare(model, layers, x, tmp_path, methods=None):
    methods = methods or _methods(model, layers)
    stored = build_excitation_model(model, layers, methods=methods, derive_weights=False)
    derived = build_excitation_model(model, layers, methods=methods, derive_weights=True)
    onnx.checker.check_model(derived.model, full_check=True)
    e = np.random.default_rng(1).normal(size=(x.shape[0], stored.num_classes)).astype(np.float32)
    feeds = {stored.inputs[0]: x, stored.signal: e}
    a = _outputs(stored.model, feeds)
    b = _outputs(derived.model, feeds, tmp_path / "optimized.onnx")
    assert set(a) == set(b)
    for k in a:
        scale = max(float(np.abs(a[k]).max()), 1e-30)
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7 * scale, err_msg=k)
    # each weight once: what the companion stores beyond the model's own initializers
    # (constants a rule computes, e.g. alpha * B of a Gemm, biases) is less than before
    def extra_bytes(built):
        own = {t.name for t in model.graph.initializer}
        return sum(len(t.raw_data) or t.ByteSize() for t in built.model.graph.initializer if t.name not in own)

    assert extra_bytes(derived) < extra_bytes(stored)
    # ONNX Runtime folded every derivation: no derivation op on a weight is left to run
    opt = onnx.load(str(tmp_path / "optimized.onnx"))
    inits = {t.name for t in opt.graph.initializer}
    produced = {o for n in opt.graph.node for o in n.output}
    on_weights = [n for n in opt.graph.node if n.op_type in DERIVATION_OPS
                  and all(i in inits or i not in produced for i in n.input if i) and n.input[0] in inits]
    assert not on_weights, [(n.op_type, n.name) for n in on_weights]
    return stored, derived


@pytest.mark.parametrize("seed", range(4))
def test_maps_equal_stored_weights_on_random_nets(seed, tmp_path):
    if seed % 2:
        model = netgen.random_cnn(seed, signed=True)
        layers = netgen.layer_names(model)[:2]
    else:
        model, layers = cnn_gen.random_cnn(seed, signed=True, groups=True)
        layers = layers[:2]
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(seed).normal(size=(2, *shape)).astype(np.float32)
    _compare(model, layers, x, tmp_path)


@pytest.mark.parametrize("arch", sorted(tb.ZOO)[:6])
def test_maps_equal_stored_weights_on_zoo_blocks(arch, tmp_path):
    model, layers = tb.ZOO[arch](0)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(3).normal(size=(2, *shape)).astype(np.float32)
    _compare(model, layers, x, tmp_path, methods=("mwp", "cmwp", "grad", "lrp-epsilon"))


def _grouped_net(dtype=np.float32):
    """Conv (groups 2, stride 1, asymmetric pads) -> Relu -> depthwise Conv -> Relu ->
    Conv (stride 2) -> GAP -> Gemm(transB=1) -> MatMul: every derivation kind."""
    rng = np.random.default_rng(5)
    w = {"w1": rng.normal(size=(8, 2, 3, 3)), "w2": rng.normal(size=(8, 1, 3, 3)), "w3": rng.normal(size=(6, 8, 3, 3)),
         "fc": rng.normal(size=(5, 6)), "mm": rng.normal(size=(5, 4))}
    inits = [numpy_helper.from_array(v.astype(dtype), k) for k, v in w.items()]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], group=2, pads=[0, 1, 2, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], group=8, pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], strides=[2, 2], kernel_shape=[3, 3]),
             helper.make_node("GlobalAveragePool", ["c3"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["h"], transB=1),
             helper.make_node("MatMul", ["h", "mm"], ["logits"])]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "grouped", [helper.make_tensor_value_info("x", elem, [None, 4, 9, 9])],
                              [helper.make_tensor_value_info("logits", elem, [None, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_grouped_depthwise_strided_gemm_matmul(tmp_path):
    model = _grouped_net()
    x = np.random.default_rng(0).normal(size=(3, 4, 9, 9)).astype(np.float32)
    _, derived = _compare(model, ["x", "r1", "r2"], x, tmp_path, methods=("mwp", "cmwp", "grad", "lrp-epsilon"))
    own = {t.name for t in model.graph.initializer}
    assert not [t.name for t in derived.model.graph.initializer if t.name not in own and np.prod(t.dims) > 64]
    ops = {n.op_type for n in derived.model.graph.node if n.name.startswith("excite/")}
    assert {"Relu", "Slice", "Transpose", "Reshape"} <= ops   # derived in the graph, not stored
    assert not fallbacks(derived.model)   # every derivation node has a CUDA kernel too


def test_float16_weights_are_cast_then_derived(tmp_path):
    model = _grouped_net(np.float16)
    x = np.random.default_rng(0).normal(size=(2, 4, 9, 9)).astype(np.float16)
    _, derived = _compare(model, ["r1"], x, tmp_path, methods=("mwp", "cmwp"))
    casts = [n for n in derived.model.graph.node if n.op_type == "Cast" and n.input[0] in {"w1", "w2", "w3", "fc", "mm"}]
    assert casts and all(helper.get_attribute_value(n.attribute[0]) == onnx.TensorProto.FLOAT for n in casts)


def test_every_gemm_reads_a_weight_of_its_own():
    """ONNX Runtime prepacks a Gemm/MatMul's constant B only where no other node reads it, so
    no two of them (forward included) share B. grad's adjoint applies W itself: derived, its B
    is the model's own initializer transposed in the graph (folded at load), not a copy.
    (lrp-epsilon is the exception: its Z and adjoint apply W itself, like the forward.)"""
    model = _grouped_net()
    for derive in (False, True):
        for methods in (("grad",), ("mwp", "cmwp"), ("grad", "deconv", "mwp"), ("lrp-zplus", "guided", "c-grad"),
                        ("cmwp-nonorm", "cmwp-postnorm", "c-deconv")):
            built = build_excitation_model(model, ["x"], methods=methods, derive_weights=derive)
            readers = [n.input[1] for n in built.model.graph.node if n.op_type in ("Gemm", "MatMul")]
            shared = {b for b in readers if readers.count(b) > 1}
            assert not shared, (derive, methods, shared)
        if derive:
            built = build_excitation_model(model, ["x"], methods=("grad",), derive_weights=True)
            producer = {o: n for n in built.model.graph.node for o in n.output}
            sources = set()
            for n in built.model.graph.node:
                if n.op_type in ("Gemm", "MatMul") and n.name.startswith("excite/"):
                    b = n.input[1]
                    while b in producer:
                        b = producer[b].input[0]
                    sources.add(b)
            assert sources == {"fc", "mm"}   # computed from the model's own, for the Gemm and the MatMul


def test_origin_follows_negation_and_nothing_else():
    w = source_weight({"w": np.arange(6, dtype=np.float16).reshape(2, 3) - 2}, "w", transposed=True)
    assert isinstance(w, SourcedArray) and w.dtype == np.float32 and w.shape == (3, 2)
    assert w.origin == WeightOrigin("w", onnx.TensorProto.FLOAT16, layout=("T",))
    assert (-w).origin == WeightOrigin("w", onnx.TensorProto.FLOAT16, negated=True, layout=("T",))
    assert (w * 2).origin is None and np.maximum(w, 0).origin is None and w[:1].origin is None
    both = np.concatenate([derived(w, np.maximum(w, 0), "W+"), derived(w, np.minimum(w, 0), "W-")], axis=1)
    assert origin_of(both) is None   # a new array a rule makes from parts: stored by content
    model = onnx.ModelProto()
    g = Emitter([], sink=model.graph.initializer)
    name = g.const(both)
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in g.initializers if t.name == name)), both)
    assert w.origin.relaid(("T",)).layout == () and w.origin.relaid(("flipT", 1, (2, 3))) is None


def test_large_constants_without_origin_are_deduplicated_by_content():
    """Equal arrays (distinct objects) share one initializer; arrays equal on the strided
    sample but not everywhere do not."""
    model = onnx.ModelProto()
    g = Emitter([], sink=model.graph.initializer)
    a = np.random.default_rng(0).normal(size=(300, 301)).astype(np.float32)
    b = a.copy()
    c = a.copy()
    c[0, 1] += 1.0   # off the sample (a stride of ~22 elements): same sample key, other content
    na, nb, nc = g.const(a), g.const(b), g.const(c)
    assert na == nb and nc != na
    kept = a.tobytes()
    del a, b   # compared against the stored bytes once the first array is gone
    assert g.const(c.copy()) == nc
    d = np.frombuffer(kept, np.float32).reshape(300, 301).copy()
    assert g.const(d) == na
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(stored[na], d)
    np.testing.assert_array_equal(stored[nc], c)
    assert len(stored) == 2
    marked = with_origin(d, WeightOrigin("w", onnx.TensorProto.FLOAT, part="W+"))
    assert g.const(marked) == g.const(with_origin(d.copy(), WeightOrigin("w", onnx.TensorProto.FLOAT, part="W+")))


def test_save_past_the_protobuf_limit_writes_external_data_afresh(tmp_path, monkeypatch):
    """Forced through the external-data path: the file loads with the same maps, saving
    twice does not grow the data file (onnx appends), and the in-memory model keeps its weights."""
    from onnx_excite.io import modelfile

    model = _grouped_net()
    built = build_excitation_model(model, ["r1"], methods=("mwp", "cmwp"))
    x = np.random.default_rng(0).normal(size=(2, 4, 9, 9)).astype(np.float32)
    e = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    feeds = {built.inputs[0]: x, built.signal: e}
    before = _outputs(built.model, feeds)
    size = built.model.ByteSize()
    monkeypatch.setattr(modelfile, "PROTOBUF_LIMIT", 64)
    out = tmp_path / "companion.onnx"
    built.save(out)
    assert built.model.ByteSize() == size  # the in-memory model is as it was
    size = (tmp_path / "companion.onnx.data").stat().st_size
    built.save(out)
    assert (tmp_path / "companion.onnx.data").stat().st_size == size > 0
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in built.model.graph.initializer)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    loaded = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    again = _outputs(built.model, feeds)
    for k in before:
        np.testing.assert_array_equal(loaded[k], before[k])
        np.testing.assert_array_equal(again[k], before[k])


def test_forward_model_without_copy_only_where_nothing_is_added():
    from onnx_excite.graph.canonicalize import canonicalize

    model = _grouped_net()
    graph = canonicalize(model)
    assert graph.forward_model(copy_model=False) is graph.model          # logits already an output
    assert graph.forward_model() is not graph.model
    inner = canonicalize(model, logits="h")                               # the logits must be added
    out = inner.forward_model(copy_model=False)
    assert out is not inner.model and "h" in {o.name for o in out.graph.output}
    assert "h" not in {o.name for o in inner.model.graph.output}


def _every_tensor_kind_model():
    """Initializers as raw_data (float32, float16, bfloat16, int64, int4, bool), as typed
    fields (float_data, string_data), as an external-data reference; a Constant node with a
    tensor, a function, metadata, doc strings."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(64, 32, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(7, 5)).astype(np.float16), "h"),
             helper.make_tensor("bf", onnx.TensorProto.BFLOAT16, [4], [1.0, 2.0, 3.0, 4.0]),
             numpy_helper.from_array(np.arange(6, dtype=np.int64), "i"),
             helper.make_tensor("q", onnx.TensorProto.INT4, [5], [1, -2, 3, -4, 5], raw=False),
             numpy_helper.from_array(np.array([True, False, True]), "b"),
             helper.make_tensor("f", onnx.TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
             helper.make_tensor("s", onnx.TensorProto.STRING, [2], [b"ab", b"c"])]
    ext = helper.make_tensor("e", onnx.TensorProto.FLOAT, [10], np.zeros(10, np.float32).tobytes(), raw=True)
    onnx.external_data_helper.set_external_data(ext, "weights.bin", offset=0, length=40)
    ext.ClearField("raw_data")
    ext.data_location = onnx.TensorProto.EXTERNAL
    inits.append(ext)
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((9, 9), np.float32))),
             helper.make_node("Add", ["w", "w"], ["y"], doc_string="twice")]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              initializer=inits, doc_string="graph doc")
    func = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, functions=[func], doc_string="d" * 300)
    helper.set_model_props(model, {"k": "v"})
    return model


@pytest.mark.parametrize("which", ["every tensor kind", "companion"])
def test_proto_size_bounds_the_serialised_size_without_serialising_the_weights(which):
    """`make_session` and `save` decide between one file and external data by `proto_size`,
    which counts a raw_data initializer from its dims instead of serialising it (upb's
    ByteSize serialises: the weights were written twice per session). It must never be
    below the true size, and stays within a few hundred bytes per initializer of it."""
    from onnx_excite.io.modelfile import proto_size

    if which == "companion":
        model = build_excitation_model(_grouped_net(), ["r1"], methods=("mwp", "cmwp")).model
    else:
        model = _every_tensor_kind_model()
    true = model.ByteSize()
    bound = proto_size(model)
    assert true <= bound <= true + 120 * (len(model.graph.initializer) + 1), (true, bound)
    assert model.ByteSize() == true  # measuring did not change the model


def test_make_session_goes_through_external_data_past_the_limit(monkeypatch):
    """Past `PROTOBUF_LIMIT` (forced low here) the session is made from a temporary file
    with external data: same outputs as from serialised bytes, the model unchanged."""
    from onnx_excite.io import modelfile
    from onnx_excite.run import runtime

    built = build_excitation_model(_grouped_net(), ["r1"], methods=("mwp",))
    x = np.random.default_rng(0).normal(size=(2, 4, 9, 9)).astype(np.float32)
    e = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    feeds = {built.inputs[0]: x, built.signal: e}
    before = runtime.make_session(built.model).run(None, feeds)
    size = built.model.ByteSize()
    monkeypatch.setattr(modelfile, "PROTOBUF_LIMIT", 64)
    after = runtime.make_session(built.model).run(None, feeds)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert built.model.ByteSize() == size
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in built.model.graph.initializer)
