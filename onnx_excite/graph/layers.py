"""What a model offers: candidate layers (with their channel axis) and the nodes the rewrite cannot handle."""
from __future__ import annotations

from dataclasses import dataclass

from ..rules.base import data_inputs
from .builder import _upstream, check_layers, check_model, find_cut, find_unsupported, path_nodes
from .canonicalize import LogitsChoice, canonicalize
from .forward import ForwardGraph
from .layout import Layout, channel_axis
from .token_grid import TokenGrid, token_grid


@dataclass
class LayerInfo:
    name: str          # the ONNX tensor name to pass as a layer
    op_type: str       # op that produces it ("input" for a graph input)
    shape: tuple | None
    layout: Layout | None = None   # the channel axis the map sums over
    grid: TokenGrid | None = None   # for the tokens of a vision transformer: the patch grid of the map

    @property
    def spatial(self) -> tuple | None:
        """(h, w) of a 4-D tensor by its channel axis (NCHW or NHWC), when both are known."""
        if self.shape is None or len(self.shape) != 4 or self.layout is None or self.layout.axis not in (1, 3):
            return None
        h, w = self.shape[2:4] if self.layout.axis == 1 else self.shape[1:3]
        return (h, w) if h and w else None

    def stride(self, input_hw: tuple | None) -> str:
        """How many input pixels one map cell spans (``/16``; ``/16x8`` where the axes differ;
        ``-`` where the tensor is no spatial map or a size is unknown), for input size ``input_hw``."""
        size = self.spatial
        if size is None or not input_hw or not all(input_hw):
            return "-"
        steps = [a / b for a, b in zip(input_hw, size)]
        texts = [f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:.2f}" for v in steps]
        return "/" + (texts[0] if texts[0] == texts[1] else "x".join(texts))

    def describe_layout(self) -> str:
        text = self.layout.describe() if self.layout else "-"
        return f"{text}, tokens: {self.grid.describe()}" if self.grid else text


@dataclass
class ModelReport:
    graph: ForwardGraph
    layers: list[LayerInfo]
    problems: list[tuple[str, str, str]]   # (op_type, node name, reason)
    default: str | None = None             # the map layer used when none is named (see default_layer)

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
        info.grid = token_grid(graph, info.name)
    problems = find_unsupported(graph, nodes) + find_cut(graph, up)
    return ModelReport(graph, infos, problems, default_layer(graph) if not problems else None)


#: ops between the last feature map (or token layer) and the classifier that the default layer skips
_HEAD_OPS = {"Gemm", "MatMul", "Add", "Flatten", "Reshape", "Squeeze", "Identity", "Dropout", "Transpose",
             "LayerNormalization", "Relu", "Clip", "Gelu", "Mul", "Div", "BatchNormalization"}


_POOLS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")


def default_layer(graph: ForwardGraph) -> str | None:
    """The map layer used when none is named (CAM's layer where there is one), or None.

    * A head that pools (ResNet, MobileNet, ConvNeXt, Swin): the last feature map, the input of
      the global pool below the head (classifier, bias, activations, reshapes, the final norm).
    * A dense head on a flattened map (VGG, AlexNet): the map the head flattens.
    * Else, with self-attention (a class-token head: ViT, DeiT): the tokens the last attention
      reads, i.e. the input of the last block (the layer norm in front of its V). Above that
      attention every op is per token and P sits on the class token alone, which the
      patch-grid map drops.
    """
    t, seen = graph.entry, set()
    while (node := graph.producer.get(t)) is not None and node.op_type in _HEAD_OPS and t not in seen:
        seen.add(t)
        data = data_inputs(graph, node)
        if len(data) != 1:
            break
        shape = graph.shape(data[0])
        if (node.op_type in ("Flatten", "Reshape") and shape is not None and len(shape) == 4
                and not (shape[2] == 1 and shape[3] == 1)):
            return data[0]   # a dense head on the flattened map
        t = data[0]
    if node is not None and node.op_type in _POOLS:
        return node.input[0]   # a pooled head: the last feature map
    nodes = path_nodes(graph, _upstream(graph, graph.entry))
    attention = [n for n in nodes if n.op_type == "MatMul" and not graph.is_const(n.input[1])
                 and getattr(graph.producer.get(n.input[0]), "op_type", "") == "Softmax"]
    if not attention:
        return None
    t = attention[-1].input[1]
    while (node := graph.producer.get(t)) is not None and node.op_type != "LayerNormalization":
        data = data_inputs(graph, node)
        if len(data) != 1:
            return None
        t = data[0]
    return node.input[0] if node is not None else None
