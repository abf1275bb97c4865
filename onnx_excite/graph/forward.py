"""The forward-graph view the builder and the rules read: a canonical model with its
constants, shapes, element types, producers and consumers indexed once.

It knows nothing of the rules; what the rules derive from it (proven non-negativity) they
cache in :attr:`ForwardGraph.memo`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
from onnx import helper


@dataclass(frozen=True)
class LogitsChoice:
    """Where the top signal enters, and why that tensor."""

    tensor: str                 # the logits: the signal enters here (below a trailing Softmax)
    output: str                 # the output (or tensor) it was resolved from
    reason: str                 # how it was chosen, in words
    candidates: tuple = ()      # the float 2-D graph outputs there were to choose from

    @property
    def chosen_among_several(self) -> bool:
        return len(self.candidates) > 1 and self.reason != "given"


@dataclass
class ForwardGraph:
    """Read-only view of a canonical forward graph."""

    model: onnx.ModelProto
    entry: str                                   # the logits: where the top signal enters
    consts: dict[str, np.ndarray]
    shapes: dict[str, tuple]                      # dims are int or None (unknown)
    dtypes: dict[str, int] = field(default_factory=dict)   # onnx.TensorProto element types
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    logits: LogitsChoice | None = None            # how ``entry`` was chosen
    folded: dict[str, str] = field(default_factory=dict)  # tensor removed by a fold: the tensor it went into
    memo: dict = field(default_factory=dict)       # per-graph caches of the rules (e.g. proven non-negativity)

    @property
    def nodes(self) -> Sequence[onnx.NodeProto]:
        return self.model.graph.node

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.model.graph.input]

    def forward_model(self, copy_model: bool = True) -> onnx.ModelProto:
        """A copy of the forward model that also outputs the logits. ``copy_model=False``:
        the model itself where it already does (no copy of the weights; the caller must
        not modify it), a copy otherwise."""
        if not copy_model and self.entry in {o.name for o in self.model.graph.output}:
            return self.model
        model = copy.deepcopy(self.model)
        if self.entry not in {o.name for o in model.graph.output}:
            model.graph.output.append(helper.make_tensor_value_info(
                self.entry, self.dtypes.get(self.entry, onnx.TensorProto.FLOAT), None))
        return model

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def shape(self, name: str) -> tuple | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def static_dims(self, name: str, axes: Sequence[int]) -> list[int] | None:
        s = self.shapes.get(name)
        if s is None:
            return None
        dims = [s[a] for a in axes]
        return None if any(d is None for d in dims) else dims


def shape_of(value_info) -> tuple | None:
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim)
