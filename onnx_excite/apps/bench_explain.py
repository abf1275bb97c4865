"""Benchmark of `explain` over a folder against the companion graph's own speed.

* **explain folder**: :func:`~onnx_excite.apps.explain.explain_files` end to end (model load,
  decoding, the runs, the files ``outputs`` chooses, in ``format``) into a fresh temporary
  folder, once per ``workers`` setting, ``outputs`` choice and ``format`` (a format only
  with outputs that hold overlays or panels) and round;
* **graph**: :meth:`~onnx_excite.run.runtime.Exciter.explain` alone on the same images,
  decoded and preprocessed beforehand, in the batches `explain` forms (consecutive images of
  one input size, at most ``batch_size``), with the runs `explain` makes per batch (one per
  class explained; the top-1 class chosen in the graph), after one untimed batch;

rounds interleaved (graph, then each folder setting) so load from elsewhere falls on all of
them alike; medians of images/s, and the ratio folder / graph.
"""
from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ExciteError


@dataclass
class ExplainBenchRow:
    name: str
    workers: int | None            # None: the graph alone
    outputs: tuple = ()            # explain's --outputs (the files written)
    format: str = "png"            # explain's --format
    seconds: list = field(default_factory=list)   # per round
    images: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / statistics.median(self.seconds)


@dataclass
class ExplainBenchReport:
    images: int
    batch_size: int
    runs_per_batch: int            # Exciter.explain calls per batch (classes explained per image)
    rows: list                     # ExplainBenchRow: the graph first, then each folder setting
    providers: list = field(default_factory=list)
    input_sizes: list = field(default_factory=list)   # the distinct model input shapes

    @property
    def graph(self) -> ExplainBenchRow:
        return self.rows[0]

    def ratio(self, row: ExplainBenchRow) -> float:
        """Images/s of ``row`` over the graph's own."""
        return row.images_per_s / self.graph.images_per_s


def _batches(arrays: Sequence[np.ndarray], batch_size: int) -> list:
    """Consecutive arrays of one shape, at most ``batch_size`` a batch (as `explain` batches)."""
    out, pending = [], []
    for a in arrays:
        if pending and (len(pending) == batch_size or pending[0].shape != a.shape):
            out.append(np.stack(pending))
            pending = []
        pending.append(a)
    if pending:
        out.append(np.stack(pending))
    return out


def _variants(workers, outputs, formats) -> list:
    """(workers, outputs, format) rows: every combination, a format only once for outputs
    without overlays or panels (it changes nothing there)."""
    from ..render.overlay import image_format
    from .explain import DEFAULT_OUTPUTS, _writes_images, parse_outputs

    chosen = list(dict.fromkeys(parse_outputs(o) for o in (outputs or [DEFAULT_OUTPUTS])))
    fmts = list(dict.fromkeys(image_format(f) for f in (formats or ["png"])))
    rows = []
    for w in workers:
        for o in chosen:
            for f in (fmts if _writes_images(o) else fmts[:1]):
                rows.append((w, o, f))
    return rows


def _row_name(workers, outputs, fmt) -> str:
    from .explain import DEFAULT_OUTPUTS, _writes_images

    name = f"workers {workers}"
    if outputs != DEFAULT_OUTPUTS:
        name += f", outputs {','.join(outputs)}"
    if fmt != "png" and _writes_images(outputs):
        name += f", {fmt}"
    return name


def run_explain_bench(inputs, opts, workers: Sequence[int] = (1,), rounds: int = 3,
                      progress=None, outputs: Sequence = (), formats: Sequence[str] = ()) -> ExplainBenchReport:
    """Time `explain` over ``inputs`` with ``opts`` (its ``out_dir``, ``workers``, ``outputs`` and
    ``format`` are replaced: each run writes into a fresh temporary folder) for each
    ``workers`` setting, ``outputs`` choice (default: explain's) and format (default png)
    against the graph alone; ``progress(done, total)`` after each timed run."""
    from ..graph.canonicalize import first_input_name
    from ..io.checks import at_least
    from ..io.images import load_image
    from ..run.runtime import Exciter
    from .explain import explain_files, explain_setup, expand_inputs, parse_targets

    at_least(rounds, 1, "--rounds")
    for w in workers:
        at_least(w, 1, "--workers")
    if opts.graph_methods != tuple(opts.methods):
        raise ExciteError("bench-explain times the companion graph: black-box methods (rise) have none; "
                          "time `explain -m rise` itself")
    variants = _variants(workers, outputs, formats)
    setup = explain_setup(opts)
    files = expand_inputs(inputs)
    arrays = []
    for path in files:
        try:
            arrays.append(setup.preprocess(load_image(path))[0])
        except ExciteError:
            continue   # explain counts it as failed and goes on; the graph has nothing to run
    if not arrays:
        raise ExciteError("no readable input images found")
    batches = _batches(arrays, opts.batch_size)
    exciters: dict = {}
    top1 = not opts.targets
    per_image = setup.per_image

    def exciter(shape):
        if shape not in exciters:
            exciters[shape] = Exciter(setup.model, setup.layers, methods=opts.methods, rule=opts.rule,
                                      logits=opts.logits, input_shapes={first_input_name(setup.model): [None, *shape]},
                                      device=opts.device, top1=top1)
        return exciters[shape]

    def graph_round():
        start = time.perf_counter()
        for x in batches:
            ex = exciter(x.shape[1:])
            if top1 and ex.top1:
                first = ex.explain(x, None)
                order = np.argsort(-first.logits.reshape(len(x), -1), axis=1)
                for j in range(1, per_image):
                    ex.explain(x, order[:, j])
            elif top1:   # logits the graph cannot choose from: a forward first, as explain does
                order = np.argsort(-ex.logits(x).reshape(len(x), -1), axis=1)
                for j in range(per_image):
                    ex.explain(x, order[:, j])
            else:   # the given classes, one run each (one multi-hot run with combine)
                k = ex.num_classes
                chosen = parse_targets(opts.targets, setup.class_names, k)
                for classes in ([chosen] if opts.combine else [[c] for c in chosen]):
                    signal = np.zeros((len(x), k), np.float32)
                    signal[:, classes] = 1.0
                    ex.explain(x, signal)
        return time.perf_counter() - start

    for shape, x in {x.shape[1:]: x for x in batches}.items():   # untimed: each input size's session, a first run
        ex = exciter(shape)
        ex.explain(x, None if ex.top1 else 0)
    rows = [ExplainBenchRow("graph (Exciter.explain)", None, images=len(arrays))]
    rows += [ExplainBenchRow(f"explain folder, {_row_name(w, o, f)}", w, o, f, images=len(arrays)) for w, o, f in variants]
    total, done = rounds * len(rows), 0
    for _ in range(rounds):
        for row in rows:
            if row.workers is None:
                row.seconds.append(graph_round())
            else:
                folder = Path(tempfile.mkdtemp(prefix="onnx-excite-bench-"))
                try:
                    start = time.perf_counter()
                    summary = explain_files(inputs, dataclasses.replace(opts, out_dir=folder, workers=row.workers,
                                                                        outputs=row.outputs, format=row.format))
                    row.seconds.append(time.perf_counter() - start)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
                if len(summary.records) != len(arrays):
                    raise ExciteError(f"explain explained {len(summary.records)} of {len(arrays)} images")
            done += 1
            if progress is not None:
                progress(done, total)
    first = next(iter(exciters.values()))
    return ExplainBenchReport(images=len(arrays), batch_size=opts.batch_size, runs_per_batch=per_image, rows=rows,
                              providers=first.providers, input_sizes=sorted({tuple(x.shape[1:]) for x in batches}))
