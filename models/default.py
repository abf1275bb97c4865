"""The name ``"default"``: the one place that turns it into a model file.

Every entry point that takes a model (``Exciter``, ``build_excitation_model``,
``inspect_model``, ``run_bench``, ``explain``, ``eval`` and each CLI command) names it
through :func:`onnx_excite.models.resolve.resolve_model` or loads it through
:func:`onnx_excite.graph.canonicalize.load_model`; both call :func:`resolve_model_path`,
so ``"default"`` works everywhere a model path does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from onnx_excite.errors import ExciteError

#: the name that stands for the default model (torchvision's ImageNet MobileNetV2)
DEFAULT_MODEL = "default"
REBUILD_COMMAND = "onnx-excite models --rebuild"


def is_default(model) -> bool:
    return isinstance(model, str) and model == DEFAULT_MODEL


def resolve_model_path(model, rebuild: bool = False):
    """``"default"`` -> the path of the cached default model (built from the weights package on
    first use, or when ``rebuild``); any other model (path or ModelProto) is returned unchanged.

    Raises ExciteError, with the install command, when the weights are not installed.
    """
    if not is_default(model):
        return model
    from . import mobilenet_v2

    try:
        return str(mobilenet_v2.load_default_model(rebuild=rebuild))
    except mobilenet_v2.ModelUnavailableError as exc:
        raise ExciteError(str(exc)) from None


@dataclass
class DefaultModelInfo:
    """Where the default model lives and how it is made (what ``onnx-excite models`` prints)."""

    name: str
    description: str
    cache_path: Path
    cached: bool                 # a valid cached model exists
    size_bytes: Optional[int]
    weights: Optional[Path]      # the installed checkpoint, or None
    weights_problem: Optional[str]
    install_command: str
    rebuild_command: str
    profile: object              # models.profiles.Profile
    num_classes: int
    map_size: int                # explain/eval: the shorter side is resized to this, no crop


def default_model_info() -> DefaultModelInfo:
    """Describe the default model without building it."""
    from . import mobilenet_v2, profiles

    cache = mobilenet_v2.default_cache_dir()
    path = cache / mobilenet_v2.CACHE_NAME
    cached = mobilenet_v2.cache_is_valid(cache)
    try:
        weights, problem = mobilenet_v2.find_weights(), None
    except mobilenet_v2.ModelUnavailableError as exc:
        weights, problem = None, str(exc)
    profile = profiles.PROFILES["mobilenet_v2"]
    return DefaultModelInfo(
        name=DEFAULT_MODEL,
        description=f"MobileNetV2, ImageNet-1k (torchvision checkpoint {mobilenet_v2.WEIGHTS_FILE}), built as ONNX without torch",
        cache_path=path, cached=cached, size_bytes=os.path.getsize(path) if cached else None,
        weights=weights, weights_problem=problem, install_command=mobilenet_v2.INSTALL_HINT,
        rebuild_command=REBUILD_COMMAND, profile=profile, num_classes=len(profile.load_class_names()),
        map_size=224)

