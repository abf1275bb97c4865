"""The PyTorch peers of `bench --compare` (issue 13): the same weights in torch (onnx2torch),
and the peers' maps against ours, not only their timing.

* TorchRay's excitation backprop and contrastive EB at intermediate layers of ReLU nets
  equal our MWP / c-MWP (either rule: they coincide where a >= 0) to float32 precision;
  at a signed input TorchRay's rule is the paper's (Z = a W+), equal to our ``paper`` rule
  and not to ``positive``;
* zennit's ExcitationBackprop composite (``zero_params=["bias"]``) is ZPlus, our ``positive``
  rule, at every layer including the signed input, up to its 1e-6 stabiliser;
* on a residual net TorchRay (eltwise_sum: ``x_k / sum x``) equals our ``paper`` rule.
"""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnx_excite import Exciter
from onnx_excite.apps import bench_torch
from onnx_excite.apps.bench import run_bench_report
from onnx_excite.graph.canonicalize import canonicalize
from onnx_excite.models import synthetic


def _input(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ours(model, layer, x, target, rule):
    res = Exciter(model, layers=[layer], methods=("mwp", "cmwp"), rule=rule).explain(x, targets=target)
    return res.maps["mwp"][layer], res.maps["cmwp"][layer]


def _close(theirs, ours, rtol):
    """max |theirs - ours| <= rtol * max |ours| (and the map is not all zero)."""
    scale = float(np.abs(ours).max())
    assert scale > 0
    err = float(np.abs(theirs - ours).max())
    assert theirs.shape == ours.shape and err <= rtol * scale, (err, scale)


def small_vgg(seed=0):
    """conv(3->8)+b - relu - maxpool - conv(8->16)+b - relu - maxpool - flatten - fc(256->32)+b - relu -
    fc(32->10)+b: every linear layer has a bias (zennit's default ZPlus would put b+ into Z)."""
    rng = np.random.default_rng(seed)

    def init(name, shape, fan_in):
        return numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32), name)

    def bias(name, n):
        return numpy_helper.from_array(rng.uniform(-0.2, 0.2, n).astype(np.float32), name)

    inits = [init("w1", (8, 3, 3, 3), 27), bias("b1", 8), init("w2", (16, 8, 3, 3), 72), bias("b2", 16),
             init("w3", (32, 256), 256), bias("b3", 32), init("w4", (10, 32), 32), bias("b4", 10)]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["pool1", "w2", "b2"], ["conv2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
             helper.make_node("MaxPool", ["relu2"], ["pool2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["pool2"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "w3", "b3"], ["fc1"], name="fc1", transB=1),
             helper.make_node("Relu", ["fc1"], ["relu3"], name="relu3"),
             helper.make_node("Gemm", ["relu3", "w4", "b4"], ["logits"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "small_vgg", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def residual_net(seed=0, relu_before_add=False):
    """conv(3->8) - relu (= stem) - [conv(8->8) - relu - conv(8->8) (- relu)] + stem - relu - GAP - fc(10)."""
    rng = np.random.default_rng(seed)
    w = lambda name, shape, s=1.0: numpy_helper.from_array(  # noqa: E731
        (rng.standard_normal(shape) * s / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)
    inits = [w("w1", (8, 3, 3, 3)), w("w2", (8, 8, 3, 3)), w("w3", (8, 8, 3, 3), 0.5), w("fc", (10, 8))]
    h = "h_relu" if relu_before_add else "h"
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="c1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["stem"], name="stem"),
             helper.make_node("Conv", ["stem", "w2"], ["c2"], name="c2", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
             helper.make_node("Conv", ["r2", "w3"], ["h"], name="c3", kernel_shape=[3, 3], pads=[1] * 4)]
    if relu_before_add:
        nodes.append(helper.make_node("Relu", ["h"], ["h_relu"], name="h_relu"))
    nodes += [helper.make_node("Add", [h, "stem"], ["add"], name="add"),
              helper.make_node("Relu", ["add"], ["block"], name="block"),
              helper.make_node("GlobalAveragePool", ["block"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
              helper.make_node("Gemm", ["flat", "fc"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("rule", ["positive", "paper"])
@pytest.mark.parametrize("name, layers, shape", [("tiny-cnn", ["pool1", "relu2"], (2, 3, 32, 32)),
                                                 ("small-vgg", ["pool1", "relu2", "pool2"], (2, 3, 16, 16))])
def test_torchray_equals_ours_at_intermediate_layers(name, layers, shape, rule):
    model = synthetic.tiny_cnn() if name == "tiny-cnn" else small_vgg()
    peer = bench_torch.torch_peer(canonicalize(model))
    x = _input(shape)
    for target in (3, 7):
        for layer in layers:
            mwp, cmwp = _ours(model, layer, x, target, rule)
            _close(bench_torch.torchray_eb(peer, torch.from_numpy(x), target, layer), mwp, 1e-5)
            # TorchRay's contrastive EB: the negated classifier's P subtracted at the classifier's input,
            # propagated, channel sum clipped at 0: our c-MWP, no normalisation on either side
            _close(bench_torch.torchray_eb(peer, torch.from_numpy(x), target, layer, contrastive=True), cmwp, 1e-5)


def test_torchray_at_the_signed_input_is_the_paper_rule():
    model = small_vgg()
    peer = bench_torch.torch_peer(canonicalize(model))
    x = _input((2, 3, 16, 16))
    theirs = bench_torch.torchray_eb(peer, torch.from_numpy(x), 4, "input")
    paper, _ = _ours(model, "input", x, 4, "paper")
    positive, _ = _ours(model, "input", x, 4, "positive")
    _close(theirs, paper, 1e-3)   # Z = a W+ over signed pixels: small Z amplify float32 rounding
    assert np.abs(theirs - positive).max() > 0.1 * np.abs(positive).max()


@pytest.mark.parametrize("name, layers, shape", [("tiny-cnn", ["input", "pool1", "relu2"], (2, 3, 32, 32)),
                                                 ("small-vgg", ["input", "pool1", "pool2"], (2, 3, 16, 16))])
def test_zennit_excitation_backprop_is_our_positive_rule(name, layers, shape):
    model = synthetic.tiny_cnn() if name == "tiny-cnn" else small_vgg()
    peer = bench_torch.torch_peer(canonicalize(model))
    x = _input(shape)
    for layer in layers:
        mwp, _ = _ours(model, layer, x, 5, "positive")
        # ZPlus: Z = a+ W+ + a- W- (bias kept out), R / (Z + 1e-6 sign Z): our positive rule up to that stabiliser
        _close(bench_torch.zennit_eb(peer, torch.from_numpy(x), 5, layer), mwp, 1e-4)
        # with a negligible stabiliser, float32 precision
        _close(bench_torch.zennit_eb(peer, torch.from_numpy(x), 5, layer, stabilizer=1e-30), mwp, 1e-5)


def test_residual_sums_reach_the_peers_rules():
    """TorchRay's eltwise_sum (x_k / sum x) and the paper rule everywhere: our ``paper`` rule
    below a residual Add with a signed summand; zennit (ZPlus + Norm at the sum) equals our
    rules where both summands are >= 0 (a ReLU before the Add), where all rules agree (and
    TorchRay gives NaN where both summands are 0)."""
    x = _input((2, 3, 12, 12))
    signed = residual_net()
    peer = bench_torch.torch_peer(canonicalize(signed))
    assert len(peer.sums) == 1
    mwp, _ = _ours(signed, "stem", x, 2, "paper")
    _close(bench_torch.torchray_eb(peer, torch.from_numpy(x), 2, "stem"), mwp, 1e-5)
    nonneg = residual_net(relu_before_add=True)
    peer = bench_torch.torch_peer(canonicalize(nonneg))
    mwp, _ = _ours(nonneg, "stem", x, 2, "positive")
    _close(bench_torch.zennit_eb(peer, torch.from_numpy(x), 2, "stem", stabilizer=1e-30), mwp, 1e-5)
    # where both summands are 0 TorchRay's eltwise_sum divides 0 by 0 (no stabiliser): NaN spreads below
    # the sum; our safe division gives 0 there
    assert np.isnan(bench_torch.torchray_eb(peer, torch.from_numpy(x), 2, "stem")).any() and np.isfinite(mwp).all()


@pytest.mark.parametrize("recipe, sums", [("resnet50-random", 16), ("mobilenetv2-random", 10)])
def test_converted_recipes_keep_the_weights(recipe, sums):
    """The torch model computes the ORT forward's logits (same weights); residual Adds and the global
    average pool are the swapped modules, and every mode of the sums computes a + b."""
    from onnx_excite.run.runtime import make_session

    forward = canonicalize(synthetic.RECIPES[recipe]())
    peer = bench_torch.torch_peer(forward)
    assert len(peer.sums) == sums
    assert sum(type(m).__name__ == "AdaptiveAvgPool2d" for m in peer.module.modules()) == 1
    x = _input((1, 3, 64, 64))
    session = make_session(forward.forward_model())
    ort_logits = session.run([forward.entry], {session.get_inputs()[0].name: x})[0]
    for mode in ("plain", "torchray", "zennit"):
        peer.set_sum_mode(mode)
        with torch.inference_mode():
            logits = peer.module(torch.from_numpy(x)).numpy()
        _close(logits, ort_logits, 1e-4)
    peer.set_sum_mode("plain")
    assert peer.module_for(synthetic.RECIPE_LAYERS[recipe][0]).startswith("net.")


def test_bench_report_with_peers():
    report = run_bench_report("tiny-cnn", ["pool1"], runs=1, warmup=1, peers=("torchray", "zennit"))
    peers = report.peers
    assert [(r.library, r.name) for r in peers.rows] == [
        ("torch", "forward"), ("TorchRay", "excitation backprop"), ("TorchRay", "contrastive EB"),
        ("zennit", "ExcitationBackprop composite")]
    assert peers.rows[0].ratio == 1.0 and all(r.median_ms > 0 for r in peers.rows)
    assert peers.layer == "pool1" and report.options["intra_op_num_threads"] == peers.threads >= 1
    assert set(peers.versions) == {"torch", "onnx2torch", "torchray", "zennit"}
    assert torch.get_num_threads() >= 1


def test_bench_cli_compare():
    from onnx_excite.cli.app import app

    res = CliRunner().invoke(app, ["bench", "tiny-cnn", "--runs", "1", "--compare", "torchray", "--compare", "zennit"])
    assert res.exit_code == 0, res.output
    assert "PyTorch peers" in res.output and "contrastive EB" in res.output and "ExcitationBackprop" in res.output
    assert "(= ORT's intra-op threads)" in res.output


def test_bench_cli_compare_errors(monkeypatch):
    from onnx_excite.cli.app import app

    res = CliRunner().invoke(app, ["bench", "tiny-cnn", "--runs", "1", "--compare", "captum"])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "error: unknown --compare 'captum': expected one of torchray, zennit"]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchray" else real(name, *a))
    res = CliRunner().invoke(app, ["bench", "tiny-cnn", "--runs", "1", "--compare", "torchray"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --compare torchray needs torchray") \
        and "onnx-excite[bench]" in lines[0]
