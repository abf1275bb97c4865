"""How a model's images are prepared: the one place that turns a model (its profile and its
declared input) into the resize, normalisation and layout that ``explain`` and
:class:`onnx_excite.Exciter` apply to a photo.

A model with a fixed input size is fed at that size ("exact"); otherwise the shorter side is
resized to ``size`` (default 224: the whole image is covered, any aspect ratio, no crop) or,
for a profile that says "square", both sides. Float inputs are scaled and normalised with
the profile's mean and std (ImageNet's for a model without a profile) unless given; integer
inputs get raw pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnx_excite.errors import ExciteError


@dataclass(frozen=True)
class Preprocessing:
    """The resize, normalisation and layout of one model's images (plain, picklable data)."""

    mean: tuple
    std: tuple
    scale: float             # pixel scale before the normalisation
    resize: str              # "exact" (the model's fixed size), "shorter" or "square"
    size: object             # an int, or (width, height) with resize "exact"
    layout: str              # NCHW or NHWC
    channel_order: str = "RGB"

    def __call__(self, img):
        """(model input array without the batch axis, :class:`~onnx_excite.io.images.Prepared`
        geometry) of one decoded RGB image."""
        from onnx_excite.io.images import preprocess

        return preprocess(img, size=self.size, resize=self.resize, crop=None, mean=self.mean, std=self.std,
                          scale=self.scale, channel_order=self.channel_order, layout=self.layout)

    @property
    def input_size(self):
        """(width, height) fed to the model when every image gets the same, else None."""
        return tuple(self.size) if self.resize == "exact" else None


def model_header(model) -> onnx.ModelProto:
    """The model's graph without its external weights (inputs, outputs, shapes)."""
    from onnx_excite.graph.canonicalize import load_model

    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception:
        return load_model(model)   # raises the one-line error for unreadable files


def model_preprocessing(profile, header: onnx.ModelProto, size: int | None = None, mean=None, std=None,
                        warn=None) -> tuple[Preprocessing, list]:
    """The :class:`Preprocessing` of a model with ``profile`` (``ResolvedModel.profile``) and
    graph ``header``, and the notes on what was assumed (a model without a profile). ``size``
    overrides the shorter side (on a fixed-size model: only where its head was made fully
    convolutional, with a warning to ``warn``); ``mean``/``std`` as comma-separated text or
    numbers override the profile's."""
    from onnx_excite.io.checks import float_list
    from onnx_excite.io.modelinput import declared_input

    declared = declared_input(header)
    fixed = declared.fixed_size
    if fixed and size is None:
        resize, size = "exact", fixed    # the size the model was made for
    elif fixed:
        if profile.resize == "square":   # the head could not be made fully convolutional
            raise ExciteError(f"the model's input is fixed at {fixed[1]}x{fixed[0]} and its head cannot be made "
                              f"fully convolutional: drop --size")
        if warn is not None:
            warn(f"the model declares a fixed {fixed[1]}x{fixed[0]} input; --size {size} runs it at a size "
                 f"it was not trained for (its dense head made fully convolutional)")
        resize, size = "shorter", int(size)
    else:
        # maps must cover the whole image: no crop; the shorter side at 224 (any aspect ratio)
        resize, size = ("shorter", int(size or 224)) if profile.resize == "shorter" else ("square", int(size or profile.input_size))
    channels, notes = len(profile.mean), []
    if declared.channels not in (None, channels) and profile.name == "auto":
        raise ExciteError(f"the model's input {declared.name!r} has {declared.channels} channels: images are fed as "
                          f"1 (grey) or 3 (RGB) channels")
    if declared.integer:
        if mean is not None or std is not None:
            raise ExciteError(f"the model takes {declared.dtype.name} pixels and normalises them itself: "
                              f"--mean/--std do not apply")
        mean, std, scale = (0.0,) * channels, (1.0,) * channels, 1.0
    else:
        given = mean is not None and std is not None
        mean = float_list(mean, "--mean", length=channels, default=profile.mean)
        std = float_list(std, "--std", length=channels, positive=True, default=profile.std)
        scale = profile.scale
        if profile.name == "auto" and not given:
            origin = ("ImageNet's" if channels == 3 else
                      "one grey channel, photos converted to grey: ImageNet's weighted as L = 0.299 R + 0.587 G + 0.114 B")
            notes.append(f"the model has no profile: pixels are scaled by {scale:g} and normalised with mean "
                         f"{','.join(f'{v:g}' for v in mean)} and std {','.join(f'{v:g}' for v in std)} ({origin} "
                         f"unless given; --mean/--std set them), {profile.layout}, {resize} resize to {size}")
    return Preprocessing(tuple(mean), tuple(std), scale, resize, size, declared.layout, profile.channel_order), notes


def explained_input(resolved) -> tuple[dict | None, tuple | None, str]:
    """The input size ``explain`` runs ``resolved`` (a ``ResolvedModel``) at, for listing layer
    sizes: (``input_shapes`` pinning a dynamic image input's spatial dims to it, or None; (H, W)
    or None where the first input is no image; a phrase saying where the size comes from). A
    model with a fixed size runs at it; one with dynamic dims at the shorter side ``explain``
    resizes to (the profile's, else 224), shown for a square photo."""
    from onnx_excite.io.modelinput import declared_input

    try:
        header = model_header(resolved.model)
        declared = declared_input(header)
        prep, _ = model_preprocessing(resolved.profile, header)
    except ExciteError:
        return None, None, ""     # the model's problem is reported by the listing itself
    vi = next(i for i in header.graph.input if i.name == declared.name)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    if len(dims) != 4:
        return None, None, ""
    if prep.resize == "exact":
        w, h = prep.size
        return None, (h, w), "the model's fixed size"
    side = int(prep.size)
    spatial = (1, 2) if declared.layout == "NHWC" else (2, 3)
    pinned = [None] + dims[1:]
    for axis in spatial:
        pinned[axis] = side
    how = ("explain resizes the shorter side to" if prep.resize == "shorter" else "explain resizes photos to")
    return {declared.name: pinned}, (side, side), f"{how} {side}; other sizes scale the layers alike"
