"""Preprocessing profiles: how to turn an image into a model's input, and which layers to map.

``input_size`` is the resize target: the shorter side for ``resize="shorter"`` (then a
``crop`` x ``crop`` center crop when ``crop`` is set), or both sides for ``resize="square"``.
Pixels are multiplied by ``scale``, then normalised with ``mean`` / ``std`` per channel.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import onnx

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_classes_resource():
    return resources.files("onnx_excite").joinpath("data", "imagenet_classes.json")


def imagenet_class_names() -> list[str]:
    """The 1000 ILSVRC2012 class descriptions in the standard index order (``"tench, Tinca tinca"``, ...)."""
    names = json.loads(_imagenet_classes_resource().read_text(encoding="utf-8"))
    if not (isinstance(names, list) and len(names) == 1000 and all(isinstance(n, str) for n in names)):
        raise ValueError("onnx_excite/data/imagenet_classes.json: expected a list of 1000 strings")
    return names


@dataclass
class Profile:
    name: str
    input_size: int = 224
    resize: str = "shorter"  # "shorter" | "square"
    crop: Optional[int] = None
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    scale: float = 1 / 255
    channel_order: str = "RGB"  # "RGB" | "BGR"
    layout: str = "NCHW"  # "NCHW" | "NHWC"
    default_layers: list = field(default_factory=list)
    class_names: Optional[Union[str, Path]] = None  # a JSON list of names, or None

    def __post_init__(self):
        if self.resize not in ("shorter", "square"):
            raise ValueError(f"profile {self.name!r}: resize must be 'shorter' or 'square', not {self.resize!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"profile {self.name!r}: layout must be 'NCHW' or 'NHWC', not {self.layout!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"profile {self.name!r}: channel_order must be 'RGB' or 'BGR', not {self.channel_order!r}")
        if len(self.mean) != len(self.std):
            raise ValueError(f"profile {self.name!r}: mean and std differ in length")
        self.default_layers = list(self.default_layers)

    def load_class_names(self) -> Optional[list[str]]:
        if self.class_names is None:
            return None
        return json.loads(Path(self.class_names).read_text(encoding="utf-8"))


PROFILES = {
    # torchvision eval transform: Resize(256) (shorter side), CenterCrop(224), ToTensor, Normalize.
    # features.13 is the last 14x14 block for a 224 input (features.7..13 are 14x14;
    # features.14 is the first stride-2 block of the 7x7 stage).
    "mobilenet_v2": Profile("mobilenet_v2", input_size=256, resize="shorter", crop=224,
                            default_layers=["features.13"], class_names=str(_imagenet_classes_resource())),
}


def _dim(d) -> Optional[int]:
    return d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None


def profile_for_model(model_proto: onnx.ModelProto) -> Profile:
    """Default profile for an unknown model, from its (first non-initializer) input's shape.

    NHWC when the last dimension is 1 or 3 and the second is neither, else NCHW. The image is
    resized to a square: the static spatial size when the input has one, else 224.
    ImageNet mean/std, RGB, 1/255 (one grey channel when the input has 1: the mean and std
    ImageNet's weighted as the grey conversion, :data:`~onnx_excite.io.modelinput.GREY_MEAN`);
    no default layers and no class names.
    """
    inits = {i.name for i in model_proto.graph.initializer}
    inputs = [i for i in model_proto.graph.input if i.name not in inits]
    dims: Sequence = ()
    if inputs and inputs[0].type.HasField("tensor_type") and inputs[0].type.tensor_type.HasField("shape"):
        dims = [_dim(d) for d in inputs[0].type.tensor_type.shape.dim]
    from onnx_excite.io.modelinput import GREY_MEAN, GREY_STD, image_layout

    layout, size, mean, std = "NCHW", 224, IMAGENET_MEAN, IMAGENET_STD
    if len(dims) == 4:
        layout = image_layout(dims)
        h, w = (dims[1], dims[2]) if layout == "NHWC" else (dims[2], dims[3])
        if h and w:
            size = h if h == w else max(h, w)  # a non-square static input cannot be met by a square resize
        if (dims[3] if layout == "NHWC" else dims[1]) == 1:   # one grey channel
            mean, std = GREY_MEAN, GREY_STD
    return Profile("auto", input_size=size, resize="square", crop=None, mean=mean, std=std, layout=layout,
                   default_layers=[])
