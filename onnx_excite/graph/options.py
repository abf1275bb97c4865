"""What a companion model is built with, as one object: :class:`BuildOptions`, taken by
:func:`~onnx_excite.graph.builder.build_excitation_model`, :class:`~onnx_excite.run.runtime.Exciter`
and every command that builds one."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from ..methods import DEFAULT_METHODS
from .share import WEIGHT_BOUND


def given(**fields) -> dict:
    """The ``fields`` that are not None: arguments a caller may leave out (``layers=None``)."""
    return {k: v for k, v in fields.items() if v is not None}


class Options:
    """A frozen dataclass of settings: :meth:`of` gives a copy with some fields replaced."""

    @classmethod
    def of(cls, options=None, **fields):
        """``options`` (default: every field at its default) with ``fields`` replaced; an unknown
        field name is a TypeError, as an unknown keyword argument is."""
        return replace(options if options is not None else cls(), **fields)


@dataclass(frozen=True)
class BuildOptions(Options):
    """The settings of one build (see :func:`~onnx_excite.graph.builder.build_excitation_model`
    for what each does)."""

    layers: Sequence[str] | None = None            # ONNX tensor names of the map layers
    methods: Sequence[str] = DEFAULT_METHODS       # names of onnx_excite.methods.METHODS
    rule: str = "positive"                         # positive or paper
    channels: bool = False                         # also output P.<method>:<layer>
    classifier: str | None = None                  # node the contrastive signal negates
    logits: str | None = None                      # the output (or tensor) the signal enters at
    input_shapes: Mapping[str, Sequence[int | None]] | None = None
    diagnostics: bool = False                      # also output mass.<method>:<layer>
    share_adjoints: bool | Sequence[str] = WEIGHT_BOUND
    derive_weights: bool | None = None             # None: the builder's DERIVE_WEIGHTS

    @classmethod
    def of(cls, options=None, layers=None, methods=None, **fields) -> "BuildOptions":
        """``options`` with ``layers`` / ``methods`` (when given) and ``fields`` replaced;
        ``output`` is read as the older name of ``logits``."""
        if "output" in fields:
            output = fields.pop("output")
            if fields.get("logits") is None:
                fields["logits"] = output
        return super().of(options, **given(layers=layers, methods=methods), **fields)
