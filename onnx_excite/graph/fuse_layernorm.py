"""Canonicalize pass: the decomposed layer normalisation of older exporters fused to one
``LayerNormalization`` node (opset 17)::

    c = x - ReduceMean(x, axes=[-1]);  y = c / Sqrt(ReduceMean(c^2, axes=[-1]) + eps) * gamma + beta

(``c^2`` as ``Pow(c, 2)`` or ``Mul(c, c)``; the ``+ beta`` optional). The LayerNormalization rule
(``onnx_excite.rules.norm``) then sees one linear map per token instead of a Sub of two tensors.
RMSNorm ``x / Sqrt(ReduceMean(x^2) + eps) * gamma`` needs no pass: it is ``x`` divided by a gate
computed from ``x`` (the Div rule) times a constant.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .fuse import fresh_name, replace_chains
from .index import GraphIndex, attr


def _last_axis_mean(index: GraphIndex, node) -> str | None:
    """The input of a ReduceMean over axis -1 with keepdims, else None."""
    if node is None or node.op_type != "ReduceMean" or not attr(node, "keepdims", 1):
        return None
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and index.is_initializer(node.input[1]):
        axes = [int(a) for a in index.array(node.input[1]).reshape(-1)]
    return node.input[0] if axes is not None and list(axes) == [-1] else None


def _scalar(index: GraphIndex, name: str):
    value = index.array(name) if index.is_initializer(name) else None
    return float(value.reshape(-1)[0]) if value is not None and value.dtype.kind == "f" and value.size == 1 else None


def _one_user(index: GraphIndex, name: str, op: str):
    users = index.consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0].op_type == op and name not in index.outputs else None


def _match(index: GraphIndex, div):
    """(x, gamma, beta, eps, nodes, output) of the layer norm whose Div(c, sigma) is ``div``."""
    if div.op_type != "Div":
        return None
    c, sigma = div.input
    sub, sqrt = index.producer.get(c), index.producer.get(sigma)
    if sub is None or sub.op_type != "Sub" or sqrt is None or sqrt.op_type != "Sqrt":
        return None
    x, mu = sub.input
    mean = index.producer.get(mu)
    if _last_axis_mean(index, mean) != x or index.consumer_count(mu) != 1:
        return None
    add = index.producer.get(sqrt.input[0])
    if add is None or add.op_type != "Add" or index.consumer_count(sqrt.output[0]) != 1:
        return None
    var, eps = (add.input[0], _scalar(index, add.input[1])) if _scalar(index, add.input[1]) is not None \
        else (add.input[1], _scalar(index, add.input[0]))
    var_node = index.producer.get(var)
    if eps is None or var_node is None or index.consumer_count(var) != 1 or index.consumer_count(add.output[0]) != 1:
        return None
    square = index.producer.get(_last_axis_mean(index, var_node) or "")
    if square is None or index.consumer_count(square.output[0]) != 1:
        return None
    if not ((square.op_type == "Pow" and square.input[0] == c and _scalar(index, square.input[1]) == 2.0)
            or (square.op_type == "Mul" and list(square.input) == [c, c])):
        return None
    # c feeds the square (Mul(c, c) lists it once per input) and the Div, nothing else
    if {id(n) for n in index.consumers.get(c, [])} != {id(square), id(div)} or c in index.outputs:
        return None
    scale = _one_user(index, div.output[0], "Mul")
    if scale is None:
        return None
    gamma = scale.input[1] if scale.input[0] == div.output[0] else scale.input[0]
    if not index.is_initializer(gamma) or index.array(gamma).dtype.kind != "f":
        return None
    g = index.array(gamma)
    if any(d != 1 for d in g.shape[:-1]):
        return None
    nodes = [mean, sub, square, var_node, add, sqrt, div, scale]
    out, beta = scale.output[0], None
    shift = _one_user(index, out, "Add")
    if shift is not None:
        b = shift.input[1] if shift.input[0] == out else shift.input[0]
        if index.is_initializer(b) and index.array(b).shape[:-1] == (1,) * (index.array(b).ndim - 1) \
                and index.array(b).shape[-1:] == g.shape[-1:]:
            beta, out = b, shift.output[0]
            nodes.append(shift)
    return x, gamma, beta, eps, nodes, out


def run(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each decomposed layer norm over the last axis becomes one LayerNormalization node."""
    graph = model.graph
    index = GraphIndex(graph)
    taken = set(index.tensor_names())
    dropped: set[int] = set()
    fused = []
    for div in list(graph.node):
        found = _match(index, div)
        if found is None:
            continue
        x, gamma, beta, eps, nodes, out = found
        if dropped & {id(n) for n in nodes}:
            continue
        params = []
        for name, part in ((gamma, "scale"), (beta, "bias")):
            if name is not None:
                flat = fresh_name(f"{div.name or out}.{part}", taken)
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(index.array(name).reshape(-1)), flat))
                params.append(flat)
        dropped |= {id(n) for n in nodes}
        fused.append((nodes, helper.make_node("LayerNormalization", [x] + params, [out],
                                              name=f"{div.name or out}.layernorm", axis=-1, epsilon=eps)))
    replace_chains(graph, index, fused)
    return model
