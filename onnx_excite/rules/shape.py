"""Ops that copy cells of their input: Pad (every mode), Slice, Expand, Tile, Split.

Each output cell is a copy of one input cell (or a constant), so P is routed,
not shared: ``P_in[j] = sum of P[o] over the outputs o copied from j``. The
border of an edge / reflect / wrap Pad returns its P to the cells it copied;
the copies made by Expand and Tile are summed back; the cells a Slice drops
get no P. Ops over static sizes are applied per axis as 0/1 matrices
(:mod:`onnx_excite.graph.axis_maps`).
"""
from __future__ import annotations

import numpy as np

from ..errors import ExciteError
from ..graph.axis_maps import route_back, selection_matrix
from .base import Context, attr, register


def _const_ints(graph, node, index):
    if len(node.input) > index and node.input[index]:
        value = graph.consts.get(node.input[index])
        return None if value is None else [int(v) for v in np.ravel(value)]
    return []


def _mode(node) -> str:
    return attr(node, "mode", "constant")


# ---------------------------------------------------------------------------
# Pad
# ---------------------------------------------------------------------------
def _pad_plan(graph, node):
    """({axis: (begin, end)} over the padded axes, rank) or a reason string."""
    rank = graph.rank(node.input[0])
    pads = attr(node, "pads")
    pads = [int(v) for v in pads] if pads is not None else _const_ints(graph, node, 1)
    if pads is None or rank is None:
        return "pads are not constant" if pads is None else "input rank unknown"
    axes = _const_ints(graph, node, 3)
    if axes is None:
        return "the axes of the Pad are not constant"
    axes = [a % rank for a in axes] if axes else list(range(rank))
    if len(pads) != 2 * len(axes):
        return f"{len(pads)} pads for {len(axes)} axes"
    if min(pads, default=0) < 0:
        return "negative pads (cropping) are not supported"
    n = len(axes)
    return {ax: (pads[i], pads[i + n]) for i, ax in enumerate(axes) if pads[i] or pads[i + n]}, rank


def pad_check(graph, node):
    mode = _mode(node)
    if mode not in ("constant", "edge", "reflect", "wrap"):
        return f"Pad mode {mode!r} is not supported"
    plan = _pad_plan(graph, node)
    if isinstance(plan, str):
        return plan
    padded, _ = plan
    if mode != "constant" and padded and graph.static_dims(node.input[0], sorted(padded)) is None:
        return f"Pad mode {mode!r} needs static sizes on the padded axes (fix the input shape)"
    return None


def pad_nonneg(graph, node):
    """Edge / reflect / wrap pads copy input cells; constant padding adds its value (0 by default)."""
    if _mode(node) != "constant":
        return True
    value = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return value is None or (value in graph.consts and bool((graph.consts[value] >= 0).all()))


@register("Pad", inputs=(0,), keeps_nonneg=pad_nonneg, check=pad_check, layout="elementwise",
          description="constant: P cut back to the unpadded input (the padding takes no share); "
                      "edge / reflect / wrap: P of the border returns to the cells it copied")
def pad(ctx: Context, node, p: str, negate=False):
    """P_in[j] = sum of P over the output cells that hold a copy of input cell j."""
    a = node.input[0]
    g = ctx.g
    padded, rank = _pad_plan(ctx.graph, node)
    if not padded:
        return {a: p}
    mode = _mode(node)
    if mode == "constant":
        axes = sorted(padded)
        starts = g.i64([padded[ax][0] for ax in axes])
        sizes = g.op("Gather", [g.shape(a), g.i64(axes)], axis=0)
        ends = g.op("Add", [sizes, starts])
        return {a: g.op("Slice", [p, starts, ends, g.i64(axes)], hint="p_unpad")}
    dims = ctx.graph.static_dims(a, sorted(padded))
    maps = {}
    for ax, n in zip(sorted(padded), dims):
        src = np.pad(np.arange(n), padded[ax], mode=mode)   # the input cell each output cell copies
        maps[ax] = selection_matrix(src, n)
    return {a: route_back(g, p, maps, rank)}


# ---------------------------------------------------------------------------
# Slice
# ---------------------------------------------------------------------------
def _slice_plan(graph, node):
    """{axis: (start, end, step)} or a reason string."""
    rank = graph.rank(node.input[0])
    if rank is None:
        return "input rank unknown"
    starts, ends = _const_ints(graph, node, 1), _const_ints(graph, node, 2)
    axes, steps = _const_ints(graph, node, 3), _const_ints(graph, node, 4)
    if attr(node, "starts") is not None:  # opset < 10
        starts, ends, axes = list(attr(node, "starts")), list(attr(node, "ends")), list(attr(node, "axes", []))
    if None in (starts, ends, axes, steps):
        return "starts, ends, axes or steps are not constant"
    axes = [a % rank for a in axes] if axes else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    # a full slice (0 : INT_MAX : 1), as exporters write x[:, ...], leaves its axis as it is
    return {ax: (s, e, st) for ax, s, e, st in zip(axes, starts, ends, steps) if (s, st) != (0, 1) or e < 2**31 - 1}


def slice_check(graph, node):
    plan = _slice_plan(graph, node)
    if isinstance(plan, str):
        return plan
    if graph.static_dims(node.input[0], sorted(plan)) is None:
        return "Slice needs static sizes on the sliced axes (fix the input shape)"
    return None


@register("Slice", inputs=(0,), keeps_nonneg=True, check=slice_check, layout="elementwise",
          description="P placed back at the sliced cells (channels, positions, any step); the dropped cells get none")
def slice_(ctx: Context, node, p: str, negate=False):
    """P_in = P at the cells the slice kept, 0 elsewhere (a zero Pad for step 1, else a 0/1 matrix)."""
    a = node.input[0]
    g = ctx.g
    plan = _slice_plan(ctx.graph, node)
    rank = ctx.graph.rank(a)
    dims = dict(zip(sorted(plan), ctx.graph.static_dims(a, sorted(plan))))
    kept = {ax: np.arange(dims[ax])[slice(s, e, st)] for ax, (s, e, st) in plan.items()}
    if all(st == 1 for _, _, st in plan.values()) and all(len(k) for k in kept.values()):
        pads = [0] * (2 * rank)
        for ax, k in kept.items():
            pads[ax], pads[ax + rank] = int(k[0]), int(dims[ax] - 1 - k[-1])
        return {a: g.op("Pad", [p, g.i64(pads)], hint="p_unslice")}
    maps = {ax: selection_matrix(k, dims[ax]) for ax, k in kept.items()}
    return {a: route_back(g, p, maps, rank)}


# ---------------------------------------------------------------------------
# Expand and Tile
# ---------------------------------------------------------------------------
def _expand_plan(graph, node):
    """(leading new axes, broadcast axes of the input) or a reason string."""
    x_shape = graph.shape(node.input[0])
    target = graph.consts.get(node.input[1])
    out_shape = graph.shape(node.output[0])
    if x_shape is None:
        return "input shape unknown"
    out_rank = len(target) if target is not None else (len(out_shape) if out_shape is not None else None)
    if out_rank is None:
        return "output rank unknown"
    out_rank = max(out_rank, len(x_shape))
    lead = out_rank - len(x_shape)
    target = None if target is None else [1] * (out_rank - len(target)) + [int(v) for v in target]
    broadcast = []
    for i, d in enumerate(x_shape):
        want = target[lead + i] if target is not None else None
        if d == 1:
            broadcast.append(i)
        elif d is None and want != 1:
            out_d = out_shape[lead + i] if out_shape is not None and len(out_shape) == out_rank else None
            same_symbol = _dim_param(graph, node.input[0], i) is not None and \
                _dim_param(graph, node.input[0], i) == _dim_param(graph, node.output[0], lead + i)
            if not same_symbol and (out_d is None or out_d > 1):
                return f"whether axis {i} of the input is broadcast is unknown (fix the input shape)"
    return list(range(lead)), broadcast


def _dim_param(graph, name, axis):
    """The symbolic name of a dynamic dim ("N"), where shape inference kept one."""
    for vi in list(graph.model.graph.input) + list(graph.model.graph.value_info) + list(graph.model.graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            return dims[axis].dim_param or None if axis < len(dims) else None
    return None


def expand_check(graph, node):
    plan = _expand_plan(graph, node)
    return plan if isinstance(plan, str) else None


@register("Expand", inputs=(0,), keeps_nonneg=True, check=expand_check,
          description="P summed back over the broadcast copies (also to a shape computed in the graph)")
def expand(ctx: Context, node, p: str, negate=False):
    """P_in[j] = sum of P over the copies of cell j (ReduceSum over the broadcast axes)."""
    a = node.input[0]
    g = ctx.g
    lead, broadcast = _expand_plan(ctx.graph, node)
    if lead:
        p = g.op("ReduceSum", [p, g.i64(lead)], keepdims=0, hint="p_unexpand")
    if broadcast:
        p = g.op("ReduceSum", [p, g.i64(broadcast)], keepdims=1, hint="p_unexpand")
    return {a: p}


def tile_check(graph, node):
    reps = _const_ints(graph, node, 1)
    if not reps:
        return "repeats are not constant"
    tiled = [i for i, r in enumerate(reps) if r != 1]
    if 0 in tiled:
        return "a Tile over the batch axis is not supported"
    if graph.static_dims(node.input[0], tiled) is None:
        return "Tile needs static sizes on the tiled axes (fix the input shape)"
    return None


@register("Tile", inputs=(0,), keeps_nonneg=True, check=tile_check,
          description="P summed back over the tiled copies")
def tile(ctx: Context, node, p: str, negate=False):
    """P_in[j] = sum over the copies k of P[k * n + j] along every tiled axis."""
    a = node.input[0]
    reps = _const_ints(ctx.graph, node, 1)
    tiled = [i for i, r in enumerate(reps) if r != 1]
    dims = ctx.graph.static_dims(a, tiled)
    maps = {ax: selection_matrix(np.arange(reps[ax] * n) % n, n) for ax, n in zip(tiled, dims)}
    return {a: route_back(ctx.g, p, maps, len(reps))}


# ---------------------------------------------------------------------------
# Split: rewritten into one Slice per output by canonicalize (split_to_slices)
# ---------------------------------------------------------------------------
def split_check(graph, node):
    return "Split whose piece sizes are unknown at build time (fix the input shape)"


@register("Split", inputs=(0,), keeps_nonneg=True, check=split_check,
          description="a Split becomes one Slice per piece before the rules run")
def split(ctx: Context, node, p: str, negate=False):
    raise ExciteError(f"internal: Split {node.name!r} should have been rewritten into Slices")
