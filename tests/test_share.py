"""The adjoint-sharing pass (onnx_excite/share.py): a build with several methods gives the
same maps with and without the pass, the number of weighted adjoint ops drops as the
sweeps' weights say, the graph stays valid (opset / ir limits, topologically sorted, no
CUDA fallback), and the pass merges nothing that would form a cycle."""
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import cnn_gen
import netgen
import test_blocks as tb
from onnx_excite import build_excitation_model
from onnx_excite.run.cuda_coverage import check_companion
from onnx_excite.errors import ExciteError
from onnx_excite.methods import METHODS
from onnx_excite.graph.share import merge_adjoints

SETS = {"grad+deconv+guided": ("grad", "deconv", "guided"),
        "mwp+cmwp-postnorm": ("mwp", "cmwp-postnorm"),
        "all": tuple(METHODS)}
ADJOINT = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _excite_nodes(built, op_types=ADJOINT, shared=None):
    """Companion nodes of ``op_types`` (the forward model's own nodes are not counted)."""
    return [n for n in built.model.graph.node if n.op_type in op_types and n.name.startswith("excite/")
            and (shared is None or ("shared_" in n.name) == shared)]


def _run(built, x, e):
    sess = ort.InferenceSession(built.model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {built.inputs[0]: x, built.signal: e})))


def _check(model, layers, methods, x, e):
    plain = build_excitation_model(model, layers, methods=methods, share_adjoints=False)
    shared = build_excitation_model(model, layers, methods=methods, share_adjoints=True)
    onnx.checker.check_model(shared.model, full_check=True)  # also: topologically sorted
    assert shared.model.ir_version <= 10
    a, b = _run(plain, x, e), _run(shared, x, e)
    assert set(a) == set(b)
    for k in a:
        scale = max(float(np.abs(a[k]).max()), 1e-30)
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-6 * scale, err_msg=k)
    return plain, shared


def _batch_input(model, seed, batch=2):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).normal(size=(batch, *shape)).astype(np.float32)


def _signal(built, seed, batch=2):
    return np.random.default_rng(seed + 7).normal(size=(batch, built.num_classes)).astype(np.float32)


def _usable(model, layers, methods):
    """Drop methods refused at these layers (CAM off the last feature map)."""
    keep = []
    for m in methods:
        try:
            build_excitation_model(model, layers, methods=(m,), share_adjoints=False)
        except ExciteError:
            continue
        keep.append(m)
    return tuple(keep)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("which", sorted(SETS))
def test_maps_equal_without_sharing_on_random_nets(which, seed):
    if seed % 2:
        model = netgen.random_cnn(seed)
        layers = netgen.layer_names(model)[:2]
    else:
        model, layers = cnn_gen.random_cnn(seed, signed=True)
        layers = layers[:2]
    methods = _usable(model, layers, SETS[which])
    if len(methods) < 2:
        layers = [n.input[0] for n in model.graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")][:1] or layers
        methods = _usable(model, layers, SETS[which])
    x = _batch_input(model, seed)
    built = build_excitation_model(model, layers, methods=methods[:1], share_adjoints=False)
    plain, shared = _check(model, layers, methods, x, _signal(built, seed))
    assert len(_excite_nodes(shared)) <= len(_excite_nodes(plain))


@pytest.mark.parametrize("arch", sorted(tb.BLOCKS | tb.ZOO))
@pytest.mark.parametrize("which", sorted(SETS))
def test_maps_equal_without_sharing_on_zoo_blocks(arch, which):
    model, layers = (tb.BLOCKS | tb.ZOO)[arch](0)
    methods = _usable(model, layers, SETS[which])
    x = _batch_input(model, 3)
    built = build_excitation_model(model, layers, methods=methods[:1], share_adjoints=False)
    _check(model, layers, methods, x, _signal(built, 3))


def test_default_shares_only_dense_adjoints():
    """Default WEIGHT_BOUND: the sweeps' Gemm/MatMul adjoints are batched (one weight read),
    their convs are not; False shares nothing; the maps agree either way. (Two Gemms with
    a ReLU between: grad's and deconv's signals differ below it; at the top Gemm they are
    one signal, emitted once.)"""
    model, layers = cnn_gen.random_cnn(1)
    built = build_excitation_model(model, layers[:1], methods=("grad", "deconv"))
    assert {n.op_type for n in _excite_nodes(built, shared=True)} == {"Gemm"}
    assert _excite_nodes(built, ("Conv", "ConvTranspose"), shared=False)
    assert not _excite_nodes(built, ("Conv", "ConvTranspose"), shared=True)
    off = build_excitation_model(model, layers[:1], methods=("grad", "deconv"), share_adjoints=False)
    assert not _excite_nodes(off, shared=True)
    x = _batch_input(model, 2)
    e = _signal(built, 2)
    a, b = _run(built, x, e), _run(off, x, e)
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    with pytest.raises(ExciteError, match="cannot be shared"):
        build_excitation_model(model, layers[:1], methods=("grad", "deconv"), share_adjoints=("Relu",))


def test_exciter_passes_the_option_on():
    from onnx_excite import Exciter

    model, layers = cnn_gen.random_cnn(0)
    ex = Exciter(model, layers[:1], methods=("grad", "deconv"), share_adjoints=True)
    assert _excite_nodes(ex.built, shared=True)


def test_grad_deconv_guided_run_one_adjoint_per_weighted_layer():
    """grad, deconv and guided all apply W: three adjoint convs per conv layer become one.
    At the top Gemm their signal is one and the same, so its adjoint is emitted once even
    unshared."""
    model, layers = cnn_gen.random_cnn(0)
    layer = layers[0]
    methods = ("grad", "deconv", "guided")
    plain = build_excitation_model(model, [layer], methods=methods, share_adjoints=False)
    shared = build_excitation_model(model, [layer], methods=methods, share_adjoints=True)
    before = Counter(n.op_type for n in _excite_nodes(plain))
    after = Counter(n.op_type for n in _excite_nodes(shared))
    merged = _excite_nodes(shared, shared=True)
    assert merged, "nothing was shared"
    assert before["Conv"] == 3 * after["Conv"] == 3 * 2 and before["Gemm"] == after["Gemm"] == 1
    for n in merged:
        split = [m for m in shared.model.graph.node if m.op_type == "Split" and n.output[0] in m.input]
        assert len(split) == 1 and len(split[0].output) == 3


def test_mwp_and_cmwp_postnorm_share_the_adjoints():
    """cmwp-postnorm's dual sweep applies the same W'+ as MWP below the classifier."""
    model, layers = cnn_gen.random_cnn(1)
    layer = layers[0]
    methods = ("mwp", "cmwp-postnorm")
    plain = build_excitation_model(model, [layer], methods=methods, share_adjoints=False)
    shared = build_excitation_model(model, [layer], methods=methods, share_adjoints=True)
    assert _excite_nodes(shared, shared=True)
    assert len(_excite_nodes(shared)) < len(_excite_nodes(plain))


def test_shared_multi_method_model_stays_on_cuda():
    model, layers = tb.mobilenet_block(0)
    methods = _usable(model, layers, tuple(METHODS))
    built = build_excitation_model(model, layers, methods=methods, share_adjoints=True)
    assert _excite_nodes(built, shared=True)
    report = check_companion(model, layers=layers, methods=methods, share_adjoints=True)
    assert report.methods == methods and report.fallbacks == [] and report.nodes == len(built.model.graph.node)
    assert {"Split", "Concat"} <= {n.op_type for n in built.model.graph.node}
    assert 17 <= max(i.version for i in built.model.opset_import if i.domain in ("", "ai.onnx")) <= 20


def _w(name, shape, seed=0):
    return onnx.numpy_helper.from_array(np.random.default_rng(seed).normal(size=shape).astype(np.float32), name)


def test_dependent_ops_on_one_weight_are_not_merged():
    """y = W (W x) + W z: the two MatMuls with W on x's chain depend on each other (a cycle
    if merged), the one on z does not and merges with the first."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="m1"),
             helper.make_node("MatMul", ["a", "W"], ["b"], name="m2"),
             helper.make_node("MatMul", ["z", "W"], ["c"], name="m3"),
             helper.make_node("Add", ["b", "c"], ["y"], name="add")]
    counter = iter(range(10**6))
    new, removed = merge_adjoints(nodes, {"W"}.__contains__, lambda h: f"{h}_{next(counter)}")
    assert removed == 1
    graph = helper.make_graph(new, "g", [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, ["N", 4]) for t in "xz"],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], [_w("W", (4, 4))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)
    W = onnx.numpy_helper.to_array(graph.initializer[0])
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x, "z": z})
    np.testing.assert_allclose(y, x @ W @ W + z @ W, rtol=1e-5, atol=1e-5)


def test_ops_of_different_sites_are_not_merged():
    """A weight tied across two layers whose inputs differ in shape beyond axis 0: Concat
    could not stack them, so with ``site`` telling them apart nothing merges; the same
    nodes at one site (independent, equal shapes) do merge."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="m1"),
             helper.make_node("MatMul", ["z", "W"], ["c"], name="m2")]
    counter = iter(range(10**6))
    fresh = lambda h: f"{h}_{next(counter)}"  # noqa: E731
    _, removed = merge_adjoints(nodes, {"W"}.__contains__, fresh, site=lambda n: {"m1": "layer1", "m2": "layer2"}[n.name])
    assert removed == 0
    _, removed = merge_adjoints(nodes, {"W"}.__contains__, fresh, site=lambda n: "layer1")
    assert removed == 1


@pytest.mark.parametrize("choice, shared_ops", [("dense", {"Gemm"}), ("all", {"Gemm", "Conv", "ConvTranspose"}), ("none", set())])
def test_cli_share_adjoints_option(tmp_path, choice, shared_ops):
    """`export --share-adjoints` reaches the builder: dense shares the Gemm adjoints of grad and
    deconv (two Gemms with a ReLU between), all the (transposed) convolutions too, none nothing; `bench`
    takes the same values; a bad value is one error line, exit status 2."""
    from typer.testing import CliRunner

    from onnx_excite.cli.app import app

    model, layers = cnn_gen.random_cnn(1)
    src, out = tmp_path / "m.onnx", tmp_path / "e.onnx"
    onnx.save(model, str(src))
    res = CliRunner().invoke(app, ["export", str(src), "-o", str(out), "-l", layers[0], "-m", "grad", "-m", "deconv",
                                   "--share-adjoints", choice])
    assert res.exit_code == 0, res.output
    exported = onnx.load(str(out))
    merged = {n.op_type for n in exported.graph.node if n.name.startswith("excite/") and "shared_" in n.name
              and n.op_type in ADJOINT}
    assert merged == shared_ops
    res = CliRunner().invoke(app, ["bench", "tiny-cnn", "--runs", "1", "--share-adjoints", choice])
    assert res.exit_code == 0, res.output


def test_cli_share_adjoints_refuses_other_values(tmp_path):
    from typer.testing import CliRunner

    from onnx_excite.cli.app import app

    res = CliRunner().invoke(app, ["bench", "tiny-cnn", "--share-adjoints", "convs"])
    assert res.exit_code == 2 and res.output.count("error:") == 1 and "dense" in res.output
    res = CliRunner().invoke(app, ["export", "default", "-o", str(tmp_path / "x.onnx"), "--share-adjoints", "yes"])
    assert res.exit_code == 2 and res.output.count("error:") == 1 and not (tmp_path / "x.onnx").exists()
