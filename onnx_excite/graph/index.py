"""One index of a graph, shared by the canonicalize passes, the builder and the rules.

:class:`GraphIndex` answers "who produces this tensor", "who consumes it", "is it
a constant" for an ``onnx.GraphProto``; :func:`attr` reads a node attribute with
strings decoded to ``str``. Nodes with subgraphs (``If``, ``Loop``, ``Scan``)
also count the outer-scope tensors their subgraphs read as inputs
(:func:`implicit_inputs`), so a layer below an unfolded ``If`` is never silently
cut off from the logits.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExciteError


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` (bytes decoded to str), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            if isinstance(value, bytes):
                return value.decode("utf-8", "replace")
            if isinstance(value, list) and value and isinstance(value[0], bytes):
                return [v.decode("utf-8", "replace") for v in value]
            return value
    return default


def toposort(nodes: list[onnx.NodeProto], what: str = "a graph rewrite") -> list[onnx.NodeProto]:
    """``nodes`` in an order where each one follows the producers of its inputs: Kahn's
    algorithm, stable (among ready nodes the earliest in ``nodes`` goes first). Inputs no node
    produces (graph inputs, initializers) are ready from the start; the outer-scope tensors a
    node's subgraphs read count as its inputs. A cycle is an internal error naming ``what``
    made it."""
    made = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    need = [set() for _ in nodes]
    users = defaultdict(list)
    for i, n in enumerate(nodes):
        for t in all_inputs(n):
            j = made.get(t)
            if j is not None and j != i and j not in need[i]:
                need[i].add(j)
                users[j].append(i)
    ready = [i for i in range(len(nodes)) if not need[i]]
    heapq.heapify(ready)
    out = []
    while ready:
        i = heapq.heappop(ready)
        out.append(nodes[i])
        for k in users[i]:
            need[k].discard(i)
            if not need[k]:
                heapq.heappush(ready, k)
    if len(out) != len(nodes):
        raise ExciteError(f"internal: {what} made a cycle")
    return out


def attrs(node: onnx.NodeProto) -> dict:
    """All attributes of ``node`` as a dict (strings decoded)."""
    return {a.name: attr(node, a.name) for a in node.attribute}


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def implicit_inputs(node: onnx.NodeProto) -> list[str]:
    """Outer-scope tensors read inside the node's subgraphs (empty for ordinary nodes)."""
    found: list[str] = []
    for g in subgraphs(node):
        local = {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            local.update(o for o in n.output if o)
        for n in g.node:
            for i in list(n.input) + implicit_inputs(n):
                if i and i not in local and i not in found:
                    found.append(i)
    return found


def all_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs (non-empty) followed by implicit outer-scope inputs."""
    ins = [i for i in node.input if i]
    return ins + [i for i in implicit_inputs(node) if i not in ins]


class GraphIndex:
    """Producers, consumers and constants of one graph, built once.

    The index reflects the graph at construction; a pass that rewrites the graph
    builds a new one (``GraphIndex(model.graph)``) rather than patching it.
    """

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.outputs: list[str] = [o.name for o in graph.output]
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in all_inputs(node):
                self.consumers.setdefault(i, []).append(node)

    def is_initializer(self, name: str) -> bool:
        return name in self.initializers

    def array(self, name: str) -> np.ndarray | None:
        t = self.initializers.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def consumer_count(self, name: str) -> int:
        return len(self.consumers.get(name, ())) + self.outputs.count(name)

    def tensor_names(self) -> Iterable[str]:
        yield from (i.name for i in self.graph.input)
        yield from self.initializers
        for node in self.graph.node:
            yield from (o for o in node.output if o)
