"""`eval faithfulness`: deletion / insertion areas, their statistics, the batched perturbation
runs, ROAD's imputation, and the command on the bundled data (tests/data)."""
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from conftest import PHOTOS, VOC_SAMPLE
from onnx_excite import ExciteError
from onnx_excite.apps.eval import run_evaluation, stats
from onnx_excite.apps.eval.faithfulness import run_faithfulness
from onnx_excite.apps.eval.perturb import (CurveJob, ForwardModel, Perturbation, removal_ranks, road_impute,
                                           run_curves, softmax, step_counts)
from onnx_excite.cli.app import app

runner = CliRunner()
H = W = 12
REGION = (slice(2, 6), slice(5, 9))     # the pixels class 0 reads


CHECKER = np.indices((H, W)).sum(axis=0) % 2 * 2.0 - 1.0    # +-1


def region_model(pattern=None):
    """logits = (0.15 * sum over the region's pixels and channels, 1.5): class 0's score is the
    sum of one known image region (weighted by ``pattern``), class 1 a constant."""
    w = np.zeros((2, 3, H, W), np.float32)
    w[0][:, REGION[0], REGION[1]] = 0.15 * (1.0 if pattern is None else pattern[REGION])
    bias = np.array([0.0, 1.5], np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "B"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "region", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, H, W])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(w.reshape(2, -1), "W"), numpy_helper.from_array(bias, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def region():
    rng = np.random.default_rng(3)
    x = (0.5 + rng.random((3, H, W))).astype(np.float32)      # positive pixels: deleting region pixels lowers p
    sal = np.zeros((H, W))
    sal[REGION] = 1.0 + rng.random((4, 4))
    return ForwardModel(region_model(), device="cpu"), x, sal


def _auc_of(forward, x, saliency, kind="deletion", steps=24, seed=0, **kw):
    tiebreak = np.random.default_rng(seed).random((H, W))
    pert = Perturbation(steps=steps, **kw)
    counts = step_counts(H * W, steps)
    (curve,) = run_curves(forward, x, [CurveJob(kind, removal_ranks(saliency, tiebreak), counts, (0,))], pert)
    return stats.auc(curve, counts / (H * W)), curve


# ---------------------------------------------------------------------------
# areas and statistics
# ---------------------------------------------------------------------------
def test_auc_is_the_numpy_trapezoid():
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    y = np.array([0.9, 0.7, 0.72, 0.3, 0.1, 0.05])
    x = np.array([0, 10, 25, 60, 80, 100]) / 100
    assert stats.auc(y, x) == pytest.approx(trapezoid(y, x), abs=1e-12)
    assert stats.auc(y) == pytest.approx(trapezoid(y, np.linspace(0, 1, len(y))), abs=1e-12)
    assert stats.auc(y, x * 224) == pytest.approx(trapezoid(y, x), abs=1e-12)    # x normalised to [0, 1]
    assert stats.auc([1, 1, 1]) == pytest.approx(1.0) and stats.auc([0.0, 1.0]) == pytest.approx(0.5)


def test_statistics_by_hand():
    # all five differences positive: W+ = 15, the exact two-sided p is 2 / 2^5
    w = stats.wilcoxon([2, 3, 4, 5, 6], [1, 1, 1, 1, 1])
    assert w["w_plus"] == 15 and w["p"] == pytest.approx(2 / 32) and w["method"] == "exact"
    assert stats.wilcoxon([1, 2], [1, 2])["p"] is None
    adjusted = stats.holm([0.01, 0.04, None, 0.03])          # 3 * 0.01, max(2 * 0.03, 0.03), 1 * 0.04 -> 0.06
    assert adjusted[2] is None and [adjusted[i] for i in (0, 1, 3)] == pytest.approx([0.03, 0.06, 0.06])
    v = np.random.default_rng(0).normal(size=40)
    mean, lo, hi = stats.bootstrap_ci(v, 500, seed=1)
    assert lo < mean < hi and mean == pytest.approx(v.mean())
    assert stats.bootstrap_ci(v, 500, seed=1) == (mean, lo, hi)                  # seeded
    pb = stats.paired_bootstrap(v + 1.0, v, 500, seed=1)                      # a constant shift
    assert pb["mean_diff"] == pytest.approx(1.0) and pb["low"] == pytest.approx(1.0) and pb["p"] == 1 / 500
    assert stats.paired_bootstrap(v, v, 500)["p"] == 1.0                       # no difference at all


# ---------------------------------------------------------------------------
# curves on a model whose score is the sum of one region
# ---------------------------------------------------------------------------
def test_a_map_of_the_region_deletes_faster_than_random_and_reversed(region):
    forward, x, sal = region
    good, _ = _auc_of(forward, x, sal)
    reverse, _ = _auc_of(forward, x, -sal)
    randoms = [_auc_of(forward, x, np.random.default_rng(s).random((H, W)))[0] for s in range(5)]
    assert good < min(randoms) and good < reverse
    assert np.mean(randoms) < reverse          # the reversed map keeps the region to the very end


def test_a_map_of_the_region_inserts_faster_than_random_and_reversed(region):
    """Insertion starts from a blur: the class reads a checkerboard the blur removes."""
    _, _, sal = region
    forward = ForwardModel(region_model(CHECKER), device="cpu")
    x = np.broadcast_to((1.0 + 0.8 * CHECKER)[None], (3, H, W)).astype(np.float32)
    good, _ = _auc_of(forward, x, sal, "insertion", blur_sigma=2.0)
    reverse, _ = _auc_of(forward, x, -sal, "insertion", blur_sigma=2.0)
    randoms = [_auc_of(forward, x, np.random.default_rng(s).random((H, W)), "insertion", blur_sigma=2.0)[0]
               for s in range(5)]
    assert good > max(randoms) and np.mean(randoms) > reverse


def test_first_and_last_steps_are_the_image_and_the_baseline(region):
    forward, x, sal = region
    p_image = softmax(forward(x[None]))[0, 0]
    for baseline, substrate in (("zero", np.zeros_like(x)), ("mean", np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape))):
        _, curve = _auc_of(forward, x, sal, baseline=baseline)
        assert curve[0] == pytest.approx(p_image, abs=1e-6)
        assert curve[-1] == pytest.approx(softmax(forward(np.ascontiguousarray(substrate)[None]))[0, 0], abs=1e-6)
    from onnx_excite.apps.eval.perturb import blurred_copy

    _, ins = _auc_of(forward, x, sal, "insertion", blur_sigma=2.0)
    assert ins[-1] == pytest.approx(p_image, abs=1e-6)
    assert ins[0] == pytest.approx(softmax(forward(blurred_copy(x, 2.0)[None]))[0, 0], abs=1e-6)


def test_batched_and_one_at_a_time_give_the_same_curves(region):
    forward, x, sal = region
    counts = step_counts(H * W, step_pixels=10)
    assert counts[0] == 0 and counts[-1] == H * W and np.all(np.diff(counts) <= 10)
    jobs = [CurveJob(kind, removal_ranks(s), counts, (0,)) for s in (sal, -sal) for kind in ("deletion", "insertion")]
    before = forward.runs
    batched = run_curves(forward, x, jobs, Perturbation(step_pixels=10, batch_size=64))
    assert forward.runs - before == 4 * len(counts)
    single = run_curves(forward, x, jobs, Perturbation(step_pixels=10, batch_size=1))
    odd = run_curves(forward, x, jobs, Perturbation(step_pixels=10, batch_size=7))
    for a, b, c in zip(batched, single, odd):
        np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_allclose(a, c, atol=1e-6)


def test_ties_follow_the_tiebreak_order():
    sal = np.array([[1.0, 0.0], [1.0, 0.0]])
    ranks = removal_ranks(sal, np.array([[0.9, 0.1], [0.2, 0.3]]))
    assert ranks.tolist() == [1, 2, 0, 3]
    assert removal_ranks(np.array([[np.nan, 2.0]])).tolist() == [1, 0]


def test_road_imputation_is_the_neighbour_mean_and_ranks_the_region(region):
    forward, x, sal = region
    rng = np.random.default_rng(0)
    removed = rng.random((H, W)) < 0.4
    out = road_impute(x, removed, None, 0.0, sweeps=400)
    assert np.array_equal(out[:, ~removed], x[:, ~removed])
    i, j = np.argwhere(removed[1:-1, 1:-1])[0] + 1
    nb = [(-1, 0, 2), (1, 0, 2), (0, -1, 2), (0, 1, 2), (-1, -1, 1), (-1, 1, 1), (1, -1, 1), (1, 1, 1)]
    assert out[0, i, j] == pytest.approx(sum(w * out[0, i + a, j + b] for a, b, w in nb) / 12, abs=1e-4)
    noisy = road_impute(x, removed, np.random.default_rng(1), 0.05, sweeps=400)
    assert 0.02 < np.std(noisy[:, removed] - out[:, removed]) < 0.08
    # the imputation fills the checkerboard the class reads with its local mean
    forward = ForwardModel(region_model(CHECKER), device="cpu")
    x = np.broadcast_to((1.0 + 0.8 * CHECKER)[None], (3, H, W)).astype(np.float32)
    kw = dict(steps=12, imputation="road", road_noise=0.0)
    morf_good, _ = _auc_of(forward, x, sal, "morf", **kw)
    morf_bad, _ = _auc_of(forward, x, -sal, "morf", **kw)
    lerf_good, _ = _auc_of(forward, x, sal, "lerf", **kw)
    assert morf_good < morf_bad and lerf_good > morf_good


def test_bad_settings_are_one_error():
    for kw, text in ((dict(steps=0), "--steps"), (dict(step_pixels=0), "--step-pixels"),
                     (dict(imputation="inpaint"), "imputation"), (dict(baseline="noise"), "baseline"),
                     (dict(batch_size=0), "--batch-size"), (dict(blur_sigma=-1), "--blur-sigma")):
        with pytest.raises(ExciteError, match=text):
            Perturbation(**kw)


# ---------------------------------------------------------------------------
# the protocol on the bundled data
# ---------------------------------------------------------------------------
def test_run_faithfulness_reuses_the_pointing_cache(tiny_eval_model, tmp_path):
    model, mapping = tiny_eval_model
    ids = ["2007_000042", "2007_000061", "2007_000121"]
    out = tmp_path / "out"
    point = run_evaluation("pointing", VOC_SAMPLE, "voc", str(model), methods=["cmwp", "center"], layers=["feat"],
                           mapping=mapping, out_dir=out, ids=ids)
    res = run_faithfulness(VOC_SAMPLE, model=str(model), methods=["cmwp", "center", "random"], layers=["feat"],
                           mapping=mapping, out_dir=out, ids=ids, perturbation=Perturbation(steps=6), n_boot=200)
    assert res.counts["maps_computed"] == 0 and res.counts["maps_cached"] == point.counts["images_evaluated"]
    pairs = {(it["image"], it["class"]) for it in point.items}
    assert {(it["image"], it["class"]) for it in res.items} == pairs                  # the same (image, class) pairs
    assert set(res.summary) == {"cmwp:feat", "center", "random"}
    for it in res.items:
        for label in res.summary:
            for kind in ("deletion", "insertion"):
                assert 0 <= it["auc"][label][kind] <= 1 and len(it["curves"][label][kind]) == 7
        assert len({it["curves"][lab]["deletion"][0] for lab in res.summary}) == 1    # step 0: the same image
    assert len(res.comparisons) == 2 * 3
    again = run_faithfulness(VOC_SAMPLE, model=str(model), methods=["cmwp", "center", "random"], layers=["feat"],
                             mapping=mapping, out_dir=tmp_path / "again", ids=ids,
                             perturbation=Perturbation(steps=6, batch_size=5), n_boot=200)
    assert again.summary == res.summary                                              # seeded, batch-independent


def test_cli_writes_the_three_reports(tiny_eval_model, tmp_path):
    model, mapping = tiny_eval_model
    out = tmp_path / "voc"
    res = runner.invoke(app, ["eval", "faithfulness", "--data", str(VOC_SAMPLE), "--model", str(model), "--layer", "feat",
                              "--mapping", str(mapping), "--methods", "mwp,grad,gradcam,center,random", "--steps", "4",
                              "--bootstrap", "100", "--limit", "4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "images/s" in res.output and "mwp:feat" in res.output
    for name in ("results.md", "results.csv", "results.json", "comparisons.csv", "faithfulness_curves.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert data["protocol"] == "faithfulness" and data["settings"]["target"] == "label"
    assert {"mwp:feat", "grad:feat", "gradcam:feat", "center", "random"} == set(data["summary"])
    assert "| random |" in (out / "results.md").read_text()
    # a plain folder: the model's own top-1 class
    res = runner.invoke(app, ["eval", "faithfulness", "--data", str(PHOTOS), "--model", str(model), "--layer", "feat",
                              "--methods", "cmwp,random", "--steps", "4", "--bootstrap", "50", "-o", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "f" / "results.json").read_text())
    assert data["settings"]["target"] == "top1" and data["counts"]["items"] == 4
    assert all(it["class"].startswith("top1 #") for it in data["items"])


def test_cli_default_model_one_image(tmp_path):
    res = runner.invoke(app, ["eval", "faithfulness", "--data", str(PHOTOS), "--methods", "mwp,center", "--steps", "4",
                              "--limit", "1", "--bootstrap", "50", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["summary"]) == {"mwp:features.13", "center"} and data["counts"]["items"] == 1


@pytest.mark.parametrize("args, text", [
    (["--data", "{tmp}/nope"], "no such folder or file"),
    (["--data", str(PHOTOS), "--target", "label"], "no labels"),
    (["--data", str(PHOTOS), "--steps", "0"], "--steps"),
    (["--data", str(PHOTOS), "--methods", "scorecam"], "unknown method"),
    (["--data", str(VOC_SAMPLE), "--mapping", "{tmp}/bad.json"], "malformed JSON"),
    (["--data", str(VOC_SAMPLE), "--format", "kitti"], "unknown dataset format"),
    (["--data", "{tmp}/empty"], "no images here"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, text):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = runner.invoke(app, ["eval", "faithfulness", *args, "-o", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0] and "Traceback" not in res.output, res.output
