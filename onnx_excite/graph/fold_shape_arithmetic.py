"""Canonicalize pass: shape-only arithmetic folded where shapes are static.

Exporters compute some constants from tensor shapes: the attention scale of PyTorch's
``scaled_dot_product_attention`` is ``1 / sqrt(Cast(Shape(q)[-1]))`` (a ``Div`` of a constant by
a tensor, and a ``Sqrt``, that the rules would refuse), and the class token is ``Expand``-ed to
a shape built from ``Shape(x)``. Where shape inference knows the shape, each ``Shape`` (with its
``start`` / ``end``) becomes a constant and every node computed from constants only is folded.
Where it knows only some dims (a dynamic batch), a ``Gather`` or ``Slice`` of the ``Shape`` with
constant indices that picks known dims only (the attention scale's ``Shape(q)[-1]``, the head
size) becomes a constant; the dynamic dims stay computed at run time.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .index import GraphIndex, attr


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


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The graph's int64 initializers and Constant nodes' values (the indices of a Gather/Slice)."""
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
             if t.data_type == onnx.TensorProto.INT64 and len(t.dims) <= 1}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = attr(node, "value")
            if isinstance(value, onnx.TensorProto) and value.data_type == onnx.TensorProto.INT64:
                found[node.output[0]] = numpy_helper.to_array(value)
    return found


def _picked(node: onnx.NodeProto, n: int, constants: dict) -> np.ndarray | None:
    """The positions (an int64 array of the output's shape) that a ``Gather`` (axis 0) or a
    ``Slice`` (axis 0) with constant indices picks from a 1-D tensor of length ``n``; None
    where they are not constant or the node is another op."""
    if node.op_type == "Gather" and attr(node, "axis", 0) in (0, -1) and len(node.input) == 2:
        idx = constants.get(node.input[1])
        if idx is None or idx.ndim > 1 or not ((-n <= idx) & (idx < n)).all():
            return None
        return np.where(idx < 0, idx + n, idx).astype(np.int64)
    if node.op_type == "Slice" and 3 <= len(node.input) <= 5:
        parts = [constants.get(name) if name else None for name in node.input[1:]]
        if any(p is None for p in parts[:2]) or any(name and p is None for name, p in zip(node.input[3:], parts[2:])):
            return None
        starts, ends = parts[0], parts[1]
        axes = parts[2] if len(parts) > 2 and parts[2] is not None else np.zeros(1, np.int64)
        steps = parts[3] if len(parts) > 3 and parts[3] is not None else np.ones(1, np.int64)
        if not (starts.size == ends.size == axes.size == steps.size == 1) or int(axes[0]) not in (0, -1) \
                or int(steps[0]) == 0:
            return None
        clamp = lambda v: int(max(min(int(v), n), -n - 1))   # noqa: E731  (ONNX clamps; so does Python)
        return np.arange(n, dtype=np.int64)[clamp(starts[0]):clamp(ends[0]):int(steps[0])]
    return None


def _fold_shapes(model: onnx.ModelProto) -> bool:
    """Each ``Shape`` of a tensor of static shape becomes an int64 constant, and each constant
    ``Gather`` / ``Slice`` of a ``Shape`` that picks only static dims of a partly known shape;
    whether any did."""
    shapes = constants = None
    keep, changed, folded = [], False, set()
    readers = GraphIndex(model.graph).consumers
    for node in model.graph.node:
        if id(node) in folded:
            continue
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
            shapes = _static_shapes(model) if shapes is None else shapes
            shape = shapes.get(node.input[0])
            if shape is not None:
                start, end = attr(node, "start", 0), attr(node, "end", None)
                dims = list(shape[start:end] if end is not None else shape[start:])
                if all(d is not None and d > 0 for d in dims):
                    model.graph.initializer.append(numpy_helper.from_array(np.asarray(dims, np.int64), node.output[0]))
                    changed = True
                    continue
                constants = _constants(model) if constants is None else constants
                for user in readers.get(node.output[0], []):
                    if user.domain not in ("", "ai.onnx") or user.input[0] != node.output[0]:
                        continue
                    picked = _picked(user, len(dims), constants)
                    if picked is not None and all(dims[i] is not None and dims[i] > 0 for i in picked.ravel()):
                        value = np.asarray([dims[i] for i in picked.ravel()], np.int64).reshape(picked.shape)
                        model.graph.initializer.append(numpy_helper.from_array(value, user.output[0]))
                        folded.add(id(user))
                        changed = True
        keep.append(node)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(n for n in keep if id(n) not in folded)
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
