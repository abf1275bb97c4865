"""Share adjoint ops between backward sweeps: one batched op instead of several.

Methods whose sweeps differ (grad, deconv, guided; mwp and cmwp-postnorm's dual ...) each
emit, per linear layer, an op that applies the same weight initializer with the same
attributes to a different signal: ``y_k = op(x_k, W)`` for sweeps k = 1..n. These ops act
on every index of axis 0 independently (Conv / ConvTranspose: the batch; Gemm with
``transA=0`` and MatMul with a constant 2-D weight: the rows), so::

    [y_1; ...; y_n] = op([x_1; ...; x_n], W)      ([;]: Concat on axis 0)

and the y_k come back by a Split on axis 0 with the runtime sizes of the x_k (the batch
dim is symbolic). :func:`merge_adjoints` rewrites a list of emitted nodes that way, per
forward node the ops were emitted for (the builder's ``site``: equal input shapes). It
merges only ops that do not depend on each other (a dependency walk: no member's output
reaches another member's input), merges one group at a time on the rewritten graph (so
no cycle can form across groups either) and returns the nodes topologically sorted,
stable in the emitted order.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import onnx
from onnx import helper

from ..errors import ExciteError
from .index import toposort


def shareable() -> tuple[str, ...]:
    """The ops whose every index of axis 0 is computed independently given a constant weight:
    those declared multiply-accumulate layers (role ``mac`` in :mod:`onnx_excite.rules`)."""
    from ..rules import ops_with   # imported late: the rules import this package's modules

    return ops_with("mac")

#: the default: ops whose time is reading their weight (dense layers at small batch), where
#: one op on the stacked signals reads the weight once instead of once per sweep
WEIGHT_BOUND = ("Gemm", "MatMul")


#: the command line's names for the ``share_adjoints`` settings
SHARE_CHOICES = {"dense": WEIGHT_BOUND, "all": True, "none": False}


def parse_share(text: str):
    """The ``share_adjoints`` setting a command-line value names (:data:`SHARE_CHOICES`)."""
    if text not in SHARE_CHOICES:
        raise ExciteError(f"--share-adjoints {text!r}: choose dense (Gemm/MatMul, the default), all or none")
    return SHARE_CHOICES[text]


def shared_ops(share) -> tuple[str, ...]:
    """The op types a ``share_adjoints`` setting merges: True = all of :func:`shareable`,
    False/None = none, else the given op types (each must be shareable)."""
    if share is True:
        return shareable()
    if not share:
        return ()
    ops = (share,) if isinstance(share, str) else tuple(share)
    bad = [o for o in ops if o not in shareable()]
    if bad:
        raise ExciteError(f"share_adjoints: {', '.join(bad)} cannot be shared (shareable: {', '.join(shareable())})")
    return ops


def _key(node: onnx.NodeProto, is_const: Callable[[str], bool], ops: Sequence[str]):
    """The merge key (op, weight and bias inputs, attributes), or None if not shareable."""
    if node.op_type not in ops or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
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


def _reaches(producers: dict, position: dict, starts: Sequence[str], targets: set[str]) -> bool:
    """Whether a tensor in ``targets`` is an ancestor of (or is) a tensor in ``starts``. The
    nodes are topologically sorted (``position``): the walk does not go below the earliest
    producer of a target."""
    floor = min((position[id(producers[t])] for t in targets if t in producers), default=None)
    if floor is None:
        return bool(targets & set(starts))
    seen, stack = set(), list(starts)
    while stack:
        t = stack.pop()
        if t in targets:
            return True
        if t in seen:
            continue
        seen.add(t)
        node = producers.get(t)
        if node is not None and position[id(node)] >= floor:
            stack.extend(i for i in node.input if i)
    return False


def merge_adjoints(nodes: Sequence[onnx.NodeProto], is_const: Callable[[str], bool],
                   fresh: Callable[[str], str], site: Callable[[onnx.NodeProto], object] | None = None,
                   ops: Sequence[str] | None = None) -> tuple[list[onnx.NodeProto], int]:
    """Merge shareable ops of ``nodes`` (see the module docstring); returns the new node
    list (topologically sorted) and the number of ops removed. ``is_const(name)`` says
    whether a tensor is an initializer / constant; ``fresh(hint)`` makes unused names.
    ``site(node)`` (the forward node an op was emitted for) keeps ops of different sites
    apart: their inputs may differ in shape beyond axis 0 (a weight tied across layers of
    different sizes), which Concat cannot stack. Tensors produced outside ``nodes`` are
    treated as available from the start. ``ops``: the op types to merge (default: all shareable)."""
    ops = shareable() if ops is None else ops
    order = toposort(list(nodes), "merge_adjoints")
    groups: dict = defaultdict(list)
    for node in order:
        key = _key(node, is_const, ops)
        if key is not None:
            groups[(site(node) if site is not None else None, key)].append(node)
    removed = 0

    def index(order):
        return ({o: n for n in order for o in n.output if o}, {id(n): i for i, n in enumerate(order)})

    prod, position = index(order)
    for members in groups.values():
        pending = list(members)
        while len(pending) >= 2:
            group, rest = [pending[0]], []
            for cand in pending[1:]:
                independent = (not _reaches(prod, position, [cand.input[0]], {m.output[0] for m in group})
                               and not _reaches(prod, position, [m.input[0] for m in group], {cand.output[0]}))
                (group if independent else rest).append(cand)
            if len(group) >= 2:
                gone = {id(m) for m in group}
                order = toposort([n for n in order if id(n) not in gone] + _merged(group, fresh), "merge_adjoints")
                prod, position = index(order)
                removed += len(group) - 1
            pending = rest
    return order, removed


def _merged(group: list[onnx.NodeProto], fresh) -> list[onnx.NodeProto]:
    """Shape/Concat sizes, Concat of the inputs, the op once, Split into the old outputs."""
    first = group[0]
    xs = [n.input[0] for n in group]
    ys = [n.output[0] for n in group]
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
    return new
