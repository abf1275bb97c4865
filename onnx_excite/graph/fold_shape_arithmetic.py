"""Canonicalize pass: shape-only arithmetic folded where shapes are static.

Exporters compute some constants from tensor shapes: the attention scale of PyTorch's
``scaled_dot_product_attention`` is ``1 / sqrt(Cast(Shape(q)[-1]))`` (a ``Div`` of a constant by
a tensor, and a ``Sqrt``, that the rules would refuse), and the class token is ``Expand``-ed to
a shape built from ``Shape(x)``. Where shape inference knows the shape, each ``Shape`` (with its
``start`` / ``end``) becomes a constant and every node computed from constants only is folded.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .index import attr


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    from .canonicalize import _weightless
    from .forward import shape_of as _shape_of

    light, _ = _weightless(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    values = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    shapes = {vi.name: s for vi in values if (s := _shape_of(vi)) is not None}
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    return shapes


def _fold_shapes(model: onnx.ModelProto) -> bool:
    """Each ``Shape`` of a tensor of static shape becomes an int64 constant; whether any did."""
    shapes = None
    keep, changed = [], False
    for node in model.graph.node:
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
            shapes = _static_shapes(model) if shapes is None else shapes
            shape = shapes.get(node.input[0])
            if shape is not None and all(d is not None and d > 0 for d in shape):
                start, end = attr(node, "start", 0), attr(node, "end", None)
                value = np.asarray(shape[start:end] if end is not None else shape[start:], np.int64)
                model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                changed = True
                continue
        keep.append(node)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return changed


#: rounds of (fold the static Shapes, fold constants): each round's folded Reshapes let shape
#: inference see the next shapes (Swin's window partition and shifted-window mask)
MAX_ROUNDS = 8


def run(model: onnx.ModelProto) -> onnx.ModelProto:
    """``Shape`` of a tensor of static shape -> an int64 constant; then constant folding; again
    until nothing changes."""
    from .canonicalize import fold_constants

    for _ in range(MAX_ROUNDS):
        if not _fold_shapes(model):
            break
        model = fold_constants(model)
    return model
