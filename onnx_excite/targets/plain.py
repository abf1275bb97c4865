"""The plain serving model: post-processing of a built companion model for production runtimes.

* the signal inside the graph (``top1`` / ``topk:K``): ``TopK`` on the logits, ``OneHot``
  -> the signal, so a client sends only the image and gets back the predicted classes,
  their scores (softmax probabilities) and one map per class (the batch is tiled K times:
  the forward runs once per explained class);
* maps at the input resolution (``Resize``, bilinear or bicubic, half-pixel centres) and
  normalised inside the graph: ``max`` divides each map by its largest absolute value,
  ``sum`` by the sum of absolute values (a map that is 0 everywhere stays 0);
* a symbolic batch dimension for a model exported with a fixed batch of 1, when no
  Reshape has the batch size baked in.

Everything here rewrites a copy of :class:`~onnx_excite.graph.builder.ExcitationModel`'s graph;
the builder itself is untouched. As a deployment target (:mod:`onnx_excite.targets.export`) it
makes the batch dynamic before the build, rewrites the built model into the serving form
where the options ask for it, and writes the ``-o`` file.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ExciteError
from ..graph.builder import ExcitationModel
from ..graph.canonicalize import default_opset, load_model
from ..graph.emitter import Emitter
from ..graph.index import toposort
from ..io.modelfile import save_model
from ..run.runtime import make_session

SIGNALS = ("input", "top1", "topk:K")
MAP_SIZES = ("layer", "input")
NORMALIZE = ("none", "max", "sum")
RESIZE = ("bilinear", "bicubic")
CLASSES, SCORES = "classes", "scores"
#: a map whose largest |value| is below this is 0 everywhere (see Emitter's TINY)
_TINY = float(np.finfo(np.float32).tiny)


def parse_signal(text: str) -> int:
    """0 for ``input`` (the client feeds the signal), else the number of top classes explained."""
    text = (text or "input").strip().lower()
    if text == "input":
        return 0
    if text == "top1":
        return 1
    m = re.fullmatch(r"topk:(\d+)", text)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise ExciteError(f"unknown signal {text!r}; choose input, top1 or topk:K (K >= 1)")


def _choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise ExciteError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
    return value


def output_name(method: str, layer: str) -> str:
    """A serving output name: ``mwp_<layer>`` with the layer name cut to [A-Za-z0-9_.-]."""
    return f"{method}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', layer).strip('_') or 'layer'}"


@dataclass
class TensorSpec:
    name: str
    elem_type: int
    dims: list            # ints, or None for a dynamic dim (the batch first)


@dataclass
class ServingModel:
    """A deployable model and the description of its inputs and outputs."""

    model: onnx.ModelProto
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    maps: dict[tuple[str, str], str] = field(default_factory=dict)   # (method, layer) -> output
    top_k: int = 0
    classes: str | None = None
    scores: str | None = None
    logits: str | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# dynamic batch
# ---------------------------------------------------------------------------
def _downstream_nodes(model: onnx.ModelProto, starts) -> list[onnx.NodeProto]:
    reached, out = set(starts), []
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if any(i in reached for i in node.input):
            out.append(node)
            reached.update(o for o in node.output if o)
    return out


def _const_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    vals[node.output[0]] = numpy_helper.to_array(a.t)
    return vals


def make_batch_dynamic(model) -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` whose fixed batch dimension (the first dim of every graph input,
    when all of them are fixed) is symbolic ``N`` -- when that is safe -- and a one-line note.

    Unsafe: a Reshape/Expand/ConstantOfShape/Tile on the data path whose shape is a
    constant with a positive first entry (the batch size baked in). Then the model is
    returned unchanged and the note names the node. An already dynamic batch: no note ("").
    """
    proto = load_model(model)
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    fixed = [i for i in inputs if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].HasField("dim_value")]
    if not fixed:
        return proto, ""                      # already dynamic: nothing to say
    if len(fixed) != len(inputs):
        return proto, "batch kept fixed: some inputs have a dynamic first dimension, others a fixed one"
    batch = fixed[0].type.tensor_type.shape.dim[0].dim_value
    consts = _const_values(proto)
    for node in _downstream_nodes(proto, [i.name for i in inputs]):
        shape_input = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1}.get(node.op_type)
        if shape_input is None or len(node.input) <= shape_input:
            continue
        value = consts.get(node.input[shape_input])
        if value is not None and value.ndim == 1 and value.size and int(value[0]) > 0 and (
                node.op_type != "Tile" or int(value[0]) != 1):
            return proto, (f"batch kept at {batch}: {node.op_type} {node.name or node.output[0]!r} has the batch "
                           f"size baked into its constant shape {value.tolist()}")
    for vi in inputs + list(proto.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].Clear()
            dims[0].dim_param = "N"
    del proto.graph.value_info[:]   # inferred again, now with a symbolic batch
    return proto, f"batch dimension made dynamic (was fixed at {batch})"


# ---------------------------------------------------------------------------
# post-processing of the companion graph
# ---------------------------------------------------------------------------
class _Post:
    """Appends nodes to a copy of the built graph (opset-aware reductions)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        taken = {n.name for n in model.graph.node} | {o for n in model.graph.node for o in n.output}
        taken |= {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
        self.g = Emitter(taken, prefix="serve")
        self.opset = default_opset(model)

    def reduce(self, op: str, x: str, axes, keepdims=1) -> str:
        if op == "ReduceSum" or self.opset >= 18:
            return self.g.op(op, [x, self.g.i64(axes)], keepdims=keepdims)
        return self.g.op(op, [x], axes=list(axes), keepdims=keepdims)

    def unique(self, base: str) -> str:
        """``base``, or ``base_2``, ``base_3`` ... when the graph already has that name."""
        name, n = base, 1
        while name in self.g._taken:
            n += 1
            name = f"{base}_{n}"
        self.g._taken.add(name)
        return name

    def dims(self, x: str, start: int, end: int | None = None) -> str:
        ends = [end] if end is not None else [np.iinfo(np.int64).max]
        return self.g.op("Slice", [self.g.shape(x), self.g.i64([start]), self.g.i64(ends)])

    def finish(self, outputs: list[str]) -> None:
        self.model.graph.node.extend(self.g.nodes)
        self.model.graph.initializer.extend(self.g.initializers)
        _prune(self.model, outputs)


def _prune(model: onnx.ModelProto, outputs: list[str]) -> None:
    """Keep only the nodes, initializers and inputs the given outputs need, in that order."""
    needed, keep = set(outputs), []
    for node in reversed(toposort(list(model.graph.node), "the serving graph")):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:   # subgraphs (If/Loop) read outer names
                if a.type == onnx.AttributeProto.GRAPH:
                    needed.update(i for n in a.g.node for i in n.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    inits = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    ins = [i for i in model.graph.input if i.name in needed]
    del model.graph.input[:]
    model.graph.input.extend(ins)
    old = {o.name: o for o in model.graph.output}
    del model.graph.output[:]
    for name in outputs:
        model.graph.output.append(old.get(name) or helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None))
    del model.graph.value_info[:]


def _spatial_axes(model: onnx.ModelProto, image: str) -> tuple[int, int]:
    vi = next(i for i in model.graph.input if i.name == image)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ExciteError(f"--map-size input needs a 4-D image input; {image!r} has rank {len(dims)}")
    if dims[1] in (1, 3, 4) and dims[3] not in (1, 3, 4):
        return 2, 4
    if dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4):
        return 1, 3
    if dims[1] in (1, 3, 4):
        return 2, 4
    raise ExciteError(f"cannot tell the channel axis of input {image!r} (shape {dims}) for --map-size input")


def make_serving_model(built: ExcitationModel, signal: str = "input", map_size: str = "layer",
                       resize: str = "bilinear", normalize: str = "none") -> ServingModel:
    """Rewrite a copy of ``built``'s graph for serving (see the module docstring).

    Outputs: with ``signal='input'`` the logits and one map per (method, layer), shape
    (N, h, w); with ``top1`` / ``topk:K`` ``classes`` (N, K) int64, ``scores`` (N, K) (softmax
    probabilities of those classes) and maps (N, K, h, w), map k explaining ``classes[:, k]``.
    """
    k = parse_signal(signal)
    _choice(map_size, MAP_SIZES, "map size")
    _choice(resize, RESIZE, "resize mode")
    _choice(normalize, NORMALIZE, "normalization")
    model = copy.deepcopy(built.model)
    post = _Post(model)
    g = post.g
    image = built.inputs[0]
    if k and len(built.inputs) != 1:
        raise ExciteError(f"--signal {signal} needs a model with one input; this one has {len(built.inputs)}")
    if k and built.num_classes is not None and k > built.num_classes:
        raise ExciteError(f"--signal topk:{k}: the model has only {built.num_classes} classes")
    outputs: list[str] = []
    res = ServingModel(model=model, inputs=[], outputs=[], top_k=k)

    if k:
        if k > 1:   # one copy of each image per explained class
            tiled = g.fresh("image_tiled")
            for node in model.graph.node:
                for j, name in enumerate(node.input):
                    if name == image:
                        node.input[j] = tiled
            x5 = g.op("Unsqueeze", [image, g.i64([1])])
            x5 = g.op("Expand", [x5, g.i64([1, k, 1, 1, 1])])
            g.nodes.append(helper.make_node("Reshape", [x5, g.op("Concat", [g.i64([-1]), post.dims(image, 1)], axis=0)],
                                            [tiled], name=g.fresh("tile")))
        logits = built.logits
        out_info = next((o for o in model.graph.output if o.name == logits), None)
        tt = out_info.type.tensor_type if out_info is not None else None
        rank = len(tt.shape.dim) if tt is not None and tt.HasField("shape") else None
        if built.num_classes is None or rank not in (2, None):
            raise ExciteError(f"--signal {signal} needs N x K logits with a known K; {logits!r} is not "
                              "(use --signal input and feed excite_signal)")
        _, idx = (g.fresh("top_values"), g.fresh("top_classes"))
        g.nodes.append(helper.make_node("TopK", [logits, g.i64([k])], [_, idx], name=g.fresh("topk"), axis=1))
        onehot = g.op("OneHot", [idx, g.i64([built.num_classes]), g.const(np.array([0.0, 1.0], np.float32))], axis=-1)
        if k == 1:
            sig = g.op("Reshape", [onehot, g.i64([-1, built.num_classes])])
        else:   # row n*k + j of the tiled batch explains the j-th class of image n
            eye = g.const(np.eye(k, dtype=np.float32).reshape(1, k, k, 1), "diagonal")
            per = g.op("Reshape", [onehot, g.i64([-1, k, k, built.num_classes])])
            sig = g.op("Reshape", [post.reduce("ReduceSum", g.op("Mul", [per, eye]), [2], keepdims=0),
                                   g.i64([-1, built.num_classes])])
        g.nodes.append(helper.make_node("Identity", [sig], [built.signal], name=g.fresh("signal")))
        probs = g.op("Softmax", [g.op("Cast", [logits], to=TensorProto.FLOAT)], axis=1)
        scores = g.op("GatherElements", [probs, idx], axis=1)
        first = g.i64([0]) if k > 1 else None

        def per_image(t):   # (N*k, k) -> (N, k): the first copy of each image
            if first is None:
                return t
            return g.op("Squeeze", [g.op("Gather", [g.op("Reshape", [t, g.i64([-1, k, k])]), first], axis=1), g.i64([1])])

        res.classes, res.scores = post.unique(CLASSES), post.unique(SCORES)
        g.nodes.append(helper.make_node("Identity", [per_image(idx)], [res.classes], name=g.fresh("classes")))
        g.nodes.append(helper.make_node("Identity", [per_image(scores)], [res.scores], name=g.fresh("scores")))
        outputs += [res.classes, res.scores]
        model.graph.input.remove(next(i for i in model.graph.input if i.name == built.signal))
    else:
        outputs.append(built.logits)
        res.logits = built.logits

    axes = _spatial_axes(model, image) if map_size == "input" else None
    for (method, layer), m in built.maps.items():
        y = m
        if axes is not None:
            hw = post.dims(image, *axes)
            flat = g.op("Reshape", [y, g.op("Concat", [g.i64([-1, 1]), post.dims(y, -2)], axis=0)])
            sizes = g.op("Concat", [post.dims(flat, 0, 2), hw], axis=0)
            attrs = dict(mode="linear" if resize == "bilinear" else "cubic",
                         coordinate_transformation_mode="half_pixel")
            if resize == "bicubic":
                attrs.update(cubic_coeff_a=-0.5, exclude_outside=1)
            up = g.op("Resize", [flat, "", "", sizes], **attrs)
            y = g.op("Reshape", [up, g.op("Concat", [post.dims(y, 0, -2), hw], axis=0)])
        if normalize != "none":
            op = "ReduceMax" if normalize == "max" else "ReduceSum"
            den = post.reduce(op, g.op("Abs", [y]), [-2, -1])
            y = g.op("Div", [y, g.op("Max", [den, g.scalar(_TINY)])])
        if k:
            y = g.op("Reshape", [y, g.op("Concat", [g.i64([-1, k]), post.dims(y, 1)], axis=0)])
        name = post.unique(output_name(method, layer))
        g.nodes.append(helper.make_node("Identity", [y], [name], name=g.fresh("map")))
        res.maps[(method, layer)] = name
        outputs.append(name)
    post.finish(outputs)
    known = {name: (TensorProto.FLOAT, [None, k, None, None] if k else [None, None, None]) for name in res.maps.values()}
    known.update({res.classes: (TensorProto.INT64, [None, k]), res.scores: (TensorProto.FLOAT, [None, k])} if k else {})
    _describe(res, outputs, known)
    return res


def _describe(res: ServingModel, outputs: list[str], known: dict) -> None:
    """Fill in the input/output specs from shape inference (batch and unknown dims None);
    ``known`` gives (element type, dims) of the outputs made here, where inference stops."""
    model = res.model
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    infos = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}

    def spec(name):
        vi = infos.get(name)
        tt = vi.type.tensor_type if vi is not None else None
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] if tt is not None and tt.HasField("shape") else None
        return TensorSpec(name, tt.elem_type if tt is not None else TensorProto.UNDEFINED, dims)

    res.inputs = [spec(i.name) for i in model.graph.input]
    res.outputs = [spec(o) for o in outputs]
    for s in res.outputs:
        if s.name in known:
            elem_type, template = known[s.name]
            s.elem_type = s.elem_type or elem_type
            if s.dims is None or len(s.dims) != len(template):
                s.dims = list(template)
            s.dims = [t if d is None else d for d, t in zip(s.dims, template)]
        if s.dims is None or s.elem_type == TensorProto.UNDEFINED:
            raise ExciteError(f"internal: the type or rank of output {s.name!r} is unknown")
    _set_outputs(model, res.outputs)
    static = all(s.dims is not None and all(d is not None for d in s.dims[1:]) for s in res.inputs)
    if static:   # one run at batch 1 gives every output's exact dims (and checks the graph runs)
        session = make_session(model, ["CPUExecutionProvider"])
        feeds = {s.name: np.zeros([1] + s.dims[1:], helper.tensor_dtype_to_np_dtype(s.elem_type)) for s in res.inputs}
        try:
            values = session.run(outputs, feeds)
        except Exception as exc:
            raise ExciteError(f"internal: the serving model fails to run: {str(exc).splitlines()[0][:300]}") from None
        for s, v in zip(res.outputs, values):
            s.dims = [None] + list(v.shape[1:])
        _set_outputs(model, res.outputs)


def _set_outputs(model: onnx.ModelProto, specs: list[TensorSpec]) -> None:
    del model.graph.output[:]
    for s in specs:
        model.graph.output.append(helper.make_tensor_value_info(
            s.name, s.elem_type, [("N" if i == 0 else None) if d is None else d for i, d in enumerate(s.dims)]))




# ---------------------------------------------------------------------------
# the plain target
# ---------------------------------------------------------------------------
def check_options(options) -> None:
    """The signal, map size, resize and normalisation names, and ``channels`` only for the
    plain companion model: before anything is loaded or built."""
    parse_signal(options.signal)
    _choice(options.map_size, MAP_SIZES, "map size")
    _choice(options.resize, RESIZE, "resize mode")
    _choice(options.normalize, NORMALIZE, "normalization")
    if options.build.channels and options.serving_form:
        raise ExciteError("--channels is for the plain companion model; drop it with --signal/--map-size/--normalize/--serving")


def wanted(options) -> bool:
    return True


def prepare(model: onnx.ModelProto, options) -> tuple[onnx.ModelProto, list[str]]:
    """The fixed batch made dynamic where that is safe (``options.dynamic_batch``)."""
    if not options.dynamic_batch:
        return model, []
    model, note = make_batch_dynamic(model)
    return model, [note] if note else []


def finish(result, options) -> None:
    """The serving form of the built model where ``options.serving_form`` asks for it; the
    plain companion model (signal input, layer-size maps) stays as built otherwise."""
    if options.serving_form:
        result.serving = make_serving_model(result.built, signal=options.signal, map_size=options.map_size,
                                            resize=options.resize, normalize=options.normalize)
        result.serving.notes = result.notes


def write(result, path: Path | None, options) -> list[Path]:
    """The model, to ``path`` (``-o``) when one is given."""
    if path is None:
        return []
    try:
        save_model(result.model, path)
    except OSError as exc:
        raise ExciteError(f"-o {path}: cannot write ({exc.strerror or type(exc).__name__})") from None
    return [path]
