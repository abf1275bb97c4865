"""Benchmark: forward alone vs forward + MWP vs forward + c-MWP, and forward + any registered
method (``methods=``): median ms, ratios to the forward and to forward + MWP,
beside the floor the FLOP count sets, the build time and peak memory of each variant,
and the ORT session options used.

* ratio = median time of a variant / median time of the forward alone, variants run
  interleaved round by round so load from elsewhere falls on all of them alike;
* floor = 1 + 2 f, f = share of the forward FLOPs above the map layer (:mod:`.flops`);
* time floor = 1 + 2 f_t, f_t = share of the forward's TIME above the map layer, measured in
  the same rounds: 1 - (time of the forward cut at the map layer) / (time of the forward).
  It counts what FLOPs miss: memory-bound layers (VGG's fc layers read 400+ MB of weights
  at batch 1, MobileNetV2's depthwise convs) and the runtime's efficiency per layer;
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
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from onnx_excite.models.resolve import resolve_model

from ..graph.builder import build_excitation_model
from ..graph.canonicalize import canonicalize
from ..graph.flops import FlopCount, count_flops, downstream
from ..graph.options import BuildOptions, Options, given
from ..graph.share import WEIGHT_BOUND
from ..run.ort import describe_session_options, session_options
from ..run.runtime import make_session

#: the forward cut at the map layer (timed with the variants, reported as the time floor)
BELOW = "forward below the map layer"

#: (variant name, methods; None = the forward alone)
VARIANTS = (("forward", None), ("forward+MWP", ("mwp",)), ("forward+c-MWP", ("cmwp",)),
            ("forward+MWP+c-MWP", ("mwp", "cmwp")))


@dataclass(frozen=True)
class BenchOptions(Options):
    """What a benchmark builds, how it runs the sessions and what it measures besides the
    timing (see :func:`run_bench_report`)."""

    layers: Sequence[str] | None = None
    rule: str = "positive"
    batch: int = 1
    runs: int = 10                      # timed rounds
    warmup: int = 2                     # untimed rounds first
    providers: Sequence[str] | None = None
    threads: int | None = None          # intra-op threads (None: ORT's default)
    input_shapes: Mapping[str, Sequence[int | None]] | None = None
    seed: int = 0
    logits: str | None = None
    spinning: bool = False              # ORT's busy-waiting worker threads
    opt_level: str = "all"              # ORT graph optimisation level
    memory: bool = False                # also build each variant in a fresh process
    profile: bool = False               # ORT's node-time shares of forward + MWP
    variants: Sequence[tuple] = VARIANTS
    methods: Sequence[str] = ()         # one more variant forward+<method> each
    derive_weights: bool | None = None
    peers: Sequence[str] = ()           # torchray / zennit on the same weights
    share_adjoints: bool | Sequence[str] = WEIGHT_BOUND

    def build(self, methods: Sequence[str]) -> BuildOptions:
        """The build of one variant: these options' layers, rule, logits, ... and ``methods``."""
        return BuildOptions(layers=self.layers, methods=methods, rule=self.rule, logits=self.logits,
                            input_shapes=self.input_shapes, derive_weights=self.derive_weights,
                            share_adjoints=self.share_adjoints)


@dataclass
class BenchRow:
    name: str
    median_ms: float
    ratio: float
    vs_mwp: float | None = None   # median / median of forward+MWP
    #: the variant's graph's Conv/ConvTranspose/Gemm/MatMul FLOPs in forward FLOPs (the
    #: forward: 1; a rule that runs two halves on a signed input puts more than 1 + 2f here)
    graph_flops: float | None = None
    #: the quartiles (25 %, 75 %) of the per-round ratios to the forward timed in the same
    #: round: how much the ratio moved during the run
    ratio_spread: tuple[float, float] | None = None


@dataclass
class BuildCost:
    """One variant built in a fresh process: seconds to build the companion model (0 for
    the forward: canonicalisation only), to create the session, and the process's peak RSS."""

    name: str
    build_s: float
    session_s: float
    peak_rss_mb: float
    loaded_rss_mb: float   # RSS once the model is loaded, before the build
    model_mb: float = float("nan")   # the serialized size of the model the session was made from


@dataclass
class BenchReport:
    rows: list[BenchRow]
    providers: list[str]
    inputs: dict[str, tuple]
    flops: FlopCount | None = None
    options: dict[str, object] = field(default_factory=dict)
    builds: list[BuildCost] = field(default_factory=list)
    profile: dict[str, float] = field(default_factory=dict)   # op type -> share of node time (forward+MWP)
    below_ms: float | None = None   # median ms of the forward cut at the map layer (0: the layer is an input)
    peers: object | None = None   # bench_torch.PeerReport: TorchRay / zennit on the same weights (``peers=``)

    @property
    def floor(self) -> float | None:
        return None if self.flops is None else self.flops.floor

    @property
    def forward_ms(self) -> float | None:
        return next((r.median_ms for r in self.rows if r.name == "forward"), None)

    @property
    def share_above_time(self) -> float | None:
        """f_t: the share of the forward's time above the map layer (clipped to [0, 1])."""
        base = self.forward_ms
        if self.below_ms is None or not base:
            return None
        return min(max(1.0 - self.below_ms / base, 0.0), 1.0)

    @property
    def cut_timed_slower(self) -> bool:
        """The cut forward timed slower than the whole forward (noise): f_t was clipped to 0."""
        return bool(self.below_ms and self.forward_ms and self.below_ms >= self.forward_ms)

    @property
    def time_floor(self) -> float | None:
        """1 + 2 f_t: each excited layer costs at least two forward passes of itself, in time."""
        f = self.share_above_time
        return None if f is None else 1.0 + 2.0 * f

    #: the header of :meth:`markdown_row`'s table (README "Benchmark")
    MARKDOWN_HEADER = ("| model, map layer, batch (load) | forward | fwd+MWP | FLOP floor | time floor | "
                       "fwd+MWP / time floor | c-MWP / MWP | MWP+c-MWP / MWP |\n|---|---|---|---|---|---|---|---|")

    def markdown_row(self, label: str) -> str:
        """This run as one row of the README's benchmark table (``MARKDOWN_HEADER``); a cell
        whose variant or floor is missing is empty."""
        by = {r.name: r for r in self.rows}

        def ms(v):
            return f"{v:.3g} ms" if v < 100 else f"{v:.0f} ms"

        def num(v, fmt="{:.2f}"):
            return "" if v is None else fmt.format(v)

        fwd, mwp = by.get("forward"), by.get("forward+MWP")
        cmwp, both = by.get("forward+c-MWP"), by.get("forward+MWP+c-MWP")
        cells = [label, ms(fwd.median_ms) if fwd else "", num(mwp and mwp.ratio, "{:.2f}x"), num(self.floor),
                 num(self.time_floor), num(mwp and self.time_floor and mwp.ratio / self.time_floor),
                 num(cmwp and cmwp.vs_mwp), num(both and both.vs_mwp)]
        return "| " + " | ".join(cells) + " |"


def below_model(model: onnx.ModelProto, layers: Sequence[str]) -> onnx.ModelProto | None:
    """The forward cut at the map layers: only the nodes that compute a layer without reading
    one (ancestors of the layers, none of their descendants), the lowest layers as outputs.
    None when every layer is a graph input (nothing lies below)."""
    above = downstream(model, layers)
    needed, keep = set(layers), []
    for node in reversed(model.graph.node):
        name = node.name or node.output[0]
        if name not in above and any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    produced = {o for n in keep for o in n.output}
    outputs = [t for t in dict.fromkeys(layers) if t in produced]
    if not outputs:
        return None
    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    graph = helper.make_graph(list(reversed(keep)), "below_map_layer", list(model.graph.input),
                              [infos[t] if t in infos else helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                               for t in outputs],
                              [i for i in model.graph.initializer if i.name in needed])
    cut = helper.make_model(graph, opset_imports=list(model.opset_import))
    cut.ir_version = model.ir_version
    return cut


def _input_array(shape, batch: int, rng, ort_type: str = "tensor(float)") -> np.ndarray:
    """Random input of the declared type: dynamic dims at 224; integer inputs (uint8 pixels) uniform 0..255."""
    from ..run.runtime import as_input_dtype

    if shape and isinstance(shape[0], int) and shape[0] > 0 and shape[0] != batch:
        from ..errors import ExciteError

        raise ExciteError(f"--batch {batch}, but the model's batch dimension is fixed at {shape[0]}")
    dims = [batch if i == 0 else (d if isinstance(d, int) and d > 0 else 224) for i, d in enumerate(shape)]
    if "int" in ort_type:
        return as_input_dtype(rng.integers(0, 256, size=dims), ort_type)
    return as_input_dtype(rng.standard_normal(dims), ort_type)


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


def run_bench_report(model, layers: Sequence[str] | None = None, *, options: BenchOptions | None = None,
                     progress=None, on_inputs=None, **fields) -> BenchReport:
    """Median wall time of each variant over ``runs`` rounds; ratios are to the forward alone.

    ``model`` is a path, ``default``, a ModelProto or a bench recipe (``vgg16-random`` ...);
    the settings are a :class:`BenchOptions` (``options``), ``layers`` and keyword ``fields``
    replacing what it holds.

    The variants run interleaved, one run each per round, so that load from elsewhere
    on the machine falls on all of them alike. ``on_inputs({name: shape})`` is told the
    input shapes used (dynamic dims at 224; without ``input_shapes`` the models are built for
    the sizes fed, batch left dynamic, as explain and eval build them); ``progress(phase, done, total)`` is called as
    the variants are built and the rounds run. ``spinning=False`` (default) turns ORT's
    busy-waiting worker threads off; ``memory=True`` also builds each variant in a fresh
    process (:func:`measure_build`; ``model`` must then be a path, ``default`` or a recipe
    name); ``profile=True`` adds ORT's node-time shares of the forward + MWP session.
    ``methods``: one more variant ``forward+<method>`` each (any name of
    :data:`onnx_excite.methods.METHODS`). ``derive_weights``: passed to
    :func:`~onnx_excite.graph.builder.build_excitation_model` (None: its default, except with
    ``opt_level="disable"``, where ORT would not fold the derivations and they would be
    timed: then the weights are stored). ``share_adjoints``: passed to the builder too (the
    default: dense adjoints shared between sweeps; ``True`` adds the convolutions, ``False``
    shares nothing). ``peers`` (``"torchray"``, ``"zennit"``): the same
    weights in PyTorch, their excitation backprop at ``layers[0]`` timed against their own
    forward after ours (:mod:`.bench_torch`); ``threads`` then defaults to torch's count
    and is given to both.
    """
    from ..methods import get_method

    opts = BenchOptions.of(options, **given(layers=layers), **fields)
    layers = list(opts.layers or ())
    extra = [get_method(m).name for m in dict.fromkeys(opts.methods)]
    from ..io.checks import at_least

    at_least(opts.runs, 1, "--runs")
    at_least(opts.batch, 1, "--batch")
    at_least(opts.warmup, 0, "warmup")
    progress = progress or (lambda phase, done, total: None)
    if opts.derive_weights is None and opts.opt_level == "disable":
        opts = replace(opts, derive_weights=False)
    if opts.peers:
        from . import bench_torch

        bench_torch.require(opts.peers)
        opts = replace(opts, threads=opts.threads or bench_torch.default_threads())   # the same count for ORT and torch
    batch, runs, warmup, providers = opts.batch, opts.runs, opts.warmup, opts.providers
    rng = np.random.default_rng(opts.seed)
    source = resolve_model(model, allow_recipes=True).model
    options = lambda: session_options(opts.threads, spinning=opts.spinning, opt_level=opts.opt_level)  # noqa: E731
    forward = canonicalize(source, logits=opts.logits, input_shapes=opts.input_shapes)
    declared = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                for i in forward.model.graph.input}
    if opts.input_shapes is None and any(d is None for dims in declared.values() for d in dims[1:]):
        # pin the sizes fed (dynamic ones at 224, as _input_array feeds them; batch stays dynamic),
        # as explain and eval build one model per input size
        opts = replace(opts, input_shapes={name: [None] + [d if d else 224 for d in dims[1:]]
                                           for name, dims in declared.items()})
        forward = canonicalize(source, logits=opts.logits, input_shapes=opts.input_shapes)
    fwd_session = make_session(forward.forward_model(copy_model=False), providers, options=options())
    feeds = {i.name: _input_array(i.shape, batch, rng, i.type) for i in fwd_session.get_inputs()}
    shapes = {name: tuple(v.shape) for name, v in feeds.items()}
    if on_inputs is not None:
        on_inputs(shapes)
    try:
        flops = count_flops(forward.model, layers, shapes)
    except Exception:  # shape inference cannot resolve every node: no floor, the timing stands
        flops = None
    variants = list(opts.variants) + [(f"forward+{m}", (m,)) for m in extra]
    prepared = []
    cut = below_model(forward.model, layers)
    if cut is not None:   # timed in the same rounds; its ratio gives the time floor
        cut_session = make_session(cut, providers, options=options())
        prepared.append((BELOW, cut_session, [o.name for o in cut_session.get_outputs()],
                         {i.name: feeds[i.name] for i in cut_session.get_inputs()}))
    mwp_model = None
    graph_flops = {"forward": 1.0 if flops is not None else None}
    for n, (name, methods) in enumerate(variants):
        progress("building", n, len(variants))
        if methods is None:
            prepared.append((name, fwd_session, [forward.entry], feeds))
            continue
        built = build_excitation_model(source, options=opts.build(methods))
        session = make_session(built.model, providers, options=options())
        k = built.num_classes or session.get_inputs()[-1].shape[1]
        signal = np.zeros((batch, k), np.float32)
        signal[:, 0] = 1.0
        outputs = [built.logits] + list(built.maps.values())
        prepared.append((name, session, outputs, dict(feeds, **{built.signal: signal})))
        graph_flops[name] = _graph_flops(built, dict(shapes, **{built.signal: signal.shape}), flops)
        if opts.profile and tuple(methods) == ("mwp",):
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
                     float(np.median(times[name])) / mwp if mwp else None, graph_flops.get(name),
                     round_spread(times[name], times["forward"]))
            for name, *_ in prepared if name != BELOW]
    report = BenchReport(rows=rows, providers=fwd_session.get_providers(), inputs=shapes, flops=flops,
                         options=describe_session_options(options()),
                         below_ms=float(np.median(times[BELOW])) if BELOW in times else 0.0)
    if mwp_model is not None:
        progress("profiling", 0, 1)
        report.profile = profile_shares(mwp_model[0], mwp_model[2], mwp_model[1], options(), providers)
    del prepared, fwd_session, mwp_model
    if opts.peers:
        built = session = None   # noqa: F841  (the last variant's model and session: free them before torch's copy)
        report.peers = bench_torch.run_peers(forward, layers[0], next(iter(feeds.values())), opts.peers, runs=runs,
                                             warmup=warmup, threads=opts.threads, progress=progress)
    if opts.memory:
        for n, (name, methods) in enumerate(variants):
            progress("memory", n, len(variants))
            report.builds.append(measure_build(model, methods, opts, name=name))
    return report


def round_spread(variant_ms: Sequence[float], forward_ms: Sequence[float]) -> tuple[float, float]:
    """Quartiles (25 %, 75 %) of variant / forward over the rounds, each round's two runs
    paired (they ran back to back, under the same load)."""
    ratios = np.asarray(variant_ms, dtype=np.float64) / np.asarray(forward_ms, dtype=np.float64)
    q1, q3 = np.percentile(ratios, [25, 75])
    return float(q1), float(q3)


def _graph_flops(built, shapes, forward_flops: FlopCount | None) -> float | None:
    """The companion graph's counted FLOPs (forward + excitation) over the forward's (None
    where either count is unknown)."""
    if forward_flops is None or not forward_flops.total:
        return None
    try:
        return count_flops(built.model, (), shapes).total / forward_flops.total
    except Exception:  # shape inference cannot size every node: no count, the timing stands
        return None


def run_bench(model, layers: Sequence[str] | None = None, *, options: BenchOptions | None = None, progress=None,
              on_inputs=None, **fields) -> tuple[list[BenchRow], list[str]]:
    """The timing rows of :func:`run_bench_report` and the providers used."""
    report = run_bench_report(model, layers, options=options, progress=progress, on_inputs=on_inputs, **fields)
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
    """Runs in the fresh process (``python -m onnx_excite.apps.bench``): load, build, create the session."""
    import onnx_excite.run.runtime  # noqa: F401  (imports and ORT are part of every variant's base)

    source = resolve_model(spec["model"], allow_recipes=True).model
    loaded = _rss_mb()
    t0 = time.perf_counter()
    if spec["methods"] is None:
        forward = canonicalize(source, logits=spec["build"]["logits"], input_shapes=spec["build"]["input_shapes"])
        target = forward.forward_model(copy_model=False)
        del forward
    else:
        target = build_excitation_model(source, options=BuildOptions(**spec["build"])).model
    del source
    t1 = time.perf_counter()
    session = make_session(target, spec["providers"], spec["threads"])
    t2 = time.perf_counter()
    del session
    return {"build_s": t1 - t0, "session_s": t2 - t1, "peak_rss_mb": _peak_rss_mb(), "loaded_rss_mb": loaded,
            "model_mb": target.ByteSize() / 1e6}


def measure_build(model, methods: Sequence[str] | None, options: BenchOptions, name: str | None = None,
                  timeout: float = 900) -> BuildCost:
    """Build one variant (``methods=None``: the forward session alone) in a fresh Python
    process and return its build and session-creation seconds and the process's peak RSS.

    ``model`` is a path, ``default`` or a recipe name: what the child loads itself; ``options``
    give the layers, the build and the session's threads and providers.
    """
    import subprocess
    import sys

    from ..errors import ExciteError

    if not isinstance(model, (str, os.PathLike)):
        raise ExciteError("memory measurement needs a model path, 'default' or a recipe name")
    build = options.build(list(methods) if methods else ())
    spec = {"model": str(model), "methods": list(methods) if methods else None, "threads": options.threads,
            "providers": list(options.providers) if options.providers else None,
            "build": {"layers": list(build.layers or ()), "methods": build.methods, "rule": build.rule,
                      "logits": build.logits, "derive_weights": build.derive_weights,
                      "input_shapes": {k: list(v) for k, v in build.input_shapes.items()} if build.input_shapes else None,
                      "share_adjoints": build.share_adjoints if isinstance(build.share_adjoints, bool)
                      else list(build.share_adjoints)}}
    label = name or ("forward" if methods is None else "+".join(methods))
    try:
        done = subprocess.run([sys.executable, "-m", "onnx_excite.apps.bench"], input=json.dumps(spec), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ExciteError(f"building {label} in a fresh process took over {timeout:.0f} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExciteError(f"building {label} in a fresh process failed: {last}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return BuildCost(label, r["build_s"], r["session_s"], r["peak_rss_mb"], r["loaded_rss_mb"], r.get("model_mb", float("nan")))


if __name__ == "__main__":  # the child of measure_build: a JSON spec on stdin, a JSON result on stdout
    import sys

    print(json.dumps(_build_in_child(json.load(sys.stdin))))
