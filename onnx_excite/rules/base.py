"""The op registry: one declaration per op, and the context a rule sees.

Everything the tool knows about an op is its declaration (as in zennit a rule is one small
declaration; registered like onnx-graphsurgeon's ``Graph.register``)::

    @register("Resize", "Upsample", inputs=(0,), keeps_nonneg=True, check=resize_check,
              family="route", layout="elementwise", description="one line for the op table")
    def excite_resize(ctx, node, p, negate=False) -> dict[input_name, P]: ...

    declare("Softmax", keeps_nonneg="always", roles={"squasher"})   # an op that carries no P

Fields of a declaration (:class:`Rule`):

* ``excite``: the excitation rule, P at the output -> P at the data inputs; ``None`` for an
  op that carries no P (:func:`declare`): the builder refuses it on the signal's path.
* ``inputs``: indices of the data inputs that may carry P (``None``: every non-constant
  input); the others are weights, shapes or parameters.
* ``keeps_nonneg``: the output is >= 0 whenever its data inputs are >= 0 (``True``), for
  every input (``"always"``: ReLU, Softmax), or ``(graph, node) -> bool | "always"``;
  :func:`proves_nonneg` uses it to drop the a-W- half of the positive rule.
* ``check(graph, node)``: a reason string when the node cannot be handled.
* ``family``: which entry of a method's map applies (:meth:`onnx_excite.methods.Method.variant`):
  ``linear``, ``pool``, ``add`` (rule variants), ``rectifier`` (the method's gate),
  ``activation`` (pass P, or apply ``derivative``), ``arithmetic`` (excitation or the chain
  rule: Mul, Sub, Div, Mean), or a family no method changes (``route``, ``shape``, ``identity``).
* ``derivative(ctx, node, p) -> tensor``: the transposed Jacobian of an activation applied to
  P, for methods whose ``activation`` entry is ``derivative``.
* ``layout``: what the op does to the channel axis (:mod:`onnx_excite.graph.layout`): ``nchw``
  (data input and output have channels at axis 1), ``elementwise`` (the output has the
  layout of its same-rank inputs), ``transpose``, ``einsum`` or ``None``.
* ``roles``: what else reads the declaration: ``squasher`` (a Softmax-like op below the
  logits), ``shape-only`` (moves values, no arithmetic: the logits and CAM walks pass it),
  ``affine`` (a per-channel Mul/Div/Add/Sub the canonicalizer folds into the layer before it),
  ``bias`` (a sum that may add a classifier's bias), ``classifier`` (a dense layer CAM
  accepts), ``global-pool`` (a global average pool CAM accepts), ``mean`` (a mean CAM accepts
  where its axes are the spatial ones), ``mac`` (multiply-accumulate
  layers: counted by :mod:`~onnx_excite.graph.flops`, shareable by :mod:`~onnx_excite.graph.share`).
* ``weighted``: a linear layer with a weight (can be the contrastive classifier).
* ``description``: one line for the op table (``python -m onnx_excite.optable docs/rules.md``).

Rule modules are discovered: every module of this package registers its ops on import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import onnx

from ..graph.forward import ForwardGraph
from ..graph.emitter import Emitter
from ..graph.index import attr, implicit_inputs  # noqa: F401  (attr is re-exported for the rule modules)

from ..methods import RULE_PARTS

RULE_CHOICES = tuple(RULE_PARTS)

FAMILIES = ("linear", "pool", "add", "rectifier", "activation", "arithmetic", "route", "shape", "identity")
LAYOUTS = (None, "nchw", "elementwise", "transpose", "einsum")
ROLES = frozenset({"squasher", "shape-only", "affine", "bias", "classifier", "global-pool", "mean", "mac"})

NonNeg = Union[bool, str, Callable[[ForwardGraph, onnx.NodeProto], Union[bool, str]]]


@dataclass(frozen=True)
class Rule:
    """The declaration of one op (see the module docstring for every field)."""

    op_type: str
    excite: Optional[Callable]          # None: the op carries no P
    inputs: Optional[tuple] = None      # data input indices that may carry P; None: all non-constant
    keeps_nonneg: NonNeg = False        # True, "always", False, or (graph, node) -> one of those
    check: Optional[Callable[[ForwardGraph, onnx.NodeProto], Optional[str]]] = None
    weighted: bool = False              # a linear layer with a weight: can serve as the contrastive classifier
    description: str = ""               # one line for the op table
    family: str = "route"
    derivative: Optional[Callable] = None   # (ctx, node, p) -> the transposed Jacobian applied to p
    layout: Optional[str] = None
    roles: frozenset = frozenset()

    def __post_init__(self):
        if self.family not in FAMILIES or self.layout not in LAYOUTS or not self.roles <= ROLES:
            raise ValueError(f"op {self.op_type!r}: bad declaration (family {self.family!r}, layout {self.layout!r}, "
                             f"roles {sorted(self.roles)})")


#: every declared op
OPS: dict[str, Rule] = {}
#: the declared ops that carry P (their ``excite`` is a rule)
RULES: dict[str, Rule] = {}


def _declare(op_types, excite, inputs, description, roles, **fields):
    for op in op_types:
        if op in OPS:
            raise ValueError(f"op {op!r} is registered twice")
        rule = Rule(op, excite, tuple(inputs) if inputs is not None else None, description=description,
                    roles=frozenset(roles), **fields)
        OPS[op] = rule
        if excite is not None:
            RULES[op] = rule


def register(*op_types: str, inputs=None, keeps_nonneg: NonNeg = False, check=None, weighted: bool = False,
             description: str = "", family: str = "route", derivative=None, layout=None, roles=()):
    """Decorator declaring ``fn(ctx, node, p, negate=False) -> {input: P}`` as the rule of ``op_types``."""

    def wrap(fn):
        text = description or "".join((fn.__doc__ or "").strip().splitlines()[:1])
        _declare(op_types, fn, inputs, text, roles, keeps_nonneg=keeps_nonneg, check=check, weighted=weighted,
                 family=family, derivative=derivative, layout=layout)
        return fn

    return wrap


def declare(*op_types: str, keeps_nonneg: NonNeg = False, layout=None, roles=(), description: str = ""):
    """Declare ops that carry no P (the builder refuses them on the signal's path) but whose
    layout, sign or role other parts of the tool read."""
    _declare(op_types, None, None, description, roles, keeps_nonneg=keeps_nonneg, layout=layout)


def declared(op_type: str, domain: str = "") -> Optional[Rule]:
    """The declaration of an op of the default domain, or None."""
    return OPS.get(op_type) if domain in ("", "ai.onnx") else None


def has_role(node: onnx.NodeProto, role: str) -> bool:
    rule = declared(node.op_type, node.domain)
    return rule is not None and role in rule.roles


def ops_with(role: str) -> tuple:
    """The op types declared with ``role``, sorted by name."""
    return tuple(sorted(op for op, rule in OPS.items() if role in rule.roles))


def data_inputs(graph: ForwardGraph, node: onnx.NodeProto) -> list[str]:
    """The node's non-constant inputs that may carry P, as its rule declares them
    (every non-constant input, subgraph reads included, for an op without a rule)."""
    rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if rule is not None and rule.inputs is not None:
        names = [node.input[i] for i in rule.inputs if i < len(node.input)]
    else:
        names = list(node.input) + (implicit_inputs(node) if rule is None else [])
    return [n for n in names if n and not graph.is_const(n)]


def proves_nonneg(graph: ForwardGraph, name: str) -> bool:
    """True where the tensor is provably >= 0 for every input: a non-negative constant,
    or the output of an op whose rule ``keeps_nonneg`` with non-negative data inputs."""
    memo = graph.memo.setdefault("nonneg", {})
    if name not in memo:
        memo[name] = False  # a DAG has no cycles; this guards the recursion anyway
        memo[name] = _prove(graph, name)
    return memo[name]


def _prove(graph: ForwardGraph, name: str) -> bool:
    if name in graph.consts:
        return bool(np.all(graph.consts[name] >= 0))
    node = graph.producer.get(name)
    if node is None:
        return False  # a graph input: pixels may be signed
    rule = declared(node.op_type, node.domain)
    if rule is None:
        return False
    keeps = rule.keeps_nonneg(graph, node) if callable(rule.keeps_nonneg) else rule.keeps_nonneg
    if keeps == "always":
        return True
    if not keeps:
        return False
    if rule.inputs is None:
        data = [i for i in node.input if i]
    else:
        data = [node.input[i] for i in rule.inputs if i < len(node.input) and node.input[i]]
    return all(proves_nonneg(graph, i) for i in data)


@dataclass
class Context:
    """What a rule may use: the forward graph, the emitter, the rule choice and the method's map.

    A rule asks for the entry of its op family in the method's map (:meth:`variant`), never
    for the method itself: mwp, grad and LRP differ only in what that map holds."""

    graph: ForwardGraph
    g: Emitter
    rule: str = "positive"
    wanted: frozenset = frozenset()   # tensors whose P is needed
    method: object = None             # onnx_excite.methods.Method; None: mwp

    def wants(self, name: str) -> bool:
        return name in self.wanted

    def variant(self, family: str):
        """The method's entry for ``family`` (:meth:`onnx_excite.methods.Method.variant`)."""
        from ..methods import METHODS

        return (self.method or METHODS["mwp"]).variant(family)

    @property
    def method_name(self) -> str:
        """For error lines only."""
        return self.method.name if self.method is not None else "mwp"

    def act(self, name: str) -> str:
        """The activation as float32: the excitation branch of a float16 / bfloat16 / float64
        model runs in float32 (tiny normalisers underflow in half precision)."""
        dtype = self.graph.dtypes.get(name, onnx.TensorProto.FLOAT)
        if dtype == onnx.TensorProto.FLOAT:
            return name
        return self.g.memo(("f32", name), lambda: self.g.op("Cast", [name], to=onnx.TensorProto.FLOAT, hint="a_f32"))

    def signed(self, a: str) -> bool:
        """Whether the positive rule must treat ``a`` as possibly negative."""
        return self.rule == "positive" and not proves_nonneg(self.graph, a)


def unsupported_reason(graph: ForwardGraph, node: onnx.NodeProto) -> Optional[str]:
    rule = RULES.get(node.op_type)
    if rule is None or node.domain not in ("", "ai.onnx"):
        return f"no excitation rule for op type {node.op_type}" + (f" (domain {node.domain})" if node.domain else "")
    return rule.check(graph, node) if rule.check else None
