"""RISE (Petsiuk et al., BMVC 2018), the black-box method: its masks against PyTorch's bilinear
upsampling of the seeded grids, the maps against a float64 numpy reference and against the
closed-form expectation for a score linear in the input, seeding and batching, and the
commands (explain -m rise, eval --methods ...,rise)."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from conftest import VOC_SAMPLE, photo
from onnx_excite import ExciteError
from onnx_excite.apps.eval import read_dataset, run_evaluation
from onnx_excite.apps.eval.cache import MapCache, rise_key
from onnx_excite.apps.eval.compute import model_spec
from onnx_excite.apps.eval.faithfulness import run_faithfulness
from onnx_excite.apps.eval.perturb import ForwardModel, Perturbation
from onnx_excite.apps.rise import MaskSet, RiseSettings, rise_saliency
from onnx_excite.cli.app import app

runner = CliRunner()
H, W = 12, 17   # not square: the cells are ceil(H / s) x ceil(W / s) pixels


# ---------------------------------------------------------------------------
# the independent reference
# ---------------------------------------------------------------------------
def reference_masks(n, s, p, seed, h, w) -> np.ndarray:
    """The documented draw (grids, then shifts, from default_rng(seed)), upsampled by PyTorch
    (bilinear, align_corners=False) to ((s + 1) ch, (s + 1) cw) and cropped, in float64."""
    rng = np.random.default_rng(seed)
    grids = (rng.random((n, s, s)) < p).astype(np.float64)
    ch, cw = -(-h // s), -(-w // s)
    shifts = np.floor(rng.random((n, 2)) * np.array([ch, cw])).astype(int)
    up = torch.nn.functional.interpolate(torch.from_numpy(grids)[:, None], size=((s + 1) * ch, (s + 1) * cw),
                                         mode="bilinear", align_corners=False)[:, 0].numpy()
    return np.stack([up[i, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts)])


def reference_rise(logits_fn, x, targets, masks, p) -> np.ndarray:
    """sum_i score_t(x * M_i) M_i / (N p), score_t the softmax probability summed over t, float64."""
    z = np.stack([logits_fn(x * m[None]) for m in masks]).astype(np.float64)
    prob = np.exp(z - z.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    return np.stack([np.einsum("i,ihw->hw", prob[:, list(t)].sum(axis=1), masks) / (len(masks) * p) for t in targets])


def linear_model(k=3, seed=0):
    """logits = W x.ravel() + b on a (3, H, W) input: a Gemm, so the float64 reference is one matmul."""
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(k, 3 * H * W)) * 0.05).astype(np.float32)
    b = rng.normal(size=k).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "W", "B"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, H, W])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w.astype(np.float64), b.astype(np.float64)


@pytest.fixture(scope="module")
def linear():
    model, w, b = linear_model()
    x = np.random.default_rng(1).normal(size=(3, H, W)).astype(np.float32)
    return ForwardModel(model, device="cpu"), x, (lambda inp: w @ inp.ravel() + b)


# ---------------------------------------------------------------------------
# masks and maps
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("s,p", [(7, 0.5), (3, 0.3), (1, 0.9)])
def test_masks_are_pytorchs_bilinear_upsampling_of_the_seeded_grids(s, p):
    settings = RiseSettings(masks=40, cells=s, p=p, seed=5)
    ours = MaskSet(settings, H, W).chunk(0, 40)
    ref = reference_masks(40, s, p, 5, H, W)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert ours.min() >= 0 and ours.max() <= 1
    np.testing.assert_array_equal(MaskSet(settings, H, W).chunk(13, 29), ours[13:29])   # any chunk is the same masks


def test_rise_equals_the_float64_reference(linear):
    forward, x, logits_fn = linear
    settings = RiseSettings(masks=150, cells=4, p=0.4, seed=2, batch_size=16)
    targets = [(0,), (2,), (0, 2)]
    ours = rise_saliency(forward, x, targets, settings)
    ref = reference_rise(logits_fn, x, targets, reference_masks(150, 4, 0.4, 2, H, W), 0.4)
    assert ours.shape == (3, H, W) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    assert np.ptp(ref[0]) > 0.05      # the maps differ across pixels: the comparison means something


def test_all_targets_come_from_the_same_forwards_and_add_up(linear):
    forward, x, _ = linear
    settings = RiseSettings(masks=60, cells=3, seed=4, batch_size=25)
    before = forward.runs
    maps = rise_saliency(forward, x, [(0,), (1,), (2,), (0, 1)], settings)
    assert forward.runs - before == 60                      # N forwards, whatever the number of targets
    np.testing.assert_allclose(maps[3], maps[0] + maps[1], rtol=1e-5)
    # the three classes' probabilities sum to 1: their maps add up to sum_i M_i / (N p)
    np.testing.assert_allclose(maps[:3].sum(axis=0), MaskSet(settings, H, W).chunk(0, 60).mean(axis=0) / 0.5,
                               rtol=1e-5)


def test_seeded_and_independent_of_the_batch_size(linear):
    forward, x, _ = linear
    base = rise_saliency(forward, x, [(1,)], RiseSettings(masks=70, cells=5, seed=9, batch_size=8))
    np.testing.assert_array_equal(base, rise_saliency(forward, x, [(1,)], RiseSettings(masks=70, cells=5, seed=9,
                                                                                        batch_size=8)))
    for batch in (1, 13, 70, 500):
        np.testing.assert_allclose(rise_saliency(forward, x, [(1,)], RiseSettings(masks=70, cells=5, seed=9,
                                                                                   batch_size=batch)),
                                   base, rtol=1e-6, atol=1e-7)
    other = rise_saliency(forward, x, [(1,)], RiseSettings(masks=70, cells=5, seed=10, batch_size=8))
    assert np.abs(other - base).max() > 1e-3


def test_rise_of_a_linear_score_is_its_closed_form_expectation():
    """Two classes with logits log f and log (C - f), f = b + sum a x: the target's probability
    is f / C, linear in the masked input. Then, with E[B_c B_c'] = p^2 + p (1 - p) [c = c'] and
    bilinear weights phi_c(u) that sum to 1 over the cells,
        E[saliency(u)] = (b p + sum_j a_j (p^2 + p (1 - p) K(j, u))) / (p C),
        K(j, u) = mean over the shifts of sum_c phi_c(j) phi_c(u),
    phi from PyTorch's upsampling of one-hot grids, every shift enumerated."""
    h, w, s, p, n = 10, 10, 3, 0.5, 100_000
    rng = np.random.default_rng(0)
    x = (0.5 + rng.random((3, h, w))).astype(np.float32)
    wts = np.zeros((3, h, w))
    wts[:, 1:5, 5:9] = 0.5 / (3 * 16 * x[:, 1:5, 5:9].mean())     # the score reads one corner region
    c_total, b = 1.0, 0.05
    a = (wts * x).sum(axis=0).ravel()                               # a_j: the pixel's weight times its value

    def forward(batch):
        f = b + np.einsum("nchw,chw->n", batch.astype(np.float64), wts)
        return np.log(np.stack([f, c_total - f], axis=1))

    sal = rise_saliency(forward, x, [(0,)], RiseSettings(masks=n, cells=s, p=p, seed=3, batch_size=4096))[0]
    ch = cw = -(-h // s)
    onehot = torch.eye(s * s, dtype=torch.float64).reshape(s * s, 1, s, s)
    phi = torch.nn.functional.interpolate(onehot, size=((s + 1) * ch, (s + 1) * cw), mode="bilinear",
                                          align_corners=False)[:, 0].numpy()
    kern = np.zeros((h * w, h * w))
    for dy in range(ch):
        for dx in range(cw):
            f = phi[:, dy:dy + h, dx:dx + w].reshape(s * s, -1)
            kern += f.T @ f
    kern /= ch * cw
    expected = ((b * p + a @ (p * p + p * (1 - p) * kern)) / (p * c_total)).reshape(h, w)
    assert np.ptp(expected) > 0.1                                    # the region stands out
    assert np.abs(sal - expected).max() < 0.02                       # < 4 standard errors at N = 100000
    assert np.corrcoef(sal.ravel(), expected.ravel())[0, 1] > 0.98


def test_bad_settings_are_one_error(linear):
    for kw, text in (({"masks": 0}, "--masks"), ({"cells": 0}, "--mask-cells"), ({"p": 0}, "--mask-p"),
                     ({"p": 1.5}, "--mask-p"), ({"batch_size": 0}, "--mask-batch"), ({"seed": -1}, "--seed")):
        with pytest.raises(ExciteError, match=text):
            RiseSettings(**kw)
    forward, x, _ = linear
    with pytest.raises(ExciteError, match="out of range"):
        rise_saliency(forward, x, [(3,)], RiseSettings(masks=4))


# ---------------------------------------------------------------------------
# the commands
# ---------------------------------------------------------------------------
def test_explain_rise_writes_maps_and_overlays(tiny_path, tmp_path):
    def run(out, *extra):
        res = runner.invoke(app, ["explain", str(tiny_path), str(photo("dog.jpg")), "-m", "rise", "--masks", "64",
                                  "--top", "2", "-o", str(out), *extra])
        assert res.exit_code == 0, res.output
        return json.loads((out / "explanations.jsonl").read_text().splitlines()[-1])

    rec = run(tmp_path / "a")
    outs = rec["outputs"]
    assert [o["method"] for o in outs] == ["rise", "rise"] and {o["layer"] for o in outs} == {"x"}   # the model input
    for o in outs:
        m = np.load(o["map"])
        assert m.shape == (8, 8) and (m >= 0).all() and m.max() > 0     # at the 8 x 8 input
        assert (tmp_path / "a" / o["overlay"].split("/")[-1]).is_file()
    assert rec["settings"]["rise"] == RiseSettings(masks=64).tag
    first = np.load(outs[0]["map"])
    # the same seed in another batch size: the same map; another seed: another
    same = run(tmp_path / "b", "--mask-batch", "5")
    np.testing.assert_allclose(np.load(same["outputs"][0]["map"]), first, rtol=1e-5)
    other = run(tmp_path / "c", "--seed", "1")
    assert not np.allclose(np.load(other["outputs"][0]["map"]), first)


def test_explain_rise_beside_a_graph_method_on_the_default_model(tmp_path):
    res = runner.invoke(app, ["explain", "default", str(photo("dog.jpg")), "-t", "249", "-m", "cmwp", "-m", "rise",
                              "--masks", "24", "--mask-batch", "12", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "explanations.jsonl").read_text())
    assert [(o["method"], o["layer"]) for o in rec["outputs"]] == [("cmwp", "features.13"), ("rise", "input")]
    h, w = np.load(tmp_path / "dog.249.rise.input.npy").shape
    assert h == 224 and w > 224                   # at the model input: the shorter side at 224, the photo is wide
    assert (tmp_path / "dog.249.rise.input.png").is_file() and (tmp_path / "dog.249.panel.png").is_file()


def test_explain_rise_bad_options_are_one_line(tiny_path, tmp_path):
    for args, text in ((["--masks", "0"], "--masks"), (["--mask-p", "2"], "--mask-p")):
        res = runner.invoke(app, ["explain", str(tiny_path), str(photo("dog.jpg")), "-m", "rise", *args,
                                  "-o", str(tmp_path)])
        assert res.exit_code == 2 and text in res.output and "Traceback" not in res.output


def test_methods_lists_rise_as_black_box():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0 and "rise" in res.output and "black box" in res.output


def test_eval_scores_rise_and_caches_its_maps(tiny_eval_model, tmp_path):
    model, mapping = tiny_eval_model
    ids = ["2007_000042", "2007_000061", "2007_000121"]
    out = tmp_path / "out"
    rise = RiseSettings(masks=32, cells=5, seed=1)
    point = run_evaluation("pointing", VOC_SAMPLE, "voc", str(model), methods=["cmwp", "rise", "center"],
                           layers=["feat"], mapping=mapping, out_dir=out, ids=ids, rise=rise)
    assert set(point.summary) == {"cmwp:feat", "rise", "center"} and point.settings["rise"]["masks"] == 32
    assert point.counts["maps_computed"] == 3
    # the cached RISE map is the one the library computes on the same input
    spec = model_spec(str(model), ["feat"], ["cmwp"], "positive", "pointing", 224)
    rec = next(r for r in read_dataset(VOC_SAMPLE, "voc")[0] if r.id == ids[0])
    stored = MapCache(out / "cache", "pointing", spec.meta).load(rec)
    cls = next(it["class"] for it in point.items if it["image"] == ids[0])
    ref = rise_saliency(ForwardModel(str(model), device="cpu"), spec.input_array(rec.path),
                        [point.mapping["indices"][cls]], rise)[0]
    np.testing.assert_allclose(stored[rise_key(rise, cls)], ref, rtol=1e-5)
    # rise alone, the same settings: nothing computed; other settings: computed again
    again = run_evaluation("pointing", VOC_SAMPLE, "voc", str(model), methods=["rise"], mapping=mapping, out_dir=out,
                           ids=ids, rise=rise)
    assert again.counts["maps_cached"] == 3 and again.summary["rise"] == point.summary["rise"]
    other = run_evaluation("pointing", VOC_SAMPLE, "voc", str(model), methods=["rise"], mapping=mapping, out_dir=out,
                           ids=ids, rise=RiseSettings(masks=32, cells=5, seed=2))
    assert other.counts["maps_computed"] == 3
    # faithfulness reuses the pointing game's RISE maps
    faith = run_faithfulness(VOC_SAMPLE, model=str(model), methods=["rise", "random"], mapping=mapping, out_dir=out,
                             ids=ids, perturbation=Perturbation(steps=4), n_boot=50, rise=rise)
    assert faith.counts["maps_cached"] == 3 and set(faith.summary) == {"rise", "random"}


def test_eval_cli_with_rise(tiny_eval_model, tmp_path):
    model, mapping = tiny_eval_model
    common = ["--data", str(VOC_SAMPLE), "--model", str(model), "--layer", "feat", "--mapping", str(mapping),
              "--masks", "16", "--mask-cells", "4"]
    res = runner.invoke(app, ["eval", "localization", *common, "--methods", "rise,center", "-o", str(tmp_path / "l")])
    assert res.exit_code == 0, res.output
    assert "rise" in res.output
    data = json.loads((tmp_path / "l" / "results.json").read_text())
    assert data["settings"]["rise"] == {"masks": 16, "cells": 4, "p": 0.5, "seed": 0, "batch_size": 32}
    res = runner.invoke(app, ["eval", "faithfulness", *common, "--methods", "rise,mwp", "--steps", "4", "--limit", "2",
                              "--bootstrap", "50", "-o", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    assert "| rise |" in (tmp_path / "f" / "results.md").read_text()


def test_explain_rise_on_an_nhwc_model_matches_the_reference(tmp_path):
    """An NHWC model (the masks multiply each pixel's channels): the map explain writes equals the
    reference computed with onnxruntime on the original model, its own softmax as the score."""
    import onnxruntime as ort
    from PIL import Image

    from onnx_excite.apps.explain import ExplainOptions, explain_setup
    from test_bad_input import _nhwc_model

    path = tmp_path / "nhwc.onnx"
    onnx.save(_nhwc_model(TensorProto.FLOAT), str(path))
    res = runner.invoke(app, ["explain", str(path), str(photo("dog.jpg")), "-m", "rise", "--masks", "40",
                              "--mask-cells", "5", "-t", "3", "--size", "32", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    ours = np.load(tmp_path / "o" / "dog.3.rise.x.npy")
    setup = explain_setup(ExplainOptions(model=str(path), methods=("rise",), size=32))
    arr, _ = setup.preprocess(Image.open(photo("dog.jpg")))
    h, w, _ = arr.shape
    assert ours.shape == (h, w) == (32, 43)
    masks = reference_masks(40, 5, 0.5, 0, h, w)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    prob = np.concatenate([sess.run(None, {"x": (arr[None] * m[None, :, :, None]).astype(np.float32)})[0]
                           for m in masks])
    ref = np.einsum("i,ihw->hw", prob[:, 3].astype(np.float64), masks) / (40 * 0.5)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)


def test_bench_explain_refuses_black_box_methods(tmp_path):
    res = runner.invoke(app, ["bench-explain", "default", str(photo("dog.jpg")), "-m", "rise"])
    assert res.exit_code == 2 and "black-box" in res.output
