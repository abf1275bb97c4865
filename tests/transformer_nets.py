"""Tiny transformer-era classifiers for the tests: torchvision ConvNeXt and ViT exported with
the legacy exporter (random weights, eval mode, opset 17), and hand-built graphs with the
pieces those exports are made of (token-wise MatMul, GELU written out, LayerNormalization and
its decomposed form, RMSNorm, layer scale)."""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper

from test_blocks import G


def _export(module, shape=(1, 3, 32, 32), opset=17, dynamo=False, dynamic_batch=False) -> onnx.ModelProto:
    """``module`` exported at ``shape`` (``dynamic_batch``: the legacy exporter with a symbolic
    batch axis, as most exports are written)."""
    import torch

    if dynamo:   # torch.export + onnxscript (the exporter torch recommends today)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module.eval(), (torch.randn(*shape),), dynamo=True, opset_version=opset,
                                        input_names=["input"], output_names=["logits"], verbose=False)
        return program.model_proto
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = {"input": {0: "N"}, "logits": {0: "N"}} if dynamic_batch else None
        torch.onnx.export(module.eval(), torch.randn(*shape), buf, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


def convnext_tiny(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """torchvision's ConvNeXt with two one-block stages (16 and 32 channels), 10 classes, on 32x32."""
    import torch
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(seed)
    model = ConvNeXt(block_setting=[CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)
    with torch.no_grad():   # layer scale starts at 1e-6: make the blocks' branches count
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.2, 1.0)
    return _export(model, opset=opset)


def vit_tiny(seed: int = 0, opset: int = 17, dynamo: bool = False, batch: int = 1,
             dynamic_batch: bool = False) -> onnx.ModelProto:
    """torchvision's VisionTransformer: 32x32 input, 8x8 patches (a 4x4 grid), 2 layers of 2 heads
    (exported at a fixed ``batch``, or with a symbolic one)."""
    return _export(vit_tiny_module(seed), shape=(batch, 3, 32, 32), opset=opset, dynamo=dynamo,
                   dynamic_batch=dynamic_batch)


def vit_tiny_module(seed: int = 0):
    """The torch module :func:`vit_tiny` exports (eval mode)."""
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    with torch.no_grad():
        model.class_token.normal_()
        model.encoder.pos_embedding.normal_(std=0.2)
        model.heads.head.weight.normal_(std=0.3)
    return model.eval()


def deit_tiny(seed: int = 0, opset: int = 17, batch: int = 1) -> onnx.ModelProto:
    """A DeiT-style ViT: torchvision's VisionTransformer with a distillation token after the
    class token (18 tokens on a 4x4 grid) and two heads, averaged, as DeiT's inference does
    (exported at a fixed ``batch``)."""
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    class DeiT(VisionTransformer):
        def __init__(self):
            super().__init__(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)
            self.dist_token = torch.nn.Parameter(torch.randn(1, 1, 32))
            self.encoder.pos_embedding = torch.nn.Parameter(torch.randn(1, 18, 32) * 0.2)
            self.head_dist = torch.nn.Linear(32, 10)

        def forward(self, x):
            x = self._process_input(x)
            n = x.shape[0]
            x = torch.cat([self.class_token.expand(n, -1, -1), self.dist_token.expand(n, -1, -1), x], dim=1)
            x = self.encoder(x)
            return (self.heads(x[:, 0]) + self.head_dist(x[:, 1])) / 2

    torch.manual_seed(seed)
    model = DeiT()
    with torch.no_grad():
        model.class_token.normal_()
        model.heads.head.weight.normal_(std=0.3)
    return _export(model, shape=(batch, 3, 32, 32), opset=opset)


def pooled_vit_tiny(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """A ViT without a class token: 8x8 patches of a 32x32 input (a 4x4 grid), one pre-norm
    nn.TransformerEncoderLayer, the tokens mean-pooled into a linear head."""
    import torch
    from torch import nn

    class Pooled(nn.Module):
        def __init__(self, d=32):
            super().__init__()
            self.patch = nn.Conv2d(3, d, 8, stride=8)
            self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.2)
            self.block = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, activation="gelu", batch_first=True,
                                                    norm_first=True)
            self.head = nn.Linear(d, 10)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.block(t).mean(dim=1))

    torch.manual_seed(seed)
    return _export(Pooled(), opset=opset)


def swin_tiny(seed: int = 0, opset: int = 17, mask: float = -3.0, batch: int = 1,
              dynamic_batch: bool = False) -> onnx.ModelProto:
    """torchvision's SwinTransformer: 32x32 input, 2x2 patches, two stages of two blocks (the
    second block of each with shifted windows), 4x4 windows, patch merging between the stages.

    ``mask``: the value torchvision's shifted-window mask adds to the attention logits of
    token pairs from different image regions is -100; exp(-100) is below float32's range, so
    there the float32 companion graph drops shares that the float64 reference still sends
    through weights of ~1e-44. -3 keeps both in range (the graph is the same)."""
    import torch
    from onnx import numpy_helper
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    model = SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=10)
    proto = _export(model, shape=(batch, 3, 32, 32), opset=opset, dynamic_batch=dynamic_batch)
    tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    replaced = 0
    for t in tensors:
        a = numpy_helper.to_array(t)
        if a.size == 1 and a.dtype.kind == "f" and float(a.reshape(-1)[0]) == -100.0:
            t.CopyFrom(numpy_helper.from_array(np.full(a.shape, mask, a.dtype), t.name))
            replaced += 1
    assert replaced == 2, replaced   # the mask of each shifted block
    return proto


def mobilevit_tiny(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """A MobileViT-style hybrid: a conv stem, a MobileViT block (a 3x3 and a 1x1 conv, the map
    unfolded into 2x2 patches, a transformer encoder layer over the patches at each of the 4
    pixel positions, folded back, a 1x1 conv, concatenated with the block's input, a 3x3 conv
    fusing them), global pool, linear head; 32x32 input."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c=16, d=24, p=2):
            super().__init__()
            self.p = p
            self.local = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, d, 1))
            self.encoder = nn.TransformerEncoderLayer(d, 2, 48, dropout=0.0, activation="gelu", batch_first=True,
                                                      norm_first=True)
            self.project = nn.Conv2d(d, c, 1)
            self.fuse = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.SiLU())

        def forward(self, x):
            n, _, h, w = x.shape
            y = self.local(x)
            d, p = y.shape[1], self.p
            # unfold: (N, d, h, w) -> (N * p * p, h/p * w/p, d): one sequence of patches per pixel position
            t = y.reshape(n, d, h // p, p, w // p, p).permute(0, 3, 5, 2, 4, 1).reshape(n * p * p, (h // p) * (w // p), d)
            t = self.encoder(t)
            y = t.reshape(n, p, p, h // p, w // p, d).permute(0, 5, 3, 1, 4, 2).reshape(n, d, h, w)
            return self.fuse(torch.cat([x, self.project(y)], dim=1))

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.SiLU(), Block(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 10))
    return _export(model, opset=opset)


def _gelu_erf(g: G, x: str) -> str:
    """x * 0.5 * (1 + erf(x / sqrt 2)) as PyTorch's legacy exporter writes nn.GELU()."""
    e = g.op("Erf", [g.op("Div", [x, g.init(math.sqrt(2.0), "sqrt2")])])
    bracket = g.op("Add", [e, g.init(1.0, "one")])
    return g.op("Mul", [g.op("Mul", [x, bracket]), g.init(0.5, "half")], "gelu")


def _gelu_tanh(g: G, x: str, pow_cube: bool = False) -> str:
    """x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) * 0.5 as PyTorch writes nn.GELU(approximate="tanh")
    (``pow_cube``: x^3 as Pow(x, 3), as other exporters write it)."""
    cube = g.op("Pow", [x, g.init(3.0, "three")]) if pow_cube else g.op("Mul", [x, g.op("Mul", [x, x])])
    inner = g.op("Add", [x, g.op("Mul", [cube, g.init(0.044715, "k")])])
    t = g.op("Tanh", [g.op("Mul", [inner, g.init(math.sqrt(2 / math.pi), "s")])])
    return g.op("Mul", [g.op("Mul", [x, g.op("Add", [g.init(1.0, "one"), t])]), g.init(0.5, "half")], "gelu")


def _quick_gelu(g: G, x: str) -> str:
    """x * sigmoid(1.702 x) (CLIP's QuickGELU)."""
    return g.op("Mul", [x, g.op("Sigmoid", [g.op("Mul", [x, g.init(1.702, "k")])])], "qgelu")


def _layernorm(g: G, x: str, c: int, decomposed: bool, square: str = "pow") -> str:
    """The op, or written out with the square as ``Pow(c, 2)`` or ``Mul(c, c)`` (``square``)."""
    r = g.rng
    gamma, beta = g.init(r.uniform(-1.5, 1.5, c), "gamma"), g.init(r.normal(size=c) * 0.1, "beta")
    if not decomposed:
        return g.op("LayerNormalization", [x, gamma, beta], "ln", axis=-1, epsilon=1e-5)
    axes = dict(axes=[-1], keepdims=1)
    centred = g.op("Sub", [x, g.op("ReduceMean", [x], "mu", **axes)], "centred")
    sq = g.op("Pow", [centred, g.init(2.0, "two")]) if square == "pow" else g.op("Mul", [centred, centred])
    var = g.op("ReduceMean", [sq], "var", **axes)
    sigma = g.op("Sqrt", [g.op("Add", [var, g.init(1e-5, "eps")])], "sigma")
    return g.op("Add", [g.op("Mul", [g.op("Div", [centred, sigma]), gamma]), beta], "ln")


def _rmsnorm(g: G, x: str, c: int) -> str:
    """x / sqrt(mean(x^2) + eps) * gamma (T5 / LLaMA RMSNorm)."""
    ms = g.op("ReduceMean", [g.op("Pow", [x, g.init(2.0, "two")])], "ms", axes=[-1], keepdims=1)
    rms = g.op("Sqrt", [g.op("Add", [ms, g.init(1e-6, "eps")])], "rms")
    return g.op("Mul", [g.op("Div", [x, rms]), g.init(g.rng.uniform(0.5, 1.5, c), "gamma")], "rmsn")


def token_block(seed: int, gelu: str = "erf", norm: str = "op") -> tuple:
    """``norm``: "op", "decomposed" (the square a Pow), "decomposed-mul" (a Mul), "rms".
    Conv stem -> NHWC -> norm -> token-wise MatMul (4-D) + bias -> GELU -> MatMul + bias -> NCHW ->
    layer scale -> residual Add -> ReLU -> GAP -> Gemm. (model, map layers, {layer: channel axis})."""
    g = G(seed, c=3, hw=(6, 5))
    r = g.rng
    stem = g.conv("input", 3, 8)
    nhwc = g.op("Transpose", [stem], "nhwc", perm=[0, 2, 3, 1])
    normed = (_rmsnorm(g, nhwc, 8) if norm == "rms" else
              _layernorm(g, nhwc, 8, decomposed=norm.startswith("decomposed"), square="mul" if norm.endswith("-mul") else "pow"))
    h = g.op("Add", [g.init(r.normal(size=16) * 0.1, "b"),
                     g.op("MatMul", [normed, g.init(r.normal(size=(8, 16)) / np.sqrt(8))], "fc1")], "h")
    act = {"erf": _gelu_erf, "tanh": _gelu_tanh, "tanh-pow": lambda g, h: _gelu_tanh(g, h, True),
           "quick": _quick_gelu}[gelu](g, h)
    y = g.op("Add", [g.op("MatMul", [act, g.init(r.normal(size=(16, 8)) / np.sqrt(16))], "fc2"),
                     g.init(r.normal(size=8) * 0.1, "b")], "y")
    back = g.op("Transpose", [y], "nchw", perm=[0, 3, 1, 2])
    scaled = g.op("Mul", [g.init(r.uniform(0.2, 1.0, (8, 1, 1)), "layer_scale"), back], "scaled")
    out = g.op("Relu", [g.op("Add", [scaled, stem], "res")])
    model = g.model(g.head(out, 8, k=5))
    return model, ["input", stem, normed, act, out], {normed: 3, act: 3}


def gelu_graph(approximate: str, opset: int, pow_cube: bool = False) -> onnx.ModelProto:
    """(1, 6) -> GELU written out -> (1, 6), for the fusion pass."""
    g = G(0)
    y = _gelu_erf(g, "x") if approximate == "none" else _gelu_tanh(g, "x", pow_cube)
    graph = helper.make_graph(g.nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 6])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model
