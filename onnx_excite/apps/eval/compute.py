"""The model side of an evaluation: what a worker needs to turn an image into maps.

:class:`ModelSpec` is plain data (the resolved model, layers, preprocessing, the cache key),
built once by :func:`model_spec`; :class:`MapComputer` holds one
:class:`~onnx_excite.Exciter` per input shape (the companion graphs have static shapes),
least recently used dropped beyond :data:`MAX_EXCITERS`, and, for RISE, one session of the plain
forward model (:func:`rise_entries`).
"""
from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ...errors import ExciteError

DEFAULT_MODEL_LAYER = "features.13"
CACHE_VERSION = "1"
#: keep at most this many companion graphs (one per input shape) alive
MAX_EXCITERS = 8


class ModelError(ExciteError):
    """The model cannot be built or run (unknown layer, unsupported op, ORT failure): stops the
    evaluation, unlike an unreadable image, which is reported and skipped."""


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _num_outputs(model) -> Optional[int]:
    """The static size of the last dimension of the model's only output, if it has one (with
    several outputs the Exciter's logits resolution decides, and tells)."""
    import onnx

    try:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
        if len(proto.graph.output) != 1:
            return None
        dims = proto.graph.output[0].type.tensor_type.shape.dim
        return int(dims[-1].dim_value) if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0 else None
    except Exception:
        return None


@dataclass
class ModelSpec:
    """The resolved model (a path or a ModelProto), its map layers and preprocessing."""

    name: str
    source: object
    layers: list
    methods: list
    rule: str
    resize: str          # "square" or "shorter"
    size: int
    mean: tuple
    std: tuple
    scale: float
    channel_order: str
    layout: str
    class_names: Optional[list]
    num_classes: Optional[int]
    meta: str            # the cache key: model hash, logits, rule, preprocessing
    logits: Optional[str] = None   # the output explained (None: resolve_logits chooses)
    device: str = "auto"           # cpu | cuda | auto (onnx_excite.run.devices); not part of the cache key

    def describe_input(self) -> str:
        return f"{self.size}x{self.size}" if self.resize == "square" else f"shorter side {self.size}"

    def input_array(self, path) -> np.ndarray:
        """The preprocessed model input of one image file (ExciteError when unreadable)."""
        from ...io.images import load_image

        return self.preprocess(load_image(path))

    def preprocess(self, img) -> np.ndarray:
        from ...io.images import preprocess

        arr, _ = preprocess(img, size=self.size, resize=self.resize, crop=None, mean=self.mean, std=self.std,
                            scale=self.scale, channel_order=self.channel_order, layout=self.layout)
        return arr

    def portable(self) -> "ModelSpec":
        """The same spec with the model loaded into memory, for workers that cannot read its path."""
        if not isinstance(self.source, (str, Path)):
            return self
        import dataclasses

        import onnx

        return dataclasses.replace(self, source=onnx.load(str(self.source)))


def model_spec(model: str, layers, methods: Sequence[str], rule: str, protocol: str, size: int,
               logits: Optional[str] = None, device: str = "auto") -> ModelSpec:
    from onnx_excite.models.resolve import resolve_model

    name = str(model)
    resolved = resolve_model(name, fully_conv=True)
    source, p = resolved.model, resolved.profile
    own = None if layers or not methods else resolved.method_layer(methods)   # cam's, rollout's own layer
    layers = list(layers) if layers else [own] if own else list(
        p.default_layers or ([DEFAULT_MODEL_LAYER] if name == "default" else []))
    if not layers and methods:
        raise ExciteError("no layer given and the model has no default: pass layers=[...] "
                          "(see `onnx-excite layers MODEL`)")
    if protocol == "localization":
        resize, size = "square", int(size)
    elif p.resize == "square":  # a fixed-size model whose head could not be made fully convolutional
        resize, size = "square", int(p.input_size)
    else:
        resize, size = "shorter", int(size)
    class_names = p.load_class_names()
    num_classes = len(class_names) if class_names else _num_outputs(source)
    key = file_sha256(source if isinstance(source, (str, Path)) else name)
    if not isinstance(source, (str, Path)):
        key += "+fullyconv"
    meta = json.dumps({"version": CACHE_VERSION, "model": key, "logits": logits, "rule": rule, "resize": resize, "size": size,
                       "mean": list(p.mean), "std": list(p.std), "scale": p.scale, "channel_order": p.channel_order,
                       "layout": p.layout}, sort_keys=True)
    return ModelSpec(name, source, layers, list(methods), rule, resize, size, tuple(p.mean), tuple(p.std), p.scale,
                     p.channel_order, p.layout, class_names, num_classes, meta, logits, device)


class MapComputer:
    """Maps of one image for several classes: the signal of a class is multi-hot over its
    mapped model outputs; classes are explained ``batch_size`` at a time (the image repeated)."""

    def __init__(self, spec: ModelSpec, threads: Optional[int] = None):
        self.spec, self.threads = spec, threads
        self.exciters: collections.OrderedDict = collections.OrderedDict()
        self.logits_choice = None
        self.forward = None     # the plain forward model (RISE), built on first use

    def logits_record(self) -> Optional[dict]:
        """Which output was explained, and how it was chosen (None before an Exciter was built)."""
        c = self.logits_choice
        if c is None:
            return None
        return {"tensor": c.tensor, "output": c.output, "reason": c.reason, "candidates": list(c.candidates)}

    def exciter(self, shape):
        if shape in self.exciters:
            self.exciters.move_to_end(shape)
            return self.exciters[shape]
        from ...graph.canonicalize import first_input_name
        from ...run.runtime import Exciter

        s = self.spec
        try:
            ex = Exciter(s.source, s.layers, methods=tuple(s.methods), rule=s.rule, logits=s.logits,
                         input_shapes={first_input_name(s.source): [None, *shape]}, threads=self.threads,
                         device=s.device)
        except ExciteError as exc:
            raise ModelError(str(exc)) from None
        if s.num_classes is None:
            s.num_classes = ex.num_classes
        elif ex.num_classes != s.num_classes:
            raise ModelError(f"the model has {ex.num_classes} outputs but {s.num_classes} class names")
        self.logits_choice = ex.built.logits_choice
        self.exciters[shape] = ex
        while len(self.exciters) > MAX_EXCITERS:
            self.exciters.popitem(last=False)
        return ex

    def compute(self, arr: np.ndarray, classes: Sequence[str], mapping, batch_size: int = 16) -> dict:
        """``{"idx|<class>": indices, "<method>|<layer>|<class>": map at layer resolution}``."""
        ex = self.exciter(arr.shape)
        out = {}
        for start in range(0, len(classes), batch_size):
            chunk = list(classes[start:start + batch_size])
            batch = np.repeat(arr[None], len(chunk), axis=0)
            if max(i for c in chunk for i in mapping.indices[c]) >= ex.num_classes:
                raise ModelError(f"{mapping.source}: an output index is out of range for a model with "
                                 f"{ex.num_classes} outputs (a mapping for another model?)")
            try:
                res = ex.explain(batch, mapping.signal(chunk, ex.num_classes))
            except ExciteError as exc:
                raise ModelError(str(exc)) from None
            for i, c in enumerate(chunk):
                out[f"idx|{c}"] = np.asarray(mapping.indices[c], np.int64)
                for m in self.spec.methods:
                    for l in self.spec.layers:
                        out[f"{m}|{l}|{c}"] = np.asarray(res.maps[m][l][i], np.float32)
        return out


    def compute_rise(self, arr: np.ndarray, classes: Sequence[str], mapping, settings) -> dict:
        """``{"idx|<class>": indices, rise_key(settings, class): map at the input resolution}``."""
        if self.forward is None:
            from .perturb import ForwardModel

            self.forward = ForwardModel(self.spec.source, self.spec.logits, self.spec.layout, self.spec.device,
                                        self.threads)
        x = arr if self.spec.layout == "NCHW" else arr.transpose(2, 0, 1)
        return rise_entries(self.forward, x, classes, mapping, settings)


def rise_entries(forward, x: np.ndarray, classes: Sequence[str], mapping, settings) -> dict:
    """RISE maps of every class of one (C, H, W) input, all from the same masked forwards
    through ``forward`` (a :class:`~.perturb.ForwardModel`), as cache entries."""
    from ..rise import rise_saliency
    from .cache import rise_key

    if not classes:
        return {}
    try:
        maps = rise_saliency(forward, x, [mapping.indices[c] for c in classes], settings)
    except ModelError:
        raise
    except ExciteError as exc:   # an index beyond the model's outputs: a mapping for another model
        raise ModelError(f"{mapping.source}: {exc}") from None
    out = {}
    for c, m in zip(classes, maps):
        out[f"idx|{c}"] = np.asarray(mapping.indices[c], np.int64)
        out[rise_key(settings, c)] = m
    return out


def learn_num_classes(spec: ModelSpec, records) -> None:
    """Models without class names or a static output size: build the first Exciter to learn it."""
    if spec.num_classes is not None:
        return
    computer = MapComputer(spec)
    for rec in records:
        try:
            arr = spec.input_array(rec.path)
        except ExciteError:  # unreadable image: reported later, try the next one
            continue
        computer.exciter(arr.shape)
        return
