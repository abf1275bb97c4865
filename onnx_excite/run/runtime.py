"""Run the companion model with ONNX Runtime: build once, explain many batches."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Mapping, Sequence

import numpy as np

from ..graph.builder import ExcitationModel, build_excitation_model
from ..graph.index import toposort
from ..graph.options import BuildOptions
from ..methods import get_method
from ..errors import ExciteError
from ..io.modelfile import fits_in_one_file, save_external
from .devices import BoundRunner, check_providers, providers_for
from .ort import import_ort, session_options


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (its libraries preloaded), then the CPU."""
    return providers_for("auto")


def make_session(model, providers: Sequence[str] | None = None, threads: int | None = None, options=None):
    """An ORT session for a ModelProto (through a temporary external-data file when it
    is too large for protobuf) or for serialized bytes; ``options`` a SessionOptions
    (default: :func:`session_options` with ``threads``)."""
    ort = import_ort()
    opts = options if options is not None else session_options(threads)
    provs = list(providers or default_providers())
    try:
        if isinstance(model, (bytes, bytearray)):
            return ort.InferenceSession(model, sess_options=opts, providers=provs)
        if fits_in_one_file(model):
            return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=provs)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="onnx-excite-") as tmp:
            path = f"{tmp}/model.onnx"
            save_external(model, path)
            return ort.InferenceSession(path, sess_options=opts, providers=provs)
    except Exception as exc:
        raise ExciteError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:300]}") from None


def signal_matrix(targets, batch: int, num_classes: int) -> np.ndarray:
    """The top signal (batch x K) from a class index, one index per sample, or a matrix.

    * ``int``                    -> one-hot for that class, every sample;
    * sequence/1-D int array     -> one index per sample;
    * 2-D float array (N x K)    -> used as given (multi-hot, arbitrary weights);
    * 1-D float array of length K -> the same signal for every sample.
    """
    if isinstance(targets, (int, np.integer)):
        targets = [int(targets)] * batch
    arr = np.asarray(targets)
    if arr.ndim == 2:
        if arr.shape != (batch, num_classes):
            raise ExciteError(f"signal of shape {arr.shape}, expected ({batch}, {num_classes})")
        return np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim == 1 and arr.dtype.kind == "f":
        if arr.shape[0] != num_classes:
            raise ExciteError(f"signal of length {arr.shape[0]}, expected {num_classes} classes")
        return np.tile(arr.astype(np.float32), (batch, 1))
    if arr.ndim == 1 and arr.dtype.kind in "iu":
        if arr.shape[0] != batch:
            raise ExciteError(f"{arr.shape[0]} targets for a batch of {batch}")
        bad = [int(t) for t in arr if not 0 <= t < num_classes]
        if bad:
            raise ExciteError(f"target class {bad[0]} out of range 0..{num_classes - 1}")
        sig = np.zeros((batch, num_classes), np.float32)
        sig[np.arange(batch), arr] = 1.0
        return sig
    raise ExciteError(f"cannot read targets of type {type(targets).__name__}: give a class index, one per sample, or an N x K signal")


#: numpy dtypes of the ONNX Runtime input types an image input may have
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(uint16)": np.uint16,
              "tensor(int16)": np.int16, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


def as_input_dtype(values, ort_type: str) -> np.ndarray:
    """``values`` in the dtype the model declares (``ort_type`` as ONNX Runtime names it):
    integer inputs (e.g. uint8 pixels) are rounded and clipped to the type's range."""
    dtype = np.dtype(ORT_DTYPES.get(ort_type, np.float32))
    arr = np.asarray(values)
    if dtype.kind in "iu" and arr.dtype.kind == "f":
        info = np.iinfo(dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    return np.ascontiguousarray(arr, dtype=dtype)


#: with ``Exciter(top1=True)``: the weight (shape [1]) of the graph's own top-1 one-hot in the
#: signal the excitation receives, and that signal as an output
TOP1_WEIGHT, TOP1_SIGNAL = "excite_top1_weight", "excite_top1_signal"


def _logits_rank(model, name: str):
    """The rank of ``name`` and whether its dims past the second are all 1 (None when unknown)."""
    for info in list(model.graph.value_info) + list(model.graph.output):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            return len(dims), all(d.HasField("dim_value") and d.dim_value == 1 for d in dims[2:])
    return None, False


def add_top1_signal(built: ExcitationModel) -> bool:
    """Rewrite ``built.model`` in place so that the excitation receives ``excite_signal + w *
    OneHot(TopK(logits, 1))`` (``w`` the input :data:`TOP1_WEIGHT`, shape [1]), exposed as the
    output :data:`TOP1_SIGNAL`: with w = 1 and a zero signal one run explains each image's own
    top-1 class (no forward beforehand to choose it); with w = 0 the signal is the one fed, bit
    for bit. False (nothing changed) where the logits are not (N, K) or (N, K, 1, ..., 1) with
    a known K, or the opset is below 11."""
    from onnx import TensorProto, helper

    from ..graph.canonicalize import default_opset

    model, k = built.model, built.num_classes
    rank, ones = _logits_rank(model, built.logits)
    if k is None or default_opset(model) < 11 or not (rank == 2 or (rank and rank > 2 and ones)):
        return False
    used = "excite_top1_used_signal"
    for node in model.graph.node:
        for j, name in enumerate(node.input):
            if name == built.signal:
                node.input[j] = used
    logits = built.logits
    dtype = next((i.type.tensor_type.elem_type for i in list(model.graph.value_info) + list(model.graph.output)
                  if i.name == logits), TensorProto.FLOAT)
    nodes, p = [], "excite_top1_"
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [logits], [p + "logits"], to=TensorProto.FLOAT, name=p + "cast"))
        logits = p + "logits"
    model.graph.initializer.extend([
        helper.make_tensor(p + "k", TensorProto.INT64, [1], [1]),
        helper.make_tensor(p + "depth", TensorProto.INT64, [1], [k]),
        helper.make_tensor(p + "values", TensorProto.FLOAT, [2], [0.0, 1.0]),
        helper.make_tensor(p + "shape", TensorProto.INT64, [2], [-1, k])])
    nodes += [helper.make_node("TopK", [logits, p + "k"], [p + "value", p + "index"], axis=1, name=p + "topk"),
              helper.make_node("OneHot", [p + "index", p + "depth", p + "values"], [p + "onehot"], axis=-1,
                               name=p + "onehot"),
              helper.make_node("Reshape", [p + "onehot", p + "shape"], [p + "flat"], name=p + "reshape"),
              helper.make_node("Mul", [p + "flat", TOP1_WEIGHT], [p + "weighted"], name=p + "weight"),
              helper.make_node("Add", [built.signal, p + "weighted"], [used], name=p + "add"),
              helper.make_node("Identity", [used], [TOP1_SIGNAL], name=p + "expose")]
    # sorted again: the excitation's first node, which reads the signal, can come before the
    # node that makes the logits (the gradient family's top Gemm reads only the signal)
    order = toposort(list(model.graph.node) + nodes, "the in-graph top-1 signal")
    del model.graph.node[:]
    model.graph.node.extend(order)
    model.graph.input.append(helper.make_tensor_value_info(TOP1_WEIGHT, TensorProto.FLOAT, [1]))
    model.graph.output.append(helper.make_tensor_value_info(TOP1_SIGNAL, TensorProto.FLOAT, [None, k]))
    return True


@dataclass
class Explanation:
    """Result of one run: logits (N x K) and maps[method][layer] (N x h x w) at layer
    resolution; ``signal`` (N x K) the top signal explained (one-hot for class targets).

    When :meth:`Exciter.explain` was given photos (paths or PIL images) it also keeps them
    (``images``, RGB), how each became the model input (``prepared``), the class names and
    the rule: then :meth:`image_maps` puts the maps on the photos and :meth:`overlay` draws
    one, as ``onnx-excite explain`` does."""

    logits: np.ndarray
    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    channels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    signal: np.ndarray | None = None
    #: with diagnostics: per sample, the signal mass lost on the way to each layer
    #: (where Z == 0); for c-MWP, what the two halves lost differently.
    lost: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    images: list | None = None        # the photos explained (PIL RGB), when photos were given
    prepared: list | None = None      # per photo, its io.images.Prepared geometry
    class_names: list | None = None   # the model's class names, when known
    rule: str | None = None           # the excitation rule of the build

    def _photos(self, what: str) -> None:
        if self.images is None or self.prepared is None:
            raise ExciteError(f"{what} needs the photos: give Exciter.explain image paths or PIL images, not arrays")

    def image_maps(self, full_res: bool = False, blur: bool = True) -> dict[str, dict[str, list[np.ndarray]]]:
        """maps[method][layer]: one float32 (H, W) array per photo, the map on that photo as
        ``explain`` writes it (``*.image.npy``): aligned with the original image, at most
        1600 px on the long side unless ``full_res``, the paper's Gaussian blur for the methods
        declared with it (unless ``blur=False``), clipped at 0."""
        from ..render.postprocess import image_space_map

        self._photos("image_maps()")
        return {method: {layer: [image_space_map(arr[i], self.prepared[i], method, full_res, blur, img.size)
                                 for i, img in enumerate(self.images)]
                         for layer, arr in by_layer.items()}
                for method, by_layer in self.maps.items()}

    def overlay(self, method: str | None = None, layer: str | None = None, index: int = 0, *, style=None,
                blur: bool = True):
        """The overlay ``explain`` writes for photo ``index``: the map of ``method`` at ``layer``
        (default: the first of each) blended over the photo, captioned with the class, its
        probability, the method, layer and rule, and a colour bar saying what the values are.
        ``style``: a :class:`onnx_excite.render.overlay.Style` (colour map, alpha, colour bar,
        full resolution). A PIL RGB image."""
        from ..render.overlay import Style, bar_label, class_head, class_label, labelled_overlay, map_caption, map_max
        from ..render.postprocess import image_space_map

        self._photos("overlay()")
        method = next(iter(self.maps)) if method is None else method
        if method not in self.maps:
            raise ExciteError(f"no {method!r} maps in this explanation (it has {', '.join(self.maps)})")
        layer = next(iter(self.maps[method])) if layer is None else layer
        if layer not in self.maps[method]:
            raise ExciteError(f"no maps at layer {layer!r} in this explanation (it has {', '.join(self.maps[method])})")
        if not -len(self.images) <= index < len(self.images):
            raise ExciteError(f"photo index {index} out of range: {len(self.images)} photo(s) explained")
        style = style if style is not None else Style()
        img = self.images[index]
        up = image_space_map(self.maps[method][layer][index], self.prepared[index], method, style.full_res, blur,
                             img.size)
        scores = self.logits.reshape(len(self.logits), -1)[index].astype(np.float64)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        classes = tuple(int(c) for c in np.flatnonzero(self.signal[index] > 0)) if self.signal is not None else ()
        head = class_head(class_label(classes, self.class_names), float(probs[list(classes)].sum())) if classes else ""
        return labelled_overlay(img, up, map_caption(head, method, layer, self.rule), style, map_max(up),
                                bar_label(method))


def _photos(inputs) -> list | None:
    """``inputs`` as a list of RGB photos when they are a path, a PIL image or a list/tuple of
    them (read with :func:`onnx_excite.io.images.load_image`, converted as it converts); None
    for arrays and dicts."""
    from PIL import Image

    def photo(item):
        return isinstance(item, (str, os.PathLike, Image.Image))

    if photo(inputs):
        inputs = [inputs]
    elif not (isinstance(inputs, (list, tuple)) and inputs and all(photo(i) for i in inputs)):
        return None
    from ..io.images import load_image, to_rgb

    return [to_rgb(i) if isinstance(i, Image.Image) else load_image(i) for i in inputs]


class Exciter:
    """Build the excitation model once, then explain batches.

    >>> ex = Exciter("model.onnx", layers=["pool4"], methods=("mwp", "cmwp"))
    >>> res = ex.explain("dog.jpg")              # a photo: its top-1 class; or targets="malamute" / 243
    >>> res.maps["cmwp"]["pool4"].shape          # (N, h, w)
    >>> res.overlay("cmwp").save("dog.png")      # res.image_maps(): the maps on the photo
    >>> ex.explain(batch, targets=243)           # or the model input itself (N x C x H x W)

    ``model`` is a path, an ``onnx.ModelProto`` or ``"default"`` (the default ImageNet
    MobileNetV2); ``layers=None`` takes the one layer the methods are defined at where each
    has one of its own (cam, rollout), else the model's default layers (``features.13`` for
    the default model; other models the layer their graph suggests, see
    :func:`onnx_excite.graph.layers.default_layer`).
    """

    def __init__(self, model, layers: Sequence[str] | None = None, methods: Sequence[str] | None = None, *,
                 options: BuildOptions | None = None, device: str | None = None, providers: Sequence[str] | None = None,
                 threads: int | None = None, io_binding: bool | None = None, top1: bool = False, **fields):
        """The build's settings are a :class:`~onnx_excite.graph.options.BuildOptions` (``options``),
        ``layers``, ``methods`` and keyword ``fields`` replacing what it holds (as for
        :func:`~onnx_excite.graph.builder.build_excitation_model`; ``share_adjoints`` batches the
        adjoint convs / Gemms that several methods' sweeps apply with one weight).
        ``device`` (cpu / cuda / auto) picks the providers unless ``providers`` are given;
        asking for CUDA where it cannot run raises :class:`~onnx_excite.run.devices.DeviceUnavailableError`.
        ``io_binding`` (default: on when CUDA runs) keeps inputs and outputs on the device.
        ``top1``: the graph can choose each image's top-1 class itself (:func:`add_top1_signal`;
        ``explain(inputs, None)``), where its logits allow it (:attr:`top1` says)."""
        from onnx_excite.models.resolve import resolve_model   # models/ joins the package after this module

        opts = BuildOptions.of(options, layers, methods, **fields)
        resolved = self._resolved = resolve_model(model)
        opts = replace(opts, layers=resolved.layers(opts.layers, opts.methods))
        self.built: ExcitationModel = build_excitation_model(resolved.model, options=opts)
        self.top1 = bool(top1) and add_top1_signal(self.built)
        requested = list(providers) if providers else (providers_for(device) if device else None)
        self.session = make_session(self.built.model, requested, threads)
        if providers or device == "cuda":   # auto may end up on the CPU: the providers line says so
            check_providers(requested, self.session)
        self.io_binding = ("CUDAExecutionProvider" in self.session.get_providers()) if io_binding is None else io_binding
        self._outputs = ([self.built.logits] + list(self.built.maps.values()) + list(self.built.channels.values())
                         + list(self.built.masses.values()) + ([TOP1_SIGNAL] if self.top1 else []))

    @cached_property
    def preprocessing(self):
        """How a photo becomes this model's input, exactly as ``onnx-excite explain`` prepares
        it (:func:`onnx_excite.models.preprocessing.model_preprocessing`: the profile of the
        default model, else the model's own fixed size or the shorter side at 224, its layout,
        ImageNet mean/std for float inputs): ``preprocessing(img)`` gives (array, geometry)."""
        from onnx_excite.models.preprocessing import model_header, model_preprocessing

        return model_preprocessing(self._resolved.profile, model_header(self._resolved.model))[0]

    @cached_property
    def class_names(self) -> list[str] | None:
        """The model's class names (the 1000 ImageNet ones for the default model), else None."""
        profile = self._resolved.profile
        return profile.load_class_names() if profile.class_names else None

    def class_index(self, name) -> int:
        """The index of class ``name`` (an index, a description or one of its synonyms, as
        ``explain -t`` takes it); ExciteError with the closest names for an unknown one."""
        from ..classes import class_index

        return class_index(name, self.class_names, self.num_classes)

    def _class_targets(self, targets):
        """``targets`` with class names resolved to indices (a name, or a list holding names)."""
        if isinstance(targets, str):
            return self.class_index(targets)
        if isinstance(targets, (list, tuple)) and any(isinstance(t, str) for t in targets):
            return [self.class_index(t) for t in targets]
        return targets

    @property
    def providers(self) -> list[str]:
        """The providers the session really uses (CUDA silently falls back to CPU)."""
        return self.session.get_providers()

    @property
    def num_classes(self) -> int:
        k = self.built.num_classes
        if k is None:
            k = self.session.get_inputs()[-1].shape[1]
        return int(k)

    def _feeds(self, inputs) -> dict[str, np.ndarray]:
        names = self.built.inputs
        if isinstance(inputs, Mapping):
            missing = [n for n in names if n not in inputs]
            if missing:
                raise ExciteError(f"missing model input {missing[0]!r}")
            return {n: np.asarray(inputs[n]) for n in names}
        if len(names) != 1:
            raise ExciteError(f"the model has {len(names)} inputs ({', '.join(names)}); pass a dict")
        kind = next(i.type for i in self.session.get_inputs() if i.name == names[0])
        return {names[0]: as_input_dtype(inputs, kind)}

    def explain(self, inputs, targets=None) -> Explanation:
        """Logits and maps of ``inputs`` for ``targets``.

        ``inputs``: a photo (a path or a PIL image) or a list of them, prepared as
        ``onnx-excite explain`` prepares them (:attr:`preprocessing`; the photos must come out
        at one size to share a run: explain photos of other aspect ratios one at a time); or
        the model input itself, an array (N x C x H x W, or as the model declares it) or a dict
        of arrays for a model with several inputs.

        ``targets``: a class index or name (``"malamute"``, looked up as ``explain -t`` does),
        one per sample, or an N x K signal (see :func:`signal_matrix`). ``None``: each photo's
        top-1 class (chosen inside the graph with ``Exciter(top1=True)``, else from a first
        run's logits); for arrays ``None`` needs ``top1``.

        With photos, the :class:`Explanation` keeps them: ``image_maps()``, ``overlay()``."""
        photos = _photos(inputs)
        targets = self._class_targets(targets)
        if photos is not None:
            return self._explain_photos(photos, targets)
        return self._explain(inputs, targets)

    def _explain_photos(self, photos, targets) -> Explanation:
        prep = self.preprocessing
        arrays, prepared = zip(*(prep(img) for img in photos))
        shapes = sorted({a.shape for a in arrays})
        if len(shapes) > 1:
            sizes = ", ".join("x".join(map(str, s)) for s in shapes)
            raise ExciteError(f"the photos come out at {len(shapes)} sizes ({sizes}) and cannot share a run: "
                              f"explain them one at a time, [ex.explain(p) for p in photos]")
        x = np.stack(arrays)
        if targets is None and not self.top1:   # the class explain would choose: the top-1 of the logits
            scores = self.logits(x).reshape(len(x), -1)
            targets = [int(np.argsort(-row)[0]) for row in scores]
        res = self._explain(x, targets)
        res.images, res.prepared = list(photos), list(prepared)
        res.class_names, res.rule = self.class_names, self.built.rule
        return res

    def _explain(self, inputs, targets) -> Explanation:
        feeds = self._feeds(inputs)
        batch = next(iter(feeds.values())).shape[0]
        if targets is None and not self.top1:
            raise ExciteError("no targets given (choosing the top-1 class in the graph needs Exciter(top1=True))")
        signal = (np.zeros((batch, self.num_classes), np.float32) if targets is None
                  else signal_matrix(targets, batch, self.num_classes))
        feeds[self.built.signal] = signal
        if self.top1:
            feeds[TOP1_WEIGHT] = np.array([1.0 if targets is None else 0.0], np.float32)
        try:
            if self.io_binding:
                if getattr(self, "_bound", None) is None:
                    self._bound = BoundRunner(self.session, self._outputs)
                values = self._bound(feeds)
            else:
                values = self.session.run(self._outputs, feeds)
        except Exception as exc:
            raise ExciteError(f"ONNX Runtime failed: {str(exc).splitlines()[0][:300]}") from None
        out = dict(zip(self._outputs, values))
        if targets is None:
            signal = out[TOP1_SIGNAL]
        res = Explanation(logits=out[self.built.logits], signal=signal)
        for (method, layer), name in self.built.maps.items():
            res.maps.setdefault(method, {})[layer] = out[name]
        for (method, layer), name in self.built.channels.items():
            res.channels.setdefault(method, {})[layer] = out[name]
        for (method, layer), name in self.built.masses.items():
            mass = get_method(method).mass
            if mass == "signal":
                expected = signal.sum(axis=1)
            elif mass == "score":
                expected = (signal * out[self.built.logits].reshape(len(signal), -1)).sum(axis=1)
            else:
                expected = 0.0
            res.lost.setdefault(method, {})[layer] = expected - out[name]
        return res

    def logits(self, inputs) -> np.ndarray:
        """The logits alone, on a zero signal. ONNX Runtime still runs the whole companion
        graph (about the time of :meth:`explain`): where the maps are wanted too, take
        ``explain(...).logits`` (with ``top1``, ``explain(inputs, None)`` chooses the class)."""
        feeds = self._feeds(inputs)
        batch = next(iter(feeds.values())).shape[0]
        feeds[self.built.signal] = np.zeros((batch, self.num_classes), np.float32)
        if self.top1:
            feeds[TOP1_WEIGHT] = np.zeros(1, np.float32)
        try:
            return self.session.run([self.built.logits], feeds)[0]
        except Exception as exc:
            raise ExciteError(f"ONNX Runtime failed: {str(exc).splitlines()[0][:300]}") from None

    @property
    def input_type(self) -> str:
        """The ONNX type of the (first) image input, e.g. ``tensor(float)`` or ``tensor(uint8)``."""
        return next(i.type for i in self.session.get_inputs() if i.name == self.built.inputs[0])
