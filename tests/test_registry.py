"""The rule registry is the single source for an op: its declarations drive the builder and
the non-negativity prover, the op table of docs/rules.md is generated from it, and every registered
op has a branch in the float64 reference (tests/excitation_ref.py, "the" reference for
every op; tests/reference.py cross-checks a core subset)."""
import ast
import pkgutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_excite.rules as rules_pkg
from excitation_ref import Reference
from onnx_excite import Exciter
from onnx_excite.graph.canonicalize import canonicalize
from onnx_excite.optable import main as optable_main
from onnx_excite.optable import render
from onnx_excite.rules import OPS, RULES, data_inputs, proves_nonneg, register

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def reference_branches(path: Path, method: str) -> set[str]:
    """Op types that ``Reference.<method>`` handles: the strings compared with ``op``."""
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Reference")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == method)
    ops = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "op":
            for comp in node.comparators:
                for c in ast.walk(comp):
                    if isinstance(c, ast.Constant) and isinstance(c.value, str):
                        ops.add(c.value)
    return ops


def test_every_registered_op_has_a_reference_branch():
    ref = TESTS / "excitation_ref.py"
    forward, excite = reference_branches(ref, "_fwd"), reference_branches(ref, "excite")
    assert len(excite) > 20     # the collector really reads the branches
    missing = sorted(op for op in RULES if op not in excite or op not in forward)
    assert not missing, f"registered ops without a branch in tests/excitation_ref.py: {missing}"


def test_docs_op_table_is_generated_from_the_registry(tmp_path):
    readme = (ROOT / "docs" / "rules.md").read_text()
    assert render(readme) == readme, "docs/rules.md's op table is stale: run `python -m onnx_excite.optable docs/rules.md`"
    for op in RULES:
        assert f" {op}," in readme or f" {op} |" in readme
    stale = tmp_path / "rules.md"
    stale.write_text(readme.replace("| Conv | input 0 |", "| Conv2 | input 0 |"))
    assert optable_main([str(stale), "--check"]) == 1
    assert optable_main([str(stale)]) == 0 and stale.read_text() == readme


def test_rule_modules_are_discovered():
    modules = {m.name for m in pkgutil.iter_modules(rules_pkg.__path__)} - {"base"}
    registering = {rule.excite.__module__.rsplit(".", 1)[1] for rule in RULES.values()}
    assert registering == modules - {"without_p"}   # that module declares ops that carry no P
    assert {"LogSoftmax", "ConvTranspose", "Exp"} <= set(OPS) - set(RULES)


def test_one_declaration_is_all_the_tool_reads_about_an_op(monkeypatch):
    """A new op declared once: its layout, sign, roles and family reach the layout search, the
    non-negativity proof, the logits walk, CAM, flops and the methods' map with no other edit."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from onnx_excite.graph.canonicalize import canonicalize
    from onnx_excite.graph.flops import node_flops
    from onnx_excite.graph.layout import channel_axis
    from onnx_excite.graph.builder import cam_feature_map
    from onnx_excite.rules import base

    for op in ("Erf", "Sink7"):   # registered below, removed again after the test
        for table in (base.OPS, base.RULES):
            monkeypatch.setitem(table, op, None)
            monkeypatch.delitem(table, op)
    seen = {}

    def rule(ctx, node, p, negate=False):
        seen["entry"] = ctx.variant("activation")
        return {node.input[0]: p}

    base.register("Erf", inputs=(0,), keeps_nonneg="always", family="activation", layout="elementwise",
                  description="test op")(rule)
    base.declare("Sink7", roles={"squasher"})
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Erf", ["c"], ["s"], name="erf"),
             helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w"], ["logits"], name="fc", transB=1),
             helper.make_node("Sink7", ["logits"], ["y"], name="sink")]
    k = numpy_helper.from_array(np.ones((3, 3, 1, 1), np.float32), "k")
    shapes = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
              (("s", ["N", 3, 4, 4]), ("g", ["N", 3, 1, 1]), ("f", ["N", 3]), ("logits", ["N", 2]))]
    model = helper.make_model(helper.make_graph(nodes, "t", [x], [y], [w, k], value_info=shapes),
                              opset_imports=[helper.make_opsetid("", 17)])
    graph = canonicalize(model)
    from onnx_excite.graph.layout import _layout
    assert _layout(nodes[1]) == "elementwise"
    assert graph.entry == "logits"                       # the logits walk stops below the squasher
    assert channel_axis(graph, "c").axis == 1
    assert base.proves_nonneg(graph, "s")                # keeps_nonneg="always"
    assert cam_feature_map(graph) == "s"
    assert node_flops(nodes[0], {"x": (1, 3, 4, 4), "k": (3, 3, 1, 1), "c": (1, 3, 4, 4)}) > 0
    from onnx_excite import build_excitation_model
    build_excitation_model(model, ["c"], ("grad",))
    assert seen["entry"] == "derivative"                 # the method's map entry for the op's family


def test_registry_declarations():
    assert RULES["Conv"].inputs == (0,) and RULES["Conv"].weighted
    assert RULES["Add"].inputs is None and RULES["Add"].keeps_nonneg is True
    assert RULES["Relu"].keeps_nonneg == "always"
    assert all(rule.description for rule in RULES.values())
    with pytest.raises(ValueError, match="registered twice"):
        register("Conv")(lambda ctx, node, p, negate=False: {})


def _graph(nodes, inits):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return canonicalize(m)


def test_declarations_drive_data_inputs_and_the_nonneg_prover():
    consts = [numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(-1.0, np.float32), "neg"),
              numpy_helper.from_array(np.array(6.0, np.float32), "hi"), numpy_helper.from_array(np.ones(3, np.float32), "s")]
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["relu6"], name="clip"),     # >= 0 for any x
             helper.make_node("Clip", ["x", "neg", "hi"], ["clamp"], name="clamp"),   # may be negative
             helper.make_node("Transpose", ["relu6"], ["t"], name="t", perm=[0, 1, 3, 2]),
             helper.make_node("Add", ["t", "relu6"], ["sum"], name="add"),
             helper.make_node("Add", ["sum", "clamp"], ["mixed"], name="add2"),
             helper.make_node("Pad", ["sum", "pads", "neg"], ["padded"], name="pad"),
             helper.make_node("Exp", ["x"], ["e"], name="exp"),                       # no rule, always >= 0
             helper.make_node("Mul", ["sum", "e"], ["gated"], name="gate")]
    consts.append(numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"))
    graph = _graph(nodes, consts)
    assert proves_nonneg(graph, "relu6") and not proves_nonneg(graph, "clamp")
    assert proves_nonneg(graph, "t") and proves_nonneg(graph, "sum") and not proves_nonneg(graph, "mixed")
    assert not proves_nonneg(graph, "padded")        # padded with -1
    assert proves_nonneg(graph, "gated") and not proves_nonneg(graph, "x")
    by_name = {n.name: n for n in graph.nodes}
    assert data_inputs(graph, by_name["clip"]) == ["x"]          # inputs=(0,): lo, hi carry no P
    assert data_inputs(graph, by_name["add2"]) == ["sum", "clamp"]
    assert data_inputs(graph, by_name["pad"]) == ["sum"]


# ---------------------------------------------------------------------------
# one test per pass-through activation against the reference
# ---------------------------------------------------------------------------
ACTIVATIONS = {
    "Relu": {}, "Sigmoid": {}, "Softplus": {}, "HardSigmoid": {"alpha": 0.3, "beta": 0.4}, "LeakyRelu": {"alpha": 0.1},
    "Elu": {"alpha": 0.7}, "Celu": {"alpha": 1.3}, "Selu": {}, "HardSwish": {}, "Tanh": {}, "Gelu": {},
    "Softsign": {}, "Mish": {}, "ThresholdedRelu": {"alpha": 0.2}, "Identity": {}, "Dropout": {},
    "Cast": {"to": TensorProto.FLOAT}, "LRN": {"size": 3}, "PRelu": {},
}


@pytest.mark.parametrize("op", sorted(ACTIVATIONS))
def test_activation_between_convs_matches_reference(op):
    rng = np.random.default_rng(len(op))
    inits = [numpy_helper.from_array((rng.normal(size=(4, 3, 3, 3)) / 4).astype(np.float32), "W1"),
             numpy_helper.from_array((rng.normal(size=(5, 4, 3, 3)) / 4).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.normal(size=(6, 5)).astype(np.float32), "W3")]
    act_in = ["c1"]
    if op == "PRelu":
        inits.append(numpy_helper.from_array(rng.uniform(0, 0.5, (4, 1, 1)).astype(np.float32), "slope"))
        act_in.append("slope")
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node(op, act_in, ["a1"], name="act", **ACTIVATIONS[op]),
             helper.make_node("Conv", ["a1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "W3"], ["logits"], name="fc", transB=1)]
    opset = 20 if op == "Gelu" else 18
    g = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 5])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9 if opset == 20 else 8
    onnx.checker.check_model(model, full_check=True)
    x = rng.normal(size=(2, 3, 6, 5)).astype(np.float32)
    signal = rng.random((2, 6)).astype(np.float32)
    layers = ["x", "c1", "a1"]
    res = Exciter(model, layers, methods=("mwp", "cmwp")).explain(x, signal)
    ref = Reference(model)
    np.testing.assert_allclose(res.logits, ref.forward(x)["logits"], rtol=1e-4, atol=1e-4)
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, signal, layers, contrastive=contrastive)
        for layer in layers:
            exp = want["map"][layer]
            scale = max(np.abs(exp).max(), 1e-12)
            assert np.abs(res.maps[method][layer] - exp).max() <= 1e-4 * scale, (op, method, layer)
