"""Fully convolutional rewrite of a Flatten -> Gemm head, for images of any size.

``Flatten(X: N x C x h x w) -> Gemm(W) [-> act -> Gemm ...]`` becomes
``Conv(kernel h x w) [-> act -> Conv 1x1 ...] -> ReduceLogSumExp(H, W)``:
at the original input size the score map is 1 x 1 and the model is unchanged;
on a larger image it is a class score map, pooled to the logits by a smooth
maximum (log-sum-exp; its offset log(h*w) is the same for every class, so
rankings and softmax probabilities are those of the mean-free scores).
Excitation through that pool hands each class's signal to the positions of
its score map in proportion to softmax over positions: the target's score
map normalised over positions is the top signal.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .canonicalize import infer_shapes
from .forward import shape_of
from .index import GraphIndex
from .index import attrs as _attrs



def _activation(node) -> bool:
    """An element-wise activation (or Identity/Dropout) by its declaration: it works on the
    (N, C, 1, 1) score map as on the (N, C) features it replaces."""
    from ..rules import declared   # imported late: the rules import this package's modules

    rule = declared(node.op_type, node.domain)
    return rule is not None and rule.layout == "elementwise" and rule.family in ("rectifier", "activation", "identity")


def convert_dense_head(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """(model, converted): the rewritten copy, or the model itself when it has no such head."""
    model = infer_shapes(onnx.ModelProto.FromString(model.SerializeToString()))
    g = model.graph
    index = GraphIndex(g)
    consts, consumers = index.initializers, index.consumers
    shapes = {vi.name: shape_of(vi) for vi in list(g.value_info) + list(g.input)}
    outputs = set(index.outputs)
    for flat in g.node:
        if flat.op_type != "Flatten" or _attrs(flat).get("axis", 1) != 1:
            continue
        shape = shapes.get(flat.input[0])
        if not shape or len(shape) != 4 or any(d is None for d in shape[1:]):
            continue
        chain, t = [], flat.output[0]
        # the chain ends at a graph output: a model that also outputs its features keeps them
        while len(consumers.get(t, [])) == 1 and (t not in outputs or not chain):
            node = consumers[t][0]
            if node.op_type == "Gemm" and node.input[1] in consts and not _attrs(node).get("transA", 0):
                chain.append(node)
            elif _activation(node) and node.input[0] == t:
                chain.append(node)
            else:
                break
            t = node.output[0]
        if not any(n.op_type == "Gemm" for n in chain):
            continue
        _rewrite(model, flat, chain, shape[1:], consts)
        for inp in g.input:  # free the spatial dims of the image input
            dims = inp.type.tensor_type.shape.dim
            if len(dims) == 4 and inp.name not in consts:
                for d, name in zip(dims[2:], ("H", "W")):
                    d.Clear()
                    d.dim_param = name
        del g.value_info[:]
        return infer_shapes(model), True
    return model, False


def _copy(node):
    c = onnx.NodeProto()
    c.CopyFrom(node)
    return c


def _rewrite(model, flat, chain, chw, consts):
    g = model.graph
    logits = chain[-1].output[0]
    x, first, new_nodes = flat.input[0], True, []
    for node in chain:
        if node.op_type != "Gemm":                      # elementwise: works on maps as it is
            act = _copy(node)
            act.input[0] = x
            act.output[0] = f"{node.output[0]}.score_map" if node.output[0] == logits else node.output[0]
            new_nodes.append(act)
            x = act.output[0]
            continue
        a = _attrs(node)
        b = numpy_helper.to_array(consts[node.input[1]]).astype(np.float64)
        w = (b.T if a.get("transB", 0) else b) * a.get("alpha", 1.0)        # (K_in, K_out)
        kernel = list(chw[1:]) if first else [1, 1]
        cin = chw[0] if first else w.shape[0]
        base = node.name or node.output[0]
        wname = f"{base}.conv_weight"
        g.initializer.append(numpy_helper.from_array(w.T.reshape(w.shape[1], cin, *kernel).astype(np.float32), wname))
        inputs = [x, wname]
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(consts[node.input[2]]).astype(np.float64) * a.get("beta", 1.0)
            bname = f"{base}.conv_bias"
            g.initializer.append(numpy_helper.from_array(
                np.broadcast_to(bias.reshape(-1), (w.shape[1],)).astype(np.float32), bname))
            inputs.append(bname)
        x = f"{node.output[0]}.score_map"
        new_nodes.append(helper.make_node("Conv", inputs, [x], name=f"{base}.conv", kernel_shape=kernel))
        first = False
    # the class score map is pooled back into the logits, under the logits' own name
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 18:
        axes = f"{logits}.pool_axes"
        g.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), axes))
        new_nodes.append(helper.make_node("ReduceLogSumExp", [x, axes], [logits], name=f"{logits}.pool", keepdims=0))
    else:
        new_nodes.append(helper.make_node("ReduceLogSumExp", [x], [logits], name=f"{logits}.pool", axes=[2, 3], keepdims=0))
    dropped = {flat.output[0]} | {n.output[0] for n in chain}
    nodes = [_copy(n) for n in g.node]
    start = next(i for i, n in enumerate(nodes) if n.output[0] == flat.output[0])
    kept = [n for n in nodes if n.output[0] not in dropped]
    kept[start:start] = new_nodes
    del g.node[:]
    g.node.extend(kept)
