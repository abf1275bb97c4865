"""Model files: the serialised size of a ModelProto, saving it (with its weights in a
``<file>.data`` beside it past protobuf's 2 GiB limit) and removing what a save wrote.

The builder, the runtime and the deployment targets all write models through here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

#: protobuf cannot serialise a message of 2 GiB or more: larger models go through external data
PROTOBUF_LIMIT = 2**31 - 2**26


def proto_size(model: onnx.ModelProto) -> int:
    """An upper bound of ``model.ByteSize()`` that does not serialise the weights.

    ``ByteSize`` costs as much as ``SerializeToString`` (upb serialises to measure: 1.6 s
    for VGG19's 550 MB), so asking it before serialising paid for the weights twice. An
    initializer holding ``raw_data`` counts its dims x item size (what raw_data holds) plus
    a bound on its name, dims and tags; the rest of the model is measured as it is."""
    total = 0
    for t in model.graph.initializer:
        itemsize = None
        if t.HasField("raw_data"):
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            except Exception:  # a type numpy has no dtype for: measured below
                pass
        if itemsize is None:
            total += t.ByteSize() + 16
        else:
            total += int(np.prod(t.dims, dtype=np.int64)) * itemsize + len(t.name.encode()) + 11 * len(t.dims) + 96
    rest = _copy_without(model, "graph")
    rest.graph.CopyFrom(_copy_without(model.graph, "initializer"))
    return total + rest.ByteSize()


def fits_in_one_file(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serialises within :data:`PROTOBUF_LIMIT` (else: external data)."""
    return proto_size(model) < PROTOBUF_LIMIT


def _copy_without(message, skip: str):
    """A copy of a protobuf ``message`` less its field ``skip`` (which is not copied)."""
    out = type(message)()
    for fd, value in message.ListFields():
        if fd.name == skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(out, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    return out


def data_path(path) -> Path:
    """Where :func:`save_model` puts the weights of ``path`` when they go to external data."""
    path = Path(path)
    return path.with_name(f"{path.name}.data")


def save_external(model: onnx.ModelProto, path) -> None:
    """Save ``model`` to ``path`` with its weights in ``<path>.data``, leaving ``model`` as it
    was: onnx moves the weights out of the proto it saves (external references in their
    place); they are read back and the references cleared."""
    from onnx.external_data_helper import load_external_data_for_model

    path = Path(path)
    inline = {t.name for t in model.graph.initializer if not t.HasField("data_location")}
    onnx.save(model, str(path), save_as_external_data=True, location=data_path(path).name)
    load_external_data_for_model(model, str(path.parent))
    for t in model.graph.initializer:
        if t.name in inline:
            t.ClearField("data_location")


def save_model(model: onnx.ModelProto, path) -> list[Path]:
    """Write ``model`` to ``path``; past protobuf's 2 GiB limit the weights go to ``<path>.data``
    (written afresh: onnx would append to an existing file). ``model`` keeps its weights in
    memory either way. Returns the files written."""
    path = Path(path)
    if fits_in_one_file(model):
        onnx.save(model, str(path))
        return [path]
    data = data_path(path)
    if data.exists():
        data.unlink()
    save_external(model, path)
    return [path, data]


def remove_saved(path) -> None:
    """Remove ``path`` and the ``<path>.data`` a :func:`save_model` may have written beside it."""
    for p in (Path(path), data_path(path)):
        if p.is_file():
            p.unlink()


def input_files(path) -> list[Path]:
    """The files a model on disk is made of: the .onnx file and the external-data files its
    tensors name (resolved beside it); an export must never write any of them."""
    path = Path(path)
    files = [path]
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:   # unreadable: loading it later gives the error line
        return files
    tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node for a in n.attribute if a.HasField("t")]
    for t in tensors:
        for entry in t.external_data:
            if entry.key == "location":
                files.append(path.parent / entry.value)
    return list(dict.fromkeys(files))
