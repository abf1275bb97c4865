"""The forward in float16: the float16 deployment target.

The forward is converted (onnxconverter-common, the optional extra ``fp16``) before the
build; the excitation branch built on it casts activations back to float32.
"""
from __future__ import annotations

import warnings

import onnx
from onnx import TensorProto

from ..errors import ExciteError
from ..graph.canonicalize import load_model, name_nodes
from ..rules import has_role


def forward_to_float16(model) -> onnx.ModelProto:
    """The model with its forward in float16 (inputs and outputs stay float32).

    Uses onnxconverter-common's float16 converter (the optional extra ``fp16``); the
    excitation branch built on it casts activations back to float32.
    """
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise ExciteError("--fp16 needs onnxconverter-common: pip install 'onnx-excite[fp16]'") from None
    proto = load_model(model)
    first = proto.graph.input[0].type.tensor_type.elem_type if proto.graph.input else TensorProto.FLOAT
    if first != TensorProto.FLOAT:
        raise ExciteError(f"--fp16 converts float32 models; this one's input is {TensorProto.DataType.Name(first).lower()}")
    proto = name_nodes(proto)
    # the final Softmax (or kin) stays float32, so the logits below it are found as usual
    outputs = {o.name for o in proto.graph.output}
    keep = [n.name for n in proto.graph.node if has_role(n, "squasher") and set(n.output) & outputs]
    with warnings.catch_warnings():   # "float32 number ... truncated": expected for tiny weights
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(proto, keep_io_types=True, node_block_list=keep)
    # the converter casts a blocked node's output back to float16, also at a graph output:
    # such an output is read from the float32 node directly
    producer = {o: n for n in half.graph.node for o in n.output}
    for out in half.graph.output:
        cast = producer.get(out.name)
        if (out.type.tensor_type.elem_type == TensorProto.FLOAT16 and cast is not None and cast.op_type == "Cast"
                and producer.get(cast.input[0]) is not None and producer[cast.input[0]].name in keep):
            src = producer[cast.input[0]]
            src.output[0] = out.name
            half.graph.node.remove(cast)
            out.type.tensor_type.elem_type = TensorProto.FLOAT
    return half


# ---------------------------------------------------------------------------
# the float16 target
# ---------------------------------------------------------------------------
def wanted(options) -> bool:
    return bool(options.fp16)


def prepare(model: onnx.ModelProto, options) -> tuple[onnx.ModelProto, list[str]]:
    return forward_to_float16(model), ["forward converted to float16 (inputs/outputs float32); excitation branch in float32"]


def finish(result, options) -> None:
    """Nothing after the build: the excitation branch is float32 as built."""


def write(result, path, options) -> list:
    """No file of its own: the plain target writes the model."""
    return []
