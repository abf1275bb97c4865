"""Canonicalization: rewrite a user's classifier into the form the rules expect.

Each pass is a small function ``pass(model) -> model`` run in the order of
``PASSES`` (each has its own unit test in tests/test_canonicalize_passes.py);
:func:`canonicalize` loads the model (never touching the user's file), runs
them, resolves the logits (:func:`resolve_logits`, the one place that decides
which output is explained) and returns a :class:`ForwardGraph`, the read-only
view of the forward graph that the rules and the builder work on.
:func:`expose_maxpool_indices` is applied by the builder to the MaxPools on the
excitation path only (the forward alone keeps ONNX Runtime's faster MaxPool).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from ..errors import ExciteError
from .forward import ForwardGraph, LogitsChoice, shape_of
from . import fold_shape_arithmetic, fuse_gelu, fuse_layernorm
from .index import GraphIndex, all_inputs, attr, attrs


def has_role(node: onnx.NodeProto, role: str) -> bool:
    """Whether the op's declaration (:mod:`onnx_excite.rules`) has ``role``."""
    from ..rules import has_role as declared_role   # imported late: the rules import this package

    return declared_role(node, role)

#: The companion graph is emitted in this opset range (CUDA kernels lag newer ones).
MIN_OPSET, MAX_OPSET = 17, 20
MAX_IR_VERSION = 10

#: Ops that turn logits into probabilities at the end of a classifier: the
#: signal enters at their input.


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------
def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """A private copy of the model: a path is read (with external data), a proto is deep-copied;
    ``"default"`` is the default model (see ``onnx_excite.models.default``)."""
    if isinstance(model, onnx.ModelProto):
        return copy.deepcopy(model)
    from onnx_excite.models.default import resolve_model_path

    model = resolve_model_path(model)
    path = Path(model)
    if not path.exists():
        raise ExciteError(f"{path}: no such model file")
    if path.is_dir():
        raise ExciteError(f"{path}: is a directory, expected an .onnx file")
    if not path.is_file():   # a device (/dev/zero) or a pipe would be read without end
        raise ExciteError(f"{path}: not a regular file, expected an .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf raises DecodeError, external data raises others
        raise ExciteError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'parse error'})") from None
    if not proto.graph.node:
        raise ExciteError(f"{path}: not a readable ONNX model (empty graph)")
    return proto


def first_input_name(model) -> str:
    """The model's first real input (initializers listed as inputs skipped); path or proto."""
    graph = load_model(model).graph if not isinstance(model, onnx.ModelProto) else model.graph
    inits = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


# ---------------------------------------------------------------------------
# passes
# ---------------------------------------------------------------------------
def upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Bring the default-domain opset into [MIN_OPSET, MAX_OPSET]."""
    version = default_opset(model)
    if MIN_OPSET <= version <= MAX_OPSET:
        return model
    target = MIN_OPSET if version < MIN_OPSET else MAX_OPSET
    if model.ir_version < 4:
        model.ir_version = 4  # initializers need no longer be graph inputs (dropped above)
    light, big = _weightless(model)   # the converter copies the model several times: not the weights
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(light, target)
        onnx.checker.check_model(converted)
    except Exception as exc:
        if version > MAX_OPSET:
            return model  # newer opsets run in ONNX Runtime on the CPU; keep them as they are
        raise ExciteError(f"cannot convert the model from opset {version} to {target}: {str(exc).splitlines()[0]}") from None
    names = {t.name for t in big}
    inputs = [i for i in converted.graph.input if i.name not in names]
    del converted.graph.input[:]
    converted.graph.input.extend(inputs)
    converted.graph.initializer.extend(big)
    _restore_tensor_names(model, converted)
    return converted


def _keep_upsample_coordinates(node: onnx.NodeProto) -> None:
    """Upsample (opset 7-9) and Resize-10 map output x to input x / scale (nearest: floor); the
    converted Resize-11+ would default to half_pixel / round_prefer_floor and change the outputs."""
    have = {a.name for a in node.attribute}
    if "coordinate_transformation_mode" not in have:
        node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
    if "nearest_mode" not in have:
        node.attribute.append(helper.make_attribute("nearest_mode", "floor"))


def _restore_tensor_names(original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """The version converter renames the outputs of the nodes it replaces (Upsample -> Resize
    gets ``_v_24``): give them back their names, which the user passes as layers; and it drops
    the coordinate mode of Upsample / Resize-10. The converted nodes, less the Constant nodes
    it adds, match the original ones in order."""
    before = list(original.graph.node)
    known = {o for n in before for o in n.output} | {i.name for i in original.graph.input}
    after = [n for n in converted.graph.node if not (n.op_type == "Constant" and not set(n.output) & known)]
    if len(after) != len(before):
        return
    rename = {}
    for old, new in zip(before, after):
        if len(old.output) != len(new.output):
            return
        rename.update({b: a for a, b in zip(old.output, new.output) if a and b and a != b})
        if new.op_type == "Resize" and (old.op_type == "Upsample" or default_opset(original) < 11):
            _keep_upsample_coordinates(new)
    if not rename or set(rename.values()) & {o for n in converted.graph.node for o in n.output if o not in rename}:
        return
    for node in converted.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for i, name in enumerate(node.output):
            if name in rename:
                node.output[i] = rename[name]
    for value in list(converted.graph.output) + list(converted.graph.value_info):
        if value.name in rename:
            value.name = rename[value.name]


def _weightless(model: onnx.ModelProto):
    """(copy without the large initializers, which become typed graph inputs; those initializers)."""
    light = onnx.ModelProto(ir_version=max(model.ir_version, 4), producer_name=model.producer_name)
    light.opset_import.extend(model.opset_import)
    light.graph.name = model.graph.name
    light.graph.node.extend(model.graph.node)
    inits = {t.name for t in model.graph.initializer}
    light.graph.input.extend(i for i in model.graph.input if i.name not in inits)  # (old exporters list them too)
    light.graph.output.extend(model.graph.output)
    big = []
    for t in model.graph.initializer:
        if np.prod(t.dims, dtype=np.int64) > 4096:
            big.append(t)
            light.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            light.graph.initializer.append(t)
    return light, big


def drop_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Old exporters also list initializers as graph inputs; they are constants."""
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """``Constant`` nodes holding a tensor become initializers."""
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = numpy_helper.to_array(node.attribute[0].t)
            model.graph.initializer.append(numpy_helper.from_array(tensor, node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


#: never evaluated at build time
_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes whose inputs are all constants become initializers (weights computed by
    ConstantOfShape in structure-only models, per-channel scales built from constants,
    transposed or reshaped weights), evaluated once with onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    values = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        ins = [i for i in node.input if i]
        if (ins and all(i in values for i in ins) and node.op_type not in _NOT_FOLDED
                and node.domain in ("", "ai.onnx")):
            try:
                graph = helper.make_graph([node], "fold", [], [helper.make_empty_tensor_value_info(o) for o in node.output],
                                          [values[i] for i in ins])
                folded = ReferenceEvaluator(helper.make_model(graph, opset_imports=model.opset_import)).run(None, {})
            except Exception:
                folded = None
            if folded is not None:
                for name, value in zip(node.output, folded):
                    tensor = numpy_helper.from_array(np.asarray(value), name)
                    model.graph.initializer.append(tensor)
                    values[name] = tensor
                continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node gets a unique, non-empty name (rules memoise on node names)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    return model


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference on a weightless copy (large initializers become typed graph inputs,
    so hundreds of MB of weights are not serialised), its value_info copied back.

    Shapes come from the graph inputs alone: the model's own value_info is dropped and its
    outputs' declared shapes are not fed to the inference, so a static dim an exporter wrote
    for one input size (stale value_info, an output declared for batch 1 of a model whose
    batch is symbolic) never reaches a graph whose input leaves that dim symbolic. An
    output whose shape cannot be inferred keeps the one it declares."""
    light, big_inits = _weightless(model)
    big = {t.name for t in big_inits}
    for o in light.graph.output:
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    try:
        inferred = shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise ExciteError(f"shape inference failed: {str(exc).splitlines()[0]}") from None
    del model.graph.value_info[:]
    model.graph.value_info.extend(vi for vi in inferred.graph.value_info if vi.name not in big)
    outputs = {o.name: o for o in inferred.graph.output
               if o.type.HasField("tensor_type") and o.type.tensor_type.HasField("shape")}
    for o in model.graph.output:
        if o.name in outputs:
            o.CopyFrom(outputs[o.name])
    return model


def _ceil_out(size: int, k: int, s: int, d: int, pb: int, pe: int) -> int:
    """Pool output size in ceil mode as ONNX Runtime computes it (windows that would
    start in the right padding are dropped; onnx's shape inference keeps them)."""
    eff = (k - 1) * d + 1
    out = -(-(size + pb + pe - eff) // s) + 1
    if (out - 1) * s >= size + pb:
        out -= 1
    return out


def ceil_pools_to_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ceil_mode=1 pools as ceil_mode=0 pools with wider end pads.

    The same windows are computed (MaxPool ignores pads, AveragePool without
    count_include_pad does not count them), shape inference then agrees with
    ONNX Runtime, and the rules see one geometry. Pools whose input size is
    unknown, and count_include_pad AveragePools, are left as they are.
    """
    while True:
        inferred = infer_shapes(model)
        shapes = {vi.name: shape_of(vi) for vi in list(inferred.graph.input) + list(inferred.graph.value_info)}
        changed = False
        for node in model.graph.node:
            if node.op_type not in ("MaxPool", "AveragePool"):
                continue
            a = attrs(node)
            if not a.get("ceil_mode", 0) or a.get("auto_pad", "NOTSET") != "NOTSET":
                continue
            if node.op_type == "AveragePool" and a.get("count_include_pad", 0):
                continue
            shape = shapes.get(node.input[0])
            if shape is None or any(d is None for d in shape[2:]):
                continue
            kernel = list(a["kernel_shape"])
            n = len(kernel)
            strides = list(a.get("strides", [1] * n))
            dil = list(a.get("dilations", [1] * n))
            pads = list(a.get("pads", [0] * 2 * n))
            for i in range(n):
                out = _ceil_out(shape[2 + i], kernel[i], strides[i], dil[i], pads[i], pads[i + n])
                pads[i + n] = max(pads[i + n], (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - shape[2 + i] - pads[i])
            keep = [a for a in node.attribute if a.name not in ("ceil_mode", "pads")]
            del node.attribute[:]
            node.attribute.extend(keep + [helper.make_attribute("pads", pads)])
            changed = True
            break  # shapes downstream change: infer again
        if not changed:
            return model


#: the element-wise ops :func:`fold_affine` folds into a Conv or dense layer
#: metadata key prefix under which the folding passes record the tensor names they remove
#: (read and dropped by :func:`make_view`, which puts them in ``ForwardGraph.folded``)
FOLDED_KEY = "onnx_excite.folded:"


def _record_folded(model: onnx.ModelProto, vanished: Sequence[str], into: str) -> None:
    """Note that the tensors ``vanished`` are now computed as part of ``into`` (earlier
    records that pointed at a vanished name are moved on to ``into``)."""
    gone = set(vanished)
    for prop in model.metadata_props:
        if prop.key.startswith(FOLDED_KEY) and prop.value in gone:
            prop.value = into
    for name in vanished:
        if name and name != into:
            model.metadata_props.add(key=FOLDED_KEY + name, value=into)


def folded_names(model: onnx.ModelProto) -> dict[str, str]:
    """{tensor name removed by a folding pass: the tensor it was folded into}."""
    return {p.key[len(FOLDED_KEY):]: p.value for p in model.metadata_props if p.key.startswith(FOLDED_KEY)}


def folded_message(what: str, name: str, into: str, op: str = "Conv") -> str:
    """The one error line for a name that a folding pass removed (``op``: the op type of the
    layer that now outputs ``into``, Conv or Gemm)."""
    return (f"{what} {name!r} was folded into the {op} that now outputs {into!r} (canonicalization merges a "
            f"BatchNorm or per-channel Mul/Div/Add/Sub after a Conv, Gemm or MatMul into that layer); use {into!r}")


def _channel_vector(c: np.ndarray, channels: int, out_rank: int) -> np.ndarray | None:
    """``c`` as a (channels,) float64 vector when it broadcasts against a (N, channels, ...)
    layer output of rank ``out_rank`` as a scalar or per output channel, else None."""
    if c.dtype.kind != "f" or c.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - c.ndim) + c.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,)).copy()


def _tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """{tensor: rank} from shape inference on a weightless copy ({} where it fails)."""
    light, _ = _weightless(model)
    try:
        inferred = shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    values = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    return {vi.name: len(s) for vi in values if (s := shape_of(vi)) is not None}


class _UnitAffineLayer:
    """A Conv or dense layer whose weight W and bias b are constants, seen per output unit k
    (Conv: output channel, dense: output feature). A per-unit affine map after it,
    ``y_k -> s_k y_k + t_k``, is folded as W_k' = s_k W_k, b_k' = s_k b_k + t_k (in float64;
    written back in W's dtype, so float16 models stay float16).

    * Conv: W (M, C/group, k...), b (M,) (zeros where the Conv has none).
    * dense: W (K, M) = alpha * B' (B' = B, or B^T for transB = 1), b = beta * C broadcast to
      (M,) (zeros where there is no C); a Gemm with transA = 0 and a constant B (any 2-D input,
      as Gemm requires), or a MatMul with a constant 2-D B and a 2-D input. Written back as
      ``Gemm(x, B_new, C_new)`` with alpha = beta = 1 and transB as the Gemm had it (0 for a
      MatMul: a MatMul whose chain folds becomes a Gemm, which carries the folded bias in the
      same node; the dense rule treats both alike and ignores the bias).
    """

    def __init__(self, node, w, b, axis, dtype, out_rank):
        self.node, self.w, self.b, self.axis, self.dtype, self.out_rank = node, w, b, axis, dtype, out_rank

    @property
    def units(self) -> int:
        return self.w.shape[self.axis]

    @classmethod
    def of(cls, node, index: GraphIndex, ranks: Callable[[], dict]) -> "_UnitAffineLayer | None":
        """The layer ``node`` is, or None when it is not a foldable Conv / Gemm / MatMul
        (``ranks``: called for the tensor ranks only when a MatMul needs them)."""
        inits = index.initializers
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul"):
            return None
        if len(node.input) < 2 or node.input[1] not in inits:
            return None
        raw = index.array(node.input[1])
        if raw.dtype.kind != "f":
            return None
        bias = node.input[2] if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2] else None
        if bias is not None and bias not in inits:
            return None
        w = raw.astype(np.float64)
        if node.op_type == "Conv":
            b = index.array(bias).astype(np.float64) if bias is not None else np.zeros(w.shape[0])
            return cls(node, w, b, 0, raw.dtype, w.ndim)
        if w.ndim != 2:
            return None
        if node.op_type == "MatMul":
            if ranks().get(node.input[0]) != 2:
                return None
            return cls(node, w, np.zeros(w.shape[1]), 1, raw.dtype, 2)
        if attr(node, "transA", 0):
            return None
        w = float(attr(node, "alpha", 1.0)) * (w.T if attr(node, "transB", 0) else w)
        b = np.zeros(w.shape[1])
        if bias is not None:
            c = _channel_vector(index.array(bias), w.shape[1], 2)
            if c is None:      # a C that varies over the batch axis: not a per-feature bias
                return None
            b = float(attr(node, "beta", 1.0)) * c
        return cls(node, w, b, 1, raw.dtype, 2)

    def scale(self, s: np.ndarray) -> None:
        """y_k -> s_k y_k."""
        shape = [1] * self.w.ndim
        shape[self.axis] = -1
        self.w, self.b = self.w * s.reshape(shape), self.b * s

    def shift(self, t: np.ndarray) -> None:
        """y_k -> y_k + t_k."""
        self.b = self.b + t

    def write(self, graph: onnx.GraphProto, taken: set[str], parts: tuple[str, str]) -> list[str]:
        """Store the folded W and b as new initializers (unique names ``<node>.<part>``), point
        the node at them; the names of the constants it read before are returned."""
        node, names = self.node, []
        for part in parts:
            name, k = f"{node.name}.{part}", 0
            while name in taken:
                k += 1
                name = f"{node.name}.{part}{k}"
            taken.add(name)
            names.append(name)
        w = self.w
        if node.op_type != "Conv":
            flip = node.op_type == "Gemm" and attr(node, "transB", 0)
            w = w.T if flip else w
            keep = [a for a in node.attribute if a.name not in ("alpha", "beta", "transA", "transB")]
            del node.attribute[:]
            node.attribute.extend(keep + ([helper.make_attribute("transB", 1)] if flip else []))
            node.op_type = "Gemm"
        graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(w).astype(self.dtype), names[0]),
                                  numpy_helper.from_array(self.b.astype(self.dtype), names[1])])
        replaced = [i for i in node.input[1:] if i]
        del node.input[1:]
        node.input.extend(names)
        return replaced


def _lazy_ranks(model: onnx.ModelProto) -> Callable[[], dict]:
    cache: list[dict] = []

    def ranks() -> dict:
        if not cache:
            cache.append(_tensor_ranks(model))
        return cache[0]
    return ranks


def _drop_nodes(graph: onnx.GraphProto, dropped: set[int], replaced: set[str]) -> None:
    """Remove the nodes ``dropped`` (ids) and the initializers ``replaced`` that nothing reads any more."""
    if not dropped:
        return
    keep = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in all_inputs(n)} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name in replaced and t.name not in used]
    for t in unused:
        graph.initializer.remove(t)


def _batchnorm_affine(bn: onnx.NodeProto, index: GraphIndex, units: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with BatchNormalization(y)_k = s_k y_k + t_k (inference: s = gamma / sqrt(var + eps),
    t = beta - mean s, float64), or None when ``bn`` has a used second output, non-constant
    parameters or parameters that are not one value per unit."""
    if (bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or any(bn.output[1:])
            or attr(bn, "training_mode", 0)):   # batch statistics: no fixed affine map (the rule refuses it)
        return None
    params = list(bn.input[1:5])
    if len(params) != 4 or any(p not in index.initializers for p in params):
        return None
    gamma, beta, mean, var = (index.array(p).astype(np.float64).reshape(-1) for p in params)
    if any(v.shape != (units,) for v in (gamma, beta, mean, var)):
        return None
    return batchnorm_affine(gamma, beta, mean, var, attr(bn, "epsilon", 1e-5))


def batchnorm_affine(gamma, beta, mean, var, epsilon) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) of inference BatchNormalization y = s x + t: s = gamma / sqrt(var + eps),
    t = beta - mean s (float64 in, float64 out). The fold pass and the rule of an unfolded
    BatchNormalization both use it."""
    scale = gamma / np.sqrt(var + epsilon)
    return scale, beta - mean * scale


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv -> BatchNormalization (inference), or dense -> BatchNormalization on its (N, M)
    output, becomes one Conv / Gemm with scaled weights (see :class:`_UnitAffineLayer` for
    which Gemm / MatMul are dense layers and how they are written back).

    W'_k = W_k s_k, b'_k = (b_k - mean_k) s_k + beta_k, s = gamma / sqrt(var + eps), per
    output unit k, in float64. A negative gamma flips the signs of W', which is why the clamp
    to W+ must come after this fold. A BatchNormalization that does not follow such a layer
    whose output it alone consumes (and that is no graph output) is left for its own rule (a
    per-channel linear layer).
    """
    graph = model.graph
    index = GraphIndex(graph)
    ranks = _lazy_ranks(model)
    taken = set(index.tensor_names())
    dropped: set[int] = set()
    replaced: set[str] = set()
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization":
            continue
        producer = index.producer.get(bn.input[0])
        if producer is None or index.consumer_count(producer.output[0]) != 1:
            continue
        layer = _UnitAffineLayer.of(producer, index, ranks)
        affine = _batchnorm_affine(bn, index, layer.units) if layer is not None else None
        if affine is None:
            continue
        layer.scale(affine[0])
        layer.shift(affine[1])
        replaced.update(layer.write(graph, taken, ("folded_weight", "folded_bias")))
        replaced.update(bn.input[1:5])
        _record_folded(model, [producer.output[0]], bn.output[0])
        producer.output[0] = bn.output[0]
        dropped.add(id(bn))
    _drop_nodes(graph, dropped, replaced)
    return model


def fold_affine(model: onnx.ModelProto) -> onnx.ModelProto:
    """Per-channel affine ops after a Conv or a dense layer (a BatchNorm written decomposed, as
    tf2onnx and paddle2onnx do; Keras' ``Dense -> BatchNormalization`` is MatMul -> Add(bias)
    -> Mul -> Add) become part of the layer, so the maps do not depend on the exporter.

    Starting at a Conv / Gemm / MatMul whose weight W (and bias b, if any) are initializers
    (:class:`_UnitAffineLayer`: which Gemm / MatMul count, and how they are written back):
    while the layer's current output has exactly one consumer (and is not a graph output) and
    that consumer is Mul / Div / Add / Sub whose other input is a float initializer ``c`` that
    is a scalar or per output unit (after numpy broadcasting against the (N, C, ...) Conv
    output or the (N, M) dense output: all non-unit dims 1, rank <= the output's), it is
    folded, per output unit k:

    * ``x * c``, ``c * x``: W_k *= c_k, b_k *= c_k
    * ``x / c``: W_k /= c_k, b_k /= c_k (not folded when c has a 0)
    * ``x + c``, ``c + x``: b_k += c_k
    * ``x - c``: b_k -= c_k;  ``c - x``: W_k = -W_k, b_k = c_k - b_k
    * a BatchNormalization (inference, as in :func:`fold_batchnorm`) further down the chain,
      e.g. after a bias Add: W_k *= s_k, b_k = b_k s_k + beta_k - mean_k s_k

    in float64, stored in W's dtype (float16 models stay float16); a layer without bias gets
    one (so a MatMul with its bias Add becomes one Gemm). The layer takes over the last
    folded op's output name (the tensors in between are recorded in the model's metadata,
    see :func:`folded_names`). As with :func:`fold_batchnorm`, a negative scale flips the
    signs of W, which the clamp to W+ must see. Other constants (per-pixel, per-sample, full
    tensor, integer), an output with two or more consumers, or a graph output: left for the
    element-wise rules; the chain stops at the first op that cannot fold.
    """
    graph = model.graph
    index = GraphIndex(graph)
    inits = index.initializers
    ranks = _lazy_ranks(model)
    taken = set(index.tensor_names())
    dropped: set[int] = set()
    replaced: set[str] = set()
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or index.consumer_count(node.output[0]) != 1:
            continue
        first = index.consumers.get(node.output[0], [None])[0]
        if first is None or not (has_role(first, "affine") or first.op_type == "BatchNormalization"):
            continue
        layer = _UnitAffineLayer.of(node, index, ranks)
        if layer is None:
            continue
        chain, out = [], node.output[0]
        while True:
            users = index.consumers.get(out, [])
            if len(users) != 1 or out in index.outputs:
                break
            op = users[0]
            affine = _batchnorm_affine(op, index, layer.units) if op.op_type == "BatchNormalization" else None
            if affine is not None:   # a BatchNormalization further down the chain (after a bias Add)
                layer.scale(affine[0])
                layer.shift(affine[1])
                chain.append(op)
                out = op.output[0]
                continue
            if not has_role(op, "affine") or len(op.input) != 2:
                break
            if op.input[0] == out and op.input[1] != out:
                other, x_first = op.input[1], True
            elif op.input[1] == out and op.input[0] != out:
                other, x_first = op.input[0], False
            else:
                break
            c = _channel_vector(index.array(other), layer.units, layer.out_rank) if other in inits else None
            if c is None or (op.op_type == "Div" and (not x_first or np.any(c == 0))):
                break
            if op.op_type == "Mul":
                layer.scale(c)
            elif op.op_type == "Div":
                layer.scale(1.0 / c)
            elif op.op_type == "Add":
                layer.shift(c)
            elif x_first:   # x - c
                layer.shift(-c)
            else:           # c - x
                layer.scale(-np.ones_like(c))
                layer.shift(c)
            chain.append(op)
            out = op.output[0]
        if not chain:
            continue
        replaced.update(layer.write(graph, taken, ("affine_weight", "affine_bias")))
        replaced.update(i for n in chain for i in n.input)
        vanished = [node.output[0]] + [n.output[0] for n in chain[:-1]]
        node.output[0] = out
        _record_folded(model, vanished, out)
        dropped.update(id(n) for n in chain)
    _drop_nodes(graph, dropped, replaced)
    return model


def split_to_slices(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Split whose piece sizes are known becomes one Slice per piece (same output names).

    The rules see single-output nodes only; a Slice hands each piece's P back to its cells.
    A Split whose sizes depend on a dynamic dimension is left (and reported by ``check``).
    """
    splits = [n for n in model.graph.node if n.op_type == "Split" and n.domain in ("", "ai.onnx")]
    if not splits:
        return model
    index = GraphIndex(model.graph)
    shapes = {}
    if any(len(n.input) < 2 or not n.input[1] for n in splits):
        inferred = infer_shapes(copy.deepcopy(model))
        shapes = {vi.name: shape_of(vi) for vi in list(inferred.graph.input) + list(inferred.graph.value_info)}
    taken = {n.name for n in model.graph.node} | set(index.tensor_names())
    new_nodes = []
    for node in model.graph.node:
        if not any(node is s for s in splits):
            new_nodes.append(node)
            continue
        axis = attr(node, "axis", 0)
        sizes = None
        if len(node.input) > 1 and node.input[1]:
            value = index.array(node.input[1])
            sizes = None if value is None else [int(v) for v in value.ravel()]
        else:
            shape = shapes.get(node.input[0])
            n = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
            if attr(node, "split"):
                sizes = list(attr(node, "split"))
            elif n is not None:
                k = len(node.output)
                chunk = -(-n // k)   # opset 18 num_outputs: equal chunks, the last one smaller
                sizes = [min(chunk, n - i * chunk) for i in range(k)]
        if sizes is None or len(sizes) != len(node.output):
            new_nodes.append(node)
            continue
        start = 0
        for i, (out, size) in enumerate(zip(node.output, sizes)):
            names = []
            for part, value in (("starts", start), ("ends", start + size), ("axes", axis)):
                name = f"{node.name}.{part}{i}"
                while name in taken:
                    name += "_"
                taken.add(name)
                model.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
                names.append(name)
            start += size
            if out:
                new_nodes.append(helper.make_node("Slice", [node.input[0]] + names, [out], name=f"{node.name}.slice{i}"))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return model


def _all_names(graph: onnx.GraphProto, skip: onnx.NodeProto | None = None) -> set[str]:
    """Every tensor name of ``graph`` and of its subgraphs (but those of node ``skip``)."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o.name for o in graph.output}
    for n in graph.node:
        names.update(o for o in n.output if o)
        if n is not skip:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    names |= _all_names(a.g)
    return names


def _inline_branch(node: onnx.NodeProto, branch: onnx.GraphProto, taken: set[str]) -> tuple[list, list]:
    """(nodes, initializers) computing the If node's outputs from ``branch``: the branch's
    outputs take the If's output names, its other local names are renamed where they clash."""
    local = [t.name for t in branch.initializer] + [o for n in branch.node for o in n.output if o]
    rename: dict[str, str] = {}
    tail = []
    for b_out, if_out in zip((o.name for o in branch.output), node.output):
        if b_out in local and b_out not in rename:
            rename[b_out] = if_out
        else:  # an outer tensor, or a local one already bound to another output
            tail.append((b_out, if_out))
    for name in local:
        if name not in rename:
            new, k = name, 0
            while new in taken:
                k += 1
                new = f"{name}.if{k}"
            rename[name] = new
            taken.add(new)
    inits = []
    for t in branch.initializer:
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = rename[t.name]
        inits.append(c)
    nodes = []
    for n in branch.node:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.input[:] = [rename.get(i, i) if i else i for i in n.input]
        c.output[:] = [rename.get(o, o) if o else o for o in n.output]
        nodes.append(c)
    for b_out, if_out in tail:
        nodes.append(helper.make_node("Identity", [rename.get(b_out, b_out)], [if_out], name=f"{node.name or if_out}.branch_out"))
    return nodes, inits


def inline_constant_if(model: onnx.ModelProto) -> onnx.ModelProto:
    """An ``If`` whose condition is a constant becomes the nodes of the branch it takes.

    Exporters leave such Ifs behind (shape checks traced with a fixed input); left
    in place, the layers inside the branch would be invisible to the rules. After
    inlining, the new constants are folded and nested constant Ifs inlined too.
    """
    while True:
        inits = {t.name: t for t in model.graph.initializer}
        kept, changed, added = [], False, set()
        for node in model.graph.node:
            if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input[0] in inits:
                cond = bool(numpy_helper.to_array(inits[node.input[0]]).reshape(-1)[0])
                branch = attr(node, "then_branch" if cond else "else_branch")
                taken = _all_names(model.graph, skip=node) | set(inits) | added
                nodes, new_inits = _inline_branch(node, branch, taken)
                added |= {o for n in nodes for o in n.output} | {t.name for t in new_inits}
                kept.extend(nodes)
                model.graph.initializer.extend(new_inits)
                changed = True
            else:
                kept.append(node)
        if not changed:
            return model
        del model.graph.node[:]
        model.graph.node.extend(kept)
        model = fold_constants(constants_to_initializers(model))


def expose_maxpool_indices(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto] | None = None) -> onnx.ModelProto:
    """Give each MaxPool (of ``nodes``, default all) an ``Indices`` output: where each
    maximum came from, which the MaxPool rule scatters P back to."""
    chosen = {id(n) for n in nodes} if nodes is not None else None
    taken = set(GraphIndex(model.graph).tensor_names())
    for node in model.graph.node:
        if node.op_type != "MaxPool" or (chosen is not None and id(node) not in chosen):
            continue
        if len(node.output) >= 2 and node.output[1]:
            continue
        name, k = f"{node.name or node.output[0]}.indices", 0
        while name in taken:
            k += 1
            name = f"{node.name or node.output[0]}.indices{k}"
        taken.add(name)
        if len(node.output) < 2:
            node.output.append(name)
        else:
            node.output[1] = name
    return model


PASSES: list[Callable[[onnx.ModelProto], onnx.ModelProto]] = [
    drop_initializer_inputs,
    constants_to_initializers,
    fold_constants,
    inline_constant_if,
    name_nodes,
    upgrade_opset,
    fold_shape_arithmetic.run,
    fuse_gelu.run,
    fuse_layernorm.run,
    fold_batchnorm,
    fold_affine,
    split_to_slices,
    ceil_pools_to_pads,
    infer_shapes,
]


# ---------------------------------------------------------------------------
# which output holds the logits
# ---------------------------------------------------------------------------
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _below_squashers(index: GraphIndex, name: str) -> tuple[str, bool]:
    """(the tensor below trailing Softmax/LogSoftmax/Sigmoid and shape-only ops, whether one was passed)."""
    t, node, squashed = name, index.producer.get(name), False
    while node is not None and (has_role(node, "squasher") or has_role(node, "shape-only")):
        t = node.input[0]
        if has_role(node, "squasher"):
            name, squashed = t, True
        node = index.producer.get(t)
    return name, squashed


def resolve_logits(model: onnx.ModelProto, logits: str | None = None) -> LogitsChoice:
    """The one resolution of the logits every command and the library use.

    A given name must be a tensor of the model. Without one: the only float 2-D
    output; among several, the one fed by a Softmax (LogSoftmax, Sigmoid); else
    the one computed by the last Gemm/MatMul of the graph; else the widest
    (largest class dimension). The signal enters below a trailing Softmax.
    """
    index = GraphIndex(model.graph)
    outputs = [o.name for o in model.graph.output]
    vis = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output)}

    def float_2d(name):
        vi = vis.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            return False
        shape = shape_of(vi)
        return vi.type.tensor_type.elem_type in _FLOAT_TYPES and shape is not None and len(shape) == 2

    candidates = tuple(o for o in outputs if float_2d(o))
    if logits is not None:
        if logits not in outputs and logits not in index.producer:
            into = folded_names(model).get(logits)
            if into is not None:
                layer = index.producer.get(into)
                raise ExciteError(folded_message("logits", logits, into, layer.op_type if layer is not None else "layer"))
            import difflib

            names = outputs + [o for n in model.graph.node for o in n.output if o]
            close = difflib.get_close_matches(logits, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ExciteError(f"logits {logits!r} is not a tensor of the model (outputs: {', '.join(outputs)}){hint}")
        return LogitsChoice(_below_squashers(index, logits)[0], logits, "given", candidates)
    if len(candidates) <= 1:
        out = candidates[0] if candidates else outputs[0]
        return LogitsChoice(_below_squashers(index, out)[0], out, "the only float 2-D output" if candidates
                            else "the first output", candidates)
    squashed = [o for o in candidates if _below_squashers(index, o)[1]]
    pool = squashed or list(candidates)
    if len(squashed) == 1:
        out = squashed[0]
        return LogitsChoice(_below_squashers(index, out)[0], out, "fed by a Softmax", candidates)
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    dense = {}
    for o in pool:
        node = index.producer.get(_below_squashers(index, o)[0])
        if node is not None and node.op_type in ("Gemm", "MatMul"):
            dense[o] = order[id(node)]
    if dense:
        out = max(dense, key=dense.get)
        return LogitsChoice(_below_squashers(index, out)[0], out, "computed by the last Gemm/MatMul", candidates)

    def width(o):
        d = shape_of(vis[o])[1]
        return d if d is not None else -1

    out = max(pool, key=width)  # first of the widest
    return LogitsChoice(_below_squashers(index, out)[0], out, "the widest output", candidates)


def make_view(model: onnx.ModelProto, logits: LogitsChoice | str) -> ForwardGraph:
    if isinstance(logits, str):
        logits = LogitsChoice(logits, logits, "given")
    folded = folded_names(model)
    keep = [p for p in model.metadata_props if not p.key.startswith(FOLDED_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    index = GraphIndex(model.graph)
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    shapes: dict[str, tuple] = {}
    dtypes: dict[str, int] = {name: onnx.helper.np_dtype_to_tensor_dtype(a.dtype) for name, a in consts.items()}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        s = shape_of(vi)
        if s is not None:
            shapes[vi.name] = s
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            dtypes[vi.name] = vi.type.tensor_type.elem_type
    for name, arr in consts.items():
        shapes[name] = tuple(arr.shape)
    return ForwardGraph(model=model, entry=logits.tensor, consts=consts, shapes=shapes, dtypes=dtypes,
                        producer=index.producer, consumers=index.consumers, logits=logits, folded=folded)


def fix_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int | None]]) -> onnx.ModelProto:
    """Pin graph-input dims (``None`` keeps a dim symbolic)."""
    by_name = {i.name: i for i in model.graph.input}
    for name, dims in input_shapes.items():
        if name not in by_name:
            raise ExciteError(f"input {name!r} is not an input of the model (inputs: {', '.join(by_name)})")
        shape = by_name[name].type.tensor_type.shape
        if len(shape.dim) != len(dims):
            raise ExciteError(f"input {name!r} has rank {len(shape.dim)}, got shape {tuple(dims)}")
        for d, v in zip(shape.dim, dims):
            if v is not None:
                d.Clear()
                d.dim_value = int(v)
    return model


def canonicalize(model, logits: str | None = None, input_shapes: Mapping | None = None,
                 output: str | None = None) -> ForwardGraph:
    """Load ``model`` (path or proto) into a private copy, canonicalize it and resolve the
    logits (``logits``: a tensor name; ``output`` is its older alias)."""
    proto = load_model(model)
    if input_shapes:
        proto = fix_input_shapes(proto, input_shapes)
    for run_pass in PASSES:
        proto = run_pass(proto)
    return make_view(proto, resolve_logits(proto, logits if logits is not None else output))
