"""Token layers of a vision transformer and the patch grid their maps are laid on.

A ViT turns the (N, C, h, w) output of its patch-embedding Conv into h*w patch tokens
(Reshape / Flatten + Transpose to (N, h*w, C)) and concatenates constant tokens to them on
the token axis (a class token; distillation or register tokens). Every (N, T, C) tensor with
that token count T holds the same tokens in the same order: its map (P summed over C) keeps
the h*w patch tokens, laid out as an (N, h, w) map; the constant tokens' share is dropped (and
counted with the lost mass).
"""
from __future__ import annotations

from dataclasses import dataclass

from .canonicalize import ForwardGraph
from .index import attr

_TOKEN_OPS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Identity"}


@dataclass(frozen=True)
class TokenGrid:
    tokens: int          # T, the token count of the layer
    offset: int          # the index of the first patch token
    h: int
    w: int

    def describe(self) -> str:
        extra = self.tokens - self.h * self.w
        return f"{self.h}x{self.w} patches" + (f" + {extra} token{'s' if extra > 1 else ''}" if extra else "")


def _patch_grid(graph: ForwardGraph, name: str) -> tuple[int, int] | None:
    """(h, w) where ``name`` (N, h*w, C) is a Conv's (N, C, h, w) output flattened to tokens."""
    node = graph.producer.get(name)
    while node is not None and node.op_type in _TOKEN_OPS:
        node = graph.producer.get(node.input[0])
    if node is None or node.op_type != "Conv":
        return None
    shape = graph.shape(node.output[0])
    if shape is None or len(shape) != 4 or shape[2] is None or shape[3] is None:
        return None
    tokens = graph.shape(name)
    return (shape[2], shape[3]) if tokens is not None and len(tokens) == 3 and tokens[1] == shape[2] * shape[3] else None


def _token_count(graph: ForwardGraph, name: str) -> int | None:
    """How many tokens ``name`` (N, T, C) holds: its inferred T, else, for a constant (1, k, C)
    ``Expand``-ed to a symbolic batch (a class token, where shape inference cannot follow the
    computed shape of the Expand), k."""
    shape = graph.shape(name)
    if shape is not None and len(shape) == 3 and shape[1] is not None:
        return shape[1]
    node = graph.producer.get(name)
    if node is not None and node.op_type == "Expand" and graph.is_const(node.input[0]):
        data = graph.shape(node.input[0])
        if data is not None and len(data) == 3 and data[0] == 1 and data[1] is not None:
            return data[1]
    return None


def _grids(graph: ForwardGraph) -> dict[int, TokenGrid]:
    """{token count: grid} from the Concats that join constant tokens to the patch tokens."""
    found: dict[int, TokenGrid] = {}
    for node in graph.nodes:
        if node.op_type != "Concat" or graph.rank(node.output[0]) != 3 or attr(node, "axis") % 3 != 1:
            continue
        out = graph.shape(node.output[0])
        if out is None:
            continue
        # the patch tokens: the one input laid out from the patch Conv (the class token may be a
        # constant or, with a dynamic batch, a constant Expand-ed to the batch)
        patches = [(i, grid) for i in node.input if (grid := _patch_grid(graph, i)) is not None]
        counts = [_token_count(graph, i) for i in node.input]
        if out[1] is None and None not in counts:
            out = (out[0], sum(counts), out[2])
        if counts.count(None) == 1 and out[1] is not None:   # one input's count unknown
            counts[counts.index(None)] = out[1] - sum(c for c in counts if c is not None)
        if out[1] is None or len(patches) != 1 or any(c is None or c < 0 for c in counts):
            continue
        data, grid = [patches[0][0]], patches[0][1]
        offset = sum(counts[:list(node.input).index(data[0])])
        found[out[1]] = TokenGrid(out[1], offset, *grid)
    return found


def token_grid(graph: ForwardGraph, name: str) -> TokenGrid | None:
    """The patch grid of the (N, T, C) token layer ``name``, None for other tensors."""
    shape = graph.shape(name)
    if shape is None or len(shape) != 3 or shape[1] is None:
        return None
    return _grids(graph).get(shape[1])
