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
    """What a record depends on: a re-run with the same settings skips finished images."""
    return {"model": str(opts.model), "layers": list(layers), "methods": list(opts.methods), "rule": opts.rule,
            "targets": [str(t) for t in opts.targets] or None, "top": None if opts.targets else opts.top,
            "combine": bool(opts.combine), "resize": resize, "size": list(size) if isinstance(size, tuple) else size,
            "mean": list(mean), "std": list(std), "scale": opts.scale, "alpha": float(opts.alpha), "cmap": opts.cmap,
            "colorbar": bool(opts.colorbar), "full_res": bool(opts.full_res), "blur": bool(opts.blur)}


def _model_header(path):
    """The model's graph without its external weights (inputs, outputs, shapes)."""
    import onnx

    from ..graph.canonicalize import load_model

    if isinstance(path, onnx.ModelProto):
        return path
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:
        return load_model(path)   # raises the one-line error for unreadable files


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
    from ..methods import METHODS, get_method

    if not opts.methods:
        raise ExciteError(f"no method given; choose from {', '.join(METHODS)}")
    for m in opts.methods:
        get_method(m)
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

    def preprocess(self, img):
        """(model input array, Prepared geometry) of one decoded image."""
        from ..io.images import preprocess

        return preprocess(img, size=self.size, resize=self.resize, crop=None, mean=self.mean, std=self.std,
                          scale=self.scale, channel_order=self.profile.channel_order, layout=self.layout)

    @property
    def input_size(self):
        """(width, height) fed to the model when every image gets the same, else None."""
        return tuple(self.size) if self.resize == "exact" else None


def explain_setup(opts: ExplainOptions, warn=None) -> ExplainSetup:
    """Check the options and resolve the model, its input size, layers and preprocessing
    (before any image is read or any file written). ``warn(message)`` receives warnings."""
    from ..io.checks import float_list
    from ..run.devices import providers_for
    from ..io.modelinput import declared_input, num_classes

    providers_for(opts.device)   # --device cuda without CUDA: fail before any work
    style = _validate(opts)
    warn = warn or (lambda message: None)
    resolved = resolve_model(opts.model)   # a path: the model as it is
    model, profile = resolved.model, resolved.profile
    header = _model_header(model)
    declared = declared_input(header)
    fixed = declared.fixed_size
    if fixed and opts.size is not None:   # --size on a fixed-size model: its head made fully convolutional
        resolved = resolve_model(opts.model, fully_conv=True)
        model, profile = resolved.model, resolved.profile
    if fixed and opts.size is None:
        resize, size = "exact", fixed    # the size the model was made for
    elif fixed:
        if profile.resize == "square":   # the head could not be made fully convolutional
            raise ExciteError(f"the model's input is fixed at {fixed[1]}x{fixed[0]} and its head cannot be made "
                              f"fully convolutional: drop --size")
        warn(f"the model declares a fixed {fixed[1]}x{fixed[0]} input; --size {opts.size} runs it at a size "
             f"it was not trained for (its dense head made fully convolutional)")
        resize, size = "shorter", int(opts.size)
    else:
        # maps must cover the whole image: no crop; the shorter side at 224 (any aspect ratio)
        resize, size = ("shorter", int(opts.size or 224)) if profile.resize == "shorter" else ("square", int(opts.size or profile.input_size))
    layers = opts.layers or list(profile.default_layers)
    notes = []
    if not opts.layers and layers and resolved.layers_chosen_by_graph:
        notes.append(f"no --layer given: maps at {layers[0]!r}, the layer the graph suggests (the last feature "
                     f"map before the head; `onnx-excite layers MODEL` marks it)")
    if not layers:
        raise ExciteError("no layer given and the model has no profile default: pass --layer (see `onnx-excite layers MODEL`)")
    channels = len(profile.mean)
    if declared.channels not in (None, channels) and profile.name == "auto":
        raise ExciteError(f"the model's input {declared.name!r} has {declared.channels} channels: images are fed as "
                          f"1 (grey) or 3 (RGB) channels")
    if declared.integer:
        if opts.mean is not None or opts.std is not None:
            raise ExciteError(f"the model takes {declared.dtype.name} pixels and normalises them itself: "
                              f"--mean/--std do not apply")
        mean, std, scale = (0.0,) * channels, (1.0,) * channels, 1.0
    else:
        mean = float_list(opts.mean, "--mean", length=channels, default=profile.mean)
        std = float_list(opts.std, "--std", length=channels, positive=True, default=profile.std)
        scale = profile.scale
        if profile.name == "auto" and (opts.mean is None or opts.std is None):
            origin = ("ImageNet's" if channels == 3 else
                      "one grey channel, photos converted to grey: ImageNet's weighted as L = 0.299 R + 0.587 G + 0.114 B")
            notes.append(f"the model has no profile: pixels are scaled by {scale:g} and normalised with mean "
                         f"{','.join(f'{v:g}' for v in mean)} and std {','.join(f'{v:g}' for v in std)} ({origin} "
                         f"unless given; --mean/--std set them), {profile.layout}, {resize} resize to {size}")
    class_names = profile.load_class_names() if profile.class_names else None
    k = len(class_names) if class_names else num_classes(header)
    per_image = len(opts.targets) if opts.targets and not opts.combine else (1 if opts.targets else opts.top)
    if not opts.targets and k is not None and opts.top > k:
        raise ExciteError(f"--top {opts.top}: the model has only {k} classes")
    return ExplainSetup(model, profile, layers, class_names, tuple(mean), tuple(std), scale, resize, size,
                        declared.layout, style, per_image, _settings(opts, layers, resize, size, mean, std), tuple(notes))


def warn_if_large(n_files: int, setup: ExplainSetup, opts: ExplainOptions, warn) -> None:
    """Warn before a job that writes very many files."""
    maps_total = n_files * setup.per_image * len(opts.methods) * len(setup.layers)
    if warn is not None and (setup.per_image > 10 or maps_total > 2000):
        warn(f"{n_files} image(s) x {setup.per_image} classes x {len(opts.methods)} method(s) x {len(setup.layers)} "
             f"layer(s): {maps_total} maps, each with its .npy files and overlay, plus {n_files * setup.per_image} panels")


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
    from ..io.checks import output_dir
    from ..io.images import load_image
    from ..io.records import FolderLock, RecordStore, output_paths

    setup = explain_setup(opts, warn)
    files = expand_inputs(inputs)
    if not files:
        raise ExciteError("no input images found")
    warn_if_large(len(files), setup, opts, warn)
    per_image, settings = setup.per_image, setup.settings
    out_dir = output_dir(opts.out_dir)
    opts = dataclasses.replace(opts, out_dir=out_dir)
    store = RecordStore(out_dir)
    written = {p.resolve() for r in store.records.values() for p in output_paths(r)}
    files = [f for f in files if f.resolve() not in written]   # -o may be the input folder
    if not files:
        raise ExciteError("no input images found (besides the outputs of earlier runs)")
    if store.skipped and warn is not None:
        warn(f"{store.path}: {len(store.skipped)} line(s) are no records and are dropped ({store.skipped[0]})")
    workers = opts.workers or default_workers()

    def decode(path):
        img = load_image(path)
        return (img, *setup.preprocess(img))

    pending: list = []
    with FolderLock(out_dir), _progress(console, len(files) * per_image, per_image) as advance, \
            _Writes(workers, 2 * workers) as writes, _Ahead(decode, 1 if workers > 1 else 0, opts.batch_size) as ahead:
        run = _Run(setup.model, setup.layers, opts, setup.class_names, {p.resolve() for p in files}, setup.style, store,
                   settings, on_record, writes=writes)
        run.summary.input_size = setup.input_size
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
    if run.summary.records:
        run.summary.written += 1   # explanations.jsonl
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
    """A rich progress bar (one step per image and class) for more than a few steps; a no-op otherwise."""

    def __init__(self, console, total: int, per_image: int = 1):
        self.bar = None
        if console is not None and total > 3:
            from rich.progress import Progress

            self.bar = Progress(console=console, transient=True)
            self.task = self.bar.add_task("explaining" if per_image == 1 else f"explaining ({per_image} classes per image)",
                                          total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return lambda n=1: self.bar.advance(self.task, n) if self.bar is not None else None

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


class _Run:
    """One explain job: an Exciter per input size, outputs per image, target and method."""

    def __init__(self, model, layers, opts: ExplainOptions, class_names, input_paths, style, store, settings,
                 on_record=None, threads=None, writes=None):
        self.model, self.layers, self.opts, self.threads = model, layers, opts, threads
        self.writes = writes if writes is not None else _Writes(1, 1)   # a _Writes: where the files are written
        self.class_names, self.input_paths = class_names, input_paths
        self.style, self.store, self.settings, self.on_record = style, store, settings, on_record
        self.summary = ExplainSummary()
        self.exciters: dict = {}
        self.failures: list[str] = []
        recorded = getattr(store, "records", {})   # the Ray workers keep no store
        self.stems = output_stems(list(input_paths) + [Path(r["image"]) for r in recorded.values()])

    def stem(self, path) -> str:
        """What the names of an image's output files start with (see :func:`output_stems`)."""
        return self.stems.get(Path(path).resolve(), Path(path).stem)

    def exciter(self, shape):
        if shape not in self.exciters:  # one companion graph per input size, with static shapes
            from ..graph.canonicalize import first_input_name
            from ..run.runtime import Exciter

            self.exciters[shape] = Exciter(self.model, self.layers, methods=self.opts.methods, rule=self.opts.rule,
                                           logits=self.opts.logits,
                                           input_shapes={first_input_name(self.model): [None, *shape]},
                                           device=self.opts.device, threads=self.threads,
                                           top1=not self.opts.targets)
            self.summary.logits_choice = self.exciters[shape].built.logits_choice
            self.summary.providers = self.exciters[shape].providers
        return self.exciters[shape]

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

    def label(self, classes: tuple) -> str:
        names = [self.class_names[c].split(",")[0] if self.class_names else str(c) for c in classes]
        return " + ".join(names)

    def batch(self, items, advance=lambda n=1: None) -> None:
        """Explain one batch and store each image's record; a batch ONNX Runtime rejects is
        counted as failed (the run goes on); a file that cannot be written stops the run."""
        x = np.stack([arr for _, _, arr, _ in items])
        ex = self.exciter(x.shape[1:])   # a model or settings error (-l, --logits) stops the run: one line
        try:
            # one run gives the logits and the first maps: the top-1 class chosen inside the graph,
            # or the first of the classes given (they do not depend on the logits)
            first, k = None, ex.built.num_classes
            if ex.top1:
                first = ex.explain(x, None)
            elif self.opts.targets and k is not None:
                given = self.target_sets(np.zeros((len(items), k), np.float32))
                signal = np.zeros((len(items), k), np.float32)
                for i in range(len(items)):
                    signal[i, list(given[i][0])] = 1.0
                first = ex.explain(x, signal)
            logits = class_scores(ex.logits(x) if first is None else first.logits)
            if not np.isfinite(logits).all():
                raise ExciteError("the model's outputs are NaN or infinite for this input")
            sets = self.target_sets(logits)
            if ex.top1 and any(sets[i][0] != (int(c),) for i, c in enumerate(first.signal.argmax(axis=1))):
                first = None   # a tie the graph broke otherwise: explain the class chosen here
            probs = _softmax(logits)
            records = [self._record(path, logits[i]) for i, (path, _, _, _) in enumerate(items)]
            results = [] if first is None else [first]
            for j in range(len(results), len(sets[0])):
                signal = np.zeros_like(logits, dtype=np.float32)
                for i in range(len(items)):
                    signal[i, list(sets[i][j])] = 1.0
                results.append(ex.explain(x, signal))
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
        """Render and write one image's files, listing them in ``record``; (files written,
        progress steps). Touches nothing shared: it may run on a writer thread."""
        from ..io.half import to_float16
        from ..render import maps
        from ..methods import get_method
        from ..render.postprocess import blur_sigma, gaussian_blur
        from ..render.overlay import display_size, labelled_overlay, map_max, panel_grid, save_png

        # image-space maps: clipped at 0 (bicubic overshoot), at display resolution unless full_res
        store_size = img.size if self.opts.full_res else display_size(img.size, min_side=1)
        store_info = dataclasses.replace(prepared, original_size=store_size) if store_size != img.size else prepared
        images, files = {}, 0
        for j in range(len(sets)):
            for method in self.opts.methods:
                for layer in self.layers:
                    up = maps.to_image_space(results[j].maps[method][layer][i], store_info)
                    if self.opts.blur and get_method(method).blur:  # the paper's blur, sigma = 0.02 max(W, H)
                        up = gaussian_blur(up, blur_sigma(up.shape[1], up.shape[0])).astype(np.float32)
                    images[j, method, layer] = np.maximum(up, 0)
        vmax = {}
        for key, up in images.items():
            group = (key[1], key[2]) if self.opts.scale == "shared" else key
            vmax[group] = max(vmax.get(group, 0.0), map_max(up))
        bar_label = "excitation (shared scale)" if self.opts.scale == "shared" and len(sets) > 1 else "excitation"
        all_tiles = []
        for j, classes in enumerate(sets):
            tag = "+".join(str(c) for c in classes)
            prob = float(sum(probs[c] for c in classes))
            head = f"{self.label(classes)}  p={prob:.2f}"
            tiles = []
            for method in self.opts.methods:
                for layer in self.layers:
                    m = results[j].maps[method][layer][i]
                    up = images[j, method, layer]
                    v = vmax[(method, layer) if self.opts.scale == "shared" else (j, method, layer)]
                    stem = f"{self.stem(path)}.{tag}.{method}.{safe_name(layer)}"
                    written = {"map": self.opts.out_dir / f"{stem}.npy",
                               "map_image": self.opts.out_dir / f"{stem}.image.npy",
                               "overlay": self.opts.out_dir / f"{stem}.png"}
                    self._check_not_input(written.values())
                    caption = [head, f"{get_method(method).label} · {layer} · {self.opts.rule} rule"]
                    np.save(written["map"], m)
                    np.save(written["map_image"], to_float16(up))
                    save_png(labelled_overlay(img, up, caption, self.style, v, bar_label), written["overlay"])
                    files += len(written)
                    tiles.append(([f"{get_method(method).label} · {layer}"], up, v))
                    all_tiles.append(([head, f"{get_method(method).label} · {layer}"], up, v))
                    record["outputs"].append({"targets": list(classes), "label": self.label(classes),
                                              "prob": prob, "method": method, "layer": layer, "vmax": v,
                                              **{k: str(p) for k, p in written.items()}})
            panel_path = self.opts.out_dir / f"{self.stem(path)}.{tag}.panel.png"
            self._check_not_input([panel_path])
            title = [f"{path.name}: {head}  ({self.opts.rule} rule)"]
            save_png(panel_grid(img, tiles, self.style, title, bar_label=bar_label), panel_path)
            files += 1
            for out in record["outputs"][-len(tiles):]:
                out["panel"] = str(panel_path)
        if len(sets) > 1:   # every class of the image side by side, one row per class
            top_path = self.opts.out_dir / f"{self.stem(path)}.classes.panel.png"
            self._check_not_input([top_path])
            title = [f"{path.name}: {len(sets)} classes, "
                     + ("one colour scale per method and layer" if self.opts.scale == "shared" else "each map by its own maximum")
                     + f"  ({self.opts.rule} rule)"]
            per_row = len(self.opts.methods) * len(self.layers)
            save_png(panel_grid(img, all_tiles, self.style, title, columns=per_row, bar_label=bar_label,
                                show_image=False), top_path)
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
