"""Build ONE ONNX model holding the forward graph and its excitation branch.

The built model takes the original input(s) plus a signal ``excite_signal``
(N x K, the top signal at the logits) and outputs, besides the original
outputs and the logits, one map per (method, layer):

* ``mwp:<layer>``  - Marginal Winning Probability, the sum over channels of P
  (over the layer's channel axis: axis 3 of an NHWC tensor, see :mod:`.layout`),
  so a map is (N, H, W);
* ``cmwp:<layer>`` - contrastive MWP: the signal excites the classifier with
  its weights and with the negated weights (the dual), the difference is
  taken at the classifier's input and propagated down with the same rules
  (they are linear in P); the channel sum is clipped at 0.

Both come out of one session run. Optional ``P.<method>:<layer>`` outputs hold
the channel-resolved signal (before clipping).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .canonicalize import ForwardGraph, LogitsChoice, canonicalize, default_opset, expose_maxpool_indices
from .errors import ExciteError, UnsupportedModelError
from .graph import Emitter
from .layout import Layout, channel_axis
from .rules import RULE_CHOICES, RULES, Context, data_inputs, unsupported_reason

METHODS = ("mwp", "cmwp")
SIGNAL = "excite_signal"


def map_name(method: str, layer: str) -> str:
    return f"{method}:{layer}"


def channels_name(method: str, layer: str) -> str:
    return f"P.{method}:{layer}"


def mass_name(method: str, layer: str) -> str:
    return f"mass.{method}:{layer}"


@dataclass
class ExcitationModel:
    """The built companion model and what its inputs and outputs mean."""

    model: onnx.ModelProto
    inputs: list[str]                 # the forward inputs, in order
    signal: str                       # the signal input (N x K)
    logits: str                       # the tensor the signal enters at
    num_classes: int | None
    layers: list[str]
    methods: tuple[str, ...]
    rule: str
    classifier: str | None            # node name of the contrastive classifier
    maps: dict[tuple[str, str], str] = field(default_factory=dict)       # (method, layer) -> output
    channels: dict[tuple[str, str], str] = field(default_factory=dict)   # (method, layer) -> output
    masses: dict[tuple[str, str], str] = field(default_factory=dict)     # (method, layer) -> output (N,)
    layouts: dict[str, Layout] = field(default_factory=dict)             # layer -> its channel axis
    logits_choice: LogitsChoice | None = None                            # how the logits were chosen

    def save(self, path) -> None:
        """Write the model; past protobuf's 2 GiB limit the weights go to ``<path>.data``."""
        from .runtime import PROTOBUF_LIMIT

        if self.model.ByteSize() < PROTOBUF_LIMIT:
            onnx.save(self.model, str(path))
        else:
            onnx.save(self.model, str(path), save_as_external_data=True, location=f"{Path(path).name}.data")


# ---------------------------------------------------------------------------
# graph analysis
# ---------------------------------------------------------------------------
def tensor_names(graph: ForwardGraph) -> list[str]:
    names = list(graph.input_names)
    for node in graph.nodes:
        names.extend(o for o in node.output if o)
    return names


def _downstream(graph: ForwardGraph, starts) -> set[str]:
    seen, stack = set(starts), list(starts)
    while stack:
        t = stack.pop()
        for node in graph.consumers.get(t, []):
            if t in data_inputs(graph, node):
                for o in node.output[:1]:
                    if o and o not in seen:
                        seen.add(o)
                        stack.append(o)
    return seen


def _upstream(graph: ForwardGraph, entry: str) -> set[str]:
    seen, stack = {entry}, [entry]
    while stack:
        node = graph.producer.get(stack.pop())
        if node is None:
            continue
        for i in data_inputs(graph, node):
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def check_layers(graph: ForwardGraph, layers: Sequence[str]) -> None:
    """The one validation of layer names (builder, Exciter, every command): each must be a
    tensor of the model that feeds the logits."""
    names = tensor_names(graph)
    known = set(names)
    up = _upstream(graph, graph.entry)
    for layer in layers:
        if layer not in known:
            close = difflib.get_close_matches(layer, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; list them with `onnx-excite layers MODEL`"
            raise ExciteError(f"unknown layer {layer!r}{hint}")
        if layer not in up:
            raise ExciteError(f"layer {layer!r} does not feed the logits {graph.entry!r}")


def find_unsupported(graph: ForwardGraph, nodes=None) -> list[tuple[str, str, str]]:
    """(op_type, node name, reason) for every node the rewrite cannot handle."""
    problems = []
    for node in nodes if nodes is not None else graph.nodes:
        reason = unsupported_reason(graph, node)
        if reason:
            problems.append((node.op_type, node.name, reason))
    return problems


def path_nodes(graph: ForwardGraph, tensors: set[str]) -> list[onnx.NodeProto]:
    """Nodes that move P between ``tensors`` (output and some data input in the set)."""
    return [n for n in graph.nodes
            if n.output and n.output[0] in tensors and any(i in tensors for i in data_inputs(graph, n))]


def find_classifier(graph: ForwardGraph, wanted: set[str], name: str | None = None) -> onnx.NodeProto:
    """The linear layer the contrastive signal negates: the first weighted node below the logits."""
    if name is not None:
        node = next((n for n in graph.nodes if n.name == name), None)
        if node is None or not RULES.get(node.op_type) or not RULES[node.op_type].weighted:
            raise ExciteError(f"classifier {name!r} is not a Conv/Gemm/MatMul node of the model")
        return node
    t = graph.entry
    while True:
        node = graph.producer.get(t)
        if node is None:
            raise ExciteError("no linear classifier layer (Conv/Gemm/MatMul) found below the logits for contrastive MWP")
        rule = RULES.get(node.op_type)
        if rule is not None and rule.weighted:
            return node
        nxt = [i for i in data_inputs(graph, node) if i in wanted] or data_inputs(graph, node)
        if len(nxt) != 1:
            raise ExciteError(f"cannot find the classifier below the logits: node {node.name!r} ({node.op_type}) merges several branches; name it with classifier=")
        t = nxt[0]


# ---------------------------------------------------------------------------
# the builder
# ---------------------------------------------------------------------------
def _ir_version_for(opset: int) -> int:
    return 8 if opset <= 18 else 9 if opset <= 20 else 10


def build_excitation_model(
    model,
    layers: Sequence[str],
    methods: Sequence[str] = ("mwp", "cmwp"),
    rule: str = "positive",
    channels: bool = False,
    classifier: str | None = None,
    logits: str | None = None,
    input_shapes: Mapping[str, Sequence[int | None]] | None = None,
    diagnostics: bool = False,
    output: str | None = None,
) -> ExcitationModel:
    """Build the companion model for ``layers`` (ONNX tensor names).

    ``model`` is a path or a ModelProto; it is never modified. ``logits`` names the
    output (or tensor) the signal enters at (``output`` is its older alias); without
    it :func:`~onnx_excite.canonicalize.resolve_logits` chooses, and the built model's
    ``logits_choice`` says how. With
    ``diagnostics`` the model also outputs ``mass.<method>:<layer>`` (N,), the
    total P that reached each layer: the rules conserve P, so what is missing
    from the signal's mass (MWP) or from 0 (c-MWP) was lost where Z == 0.
    """
    methods = tuple(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ExciteError(f"unknown method {bad[0] if bad else '(none)'!r}; choose from {', '.join(METHODS)}")
    if rule not in RULE_CHOICES:
        raise ExciteError(f"unknown rule {rule!r}; choose from {', '.join(RULE_CHOICES)}")
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ExciteError("no layer given; list candidates with `onnx-excite layers MODEL`")

    graph = canonicalize(model, logits=logits if logits is not None else output, input_shapes=input_shapes)
    check_layers(graph, layers)
    wanted = _downstream(graph, layers) & _upstream(graph, graph.entry)
    nodes = path_nodes(graph, wanted)
    problems = find_unsupported(graph, nodes)
    if problems:
        raise UnsupportedModelError(problems)
    expose_maxpool_indices(graph.model, nodes)

    clf = None
    if "cmwp" in methods:
        clf = find_classifier(graph, wanted, classifier)
        if not any(i in wanted for i in data_inputs(graph, clf)):
            raise ExciteError(f"contrastive MWP needs layers below the classifier {clf.name!r}; "
                              f"{', '.join(repr(l) for l in layers)} is not")

    g = Emitter(set(tensor_names(graph)) | set(graph.consts) | {n.name for n in graph.nodes},
                sink=graph.model.graph.initializer)
    ctx = Context(graph=graph, g=g, rule=rule, wanted=frozenset(wanted))

    entry_shape = graph.shape(graph.entry)
    num_classes = entry_shape[1] if entry_shape and len(entry_shape) >= 2 else None
    top = SIGNAL if (entry_shape is not None and len(entry_shape) == 2) else g.reshape_like(SIGNAL, graph.entry)

    pending = {m: {graph.entry: [top]} for m in methods}
    done: dict[str, dict[str, str | None]] = {m: {} for m in methods}

    def p_of(method: str, tensor: str):
        if tensor not in done[method]:
            terms = pending[method].pop(tensor, [])
            done[method][tensor] = g.sum(terms) if terms else None
        return done[method][tensor]

    for node in reversed(nodes):  # every node here has a data input that needs P (path_nodes)
        excite = RULES[node.op_type].excite
        for method in methods:
            p = p_of(method, node.output[0])
            if p is None:
                continue
            sent = excite(ctx, node, p)
            if method == "cmwp" and node.name == clf.name:
                dual = excite(ctx, node, p, negate=True)
                sent = {k: _difference(g, sent.get(k), dual.get(k)) for k in set(sent) | set(dual)}
            for tensor, q in sent.items():
                if q is not None and tensor in wanted:  # inputs that carry no P are skipped
                    pending[method].setdefault(tensor, []).append(q)

    built = ExcitationModel(model=graph.model, inputs=list(graph.input_names), signal=SIGNAL,
                            logits=graph.entry, num_classes=num_classes, layers=layers,
                            methods=methods, rule=rule, classifier=clf.name if clf is not None else None,
                            logits_choice=graph.logits)
    new_outputs = []
    for layer in layers:
        rank = graph.rank(layer)
        if rank is None:
            raise ExciteError(f"the rank of layer {layer!r} is unknown (shape inference failed there)")
        layout = built.layouts[layer] = channel_axis(graph, layer)
        for method in methods:
            p = p_of(method, layer)
            if p is None:  # every share was lost on the way down: P is 0 here
                p = g.op("ConstantOfShape", [g.shape(layer)], value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
            m = g.channel_sum(p, rank, layout.axis if layout.axis is not None else 1)
            if method == "cmwp":
                m = g.relu(m)
            built.maps[(method, layer)] = _expose(g, m, map_name(method, layer), new_outputs,
                                                   rank - 1 if rank >= 3 else rank)
            if channels:
                built.channels[(method, layer)] = _expose(g, p, channels_name(method, layer), new_outputs, rank)
            if diagnostics:
                mass = g.op("ReduceSum", [p, g.i64(list(range(1, rank)))], keepdims=0, hint="mass") if rank > 1 else p
                built.masses[(method, layer)] = _expose(g, mass, mass_name(method, layer), new_outputs, 1)

    _assemble(graph, g, new_outputs, num_classes)
    return built


def _difference(g: Emitter, target: str | None, dual: str | None) -> str | None:
    if dual is None:
        return target
    if target is None:
        return g.op("Neg", [dual])
    return g.sub(target, dual)


def _expose(g: Emitter, tensor: str, name: str, outputs: list, rank: int) -> str:
    g.nodes.append(helper.make_node("Identity", [tensor], [name], name=g.fresh("expose")))
    outputs.append((name, rank))
    return name


def _assemble(graph: ForwardGraph, g: Emitter, new_outputs: list[tuple[str, int]], num_classes) -> None:
    model = graph.model
    batch = None
    first = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    if first:
        batch = first[0].dim_param or (first[0].dim_value or None)
    model.graph.input.append(helper.make_tensor_value_info(SIGNAL, TensorProto.FLOAT, [batch or "N", num_classes]))
    model.graph.node.extend(g.nodes)
    model.graph.initializer.extend(g.initializers)
    existing = {o.name for o in model.graph.output}
    if graph.entry not in existing:
        shape = graph.shape(graph.entry)
        model.graph.output.append(helper.make_tensor_value_info(
            graph.entry, graph.dtypes.get(graph.entry, TensorProto.FLOAT), [None] * len(shape) if shape else [None, None]))
    for name, rank in new_outputs:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank))
    model.ir_version = _ir_version_for(default_opset(model))
    model.producer_name = "onnx-excite"
