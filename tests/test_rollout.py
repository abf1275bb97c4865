"""Attention rollout (method ``rollout``) in the companion graph against the float64 reference
tests/method_ref.py (``rollout_reference``: the attention weights from excitation_ref's forward
of the model's own weights, the T x T matrices multiplied out in full) on torchvision's ViT and
a DeiT-style ViT (legacy exporter; the ViT also through the dynamo exporter) and the
hand-written ViT of the bench recipe, batch 2; its layer, its error lines and `explain -m rollout`."""
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import method_ref as mr
import transformer_nets as nets
from onnx_excite import ExciteError, Exciter
from onnx_excite.cli.app import app

EMBEDDED = "/encoder/Add_output_0"   # torchvision's tokens after the position embedding: the first block's input


def _input(seed, batch=2):
    return np.random.default_rng(seed).normal(size=(batch, 3, 32, 32)).astype(np.float32)


def _models():
    pytest.importorskip("torchvision")
    return {"vit": (nets.vit_tiny(0, batch=2), EMBEDDED, (0, 1, 4, 4)),
            "deit": (nets.deit_tiny(0, batch=2), EMBEDDED, (0, 2, 4, 4))}


@pytest.fixture(scope="module")
def models():
    return _models()


def _synthetic():
    from onnx_excite.models import synthetic

    return synthetic.vit(size=32, patch=8, dim=32, depth=3, heads=2, mlp=64, num_classes=10), "tokens", (0, 1, 4, 4)


def _check(model, layer, tokens, x):
    """Built with no layer named: the rollout's own layer; the map equals the reference and
    is the same for every target."""
    ex = Exciter(model, None, methods=("rollout",))
    assert ex.built.layers == [layer]
    res = ex.explain(x, 3)
    got = res.maps["rollout"][layer]
    want = mr.method_reference(model, x.astype(np.float64), None, [layer], "rollout", tokens=tokens)["map"][layer]
    assert got.shape == want.shape == (len(x), tokens[2], tokens[3])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.abs(want[0] - want[1]).max() > 1e-3 * want.max()   # the two images differ
    other = ex.explain(x, np.random.default_rng(1).random((len(x), ex.num_classes)).astype(np.float32))
    np.testing.assert_array_equal(other.maps["rollout"][layer], got)   # class-agnostic
    return want


@pytest.mark.parametrize("arch", ["vit", "deit"])
def test_rollout_matches_reference(models, arch):
    model, layer, tokens = models[arch]
    _check(model, layer, tokens, _input(4))


def test_rollout_matches_reference_dynamo_export():
    pytest.importorskip("onnxscript")
    pytest.importorskip("torchvision")
    from onnx_excite.graph.layers import inspect_model

    model = nets.vit_tiny(0, opset=18, dynamo=True, batch=2)
    layer = next(n.input[0] for n in model.graph.node if n.op_type == "LayerNormalization")   # block 1's input
    assert next(i for i in inspect_model(model).layers if i.name == layer).grid is not None
    _check(model, layer, (0, 1, 4, 4), _input(5))


def test_rollout_matches_reference_on_the_bench_vit():
    """The bench recipe's ViT (written without torch, dynamic batch, 3 blocks)."""
    model, layer, tokens = _synthetic()
    _check(model, layer, tokens, _input(6))


def test_the_reference_tells_order_and_residual_apart(models):
    """On these models the comparison can fail: multiplying the blocks in the other order, or
    leaving out the identity, moves the map by far more than the tolerance."""
    model, layer, (cls, first, h, w) = models["vit"]
    weights = mr.attention_probabilities(model, _input(4).astype(np.float64))
    assert len(weights) == 2 and weights[0].shape == (2, 2, 17, 17)
    right = mr.rollout_matrix(weights)[:, cls, first:]
    flipped = mr.rollout_matrix(weights[::-1])[:, cls, first:]
    bare = np.einsum("nij,njk->nik", weights[1].mean(axis=1), weights[0].mean(axis=1))[:, cls, first:]
    for wrong in (flipped, bare):
        assert np.abs(right - wrong).max() > 1e-3 * np.abs(right).max()
    np.testing.assert_allclose(mr.rollout_matrix(weights).sum(axis=-1), 1.0, rtol=1e-12)   # rows stay distributions


def test_rollout_beside_a_sweep_method(models):
    """rollout and mwp in one build at the rollout's layer: mwp's map is the one it has alone."""
    model, layer, _ = models["vit"]
    x = _input(7)
    both = Exciter(model, [layer], methods=("rollout", "mwp")).explain(x, 2)
    alone = Exciter(model, [layer], methods=("mwp",)).explain(x, 2)
    np.testing.assert_array_equal(both.maps["mwp"][layer], alone.maps["mwp"][layer])
    np.testing.assert_array_equal(both.maps["rollout"][layer],
                                  Exciter(model, [layer], methods=("rollout",)).explain(x, 2).maps["rollout"][layer])


def test_rollout_error_lines(models):
    model, layer, _ = models["vit"]
    with pytest.raises(ExciteError, match=r"^rollout: defined only at the tokens the first attention block reads "
                                          r"'/encoder/Add_output_0', not at 'input'$"):
        Exciter(model, ["input"], methods=("rollout",))
    # with a method defined at any layer and no layer named: the graph's default layer, refused by rollout
    with pytest.raises(ExciteError, match=r"^rollout: defined only at .*, not at "
                                          r"'/encoder/layers/encoder_layer_0/Add_1_output_0'$"):
        Exciter(model, None, methods=("rollout", "mwp"))


def test_rollout_refused_without_global_attention():
    """A CNN; Swin's windowed attention; a ViT without a class token (mean-pooled tokens) and the
    MobileViT hybrid (attention over unfolded patches, no class token): one error line each."""
    pytest.importorskip("torchvision")
    import test_blocks as tb

    cnn, layers = tb.resnet_block(0)
    with pytest.raises(ExciteError, match=r"^rollout needs self-attention \(Softmax\(Q K' s \+ bias\) @ V\) on the "
                                          r"path to the logits; the model has none$"):
        Exciter(cnn, layers[:1], methods=("rollout",))
    with pytest.raises(ExciteError, match="^rollout needs self-attention"):
        Exciter(cnn, None, methods=("rollout",))
    no_class_token = r"^rollout needs global self-attention over a class token and the patch tokens \(ViT, DeiT\): "
    for model in (nets.swin_tiny(0), nets.pooled_vit_tiny(0), nets.mobilevit_tiny(0)):
        with pytest.raises(ExciteError, match=no_class_token + r".*windowed attention, as in Swin.*without a class token"):
            Exciter(model, None, methods=("rollout",))


def test_explain_rollout_with_no_option(tmp_path):
    """`onnx-excite explain VIT IMAGE -m rollout`: the map at the rollout's layer on the 4x4 grid,
    a note naming that layer."""
    pytest.importorskip("torchvision")
    from PIL import Image

    path = tmp_path / "vit.onnx"
    onnx.save(nets.vit_tiny(0), str(path))
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    res = CliRunner().invoke(app, ["explain", str(path), str(image), "-m", "rollout", "--output", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert f"no --layer given: maps at {EMBEDDED!r}, the one layer rollout is defined at" in res.output
    maps = sorted((tmp_path / "out").glob("photo.*.rollout.encoder_Add_output_0.npy"))
    assert len(maps) == 1
    m = np.load(maps[0])
    assert m.shape[-2:] == (4, 4) and np.isfinite(m).all() and 0 < m.sum() < 1   # the class token keeps a share
    res = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "rollout" in res.output and "class-agnostic" in res.output


def test_export_rollout_without_a_layer(models, tmp_path):
    """`export` takes the rollout's own layer too; the written model's map is the Exciter's."""
    from onnx_excite.graph.options import BuildOptions
    from onnx_excite.targets.export import export
    from onnx_excite.targets.options import ExportOptions

    import onnxruntime as ort

    model, layer, _ = models["deit"]
    out = tmp_path / "deit_rollout.onnx"
    export(model, out, ExportOptions(build=BuildOptions(layers=[], methods=("rollout",))))
    onnx.checker.check_model(str(out), full_check=True)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert f"rollout:{layer}" in names
    x = _input(8)
    feeds = {"input": x, "excite_signal": np.zeros((2, 10), np.float32)}
    got = dict(zip(names, sess.run(None, feeds)))[f"rollout:{layer}"]
    np.testing.assert_allclose(got, Exciter(model, [layer], methods=("rollout",)).explain(x, 0).maps["rollout"][layer],
                               rtol=1e-6, atol=1e-8)


def test_rollout_nodes_have_cuda_kernels(models):
    """Every node of the forward + rollout + MWP graph has a CUDA kernel (onnxruntime-gpu's table)."""
    from onnx_excite.run.cuda_coverage import check_companion

    model, layer, _ = models["vit"]
    report = check_companion(model, layers=[layer], methods=("rollout", "mwp"))
    assert report.methods == ("rollout", "mwp") and report.fallbacks == []


def test_eval_takes_the_methods_own_layer(tmp_path):
    """eval (model_spec) with no layer named maps rollout at its own layer, CAM at the last
    feature map, and every other method set at the model's default layers."""
    pytest.importorskip("torchvision")
    from conftest import gap_classifier
    from onnx_excite.apps.eval.compute import model_spec

    vit = tmp_path / "vit.onnx"
    onnx.save(nets.vit_tiny(0), str(vit))
    assert model_spec(str(vit), None, ["rollout"], "positive", "pointing", 32).layers == [EMBEDDED]
    assert model_spec(str(vit), None, ["mwp"], "positive", "pointing", 32).layers != [EMBEDDED]
    assert model_spec(str(vit), ["x"], ["rollout"], "positive", "pointing", 32).layers == ["x"]   # named wins
    cnn = tmp_path / "cnn.onnx"
    onnx.save(gap_classifier(7, 6, 2, 1), str(cnn))
    cam = model_spec(str(cnn), None, ["cam"], "positive", "pointing", 32).layers
    from onnx_excite.models.resolve import resolve_model
    assert cam == [resolve_model(str(cnn), fully_conv=True).method_layer(["cam"])] and cam[0]


def test_rollout_on_a_dynamic_batch_export():
    """A ViT exported with a symbolic batch (its V reshaped by shapes computed at run time):
    the rollout's layer and map equal those of the export made at batch 2, against the reference."""
    pytest.importorskip("torchvision")
    dynamic, static = nets.vit_tiny(0, dynamic_batch=True), nets.vit_tiny(0, batch=2)
    x = _input(5)
    ex = Exciter(dynamic, None, methods=("rollout",))
    assert ex.built.layers == [EMBEDDED]
    got = ex.explain(x, 1).maps["rollout"][EMBEDDED]
    want = mr.method_reference(static, x.astype(np.float64), None, [EMBEDDED], "rollout",
                               tokens=(0, 1, 4, 4))["map"][EMBEDDED]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
