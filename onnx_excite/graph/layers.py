"""What a model offers: candidate layers (with their channel axis) and the nodes the rewrite cannot handle."""
from __future__ import annotations

from dataclasses import dataclass

from ..rules.base import data_inputs
from .builder import _upstream, check_layers, check_model, find_cut, find_unsupported, path_nodes
from .canonicalize import LogitsChoice, canonicalize
from .forward import ForwardGraph
from .layout import Layout, channel_axis


@dataclass
class LayerInfo:
    name: str          # the ONNX tensor name to pass as a layer
    op_type: str       # op that produces it ("input" for a graph input)
    shape: tuple | None
    layout: Layout | None = None   # the channel axis the map sums over


@dataclass
class ModelReport:
    graph: ForwardGraph
    layers: list[LayerInfo]
    problems: list[tuple[str, str, str]]   # (op_type, node name, reason)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def logits(self) -> LogitsChoice:
        """Which tensor the signal enters at, and how it was chosen."""
        return self.graph.logits


def inspect_model(model, logits: str | None = None, input_shapes=None, layers=None, output: str | None = None) -> ModelReport:
    """Candidate layers (tensors that feed the logits) and unsupported nodes on that path.

    ``layers`` (optional) are validated exactly as the builder validates them."""
    graph = canonicalize(model, logits=logits if logits is not None else output, input_shapes=input_shapes)
    check_model(graph)
    if layers:
        check_layers(graph, layers)
    up = _upstream(graph, graph.entry)
    nodes = path_nodes(graph, up)
    infos = [LayerInfo(name, "input", graph.shape(name)) for name in graph.input_names if name in up]
    infos += [LayerInfo(n.output[0], n.op_type, graph.shape(n.output[0])) for n in nodes]
    for info in infos:
        info.layout = channel_axis(graph, info.name)
    return ModelReport(graph, infos, find_unsupported(graph, nodes) + find_cut(graph, up))


#: ops between the last feature map (or token layer) and the classifier that the default layer skips
_HEAD_OPS = {"Gemm", "MatMul", "Add", "Flatten", "Reshape", "Squeeze", "Identity", "Dropout", "Transpose",
             "LayerNormalization"}


def default_layer(graph: ForwardGraph) -> str | None:
    """The map layer of a model with LayerNormalization on its path (ConvNeXt, ViT) when none is
    named: from the logits down the head (classifier, bias, reshapes, the final norm) to the last
    feature map a global pool reads (ConvNeXt), or to the tokens a class-token Gather / Slice
    picks from (ViT: the last block's output, below the final norm). None for other models
    (convolutional nets name theirs: their profile or ``--layer``)."""
    if not any(n.op_type == "LayerNormalization" for n in path_nodes(graph, _upstream(graph, graph.entry))):
        return None
    t = graph.entry
    while True:
        node = graph.producer.get(t)
        data = data_inputs(graph, node) if node is not None else []
        if node is None or len(data) != 1:
            return None
        if node.op_type in ("GlobalAveragePool", "ReduceMean", "Gather", "Slice"):
            below = data[0]
            norm = graph.producer.get(below)
            if node.op_type in ("Gather", "Slice") and norm is not None and norm.op_type == "LayerNormalization":
                below = norm.input[0]
            return below
        if node.op_type not in _HEAD_OPS:
            return None
        t = data[0]
