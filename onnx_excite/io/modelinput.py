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
    layout: str                     # "NCHW" or "NHWC" (NHWC when the last dim is 3 and the second is not)
    height: Optional[int] = None    # static spatial size, None when dynamic
    width: Optional[int] = None

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
    layout, h, w = "NCHW", None, None
    if len(dims) == 4:
        if dims[3] == 3 and dims[1] != 3:
            layout = "NHWC"
        h, w = (dims[1], dims[2]) if layout == "NHWC" else (dims[2], dims[3])
    return DeclaredInput(vi.name, dtype, layout, h, w)


def num_classes(model: onnx.ModelProto) -> Optional[int]:
    """The static size of the first output's class axis, if the graph declares it: its last
    dimension, or the second where the rest are 1 ((N, K, 1, 1) logits of a 1x1 conv head)."""
    dims = model.graph.output[0].type.tensor_type.shape.dim if model.graph.output else []
    if len(dims) > 2 and all(_dim(d) == 1 for d in dims[2:]):
        return _dim(dims[1])
    return _dim(dims[-1]) if dims else None
