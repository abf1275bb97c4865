"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020)
in the companion graph: a map made from the forward attention weights, no backward sweep.

For the self-attention blocks l = 1..L on the path to the logits (``Softmax(Q K' s + bias) @ V``,
the Softmax's output (N, heads, T, T) over all T tokens)::

    A_l = mean over heads of the attention weights       (N, T, T)
    B_l = 0.5 A_l + 0.5 I, each row divided by its sum     (the residual connection)
    R   = B_L B_(L-1) ... B_1

The map is the class token's row of R over the patch tokens, laid out on the patch grid
(:mod:`.token_grid`): R[cls, patch] is how much of the class token's representation after the
last block flows from that patch's embedding. Only that row is needed, so the graph computes
``r = e_cls' B_L``, then ``r = r B_l`` down to l = 1: O(L T^2), not O(L T^3). The signal at the
logits plays no part: the map is the same for every target class.

The rollout is defined at the tokens the first attention block reads (its input, the layer
norm's, in a pre-norm ViT / DeiT): every block above that layer is in the product. The class
token is the first constant token of the token Concat (DeiT: the class token, not the
distillation token). Refused in one line: a model without self-attention, attention weights
that are not (N, heads, T, T), and attention over other tokens than those of one patch grid
with a class token (Swin's windows, a model that pools its patch tokens without a class token).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import ExciteError
from .forward import ForwardGraph
from .index import attr
from .token_grid import TokenGrid, token_grid

NEEDS_ATTENTION = "rollout needs self-attention (Softmax(Q K' s + bias) @ V) on the path to the logits; the model has none"


@dataclass(frozen=True)
class Rollout:
    """What the rollout reads: the attention weights of every block (bottom to top), the layer
    it is defined at, its patch grid and the class token's index."""

    weights: tuple            # the Softmax outputs (N, heads, T, T), in block order
    layer: str                # the tokens the first attention block reads
    grid: TokenGrid
    cls: int


def _non_const(graph: ForwardGraph, node) -> list[str]:
    return [i for i in node.input if i and not graph.is_const(i)]


def _upstream(graph: ForwardGraph) -> set[str]:
    """Every tensor the logits are computed from."""
    seen, stack = {graph.entry}, [graph.entry]
    while stack:
        node = graph.producer.get(stack.pop())
        for i in _non_const(graph, node) if node is not None else ():
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def attention_matmuls(graph: ForwardGraph) -> list:
    """The ``A @ V`` MatMuls (first input a Softmax's output, second an activation) the logits
    are computed from, in graph order."""
    up = _upstream(graph)
    return [n for n in graph.nodes if n.op_type == "MatMul" and n.output[0] in up and not graph.is_const(n.input[1])
            and getattr(graph.producer.get(n.input[0]), "op_type", "") == "Softmax"]


def _tokens_read(graph: ForwardGraph, v: str) -> str:
    """The token tensor an attention's values V come from: up from V through ops of one
    activation input, to the input of the block's LayerNormalization (pre-norm), or to where
    the walk meets a node of several activation inputs (a residual Add) or a Concat."""
    t = v
    while (node := graph.producer.get(t)) is not None:
        if node.op_type == "LayerNormalization":
            return node.input[0]
        # a Reshape / Expand / Slice reads its data at input 0; its other inputs may be computed
        # from shapes at run time (a symbolic batch) and are no activations
        data = [node.input[0]] if node.op_type in _MOVES else _non_const(graph, node)
        if node.op_type == "Concat" or len(data) != 1:
            return t
        t = data[0]
    return t


#: ops whose first input is the data and the others (shape, starts, axes ...) are no activations
_MOVES = ("Reshape", "Expand", "Slice", "Squeeze", "Unsqueeze", "Gather", "Split", "Pad", "Tile")


def _not_global(node_name: str) -> ExciteError:
    return ExciteError(f"rollout needs global self-attention over a class token and the patch tokens (ViT, DeiT): "
                       f"the attention {node_name!r} reads no such tokens (windowed attention, as in Swin, is no T x T "
                       f"matrix over the image; a model without a class token is not supported)")


def find_rollout(graph: ForwardGraph) -> Rollout:
    """The attention blocks and the token layer of the rollout; ExciteError (one line) where
    the model has none (see the module docstring)."""
    matmuls = attention_matmuls(graph)
    if not matmuls:
        raise ExciteError(NEEDS_ATTENTION)
    weights, tokens = [], None
    for mm in matmuls:
        softmax = graph.producer[mm.input[0]]
        shape = graph.shape(softmax.output[0])
        rank = len(shape) if shape is not None else None
        if (rank != 4 or shape[2] is None or shape[2] != shape[3] or attr(softmax, "axis", -1) % 4 != 3):
            raise ExciteError(f"rollout: the attention weights of Softmax {softmax.name!r} have shape "
                              f"{tuple(shape) if shape is not None else 'unknown'}, not (N, heads, T, T) over the last axis")
        if tokens is not None and shape[3] != tokens:
            raise _not_global(mm.name)
        tokens = shape[3]
        weights.append(softmax.output[0])
    layer = _tokens_read(graph, matmuls[0].input[1])
    grid = token_grid(graph, layer)
    if grid is None or grid.tokens != tokens or grid.tokens == grid.h * grid.w:
        raise _not_global(matmuls[0].name)
    cls = 0 if grid.offset > 0 else grid.h * grid.w   # the first token that is not a patch
    return Rollout(tuple(weights), layer, grid, cls)


def emit_rollout(graph: ForwardGraph, g, rollout: Rollout) -> str:
    """The (N, h, w) rollout map (see the module docstring) emitted with the emitter ``g``."""
    t = rollout.grid.tokens
    half_eye = g.const(0.5 * np.eye(t, dtype=np.float32), "rollout_half_eye")
    row = None
    for a in reversed(rollout.weights):   # from the last block down
        if graph.dtypes.get(a, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            a = g.op("Cast", [a], to=onnx.TensorProto.FLOAT, hint="attn_f32")
        mean = g.reduce("ReduceMean", a, [1], keepdims=0, hint="attn_mean")          # (N, T, T)
        b = g.add(g.mul(mean, g.scalar(0.5)), half_eye)
        b = g.op("Div", [b, g.reduce("ReduceSum", b, [2], keepdims=1, hint="row_sum")], hint="attn_residual")
        if row is None:
            row = g.op("Slice", [b, g.i64([rollout.cls]), g.i64([rollout.cls + 1]), g.i64([1])], hint="cls_row")
        else:
            row = g.op("MatMul", [row, b], hint="rollout")                           # (N, 1, T)
    grid = rollout.grid
    patches = g.op("Slice", [row, g.i64([grid.offset]), g.i64([grid.offset + grid.h * grid.w]), g.i64([2])],
                   hint="rollout_patches")
    return g.op("Reshape", [patches, g.i64([0, grid.h, grid.w])], hint="rollout_grid")
