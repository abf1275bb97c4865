"""Grad-CAM and Grad-CAM++ (methods ``gradcam``, ``gradcam++``) beyond the builder-vs-reference
test of every method (tests/test_builder_vs_method_ref.py):

* against torch autograd (float64) on torch models exported to ONNX: a small ResNet (BatchNorm
  folded by the exporter, a strided block with a projection shortcut) and torchvision's ViT
  (a conv layer and two token layers, whose positions are the patch tokens), batch 2;
* the random CNNs of the fuzz test (cnn_gen: strides, dilations, groups, pools, signed
  activations, an all-zero or all-negative second sample) against tests/method_ref.py;
* invariants: at the last feature map of a GAP + linear head Grad-CAM is max(CAM, 0) / (H W);
  its channel weights are linear in the signal; the layer rules (no map at the input, nor at
  a layer without positions) in one error line;
* the commands: ``methods`` lists them, ``explain -m gradcam`` writes its maps, ``eval pointing``
  scores them.
"""
import io
import json
import re
import warnings

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import method_ref as mr
from onnx_excite import Exciter
from onnx_excite.errors import ExciteError

torch = pytest.importorskip("torch")
nn = torch.nn

CAMS = (("gradcam", False), ("gradcam++", True))


def _export(module, shape, dynamic=True) -> onnx.ModelProto:
    """The legacy TorchScript exporter (eval mode: BatchNorm folded into the convs), dynamic batch
    unless told otherwise."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.randn(*shape), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}} if dynamic else None)
    return onnx.load_from_string(buf.getvalue())


def _torch_grads(module, modules, x, e):
    """(activations, gradients of e . logits) at the outputs of ``modules``, in float64 (autograd)."""
    module = module.double().eval()
    acts = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, key=key: acts.__setitem__(key, out))
             for key, m in modules.items()]
    try:
        logits = module(torch.from_numpy(np.asarray(x, np.float64)))
    finally:
        for h in hooks:
            h.remove()
    keys = list(modules)
    grads = torch.autograd.grad((logits * torch.from_numpy(np.asarray(e, np.float64))).sum(), [acts[k] for k in keys])
    return {k: acts[k].detach().numpy() for k in keys}, {k: g.numpy() for k, g in zip(keys, grads)}


def _assert_close(got, want, what, rtol=1e-4):
    scale = np.abs(want).max()
    assert scale > 0, what   # a map that is all zero would compare trivially
    assert got.shape == want.shape and np.abs(got - want).max() <= rtol * scale, (what, np.abs(got - want).max(), scale)


# ----------------------------------------------------------------------------------------
# against torch autograd
# ----------------------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)
        self.out = nn.ReLU()

    def forward(self, x):
        skip = x if self.down is None else self.down(x)
        return self.out(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + skip)


class TinyResNet(nn.Module):
    """stem conv-BN-ReLU, max pool, a basic block, a strided block with a 1x1 projection, GAP, fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.block1 = _Block(8, 8, 1)
        self.block2 = _Block(8, 16, 2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.gap(self.block2(self.block1(self.pool(self.stem(x))))), 1))


def tiny_resnet(seed=0):
    torch.manual_seed(seed)
    model = TinyResNet()
    with torch.no_grad():   # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _input(seed, shape=(2, 3, 32, 32)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _tensor_of(model, name_pattern):
    """The output of the one ONNX node whose name matches (the exporter names nodes by module scope)."""
    found = [n.output[0] for n in model.graph.node if re.fullmatch(name_pattern, n.name)]
    assert len(found) == 1, (name_pattern, found)
    return found[0]


def test_grad_cam_equals_torch_autograd_on_a_resnet():
    module = tiny_resnet(0)
    model = _export(module, (1, 3, 32, 32))
    layers = {"block1": _tensor_of(model, "/block1/out/Relu"), "block2": _tensor_of(model, "/block2/out/Relu")}
    x = _input(1)
    e = np.zeros((2, 10), np.float32)
    e[0, 3], e[1, 7] = 1.0, 1.0
    e[1, 2] = 0.5   # a signal of two classes: the score is e . s
    acts, grads = _torch_grads(module, {"block1": module.block1.out, "block2": module.block2.out}, x, e)
    ex = Exciter(model, list(layers.values()), methods=("gradcam", "gradcam++"), channels=True)
    res = ex.explain(x, e)
    for key, layer in layers.items():
        _assert_close(res.channels["gradcam"][layer], grads[key], ("grad", key))
        for name, plus in CAMS:
            _assert_close(res.maps[name][layer], mr.grad_cam_map(acts[key], grads[key], plus), (name, key))
    # block2 is the last feature map (GAP + fc): the graph's suggested layer, explained with no --layer
    assert Exciter(model, methods=("gradcam",)).built.layers == [layers["block2"]]


def test_grad_cam_equals_torch_autograd_on_a_vit():
    """torchvision's ViT (4x4 patches + a class token): the patch-embedding conv output (NCHW) and two
    token layers, the embedded tokens and the last block's input (the default layer); a token
    layer's positions are its 16 patch tokens (the class token takes no part in the mean)."""
    from transformer_nets import vit_tiny_module

    module = vit_tiny_module(0)
    model = _export(module, (2, 3, 32, 32), dynamic=False)   # static shapes: the attention scale folds
    layers = {"conv": "/conv_proj/Conv_output_0", "embedded": "/encoder/Add_output_0",
              "block": "/encoder/layers/encoder_layer_0/Add_1_output_0"}
    hooked = {"conv": module.conv_proj, "embedded": module.encoder.dropout, "block": module.encoder.layers[0]}
    x = _input(2)
    e = np.eye(10, dtype=np.float32)[[3, 8]]
    acts, grads = _torch_grads(module, hooked, x, e)
    ex = Exciter(model, list(layers.values()), methods=("gradcam", "gradcam++"), channels=True)
    assert ex.built.layers[-1] == Exciter(model, methods=("gradcam",)).built.layers[0]   # the default layer
    res = ex.explain(x, e)
    for key, layer in layers.items():
        _assert_close(res.channels["gradcam"][layer], grads[key], ("grad", key))
        for name, plus in CAMS:
            if key == "conv":
                want = mr.grad_cam_map(acts[key], grads[key], plus)
            else:   # tokens (N, 17, C): the patch tokens 1..16, channels last, on the 4x4 grid
                want = mr.grad_cam_map(acts[key][:, 1:], grads[key][:, 1:], plus, channel_axis=2).reshape(2, 4, 4)
            _assert_close(res.maps[name][layer], want, (name, key))


# ----------------------------------------------------------------------------------------
# the fuzz nets against tests/method_ref.py
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_grad_cam_on_random_cnns_matches_method_ref(seed):
    from cnn_gen import input_shape, random_cnn
    from method_nets import feature_layers

    rng = np.random.default_rng(seed)
    kind = seed % 4
    model, layers = random_cnn(10_000 + seed, bias=bool(kind % 2), signed=kind >= 2)
    layers = feature_layers(model, layers)
    assert len(layers) >= 2
    x = rng.normal(size=(2,) + input_shape(model)).astype(np.float32)
    x[1] = 0.0 if seed % 3 == 0 else -np.abs(x[1])    # all-zero or all-negative sample: dead units
    ex = Exciter(model, layers, methods=("gradcam", "gradcam++"))
    signal = rng.random((2, ex.num_classes)).astype(np.float32)
    res = ex.explain(x, signal)
    acts = mr.forward_values(model, x.astype(np.float64))
    for name, plus in CAMS:
        want = mr.method_reference(model, x.astype(np.float64), signal, layers, name)
        for layer in layers:
            got = res.maps[name][layer]
            assert np.isfinite(got).all() and (got >= 0).all(), (seed, name, layer)
            scale = max(np.abs(want["map"][layer]).max(), np.abs(want["P"][layer]).max())
            assert np.abs(got - want["map"][layer]).max() <= 1e-4 * scale * _condition(acts[layer], want["P"][layer], plus) \
                + 1e-30, (seed, name, layer)


def _condition(A, g, plus):
    """How much Grad-CAM++'s weights amplify rounding: its alpha = 1 / (2 + S g) (g > 0) has a
    pole where a signed activation's sum S makes 2 + S g ~ 0; a float32 graph then differs from
    the float64 reference by |S g| / |2 + S g| times the rounding of S g."""
    if not plus:
        return 1.0
    sg = A.sum(axis=tuple(range(2, A.ndim)), keepdims=True) * g
    pos = g > 0
    return max(1.0, float((np.abs(sg) / np.abs(2.0 + sg))[pos].max())) if pos.any() else 1.0


# ----------------------------------------------------------------------------------------
# invariants and the layer rules
# ----------------------------------------------------------------------------------------

def test_grad_cam_at_the_last_feature_map_is_clipped_cam_over_hw():
    """With a GAP + linear head the gradient at the last feature map is W'e / (H W) at every
    position, so Grad-CAM = max(CAM, 0) / (H W); Grad-CAM++ differs (its weights depend on A)."""
    module = tiny_resnet(1)
    model = _export(module, (1, 3, 32, 32))
    layer = _tensor_of(model, "/block2/out/Relu")
    x = _input(3)
    e = np.random.default_rng(3).random((2, 10)).astype(np.float32)
    res = Exciter(model, [layer], methods=("cam", "gradcam", "gradcam++")).explain(x, e)
    cam = res.maps["cam"][layer]
    hw = cam.shape[1] * cam.shape[2]
    _assert_close(res.maps["gradcam"][layer], np.maximum(cam, 0) / hw, "gradcam vs cam", rtol=1e-5)
    assert np.abs(res.maps["gradcam++"][layer] - np.maximum(cam, 0) / hw).max() > 1e-3 * np.abs(cam).max() / hw


def test_grad_cam_weights_are_linear_in_the_signal():
    """The score is e . s, so Grad-CAM's channel weights alpha_c (the mean of P_c over the positions,
    P read off the channels output) are linear in e; the map is so only up to its ReLU."""
    module = tiny_resnet(2)
    model = _export(module, (1, 3, 32, 32))
    layer = _tensor_of(model, "/block1/out/Relu")
    x = _input(4, (1, 3, 32, 32))
    ex = Exciter(model, [layer], methods=("gradcam",), channels=True)
    e1, e2 = np.eye(10, dtype=np.float32)[[1]], np.eye(10, dtype=np.float32)[[6]]
    maps = [ex.explain(x, e).channels["gradcam"][layer].mean(axis=(2, 3)) for e in (e1, e2, e1 + e2)]
    np.testing.assert_allclose(maps[2], maps[0] + maps[1], rtol=1e-5, atol=1e-7)


def test_grad_cam_layer_rules_are_one_error_line():
    model, layers = __import__("method_nets").net("signed", 1)   # conv0, relu0, conv1, relu_hidden (N, C)
    for name, _ in CAMS:
        with pytest.raises(ExciteError, match="^" + re.escape(name) + r": a class activation map of a feature "
                                              r"layer, not of the model's input 'input'; for a map at the input"):
            Exciter(model, ["input"], methods=(name,))
        with pytest.raises(ExciteError, match="^" + re.escape(name) + r": needs a layer with positions .* "
                                              r"'relu_hidden' has rank 2$"):
            Exciter(model, ["conv0", "relu_hidden"], methods=(name, "mwp"))
    Exciter(model, ["input", "relu_hidden"], methods=("grad", "mwp"))   # the other methods keep them


# ----------------------------------------------------------------------------------------
# the commands
# ----------------------------------------------------------------------------------------

def test_methods_command_and_explain_write_grad_cam_maps(tmp_path):
    from conftest import photo
    from onnx_excite.cli.app import app

    runner = CliRunner()
    res = runner.invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "gradcam++" in res.output and "Grad-CAM" in res.output, res.output
    res = runner.invoke(app, ["methods", "--detail"], env={"COLUMNS": "200"})
    detail = re.split(r"\n\S", res.output.split("gradcam++: ")[1])[0]
    assert "map         sum w(P, A) A, clip" in detail and "layers      feature-maps" in detail, detail
    out = tmp_path / "out"
    res = runner.invoke(app, ["explain", "default", str(photo("dog.jpg")), "-t", "249", "-m", "gradcam",
                              "-m", "gradcam++", "-m", "grad", "-o", str(out)])
    assert res.exit_code == 0, res.output
    sharp = tmp_path / "sharp"
    res = runner.invoke(app, ["explain", "default", str(photo("dog.jpg")), "-t", "249", "-m", "gradcam", "--no-blur",
                              "-o", str(sharp)])
    assert res.exit_code == 0, res.output
    for name in ("gradcam", "gradcam++"):
        layer_map = np.load(out / f"dog.249.{name}.features.13.npy")
        assert layer_map.ndim == 2 and (layer_map >= 0).all() and layer_map.max() > 0, name
    # a class activation map is not blurred: the image map is the same with --no-blur
    np.testing.assert_array_equal(np.load(out / "dog.249.gradcam.features.13.image.npy"),
                                  np.load(sharp / "dog.249.gradcam.features.13.image.npy"))
    record = json.loads((out / "explanations.jsonl").read_text().splitlines()[0])
    assert {o["method"] for o in record["outputs"]} == {"gradcam", "gradcam++", "grad"}
    bad = runner.invoke(app, ["explain", "default", str(photo("dog.jpg")), "-m", "gradcam", "-l", "input",
                              "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines()[-1].startswith(
        "error: gradcam: a class activation map of a feature layer, not of the model's input 'input'")


def test_eval_pointing_scores_grad_cam(tmp_path):
    from conftest import VOC_SAMPLE
    from onnx_excite.cli.app import app

    res = CliRunner().invoke(app, ["eval", "pointing", "--data", str(VOC_SAMPLE), "--mapping", "voc_sample_to_imagenet",
                                   "--methods", "gradcam,gradcam++,center", "--layer", "features.18", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"gradcam:features.18", "gradcam++:features.18", "center"} <= set(results["summary"])
    assert results["settings"]["blur"] is True   # the flag; Grad-CAM itself is declared without blur
