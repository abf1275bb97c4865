"""A Triton Inference Server model repository folder (``config.pbtxt`` + ``1/model.onnx``)
for a serving model: the Triton deployment target."""
from __future__ import annotations

import re
from pathlib import Path

from onnx import TensorProto

from ..errors import ExciteError
from ..io.modelfile import save_model
from .plain import ServingModel, TensorSpec

TRITON_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.DOUBLE: "TYPE_FP64",
                TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32", TensorProto.UINT8: "TYPE_UINT8",
                TensorProto.INT8: "TYPE_INT8", TensorProto.BOOL: "TYPE_BOOL", TensorProto.BFLOAT16: "TYPE_BF16"}


def _tensor_block(specs: list[TensorSpec], batched: bool) -> str:
    rows = []
    for s in specs:
        if s.elem_type not in TRITON_TYPES:
            raise ExciteError(f"tensor {s.name!r}: element type {s.elem_type} has no Triton data type")
        dims = s.dims[1:] if batched else s.dims
        dims_text = ", ".join("-1" if d is None else str(d) for d in dims)
        rows.append(f'  {{\n    name: "{s.name}"\n    data_type: {TRITON_TYPES[s.elem_type]}\n    dims: [ {dims_text} ]\n  }}')
    return ",\n".join(rows)


def triton_config(serving: ServingModel, name: str, max_batch_size: int = 32, instances: int = 1,
                  queue_delay_us: int = 100) -> str:
    """``config.pbtxt`` for Triton's onnxruntime backend (text format of Triton's ModelConfig).

    With a dynamic batch the first dim is left to Triton (``max_batch_size`` > 0, dims
    without it) and requests are batched dynamically; with a fixed batch of 1,
    ``max_batch_size`` is 0 and the dims are the full shapes.
    """
    check_name(name)
    batched = all(s.dims and s.dims[0] is None for s in serving.inputs + serving.outputs)
    if max_batch_size < 1:
        raise ExciteError("--max-batch-size must be at least 1")
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size if batched else 0}"]
    if batched:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    lines.append("input [\n" + _tensor_block(serving.inputs, batched) + "\n]")
    lines.append("output [\n" + _tensor_block(serving.outputs, batched) + "\n]")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_GPU\n  }}\n]")
    lines.append("""# Optional accelerators: uncomment ONE block (each parses with Triton's ModelConfig); measure first.
# [cuda-graphs] CUDA graphs (static input shapes only):
# optimization { cuda { graphs: true } }
# [tensorrt] TensorRT for the subgraphs it supports, in float16:
# optimization { execution_accelerators {
#   gpu_execution_accelerator : [ {
#     name : "tensorrt"
#     parameters { key: "precision_mode" value: "FP16" }
#     parameters { key: "max_workspace_size_bytes" value: "1073741824" } } ]
# } }""")
    if serving.notes:
        lines.insert(0, "\n".join(f"# {n}" for n in serving.notes))
    return "\n".join(lines) + "\n"


def check_name(name: str) -> str:
    """A Triton model name that is one plain folder name inside the repository."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ExciteError(f"Triton model name {name!r}: use letters, digits, '_', '.', '-' (not starting with '.')")
    return name


def model_name(result_name: str, options) -> str:
    return options.triton_name or f"{Path(result_name).stem}_excite".replace(" ", "_")


def write_triton_repository(serving: ServingModel, root, name: str, max_batch_size: int = 32,
                            instances: int = 1) -> Path:
    """``root/<name>/config.pbtxt`` and ``root/<name>/1/model.onnx``; returns the model folder."""
    folder = Path(root) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    config = triton_config(serving, name, max_batch_size, instances)
    save_model(serving.model, folder / "1" / "model.onnx")
    (folder / "config.pbtxt").write_text(config)
    return folder


# ---------------------------------------------------------------------------
# the Triton target
# ---------------------------------------------------------------------------
def wanted(options) -> bool:
    return options.triton_dir is not None


def prepare(model, options):
    """Nothing before the build."""
    return model, []


def finish(result, options) -> None:
    """Nothing after the build: the plain target makes the serving form a Triton folder needs."""


def write(result, path, options) -> list[Path]:
    """The folder ``options.triton_dir/<name>`` (name: ``options.triton_name``, else the model's
    stem + ``_excite``)."""
    name = model_name(result.name, options)
    result.folder = write_triton_repository(result.serving, options.triton_dir, name,
                                            max_batch_size=options.max_batch_size)
    return [result.folder / "1" / "model.onnx"]
