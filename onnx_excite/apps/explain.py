"""Explain image files: preprocess, run, write maps and overlays per image."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from onnx_excite.models.resolve import resolve_model

from ..errors import ExciteError
from ..methods import DEFAULT_METHODS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}

#: what `explain` can write per image (``--outputs``), in the order they are listed:
#: overlay: one overlay per class, method and layer; panel: one panel per class (and, with
#: several classes, one of all of them); npy: the map at layer resolution; image-npy: the map
#: upsampled to the image (float16); record: the image's line in explanations.jsonl
OUTPUTS = ("overlay", "panel", "npy", "image-npy", "record")
#: the default: everything (the upsampled maps and the records are documented outputs that
#: scripts read; ``--outputs overlay,panel,record`` is the light choice)
DEFAULT_OUTPUTS = OUTPUTS


def parse_outputs(value) -> tuple:
    """``--outputs``: a comma list (or a sequence) of :data:`OUTPUTS`, in that order; one error
    line naming the choices for anything else."""
    items = value.split(",") if isinstance(value, str) else list(value)
    chosen = [str(v).strip().lower() for v in items if str(v).strip()]
    unknown = [v for v in chosen if v not in OUTPUTS]
    if unknown or not chosen:
        what = f"unknown output {unknown[0]!r}" if unknown else "no output chosen"
        raise ExciteError(f"--outputs: {what}; choose a comma list of {', '.join(OUTPUTS)}")
    return tuple(o for o in OUTPUTS if o in chosen)


def _writes_images(outputs) -> bool:
    return "overlay" in outputs or "panel" in outputs


@dataclass
class ExplainOptions:
    model: str
    layers: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)   # class indices or names
    top: int = 1
    methods: tuple = DEFAULT_METHODS
    rule: str = "positive"
    out_dir: Path = Path("excite_out")
    size: int | None = None
    mean: str | None = None
    std: str | None = None
    batch_size: int = 8
    combine: bool = False      # several targets as one multi-hot signal instead of one map each
    colorbar: bool = True      # a colour bar beside each overlay
    scale: str = "shared"      # "max": each map by its own maximum; "shared": one per method and layer across an image's targets
    alpha: float = 0.5         # weight of the heat map in the overlay
    cmap: str = "jet"          # colour map (matplotlib's names when it is installed)
    full_res: bool = False     # image-space maps and overlays at the photo's full size (else long side <= 1600)
    logits: str | None = None  # the output explained (default: resolve_logits chooses)
    blur: bool = True          # the paper's Gaussian blur of the image-space maps of methods declared with it
    device: str = "auto"       # cpu | cuda | auto (see onnx_excite.run.devices)
    workers: int | None = None  # threads decoding images ahead and writing outputs behind (None: default_workers(); 1: none)
    outputs: tuple = DEFAULT_OUTPUTS   # what is written per image: any of OUTPUTS (a tuple or a comma string)
    format: str = "png"        # overlays and panels: png (lossless), jpg or webp (quality 90)
    # RISE (method "rise", onnx_excite.apps.rise): its masks and the batch of masked inputs per forward
    masks: int = 1000
    mask_cells: int = 7
    mask_p: float = 0.5
    seed: int = 0
    mask_batch: int = 32

    @property
    def graph_methods(self) -> tuple:
        """The methods run in the companion graph (the others are black-box methods)."""
        from ..methods import is_black_box

        return tuple(m for m in self.methods if not is_black_box(m))

    @property
    def rise(self):
        """The :class:`~onnx_excite.apps.rise.RiseSettings` of the options."""
        from .rise import RiseSettings

        return RiseSettings(masks=self.masks, cells=self.mask_cells, p=self.mask_p, seed=self.seed,
                            batch_size=self.mask_batch)


@dataclass
class ExplainSummary:
    written: int = 0
    failed: int = 0
    skipped: int = 0           # images whose outputs were already complete (same settings)
    records: list = field(default_factory=list)
    input_size: tuple | None = None   # (width, height) fed to the model, when all images share one
    logits_choice: object = None   # canonicalize.LogitsChoice: which output was explained, and why
    providers: list = field(default_factory=list)   # the ONNX Runtime providers really used
    notes: list = field(default_factory=list)        # what was assumed for the model (layer, preprocessing)
    seconds: float = 0.0       # the whole run, model load included
    images: int = 0            # images explained in this run (not the skipped or failed)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _matches(pattern: str) -> list[Path]:
    """Files matching a glob; ``**`` walks folders without following symbolic links (a link
    loop would never end)."""
    import fnmatch
    import glob

    if "**" not in pattern:
        return sorted(Path(p) for p in glob.glob(pattern))
    head = pattern.split("**", 1)[0]
    root = Path(head) if head else Path(".")
    forms = {pattern, pattern.replace("**/", "")}
    found = []
    for folder, _, names in os.walk(root, followlinks=False):
        for name in names:
            candidate = os.path.join(folder, name) if head else os.path.relpath(os.path.join(folder, name))
            if any(fnmatch.fnmatch(candidate, f) for f in forms):
                found.append(Path(candidate))
    return sorted(found)


def _checked(path: Path) -> Path:
    try:
        path.resolve()
    except (RuntimeError, OSError):   # Python raises RuntimeError on a symbolic link loop
        raise ExciteError(f"{path}: a symbolic link loop, not an image") from None
    return path


def expand_inputs(inputs: Sequence[Path], exclude=frozenset()) -> list[Path]:
    """Files as given, folders expanded to their image files, globs (quoted by the shell)
    expanded; sorted. The resolved paths in ``exclude`` (the files earlier runs wrote into
    the output folder) are left out: a run never explains its own overlays."""
    files = []
    for path in map(Path, inputs):
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif any(ch in str(path) for ch in "*?[") and not path.exists():
            matches = _matches(str(path))
            if not matches:
                raise ExciteError(f"{path}: no file matches this pattern")
            files.extend(m for m in matches if m.is_file())
        else:
            files.append(path)
    files = [_checked(f) for f in files]
    if exclude:
        files = [f for f in files if f.resolve() not in exclude]
    return files


def _floats(text, default):
    if text is None:
        return default
    try:
        return tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise ExciteError(f"cannot read {text!r} as comma-separated numbers") from None


def class_scores(logits: np.ndarray) -> np.ndarray:
    """(N, K) scores from the logits: (N, K, 1, 1) heads (a 1x1 conv classifier) are flattened;
    other shapes get one error line."""
    if logits.ndim > 2 and all(d == 1 for d in logits.shape[2:]):
        return logits.reshape(logits.shape[0], -1)
    if logits.ndim != 2:
        raise ModelShapeError(f"the logits are {'x'.join(map(str, logits.shape))}, not (N, K): flatten them in the "
                              "model, or name a 2-D tensor with --logits")
    return logits


class ModelShapeError(ExciteError):
    """A model whose outputs cannot be explained per image (stops the run)."""


def output_stems(paths) -> dict:
    """{resolved path: the start of its output file names}: the image's stem, or, where two
    different images (of this run, or recorded in the output folder before) share a stem
    (``s1/cat.png``, ``s2/cat.png``), the stem and 8 hex digits of the resolved path's hash, so
    that no image's files overwrite another's."""
    resolved = {Path(p).resolve() for p in paths}
    by_stem: dict = {}
    for p in resolved:
        by_stem.setdefault(p.stem, set()).add(p)
    out = {}
    for stem, group in by_stem.items():
        for p in group:
            out[p] = stem if len(group) == 1 else f"{stem}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"
    return out


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "layer"


def parse_targets(targets: Sequence[str], class_names: list[str] | None, k: int) -> list[int]:
    """Class indices of ``targets`` (indices, descriptions or synonyms; see ``classes.class_index``)."""
    from ..classes import class_index

    return [class_index(t, class_names, k) for t in targets]


def _settings(opts: ExplainOptions, layers, resize: str, size, mean, std) -> dict:
    """What a record depends on: a re-run with the same settings skips finished images. The
    files chosen (``outputs``, ``record`` aside) and their ``format`` are keys only when they
    are not the default, so records of the default outputs read the same as before."""
    from ..render.overlay import image_format

    outputs = parse_outputs(opts.outputs)
    extra = {"rise": opts.rise.tag} if "rise" in opts.methods else {}
    if outputs != DEFAULT_OUTPUTS:
        extra["outputs"] = [o for o in outputs if o != "record"]
    fmt = image_format(opts.format)
    if fmt != "png" and _writes_images(outputs):
        extra["format"] = fmt
    return extra | {"model": str(opts.model), "layers": list(layers), "methods": list(opts.methods), "rule": opts.rule,
            "targets": [str(t) for t in opts.targets] or None, "top": None if opts.targets else opts.top,
            "combine": bool(opts.combine), "resize": resize, "size": list(size) if isinstance(size, tuple) else size,
            "mean": list(mean), "std": list(std), "scale": opts.scale, "alpha": float(opts.alpha), "cmap": opts.cmap,
            "colorbar": bool(opts.colorbar), "full_res": bool(opts.full_res), "blur": bool(opts.blur)}


def default_workers() -> int:
    """Writer threads when ``workers`` is not given: the CPU count, 2 to 4."""
    return max(2, min(4, os.cpu_count() or 1))


def _validate(opts: ExplainOptions):
    """Option values, before anything is loaded or written."""
    from ..io.checks import at_least
    from ..render.overlay import SCALES, Style

    at_least(opts.top, 1, "--top")
    at_least(opts.batch_size, 1, "--batch-size")
    if opts.workers is not None:
        at_least(opts.workers, 1, "--workers")
    if opts.size is not None:
        at_least(opts.size, 1, "--size")
    if opts.scale not in SCALES:
        raise ExciteError(f"--scale must be one of {', '.join(SCALES)}, not {opts.scale!r}")
    from ..render.overlay import image_format

    parse_outputs(opts.outputs)
    image_format(opts.format)
    from ..methods import get_any_method, method_help

    if not opts.methods:
        raise ExciteError(f"no method given; choose from {method_help()}")
    for m in opts.methods:
        get_any_method(m)
    if "rise" in opts.methods:
        opts.rise   # noqa: B018  (checks the RISE options)
    return Style(cmap=opts.cmap, alpha=opts.alpha, colorbar=opts.colorbar, full_res=opts.full_res)


@dataclass
class ExplainSetup:
    """The resolved model, layers, preprocessing, rendering and record settings of an explain
    job (plain, picklable data: the Ray workers get it as it is)."""

    model: object            # a path or a ModelProto (a dense head made fully convolutional)
    profile: object
    layers: list
    class_names: list | None
    mean: tuple
    std: tuple
    scale: float             # pixel scale of the preprocessing
    resize: str              # "exact" (the model's fixed size), "shorter" or "square"
    size: object             # an int, or (width, height) with resize "exact"
    layout: str
    style: object            # render.Style
    per_image: int           # maps per image and method and layer (classes explained)
    settings: dict = field(default_factory=dict)   # what a record depends on (RecordStore key)
    notes: tuple = ()        # what was assumed for a model without a profile (said after the run)

    @property
    def preprocessing(self):
        """The :class:`onnx_excite.models.preprocessing.Preprocessing` these settings describe."""
        from onnx_excite.models.preprocessing import Preprocessing

        return Preprocessing(self.mean, self.std, self.scale, self.resize, self.size, self.layout,
                             self.profile.channel_order)

    def preprocess(self, img):
        """(model input array, Prepared geometry) of one decoded image."""
        return self.preprocessing(img)

    @property
    def input_size(self):
        """(width, height) fed to the model when every image gets the same, else None."""
        return tuple(self.size) if self.resize == "exact" else None


def explain_setup(opts: ExplainOptions, warn=None) -> ExplainSetup:
    """Check the options and resolve the model, its input size, layers and preprocessing
    (before any image is read or any file written). ``warn(message)`` receives warnings."""
    from onnx_excite.models.preprocessing import model_header, model_preprocessing

    from ..run.devices import providers_for
    from ..io.modelinput import declared_input, num_classes

    providers_for(opts.device)   # --device cuda without CUDA: fail before any work
    style = _validate(opts)
    warn = warn or (lambda message: None)
    resolved = resolve_model(opts.model)   # a path: the model as it is
    model, profile = resolved.model, resolved.profile
    header = model_header(model)
    if declared_input(header).fixed_size and opts.size is not None:   # --size on a fixed-size model: its head made fully convolutional
        resolved = resolve_model(opts.model, fully_conv=True)
        model, profile = resolved.model, resolved.profile
    prep, assumed = model_preprocessing(profile, header, opts.size, opts.mean, opts.std, warn)
    resize, size, mean, std = prep.resize, prep.size, prep.mean, prep.std
    own = None if opts.layers else resolved.method_layer(opts.graph_methods)   # cam's, rollout's own layer
    layers = opts.layers or ([own] if own else list(profile.default_layers))
    notes = []
    if opts.layers and not opts.graph_methods:
        warn(f"--layer does not apply to {', '.join(opts.methods)}: the maps are at the model input")
    if own:
        notes.append(f"no --layer given: maps at {own!r}, the one layer {', '.join(opts.graph_methods)} "
                     f"{'is' if len(opts.graph_methods) == 1 else 'are'} defined at")
    elif not opts.layers and layers and resolved.layers_chosen_by_graph and opts.graph_methods:
        notes.append(f"no --layer given: maps at {layers[0]!r}, the layer the graph suggests (the last feature "
                     f"map before the head; `onnx-excite layers MODEL` marks it)")
    if not opts.graph_methods:
        layers = []   # black-box methods only: their maps are at the model input
    elif not layers:
        raise ExciteError("no layer given and the model has no profile default: pass --layer (see `onnx-excite layers MODEL`)")
    notes += assumed
    class_names = profile.load_class_names() if profile.class_names else None
    k = len(class_names) if class_names else num_classes(header)
    per_image = len(opts.targets) if opts.targets and not opts.combine else (1 if opts.targets else opts.top)
    if not opts.targets and k is not None and opts.top > k:
        raise ExciteError(f"--top {opts.top}: the model has only {k} classes")
    return ExplainSetup(model, profile, layers, class_names, tuple(mean), tuple(std), prep.scale, resize, size,
                        prep.layout, style, per_image, _settings(opts, layers, resize, size, mean, std), tuple(notes))


def warn_if_large(n_files: int, setup: ExplainSetup, opts: ExplainOptions, warn) -> None:
    """Warn before a job that writes very many files."""
    maps_total = n_files * setup.per_image * (len(opts.graph_methods) * len(setup.layers) + len(opts.methods)
                                              - len(opts.graph_methods))
    if warn is not None and (setup.per_image > 10 or maps_total > 2000):
        outputs = parse_outputs(opts.outputs)
        each = [what for key, what in (("npy", ".npy"), ("image-npy", "image-size .npy"), ("overlay", "overlay"))
                if key in outputs]
        panels = f", plus {n_files * setup.per_image} panels" if "panel" in outputs else ""
        warn(f"{n_files} image(s) x {setup.per_image} classes x {len(opts.methods)} method(s) x {max(1, len(setup.layers))} "
             f"layer(s): {maps_total} maps" + (f", each with its {' and '.join(each)}" if each else "") + panels)


def explain_files(inputs: Sequence[Path], opts: ExplainOptions, console=None, errors=None, warn=None,
                  on_record=None) -> ExplainSummary:
    """Explain every readable image; unreadable ones (and batches ONNX Runtime rejects) are
    reported and counted, the rest go on.

    Each image's record is stored in ``out_dir/explanations.jsonl`` as soon as it is done
    (:class:`onnx_excite.io.records.RecordStore`): a run that stops half way keeps what it
    finished, and a re-run with the same settings skips images whose outputs all exist
    instead of appending duplicates. ``warn(message)`` receives warnings (a size override,
    a very large output); ``on_record(record, skipped)`` each image's record as it is done.

    With ``opts.workers`` > 1 (the default, :func:`default_workers`) the next images are
    decoded on a thread while the model runs, and each image's files are rendered and written
    on a pool of that many threads, at most ``2 * workers`` images at a time; an image's
    record is stored, in input order, only once all its files are written. The files are the
    same, byte for byte, as with ``workers=1`` (everything in the calling thread).
    """
    import time

    from ..io.checks import output_dir
    from ..io.images import load_image
    from ..io.records import FolderLock, RecordStore, output_paths

    start = time.perf_counter()
    setup = explain_setup(opts, warn)
    records_kept = "record" in parse_outputs(opts.outputs)
    files = expand_inputs(inputs)
    if not files:
        raise ExciteError("no input images found")
    warn_if_large(len(files), setup, opts, warn)
    per_image, settings = setup.per_image, setup.settings
    out_dir = output_dir(opts.out_dir)
    opts = dataclasses.replace(opts, out_dir=out_dir)
    store = RecordStore(out_dir, keep=records_kept)
    written = {p.resolve() for r in store.records.values() for p in output_paths(r)}
    files = [f for f in files if f.resolve() not in written]   # -o may be the input folder
    if not files:
        raise ExciteError("no input images found (besides the outputs of earlier runs)")
    if not records_kept and any(f.resolve().parent == out_dir.resolve() for f in files):
        raise ExciteError(f"--outputs without record into a folder of input images ({out_dir}): a later run could not "
                          f"tell the overlays from the photos; choose another -o or add record")
    if store.skipped and warn is not None:
        warn(f"{store.path}: {len(store.skipped)} line(s) are no records and are dropped ({store.skipped[0]})")
    workers = opts.workers or default_workers()

    def decode(path):
        img = load_image(path)
        return (img, *setup.preprocess(img))

    pending: list = []
    black_box = len(opts.graph_methods) < len(opts.methods)
    with FolderLock(out_dir), _progress(console, len(files), per_image, black_box) as advance, \
            _Writes(workers, 2 * workers) as writes, _Ahead(decode, 1 if workers > 1 else 0, opts.batch_size) as ahead:
        run = _Run(setup.model, setup.layers, opts, setup.class_names, {p.resolve() for p in files}, setup.style, store,
                   settings, on_record, writes=writes, layout=setup.layout)
        run.summary.input_size = setup.input_size
        run.on_masks = advance.masks
        run.summary.notes = list(setup.notes)
        seen: set = set()

        def flush():
            run.batch(pending, advance)
            pending.clear()

        def todo(path):   # an image given twice is done once: its first record is complete first
            if path.resolve() in seen:
                if pending:
                    flush()
                writes.drain()
            return store.done(path, settings) is None

        for path, decoded in ahead.run(files, todo, lambda path: store.done(path, settings) is None):
            seen.add(path.resolve())
            if decoded is None:
                done = store.done(path, settings)
                run.summary.skipped += 1
                run.summary.records.append(done)
                if on_record is not None:
                    on_record(done, True)
                advance(per_image)
                continue
            try:
                img, arr, prepared = decoded()
            except ExciteError as exc:
                run.summary.failed += 1
                if errors is not None:
                    errors.print(f"error: {exc}", markup=False)
                advance(per_image)
                continue
            if pending and (len(pending) == opts.batch_size or pending[0][2].shape != arr.shape):
                flush()
            pending.append((path, img, arr, prepared))
        if pending:
            flush()
        writes.drain()
    for message in run.failures:
        if errors is not None:
            errors.print(f"error: {message}", markup=False)
    if run.summary.records and records_kept:
        run.summary.written += 1   # explanations.jsonl
    run.summary.images = len(run.summary.records) - run.summary.skipped
    run.summary.seconds = time.perf_counter() - start
    return run.summary


class _Writes:
    """Jobs on a pool of ``workers`` threads, at most ``limit`` submitted and not yet finished;
    each job's ``done(result)`` runs in the submitting thread, in submission order (an
    exception a job raised is raised there). One worker: each job runs at once, inline."""

    def __init__(self, workers: int, limit: int):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="onnx-excite-write") if workers > 1 else None
        self.limit, self.pending = max(1, limit), deque()

    def submit(self, job, done) -> None:
        if self.pool is None:
            done(job())
            return
        self.pending.append((self.pool.submit(job), done))
        while len(self.pending) > self.limit:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        future, done = self.pending.popleft()
        done(future.result())

    def drain(self) -> None:
        """Finish every job submitted."""
        while self.pending:
            self._finish_oldest()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:   # after an error: drop the jobs not started, wait for the running ones
            for future, _ in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Ahead:
    """``run(items, wanted, likely)`` yields ``(item, decoded)`` in order: ``decoded()``
    returns ``decode(item)`` (or raises what it raised), None for an item ``wanted`` refused
    (asked as the item's turn comes); with ``threads`` > 0 up to ``ahead`` items for which
    ``likely(item)`` holds are decoded ahead on those threads."""

    def __init__(self, decode, threads: int, ahead: int):
        from concurrent.futures import ThreadPoolExecutor

        self.decode, self.ahead = decode, max(1, ahead)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="onnx-excite-read") if threads > 0 else None

    def run(self, items, wanted, likely):
        from collections import deque

        if self.pool is None:
            for item in items:
                yield item, ((lambda item=item: self.decode(item)) if wanted(item) else None)
            return
        queue, items, ahead = deque(), iter(items), 0
        while True:
            while ahead < self.ahead:
                item = next(items, None)
                if item is None:
                    break
                future = self.pool.submit(self.decode, item) if likely(item) else None
                queue.append((item, future))
                ahead += future is not None
            if not queue:
                return
            item, future = queue.popleft()
            ahead -= future is not None
            if not wanted(item):
                if future is not None:
                    future.cancel()
                yield item, None
            elif future is None:
                yield item, (lambda item=item: self.decode(item))
            else:
                yield item, future.result

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _progress:
    """On ``console`` (when it is a terminal and the job has more than a few images, or runs a
    black-box method): a rich bar with the images done, images/s and the ETA (with a black-box
    method also a bar of its masked forwards of the current image); ``advance(n)`` counts n
    classes, each 1 / ``per_image`` of an image, ``advance.masks(done, total)`` moves the
    forwards' bar. A no-op otherwise (the CLI prints a line per image)."""

    def __init__(self, console, images: int, per_image: int = 1, masks: bool = False):
        from ..io.progress import ImageProgress

        self.per_image = max(1, per_image)
        self.bar = ImageProgress(console, "explaining" if per_image == 1 else
                                 f"explaining ({per_image} classes per image)", images, minimum=1 if masks else 4)
        self.masks_task = None
        if masks and self.bar.bar is not None:
            self.masks_task = self.bar.bar.add_task("RISE masks of this image", total=1)

    def __enter__(self):
        self.bar.__enter__()

        def advance(n=1):
            self.bar.advance(n / self.per_image)

        def masks(done, total):
            if self.masks_task is not None:
                self.bar.bar.update(self.masks_task, completed=done, total=total)

        advance.masks = masks
        return advance

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


class _Run:
    """One explain job: an Exciter per input size, outputs per image, target and method."""

    def __init__(self, model, layers, opts: ExplainOptions, class_names, input_paths, style, store, settings,
                 on_record=None, threads=None, writes=None, layout: str = "NCHW"):
        self.model, self.layers, self.opts, self.threads, self.layout = model, layers, opts, threads, layout
        self.writes = writes if writes is not None else _Writes(1, 1)   # a _Writes: where the files are written
        self.class_names, self.input_paths = class_names, input_paths
        self.style, self.store, self.settings, self.on_record = style, store, settings, on_record
        from ..render.overlay import IMAGE_FORMATS, image_format

        self.outputs = parse_outputs(opts.outputs)
        self.format = image_format(opts.format)
        self.suffix = IMAGE_FORMATS[self.format][0]
        self.summary = ExplainSummary()
        self.exciters: dict = {}
        self.forward = None        # the plain forward model of the black-box methods (one session, any size)
        self.on_masks = None       # on_masks(done, total): the masked forwards of the current image
        self.failures: list[str] = []
        from ..graph.canonicalize import first_input_name
        from ..methods import is_black_box

        self.input_name = first_input_name(model)   # the "layer" of a black-box map: the model input
        #: (method, layer) of every map of a target, in output order
        self.pairs = [(m, l) for m in opts.methods for l in ([self.input_name] if is_black_box(m) else layers)]
        recorded = getattr(store, "records", {})   # the Ray workers keep no store
        self.stems = output_stems(list(input_paths) + [Path(r["image"]) for r in recorded.values()])

    def stem(self, path) -> str:
        """What the names of an image's output files start with (see :func:`output_stems`)."""
        return self.stems.get(Path(path).resolve(), Path(path).stem)

    def exciter(self, shape):
        if shape not in self.exciters:  # one companion graph per input size, with static shapes
            from ..graph.canonicalize import first_input_name
            from ..run.runtime import Exciter

            self.exciters[shape] = Exciter(self.model, self.layers, methods=self.opts.graph_methods, rule=self.opts.rule,
                                           logits=self.opts.logits,
                                           input_shapes={first_input_name(self.model): [None, *shape]},
                                           device=self.opts.device, threads=self.threads,
                                           top1=not self.opts.targets)
            self.summary.logits_choice = self.exciters[shape].built.logits_choice
            self.summary.providers = self.exciters[shape].providers
        return self.exciters[shape]

    def forward_model(self):
        if self.forward is None:
            from .eval.perturb import ForwardModel

            self.forward = ForwardModel(self.model, self.opts.logits, self.layout, self.opts.device, self.threads)
            self.summary.providers = list(self.forward.session.get_providers())
        return self.forward

    def _nchw(self, x: np.ndarray) -> np.ndarray:
        """The batch in (N, C, H, W) order (the forward model's view of the model's layout)."""
        return x if self.layout == "NCHW" else x.transpose(0, 3, 1, 2)

    def target_sets(self, logits: np.ndarray) -> list[list[tuple]]:
        """Per sample, the list of class sets to explain (one map each)."""
        k = logits.shape[1]
        if self.opts.targets:
            chosen = parse_targets(self.opts.targets, self.class_names, k)
            sets = [tuple(chosen)] if self.opts.combine else [(t,) for t in chosen]
            return [sets] * logits.shape[0]
        if self.opts.top > k:
            raise ExciteError(f"--top {self.opts.top}: the model has only {k} classes")
        return [[(int(t),) for t in np.argsort(-row)[: self.opts.top]] for row in logits]

    def _black_box_maps(self, method: str, forward, x: np.ndarray, sets) -> list:
        """Per class set j, the (N, H, W) maps of a black-box method (RISE: every class set of an
        image from the same masked forwards)."""
        from .rise import rise_saliency

        assert method == "rise", method
        per_image = [rise_saliency(forward, xi, sets[i], self.opts.rise, on_progress=self.on_masks)
                     for i, xi in enumerate(self._nchw(x))]
        return [np.stack([m[j] for m in per_image]) for j in range(len(sets[0]))]

    def caption(self, method: str, layer: str) -> str:
        """What an overlay says of its map: the method and layer (and rule), or RISE's masks."""
        from ..methods import get_any_method, is_black_box

        if is_black_box(method):
            r = self.opts.rise
            return f"{get_any_method(method).label} · {r.masks} masks, {r.cells}x{r.cells} cells"
        return f"{get_any_method(method).label} · {layer} · {self.opts.rule} rule"

    def label(self, classes: tuple) -> str:
        from ..render.overlay import class_label

        return class_label(classes, self.class_names)

    def batch(self, items, advance=lambda n=1: None) -> None:
        """Explain one batch and store each image's record; a batch ONNX Runtime rejects is
        counted as failed (the run goes on); a file that cannot be written stops the run."""
        x = np.stack([arr for _, _, arr, _ in items])
        graph = self.opts.graph_methods
        black_box = [m for m in self.opts.methods if m not in graph]
        # a model or settings error (-l, --logits) stops the run: one line
        ex = self.exciter(x.shape[1:]) if graph else None
        forward = self.forward_model() if black_box else None
        try:
            # one run gives the logits and the first maps: the top-1 class chosen inside the graph,
            # or the first of the classes given (they do not depend on the logits)
            first = None
            if ex is not None and ex.top1:
                first = ex.explain(x, None)
            elif ex is not None and self.opts.targets and ex.built.num_classes is not None:
                k = ex.built.num_classes
                given = self.target_sets(np.zeros((len(items), k), np.float32))
                signal = np.zeros((len(items), k), np.float32)
                for i in range(len(items)):
                    signal[i, list(given[i][0])] = 1.0
                first = ex.explain(x, signal)
            if ex is None:
                logits = class_scores(forward(self._nchw(x)))
            else:
                logits = class_scores(ex.logits(x) if first is None else first.logits)
            if not np.isfinite(logits).all():
                raise ExciteError("the model's outputs are NaN or infinite for this input")
            sets = self.target_sets(logits)
            if first is not None and ex.top1 and any(sets[i][0] != (int(c),) for i, c in enumerate(first.signal.argmax(axis=1))):
                first = None   # a tie the graph broke otherwise: explain the class chosen here
            probs = _softmax(logits)
            records = [self._record(path, logits[i]) for i, (path, _, _, _) in enumerate(items)]
            explained = [] if first is None else [first]
            for j in range(len(explained), len(sets[0]) if ex is not None else 0):
                signal = np.zeros_like(logits, dtype=np.float32)
                for i in range(len(items)):
                    signal[i, list(sets[i][j])] = 1.0
                explained.append(ex.explain(x, signal))
            # results[j][(method, layer)]: the (N, h, w) maps of every image's j-th class set
            results = [{(m, l): e.maps[m][l] for m in graph for l in self.layers} for e in explained] \
                or [{} for _ in sets[0]]
            for method in black_box:
                for j, maps in enumerate(self._black_box_maps(method, forward, x, sets)):
                    results[j][method, self.input_name] = maps
        except ExciteError as exc:
            if isinstance(exc, ModelShapeError) or (self.opts.targets and "class" in str(exc)):
                raise          # a bad --target fails the same way for every image
            names = ", ".join(p.name for p, *_ in items)
            self.failures.append(f"{names}: {exc}")
            self.summary.failed += len(items)
            advance(len(items) * max(1, len(self.opts.targets) if self.opts.targets and not self.opts.combine
                                     else 1 if self.opts.targets else self.opts.top))
            return
        for i, (path, img, _, prepared) in enumerate(items):
            def job(i=i, path=path, img=img, prepared=prepared):
                try:
                    return self._write_image(i, path, img, prepared, sets[i], results, probs[i], records[i])
                except OSError as exc:
                    raise ExciteError(f"cannot write the outputs of {path.name} to {self.opts.out_dir}: "
                                      f"{exc.strerror or type(exc).__name__}") from None

            def done(counts, record=records[i]):   # in the calling thread, once every file is written
                files, steps = counts
                self.summary.written += files
                advance(steps)
                self.store.put(record)
                self.summary.records.append(record)
                if self.on_record is not None:
                    self.on_record(record, False)

            self.writes.submit(job, done)

    def _record(self, path, logits_row) -> dict:
        return {"image": str(path), "model": self.opts.model, "rule": self.opts.rule, "layers": self.layers,
                "methods": list(self.opts.methods), "top5": _topk(logits_row, self.class_names, 5),
                "settings": self.settings, "outputs": []}

    def _write_image(self, i, path, img, prepared, sets, results, probs, record) -> tuple:
        """Render and write the files ``--outputs`` asks for of one image, listing them in
        ``record``; (files written, progress steps). Touches nothing shared: it may run on a
        writer thread. Without overlay, panel and image-npy no image-space map is computed
        (and the record has no ``vmax``, the overlays' colour scale)."""
        from ..io.half import to_float16
        from ..render.postprocess import image_space_map
        from ..render.overlay import bar_label, class_head, labelled_overlay, map_caption, map_max, panel_grid, save_image

        outputs, out_dir, suffix = self.outputs, self.opts.out_dir, self.suffix
        image_space = _writes_images(outputs) or "image-npy" in outputs
        images, files = {}, 0
        if image_space:
            # image-space maps: clipped at 0 (bicubic overshoot), at display resolution unless full_res
            for j in range(len(sets)):
                for method, layer in self.pairs:
                    images[j, method, layer] = image_space_map(results[j][method, layer][i], prepared, method,
                                                               self.opts.full_res, self.opts.blur, img.size)
        vmax = {}
        for key, up in images.items():
            group = (key[1], key[2]) if self.opts.scale == "shared" else key
            vmax[group] = max(vmax.get(group, 0.0), map_max(up))
        shared = self.opts.scale == "shared" and len(sets) > 1
        all_tiles = []
        for j, classes in enumerate(sets):
            tag = "+".join(str(c) for c in classes)
            prob = float(sum(probs[c] for c in classes))
            head = class_head(self.label(classes), prob)
            tiles, first = [], len(record["outputs"])
            for method, layer in self.pairs:
                m = results[j][method, layer][i]
                stem = f"{self.stem(path)}.{tag}.{method}.{safe_name(layer)}"
                written = {}
                if "npy" in outputs:
                    written["map"] = out_dir / f"{stem}.npy"
                if "image-npy" in outputs:
                    written["map_image"] = out_dir / f"{stem}.image.npy"
                if "overlay" in outputs:
                    written["overlay"] = out_dir / f"{stem}{suffix}"
                self._check_not_input(written.values())
                if "map" in written:
                    np.save(written["map"], m)
                entry = {"targets": list(classes), "label": self.label(classes), "prob": prob,
                         "method": method, "layer": layer}
                if image_space:
                    up = images[j, method, layer]
                    v = vmax[(method, layer) if self.opts.scale == "shared" else (j, method, layer)]
                    entry["vmax"] = v
                    label = bar_label(method, shared)
                    if "map_image" in written:
                        np.save(written["map_image"], to_float16(up))
                    if "overlay" in written:
                        caption = [head, self.caption(method, layer)]
                        save_image(labelled_overlay(img, up, caption, self.style, v, label), written["overlay"],
                                   self.format)
                    tiles.append((map_caption("", method, layer), up, v, label))
                    all_tiles.append((map_caption(head, method, layer), up, v, label))
                files += len(written)
                record["outputs"].append({**entry, **{k: str(p) for k, p in written.items()}})
            if "panel" in outputs:
                panel_path = out_dir / f"{self.stem(path)}.{tag}.panel{suffix}"
                self._check_not_input([panel_path])
                title = [f"{path.name}: {head}  ({self.opts.rule} rule)"]
                save_image(panel_grid(img, tiles, self.style, title), panel_path, self.format)
                files += 1
                for out in record["outputs"][first:]:
                    out["panel"] = str(panel_path)
        if len(sets) > 1 and "panel" in outputs:   # every class of the image side by side, one row per class
            top_path = out_dir / f"{self.stem(path)}.classes.panel{suffix}"
            self._check_not_input([top_path])
            title = [f"{path.name}: {len(sets)} classes, "
                     + ("one colour scale per method and layer" if self.opts.scale == "shared" else "each map by its own maximum")
                     + f"  ({self.opts.rule} rule)"]
            per_row = len(self.pairs)
            save_image(panel_grid(img, all_tiles, self.style, title, columns=per_row, show_image=False), top_path,
                       self.format)
            files += 1
            for out in record["outputs"]:
                out["classes_panel"] = str(top_path)
        return files, len(sets)

    def _check_not_input(self, paths) -> None:
        if any(Path(p).resolve() in self.input_paths for p in paths):
            raise ExciteError(f"an output would overwrite an input image ({Path(next(iter(paths))).name}); choose another -o")


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sample_images() -> list[Path]:
    """The photos bundled with the package (see onnx_excite/data/samples/README.md)."""
    from importlib import resources

    folder = resources.files("onnx_excite").joinpath("data", "samples")
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".jpg"))


def run_demo(out_dir: Path, console=None, errors=None) -> tuple[ExplainSummary, Path]:
    """MWP and c-MWP overlays of the top-1 class on the default model for the bundled photos,
    plus ``summary.json`` (top-5 classes with probabilities, output paths)."""
    opts = ExplainOptions(model="default", methods=DEFAULT_METHODS, top=1, out_dir=Path(out_dir))
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
