"""Benchmark infrastructure (issue 13): the FLOP counter against hand-computed counts and
published ones, the recipes, and `bench` on a tiny recipe (rows, ratios, floor, options,
memory; no timing assertions)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_excite.models import synthetic
from typer.testing import CliRunner

from onnx_excite.apps.bench import run_bench_report
from onnx_excite.graph.flops import count_flops


def _hand_model():
    """input 2x3x8x8 -> Conv 3->8 3x3 pad 1 -> depthwise Conv 8 3x3 stride 2 pad 1 -> Flatten -> Gemm 128->10
    -> MatMul 10x4."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((10, 128)).astype(np.float32), "w3"),
             numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "w4")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="c2", kernel_shape=[3, 3], pads=[1] * 4,
                              strides=[2, 2], group=8),
             helper.make_node("Flatten", ["c2"], ["f"], name="f"),
             helper.make_node("Gemm", ["f", "w3"], ["g"], name="g", transB=1),
             helper.make_node("MatMul", ["g", "w4"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_flop_count_by_hand():
    count = count_flops(_hand_model(), ["r1"], {"x": [2, 3, 8, 8]})
    conv1 = 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)      # 2 * out elements * (C_in/group * k * k) = 27648
    conv2 = 2 * (2 * 8 * 4 * 4) * (1 * 3 * 3)      # depthwise, stride 2: 4608
    gemm = 2 * (2 * 10) * 128                       # 5120
    matmul = 2 * (2 * 4) * 10                       # 160
    assert count.per_node == {"c1": conv1, "c2": conv2, "g": gemm, "mm": matmul}
    assert count.total == conv1 + conv2 + gemm + matmul
    assert count.above == conv2 + gemm + matmul     # the nodes that read r1
    assert count.floor == pytest.approx(1 + 2 * (conv2 + gemm + matmul) / count.total)
    everything = count_flops(_hand_model(), ["x"], {"x": [1, 3, 8, 8]})
    assert everything.total == count.total // 2 and everything.floor == 3.0


@pytest.mark.parametrize("recipe, gmacs", [("resnet50-random", 4.09), ("mobilenetv2-random", 0.30),
                                           ("swin-t-random", 4.49)])
def test_recipes_have_the_published_size(recipe, gmacs):
    """torchvision's ResNet-50 is 4.09 GMACs, MobileNetV2 0.30 GMACs, Swin-T 4.49 GMACs at 224 x 224
    (their model cards)."""
    model = synthetic.RECIPES[recipe]()
    onnx.checker.check_model(model)
    count = count_flops(model, synthetic.RECIPE_LAYERS[recipe], {"input": [1, 3, 224, 224]})
    assert count.total / 2e9 == pytest.approx(gmacs, rel=0.01)
    assert 0 < count.share_above < 1


def test_bench_report_on_a_tiny_recipe():
    steps = []
    report = run_bench_report("tiny-cnn", ["pool1"], runs=2, memory=True, profile=True,
                              progress=lambda *a: steps.append(a[0]))
    assert [r.name for r in report.rows] == ["forward", "forward+MWP", "forward+c-MWP", "forward+MWP+c-MWP"]
    assert report.rows[0].ratio == 1.0 and all(r.ratio > 0 and r.median_ms > 0 for r in report.rows)
    expected = count_flops(synthetic.tiny_cnn(), ["pool1"], {"input": [1, 3, 32, 32]})
    assert report.floor == pytest.approx(expected.floor) and 1 < report.floor < 3
    assert report.options["allow_spinning"] == "0"
    assert report.options["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert [b.name for b in report.builds] == [r.name for r in report.rows]
    assert all(b.peak_rss_mb >= b.loaded_rss_mb > 0 and b.session_s > 0 for b in report.builds)
    assert sum(report.profile.values()) == pytest.approx(1.0) and "Conv" in report.profile
    assert {"building", "timing", "memory", "profiling"} <= set(steps)


@pytest.mark.parametrize("rule", ["positive", "paper"])
def test_graph_flops_count_each_rules_convolutions(rule):
    """graph FLOPs = forward + each excited layer's Z and adjoint, by hand: the paper rule
    applies W+ once each (1 + 2f = 3 at the input); the positive rule runs a+ W+ and a- W-
    where the input is signed: x (the image), c2's output (no ReLU) into the Gemm, the Gemm's
    output into the MatMul; r1 (after a ReLU) is non-negative."""
    count = count_flops(_hand_model(), ["x"], {"x": [1, 3, 8, 8]})
    c1, c2, g, mm = (count.per_node[n] for n in ("c1", "c2", "g", "mm"))
    halves = 2 if rule == "positive" else 1
    mwp = count.total + 2 * (halves * c1 + c2 + halves * g + halves * mm)
    report = run_bench_report(_hand_model(), ["x"], rule=rule, runs=1, warmup=0)
    by = {r.name: r.graph_flops for r in report.rows}
    assert by["forward"] == 1.0
    assert by["forward+MWP"] == pytest.approx(mwp / count.total)
    assert by["forward+MWP"] == pytest.approx(report.floor) if rule == "paper" else by["forward+MWP"] > report.floor
    # c-MWP: the classifier's dual (-W, its own halves): one more Z and adjoint there
    assert by["forward+c-MWP"] == pytest.approx((mwp + 2 * halves * mm) / count.total)
    # both: the dual, and one more sweep below the classifier (Z shared; the sweeps coincide
    # above the classifier's input, and their nodes are emitted once). This also counts
    # the Split that un-stacks shared sweeps (shape inference alone leaves it unsized).
    both = mwp + 2 * halves * mm + halves * g + c2 + halves * c1
    assert by["forward+MWP+c-MWP"] == pytest.approx(both / count.total)


def test_round_spread_pairs_each_run_with_its_rounds_forward():
    """Quartiles of the per-round ratios: a round where both ran slow (load) gives the same
    ratio as a quiet one, which a ratio of medians over unpaired runs would not show."""
    from onnx_excite.apps.bench import round_spread

    forward = [10.0, 20.0, 10.0, 10.0, 30.0]
    variant = [20.0, 40.0, 22.0, 18.0, 60.0]          # ratios 2, 2, 2.2, 1.8, 2
    assert round_spread(variant, forward) == pytest.approx((2.0, 2.0))
    # ratios 1.5, 2.5, 3.5, 4.5: linear interpolation between order statistics (numpy's default)
    assert round_spread([15.0, 25.0, 35.0, 45.0], [10.0] * 4) == pytest.approx((2.25, 3.75))
    report = run_bench_report("tiny-cnn", ["pool1"], runs=4, warmup=0)
    for row in report.rows:
        lo, hi = row.ratio_spread
        assert lo <= hi and (row.name != "forward" or lo == hi == 1.0)


def test_bench_cli_prints_floor_and_options():
    from onnx_excite.cli.app import app

    res = CliRunner().invoke(app, ["bench", "tiny-cnn", "--runs", "4", "--opt-level", "extended"])
    assert res.exit_code == 0, res.output
    assert "floor = 1 + 2f" in res.output and "ORT_ENABLE_EXTENDED" in res.output and "allow_spinning=0" in res.output
    assert "x fwd per round, quartiles" in res.output and "graph FLOPs" in res.output
    bad = CliRunner().invoke(app, ["bench", "tiny-cnn", "--opt-level", "fast"])
    assert bad.exit_code == 2 and "error:" in bad.output


def test_safe_reciprocal_is_exact_and_finite():
    """Emitter.safe_reciprocal (mask / (Z + 1 - mask), no Where): 1/z bit for bit where |z| is
    above the smallest normal float32, exactly 0 at or below it (0, denormals, tiny), never
    NaN/Inf, with no Where node emitted."""
    import onnxruntime as ort

    from onnx_excite.graph.emitter import TINY, Emitter

    g = Emitter({"z"})
    out = g.safe_reciprocal("z")
    assert all(n.op_type != "Where" for n in g.nodes)
    graph = helper.make_graph(g.nodes + [helper.make_node("Identity", [out], ["inv"])], "safe",
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("inv", TensorProto.FLOAT, [None])], g.initializers)
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                                  ir_version=8).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    z = np.concatenate([[0.0, 1e-45, 1e-40, TINY, np.nextafter(np.float32(TINY), np.float32(1)), 2 * TINY, 1e-30,
                         1.0, 3e38, np.finfo(np.float32).max], rng.random(1000) * 10.0 ** rng.integers(-37, 38, 1000)])
    z = np.concatenate([z, -z, [-0.0]]).astype(np.float32)
    inv = sess.run(None, {"z": z})[0]
    counted = np.abs(z) > np.float32(TINY)
    with np.errstate(divide="ignore", over="ignore"):
        expected = np.where(counted, np.float32(1) / z, np.float32(0))
    assert np.isfinite(inv).all()                     # 1 / (smallest z above tiny) ~ 8.5e37 is finite
    assert np.array_equal(inv, expected)              # bit for bit, including the exact zeros


def test_safe_divisor_divides_exactly_with_one_node():
    """Non-negative Z: R = Div(P, Max(Z, 2**-64)), one Max per normaliser and one Div per
    sweep, no mask: P / Z correctly rounded wherever Z >= 2**-64, and P / 2**-64 (finite)
    at Z = 0, whose terms the adjoint multiplies by 0."""
    import onnxruntime as ort

    from onnx_excite.graph.emitter import Z_FLOOR, Emitter

    g = Emitter({"z", "p"})
    out = g.divide("p", g.safe_divisor("z", signed=False))
    assert [n.op_type for n in g.nodes] == ["Max", "Div"]
    graph = helper.make_graph(g.nodes + [helper.make_node("Identity", [out], ["r"])], "div",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None]) for n in ("p", "z")],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, [None])], g.initializers)
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                                  ir_version=8).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    z = np.concatenate([[0.0, 1e-45, 1e-30, Z_FLOOR, 1.0, 3e38], rng.random(1000) * 10.0 ** rng.integers(-19, 38, 1000)])
    z = z.astype(np.float32)
    p = (rng.normal(size=z.size) * 10.0 ** rng.integers(-5, 12, z.size)).astype(np.float32)
    r = sess.run(None, {"p": p, "z": z})[0]
    assert np.isfinite(r).all()
    above = z >= np.float32(Z_FLOOR)
    assert np.array_equal(r[above], p[above] / z[above])
    assert np.array_equal(r[~above], p[~above] / np.float32(Z_FLOOR))


def test_below_model_is_the_forward_cut_at_the_map_layer():
    """The time floor's cut: it computes the map layer's tensor exactly as the full forward
    does, holds no node that reads the layer (nor the classifier), and is None for a map
    layer that is the graph input (all of the forward lies above it: time floor 3)."""
    import onnxruntime as ort

    from onnx_excite.apps.bench import below_model
    from onnx_excite.graph.canonicalize import canonicalize
    from onnx_excite.graph.flops import downstream
    from onnx_excite.models.synthetic import tiny_cnn

    forward = canonicalize(tiny_cnn())
    cut = below_model(forward.model, ["pool1"])
    assert [o.name for o in cut.graph.output] == ["pool1"]
    names = {n.name for n in cut.graph.node}
    assert names and not names & downstream(forward.model, ["pool1"])
    full = forward.forward_model()
    full.graph.output.append(helper.make_tensor_value_info("pool1", TensorProto.FLOAT, None))
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    want = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"]).run(["pool1"], {"input": x})[0]
    got = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, want)
    assert below_model(forward.model, ["input"]) is None


def test_report_time_floor():
    report = run_bench_report("tiny-cnn", ["pool1"], runs=2, warmup=1)
    assert 0 < report.below_ms and 0 <= report.share_above_time <= 1
    assert report.time_floor == pytest.approx(1 + 2 * report.share_above_time)
    assert all(r.name != "forward below the map layer" for r in report.rows)
    to_input = run_bench_report("tiny-cnn", ["input"], runs=1, warmup=0)
    assert to_input.below_ms == 0 and to_input.time_floor == 3.0


def test_measure_build_reports_model_size_derived_below_stored():
    """The companion with weights derived in the graph stores each weight once: its size is
    the forward's plus its nodes, the stored variant's is larger by W+ and the adjoint kernels."""
    from onnx_excite.apps.bench import BenchOptions, measure_build

    options = BenchOptions(layers=["pool1"])
    forward = measure_build("tiny-cnn", None, options)
    derived = measure_build("tiny-cnn", ("mwp",), BenchOptions.of(options, derive_weights=True))
    stored = measure_build("tiny-cnn", ("mwp",), BenchOptions.of(options, derive_weights=False))
    assert forward.model_mb < derived.model_mb < stored.model_mb
    assert derived.model_mb - forward.model_mb < 0.5 * (stored.model_mb - forward.model_mb)


def test_bench_cli_stored_weights():
    from onnx_excite.cli.app import app

    res = CliRunner().invoke(app, ["bench", "tiny-cnn", "--runs", "1", "--stored-weights"])
    assert res.exit_code == 0, res.output


def test_cli_warns_when_the_cut_forward_times_slower(monkeypatch):
    """A cut forward slower than the whole forward (noise) clips f_t to 0: the CLI says the
    time floor means nothing in that run instead of printing 1.00 silently."""
    import onnx_excite.apps.bench as bench
    from onnx_excite.apps.bench import BenchReport, BenchRow
    from onnx_excite.cli.app import app

    report = BenchReport(rows=[BenchRow("forward", 10.0, 1.0), BenchRow("forward+MWP", 15.0, 1.5, 1.0)],
                         providers=["CPUExecutionProvider"], inputs={"input": (1, 3, 32, 32)}, below_ms=12.0)
    assert report.time_floor == 1.0
    monkeypatch.setattr(bench, "run_bench_report", lambda *a, **k: report)
    res = CliRunner().invoke(app, ["bench", "tiny-cnn", "--runs", "1"])
    assert res.exit_code == 0, res.output
    assert "timed slower than the whole forward" in res.output
    report.below_ms = 5.0
    res = CliRunner().invoke(app, ["bench", "tiny-cnn", "--runs", "1"])
    assert res.exit_code == 0 and "timed slower" not in res.output and "time floor = 1 + 2f_t = 2.00" in res.output


def test_markdown_row_matches_the_readme_table():
    """`bench --markdown`: the README benchmark table's header and one row with the same
    numbers as the report (ratios over the time floor and over MWP)."""
    from onnx_excite.apps.bench import BenchReport, BenchRow
    from onnx_excite.cli.app import app

    report = BenchReport(rows=[BenchRow("forward", 8.4, 1.0), BenchRow("forward+MWP", 16.2, 1.92, 1.0),
                               BenchRow("forward+c-MWP", 16.4, 1.95, 1.01), BenchRow("forward+MWP+c-MWP", 19.3, 2.29, 1.19)],
                         providers=["CPUExecutionProvider"], inputs={"input": (1, 3, 224, 224)}, below_ms=5.4)
    row = report.markdown_row("m, l, 1 (0.3)")
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = [c.strip() for c in BenchReport.MARKDOWN_HEADER.splitlines()[0].strip("|").split("|")]
    assert len(cells) == len(header) == 8
    f_t = 1 - 5.4 / 8.4
    assert cells[:3] == ["m, l, 1 (0.3)", "8.4 ms", "1.92x"] and cells[3] == ""          # no FLOP count given
    assert cells[4] == f"{1 + 2 * f_t:.2f}" and cells[5] == f"{1.92 / (1 + 2 * f_t):.2f}"
    assert cells[6:] == ["1.01", "1.19"]
    res = CliRunner().invoke(app, ["bench", "tiny-cnn", "--runs", "1", "--markdown"])
    assert res.exit_code == 0, res.output
    assert BenchReport.MARKDOWN_HEADER.splitlines()[0] in res.output and "| tiny-cnn, pool1, 1 (" in res.output
