"""Self-checks of the float64 reference (tests/reference.py) and the net generator
(tests/netgen.py): forward vs onnxruntime, conservation, linearity, hand-computed MaxPool
routing, brute-force dense rules, positive == paper on non-negative activations."""
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from netgen import features, input_shape, layer_names, num_classes, random_cnn, random_input
from reference import excitation_reference, explicit_linear_rule, forward_reference

FWD_SEEDS = range(30)


def _fwd_opts(seed):
    return [{}, {"bias": False, "signed": True}, {"residual": True, "signed": True}][seed % 3]


def _session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _with_outputs(model, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    return m


def _signal(rng, n, k, nonneg=True):
    s = rng.random((n, k)) if nonneg else rng.normal(size=(n, k))
    s[0] = 0.0
    s[0, rng.integers(k)] = 1.0  # one-hot row
    return s


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


# ------------------------------------------------------------------------------ (1) forward

@pytest.mark.parametrize("seed", FWD_SEEDS)
def test_forward_matches_onnxruntime(seed):
    model = random_cnn(seed, **_fwd_opts(seed))
    onnx.checker.check_model(model, full_check=True)
    layers = layer_names(model, spatial_only=False)
    logits_out = model.graph.output[0].name
    extra = [n for n in layers[1:]] + (["logits"] if logits_out != "logits" else [])
    sess = _session(_with_outputs(model, extra))
    x = random_input(model, batch=3, seed=seed, nonneg=False)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    ref = forward_reference(model, x)
    res = excitation_reference(model, x, np.zeros((3, num_classes(model))), [])
    np.testing.assert_allclose(res["logits"], got["logits"], rtol=1e-4,
                               atol=1e-4 * np.abs(got["logits"]).max())
    for name, arr in got.items():
        assert ref[name].shape == arr.shape, name
        np.testing.assert_allclose(ref[name], arr, rtol=1e-4, atol=1e-4 * max(1e-3, np.abs(arr).max()),
                                   err_msg=name)


_CEIL_CASES = [(k, st, pads) for k, st in ((2, 2), (3, 2), (3, 3), (2, 3))
               for pads in ([0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 1])]


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool0", "AveragePool1"])
def test_ceil_mode_pools_match_onnxruntime(op):
    """ceil_mode incl. the cases random_cnn avoids (a last window that would start in the end
    padding is dropped; count_include_pad counts input + declared pads only)."""
    x = np.random.default_rng(0).normal(size=(1, 2, 5, 7)).astype(np.float32)
    for k, st, pads in _CEIL_CASES:
        attrs = dict(kernel_shape=[k, k], strides=[st, st], pads=pads, ceil_mode=1)
        if op != "MaxPool":
            attrs["count_include_pad"] = int(op[-1])
        node = helper.make_node(op.rstrip("01"), ["input"], ["y"], name="pool", **attrs)
        g = helper.make_graph([node], "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        got = _session(m).run(None, {"input": x})[0]
        want = forward_reference(m, x)["y"]
        assert want.shape == got.shape, (k, st, pads)
        np.testing.assert_allclose(want, got, rtol=1e-5, atol=1e-6, err_msg=str((k, st, pads)))


def test_generator_covers_the_features():
    seen = set()
    for seed in FWD_SEEDS:
        seen |= features(random_cnn(seed, **_fwd_opts(seed)))
    want = {"conv_k1", "conv_k3", "conv_k5", "conv_s2", "conv_d2", "conv_asym_pads",
            "maxpool_ceil1", "maxpool_pads", "avgpool_ceil1", "avgpool_cip0", "avgpool_cip1", "avgpool_pads",
            "head_flatten_gemm", "head_gap_gemm", "head_matmul", "gemm_transB0", "gemm_transB1",
            "gemm_alpha", "hidden", "softmax", "signed", "residual"}
    assert want <= seen, want - seen
    assert {"dropout", "identity"} & seen


def test_generator_options_and_names():
    for seed in range(10):
        m = random_cnn(seed, bias=False, softmax=True, allow_maxpool=False, allow_avgpool=False)
        ops = [n.op_type for n in m.graph.node]
        assert "MaxPool" not in ops and "AveragePool" not in ops and ops[-1] == "Softmax"
        assert all(len(n.input) == 2 for n in m.graph.node if n.op_type in ("Conv", "Gemm"))
        assert not any(n.op_type == "Add" for n in m.graph.node)
        names = [n.name for n in m.graph.node]
        assert len(set(names)) == len(names) and all(n.name == n.output[0] for n in m.graph.node)
        assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
        c, h, w = input_shape(m)
        assert 1 <= c <= 4 and 8 <= h <= 24 and 8 <= w <= 24
        assert 3 <= num_classes(m) <= 10
        layers = layer_names(m)
        assert layers[0] == "input" and all(l.startswith(("conv", "relu", "gap")) for l in layers[1:])
    m = random_cnn(0, head="matmul", bias=True, softmax=False)
    assert [n.op_type for n in m.graph.node][-2:] == ["MatMul", "Add"] and m.graph.output[0].name == "logits"


def _entering_mass(model, x, s, sign=1.0):
    """Signal mass that enters the net below the logits: sum_k s_k over logits with
    Z_k = sum_j a_j W+_jk != 0 (a logit whose active inputs all have W <= 0 routes nothing);
    sign=-1: the same for the contrastive dual (classifier weights negated).
    Computed here straight from the classifier's initializer, not through the reference."""
    nodes = {n.name: n for n in model.graph.node}
    clf = nodes["logits"] if nodes["logits"].op_type in ("Gemm", "MatMul") else nodes["fc"]
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    w = inits[clf.input[1]]
    at = {a.name: helper.get_attribute_value(a) for a in clf.attribute}
    if at.get("transB", 0):
        w = w.T
    w = sign * at.get("alpha", 1.0) * w
    a = forward_reference(model, x)[clf.input[0]]
    z = a @ np.maximum(w, 0)
    return (s * (z != 0)).sum(axis=1)


def _conservation_case(seed):
    """A bias-free net with non-negative input and signal, and the mass entering at the classifier."""
    model = random_cnn(seed, bias=False, signed=False, residual=seed % 4 == 0)
    rng = np.random.default_rng(seed)
    x = random_input(model, batch=2, seed=seed, nonneg=True)
    s = _signal(rng, 2, num_classes(model), nonneg=True)
    return model, x, s, _entering_mass(model, x, s)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("rule", ["positive", "paper"])
def test_conservation(seed, rule):
    model, x, s, mass = _conservation_case(seed)
    # every layer on the main path is a cut of the graph; the inside of a residual branch
    # (res{i}a, res{i}a_relu, res{i}b) only carries part of the mass
    layers = [l for l in layer_names(model, spatial_only=False) + ["flatten"]
              if not re.match(r"res\d+[ab]", l)]
    res = excitation_reference(model, x, s, layers, rule=rule)
    for layer in layers:
        p = res["P"][layer]
        assert p.shape == forward_reference(model, x)[layer].shape
        total = p.reshape(2, -1).sum(axis=1)
        np.testing.assert_allclose(total, mass, rtol=1e-6, err_msg=layer)
    # contrastive: target and dual both conserve, so their difference sums to 0
    resc = excitation_reference(model, x, s, layers, rule=rule, contrastive=True)
    want = mass - _entering_mass(model, x, s, sign=-1.0)
    for layer in layers:
        if resc["P"][layer].ndim < 4:
            continue  # the hidden fc / flatten may sit above the classifier's input
        p = resc["P"][layer].reshape(2, -1)
        err = np.abs(p.sum(axis=1) - want).max()
        assert err <= 1e-6 * np.abs(p).sum(axis=1).max() + 1e-12, layer
        np.testing.assert_array_equal(resc["map"][layer], np.maximum(resc["map_unclipped"][layer], 0))


def test_conservation_mostly_without_lost_mass():
    """The nets of test_conservation mostly route the whole signal (no Z_k == 0 logit)."""
    lost = {}
    for seed in range(12):
        _, _, s, mass = _conservation_case(seed)
        lost[seed] = not np.allclose(mass, s.sum(axis=1), rtol=1e-12)
    assert sum(lost.values()) <= 4, lost


def test_conservation_detects_a_broken_rule():
    """The conservation check fails when the routing is perturbed (guards the test itself)."""
    model = random_cnn(1, bias=False)
    x = random_input(model, 2, 1)
    s = _signal(np.random.default_rng(0), 2, num_classes(model))
    mass = _entering_mass(model, x, s).sum()
    p = excitation_reference(model, x, s, ["input"])["P"]["input"]
    assert abs(p.sum() - mass) < 1e-6 * mass
    assert abs((p * 1.001).sum() - mass) > 1e-6 * mass


# ------------------------------------------------------------------------ (3) linearity

@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("rule", ["positive", "paper"])
@pytest.mark.parametrize("contrastive", [False, True])
def test_linearity_in_signal(seed, rule, contrastive):
    model = random_cnn(100 + seed, signed=True, residual=seed % 2 == 1)
    layers = layer_names(model, spatial_only=False)
    rng = np.random.default_rng(seed)
    x = random_input(model, 2, seed, nonneg=False)
    k = num_classes(model)
    s1, s2 = _signal(rng, 2, k, nonneg=False), _signal(rng, 2, k, nonneg=False)
    a, b = 1.7, -0.6
    r1 = excitation_reference(model, x, s1, layers, rule, contrastive)["P"]
    r2 = excitation_reference(model, x, s2, layers, rule, contrastive)["P"]
    r12 = excitation_reference(model, x, a * s1 + b * s2, layers, rule, contrastive)["P"]
    for layer in layers:
        want = a * r1[layer] + b * r2[layer]
        scale = max(np.abs(want).max(), np.abs(r1[layer]).max(), 1e-30)
        assert np.abs(r12[layer] - want).max() <= 1e-9 * scale, layer


# ------------------------------------------------------------ (4) MaxPool by hand

def test_maxpool_routing_by_hand():
    """1x1x4x4, MaxPool 3x3 stride 2 pads 1 -> 2x2 windows overlapping on row/col 1;
    ties go to the first maximum in row-major scan order; overlaps accumulate."""
    x = np.array([[1, 5, 2, 0],
                  [3, 5, 9, 4],
                  [7, 0, 6, 8],
                  [2, 9, 1, 9]], np.float32).reshape(1, 1, 4, 4)
    model = _model(
        [helper.make_node("MaxPool", ["input"], ["pool"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                          pads=[1, 1, 1, 1]),
         helper.make_node("Flatten", ["pool"], ["logits"], name="flatten")],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    # windows: (0,0) rows/cols 0..1 -> max 5, tie (0,1)/(1,1) -> (0,1)
    #          (0,1) rows 0..1, cols 1..3 -> 9 at (1,2)
    #          (1,0) rows 1..3, cols 0..1 -> 9 at (3,1)
    #          (1,1) rows 1..3, cols 1..3 -> 9 at (1,2) (ties (3,1), (3,3) come later)
    np.testing.assert_array_equal(forward_reference(model, x)["pool"].ravel(), [5, 9, 9, 9])
    np.testing.assert_array_equal(_session(model).run(None, {"input": x})[0].ravel(), [5, 9, 9, 9])
    want = np.zeros((4, 4))
    want[0, 1] = 1.0
    want[1, 2] = 2.0 + 4.0
    want[3, 1] = 3.0
    for rule in ("positive", "paper"):
        res = excitation_reference(model, x, np.array([[1.0, 2.0, 3.0, 4.0]]), ["input", "pool"], rule=rule)
        np.testing.assert_array_equal(res["P"]["input"][0, 0], want)
        np.testing.assert_array_equal(res["map"]["input"][0], want)
        np.testing.assert_array_equal(res["P"]["pool"].ravel(), [1, 2, 3, 4])


def test_avgpool_by_hand():
    """AveragePool 2x2 s1 pads [1,1,0,0]: P_in[j] = a_j sum_i P_i / S_i over real elements,
    the same for count_include_pad 0 and 1."""
    x = np.array([[1, 2], [3, 4]], np.float32).reshape(1, 1, 2, 2)
    for cip in (0, 1):
        model = _model(
            [helper.make_node("AveragePool", ["input"], ["pool"], name="pool", kernel_shape=[2, 2],
                              pads=[1, 1, 0, 0], count_include_pad=cip),
             helper.make_node("Flatten", ["pool"], ["logits"], name="flatten")],
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 2, 2])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
        np.testing.assert_allclose(forward_reference(model, x)["logits"], _session(model).run(None, {"input": x})[0],
                                   rtol=1e-6)
        p = np.array([[1.0, 2.0, 3.0, 4.0]])
        # window sums: (0,0)={1}:1, (0,1)={1,2}:3, (1,0)={1,3}:4, (1,1)={1,2,3,4}:10
        r = [1 / 1, 2 / 3, 3 / 4, 4 / 10]
        want = np.array([[1 * (r[0] + r[1] + r[2] + r[3]), 2 * (r[1] + r[3])],
                         [3 * (r[2] + r[3]), 4 * r[3]]])
        got = excitation_reference(model, x, p, ["input"])["P"]["input"][0, 0]
        np.testing.assert_allclose(got, want, rtol=1e-12)


# ------------------------------------------------ brute force: the layer rules as dense maps

def _dense_matrix(model, in_shape):
    """The bias-free single-layer model as a dense (J, I) matrix, from forward on basis vectors."""
    J = int(np.prod(in_shape))
    eye = np.eye(J).reshape((J,) + tuple(in_shape))
    return forward_reference(model, eye)["logits"]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rule", ["positive", "paper"])
def test_conv_rule_equals_brute_force(seed, rule):
    rng = np.random.default_rng(seed)
    while True:
        c, h, w = int(rng.integers(1, 4)), int(rng.integers(4, 8)), int(rng.integers(4, 8))
        k = int(rng.choice([1, 2, 3]))
        s, d = int(rng.choice([1, 2])), int(rng.choice([1, 2])) if k > 1 else 1
        pads = [int(v) for v in rng.integers(0, 3, size=4)]
        if min(h + pads[0] + pads[2], w + pads[1] + pads[3]) >= d * (k - 1) + 1:
            break
    m, group = (c * 2, c) if seed % 3 == 2 else (int(rng.integers(1, 5)), 1)
    wt = rng.normal(size=(m, c // group, k, k)).astype(np.float32)
    model = _model(
        [helper.make_node("Conv", ["input", "W"], ["conv"], name="conv", kernel_shape=[k, k], strides=[s, s],
                          dilations=[d, d], pads=pads, group=group),
         helper.make_node("Flatten", ["conv"], ["logits"], name="flatten")],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", None])],
        [numpy_helper.from_array(wt, "W")])
    x = rng.normal(size=(2, c, h, w))  # signed: both halves of the positive rule, literal paper rule
    got_fwd = _session(model).run(None, {"input": x.astype(np.float32)})[0]
    dense = _dense_matrix(model, (c, h, w))
    np.testing.assert_allclose(x.reshape(2, -1) @ dense, got_fwd, rtol=1e-4, atol=1e-4)
    sig = rng.normal(size=got_fwd.shape)
    got = excitation_reference(model, x, sig, ["input"], rule=rule)["P"]["input"].reshape(2, -1)
    want = explicit_linear_rule(x.reshape(2, -1), dense, sig, rule)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


_POOLS = [
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1, count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[1, 1], pads=[0, 1, 1, 0], count_include_pad=0)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=0)),
    ("GlobalAveragePool", {}),
]


@pytest.mark.parametrize("case", range(len(_POOLS)))
@pytest.mark.parametrize("rule", ["positive", "paper"])
def test_avgpool_rule_equals_brute_force(case, rule):
    """Average pools = linear layers with weight 1 on every real element of a window."""
    op, attrs = _POOLS[case]
    c, h, w = 2, 6, 7
    model = _model(
        [helper.make_node(op, ["input"], ["pool"], name="pool", **attrs),
         helper.make_node("Flatten", ["pool"], ["logits"], name="flatten")],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", None])])
    member = (_dense_matrix(model, (c, h, w)) > 0).astype(np.float64)
    rng = np.random.default_rng(case)
    x = rng.normal(size=(2, c, h, w)) + 0.3
    sig = rng.normal(size=(2, member.shape[1]))
    got = excitation_reference(model, x, sig, ["input"], rule=rule)["P"]["input"].reshape(2, -1)
    want = explicit_linear_rule(x.reshape(2, -1), member, sig, rule)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("rule", ["positive", "paper"])
def test_add_of_two_tensors_by_hand(rule):
    model = _model(
        [helper.make_node("Add", ["x1", "x2"], ["logits"], name="add")],
        [helper.make_tensor_value_info("x1", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])])
    x1 = np.array([[1.0, -1.0, 2.0, 0.0]])
    x2 = np.array([[3.0, 2.0, -2.0, 0.0]])
    p = np.array([[4.0, 3.0, 1.0, 5.0]])
    res = excitation_reference(model, {"x1": x1, "x2": x2}, p, ["x1", "x2"], rule=rule)["P"]
    if rule == "positive":  # x+ / (x1+ + x2+)
        w1, w2 = [[1.0, 0.0, 1.0, 0.0]], [[3.0, 3.0, 0.0, 0.0]]
    else:  # x / (x1 + x2); denominator 0 in column 2 and 3 -> 0
        w1, w2 = [[1.0, -3.0, 0.0, 0.0]], [[3.0, 6.0, 0.0, 0.0]]
    np.testing.assert_allclose(res["x1"], w1, rtol=1e-12)
    np.testing.assert_allclose(res["x2"], w2, rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, -0.5])
@pytest.mark.parametrize("rule", ["positive", "paper"])
def test_gemm_rule_equals_brute_force(rule, alpha):
    rng = np.random.default_rng(7)
    a = rng.normal(size=(5, 3))  # transA: the activation is (J=5, N=3)
    b = rng.normal(size=(4, 5)).astype(np.float32)  # transB: (I, J)
    model = _model(
        [helper.make_node("Gemm", ["input", "B"], ["logits"], name="fc", transA=1, transB=1, alpha=alpha)],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [5, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(b, "B")])
    x = a
    sig = rng.normal(size=(3, 4))
    np.testing.assert_allclose(forward_reference(model, x)["logits"],
                               _session(model).run(None, {"input": x.astype(np.float32)})[0], rtol=1e-5)
    got = excitation_reference(model, x, sig, ["input"], rule=rule)["P"]["input"]
    want = explicit_linear_rule(x.T, alpha * b.T.astype(np.float64), sig, rule).T
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    # contrastive at the classifier: target minus dual (weights negated)
    gotc = excitation_reference(model, x, sig, ["input"], rule=rule, contrastive=True)["P"]["input"]
    wantc = want - explicit_linear_rule(x.T, -alpha * b.T.astype(np.float64), sig, rule).T
    np.testing.assert_allclose(gotc, wantc, rtol=1e-10, atol=1e-14)


def test_reshape_constant_matmul_head():
    """Reshape (shape from a Constant node) + MatMul + Add(bias) head, vs ORT and vs Flatten."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2 * 3 * 3, 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    model = _model(
        [helper.make_node("Constant", [], ["shape"], name="shape",
                          value=numpy_helper.from_array(np.array([0, -1], np.int64))),
         helper.make_node("Relu", ["input"], ["relu"], name="relu"),
         helper.make_node("Reshape", ["relu", "shape"], ["flat"], name="reshape"),
         helper.make_node("MatMul", ["flat", "W"], ["mm"], name="fc"),
         helper.make_node("Add", ["mm", "b"], ["logits"], name="bias"),
         helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=-1)],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "b")])
    x = rng.normal(size=(2, 2, 3, 3))
    np.testing.assert_allclose(forward_reference(model, x)["prob"],
                               _session(model).run(None, {"input": x.astype(np.float32)})[0], rtol=1e-5)
    sig = rng.normal(size=(2, 4))
    for rule in ("positive", "paper"):
        res = excitation_reference(model, x, sig, ["relu", "flat"], rule=rule, contrastive=True)
        a = np.maximum(x, 0).reshape(2, -1)
        want = (explicit_linear_rule(a, w.astype(np.float64), sig, rule)
                - explicit_linear_rule(a, -w.astype(np.float64), sig, rule))
        np.testing.assert_allclose(res["P"]["flat"], want, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(res["P"]["relu"], want.reshape(2, 2, 3, 3), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(res["map"]["relu"], np.maximum(res["P"]["relu"].sum(1), 0), rtol=0, atol=0)
        assert (res["map_unclipped"]["relu"] < 0).any() and (res["map"]["relu"] >= 0).all()
        np.testing.assert_array_equal(res["map_unclipped"]["flat"], res["P"]["flat"])


def test_zero_denominator_contributes_nothing():
    """Z_i == 0 (all inputs 0) routes nothing: no NaN/Inf, P at the input is 0."""
    model = random_cnn(3, bias=False)
    x = np.zeros((1,) + input_shape(model), np.float32)
    s = np.ones((1, num_classes(model)))
    for rule in ("positive", "paper"):
        res = excitation_reference(model, x, s, layer_names(model), rule=rule, contrastive=True)
        for p in res["P"].values():
            assert np.isfinite(p).all() and not p.any()


# ------------------------------------------------------------ (5) positive == paper

@pytest.mark.parametrize("seed", range(10))
def test_positive_equals_paper_without_signed_activations(seed):
    model = random_cnn(200 + seed, signed=False, residual=seed % 3 == 0)
    layers = layer_names(model, spatial_only=False)
    rng = np.random.default_rng(seed)
    x = random_input(model, 2, seed, nonneg=True)
    s = _signal(rng, 2, num_classes(model), nonneg=False)
    for contrastive in (False, True):
        pos = excitation_reference(model, x, s, layers, "positive", contrastive)
        pap = excitation_reference(model, x, s, layers, "paper", contrastive)
        for layer in layers:
            np.testing.assert_allclose(pos["P"][layer], pap["P"][layer], rtol=1e-9,
                                       atol=1e-12 * np.abs(pap["P"][layer]).max(), err_msg=layer)


def test_positive_differs_from_paper_on_signed_activations():
    """...and the comparison does see a difference when activations are signed."""
    differs = 0
    for seed in range(5):
        model = random_cnn(300 + seed, signed=True)
        x = random_input(model, 2, seed, nonneg=False)  # signed input: the first conv sees a < 0
        s = _signal(np.random.default_rng(seed), 2, num_classes(model))
        pos = excitation_reference(model, x, s, ["input"], "positive")["P"]["input"]
        pap = excitation_reference(model, x, s, ["input"], "paper")["P"]["input"]
        differs += not np.allclose(pos, pap, rtol=1e-6, atol=1e-9)
    assert differs >= 4
