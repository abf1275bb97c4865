"""Resize / Upsample in nearest and linear mode.

Both modes resize each axis on its own: ``y = A_k x`` along every resized
axis k, with an (n_out, n_in) matrix ``A_k`` of non-negative weights (rows
summing to 1), built once per node at build time from the operator's
definition, computed in float32 as ONNX Runtime does:

    x_in(o) = coordinate transformation of output index o (half_pixel, half_pixel_symmetric,
              pytorch_half_pixel, align_corners, asymmetric, tf_half_pixel_for_nn)
    nearest: A[o, round(x_in)] = 1 (nearest_mode: round_prefer_floor / _ceil, floor, ceil)
    linear:  x = clip(x_in, 0, n_in - 1), A[o, floor(x)] = 1 - frac(x), A[o, floor(x) + 1] = frac(x)

(antialiased linear downscaling is read off onnx's reference implementation
applied to the identity basis). Then

* nearest: each output cell is a copy of one source cell; P is routed to it,
  ``P_in = A^T P`` (a source pixel copied several times collects every copy's P);
* linear: a linear layer with weights ``A`` (>= 0), shared in proportion to
  the contributions, ``Z = A a``, ``P_in = a * A^T (P / Z)`` (``a+`` for the
  positive rule), as AveragePool.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.axis_maps import apply_along_axis, route_back
from ..graph.canonicalize import default_opset
from ..graph.index import attrs as attrs_of
from .base import Context, attr, register
from .linear import excite_linear

_CARRIED = ("mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a", "exclude_outside",
            "extrapolation_value", "antialias")


def _plan(graph, node):
    """(probe attributes, {axis: (n_in, n_out, scale | None)}, rank) or a reason string."""
    x = node.input[0]
    rank = graph.rank(x)
    if rank is None:
        return "input rank unknown"
    if node.op_type == "Upsample":
        attrs = {"mode": attr(node, "mode", "nearest"), "coordinate_transformation_mode": "asymmetric",
                 "nearest_mode": "floor"}
        scales = attr(node, "scales")
        if scales is None:
            scales = graph.consts.get(node.input[1]) if len(node.input) > 1 else None
        scales, sizes = (None if scales is None else [float(s) for s in np.ravel(scales)]), None
        if scales is None:
            return "the scales are not constant"
    else:
        attrs = {k: v for k, v in attrs_of(node).items() if k in _CARRIED}
        if attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
            return "keep_aspect_ratio_policy other than 'stretch' is not supported"
        scales = sizes = None
        slots = {2: "scales", 3: "sizes"} if default_opset(graph.model) >= 11 else {1: "scales"}   # input 1 is the roi from 11 on
        for idx, kind in slots.items():
            name = node.input[idx] if len(node.input) > idx else ""
            if not name:
                continue
            if name not in graph.consts:
                # PyTorch's interpolate(size=...) computes sizes from Shape: the inferred output shape is enough
                out_shape, in_shape = graph.shape(node.output[0]), graph.shape(x)
                if kind == "sizes" and out_shape is not None and in_shape is not None and None not in out_shape[1:]:
                    sizes = [in_shape[0]] + list(out_shape[1:])
                    continue
                return f"the {kind} are computed in the graph (not constant) and the output size is unknown"
            value = np.ravel(graph.consts[name])
            if value.size and kind == "sizes":
                sizes = [int(v) for v in value]
            elif value.size:
                scales = [float(v) for v in value]
        if scales is None and sizes is None:
            return "neither scales nor sizes are given"
        axes = attr(node, "axes")
        if axes is not None:   # scales / sizes given for these axes only
            axes = [a % rank for a in axes]
            full_scales, full_sizes = [1.0] * rank, list(graph.shape(x))
            for i, ax in enumerate(axes):
                if scales is not None:
                    full_scales[ax] = scales[i]
                if sizes is not None:
                    full_sizes[ax] = sizes[i]
            scales, sizes = (full_scales if scales is not None else None), (full_sizes if sizes is not None else None)
    mode = attrs.get("mode", "nearest")
    if mode not in ("nearest", "linear"):
        return f"Resize mode {mode!r} (its weights can be negative) is not supported; nearest and linear are"
    coord = attrs.get("coordinate_transformation_mode", "half_pixel")
    if coord not in _COORDINATE_MODES:
        return f"coordinate_transformation_mode {coord!r} is not supported"
    if attrs.get("nearest_mode", "round_prefer_floor") not in _NEAREST_MODES:
        return f"nearest_mode {attrs['nearest_mode']!r} is not supported"
    in_shape = graph.shape(x)
    resized = {}
    for ax in range(rank):
        n_in = in_shape[ax]
        if scales is not None:
            if scales[ax] == 1.0:
                continue
            # the output size as ONNX Runtime computes it: the product in float32, then floor
            scale = scales[ax]
            n_out = None if n_in is None else int(np.floor(np.float32(n_in) * np.float32(scale)))
        else:
            if sizes[ax] == n_in:
                continue
            scale, n_out = None, sizes[ax]
        if ax == 0:
            return "a Resize over the batch axis is not supported"
        if n_in is None:
            return f"Resize needs static sizes on the resized axes (axis {ax} is dynamic; fix the input shape)"
        resized[ax] = (n_in, n_out, scale)
    return attrs, resized, rank


@functools.lru_cache(maxsize=256)
def _axis_matrix(attr_items: tuple, opset: int, rank: int, axis: int, n_in: int, n_out: int, scale) -> np.ndarray:
    """(n_out, n_in) weights of an antialiased resize along ``axis``: the node applied to the identity
    basis by onnx's reference implementation."""
    shape = [1] * rank
    shape[0] = shape[axis] = n_in
    basis = np.zeros(shape)
    idx = [0] * rank
    for i in range(n_in):
        idx[0] = idx[axis] = i
        basis[tuple(idx)] = 1.0
    inits = []
    if scale is not None:
        s = [1.0] * rank
        s[axis] = scale
        inits.append(numpy_helper.from_array(np.asarray(s, np.float32), "scales"))
        ins = ["x", "", "scales"]
    else:
        size = list(shape)
        size[axis] = n_out
        inits.append(numpy_helper.from_array(np.asarray(size, np.int64), "sizes"))
        ins = ["x", "", "", "sizes"]
    node = helper.make_node("Resize", ins, ["y"], **dict(attr_items))
    graph = helper.make_graph([node], "resize_probe", [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)], inits)
    from onnx.reference import ReferenceEvaluator

    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 13))])
    y = ReferenceEvaluator(probe).run(None, {"x": basis})[0]
    m = np.ascontiguousarray(y.reshape(n_in, -1).T)   # A[o, i]: output o of basis vector i
    if m.shape[0] != n_out:
        raise ValueError(f"the reference resizes {n_in} to {m.shape[0]}, ONNX Runtime to {n_out}")
    return m


_COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                     "tf_half_pixel_for_nn")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _source_coordinates(n_in: int, n_out: int, scale: float, coord: str) -> np.ndarray:
    """x_in(o) for o = 0..n_out-1, in float32 (``scale``: the given scale, or n_out / n_in for sizes)."""
    f = np.float32
    o = np.arange(n_out, dtype=f)
    s = f(scale)
    if coord == "half_pixel":
        return (o + f(0.5)) / s - f(0.5)
    if coord == "half_pixel_symmetric":
        adjustment = f(n_out) / (f(n_in) * s)
        offset = f(n_in) / f(2) * (f(1) - adjustment)
        return offset + (o + f(0.5)) / s - f(0.5)
    if coord == "pytorch_half_pixel":
        return (o + f(0.5)) / s - f(0.5) if n_out > 1 else np.zeros(n_out, f)
    if coord == "align_corners":
        return o * f(n_in - 1) / f(n_out - 1) if n_out > 1 else np.zeros(n_out, f)
    if coord == "asymmetric":
        return o / s
    if coord == "tf_half_pixel_for_nn":
        return (o + f(0.5)) / s
    raise ValueError(coord)


def _round(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "floor":
        return np.floor(x)
    if mode == "ceil":
        return np.ceil(x)
    tie = x - np.floor(x) == np.float32(0.5)
    away = np.where(x >= 0, np.floor(x + np.float32(0.5)), np.ceil(x - np.float32(0.5)))   # std::round
    return np.where(tie, np.floor(x) if mode == "round_prefer_floor" else np.ceil(x), away)


def axis_weights(n_in: int, n_out: int, scale: float | None, attrs: dict) -> np.ndarray:
    """(n_out, n_in) interpolation weights of one axis (nearest or linear, no antialias)."""
    scale = n_out / n_in if scale is None else scale
    x = _source_coordinates(n_in, n_out, scale, attrs.get("coordinate_transformation_mode", "half_pixel"))
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if attrs.get("mode", "nearest") == "nearest":
        src = np.clip(_round(x, attrs.get("nearest_mode", "round_prefer_floor")), 0, n_in - 1).astype(np.int64)
        m[rows, src] = 1.0
        return m
    x = np.clip(x, np.float32(0), np.float32(n_in - 1))
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (x - lo).astype(np.float64)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def _matrices(graph, node, plan):
    attrs, resized, rank = plan
    if not attrs.get("antialias", 0) or attrs.get("mode") == "nearest":
        return {ax: axis_weights(n_in, n_out, scale, attrs) for ax, (n_in, n_out, scale) in resized.items()}
    items = tuple(sorted(attrs.items()))
    return {ax: _axis_matrix(items, default_opset(graph.model), rank, ax, n_in, n_out, scale) for ax, (n_in, n_out, scale) in resized.items()}


def resize_check(graph, node):
    plan = _plan(graph, node)
    if isinstance(plan, str):
        return plan
    try:
        mats = _matrices(graph, node, plan)
    except Exception as exc:   # the reference implementation refuses this combination of attributes
        return f"cannot evaluate this Resize ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if any(m.min() < 0 for m in mats.values()):
        return "negative interpolation weights"
    return None


@register("Resize", "Upsample", inputs=(0,), keeps_nonneg=True, check=resize_check, layout="elementwise",
          description="nearest and linear (every coordinate transformation but tf_crop_and_resize, antialias; scales, "
                      "sizes, or sizes computed in the graph); nearest: P routed back to the source pixel (copies summed); linear: proportional to the "
                      "contributions, `Z = A a`, `P_in = a · Aᵀ(P / Z)` (a+ for `positive`), `A` the per-axis "
                      "interpolation weights read off the node")
def resize(ctx: Context, node, p: str, negate=False):
    """Nearest: P_in = A^T P. Linear: the linear rule with the interpolation weights A >= 0."""
    a = node.input[0]
    plan = _plan(ctx.graph, node)
    mats = _matrices(ctx.graph, node, plan)
    rank = plan[2]
    if not mats:
        return {a: p}
    g = ctx.g
    if plan[0].get("mode", "nearest") == "nearest":
        return {a: route_back(g, p, mats, rank)}

    def forward(x, wp):
        for ax, m in sorted(mats.items()):
            x = apply_along_axis(g, x, m, ax, rank, hint="z_resize")
        return x

    return {a: excite_linear(ctx, node, a, p, np.ones(1), forward=forward,
                             transpose=lambda r, wp: route_back(g, r, mats, rank))}
