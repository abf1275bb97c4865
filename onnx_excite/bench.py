"""Benchmark: forward alone vs forward + MWP vs forward + c-MWP, and forward + any registered
method (``methods=``): median ms, ratios to the forward and to forward + MWP."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .builder import build_excitation_model
from .canonicalize import canonicalize
from .runtime import make_session


@dataclass
class BenchRow:
    name: str
    median_ms: float
    ratio: float
    vs_mwp: float | None = None   # median / median of forward+MWP


def _input_array(shape, batch: int, rng, ort_type: str = "tensor(float)") -> np.ndarray:
    """Random input of the declared type: dynamic dims at 224; integer inputs (uint8 pixels) uniform 0..255."""
    from .runtime import as_input_dtype

    dims = [batch if i == 0 else (d if isinstance(d, int) and d > 0 else 224) for i, d in enumerate(shape)]
    if "int" in ort_type:
        return as_input_dtype(rng.integers(0, 256, size=dims), ort_type)
    return as_input_dtype(rng.standard_normal(dims), ort_type)


def run_bench(model, layers: Sequence[str], rule: str = "positive", batch: int = 1, runs: int = 10, warmup: int = 2,
              providers=None, threads: int | None = None, input_shapes=None, seed: int = 0,
              progress=None, on_inputs=None, logits: str | None = None,
              methods: Sequence[str] = ()) -> tuple[list[BenchRow], list[str]]:
    """Median wall time of each variant over ``runs`` rounds; ratios are to the forward alone.

    The variants run interleaved, one run each per round, so that load from elsewhere
    on the machine falls on all of them alike. ``on_inputs({name: shape})`` is told the
    input shapes used (dynamic dims at 224); ``progress(phase, done, total)`` is called as
    the variants are built and the rounds run. ``methods``: one more variant
    ``forward+<method>`` each (any name of :data:`onnx_excite.methods.METHODS`).
    """
    from .methods import get_method

    extra = [get_method(m).name for m in dict.fromkeys(methods)]
    from .checks import at_least

    at_least(runs, 1, "--runs")
    at_least(batch, 1, "--batch")
    at_least(warmup, 0, "warmup")
    progress = progress or (lambda phase, done, total: None)
    rng = np.random.default_rng(seed)
    forward = canonicalize(model, logits=logits, input_shapes=input_shapes)
    fwd_session = make_session(forward.forward_model(), providers, threads)
    feeds = {i.name: _input_array(i.shape, batch, rng, i.type) for i in fwd_session.get_inputs()}
    if on_inputs is not None:
        on_inputs({name: tuple(v.shape) for name, v in feeds.items()})
    variants = [("forward", None), ("forward+MWP", ("mwp",)), ("forward+c-MWP", ("cmwp",)),
                ("forward+MWP+c-MWP", ("mwp", "cmwp"))] + [(f"forward+{m}", (m,)) for m in extra]
    prepared = []
    for n, (name, methods) in enumerate(variants):
        progress("building", n, len(variants))
        if methods is None:
            prepared.append((name, fwd_session, [forward.entry], feeds))
            continue
        built = build_excitation_model(model, layers, methods=methods, rule=rule, logits=logits, input_shapes=input_shapes)
        session = make_session(built.model, providers, threads)
        k = built.num_classes or session.get_inputs()[-1].shape[1]
        signal = np.zeros((batch, k), np.float32)
        signal[:, 0] = 1.0
        prepared.append((name, session, [built.logits] + list(built.maps.values()), dict(feeds, **{built.signal: signal})))
    for _ in range(warmup):
        for _, session, outputs, run_feeds in prepared:
            session.run(outputs, run_feeds)
    times = {name: [] for name, *_ in prepared}
    for r in range(runs):
        progress("timing", r, runs)
        for name, session, outputs, run_feeds in prepared:
            t0 = time.perf_counter()
            session.run(outputs, run_feeds)
            times[name].append((time.perf_counter() - t0) * 1e3)
    progress("timing", runs, runs)
    base = float(np.median(times["forward"]))
    mwp = float(np.median(times["forward+MWP"]))
    rows = [BenchRow(name, float(np.median(times[name])), float(np.median(times[name])) / base,
                     float(np.median(times[name])) / mwp) for name, *_ in prepared]
    return rows, fwd_session.get_providers()
