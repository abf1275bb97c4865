"""Build ONE ONNX model holding the forward graph and its excitation branch.

The built model takes the original input(s) plus a signal ``excite_signal``
(N x K, the top signal at the logits) and outputs, besides the original
outputs and the logits, one map ``<method>:<layer>`` per (method, layer), for any
method registered in :data:`onnx_excite.methods.METHODS` (``onnx-excite methods``), e.g.

* ``mwp:<layer>``  - Marginal Winning Probability, the sum over channels of P
  (over the layer's channel axis: axis 3 of an NHWC tensor, see :mod:`.layout`),
  so a map is (N, H, W);
* ``cmwp:<layer>`` - contrastive MWP: the signal excites the classifier with
  its weights and with the negated weights (the dual), the difference is
  taken at the classifier's input and propagated down with the same rules
  (they are linear in P); the channel sum is clipped at 0;
* ``grad:<layer>``, ``deconv:``, ``guided:``, ``lrp-epsilon:``, ``lrp-zplus:``, ``cam:``
  and the contrastive variants / ablations: the same sweep with the method's rule
  variants (its ``Method`` declaration), reduced, dual-subtracted and clipped as declared;
* ``rollout:<layer>`` - attention rollout (a method of ``kind`` rollout): no sweep, the
  forward attention weights multiplied (:mod:`.rollout`), at the tokens the first attention
  block reads.

All come out of one session run; methods share the forward pass and every backward piece
their declarations have in common (Z per layer, a+/a-, W+/W-, ReLU masks, MaxPool
routing, a whole sweep where only the dual differs). Optional ``P.<method>:<layer>``
outputs hold the channel-resolved signal (before clipping).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .forward import ForwardGraph
from .canonicalize import (LogitsChoice, canonicalize, default_opset, expose_maxpool_indices, folded_message,
                           infer_shapes)
from ..methods import CAM_REDUCTIONS, METHODS, get_method
from ..errors import ExciteError, UnsupportedModelError
from .emitter import Emitter
from ..io.modelfile import save_model
from .options import BuildOptions
from .share import WEIGHT_BOUND, shared_ops
from .share import merge_adjoints
from .layout import Layout, channel_axis
from .rollout import Rollout, emit_rollout, find_rollout
from .token_grid import token_grid
from ..rules import RULE_CHOICES, RULES, Context, data_inputs, has_role, unsupported_reason

SIGNAL = "excite_signal"

#: default of ``build_excitation_model(derive_weights=...)``: on, it wins on every count
#: measured (VGG16 pool4 + MWP: file 553 MB instead of 1.1 GB, build 2.6 s instead of
#: 4.3 s, session creation 8.4 s instead of 15.4 s, peak RSS 3.3 GB instead of 5.9 GB;
#: ONNX Runtime's optimised graphs, hence the run, are the same)
DERIVE_WEIGHTS = True


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
        """Write the model; past protobuf's 2 GiB limit the weights go to ``<path>.data``
        (:func:`onnx_excite.io.modelfile.save_model`); ``self.model`` keeps its weights."""
        save_model(self.model, path)


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
    cut = None
    for layer in layers:
        if layer not in known and layer in graph.folded:
            into = graph.producer.get(graph.folded[layer])
            raise ExciteError(folded_message("layer", layer, graph.folded[layer], into.op_type if into is not None else "layer"))
        if layer not in known:
            close = difflib.get_close_matches(layer, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; list them with `onnx-excite layers MODEL`"
            raise ExciteError(f"unknown layer {layer!r}{hint}")
        if layer not in up:
            cut = find_cut(graph, up) if cut is None else cut
            if cut:   # the layer may sit below a node that stops P (c / x): say which
                raise UnsupportedModelError(cut)
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


def cut_nodes(graph: ForwardGraph, tensors: set[str]) -> list[onnx.NodeProto]:
    """Nodes that produce one of ``tensors`` and read a tensor (non-constant) input, but whose
    rule declares none of those inputs as carrying P (``c / x``): P stops there and the layers
    below drop out of the path."""
    return [n for n in graph.nodes
            if n.output and n.output[0] in tensors and not any(i in tensors for i in data_inputs(graph, n))
            and any(i and not graph.is_const(i) for i in n.input)]


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def find_cut(graph: ForwardGraph, tensors: set[str]) -> list[tuple[str, str, str]]:
    """(op_type, node name, reason) for the :func:`cut_nodes` that stop P at an activation: their
    rule's ``check`` says why, else a floating-point input the declaration leaves out is named
    (integer inputs, e.g. the shape of an Expand, carry no P anyway)."""
    problems = []
    for node in cut_nodes(graph, tensors):
        reason = unsupported_reason(graph, node)
        if not reason:
            rule = RULES[node.op_type]
            left = [i for i in node.input if i and not graph.is_const(i) and graph.dtypes.get(i, onnx.TensorProto.FLOAT) in _FLOATS]
            if left:
                declared = ", ".join(str(i) for i in rule.inputs) if rule.inputs else "none"
                reason = (f"input {left[0]!r} is an activation but {node.op_type} declares only input(s) {declared} "
                          f"as carrying P: the signal would stop here")
        if reason:
            problems.append((node.op_type, node.name, reason))
    return problems


def find_classifier(graph: ForwardGraph, wanted: set[str], name: str | None = None) -> onnx.NodeProto:
    """The linear layer the contrastive signal negates: the first weighted node below the logits
    (the first of :func:`find_classifiers`)."""
    return find_classifiers(graph, wanted, name)[0]


def find_classifiers(graph: ForwardGraph, wanted: set[str], name: str | None = None) -> tuple:
    """The linear layers the contrastive signal negates: the first weighted node below the logits
    on each branch (one; two for a DeiT's class and distillation heads, whose sum the logits are)."""
    if name is not None:
        node = next((n for n in graph.nodes if n.name == name), None)
        if node is None or not RULES.get(node.op_type) or not RULES[node.op_type].weighted:
            raise ExciteError(f"classifier {name!r} is not a Conv/Gemm/MatMul node of the model")
        return (node,)
    found: list = []
    todo, seen = [graph.entry], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        node = graph.producer.get(t)
        if node is None:
            raise ExciteError("no linear classifier layer (Conv/Gemm/MatMul) found below the logits for contrastive MWP")
        rule = RULES.get(node.op_type)
        if rule is not None and rule.weighted:
            found.append(node)
            continue
        nxt = [i for i in data_inputs(graph, node) if i in wanted] or data_inputs(graph, node)
        if len(nxt) != 1 and node.op_type not in ("Add", "Sum"):
            raise ExciteError(f"cannot find the classifier below the logits: node {node.name!r} ({node.op_type}) "
                              f"merges several branches; name it with classifier=")
        todo.extend(reversed(nxt))
    return tuple(found)


# ---------------------------------------------------------------------------
# the builder
# ---------------------------------------------------------------------------
def _ir_version_for(opset: int) -> int:
    return 8 if opset <= 18 else 9 if opset <= 20 else 10


def build_excitation_model(model, layers: Sequence[str] | None = None, methods: Sequence[str] | None = None, *,
                           options: BuildOptions | None = None, **fields) -> ExcitationModel:
    """Build the companion model for ``layers`` (ONNX tensor names) and ``methods`` (names
    registered in :data:`onnx_excite.methods.METHODS`, see ``onnx-excite methods``; default
    mwp and cmwp).

    The settings travel as one :class:`~onnx_excite.graph.options.BuildOptions` (``options``);
    ``layers``, ``methods`` and keyword ``fields`` (its field names: ``rule="paper"``,
    ``channels=True`` ...) replace what it holds.

    ``model`` is a path or a ModelProto; it is never modified. ``logits`` names the
    output (or tensor) the signal enters at (``output`` is its older alias); without
    it :func:`~onnx_excite.graph.canonicalize.resolve_logits` chooses, and the built model's
    ``logits_choice`` says how. With ``diagnostics`` the model also outputs
    ``mass.<method>:<layer>`` (N,), the total P that reached each layer (for a
    ``separate``-dual method: target minus dual), to compare with ``Method.mass``:
    what is missing was lost where Z == 0. ``share_adjoints`` batches the adjoint ops
    that different sweeps apply with the same weight (:mod:`onnx_excite.graph.share`): one op
    per layer instead of one per sweep, on the signals stacked on the batch axis. By
    default (:data:`~onnx_excite.graph.share.WEIGHT_BOUND`) only Gemm/MatMul, whose time at small
    batch is reading the weight (VGG16's fc6 reads 411 MB per op); ``True`` adds
    Conv/ConvTranspose, where on a 2-core CPU the Concat/Split copies cost more than the
    fewer, larger ops save (MobileNetV2, grad+deconv+guided: 1.06-1.22x slower); ``False``
    shares none.

    ``derive_weights`` (default :data:`DERIVE_WEIGHTS`, on): the weights the excitation
    applies that derive from the model's own initializers (W+ = Relu(W), W- = Min(W, 0),
    -W, a transpose, the flipped stride-1 adjoint kernel, float32 from a float16 weight)
    are computed in the graph from that initializer, so the file stores each weight once;
    ONNX Runtime folds these constant subgraphs once at session load (any graph
    optimisation level but ``disable``) and the optimised graph is the one the stored
    weights give. Off: they are stored as initializers (keyed by their origin, each once).
    Where a rule applies the model's weight itself (W), the initializer is used either way.

    Three steps: :func:`validate` (names, rule, layers, supported ops, classifier, CAM
    head), :func:`sweep` (the backward sweeps the methods need, shared where their
    declarations agree) and :func:`expose` (the maps as outputs).
    """
    opts = BuildOptions.of(options, layers, methods, **fields)
    plan = validate(model, opts.layers or (), opts.methods, opts.rule, opts.classifier, opts.logits, opts.input_shapes)
    plan.g.derive_weights = DERIVE_WEIGHTS if opts.derive_weights is None else bool(opts.derive_weights)
    sweeps = sweep(plan, share_adjoints=opts.share_adjoints)
    return expose(plan, sweeps, channels=opts.channels, diagnostics=opts.diagnostics)


@dataclass
class Plan:
    """What :func:`validate` checked and :func:`sweep` / :func:`expose` use."""

    graph: ForwardGraph
    layers: list[str]
    methods: tuple[str, ...]
    rule: str
    wanted: set[str]
    nodes: list[onnx.NodeProto]
    classifier: onnx.NodeProto | None
    g: Emitter
    ctx: Context
    classifiers: tuple = ()           # every classifier the dual negates (several for summed heads)
    rollout: Rollout | None = None    # the attention blocks a rollout method reads


def check_model(graph: ForwardGraph) -> None:
    """What every build needs of the model itself: an input to feed."""
    if not graph.input_names:
        raise ExciteError("the model has no inputs: there is nothing to feed an image to")


def validate(model, layers: Sequence[str], methods: Sequence[str], rule: str = "positive",
             classifier: str | None = None, logits: str | None = None,
             input_shapes: Mapping[str, Sequence[int | None]] | None = None) -> Plan:
    """Check every name and the model; canonicalize it. ExciteError (one line) otherwise."""
    methods = tuple(dict.fromkeys(methods))
    if not methods:
        raise ExciteError(f"no method given; choose from {', '.join(METHODS)}")
    declared = [get_method(m) for m in methods]
    if rule not in RULE_CHOICES:
        raise ExciteError(f"unknown rule {rule!r}; choose from {', '.join(RULE_CHOICES)}")
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ExciteError("no layer given; list candidates with `onnx-excite layers MODEL`")

    graph = canonicalize(model, logits=logits, input_shapes=input_shapes)
    check_model(graph)
    check_layers(graph, layers)
    rollout = find_rollout(graph) if any(m.kind == "rollout" for m in declared) else None
    for m in declared:
        if m.layers in LAYER_WORDS:   # defined at one layer of its own
            own = method_layer(graph, m) if m.kind != "rollout" else rollout.layer
            for layer in layers:
                if layer != own:
                    raise ExciteError(f"{m.name}: defined only at {LAYER_WORDS[m.layers]} {own!r}, not at {layer!r}")
        if m.layers == "feature-maps":
            check_feature_maps(graph, m.name, layers)
    wanted = _downstream(graph, layers) & _upstream(graph, graph.entry)
    nodes = path_nodes(graph, wanted)
    problems = find_unsupported(graph, nodes) if any(m.sweeps for m in declared) else []   # rollout: the forward only
    if problems:
        raise UnsupportedModelError(problems)
    expose_maxpool_indices(graph.model, nodes)

    clf = None
    contrastive = [m.name for m in declared if m.contrastive]
    clfs = ()
    if contrastive:
        clfs = find_classifiers(graph, wanted, classifier)
        clf = clfs[0]
        if not all(any(i in wanted for i in data_inputs(graph, c)) for c in clfs):
            raise ExciteError(f"contrastive methods ({', '.join(contrastive)}) need layers below the classifier "
                              f"{clf.name!r}; {', '.join(repr(l) for l in layers)} is not")

    g = Emitter(set(tensor_names(graph)) | set(graph.consts) | {n.name for n in graph.nodes},
                sink=graph.model.graph.initializer)
    g.opset = default_opset(graph.model)
    ctx = Context(graph=graph, g=g, rule=rule, wanted=frozenset(wanted))
    return Plan(graph, layers, methods, rule, wanted, nodes, clf, g, ctx, clfs, rollout)


#: what the map layer of a method declared with ``layers`` other than ``any`` is
LAYER_WORDS = {"last-feature-map": "the last feature map", "attention-tokens": "the tokens the first attention block reads"}


def method_layer(graph: ForwardGraph, method) -> str | None:
    """The one layer ``method`` (a :class:`~onnx_excite.methods.Method`) is defined at (cam: the
    last feature map; rollout: the tokens the first attention block reads), None for a method
    defined at any layer; ExciteError naming the reason where the model has no such layer."""
    if method.layers == "last-feature-map":
        return cam_feature_map(graph, method.name)
    if method.layers == "attention-tokens":
        return find_rollout(graph).layer
    return None


def check_feature_maps(graph: ForwardGraph, method: str, layers: Sequence[str]) -> None:
    """Grad-CAM's layers: tensors with positions (rank >= 3: NCHW, channels-last, tokens), not
    the model's input (its colour channels are no features to weight: use a pixel method there)."""
    for layer in layers:
        if layer in graph.input_names:
            raise ExciteError(f"{method}: a class activation map of a feature layer, not of the model's input {layer!r}; "
                              f"for a map at the input use grad, guided, mwp ...")
        rank = graph.rank(layer)
        if rank is not None and rank < 3:
            raise ExciteError(f"{method}: needs a layer with positions (N, C, H, W), channels-last or tokens; "
                              f"{layer!r} has rank {rank}")


def cam_feature_map(graph: ForwardGraph, method: str = "cam") -> str:
    """The last feature map F of a ``logits = linear(global average pool(F))`` head: from
    the logits through an optional bias Add, the Gemm/MatMul classifier, Flatten/Reshape/
    Identity/Dropout, to a GlobalAveragePool or a ReduceMean over the spatial axes. CAM
    is defined only there; ExciteError naming the reason otherwise."""
    cur = graph.entry
    node = graph.producer.get(cur)
    if node is not None and has_role(node, "bias"):
        data = [i for i in node.input if i and not graph.is_const(i)]
        if len(data) == 1:
            node = graph.producer.get(data[0])
    if node is None or not has_role(node, "classifier"):
        raise ExciteError(f"{method}: the logits {graph.entry!r} do not come from a Gemm/MatMul classifier "
                          f"(found {node.op_type + ' ' + repr(node.name) if node is not None else 'a graph input'})")
    clf = node
    cur = clf.input[0]
    while True:
        node = graph.producer.get(cur)
        if node is None:
            raise ExciteError(f"{method}: no global average pool before the classifier {clf.name!r}")
        if has_role(node, "shape-only"):
            cur = node.input[0]
            continue
        if has_role(node, "global-pool"):
            return node.input[0]
        if has_role(node, "mean"):
            from ..rules.linear import reduce_axes

            rank = graph.rank(node.input[0])
            axes = reduce_axes(graph, node)
            if rank is not None and axes is not None and sorted(a % rank for a in axes) == list(range(2, rank)):
                return node.input[0]
            raise ExciteError(f"{method}: the ReduceMean {node.name!r} before the classifier is not over the spatial axes")
        raise ExciteError(f"{method}: the classifier {clf.name!r} is fed by {node.op_type} {node.name!r}, "
                          "not by a global average pool of the last feature map")


#: one backward sweep: (the method's sweep_key, mode); mode "target" (from the classifier as
#: it is), "difference" (rule(W) - rule(-W) at the classifier, propagated: c-MWP) or
#: "negated" (from the negated classifier: the separate dual)
SweepKey = tuple


def sweep_units(methods: Sequence[str]) -> dict:
    """{(sweep_key, mode): representative method} for the requested methods: methods with
    equal declarations up to their dual share one sweep (grad and c-grad; mwp and
    cmwp-postnorm; deconv and c-deconv)."""
    units: dict = {}
    for name in methods:
        m = get_method(name)
        if not m.sweeps:   # rollout: no backward sweep
            continue
        modes = {"none": ("target",), "difference": ("difference",), "separate": ("target", "negated")}[m.dual]
        for mode in modes:
            units.setdefault((m.sweep_key, mode), m)
    return units


def unit_of(method: str, mode: str) -> tuple:
    return (get_method(method).sweep_key, mode)


def sweep(plan: Plan, share_adjoints: bool | Sequence[str] = WEIGHT_BOUND) -> dict:
    """Emit the backward sweeps; returns {(sweep_key, mode): {tensor: P or None}} for the
    requested layers (None: all of P was lost on the way down). With ``share_adjoints``
    the ops that several sweeps apply with one weight run once on the stacked signals
    (:func:`onnx_excite.graph.share.merge_adjoints`)."""
    graph, g = plan.graph, plan.g
    at_classifier = {c.name for c in plan.classifiers}
    units = sweep_units(plan.methods)
    entry_shape = graph.shape(graph.entry)
    signal = SIGNAL if (entry_shape is not None and len(entry_shape) == 2) else g.reshape_like(SIGNAL, graph.entry)

    def top(method):
        if method.top == "score":  # LRP: the relevance of the target score, e * s
            return g.memo(("top", "score"), lambda: g.mul(signal, plan.ctx.act(graph.entry)))
        return signal

    ctxs = {u: replace(plan.ctx, method=m) for u, m in units.items()}
    pending = {u: {graph.entry: [top(m)]} for u, m in units.items()}
    done: dict = {u: {} for u in units}

    def p_of(u, tensor: str):
        if tensor not in done[u]:
            terms = pending[u].pop(tensor, [])
            done[u][tensor] = g.sum(terms) if terms else None
        return done[u][tensor]

    sites: dict = {}  # emitted node name -> the forward node it was emitted for
    for node in reversed(plan.nodes):  # every node here has a data input that needs P (path_nodes)
        first_emitted = len(g.nodes)
        excite = RULES[node.op_type].excite
        for u in units:
            p = p_of(u, node.output[0])
            if p is None:
                continue
            ctx, mode = ctxs[u], u[1]
            at_clf = node.name in at_classifier
            sent = excite(ctx, node, p, negate=at_clf and mode == "negated")
            if at_clf and mode == "difference":
                dual = excite(ctx, node, p, negate=True)
                sent = {k: _difference(g, sent.get(k), dual.get(k)) for k in set(sent) | set(dual)}
            for tensor, q in sent.items():
                if q is not None and tensor in plan.wanted:  # inputs that carry no P are skipped
                    pending[u].setdefault(tensor, []).append(q)
        sites.update((n.name, node.name) for n in g.nodes[first_emitted:])
    result = {u: {layer: p_of(u, layer) for layer in plan.layers} for u in units}
    ops = shared_ops(share_adjoints)
    if ops and len(units) > 1:
        consts = (set(graph.consts) | {t.name for t in g.initializers} | {t.name for t in graph.model.graph.initializer}
                  | g.derived_names)
        g.nodes[:], _ = merge_adjoints(g.nodes, consts.__contains__, g.fresh, site=lambda n: sites.get(n.name), ops=ops)
    return result


def expose(plan: Plan, sweeps: dict, channels: bool = False, diagnostics: bool = False) -> ExcitationModel:
    """Turn each method's P at each layer into its map (``reduce``, the ``separate`` dual's
    L1-normalised subtraction, ``clip``) and add the outputs to the model."""
    graph, g = plan.graph, plan.g
    entry_shape = graph.shape(graph.entry)
    num_classes = entry_shape[1] if entry_shape and len(entry_shape) >= 2 else None
    built = ExcitationModel(model=graph.model, inputs=list(graph.input_names), signal=SIGNAL,
                            logits=graph.entry, num_classes=num_classes, layers=plan.layers,
                            methods=plan.methods, rule=plan.rule,
                            classifier=", ".join(c.name for c in plan.classifiers) or None,
                            logits_choice=graph.logits)
    new_outputs = []
    for layer in plan.layers:
        rank = graph.rank(layer)
        if rank is None:
            raise ExciteError(f"the rank of layer {layer!r} is unknown (shape inference failed there)")
        layout = built.layouts[layer] = channel_axis(graph, layer)
        axis = layout.axis if layout.axis is not None else 1

        def p_at(method, mode):
            p = sweeps[unit_of(method, mode)][layer]
            if p is None:  # every share was lost on the way down: P is 0 here
                p = g.memo(("zeros", layer), lambda: g.op("ConstantOfShape", [g.shape(layer)],
                                                          value=onnx.numpy_helper.from_array(np.zeros(1, np.float32))))
            return p

        def act(layer=layer):
            return plan.ctx.act(layer)

        def reduced(method, p, a=act):
            kind = get_method(method).reduce
            if kind in CAM_REDUCTIONS:   # Grad-CAM: weights from P, applied to the activation
                return g.class_activation_map(p, a(), rank, axis, plus=kind == "grad-cam++")
            if kind == "abs-max":
                return g.abs_max(p, rank, axis)
            return g.channel_sum(p, rank, axis)

        map_rank = rank - 1 if rank >= 3 else rank
        grid = token_grid(graph, layer)
        if grid is not None:   # tokens: the patch tokens' map on the patch grid, the other tokens dropped
            map_rank = 3
            reduced = _on_grid(g, grid, reduced, act)
        for name in plan.methods:
            method = get_method(name)
            if method.kind == "rollout":   # from the forward attention weights; no P, no channels, no mass
                m = g.memo(("rollout",), lambda: emit_rollout(graph, g, plan.rollout))
                built.maps[(name, layer)] = _expose(g, m, map_name(name, layer), new_outputs, 3)
                continue
            p = p_at(name, "difference" if method.dual == "difference" else "target")
            m = g.memo(("map", layer, method.sweep_key, method.reduce, "difference" if method.dual == "difference" else "target"),
                       lambda: reduced(name, p))
            dual_p = None
            if method.dual == "separate":
                dual_p = p_at(name, "negated")
                m = g.sub(g.l1_normalised(m, map_rank), g.l1_normalised(reduced(name, dual_p), map_rank))
            if method.clip:
                m = g.relu(m)
            built.maps[(name, layer)] = _expose(g, m, map_name(name, layer), new_outputs, map_rank)
            if channels:
                built.channels[(name, layer)] = _expose(g, p, channels_name(name, layer), new_outputs, rank)
            if diagnostics and method.mass != "none":
                def total(t):
                    if grid is not None:   # the patch tokens' mass: the other tokens' share counts as lost
                        t = _patch_tokens(g, grid, t)
                    return g.op("ReduceSum", [t, g.i64(list(range(1, rank)))], keepdims=0, hint="mass") if rank > 1 else t

                mass = total(p) if dual_p is None else g.sub(total(p), total(dual_p))
                built.masses[(name, layer)] = _expose(g, mass, mass_name(name, layer), new_outputs, 1)

    _assemble(graph, g, new_outputs, num_classes)
    return built


def _patch_tokens(g: Emitter, grid, t: str) -> str:
    """The patch tokens of ``t`` (token axis 1)."""
    return g.op("Slice", [t, g.i64([grid.offset]), g.i64([grid.offset + grid.h * grid.w]), g.i64([1])], hint="patches")


def _on_grid(g: Emitter, grid, reduce, act):
    """``reduce`` (P -> its (N, T) token map) followed by the patch tokens laid out as (N, h, w).
    A class activation map (Grad-CAM) is computed on the patch tokens alone: its positions, whose
    means and sums give the channel weights, are the patches."""
    def on_grid(method, p):
        if get_method(method).reduce in CAM_REDUCTIONS:
            patches = _patch_tokens(g, grid, act())
            m = reduce(method, _patch_tokens(g, grid, p), lambda: patches)
        else:
            m = _patch_tokens(g, grid, reduce(method, p))
        return g.op("Reshape", [m, g.i64([0, grid.h, grid.w])], hint="map_grid")
    return on_grid


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
    _annotate_shapes(model)


def _annotate_shapes(model: onnx.ModelProto) -> None:
    """Record ONNX shape inference's shapes of the companion tensors as value_info. ONNX
    Runtime then sees that an activation and the adjoint it multiplies share one symbolic
    batch dim, so its CPU NCHWc pass keeps those Muls in the blocked layout instead of
    reordering both operands (MobileNetV2 to the input at a fixed 224 x 224 and dynamic
    batch: ReorderOutput nodes 206 -> 169, forward + MWP 0.82x). Best effort: a graph that
    ONNX cannot infer is left as it is."""
    try:
        infer_shapes(model)
    except ExciteError:
        pass
