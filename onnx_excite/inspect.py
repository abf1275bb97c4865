"""What a model offers: candidate layers and the nodes the rewrite cannot handle."""
from __future__ import annotations

from dataclasses import dataclass

from .builder import _upstream, find_unsupported, path_nodes
from .canonicalize import ForwardGraph, canonicalize


@dataclass
class LayerInfo:
    name: str          # the ONNX tensor name to pass as a layer
    op_type: str       # op that produces it ("input" for a graph input)
    shape: tuple | None


@dataclass
class ModelReport:
    graph: ForwardGraph
    layers: list[LayerInfo]
    problems: list[tuple[str, str, str]]   # (op_type, node name, reason)

    @property
    def ok(self) -> bool:
        return not self.problems


def inspect_model(model, output: str | None = None, input_shapes=None) -> ModelReport:
    """Candidate layers (tensors that feed the logits) and unsupported nodes on that path."""
    graph = canonicalize(model, output=output, input_shapes=input_shapes)
    up = _upstream(graph, graph.entry)
    nodes = path_nodes(graph, up)
    layers = [LayerInfo(name, "input", graph.shape(name)) for name in graph.input_names if name in up]
    layers += [LayerInfo(n.output[0], n.op_type, graph.shape(n.output[0])) for n in nodes]
    return ModelReport(graph, layers, find_unsupported(graph, nodes))
