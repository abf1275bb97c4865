"""Maps from the companion ONNX graph vs the independent float64 numpy reference, and invariants."""
import numpy as np
import pytest

from cnn_gen import input_shape, random_cnn
from excitation_ref import Reference
from onnx_excite import Exciter

SEEDS = range(60)


def _rel_err(got, want, scale=None):
    """Max abs error relative to the largest reference value (or to ``scale``: for
    contrastive channel sums, which cancel towards 0, the size of P itself)."""
    scale = max(np.abs(want).max(), scale or 0.0)
    return np.abs(got - want).max() / scale if scale > 0 else np.abs(got).max()


def _setup(seed, **kw):
    model, layers = random_cnn(seed, **kw)
    rng = np.random.default_rng(1000 + seed)
    x = rng.normal(size=(2,) + input_shape(model)).astype(np.float32)
    return model, layers, x, rng


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule", ["positive", "paper"])
def test_maps_match_reference(seed, rule):
    model, layers, x, rng = _setup(seed)
    if rule == "paper":
        x = np.abs(x)  # the literal rule is only well-conditioned on non-negative inputs
    ex = Exciter(model, layers, methods=("mwp", "cmwp"), rule=rule, channels=True)
    k = ex.num_classes
    signal = np.zeros((2, k), np.float32)
    signal[0, rng.integers(k)] = 1
    signal[1] = rng.random(k)
    res = ex.explain(x, signal)
    ref = Reference(model)
    want = ref.run(x, signal, layers, rule=rule)
    want_c = ref.run(x, signal, layers, rule=rule, contrastive=True)
    np.testing.assert_allclose(res.logits, want["logits"], rtol=1e-4, atol=1e-5)
    for layer in layers:
        assert _rel_err(res.maps["mwp"][layer], want["map"][layer]) <= 1e-4, (layer, "mwp")
        assert _rel_err(res.channels["mwp"][layer], want["P"][layer]) <= 1e-4, (layer, "P")
        p_scale = np.abs(want_c["P"][layer]).max()
        assert _rel_err(res.maps["cmwp"][layer], want_c["map"][layer], p_scale) <= 1e-4, (layer, "cmwp")


@pytest.mark.parametrize("seed", range(12))
def test_positive_rule_on_signed_nets_matches_float64(seed):
    """Signed activations (convs without ReLU, normalised input): the positive rule in
    float32 agrees with a float64 reference of the same rule (issue: stable rule)."""
    model, layers, x, rng = _setup(seed, signed=True)
    ex = Exciter(model, layers, methods=("mwp", "cmwp"))
    signal = np.eye(ex.num_classes, dtype=np.float32)[rng.integers(ex.num_classes, size=2)]
    res = ex.explain(x, signal)
    ref = Reference(model)
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, signal, layers, rule="positive", contrastive=contrastive)
        for layer in layers:
            got, exp = res.maps[method][layer], want["map"][layer]
            assert _rel_err(got, exp, np.abs(want["P"][layer]).max()) <= 1e-3, (layer, method)
            if exp.std() > 0 and exp.size > 4:
                assert np.corrcoef(got.ravel(), exp.ravel())[0, 1] >= 0.999


@pytest.mark.parametrize("seed", range(15))
def test_positive_equals_paper_on_relu_nets(seed):
    model, layers, x, rng = _setup(seed)
    x = np.abs(x)  # non-negative input: every linear layer sees a >= 0
    layers = [l for l in layers]
    pos = Exciter(model, layers, rule="positive").explain(x, 0)
    pap = Exciter(model, layers, rule="paper").explain(x, 0)
    for method in ("mwp", "cmwp"):
        for layer in layers:
            np.testing.assert_allclose(pos.maps[method][layer], pap.maps[method][layer], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(20))
def test_conservation_on_bias_free_nets(seed):
    """Bias-free, non-negative input: the sum of P at every layer equals the signal's sum."""
    model, layers, x, rng = _setup(seed, bias=False)
    x = np.abs(x)
    ex = Exciter(model, layers, methods=("mwp",), channels=True, diagnostics=True)
    # a class whose logit is > 0 has a positive contribution (Z > 0) in a bias-free net; a
    # class with Z == 0 legitimately loses its share at the top (tested below)
    logits = ex.logits(x)
    for _ in range(20):  # a random bias-free net can send an input to logits all <= 0: draw another input
        if (logits > 0).any():
            break
        x = np.abs(rng.normal(size=x.shape)).astype(np.float32)
        logits = ex.logits(x)
    signal = (rng.random(logits.shape) * (logits > 0)).astype(np.float32)
    assert signal.any(), "no input with a positive logit"
    res = ex.explain(x, signal)
    for layer in layers:
        total = res.channels["mwp"][layer].reshape(2, -1).sum(axis=1)
        np.testing.assert_allclose(total, signal.sum(axis=1), rtol=1e-4)
        np.testing.assert_allclose(res.lost["mwp"][layer], 0, atol=1e-4 * signal.sum())


@pytest.mark.parametrize("seed", range(10))
def test_linearity_in_the_signal(seed):
    model, layers, x, rng = _setup(seed)
    ex = Exciter(model, layers, channels=True)
    s1 = rng.random((2, ex.num_classes)).astype(np.float32)
    s2 = rng.random((2, ex.num_classes)).astype(np.float32)
    r1, r2, r12 = ex.explain(x, s1), ex.explain(x, s2), ex.explain(x, s1 + s2)
    for layer in layers:
        for method in ("mwp", "cmwp"):  # channel-resolved P is linear for both (the clip comes after)
            a, b, ab = (r.channels[method][layer] for r in (r1, r2, r12))
            assert _rel_err(ab, a + b) <= 1e-4


@pytest.mark.parametrize("seed", range(10))
def test_contrastive_is_target_minus_dual(seed):
    """c-MWP before clipping = MWP(target) - MWP(dual), the dual computed in a separate run
    with the classifier's weights negated."""
    from onnx import numpy_helper

    from onnx_excite.graph.builder import find_classifier
    from onnx_excite.graph.canonicalize import canonicalize

    model, layers, x, rng = _setup(seed)
    graph = canonicalize(model)
    clf = find_classifier(graph, set())
    below = [l for l in layers if l != graph.entry]
    ex = Exciter(model, below, methods=("mwp", "cmwp"), channels=True)
    res = ex.explain(x, 1)
    # the canonical model: canonicalization may have folded a bias Add or a BatchNorm into the
    # classifier, whose weight then exists under a new name only there
    dual_model = __import__("copy").deepcopy(graph.model)
    assert clf.input[1] in {init.name for init in dual_model.graph.initializer}
    for init in dual_model.graph.initializer:
        if init.name == clf.input[1]:
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    dual = Exciter(dual_model, below, methods=("mwp",), channels=True).explain(x, 1)
    for layer in below:
        diff = res.channels["mwp"][layer] - dual.channels["mwp"][layer]
        assert _rel_err(res.channels["cmwp"][layer], diff) <= 1e-4
        unclipped = diff.sum(axis=1) if diff.ndim >= 3 else diff
        np.testing.assert_allclose(res.maps["cmwp"][layer], np.maximum(unclipped, 0), atol=1e-5 * np.abs(unclipped).max())


def test_signal_on_a_class_without_positive_contribution_is_lost_not_nan():
    """A class whose weights are all negative has Z == 0: its share is dropped (0, not NaN)
    and the diagnostics output reports it as lost."""
    from onnx import numpy_helper

    from conftest import tiny_model

    model = tiny_model(softmax=False)
    w = numpy_helper.to_array(model.graph.initializer[1]).copy()
    w[2] = -np.abs(w[2])      # class 2: no positive weight
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(w, "W2"))
    x = np.abs(np.random.default_rng(0).normal(size=(1, 3, 8, 8))).astype(np.float32)
    ex = Exciter(model, ["x", "r1"], methods=("mwp",), diagnostics=True)
    signal = np.array([[0, 0, 1.0, 0, 0]], np.float32)
    res = ex.explain(x, signal)
    assert np.all(res.maps["mwp"]["r1"] == 0) and np.all(res.maps["mwp"]["x"] == 0)
    np.testing.assert_allclose(res.lost["mwp"]["r1"], [1.0])
    signal[0, 0] = 1.0     # add a class with positive contributions: only its mass arrives
    res = ex.explain(x, signal)
    np.testing.assert_allclose(res.lost["mwp"]["x"], [1.0], rtol=1e-5)
