"""Builders of small random ONNX CNNs (and a full-width VGG16) for the tests.

Only ``onnx.helper`` / ``numpy_helper`` are used; every model is opset 17, ir_version 8,
has one input "input" of shape (N, C, H, W) with a symbolic batch dim "N" (unless a
static batch is asked for), float32 initializers for all weights, and passes
``onnx.checker.check_model(full_check=True)``.

Public API
----------
random_cnn(seed, **opts) -> onnx.ModelProto
layer_names(model, spatial_only=True) -> list[str]     candidate map layers ("input" first)
input_shape(model) -> (C, H, W)
num_classes(model) -> K
random_input(model, batch=2, seed=0, nonneg=True) -> float32 array (batch, C, H, W)
vgg16_model(batch=None, num_classes=1000, seed=0) -> onnx.ModelProto
vgg16_layer_names() -> list[str]
save_vgg16(path, batch=None, num_classes=1000, seed=0) -> str
"""
from __future__ import annotations


import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

LAYER_OPS = ("Conv", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool")


def _finish_model(nodes, inits, name, in_shape, out_name, out_shape, doc=""):
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, list(out_shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnx-excite-tests.netgen")
    model.ir_version = IR_VERSION
    if doc:
        model.doc_string = doc
    return model


# ----------------------------------------------------------------------------------------
# output-size helpers (ONNX semantics, auto_pad NOTSET)
# ----------------------------------------------------------------------------------------

def conv_out_size(size, k, s, d, pb, pe):
    return (size + pb + pe - d * (k - 1) - 1) // s + 1


def pool_out_size(size, k, s, pb, pe, ceil_mode):
    """Pool output size; None for a ceil_mode configuration whose last window would start
    in the end padding (implementations disagree there, so the generator avoids it)."""
    span = size + pb + pe - k
    if span < 0:
        return None
    floor_out = span // s + 1
    if not ceil_mode:
        return floor_out
    ceil_out = -(-span // s) + 1
    if (ceil_out - 1) * s >= size + pb:
        return None
    return ceil_out


class _Builder:
    def __init__(self, rng, bias):
        self.rng = rng
        self.bias = bias
        self.nodes = []
        self.inits = []
        self.used = set()
        self.features = set()  # what got generated (for coverage tests)

    def uniq(self, name):
        base, i = name, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def init(self, name, arr):
        name = self.uniq(name)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def node(self, op, inputs, name, **attrs):
        """Adds a node whose (single) output tensor has the same name as the node."""
        name = self.uniq(name)
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    def he(self, shape, fan_in):
        return self.rng.normal(size=shape) * np.sqrt(2.0 / max(1, fan_in))

    def small_bias(self, n):
        return self.rng.normal(0.05, 0.1, size=n)


def _choose_conv(rng, h, w, cin):
    """Random Conv geometry that keeps the output >= 1x1; None if nothing fits."""
    for _ in range(20):
        k = int(rng.choice([1, 3, 5]))
        s = int(rng.choice([1, 2]))
        d = int(rng.choice([1, 2])) if k > 1 else 1
        ek = d * (k - 1) + 1
        pmax = max(1, ek // 2)
        if k == 1 and rng.random() < 0.6:
            pads = [0, 0, 0, 0]
        elif rng.random() < 0.5:
            p = int(rng.integers(0, pmax + 1))
            pads = [p, p, p, p]
        else:  # asymmetric [top, left, bottom, right]
            pads = [int(v) for v in rng.integers(0, pmax + 1, size=4)]
            if pads[0] == pads[2] and pads[1] == pads[3]:
                pads[int(rng.integers(0, 4))] += 1
        ho = conv_out_size(h, k, s, d, pads[0], pads[2])
        wo = conv_out_size(w, k, s, d, pads[1], pads[3])
        if ho >= 1 and wo >= 1 and (ho >= 2 or wo >= 2 or h * w <= 4):
            return dict(k=k, s=s, d=d, pads=pads, ho=ho, wo=wo)
    return None


def _choose_pool(rng, h, w, avg):
    for _ in range(20):
        k = int(rng.choice([2, 3]))
        s = int(rng.choice([1, 2]))
        if rng.random() < 0.4:
            pads = [0, 0, 0, 0]
        elif rng.random() < 0.5:
            p = int(rng.integers(0, k))
            pads = [p, p, p, p]
        else:
            pads = [int(v) for v in rng.integers(0, k, size=4)]  # pads < kernel (ORT)
        ceil_mode = int(rng.random() < 0.4)
        ho = pool_out_size(h, k, s, pads[0], pads[2], ceil_mode)
        wo = pool_out_size(w, k, s, pads[1], pads[3], ceil_mode)
        if ho is None or wo is None or ho < 1 or wo < 1:
            continue
        cfg = dict(k=k, s=s, pads=pads, ceil_mode=ceil_mode, ho=ho, wo=wo)
        if avg:
            cfg["count_include_pad"] = int(rng.random() < 0.5)
        return cfg
    return None


def random_cnn(seed: int, *, bias: bool = True, signed: bool = False, softmax: bool | None = None,
               allow_maxpool: bool = True, allow_avgpool: bool = True, head: str | None = None,
               hidden: bool | None = None, dropout: bool | None = None, residual: bool = False,
               num_blocks: int | None = None, in_channels: int | None = None,
               height: int | None = None, width: int | None = None,
               num_classes: int | None = None, batch=None) -> onnx.ModelProto:
    """A small random CNN classifier (all choices drawn from ``np.random.default_rng(seed)``).

    Body: 2-5 blocks, the first always a Conv. Blocks: Conv(2..8 ch, k 1/3/5, stride 1/2,
    dilation 1/2, symmetric or asymmetric pads, bias per ``bias``) -> Relu (with
    ``signed=True`` about half of the convs after the first are left without Relu);
    MaxPool (k 2/3, stride 1/2, pads < k, ceil_mode 0/1); AveragePool (same plus
    count_include_pad 0/1); with ``residual=True`` also Conv-Relu-Conv[-Relu] + skip -> Add -> Relu
    (the Relu after the second conv only when ``signed=False``, so that then every
    activation any rule sees is >= 0 for a non-negative input).

    Head (``head``): "flatten_gemm" (Flatten -> Gemm, random transB/alpha/beta),
    "gap_gemm" (GlobalAveragePool -> Flatten -> Gemm), "matmul" (Flatten -> MatMul -> Add
    bias; no Add when bias=False). ``hidden``: a Gemm -> Relu layer before the final one.
    ``dropout``: a Dropout or Identity somewhere. ``softmax``: trailing Softmax (graph
    output "prob", logits tensor "logits"; otherwise the output is "logits").
    Options left as None are drawn at random. ``bias=False`` -> no bias anywhere.

    Node names equal their output tensor names (conv0, relu0, maxpool1, avgpool2, add3,
    gap, flatten, fc_hidden, relu_hidden, fc, logits, prob ...). Candidate map layers:
    ``layer_names(model)``.
    """
    rng = np.random.default_rng(seed)
    b = _Builder(rng, bias)
    c = int(in_channels if in_channels is not None else rng.integers(1, 5))
    h = int(height if height is not None else rng.integers(8, 25))
    w = int(width if width is not None else rng.integers(8, 25))
    if height is None and width is None and h == w and rng.random() < 0.7:
        w = int(rng.integers(8, 25))
    in_shape = (c, h, w)
    K = int(num_classes if num_classes is not None else rng.integers(3, 11))
    nb = int(num_blocks if num_blocks is not None else rng.integers(2, 6))
    if softmax is None:
        softmax = bool(rng.random() < 0.5)
    if head is None:
        head = str(rng.choice(["flatten_gemm", "gap_gemm", "matmul"]))
    if hidden is None:
        hidden = bool(rng.random() < 0.35)
    if dropout is None:
        dropout = bool(rng.random() < 0.35)
    dropout_at = int(rng.integers(0, nb + 1)) if dropout else -1
    b.used.add("input")

    x = "input"
    kinds = ["conv"]
    for _ in range(nb - 1):
        opts = ["conv", "conv"]
        if allow_maxpool:
            opts.append("maxpool")
        if allow_avgpool:
            opts.append("avgpool")
        if residual:
            opts.append("residual")
        kinds.append(str(rng.choice(opts)))
    if residual and "residual" not in kinds:
        kinds.append("residual")

    def maybe_dropout(i, x):
        if i != dropout_at:
            return x
        if rng.random() < 0.5:
            b.features.add("dropout")
            return b.node("Dropout", [x], f"dropout{i}")
        b.features.add("identity")
        return b.node("Identity", [x], f"identity{i}")

    for i, kind in enumerate(kinds):
        x = maybe_dropout(i, x)
        if kind == "conv":
            cfg = _choose_conv(rng, h, w, c)
            if cfg is None:
                continue
            m = int(rng.integers(2, 9))
            wt = b.init(f"conv{i}.weight", b.he((m, c, cfg["k"], cfg["k"]), c * cfg["k"] ** 2))
            ins = [x, wt]
            if bias and rng.random() < 0.8:
                ins.append(b.init(f"conv{i}.bias", b.small_bias(m)))
            attrs = dict(kernel_shape=[cfg["k"]] * 2, strides=[cfg["s"]] * 2, dilations=[cfg["d"]] * 2,
                         pads=cfg["pads"])
            x = b.node("Conv", ins, f"conv{i}", **attrs)
            b.features.update({f"conv_k{cfg['k']}", f"conv_s{cfg['s']}", f"conv_d{cfg['d']}"})
            if cfg["pads"][0] != cfg["pads"][2] or cfg["pads"][1] != cfg["pads"][3]:
                b.features.add("conv_asym_pads")
            if signed and i > 0 and rng.random() < 0.5:
                b.features.add("signed")
            else:
                x = b.node("Relu", [x], f"relu{i}")
            c, h, w = m, cfg["ho"], cfg["wo"]
        elif kind in ("maxpool", "avgpool"):
            cfg = _choose_pool(rng, h, w, kind == "avgpool")
            if cfg is None:
                continue
            attrs = dict(kernel_shape=[cfg["k"]] * 2, strides=[cfg["s"]] * 2, pads=cfg["pads"],
                         ceil_mode=cfg["ceil_mode"])
            if kind == "maxpool":
                x = b.node("MaxPool", [x], f"maxpool{i}", **attrs)
            else:
                attrs["count_include_pad"] = cfg["count_include_pad"]
                x = b.node("AveragePool", [x], f"avgpool{i}", **attrs)
                b.features.add(f"avgpool_cip{cfg['count_include_pad']}")
            b.features.add(f"{kind}_ceil{cfg['ceil_mode']}")
            if any(cfg["pads"]):
                b.features.add(f"{kind}_pads")
            if cfg["k"] == 3 and cfg["s"] == 2:
                b.features.add(f"{kind}_overlap")
            h, w = cfg["ho"], cfg["wo"]
        elif kind == "residual":
            skip = x
            wa = b.init(f"res{i}a.weight", b.he((c, c, 3, 3), 9 * c))
            wb = b.init(f"res{i}b.weight", b.he((c, c, 3, 3), 9 * c) * 0.5)
            ins_a, ins_b = [x, wa], None
            if bias:
                ins_a.append(b.init(f"res{i}a.bias", b.small_bias(c)))
            y = b.node("Conv", ins_a, f"res{i}a", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
            y = b.node("Relu", [y], f"res{i}a_relu")
            ins_b = [y, wb] + ([b.init(f"res{i}b.bias", b.small_bias(c))] if bias else [])
            y = b.node("Conv", ins_b, f"res{i}b", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
            if not signed:  # keep every activation >= 0 (ResNet-style signed branch only if signed)
                y = b.node("Relu", [y], f"res{i}b_relu")
            x = b.node("Add", [y, skip], f"add{i}")
            x = b.node("Relu", [x], f"res{i}_relu")
            b.features.add("residual")
    x = maybe_dropout(len(kinds), x)

    # ---- head
    if head == "gap_gemm":
        x = b.node("GlobalAveragePool", [x], "gap")
        feat = c
    elif head in ("flatten_gemm", "matmul"):
        feat = c * h * w
    else:
        raise ValueError(f"unknown head {head!r}")
    x = b.node("Flatten", [x], "flatten", axis=1)
    b.features.add(f"head_{head}")

    def gemm(x, fin, fout, name):
        trans_b = int(rng.random() < 0.6)
        alpha = float(rng.choice([1.0, 1.0, 0.5, 2.0]))
        beta = float(rng.choice([1.0, 0.5]))
        wt = b.he((fout, fin), fin) if trans_b else b.he((fin, fout), fin)
        ins = [x, b.init(f"{name}.weight", wt)]
        if bias and rng.random() < 0.85:
            ins.append(b.init(f"{name}.bias", b.small_bias(fout)))
            b.features.add("gemm_bias")
        b.features.add(f"gemm_transB{trans_b}")
        if alpha != 1.0:
            b.features.add("gemm_alpha")
        return b.node("Gemm", ins, name, alpha=alpha, beta=beta, transB=trans_b)

    if hidden:
        units = int(rng.integers(4, 17))
        x = gemm(x, feat, units, "fc_hidden")
        x = b.node("Relu", [x], "relu_hidden")
        feat = units
        b.features.add("hidden")
    if head == "matmul":
        wt = b.init("fc.weight", b.he((feat, K), feat))
        if bias:
            x = b.node("MatMul", [x, wt], "fc")
            x = b.node("Add", [x, b.init("fc.bias", b.small_bias(K))], "logits")
        else:
            x = b.node("MatMul", [x, wt], "logits")
    else:
        x = gemm(x, feat, K, "logits")
    out = x
    if softmax:
        out = b.node("Softmax", [x], "prob", axis=1)
        b.features.add("softmax")

    batch_dim = "N" if batch is None else int(batch)
    model = _finish_model(b.nodes, b.inits, f"random_cnn_{seed}", (batch_dim,) + in_shape, out, (batch_dim, K),
                          doc=f"netgen.random_cnn(seed={seed})")
    entry = model.metadata_props.add()
    entry.key, entry.value = "netgen.features", ",".join(sorted(b.features))
    return model


def features(model) -> set:
    """The feature tags random_cnn recorded in the model's metadata (for coverage checks)."""
    for p in model.metadata_props:
        if p.key == "netgen.features":
            return set(filter(None, p.value.split(",")))
    return set()


def layer_names(model, spatial_only: bool = True) -> list:
    """Candidate map layers: the graph input "input" plus the outputs of Conv / Relu /
    MaxPool / AveragePool / GlobalAveragePool nodes (and of residual Add nodes), in graph
    order. With ``spatial_only`` (default) only rank-4 (N, C, H, W) tensors are kept, i.e.
    the hidden fully-connected Relu is left out; GlobalAveragePool outputs (N, C, 1, 1)
    are kept."""
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits][:1]
    for node in model.graph.node:
        is_res_add = node.op_type == "Add" and not any(i in inits for i in node.input)
        if node.op_type in LAYER_OPS or is_res_add:
            for o in node.output:
                if not spatial_only or ranks.get(o) == 4:
                    names.append(o)
    return names


def input_shape(model) -> tuple:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(int(d.dim_value) for d in dims[1:])


def num_classes(model) -> int:
    return int(model.graph.output[0].type.tensor_type.shape.dim[1].dim_value)


def random_input(model, batch: int = 2, seed: int = 0, nonneg: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch,) + input_shape(model))
    if nonneg:
        x = np.abs(x)
    return x.astype(np.float32)


# ----------------------------------------------------------------------------------------
# VGG16
# ----------------------------------------------------------------------------------------

_VGG16_CFG = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
