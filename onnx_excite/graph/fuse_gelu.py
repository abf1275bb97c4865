"""Canonicalize pass: the GELU that exporters write out element by element, fused to one ``Gelu``.

PyTorch's legacy exporter (opset < 20) writes ``nn.GELU()`` as::

    x * 0.5 * (1 + erf(x / sqrt(2)))                                    (approximate="none")
    x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))             (approximate="tanh")

(the product of x, 0.5 and the bracket in any association, the division by sqrt(2) also as a
multiplication by 1/sqrt(2)). Where the model's opset has ``Gelu`` (20 and later) the pass
replaces each occurrence by one ``Gelu`` node, an activation the rules pass P through. Below
opset 20 ONNX Runtime has no ``Gelu`` for the model, so the nodes stay: the product is a Mul gate
(P goes to x, as for SiLU) and the bracket's ``Erf`` / ``Pow`` a gate branch
(``onnx_excite.rules.gates``). QuickGELU ``x * sigmoid(1.702 x)`` needs no pass: it is a SiLU
of a scaled input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
from onnx import helper

from .fuse import replace_chains
from .index import GraphIndex

GELU_OPSET = 20


@dataclass(frozen=True)
class GeluMatch:
    x: str                      # the input
    output: str                 # the tensor equal to gelu(x)
    nodes: tuple                # the nodes computing it from x (ids)
    approximate: str            # "none" or "tanh"


def _scalar(index: GraphIndex, name: str):
    if not index.is_initializer(name):
        return None
    value = index.array(name)
    return float(value.reshape(-1)[0]) if value.dtype.kind == "f" and value.size == 1 else None


def _close(value, target) -> bool:
    return value is not None and abs(value - target) <= 1e-4 * abs(target)


def _other(node, name):
    """The other input of a binary node that reads ``name``."""
    if len(node.input) != 2 or name not in node.input:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def _only_consumer(index: GraphIndex, name: str):
    users = index.consumers.get(name, [])
    return users[0] if len(users) == 1 else None


def _scaled_input(index: GraphIndex, name: str, factor: float):
    """(x, node) where ``name`` = x * factor (Mul) or x / (1/factor) (Div), else None."""
    node = index.producer.get(name)
    if node is None or len(node.input) != 2:
        return None
    if node.op_type == "Mul":
        for i in (0, 1):
            if _close(_scalar(index, node.input[1 - i]), factor):
                return node.input[i], node
    if node.op_type == "Div" and _close(_scalar(index, node.input[1]), 1.0 / factor):
        return node.input[0], node
    return None


def _erf_argument(index: GraphIndex, t: str):
    """(x, nodes) for t = erf(x / sqrt 2)."""
    erf = index.producer.get(t)
    if erf is None or erf.op_type != "Erf":
        return None
    found = _scaled_input(index, erf.input[0], 1.0 / math.sqrt(2.0))
    return None if found is None else (found[0], [erf, found[1]])


def _tanh_argument(index: GraphIndex, t: str):
    """(x, nodes) for t = tanh(sqrt(2/pi) (x + 0.044715 x^3))."""
    tanh = index.producer.get(t)
    if tanh is None or tanh.op_type != "Tanh":
        return None
    outer = _scaled_input(index, tanh.input[0], math.sqrt(2.0 / math.pi))
    if outer is None:
        return None
    inner = index.producer.get(outer[0])
    if inner is None or inner.op_type != "Add" or len(inner.input) != 2:
        return None
    for i in (0, 1):
        x, cubic = inner.input[i], inner.input[1 - i]
        scaled = _scaled_input(index, cubic, 0.044715)
        if scaled is None:
            continue
        cube = _cube_of(index, scaled[0], x)
        if cube is not None:
            return x, [tanh, outer[1], inner, scaled[1]] + cube
    return None


def _cube_of(index: GraphIndex, name: str, x: str):
    """The nodes of ``name`` = x^3: Pow(x, 3), or Mul(x, Mul(x, x)) as PyTorch writes it."""
    node = index.producer.get(name)
    if node is None:
        return None
    if node.op_type == "Pow" and node.input[0] == x and _close(_scalar(index, node.input[1]), 3.0):
        return [node]
    if node.op_type == "Mul" and _other(node, x) is not None:
        square = index.producer.get(_other(node, x))
        if square is not None and square.op_type == "Mul" and list(square.input) == [x, x]:
            return [node, square]
    return None


def match_gelu(index: GraphIndex, node: onnx.NodeProto) -> GeluMatch | None:
    """The GELU whose bracket ``1 + erf(..)`` / ``1 + tanh(..)`` is computed by the Add ``node``."""
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    for i in (0, 1):
        if not _close(_scalar(index, node.input[1 - i]), 1.0):
            continue
        for argument, approximate in ((_erf_argument, "none"), (_tanh_argument, "tanh")):
            found = argument(index, node.input[i])
            if found is not None:
                x, inner = found
                outer = _halved_product(index, node.output[0], x)
                if outer is not None:
                    out, nodes = outer
                    every = inner + [node] + nodes
                    return GeluMatch(x, out, tuple(id(n) for n in every), approximate)
    return None


def _halved_product(index: GraphIndex, bracket: str, x: str):
    """(output, nodes) of 0.5 * x * bracket, in any association of the two Muls."""
    m1 = _only_consumer(index, bracket)
    if m1 is None or m1.op_type != "Mul":
        return None
    other = _other(m1, bracket)
    if other == x:                     # (x * bracket) * 0.5
        m2 = _only_consumer(index, m1.output[0])
        if m2 is not None and m2.op_type == "Mul" and _close(_scalar(index, _other(m2, m1.output[0])), 0.5):
            return m2.output[0], [m1, m2]
        return None
    if _close(_scalar(index, other), 0.5):   # x * (bracket * 0.5)
        m2 = _only_consumer(index, m1.output[0])
        if m2 is not None and m2.op_type == "Mul" and _other(m2, m1.output[0]) == x:
            return m2.output[0], [m1, m2]
        return None
    half = index.producer.get(other)   # (x * 0.5) * bracket
    if (half is not None and half.op_type == "Mul" and _other(half, x) is not None
            and _close(_scalar(index, _other(half, x)), 0.5) and index.consumer_count(other) == 1):
        return m1.output[0], [half, m1]
    return None


def gelu_matches(graph: onnx.GraphProto) -> list[GeluMatch]:
    index = GraphIndex(graph)
    return [m for n in graph.node if (m := match_gelu(index, n)) is not None]


def run(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each GELU written out element by element becomes one ``Gelu`` node (opset >= 20 only)."""
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    if opset < GELU_OPSET:
        return model
    graph = model.graph
    index = GraphIndex(graph)
    outputs = {o.name for o in graph.output}
    replaced, fused = set(), []
    for match in gelu_matches(graph):
        chain = [n for n in graph.node if id(n) in match.nodes]
        inner = [n for n in chain if match.output not in n.output]
        if any(o in outputs or index.consumer_count(o) != 1 for n in inner for o in n.output if o):
            continue   # an intermediate is read elsewhere: keep the nodes
        if replaced & set(match.nodes):
            continue
        replaced |= set(match.nodes)
        last = next(n for n in chain if match.output in n.output)
        chain = inner + [last]
        fused.append((chain, helper.make_node("Gelu", [match.x], [match.output], name=f"{last.name or match.output}.gelu",
                                              approximate=match.approximate)))
    replace_chains(graph, index, fused)
    return model
