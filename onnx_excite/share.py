"""Share adjoint ops between backward sweeps: one batched op instead of several.

Methods whose sweeps differ (grad, deconv, guided; mwp and cmwp-postnorm's dual ...) each
emit, per linear layer, an op that applies the same weight initializer with the same
attributes to a different signal: ``y_k = op(x_k, W)`` for sweeps k = 1..n. These ops act
on every index of axis 0 independently (Conv / ConvTranspose: the batch; Gemm with
``transA=0`` and MatMul with a constant 2-D weight: the rows), so::

    [y_1; ...; y_n] = op([x_1; ...; x_n], W)      ([;]: Concat on axis 0)

and the y_k come back by a Split on axis 0 with the runtime sizes of the x_k (the batch
dim is symbolic). :func:`share_adjoints` rewrites a list of emitted nodes that way. It
merges only ops that do not depend on each other (a dependency walk: no member's output
reaches another member's input), merges one group at a time on the rewritten graph (so
no cycle can form across groups either) and returns the nodes topologically sorted,
stable in the emitted order.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Callable, Sequence

import onnx
from onnx import helper

from .errors import ExciteError

#: ops whose every index of axis 0 is computed independently, given a constant weight
SHAREABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _key(node: onnx.NodeProto, is_const: Callable[[str], bool]):
    """The merge key (op, weight and bias inputs, attributes), or None if not shareable."""
    if node.op_type not in SHAREABLE or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    if len(node.input) < 2 or not node.input[0] or is_const(node.input[0]):
        return None
    if not all(is_const(i) for i in node.input[1:] if i):
        return None
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Gemm":
        if len(node.input) > 2 and node.input[2]:  # a bias C may be (N, M): keep it out
            return None
        if helper.get_attribute_value(attrs["transA"]) if "transA" in attrs else 0:
            return None
    return (node.op_type, tuple(node.input[1:]),
            tuple(sorted((k, a.SerializeToString(deterministic=True)) for k, a in attrs.items())))


def _reaches(producers: dict, starts: Sequence[str], targets: set[str]) -> bool:
    """Whether any tensor in ``targets`` is an ancestor of (or is) a tensor in ``starts``."""
    seen, stack = set(), list(starts)
    while stack:
        t = stack.pop()
        if t in targets:
            return True
        if t in seen:
            continue
        seen.add(t)
        node = producers.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return False


def share_adjoints(nodes: Sequence[onnx.NodeProto], is_const: Callable[[str], bool],
                   fresh: Callable[[str], str]) -> tuple[list[onnx.NodeProto], int]:
    """Merge shareable ops of ``nodes`` (see the module docstring); returns the new node
    list (topologically sorted) and the number of ops removed. ``is_const(name)`` says
    whether a tensor is an initializer / constant; ``fresh(hint)`` makes unused names.
    Tensors produced outside ``nodes`` are treated as available from the start."""
    nodes = list(nodes)
    groups: dict = defaultdict(list)
    for i, node in enumerate(nodes):
        key = _key(node, is_const)
        if key is not None:
            groups[key].append(i)
    removed = 0
    alive = [True] * len(nodes)
    extra: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # new nodes, placed after index

    def producers():
        out = {}
        for i, n in enumerate(nodes):
            if alive[i]:
                for o in n.output:
                    out[o] = n
        for new in extra.values():
            for n in new:
                for o in n.output:
                    out[o] = n
        return out

    for key, members in groups.items():
        if len(members) < 2:
            continue
        prod = producers()
        pending = list(members)
        while len(pending) >= 2:
            group, rest = [pending[0]], []
            for j in pending[1:]:
                cand = nodes[j]
                independent = all(
                    not _reaches(prod, [cand.input[0]], {nodes[m].output[0]})
                    and not _reaches(prod, [nodes[m].input[0]], {cand.output[0]})
                    for m in group)
                (group if independent else rest).append(j)
            if len(group) >= 2:
                _merge(nodes, group, alive, extra, fresh)
                removed += len(group) - 1
                prod = producers()
            pending = rest
    out = []
    for i, n in enumerate(nodes):
        if alive[i]:
            out.append(n)
        out.extend(extra.get(i, ()))
    return _toposort(out), removed


def _merge(nodes, group, alive, extra, fresh) -> None:
    first = nodes[group[0]]
    xs = [nodes[i].input[0] for i in group]
    ys = [nodes[i].output[0] for i in group]
    base = first.op_type.lower()
    stacked, batched, sizes = fresh(f"shared_{base}_in"), fresh(f"shared_{base}"), fresh("shared_sizes")
    dims = [fresh("shared_n") for _ in xs]
    new = [helper.make_node("Shape", [x], [d], name=fresh("shared_n_node"), start=0, end=1) for x, d in zip(xs, dims)]
    new.append(helper.make_node("Concat", dims, [sizes], name=fresh("shared_sizes_node"), axis=0))
    new.append(helper.make_node("Concat", xs, [stacked], name=fresh(f"shared_{base}_in_node"), axis=0))
    op = onnx.NodeProto()
    op.CopyFrom(first)
    op.input[0] = stacked
    del op.output[:]
    op.output.append(batched)
    op.name = fresh(f"shared_{base}_node")
    new.append(op)
    new.append(helper.make_node("Split", [batched, sizes], ys, name=fresh("shared_split_node"), axis=0))
    for i in group:
        alive[i] = False
    extra[max(group)].extend(new)


def _toposort(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, stable: among ready nodes the earliest in ``nodes`` goes first."""
    made = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    need = [set() for _ in nodes]
    users = defaultdict(list)
    for i, n in enumerate(nodes):
        for t in n.input:
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
        raise ExciteError("internal: share_adjoints made a cycle")
    return out
