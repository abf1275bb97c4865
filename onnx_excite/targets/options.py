"""What an export is made with (:class:`ExportOptions`) and what it gives (:class:`ExportResult`),
shared by :func:`onnx_excite.targets.export.export` and every deployment target."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..graph.builder import ExcitationModel
from ..graph.options import BuildOptions, Options


@dataclass(frozen=True)
class ExportOptions(Options):
    """The build (``build``: layers, methods, rule, ...) and what each target makes of it."""

    build: BuildOptions = BuildOptions()   # methods: DEFAULT_METHODS, as explain
    signal: str = "input"          # input (the client feeds excite_signal), top1 or topk:K
    map_size: str = "layer"        # layer, or input (resized in the graph)
    resize: str = "bilinear"       # bilinear or bicubic, for map_size="input"
    normalize: str = "none"        # none, max or sum
    fp16: bool = False             # the forward in float16 (the fp16 target)
    dynamic_batch: bool = True     # a fixed batch made symbolic where that is safe
    triton_dir: Path | None = None     # also write a Triton model repository folder here
    triton_name: str | None = None     # its model name (default: the model's stem + "_excite")
    max_batch_size: int = 32

    @property
    def serving_form(self) -> bool:
        """Whether the built model is rewritten for serving (clean output names, pruned graph):
        any signal, map size or normalisation but the plain ones, or a Triton folder."""
        return (self.signal.strip().lower() != "input" or self.map_size != "layer" or self.normalize != "none"
                or self.triton_dir is not None)


@dataclass
class ExportResult:
    """The built companion model, its serving form (None: the plain companion model) and
    the notes and files the targets made."""

    name: str                                  # the model as it was named
    built: ExcitationModel
    serving: object | None = None              # targets.plain.ServingModel
    notes: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)   # the model files written, in order
    folder: Path | None = None                 # the Triton model folder, when written

    @property
    def model(self) -> onnx.ModelProto:
        return self.serving.model if self.serving is not None else self.built.model
