"""What the fusing passes (``fuse_gelu``, ``fuse_layernorm``) share: swapping a chain of nodes
for one node, and fresh initializer names."""
from __future__ import annotations

from typing import Sequence

import onnx

from .index import GraphIndex


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base1``, ``base2``, ... : the first not in ``taken`` (added to it)."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}{k}"
    taken.add(name)
    return name


def replace_chains(graph: onnx.GraphProto, index: GraphIndex,
                   fused: Sequence[tuple[Sequence[onnx.NodeProto], onnx.NodeProto]]) -> None:
    """Each (chain, node): ``node`` takes the place of the chain's last node, the chain's other
    nodes go, and so do the constants only they read."""
    new = {id(chain[-1]): node for chain, node in fused}
    dropped = {id(n) for chain, _ in fused for n in chain}
    consts = {i for n in graph.node if id(n) in dropped for i in n.input if index.is_initializer(i)}
    keep = [new.get(id(n), n) for n in graph.node if id(n) in new or id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name in consts and t.name not in used]:
        graph.initializer.remove(t)
