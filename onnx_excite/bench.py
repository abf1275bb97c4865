"""Benchmark: forward alone vs forward + MWP vs forward + c-MWP, and forward + any registered
method (``methods=``): median ms, ratios to the forward and to forward + MWP,
beside the floor the FLOP count sets, the build time and peak memory of each variant,
and the ORT session options used.

* ratio = median time of a variant / median time of the forward alone, variants run
  interleaved round by round so load from elsewhere falls on all of them alike;
* floor = 1 + 2 f, f = share of the forward FLOPs above the map layer (:mod:`.flops`);
* memory = peak RSS of a fresh process that loads the model and builds the variant's
  session (build + session creation), so each variant's peak is its own
  (:func:`measure_build`);
* profile = share of ORT's node time per op type in the forward + MWP session.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .builder import build_excitation_model
from .canonicalize import canonicalize
from .flops import FlopCount, count_flops
from .runtime import describe_session_options, make_session, session_options

#: (variant name, methods; None = the forward alone)
VARIANTS = (("forward", None), ("forward+MWP", ("mwp",)), ("forward+c-MWP", ("cmwp",)),
            ("forward+MWP+c-MWP", ("mwp", "cmwp")))


@dataclass
class BenchRow:
    name: str
    median_ms: float
    ratio: float
    vs_mwp: float | None = None   # median / median of forward+MWP


@dataclass
class BuildCost:
    """One variant built in a fresh process: seconds to build the companion model (0 for
    the forward: canonicalisation only), to create the session, and the process's peak RSS."""

    name: str
    build_s: float
    session_s: float
    peak_rss_mb: float
    loaded_rss_mb: float   # RSS once the model is loaded, before the build


@dataclass
class BenchReport:
    rows: list[BenchRow]
    providers: list[str]
    inputs: dict[str, tuple]
    flops: FlopCount | None = None
    options: dict[str, object] = field(default_factory=dict)
    builds: list[BuildCost] = field(default_factory=list)
    profile: dict[str, float] = field(default_factory=dict)   # op type -> share of node time (forward+MWP)
    peers: object | None = None   # bench_torch.PeerReport: TorchRay / zennit on the same weights (``peers=``)

    @property
    def floor(self) -> float | None:
        return None if self.flops is None else self.flops.floor


def _input_array(shape, batch: int, rng, ort_type: str = "tensor(float)") -> np.ndarray:
    """Random input of the declared type: dynamic dims at 224; integer inputs (uint8 pixels) uniform 0..255."""
    from .runtime import as_input_dtype

    if shape and isinstance(shape[0], int) and shape[0] > 0 and shape[0] != batch:
        from .errors import ExciteError

        raise ExciteError(f"--batch {batch}, but the model's batch dimension is fixed at {shape[0]}")
    dims = [batch if i == 0 else (d if isinstance(d, int) and d > 0 else 224) for i, d in enumerate(shape)]
    if "int" in ort_type:
        return as_input_dtype(rng.integers(0, 256, size=dims), ort_type)
    return as_input_dtype(rng.standard_normal(dims), ort_type)


def load_source(model):
    """A recipe name (``models.synthetic.RECIPES``) becomes its ModelProto; anything else is
    passed on (path, ``default``, ModelProto)."""
    from onnx_excite.models.synthetic import RECIPES

    if isinstance(model, str) and model in RECIPES:
        return RECIPES[model]()
    return model


def profile_shares(session_model, feeds: Mapping[str, np.ndarray], outputs: Sequence[str], options, providers=None,
                   runs: int = 3) -> dict[str, float]:
    """Share of ORT's node time per op type over ``runs`` runs (ORT's profiler, one warm-up)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onnx-excite-prof-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "prof")
        session = make_session(session_model, providers, options=options)
        session.run(list(outputs), dict(feeds))
        for _ in range(runs):
            session.run(list(outputs), dict(feeds))
        path = session.end_profiling()
        with open(path) as fh:
            events = json.load(fh)
    times: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            times[ev.get("args", {}).get("op_name", "?")] += ev.get("dur", 0)
    total = sum(times.values()) or 1.0
    return dict(sorted(((k, v / total) for k, v in times.items()), key=lambda kv: -kv[1]))


def run_bench_report(model, layers: Sequence[str], rule: str = "positive", batch: int = 1, runs: int = 10,
                     warmup: int = 2, providers=None, threads: int | None = None, input_shapes=None, seed: int = 0,
                     progress=None, on_inputs=None, logits: str | None = None, spinning: bool = False,
                     opt_level: str = "all", memory: bool = False, profile: bool = False,
                     variants: Sequence[tuple] = VARIANTS, methods: Sequence[str] = (),
                     peers: Sequence[str] = ()) -> BenchReport:
    """Median wall time of each variant over ``runs`` rounds; ratios are to the forward alone.

    The variants run interleaved, one run each per round, so that load from elsewhere
    on the machine falls on all of them alike. ``on_inputs({name: shape})`` is told the
    input shapes used (dynamic dims at 224); ``progress(phase, done, total)`` is called as
    the variants are built and the rounds run. ``spinning=False`` (default) turns ORT's
    busy-waiting worker threads off; ``memory=True`` also builds each variant in a fresh
    process (:func:`measure_build`; ``model`` must then be a path, ``default`` or a recipe
    name); ``profile=True`` adds ORT's node-time shares of the forward + MWP session.
    ``methods``: one more variant ``forward+<method>`` each (any name of
    :data:`onnx_excite.methods.METHODS`). ``peers`` (``"torchray"``, ``"zennit"``): the same
    weights in PyTorch, their excitation backprop at ``layers[0]`` timed against their own
    forward after ours (:mod:`.bench_torch`); ``threads`` then defaults to torch's count
    and is given to both.
    """
    from .methods import get_method

    extra = [get_method(m).name for m in dict.fromkeys(methods)]
    from .checks import at_least

    at_least(runs, 1, "--runs")
    at_least(batch, 1, "--batch")
    at_least(warmup, 0, "warmup")
    progress = progress or (lambda phase, done, total: None)
    if peers:
        from . import bench_torch

        bench_torch.require(peers)
        threads = threads or bench_torch.default_threads()   # the same count for ORT and torch
    rng = np.random.default_rng(seed)
    source = load_source(model)
    options = lambda: session_options(threads, spinning=spinning, opt_level=opt_level)  # noqa: E731
    forward = canonicalize(source, logits=logits, input_shapes=input_shapes)
    fwd_session = make_session(forward.forward_model(), providers, options=options())
    feeds = {i.name: _input_array(i.shape, batch, rng, i.type) for i in fwd_session.get_inputs()}
    shapes = {name: tuple(v.shape) for name, v in feeds.items()}
    if on_inputs is not None:
        on_inputs(shapes)
    try:
        flops = count_flops(forward.model, layers, shapes)
    except Exception:  # shape inference cannot resolve every node: no floor, the timing stands
        flops = None
    variants = list(variants) + [(f"forward+{m}", (m,)) for m in extra]
    prepared = []
    mwp_model = None
    for n, (name, methods) in enumerate(variants):
        progress("building", n, len(variants))
        if methods is None:
            prepared.append((name, fwd_session, [forward.entry], feeds))
            continue
        built = build_excitation_model(source, layers, methods=methods, rule=rule, logits=logits, input_shapes=input_shapes)
        session = make_session(built.model, providers, options=options())
        k = built.num_classes or session.get_inputs()[-1].shape[1]
        signal = np.zeros((batch, k), np.float32)
        signal[:, 0] = 1.0
        outputs = [built.logits] + list(built.maps.values())
        prepared.append((name, session, outputs, dict(feeds, **{built.signal: signal})))
        if profile and tuple(methods) == ("mwp",):
            mwp_model = (built.model, outputs, prepared[-1][3])
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
    mwp = float(np.median(times["forward+MWP"])) if "forward+MWP" in times else None
    rows = [BenchRow(name, float(np.median(times[name])), float(np.median(times[name])) / base,
                     float(np.median(times[name])) / mwp if mwp else None) for name, *_ in prepared]
    report = BenchReport(rows=rows, providers=fwd_session.get_providers(), inputs=shapes, flops=flops,
                         options=describe_session_options(options()))
    if mwp_model is not None:
        progress("profiling", 0, 1)
        report.profile = profile_shares(mwp_model[0], mwp_model[2], mwp_model[1], options(), providers)
    del prepared, fwd_session, mwp_model
    if peers:
        built = session = None   # noqa: F841  (the last variant's model and session: free them before torch's copy)
        report.peers = bench_torch.run_peers(forward, layers[0], next(iter(feeds.values())), peers, runs=runs,
                                             warmup=warmup, threads=threads, progress=progress)
    if memory:
        for n, (name, methods) in enumerate(variants):
            progress("memory", n, len(variants))
            report.builds.append(measure_build(model, layers, methods, name=name, rule=rule, logits=logits,
                                               input_shapes=input_shapes, threads=threads, providers=providers))
    return report


def run_bench(model, layers: Sequence[str], rule: str = "positive", batch: int = 1, runs: int = 10, warmup: int = 2,
              providers=None, threads: int | None = None, input_shapes=None, seed: int = 0,
              progress=None, on_inputs=None, logits: str | None = None,
              methods: Sequence[str] = ()) -> tuple[list[BenchRow], list[str]]:
    """The timing rows of :func:`run_bench_report` and the providers used."""
    report = run_bench_report(model, layers, rule=rule, batch=batch, runs=runs, warmup=warmup, providers=providers,
                              threads=threads, input_shapes=input_shapes, seed=seed, progress=progress,
                              on_inputs=on_inputs, logits=logits, methods=methods)
    return report.rows, report.providers


# ---------------------------------------------------------------------------
# build time and peak memory, one fresh process per variant
# ---------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status in MB (NaN where there is none)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM on Linux (getrusage's ru_maxrss would carry the
    parent's peak over fork + exec), ru_maxrss elsewhere."""
    peak = _status_mb("VmHWM")
    if not math.isnan(peak):
        return peak
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _build_in_child(spec: dict) -> dict:
    """Runs in the fresh process (``python -m onnx_excite.bench``): load, build, create the session."""
    import onnx_excite.runtime  # noqa: F401  (imports and ORT are part of every variant's base)

    source = load_source(spec["model"])
    loaded = _rss_mb()
    t0 = time.perf_counter()
    if spec["methods"] is None:
        forward = canonicalize(source, logits=spec["logits"], input_shapes=spec["input_shapes"])
        target = forward.forward_model()
        del forward
    else:
        target = build_excitation_model(source, spec["layers"], methods=spec["methods"], rule=spec["rule"],
                                        logits=spec["logits"], input_shapes=spec["input_shapes"]).model
    del source
    t1 = time.perf_counter()
    session = make_session(target, spec["providers"], spec["threads"])
    t2 = time.perf_counter()
    del session
    return {"build_s": t1 - t0, "session_s": t2 - t1, "peak_rss_mb": _peak_rss_mb(), "loaded_rss_mb": loaded}


def measure_build(model, layers: Sequence[str], methods: Sequence[str] | None, name: str | None = None,
                  rule: str = "positive", logits: str | None = None, input_shapes=None, threads: int | None = None,
                  providers=None, timeout: float = 900) -> BuildCost:
    """Build one variant (``methods=None``: the forward session alone) in a fresh Python
    process and return its build and session-creation seconds and the process's peak RSS.

    ``model`` is a path, ``default`` or a recipe name: what the child loads itself.
    """
    import subprocess
    import sys

    from .errors import ExciteError

    if not isinstance(model, (str, os.PathLike)):
        raise ExciteError("memory measurement needs a model path, 'default' or a recipe name")
    spec = {"model": str(model), "layers": list(layers), "methods": list(methods) if methods else None, "rule": rule,
            "logits": logits, "input_shapes": {k: list(v) for k, v in input_shapes.items()} if input_shapes else None,
            "threads": threads, "providers": list(providers) if providers else None}
    label = name or ("forward" if methods is None else "+".join(methods))
    try:
        done = subprocess.run([sys.executable, "-m", "onnx_excite.bench"], input=json.dumps(spec), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ExciteError(f"building {label} in a fresh process took over {timeout:.0f} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExciteError(f"building {label} in a fresh process failed: {last}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return BuildCost(label, r["build_s"], r["session_s"], r["peak_rss_mb"], r["loaded_rss_mb"])


if __name__ == "__main__":  # the child of measure_build: a JSON spec on stdin, a JSON result on stdout
    import sys

    print(json.dumps(_build_in_child(json.load(sys.stdin))))
