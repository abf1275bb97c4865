"""The rule registry and the context a rule sees.

A rule maps the signal P at a node's output to the signal at the node's data
inputs. It is one declaration (as in zennit; registered like onnx-graphsurgeon's
``Graph.register``)::

    @register("Resize", "Upsample", inputs=(0,), keeps_nonneg=True, check=resize_check,
              description="one line for the README table")
    def excite_resize(ctx, node, p, negate=False) -> dict[input_name, P]: ...

The registry is the single source of what is known about an op:

* ``inputs``: indices of the data inputs that may carry P (``None``: every
  non-constant input); the others are weights, shapes or parameters. The builder
  only calls a rule for a node with a data input that needs P and drops what a
  rule returns for inputs that need none.
* ``keeps_nonneg``: the output is >= 0 whenever its data inputs are >= 0
  (``True``), for every input (``"always"``: ReLU, Sigmoid), or a function
  ``(graph, node) -> bool | "always"`` deciding per node (Clip by its minimum).
  :func:`proves_nonneg` uses it to drop the a-W- half of the positive rule.
* ``check(graph, node)``: a reason string when the node cannot be handled.
* ``weighted``: a linear layer with a weight (can be the contrastive classifier).
* ``description``: one line for the README's op table (``python -m onnx_excite.rules``).

Rule modules are discovered: every module of this package registers its rules on import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import onnx

from ..graph.forward import ForwardGraph
from ..graph.emitter import Emitter
from ..graph.index import attr, implicit_inputs  # noqa: F401  (attr is re-exported for the rule modules)

RULE_CHOICES = ("positive", "paper")

NonNeg = Union[bool, str, Callable[[ForwardGraph, onnx.NodeProto], Union[bool, str]]]


@dataclass(frozen=True)
class Rule:
    op_type: str
    excite: Callable
    inputs: Optional[tuple] = None      # data input indices that may carry P; None: all non-constant
    keeps_nonneg: NonNeg = False        # True, "always", False, or (graph, node) -> one of those
    check: Optional[Callable[[ForwardGraph, onnx.NodeProto], Optional[str]]] = None
    weighted: bool = False              # a linear layer with a weight: can serve as the contrastive classifier
    description: str = ""               # one line for the README's op table


RULES: dict[str, Rule] = {}


def register(*op_types: str, inputs=None, keeps_nonneg: NonNeg = False, check=None, weighted: bool = False,
             description: str = ""):
    """Decorator registering ``fn(ctx, node, p, negate=False) -> {input: P}`` for ``op_types``."""

    def wrap(fn):
        text = description or "".join((fn.__doc__ or "").strip().splitlines()[:1])
        for op in op_types:
            if op in RULES:
                raise ValueError(f"op {op!r} is registered twice ({RULES[op].excite.__name__} and {fn.__name__})")
            RULES[op] = Rule(op, fn, tuple(inputs) if inputs is not None else None, keeps_nonneg, check, weighted, text)
        return fn

    return wrap


def data_inputs(graph: ForwardGraph, node: onnx.NodeProto) -> list[str]:
    """The node's non-constant inputs that may carry P, as its rule declares them
    (every non-constant input, subgraph reads included, for an op without a rule)."""
    rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if rule is not None and rule.inputs is not None:
        names = [node.input[i] for i in rule.inputs if i < len(node.input)]
    else:
        names = list(node.input) + (implicit_inputs(node) if rule is None else [])
    return [n for n in names if n and not graph.is_const(n)]


#: Ops without an excitation rule (they never carry P) whose output is >= 0 for any
#: input; they appear as gates and normalisers (``x * softmax(s)``).
NONNEG_WITHOUT_RULE = ("Softmax", "Exp", "Abs")


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
    if node.op_type in NONNEG_WITHOUT_RULE and node.domain in ("", "ai.onnx"):
        return True
    rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
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
    """What a rule may use: the forward graph, the emitter, the rule choice and the method.

    ``method`` is the :class:`~onnx_excite.methods.Method` whose sweep is being emitted
    (``None``: MWP); a rule asks it for its op family's rule variant (:meth:`variant`) and
    for the gate at rectifiers (:attr:`gate`)."""

    graph: ForwardGraph
    g: Emitter
    rule: str = "positive"
    wanted: frozenset = frozenset()   # tensors whose P is needed
    method: object = None             # onnx_excite.methods.Method; None: mwp

    def wants(self, name: str) -> bool:
        return name in self.wanted

    @property
    def the_method(self):
        if self.method is None:
            from ..methods import METHODS

            return METHODS["mwp"]
        return self.method

    def variant(self, family: str):
        """The method's :class:`~onnx_excite.methods.RuleVariant` for ``family``
        ("linear", "pool" or "add")."""
        return getattr(self.the_method, family)

    @property
    def gate(self) -> str:
        """The method's gate at rectifiers: forward-mask, backward-relu, both or none."""
        return self.the_method.relu

    @property
    def adjoint(self) -> bool:
        """True for the gradient family (grad, deconv, guided, cam): the linear layers are
        plain transposes (no activation factor), so activations must apply their
        derivative (``forward-mask``) or rectify P (``backward-relu``)."""
        return all(act == "1" for act, _ in self.variant("linear").resolve(self.rule))

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
