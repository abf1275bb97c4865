"""The rule registry and the context a rule sees.

A rule maps the signal P at a node's output to the signal at the node's data
inputs. It is a function ``rule(ctx, node, p, negate=False) -> {input: P}``
registered for one or more ``op_type``; an optional ``check(graph, node)``
returns a reason string when the node cannot be handled. Adding an op is one
such function plus its test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import onnx

from ..canonicalize import ForwardGraph
from ..graph import Emitter

RULE_CHOICES = ("positive", "paper")


@dataclass
class Rule:
    op_type: str
    excite: Callable
    check: Optional[Callable[[ForwardGraph, onnx.NodeProto], Optional[str]]] = None
    weighted: bool = False     # a linear layer with a weight: can serve as the contrastive classifier
    description: str = ""      # one line for the README / `onnx-excite ops`
    inputs: Optional[tuple] = None   # indices of the inputs that may carry P (None: every non-constant input)
    keeps_nonneg: bool = False       # output >= 0 whenever those inputs (constants included) are >= 0


RULES: dict[str, Rule] = {}


def register(*op_types: str, check=None, weighted: bool = False, description: str = "",
             inputs: Optional[tuple] = None, keeps_nonneg: bool = False):
    """Decorator: ``@register("Resize", inputs=(0,), keeps_nonneg=True, check=resize_check)``.

    ``inputs`` fills :data:`DATA_INPUT_INDICES` and ``keeps_nonneg`` feeds the
    non-negativity prover of :class:`~onnx_excite.canonicalize.ForwardGraph`
    (a shim for the registry that declares both).
    """

    def wrap(fn):
        for op in op_types:
            RULES[op] = Rule(op, fn, check, weighted, description or (fn.__doc__ or "").strip().splitlines()[0],
                             inputs, keeps_nonneg)
            if inputs is not None:
                DATA_INPUT_INDICES[op] = tuple(inputs)
        return fn

    return wrap


@dataclass
class Context:
    """What a rule may use: the forward graph, the emitter and the rule choice."""

    graph: ForwardGraph
    g: Emitter
    rule: str = "positive"
    wanted: frozenset = frozenset()   # tensors whose P is needed

    def wants(self, name: str) -> bool:
        return name in self.wanted

    def act(self, name: str) -> str:
        """The activation as float32: the excitation branch of a float16 / bfloat16 / float64
        model runs in float32 (tiny normalisers underflow in half precision)."""
        dtype = self.graph.dtypes.get(name, onnx.TensorProto.FLOAT)
        if dtype == onnx.TensorProto.FLOAT:
            return name
        return self.g.memo(("f32", name), lambda: self.g.op("Cast", [name], to=onnx.TensorProto.FLOAT, hint="a_f32"))

    def signed(self, a: str) -> bool:
        """Whether the positive rule must treat ``a`` as possibly negative."""
        return self.rule == "positive" and not self.graph.nonneg(a)


def unsupported_reason(graph: ForwardGraph, node: onnx.NodeProto) -> Optional[str]:
    rule = RULES.get(node.op_type)
    if rule is None or node.domain not in ("", "ai.onnx"):
        return f"no excitation rule for op type {node.op_type}" + (f" (domain {node.domain})" if node.domain else "")
    return rule.check(graph, node) if rule.check else None


#: Inputs that carry activations (and so P); the others are weights, shapes or parameters.
DATA_INPUT_INDICES = {
    "Conv": (0,), "Gemm": (0,), "MatMul": (0,), "Reshape": (0,), "Squeeze": (0,), "Unsqueeze": (0,),
    "Pad": (0,), "Slice": (0,), "ReduceMean": (0,), "ReduceSum": (0,), "Clip": (0,), "Dropout": (0,),
    "PRelu": (0,), "BatchNormalization": (0,), "ReduceLogSumExp": (0,), "Resize": (0,), "Expand": (0,), "Tile": (0,),
}


def data_inputs(graph: ForwardGraph, node: onnx.NodeProto) -> list[str]:
    """The node's non-constant inputs that carry activations."""
    idx = DATA_INPUT_INDICES.get(node.op_type)
    names = [node.input[i] for i in idx if i < len(node.input)] if idx else list(node.input)
    return [n for n in names if n and not graph.is_const(n)]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
