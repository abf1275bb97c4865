"""The library's export: build the companion model of a classifier, post-process it for the
deployment targets asked for, write it, check it.

A target is a module with four functions, walked in the order of :data:`TARGETS`:

* ``wanted(options)``: whether the export's :class:`~.options.ExportOptions` ask for it;
* ``prepare(model, options) -> (model, notes)``: rewrite the classifier before the build;
* ``finish(result, options)``: post-process the built :class:`~.options.ExportResult`;
* ``write(result, path, options) -> [model files]``: write its files.

:mod:`.plain` (dynamic batch, the serving form, the ``-o`` file), :mod:`.fp16` (the forward in
float16) and :mod:`.triton` (a Triton model repository folder) are the targets; another
runtime is one more module and one more entry.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from onnx_excite.models.resolve import resolve_model

from ..errors import ExciteError
from ..graph.builder import build_excitation_model
from ..graph.canonicalize import load_model
from ..graph.options import BuildOptions
from ..io.checks import output_dir, output_file
from ..io.modelfile import input_files, remove_saved
from . import fp16, plain, triton
from .options import ExportOptions, ExportResult

#: the deployment targets, in the order their steps run
TARGETS = {"plain": plain, "fp16": fp16, "triton": triton}


def export(model, path=None, options: ExportOptions | None = None) -> ExportResult:
    """Build the companion model of ``model`` (a path, ``default`` or a ModelProto; never
    modified), post-process it for the targets ``options`` ask for, write it to ``path``
    (with ``<path>.data`` beside it past protobuf's 2 GiB limit) and/or the Triton folder
    ``options.triton_dir``, and check every model written with ``onnx.checker``; on any
    failure the model files written are removed. ExciteError (one line) for bad input."""
    options = options if options is not None else ExportOptions()
    if path is None and options.triton_dir is None:
        raise ExciteError("give -o/--output FILE and/or --serving DIR")
    resolved = resolve_model(model)
    build = BuildOptions.of(options.build, layers=resolved.layers(options.build.layers, options.build.methods))
    protect = [] if isinstance(resolved.model, onnx.ModelProto) else input_files(resolved.model)
    triton_model = None
    if options.triton_dir is not None:   # every path checked before anything is created
        name = triton.check_name(triton.model_name(resolved.name, options))
        triton_model = Path(options.triton_dir) / name / "1" / "model.onnx"
        output_file(triton_model, "--serving", protect=protect, create=False)
    if path is not None:
        output_file(path, "-o", protect=protect, create=False)
        output_dir(Path(path).parent if str(Path(path).parent) else Path("."), "-o")
    if options.triton_dir is not None:
        output_dir(options.triton_dir, "--serving")
    plain.check_options(options)
    targets = [t for t in TARGETS.values() if t.wanted(options)]
    proto, notes = load_model(resolved.model), []
    for target in targets:
        proto, more = target.prepare(proto, options)
        notes += more
    result = ExportResult(resolved.name, build_excitation_model(proto, options=build), notes=notes)
    for target in targets:
        target.finish(result, options)
    try:
        for target in targets:
            result.written += target.write(result, None if path is None else Path(path), options)
        for written in result.written:
            _check(written)
    except BaseException:
        for written in result.written:
            remove_saved(written)
        raise
    return result


def _check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # a bug of ours, not of the user's model
        raise ExciteError(f"internal: the built model fails onnx.checker: {str(exc).splitlines()[0]}") from None
