"""Which axis of a map layer holds the channels.

The MWP map of a layer is the sum of P over its channel axis. ONNX's image ops
(Conv, pools, BatchNormalization ...) are NCHW: their data input and output
have channels at axis 1. A Keras/TF export feeds them through a Transpose from
NHWC tensors (its input, often normalised first). :func:`channel_axis` finds
the axis by walking from the layer to the nearest such op, mapping the axis
through every Transpose on the way (a layer followed by Transpose(0, 3, 1, 2)
has its channels at axis 3) and passing element-wise ops, which keep the layout.
"""
from __future__ import annotations

from dataclasses import dataclass

from .forward import ForwardGraph
from .index import attr
from .token_grid import token_grid


def _layout(node) -> str | None:
    """What the op does to the channel axis, as its declaration says (:mod:`onnx_excite.rules`):
    ``nchw`` (data input and output NCHW), ``elementwise``, ``transpose``, ``einsum`` or None."""
    from ..rules import declared   # imported late: the rules import this package's modules

    rule = declared(node.op_type, node.domain)
    return rule.layout if rule is not None else None


@dataclass(frozen=True)
class Layout:
    """The channel axis of a tensor; ``known`` is False where axis 1 is only assumed."""

    axis: int | None      # None for tensors of rank < 3 (the map is the tensor itself)
    rank: int | None
    known: bool = True

    def describe(self) -> str:
        if self.axis is None:
            return "-"
        if self.rank == 4:
            name = {1: "NCHW", 3: "NHWC"}.get(self.axis, f"C at axis {self.axis}")
        else:
            name = f"C at axis {self.axis}"
        return name if self.known else f"{name}?"


def _perm(graph: ForwardGraph, node) -> list[int]:
    perm = attr(node, "perm")
    return list(perm) if perm is not None else list(reversed(range(graph.rank(node.input[0]) or 0)))


def channel_axis(graph: ForwardGraph, tensor: str) -> Layout:
    """The channel axis of ``tensor`` (axis 1, marked unknown, when nothing says otherwise)."""
    rank = graph.rank(tensor)
    if rank is None or rank < 3:
        return Layout(None, rank)
    if token_grid(graph, tensor) is not None:   # (N, T, C) tokens of a vision transformer
        return Layout(2, rank)
    found = _search(graph, tensor, set())
    return Layout(found, rank) if found is not None else Layout(1, rank, known=False)


def _search(graph: ForwardGraph, t: str, seen: set) -> int | None:
    if t in seen or graph.is_const(t):
        return None
    seen.add(t)
    rank = graph.rank(t)
    # downstream first: the Transpose that follows an NHWC tensor says where its channels are
    for node in graph.consumers.get(t, []):
        if node.domain not in ("", "ai.onnx") or not node.output or not node.output[0]:
            continue
        layout = _layout(node)
        if layout == "nchw" and node.input[0] == t:
            return 1
        if _token_wise(graph, node) and node.input[0] == t:
            return rank - 1
        if layout == "transpose":
            out = _search(graph, node.output[0], seen)
            if out is not None:
                return _perm(graph, node)[out]
        elif layout == "einsum":
            found = _einsum_channel(graph, node, t)
            if found is not None:
                return found
        elif layout == "elementwise" and graph.rank(node.output[0]) == rank:
            out = _search(graph, node.output[0], seen)
            if out is not None:
                return out
    node = graph.producer.get(t)
    if node is None or node.domain not in ("", "ai.onnx") or node.output[0] != t:
        return None
    layout = _layout(node)
    if layout == "nchw":
        return 1
    if _token_wise(graph, node):
        return rank - 1
    if layout == "einsum":
        return _einsum_channel(graph, node, t)
    if layout == "transpose":
        src = _search(graph, node.input[0], seen)
        return _perm(graph, node).index(src) if src is not None else None
    if layout == "elementwise":
        for i in node.input:
            if i and graph.rank(i) == rank:
                src = _search(graph, i, seen)
                if src is not None:
                    return src
    return None


def _token_wise(graph: ForwardGraph, node) -> bool:
    """A MatMul with a constant 2-D weight: a linear layer over the last axis (the channels)."""
    return (node.op_type == "MatMul" and len(node.input) == 2 and graph.is_const(node.input[1])
            and graph.rank(node.input[1]) == 2)


def _einsum_channel(graph: ForwardGraph, node, t: str) -> int | None:
    """The channel axis of ``t``, the activation or the output of an Einsum with a constant weight
    (a 1x1 conv or dense layer, ``nhwc,cd->nhwd``): the one index it shares with the weight alone."""
    from ..rules.einsum import plan as einsum_plan   # imported late: the rules import this package's modules

    plan = einsum_plan(graph, node)
    if isinstance(plan, str):
        return None
    d_i, _, data, weight, out = plan
    term, other = (out, data) if t == node.output[0] else (data, out)
    if t != node.output[0] and node.input[d_i] != t:
        return None
    own = [c for c in term if c in weight and c not in other]
    rank = graph.rank(t)
    if len(own) != 1 or rank is None:
        return None
    pos = term.index(own[0])
    if "..." in term and pos > term.index("..."):
        pos = rank - (len(term) - pos)
    return pos
