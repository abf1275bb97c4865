"""Explain image files: preprocess, run, write maps and overlays per image."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ExciteError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass
class ExplainOptions:
    model: str
    layers: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)   # class indices or names
    top: int = 1
    methods: tuple = ("mwp", "cmwp")
    rule: str = "positive"
    out_dir: Path = Path("excite_out")
    size: int | None = None
    mean: str | None = None
    std: str | None = None
    batch_size: int = 8


@dataclass
class ExplainSummary:
    written: int = 0
    failed: int = 0
    records: list = field(default_factory=list)


def expand_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted)."""
    files = []
    for path in map(Path, inputs):
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(path)
    return files


def _floats(text, default):
    if text is None:
        return default
    try:
        return tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise ExciteError(f"cannot read {text!r} as comma-separated numbers") from None


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "layer"


def resolve_model(name: str):
    """(model path or proto, profile) for a path or 'default'."""
    from onnx_excite.models import profiles

    if name == "default":
        from onnx_excite.models import mobilenet_v2

        try:
            path = mobilenet_v2.load_default_model()
        except mobilenet_v2.ModelUnavailableError as exc:
            raise ExciteError(str(exc)) from None
        return str(path), profiles.PROFILES["mobilenet_v2"]
    from .canonicalize import load_model

    proto = load_model(name)
    return name, profiles.profile_for_model(proto)


def parse_targets(targets: Sequence[str], class_names: list[str] | None, k: int) -> list[int]:
    out = []
    for t in targets:
        t = str(t).strip()
        if t.lstrip("-").isdigit():
            idx = int(t)
        else:
            names = [n.split(",")[0].strip().lower() for n in (class_names or [])]
            full = [n.lower() for n in (class_names or [])]
            if t.lower() in names:
                idx = names.index(t.lower())
            elif t.lower() in full:
                idx = full.index(t.lower())
            else:
                raise ExciteError(f"unknown class name {t!r}" + ("" if class_names else " (the model has no class names; give an index)"))
        if not 0 <= idx < k:
            raise ExciteError(f"target class {idx} out of range 0..{k - 1}")
        out.append(idx)
    return out


def explain_files(inputs: Sequence[Path], opts: ExplainOptions, console=None, errors=None) -> ExplainSummary:
    from . import images, maps
    from .runtime import Exciter

    model, profile = resolve_model(opts.model)
    layers = opts.layers or list(profile.default_layers)
    if not layers:
        raise ExciteError("no layer given and the model has no profile default: pass --layer (see `onnx-excite layers MODEL`)")
    files = expand_inputs(inputs)
    if not files:
        raise ExciteError("no input images found")
    class_names = None
    if profile.class_names:
        class_names = profile.load_class_names()
    mean = _floats(opts.mean, profile.mean)
    std = _floats(opts.std, profile.std)
    # maps must cover the whole image: no crop; fully convolutional models get the
    # shorter side at 224 (any aspect ratio), fixed-size models their own square size
    size = opts.size or (224 if profile.resize == "shorter" else profile.input_size)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    input_paths = {p.resolve() for p in files}
    summary = ExplainSummary()
    exciters: dict[tuple, Exciter] = {}

    for path in files:
        try:
            img = images.load_image(path)
        except ExciteError as exc:
            summary.failed += 1
            if errors is not None:
                errors.print(f"error: {exc}", markup=False)
            continue
        arr, prepared = images.preprocess(img, size=size, resize=profile.resize, crop=None, mean=mean, std=std,
                                          scale=profile.scale, channel_order=profile.channel_order, layout=profile.layout)
        x = arr[None]
        key = x.shape
        if key not in exciters:  # one companion graph per input size, with static shapes
            exciters[key] = Exciter(model, layers, methods=opts.methods, rule=opts.rule,
                                    input_shapes={_input_name(model): [None, *x.shape[1:]]})
        ex = exciters[key]
        logits = ex.logits(x)[0]
        k = logits.shape[0]
        targets = parse_targets(opts.targets, class_names, k) if opts.targets else list(np.argsort(-logits)[: opts.top])
        record = {"image": str(path), "model": opts.model, "rule": opts.rule, "layers": layers,
                  "methods": list(opts.methods), "top5": _topk(logits, class_names, 5), "outputs": []}
        for target in targets:
            res = ex.explain(x, [int(target)])
            label = class_names[target].split(",")[0] if class_names else str(target)
            for method in opts.methods:
                for layer in layers:
                    m = res.maps[method][layer][0]
                    stem = f"{path.stem}.{target}.{method}.{safe_name(layer)}"
                    up = maps.to_image_space(m, prepared)
                    written = {
                        "map": opts.out_dir / f"{stem}.npy",
                        "map_image": opts.out_dir / f"{stem}.image.npy",
                        "overlay": opts.out_dir / f"{stem}.png",
                    }
                    if any(p.resolve() in input_paths for p in written.values()):
                        raise ExciteError(f"output {stem} would overwrite an input file; choose another -o")
                    np.save(written["map"], m)
                    np.save(written["map_image"], up)
                    maps.overlay(img, up, colorbar=True).save(written["overlay"])
                    summary.written += len(written)
                    record["outputs"].append({"target": int(target), "label": label, "method": method, "layer": layer,
                                              **{k2: str(v) for k2, v in written.items()}})
        summary.records.append(record)
    if summary.records:
        jsonl = opts.out_dir / "explanations.jsonl"
        with jsonl.open("a") as fh:
            for rec in summary.records:
                fh.write(json.dumps(rec) + "\n")
        summary.written += 1
    return summary


def _input_name(model) -> str:
    from .canonicalize import load_model

    graph = load_model(model).graph
    inits = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


def sample_images() -> list[Path]:
    """The photos bundled with the package (see onnx_excite/data/samples/README.md)."""
    from importlib import resources

    folder = resources.files("onnx_excite").joinpath("data", "samples")
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".jpg"))


def run_demo(out_dir: Path, console=None, errors=None) -> tuple[ExplainSummary, Path]:
    """MWP and c-MWP overlays of the top-1 class on the default model for the bundled photos,
    plus ``summary.json`` (top-5 classes with probabilities, output paths)."""
    opts = ExplainOptions(model="default", methods=("mwp", "cmwp"), top=1, out_dir=Path(out_dir))
    summary = explain_files(sample_images(), opts, console=console, errors=errors)
    path = Path(out_dir) / "summary.json"
    path.write_text(json.dumps(summary.records, indent=2))
    return summary, path


def _topk(logits: np.ndarray, class_names, k: int) -> list[dict]:
    z = logits - logits.max()
    prob = np.exp(z) / np.exp(z).sum()
    idx = np.argsort(-logits)[:k]
    return [{"index": int(i), "label": class_names[i].split(",")[0] if class_names else str(i),
             "logit": float(logits[i]), "prob": float(prob[i])} for i in idx]
