"""From what a user names to a model: :func:`resolve_model`, the one resolver every command
and library entry point uses.

A name is a path to an ONNX file, ``"default"`` (the default model, :mod:`.default`), a
ModelProto (taken as it is) or, where the caller allows them, a bench recipe with random
weights (:data:`.synthetic.RECIPES`, e.g. ``vgg16-random``).
"""
from __future__ import annotations

import dataclasses
import os
from functools import cached_property
from pathlib import Path
from typing import Sequence

import onnx

from onnx_excite.errors import ExciteError

from . import profiles, synthetic
from .default import is_default, resolve_model_path


class ResolvedModel:
    """A named model, ready to load: :attr:`model` is a path (the cached file for ``default``) or
    a ModelProto (a recipe's, made on first use; a caller's; or one whose dense head was made
    fully convolutional)."""

    def __init__(self, name: str, model=None, default_layers: Sequence[str] = (), recipe: str | None = None):
        self.name = name                               # as the user named it
        self._named_layers = list(default_layers)      # the profile's or the recipe's
        self.recipe = recipe                           # the recipe's name, for a recipe
        self.converted = False                         # the dense head was made fully convolutional
        if model is not None:
            self.model = model

    @cached_property
    def default_layers(self) -> list[str]:
        """The profile's or the recipe's layers; for any other model the layer its graph suggests
        (:func:`onnx_excite.graph.layers.default_layer`: the last feature map before the global
        pool, the map a dense head flattens, a ViT's last block input); [] when none is found."""
        if self._named_layers:
            return list(self._named_layers)
        from onnx_excite.graph.canonicalize import canonicalize
        from onnx_excite.graph.layers import default_layer

        try:
            layer = default_layer(canonicalize(self.proto))
        except ExciteError:
            return []   # the model's problem is reported by whatever uses it
        return [layer] if layer else []

    @property
    def layers_chosen_by_graph(self) -> bool:
        """Whether :attr:`default_layers` came from the graph (no profile or recipe names one)."""
        return not self._named_layers and bool(self.default_layers)

    @cached_property
    def model(self) -> str | onnx.ModelProto:
        return synthetic.RECIPES[self.recipe]()

    def method_layer(self, methods: Sequence[str]) -> str | None:
        """Where every method of ``methods`` is defined at one layer of its own (cam: the last
        feature map; rollout: the tokens the first attention block reads) and that layer is the
        same: that layer; None where a method takes any layer. ExciteError (the method's
        reason) where the model has no such layer."""
        from onnx_excite.methods import get_method

        declared = [get_method(m) for m in methods]
        if not declared or any(m.layers == "any" for m in declared):
            return None
        from onnx_excite.graph.builder import method_layer
        from onnx_excite.graph.canonicalize import canonicalize

        graph = canonicalize(self.proto)
        own = {method_layer(graph, m) for m in declared}
        return own.pop() if len(own) == 1 else None

    def layers(self, layers: Sequence[str] | None, methods: Sequence[str] = ()) -> list[str]:
        """``layers`` when given, else the one layer of ``methods`` (:meth:`method_layer`), else
        the model's default layers; ExciteError when it has none."""
        own = None if layers else self.method_layer(methods)
        chosen = list(layers or []) or ([own] if own else list(self.default_layers))
        if not chosen:
            raise ExciteError("no map layer given and the model has no default one: name one "
                              "(--layer; `onnx-excite layers MODEL` lists the candidates)")
        return chosen

    @cached_property
    def proto(self) -> onnx.ModelProto:
        """The model loaded (a ModelProto is taken as it is)."""
        from onnx_excite.graph.canonicalize import load_model

        return self.model if isinstance(self.model, onnx.ModelProto) else load_model(self.model)

    @cached_property
    def profile(self) -> profiles.Profile:
        """How images are prepared for it: the default model's own profile; else one inferred
        from the input shape, resizing the shorter side where the model takes any image size
        (a dynamic input, or a head made fully convolutional)."""
        if is_default(self.name):
            return profiles.PROFILES["mobilenet_v2"]
        profile = profiles.profile_for_model(self.proto)
        if self.converted or not _static(self.proto):
            profile = dataclasses.replace(profile, resize="shorter")
        return dataclasses.replace(profile, default_layers=list(self.default_layers))

    def class_names(self) -> list[str]:
        """The class descriptions (the 1000 ImageNet ones for the default model); ExciteError
        when the model carries none (then targets are given as indices)."""
        names = self.profile.load_class_names()
        if not names:
            raise ExciteError(f"{self.name}: no class names known for this model; give target classes as indices")
        return names


def _static(proto: onnx.ModelProto) -> bool:
    """A 4-D first input with fixed spatial dims."""
    if not proto.graph.input:
        return False
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:])


def resolve_model(model, *, allow_recipes: bool = False, fully_conv: bool = False) -> ResolvedModel:
    """The model ``model`` names (see the module docstring); ExciteError (one line) for a name
    that is none of them.

    ``allow_recipes``: a recipe name gives the recipe's model with random weights and its
    map layer (commands that benchmark). ``fully_conv``: a model with a fixed input size gets
    its Flatten -> Gemm head turned into convolutions, so it takes any image size (explain,
    eval); where that is not possible it stays as it is."""
    if isinstance(model, onnx.ModelProto):
        return ResolvedModel(model.graph.name or "model", model)
    name = os.fspath(model)
    if is_default(name):
        return ResolvedModel(name, resolve_model_path(name), list(profiles.PROFILES["mobilenet_v2"].default_layers))
    if allow_recipes and name in synthetic.RECIPES:
        return ResolvedModel(name, default_layers=synthetic.RECIPE_LAYERS[name], recipe=name)
    path = Path(name)
    if not path.exists():
        raise ExciteError(f"{path}: no such model file")
    resolved = ResolvedModel(name, name)
    if fully_conv and _static(resolved.proto):
        from onnx_excite.graph.fullyconv import convert_dense_head

        converted, ok = convert_dense_head(resolved.proto)
        if ok:
            resolved.model, resolved.proto, resolved.converted = converted, converted, True
    return resolved
