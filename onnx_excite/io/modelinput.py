"""What a model declares about its image input: element type, layout and fixed size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import helper

from ..errors import ExciteError


@dataclass
class DeclaredInput:
    """The first real input of a model, as declared in the graph."""

    name: str
    dtype: np.dtype                 # numpy dtype of the declared element type
    layout: str                     # "NCHW" or "NHWC" (:func:`image_layout`)
    height: Optional[int] = None    # static spatial size, None when dynamic
    width: Optional[int] = None
    channels: Optional[int] = None  # static channel count, None when dynamic (or not 4-D)

    @property
    def fixed_size(self) -> Optional[tuple]:
        """(width, height) when both spatial dims are static."""
        return (self.width, self.height) if self.height and self.width else None

    @property
    def integer(self) -> bool:
        """Integer pixels (e.g. uint8): the model scales and normalises them itself."""
        return self.dtype.kind in "iu"


def _dim(d) -> Optional[int]:
    return d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None


def declared_input(model: onnx.ModelProto) -> DeclaredInput:
    """The declared element type, layout and static spatial size of the first real input."""
    inits = {t.name for t in model.graph.initializer}
    vi = next((i for i in model.graph.input if i.name not in inits), None)
    if vi is None:
        raise ExciteError("the model has no inputs: there is nothing to feed an image to")
    tt = vi.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    except Exception:
        dtype = np.dtype(np.float32)
    dims = [_dim(d) for d in tt.shape.dim] if tt.HasField("shape") else []
    layout, h, w, c = "NCHW", None, None, None
    if len(dims) == 4:
        layout = image_layout(dims)
        h, w = (dims[1], dims[2]) if layout == "NHWC" else (dims[2], dims[3])
        c = dims[3] if layout == "NHWC" else dims[1]
    return DeclaredInput(vi.name, dtype, layout, h, w, c)


def image_layout(dims) -> str:
    """"NHWC" when the last of four dims is a channel count (1 or 3) and the second is not,
    else "NCHW" (``None`` for a symbolic dim): (N,H,W,3) and (N,28,28,1) are NHWC, (N,1,H,W)
    and (N,3,H,W) NCHW."""
    if len(dims) == 4 and dims[3] in (1, 3) and dims[1] not in (1, 3):
        return "NHWC"
    return "NCHW"


#: mean and std of one grey channel: ImageNet's RGB mean and std weighted as the grey
#: conversion weighs the channels (L = 0.299 R + 0.587 G + 0.114 B)
GREY_MEAN = (round(0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406, 4),)
GREY_STD = (round(0.299 * 0.229 + 0.587 * 0.224 + 0.114 * 0.225, 4),)


def num_classes(model: onnx.ModelProto) -> Optional[int]:
    """The static size of the first output's class axis, if the graph declares it: its last
    dimension, or the second where the rest are 1 ((N, K, 1, 1) logits of a 1x1 conv head)."""
    dims = model.graph.output[0].type.tensor_type.shape.dim if model.graph.output else []
    if len(dims) > 2 and all(_dim(d) == 1 for d in dims[2:]):
        return _dim(dims[1])
    return _dim(dims[-1]) if dims else None
