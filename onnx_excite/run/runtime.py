"""Run the companion model with ONNX Runtime: build once, explain many batches."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from ..graph.builder import ExcitationModel, build_excitation_model
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


@dataclass
class Explanation:
    """Result of one run: logits (N x K) and maps[method][layer] (N x h x w)."""

    logits: np.ndarray
    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    channels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    signal: np.ndarray | None = None
    #: with diagnostics: per sample, the signal mass lost on the way to each layer
    #: (where Z == 0); for c-MWP, what the two halves lost differently.
    lost: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


class Exciter:
    """Build the excitation model once, then explain batches.

    >>> ex = Exciter("model.onnx", layers=["pool4"], methods=("mwp", "cmwp"))
    >>> res = ex.explain(batch, targets=243)
    >>> res.maps["cmwp"]["pool4"].shape   # (N, h, w)

    ``model`` is a path, an ``onnx.ModelProto`` or ``"default"`` (the default ImageNet
    MobileNetV2); ``layers=None`` takes the model's default layers (``features.13`` for
    the default model; other models have none and need ``layers``).
    """

    def __init__(self, model, layers: Sequence[str] | None = None, methods: Sequence[str] | None = None, *,
                 options: BuildOptions | None = None, device: str | None = None, providers: Sequence[str] | None = None,
                 threads: int | None = None, io_binding: bool | None = None, **fields):
        """The build's settings are a :class:`~onnx_excite.graph.options.BuildOptions` (``options``),
        ``layers``, ``methods`` and keyword ``fields`` replacing what it holds (as for
        :func:`~onnx_excite.graph.builder.build_excitation_model`; ``share_adjoints`` batches the
        adjoint convs / Gemms that several methods' sweeps apply with one weight).
        ``device`` (cpu / cuda / auto) picks the providers unless ``providers`` are given;
        asking for CUDA where it cannot run raises :class:`~onnx_excite.run.devices.DeviceUnavailableError`.
        ``io_binding`` (default: on when CUDA runs) keeps inputs and outputs on the device."""
        from onnx_excite.models.resolve import resolve_model   # models/ joins the package after this module

        opts = BuildOptions.of(options, layers, methods, **fields)
        resolved = resolve_model(model)
        opts = replace(opts, layers=resolved.layers(opts.layers))
        self.built: ExcitationModel = build_excitation_model(resolved.model, options=opts)
        requested = list(providers) if providers else (providers_for(device) if device else None)
        self.session = make_session(self.built.model, requested, threads)
        if providers or device == "cuda":   # auto may end up on the CPU: the providers line says so
            check_providers(requested, self.session)
        self.io_binding = ("CUDAExecutionProvider" in self.session.get_providers()) if io_binding is None else io_binding
        self._outputs = ([self.built.logits] + list(self.built.maps.values()) + list(self.built.channels.values())
                         + list(self.built.masses.values()))

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

    def explain(self, inputs, targets) -> Explanation:
        feeds = self._feeds(inputs)
        batch = next(iter(feeds.values())).shape[0]
        signal = signal_matrix(targets, batch, self.num_classes)
        feeds[self.built.signal] = signal
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
        """Forward only (the signal branch is not run)."""
        feeds = self._feeds(inputs)
        batch = next(iter(feeds.values())).shape[0]
        feeds[self.built.signal] = np.zeros((batch, self.num_classes), np.float32)
        try:
            return self.session.run([self.built.logits], feeds)[0]
        except Exception as exc:
            raise ExciteError(f"ONNX Runtime failed: {str(exc).splitlines()[0][:300]}") from None

    @property
    def input_type(self) -> str:
        """The ONNX type of the (first) image input, e.g. ``tensor(float)`` or ``tensor(uint8)``."""
        return next(i.type for i in self.session.get_inputs() if i.name == self.built.inputs[0])
