"""Multiply-add count of a forward graph and the floor it sets for the excitation cost.

FLOPs of a node (one multiply-add = 2 FLOPs), from its output shape and weight shape:

* Conv (any groups):          2 * prod(out shape) * (C_in / group) * prod(kernel)
* ConvTranspose:              2 * prod(in shape) * (C_out / group) * prod(kernel)
* Gemm, MatMul (A: ... x K):  2 * prod(out shape) * K

Element-wise ops, pools and reductions are not counted (they are memory-bound and small).
The excitation of a linear layer costs about two forward passes of it (Z = a W+ and the
adjoint W+^T R), so with ``f`` the share of forward FLOPs above the map layer, the
forward + excitation time cannot go below ``1 + 2 f`` times the forward's: the floor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from .index import attr



def _dims(vi) -> tuple | None:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


def _shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, tuple]:
    """Static shapes of every tensor: shape inference on a weightless copy with the inputs pinned."""
    from .canonicalize import _weightless, fix_input_shapes

    light, _ = _weightless(model)
    names = {i.name for i in light.graph.input}
    fix_input_shapes(light, {k: v for k, v in (input_shapes or {}).items() if k in names})
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    while True:
        inferred = shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
        for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            s = _dims(vi)
            if s is not None and None not in s:
                shapes[vi.name] = s
        sized = _split_by_runtime_sizes(light, shapes)
        if not sized:
            return shapes
        shapes.update(sized)   # known from here on, so each round adds new ones and the loop ends
        light.graph.value_info.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in sized.items())


def _split_by_runtime_sizes(model: onnx.ModelProto, shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """Output shapes ONNX shape inference leaves unknown for a Split on axis 0 whose sizes are
    ``Concat(Shape(x_1)[0:1], ...)`` (how :mod:`onnx_excite.graph.share` un-stacks sweeps): output k
    is x_k's first dim by the Split input's other dims. Only outputs not yet in ``shapes``."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type != "Split" or attr(node, "axis", 0) != 0 or len(node.input) < 2 or node.input[0] not in shapes:
            continue
        sizes = producer.get(node.input[1])
        if sizes is None or sizes.op_type != "Concat" or len(sizes.input) != len(node.output):
            continue
        parts = [producer.get(d) for d in sizes.input]
        if not all(p is not None and p.op_type == "Shape" and attr(p, "start", 0) == 0 and attr(p, "end", None) == 1
                   and p.input[0] in shapes for p in parts):
            continue
        rest = shapes[node.input[0]][1:]
        for out, p in zip(node.output, parts):
            if out not in shapes:
                found[out] = (shapes[p.input[0]][0],) + rest
    return found


def node_flops(node: onnx.NodeProto, shapes: Mapping[str, tuple]) -> int | None:
    """FLOPs of one Conv/ConvTranspose/Gemm/MatMul node (None: not counted or shapes unknown)."""
    from ..rules import has_role   # imported late: the rules import this package's modules

    if not has_role(node, "mac"):
        return None
    out = shapes.get(node.output[0])
    a = shapes.get(node.input[0])
    b = shapes.get(node.input[1]) if len(node.input) > 1 else None
    if out is None or a is None or b is None or any(d is None for d in out + a + b):
        return None
    if node.op_type == "Conv":  # W: (C_out, C_in / group, k...)
        return 2 * int(np.prod(out)) * int(np.prod(b[1:]))
    if node.op_type == "ConvTranspose":  # W: (C_in, C_out / group, k...)
        return 2 * int(np.prod(a)) * int(np.prod(b[1:]))
    if node.op_type == "Gemm":
        k = a[0] if attr(node, "transA", 0) else a[1]
        return 2 * int(np.prod(out)) * int(k)
    return 2 * int(np.prod(out)) * int(a[-1])  # MatMul


@dataclass
class FlopCount:
    """Forward FLOPs in all and above a map layer (the nodes that depend on it)."""

    total: int
    above: int
    per_node: dict[str, int]

    @property
    def share_above(self) -> float:
        return self.above / self.total if self.total else 0.0

    @property
    def floor(self) -> float:
        """1 + 2 f: the least forward + excitation time, in forward times."""
        return 1.0 + 2.0 * self.share_above


def downstream(model: onnx.ModelProto, tensors: Sequence[str]) -> set[str]:
    """Names of the nodes that (transitively) read any of ``tensors``."""
    live, nodes = set(tensors), set()
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if any(i in live for i in node.input):
            nodes.add(node.name or node.output[0])
            live.update(node.output)
    return nodes


def count_flops(model: onnx.ModelProto, layers: Sequence[str] = (), input_shapes: Mapping[str, Sequence[int]] | None = None) -> FlopCount:
    """FLOPs of ``model`` at ``input_shapes`` (graph input name -> dims); ``above``
    counts the nodes that depend on any of ``layers`` (a graph input: every node)."""
    shapes = _shapes(model, input_shapes)
    per_node = {}
    for node in model.graph.node:
        f = node_flops(node, shapes)
        if f is not None:
            per_node[node.name or node.output[0]] = f
    above_nodes = downstream(model, layers)
    return FlopCount(total=sum(per_node.values()), above=sum(f for n, f in per_node.items() if n in above_nodes),
                     per_node=per_node)
