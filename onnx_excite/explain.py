"""Explain image files: preprocess, run, write maps and overlays per image."""
from __future__ import annotations

import dataclasses
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
    combine: bool = False      # several targets as one multi-hot signal instead of one map each
    colorbar: bool = True      # a colour bar beside each overlay
    device: str = "auto"       # cpu | cuda | auto (see onnx_excite.devices)


@dataclass
class ExplainSummary:
    written: int = 0
    failed: int = 0
    records: list = field(default_factory=list)
    providers: list = field(default_factory=list)   # the ONNX Runtime providers really used


def expand_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files, globs (quoted by the shell) expanded; sorted."""
    import glob

    files = []
    for path in map(Path, inputs):
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif any(ch in str(path) for ch in "*?[") and not path.exists():
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            if not matches:
                raise ExciteError(f"{path}: no file matches this pattern")
            files.extend(m for m in matches if m.is_file())
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
    from .fullyconv import convert_dense_head

    proto = load_model(name)
    profile = profiles.profile_for_model(proto)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    static = len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:])
    if static:
        # a Flatten -> Gemm head turned into convolutions: any image size, any aspect ratio
        converted, ok = convert_dense_head(proto)
        if ok:
            return converted, dataclasses.replace(profile, resize="shorter")
        return name, profile
    return name, dataclasses.replace(profile, resize="shorter")


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
    """Explain every readable image; unreadable ones are reported and counted, the rest go on."""
    from .images import load_image, preprocess

    from .devices import providers_for

    providers_for(opts.device)   # --device cuda without CUDA: fail before any work
    model, profile = resolve_model(opts.model)
    layers = opts.layers or list(profile.default_layers)
    if not layers:
        raise ExciteError("no layer given and the model has no profile default: pass --layer (see `onnx-excite layers MODEL`)")
    files = expand_inputs(inputs)
    if not files:
        raise ExciteError("no input images found")
    if opts.batch_size < 1:
        raise ExciteError("--batch-size must be at least 1")
    class_names = profile.load_class_names() if profile.class_names else None
    mean, std = _floats(opts.mean, profile.mean), _floats(opts.std, profile.std)
    # maps must cover the whole image: no crop; fully convolutional models get the
    # shorter side at 224 (any aspect ratio), fixed-size models their own square size
    size = opts.size or (224 if profile.resize == "shorter" else profile.input_size)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(model, layers, opts, class_names, {p.resolve() for p in files})

    pending: list = []
    with _progress(console, len(files)) as advance:
        for path in files:
            try:
                img = load_image(path)
            except ExciteError as exc:
                run.summary.failed += 1
                if errors is not None:
                    errors.print(f"error: {exc}", markup=False)
                advance()
                continue
            arr, prepared = preprocess(img, size=size, resize=profile.resize, crop=None, mean=mean, std=std,
                                       scale=profile.scale, channel_order=profile.channel_order, layout=profile.layout)
            if pending and (len(pending) == opts.batch_size or pending[0][2].shape != arr.shape):
                run.batch(pending)
                advance(len(pending))
                pending = []
            pending.append((path, img, arr, prepared))
        if pending:
            run.batch(pending)
            advance(len(pending))
    if run.summary.records:
        with (opts.out_dir / "explanations.jsonl").open("a") as fh:
            for rec in run.summary.records:
                fh.write(json.dumps(rec) + "\n")
        run.summary.written += 1
    return run.summary


class _progress:
    """A rich progress bar for more than a few images; a no-op otherwise."""

    def __init__(self, console, total: int):
        self.bar = None
        if console is not None and total > 3:
            from rich.progress import Progress

            self.bar = Progress(console=console, transient=True)
            self.task = self.bar.add_task("explaining", total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return lambda n=1: self.bar.advance(self.task, n) if self.bar is not None else None

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


class _Run:
    """One explain job: an Exciter per input size, outputs per image, target and method."""

    def __init__(self, model, layers, opts: ExplainOptions, class_names, input_paths):
        self.model, self.layers, self.opts = model, layers, opts
        self.class_names, self.input_paths = class_names, input_paths
        self.summary = ExplainSummary()
        self.exciters: dict = {}

    def exciter(self, shape):
        if shape not in self.exciters:  # one companion graph per input size, with static shapes
            from .canonicalize import first_input_name
            from .runtime import Exciter

            self.exciters[shape] = Exciter(self.model, self.layers, methods=self.opts.methods, rule=self.opts.rule,
                                           input_shapes={first_input_name(self.model): [None, *shape]},
                                           device=self.opts.device)
            self.summary.providers = self.exciters[shape].providers
        return self.exciters[shape]

    def target_sets(self, logits: np.ndarray) -> list[list[tuple]]:
        """Per sample, the list of class sets to explain (one map each)."""
        k = logits.shape[1]
        if self.opts.targets:
            chosen = parse_targets(self.opts.targets, self.class_names, k)
            sets = [tuple(chosen)] if self.opts.combine else [(t,) for t in chosen]
            return [sets] * logits.shape[0]
        return [[(int(t),) for t in np.argsort(-row)[: self.opts.top]] for row in logits]

    def label(self, classes: tuple) -> str:
        names = [self.class_names[c].split(",")[0] if self.class_names else str(c) for c in classes]
        return " + ".join(names)

    def batch(self, items) -> None:
        from . import maps

        x = np.stack([arr for _, _, arr, _ in items])
        ex = self.exciter(x.shape[1:])
        logits = ex.logits(x)
        sets = self.target_sets(logits)
        records = [{"image": str(path), "model": self.opts.model, "rule": self.opts.rule, "layers": self.layers,
                    "methods": list(self.opts.methods), "top5": _topk(logits[i], self.class_names, 5), "outputs": []}
                   for i, (path, _, _, _) in enumerate(items)]
        for j in range(len(sets[0])):
            signal = np.zeros_like(logits, dtype=np.float32)
            for i in range(len(items)):
                signal[i, list(sets[i][j])] = 1.0
            res = ex.explain(x, signal)
            for i, (path, img, _, prepared) in enumerate(items):
                classes = sets[i][j]
                tag = "+".join(str(c) for c in classes)
                panel_maps = []
                for method in self.opts.methods:
                    for layer in self.layers:
                        m = res.maps[method][layer][i]
                        up = maps.to_image_space(m, prepared)
                        stem = f"{path.stem}.{tag}.{method}.{safe_name(layer)}"
                        written = {"map": self.opts.out_dir / f"{stem}.npy",
                                   "map_image": self.opts.out_dir / f"{stem}.image.npy",
                                   "overlay": self.opts.out_dir / f"{stem}.png"}
                        self._check_not_input(written.values())
                        np.save(written["map"], m)
                        np.save(written["map_image"], up)
                        maps.overlay(img, up, colorbar=self.opts.colorbar).save(written["overlay"])
                        self.summary.written += len(written)
                        panel_maps.append((f"{method} {layer}", up))
                        records[i]["outputs"].append({"targets": list(classes), "label": self.label(classes),
                                                      "method": method, "layer": layer,
                                                      **{k: str(v) for k, v in written.items()}})
                panel_path = self.opts.out_dir / f"{path.stem}.{tag}.panel.png"
                self._check_not_input([panel_path])
                maps.panel(img, panel_maps).save(panel_path)
                self.summary.written += 1
                for out in records[i]["outputs"][-len(panel_maps):]:
                    out["panel"] = str(panel_path)
        self.summary.records.extend(records)

    def _check_not_input(self, paths) -> None:
        if any(Path(p).resolve() in self.input_paths for p in paths):
            raise ExciteError(f"an output would overwrite an input image ({Path(next(iter(paths))).name}); choose another -o")


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
