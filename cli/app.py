"""`onnx-excite`: a thin typer app over the library.

Each command parses its arguments, calls one library function and renders the
result. Errors the user can fix (bad files, names, models) are printed as one
line on stderr with exit code 2, never a traceback.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from onnx_excite.cli import help_style  # noqa: F401  (plain placeholders in --help)
from onnx_excite.errors import ExciteError

from .bench_peers import COMPARE_HELP, render_peers
from .ray_options import ACTORS, CPUS, GPUS, RAY, RAY_BATCH, RayAwareGroup, print_run_summary, ray_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  cls=RayAwareGroup,
                  help="Excitation Backprop attention maps (MWP, contrastive MWP) for ONNX image classifiers.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def friendly(fn):
    """Turn library errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ExciteError as exc:
            err.print(f"error: {exc}", markup=False, soft_wrap=True)
            raise typer.Exit(2)

    return wrapper


def _shape(s) -> str:
    return "?" if s is None else "x".join("?" if d is None else str(d) for d in s)


def _parse_shape(text: Optional[str]):
    if not text:
        return None
    try:
        name, dims = text.split("=", 1) if "=" in text else (None, text)
        values = [None if d in ("?", "N", "") else int(d) for d in dims.split(",")]
    except ValueError:
        raise ExciteError(f"cannot read input shape {text!r}; use e.g. 'input=1,3,224,224' or '1,3,224,224'") from None
    return name, values


def _input_shapes(model, text):
    parsed = _parse_shape(text)
    if parsed is None:
        return None
    name, values = parsed
    from onnx_excite.graph.canonicalize import first_input_name

    return {name or first_input_name(model): values}


LOGITS_HELP = ("output (or tensor) holding the logits: the signal enters there, below a Softmax. Default: the only "
               "float 2-D output; among several, the one fed by a Softmax, else the last Gemm/MatMul's, else the widest")


def _logits_option():
    return typer.Option(None, "--logits", help=LOGITS_HELP)


def _share_option():
    return typer.Option("dense", "--share-adjoints", help="run the adjoint ops that several methods' sweeps apply with "
                        "one weight once on the stacked signals: dense (Gemm/MatMul, whose time is reading the weight), "
                        "all (convolutions too) or none")


def _hidden_output_alias():
    return typer.Option(None, "--output", hidden=True, help="older name of --logits")


EXPLAIN_OUTPUTS = ("overlay", "panel", "npy", "image-npy", "record")   # apps.explain.OUTPUTS (a test keeps them equal)
OUTPUTS_HELP = ("what is written per image, a comma list of overlay (one per class, method and layer), panel (one "
                "per class), npy (the map at layer resolution), image-npy (the map upsampled to the image, float16), "
                "record (the line in explanations.jsonl that lets a re-run skip the image); default: all. Without "
                "record nothing is kept for a re-run: each run explains every image again")
FORMAT_HELP = "overlays and panels as png (lossless), jpg or webp (quality 90: smaller, faster to write)"


def _note_logits(choice) -> None:
    """Say which output is explained when the model offered several and none was named."""
    if choice is not None and choice.chosen_among_several:
        err.print(f"note: logits = {choice.output!r} ({choice.reason}; outputs: {', '.join(choice.candidates)}); "
                  f"choose another with --logits", markup=False, soft_wrap=True)


@app.command()
@friendly
def layers(model: Path = typer.Argument(..., help="ONNX classifier, or 'default'"),
           logits: Optional[str] = _logits_option(),
           output: Optional[str] = _hidden_output_alias()):
    """List candidate layers: tensor names, op types, shapes at the input size explain uses, the
    stride (input pixels per map cell) and layouts (the channel axis a map sums over)."""
    from onnx_excite.graph.layers import inspect_model
    from onnx_excite.models.preprocessing import explained_input
    from onnx_excite.models.resolve import resolve_model

    resolved = resolve_model(model)
    pinned, input_hw, how = explained_input(resolved)
    report = inspect_model(resolved.model, logits=logits or output, input_shapes=pinned)
    _note_logits(report.logits)
    marked = set(resolved.default_layers) or ({report.default} if report.default else set())
    title = f"{model.name}: logits = {report.graph.entry}"
    if input_hw:
        title += f"; shapes at a {input_hw[0]}x{input_hw[1]} input ({how})"
    table = Table("layer (tensor name)", "op", "shape", "stride", "layout", "", title=title)
    for info in report.layers:
        table.add_row(info.name, info.op_type, _shape(info.shape), info.stride(input_hw), info.describe_layout(),
                      "default" if info.name in marked else "")
    out.print(table)
    if report.problems:
        err.print(f"warning: {len(report.problems)} unsupported node(s); run `onnx-excite check {model}`", markup=False)


@app.command()
@friendly
def check(model: Path = typer.Argument(..., help="ONNX classifier, or 'default'"),
          logits: Optional[str] = _logits_option(),
          output: Optional[str] = _hidden_output_alias(),
          provider: str = typer.Option("cpu", help="cuda: also report every node of the companion graph that "
                                                   "would fall back from ONNX Runtime's CUDA provider to the CPU"),
          layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="map layer for --provider cuda "
                                                    "(default: the input, so every rule is in the graph)")):
    """Report every node the rewrite cannot handle (exit 1), or "ok" with the count of candidate
    layers and the default one (`layers` lists them)."""
    from onnx_excite.graph.layers import inspect_model
    from onnx_excite.graph.options import BuildOptions
    from onnx_excite.models.resolve import resolve_model

    resolved = resolve_model(model)
    if provider != "cpu":
        from onnx_excite.cli.serve_cmds import check_cuda_command

        return check_cuda_command(resolved.model, provider, BuildOptions(layers=layer, logits=logits or output))

    report = inspect_model(resolved.model, logits=logits or output)
    _note_logits(report.logits)
    if report.problems:
        for op_type, name, reason in report.problems:
            out.print(f"unsupported: {op_type} {name!r}: {reason}", markup=False)
        raise typer.Exit(1)
    default = f", default {report.default!r}" if report.default else ""
    out.print(f"ok: {len(report.layers)} candidate map layers{default} (`onnx-excite layers MODEL` lists them)",
              markup=False)


#: RISE's options (explain, eval): `-m rise` / `--methods ...,rise`
MASKS = typer.Option(1000, "--masks", help="RISE: random masks per image (each one forward; the paper used 4000 to 8000)")
MASK_CELLS = typer.Option(7, "--mask-cells", help="RISE: the masks' grid is N x N cells")
MASK_P = typer.Option(0.5, "--mask-p", help="RISE: probability that a cell is kept")
MASK_BATCH = typer.Option(32, "--mask-batch", help="RISE: masked inputs per forward batch (the maps do not change)")


def _methods(method: Optional[List[str]], contrastive: bool) -> tuple:
    """The -m methods (default: DEFAULT_METHODS, for explain and export alike), with
    --contrastive each one's contrastive variant added (grad -> c-grad, ...)."""
    from onnx_excite.errors import ExciteError
    from onnx_excite.methods import DEFAULT_METHODS, with_contrastive

    if not method:
        if contrastive:
            raise ExciteError(f"--contrastive adds the contrastive variant of each -m method (mwp -> cmwp, "
                              f"grad -> c-grad, ...); the default methods ({', '.join(DEFAULT_METHODS)}) include "
                              f"c-MWP already: drop --contrastive or name the methods with -m")
        return tuple(DEFAULT_METHODS)
    return with_contrastive(method) if contrastive else tuple(method)


CONTRASTIVE_HELP = ("also the contrastive variant of each -m method (mwp -> cmwp, grad -> c-grad, deconv -> "
                    "c-deconv, cam -> c-cam)")


@app.command()
@friendly
def export(model: Path = typer.Argument(..., help="ONNX classifier (never modified), or 'default'"),
           out_path: Optional[Path] = typer.Option(None, "-o", "--output", help="where to write the companion model"),
           layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="tensor name of a map layer (repeatable; default: the model profile's)"),
           method: Optional[List[str]] = typer.Option(None, "--method", "-m", help="attention method, any of `onnx-excite methods` (repeatable; default mwp and cmwp)"),
           contrastive: bool = typer.Option(False, "--contrastive", help=CONTRASTIVE_HELP),
           rule: str = typer.Option("positive", help="positive (stable for signed inputs) or paper (literal rule)"),
           channels: bool = typer.Option(False, help="also output channel-resolved P per layer"),
           input_shape: Optional[str] = typer.Option(None, help="pin the input shape, e.g. 'input=?,3,224,224'"),
           signal: str = typer.Option("input", help="input (the client feeds excite_signal), top1 or topk:K (the graph "
                                                    "explains its own top classes; outputs classes, scores, maps)"),
           map_size: str = typer.Option("layer", help="layer (maps at layer resolution) or input (resized in the graph)"),
           resize: str = typer.Option("bilinear", help="bilinear or bicubic, for --map-size input"),
           normalize: str = typer.Option("none", help="none, max (each map / its max |value|) or sum (/ sum of |values|)"),
           fp16: bool = typer.Option(False, "--fp16", help="forward in float16 (needs the fp16 extra); excitation stays float32"),
           dynamic_batch: bool = typer.Option(True, help="make a fixed batch of 1 symbolic when no Reshape bakes it in"),
           serving: Optional[Path] = typer.Option(None, help="also write a Triton model repository folder here"),
           name: Optional[str] = typer.Option(None, help="Triton model name (default: the model file's stem + '_excite')"),
           max_batch_size: int = typer.Option(32, help="Triton max_batch_size"),
           share_adjoints: str = _share_option(),
           logits: Optional[str] = _logits_option()):
    """Write one ONNX model with the forward graph and the excitation outputs.

    It runs in plain onnxruntime: feed the image(s) and `excite_signal` (N x K), or with
    --signal top1/topk:K the image alone.
    """
    from onnx_excite.cli.serve_cmds import export_command
    from onnx_excite.graph.options import BuildOptions
    from onnx_excite.graph.share import parse_share
    from onnx_excite.targets.options import ExportOptions

    build = BuildOptions(layers=layer, methods=_methods(method, contrastive), rule=rule, channels=channels,
                         input_shapes=_input_shapes(str(model), input_shape), logits=logits,
                         share_adjoints=parse_share(share_adjoints))
    export_command(model, out_path, ExportOptions(build=build, signal=signal, map_size=map_size, resize=resize,
                                                  normalize=normalize, fp16=fp16, dynamic_batch=dynamic_batch,
                                                  triton_dir=serving, triton_name=name, max_batch_size=max_batch_size))


@app.command()
@friendly
def bench(model: str = typer.Argument(..., help="ONNX classifier, 'default', or a recipe with random weights: vgg16-random, "
                                               "resnet50-random, mobilenetv2-random, tiny-cnn, vit-s16-random, convnext-t-random, "
                                               "swin-t-random"),
          layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="map layer (repeatable; default: the model profile's or the recipe's)"),
          rule: str = typer.Option("positive", help="positive or paper"),
          batch: int = typer.Option(1, help="batch size (at least 1)"),
          runs: int = typer.Option(10, help="timed runs per variant (at least 1)"),
          threads: Optional[int] = typer.Option(None, help="intra-op threads (default: ORT's)"),
          input_shape: Optional[str] = typer.Option(None, help="pin the input shape, e.g. '1,3,224,224'"),
          spin: bool = typer.Option(False, "--spin/--no-spin", help="ORT's busy-waiting worker threads (session.intra_op.allow_spinning); off by default"),
          opt_level: str = typer.Option("all", help="ORT graph optimisation level: disable, basic, extended or all"),
          memory: bool = typer.Option(False, "--memory", help="also build each variant in a fresh process: build time, session time, peak RSS"),
          profile: bool = typer.Option(False, "--profile", help="also print ORT's node-time share per op type of the forward+MWP session"),
          logits: Optional[str] = _logits_option(),
          method: Optional[List[str]] = typer.Option(None, "--method", "-m", help="also time forward + this method "
                                                     "(any of `onnx-excite methods`; repeatable)"),
          stored_weights: bool = typer.Option(False, "--stored-weights", help="store W+, W- and flipped kernels as "
                                              "initializers instead of deriving them in the graph from the model's own "
                                              "(the default; ORT folds them at session load)"),
          compare: Optional[List[str]] = typer.Option(None, "--compare", help=COMPARE_HELP),
          markdown: bool = typer.Option(False, "--markdown", help="also print this run as a row of the README's "
                                        "benchmark table (model, layer, batch and load average as its label)"),
          share_adjoints: str = _share_option()):
    """Median ms of forward alone vs forward+MWP vs forward+c-MWP (and forward + each --method), the ratios, the FLOP floor and the time floor."""
    from onnx_excite.apps.bench import BenchOptions, run_bench_report
    from onnx_excite.graph.share import parse_share
    from onnx_excite.models.resolve import resolve_model

    share = parse_share(share_adjoints)
    resolved = resolve_model(model, allow_recipes=True)
    layer = resolved.layers(layer)
    shapes = _input_shapes(resolved.model, input_shape) if input_shape else None
    options = BenchOptions(layers=layer, rule=rule, batch=batch, runs=runs, threads=threads, input_shapes=shapes,
                           logits=logits, spinning=spin, opt_level=opt_level, memory=memory, profile=profile,
                           methods=method or (), derive_weights=False if stored_weights else None,
                           peers=compare or (), share_adjoints=share)
    from rich.progress import Progress

    used, bar = {}, Progress(console=err, transient=True)

    def progress(phase, done, total):  # the bar starts with the first step (after the checks)
        if not bar.task_ids:
            bar.start()
            bar.add_task(phase, total=total)
        bar.update(bar.task_ids[0], description=phase, completed=done, total=total)

    try:
        report = run_bench_report(model, options=options, progress=progress, on_inputs=used.update)
    finally:
        bar.stop()
    sizes = ", ".join(f"{name} {_shape(shape)}" for name, shape in used.items())
    floor, time_floor = report.floor, report.time_floor
    table = Table("variant", "median ms", "x fwd", "x fwd+MWP", "/ floor", "/ time floor",
                  title=f"{Path(model).name}, layer {', '.join(layer)}, input {sizes}, {report.providers[0]}")
    for column in table.columns:
        column.no_wrap = True
    for row in report.rows:
        excited = row.name != "forward"
        table.add_row(row.name, f"{row.median_ms:.2f}", f"{row.ratio:.2f}",
                      "-" if row.vs_mwp is None else f"{row.vs_mwp:.2f}",
                      "" if floor is None or not excited else f"{row.ratio / floor:.2f}",
                      "" if time_floor is None or not excited else f"{row.ratio / time_floor:.2f}")
    out.print(table)
    spread = [f"{row.name} {row.ratio_spread[0]:.2f}-{row.ratio_spread[1]:.2f}" for row in report.rows
              if row.name != "forward" and row.ratio_spread is not None]
    if spread and runs >= 4:
        out.print("x fwd per round, quartiles (each run paired with the forward of its round): " + ", ".join(spread),
                  markup=False)
    out.print(f"input used: {sizes} (batch {batch}; dynamic sizes at 224, built for that size with a dynamic batch "
              f"as explain/eval do; other sizes: --input-shape)", markup=False)
    if report.flops is not None:
        f = report.flops
        out.print(f"floor = 1 + 2f = {f.floor:.2f}: f = {f.share_above:.3f} of the forward's {f.total / 1e9:.3g} GFLOP "
                  f"(Conv/Gemm/MatMul) lie above the map layer", markup=False)
        counted = [f"{row.name} {row.graph_flops:.2f}" for row in report.rows
                   if row.name != "forward" and row.graph_flops is not None]
        if counted:
            out.print("graph FLOPs (Conv/ConvTranspose/Gemm/MatMul each variant's graph runs, in forward FLOPs; above "
                      "1 + 2f where the rule runs the a+ and a- halves of a signed input): " + ", ".join(counted),
                      markup=False)
    else:
        out.print("floor: unknown (shape inference could not size every Conv/Gemm/MatMul)", markup=False)
    if report.time_floor is not None:
        out.print(f"time floor = 1 + 2f_t = {report.time_floor:.2f}: f_t = {report.share_above_time:.3f} of the forward's "
                  f"time lies above the map layer (forward cut at the layer: {report.below_ms:.3f} ms, same rounds)",
                  markup=False)
        if report.cut_timed_slower:
            err.print(f"warning: the forward cut at the map layer timed slower than the whole forward ({report.below_ms:.1f} "
                      f"vs {report.forward_ms:.1f} ms): noise, the time floor says nothing in this run; use more --runs",
                      markup=False)
    out.print("session: " + ", ".join(f"{k}={v}" for k, v in report.options.items()), markup=False)
    if markdown:
        load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"
        out.print(report.MARKDOWN_HEADER + "\n" + report.markdown_row(f"{model}, {', '.join(layer)}, {batch} ({load})"),
                  markup=False, soft_wrap=True)
    if report.builds:
        mem = Table("variant", "build s", "session s", "peak RSS MB", "RSS after load MB", "model MB",
                    title="build in a fresh process (model load excluded from the times)")
        for b in report.builds:
            mem.add_row(b.name, f"{b.build_s:.2f}", f"{b.session_s:.2f}", f"{b.peak_rss_mb:.0f}", f"{b.loaded_rss_mb:.0f}",
                        f"{b.model_mb:.1f}" if b.model_mb >= 10 else f"{b.model_mb:.3g}")
        out.print(mem)
    if report.profile:
        shares = ", ".join(f"{op} {share:.1%}" for op, share in list(report.profile.items())[:12])
        out.print(f"forward+MWP node time by op type (ORT profiler): {shares}", markup=False)
    if report.peers is not None:
        render_peers(report.peers, out)


@app.command()
@friendly
def explain(model: str = typer.Argument(..., help="ONNX classifier path, or 'default'"),
            inputs: List[str] = typer.Argument(..., help="image files, folders or quoted globs (with --ray also s3://, gs://, ... URIs)"),
            layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="map layer (repeatable; default: the model profile's)"),
            target: Optional[List[str]] = typer.Option(None, "--target", "-t", help="class index or name (repeatable: one map each)"),
            top: int = typer.Option(1, help="explain the top-K predicted classes when no --target is given; each image's line lists max(3, K) classes, at most 5"),
            method: Optional[List[str]] = typer.Option(None, "--method", "-m", help="attention method, any of `onnx-excite methods` (repeatable; default mwp and cmwp); rise is the black-box RISE"),
            contrastive: bool = typer.Option(False, "--contrastive", help=CONTRASTIVE_HELP),
            rule: str = typer.Option("positive", help="positive or paper"),
            out_dir: Path = typer.Option(Path("excite_out"), "-o", "--output", help="output folder"),
            size: Optional[int] = typer.Option(None, help="shorter side of the resized image (default 224); a model with a fixed input size "
                                                   "runs at its own size, which --size overrides with a warning"),
            mean: Optional[str] = typer.Option(None, help="per-channel mean, e.g. 0.485,0.456,0.406"),
            std: Optional[str] = typer.Option(None, help="per-channel std, e.g. 0.229,0.224,0.225"),
            combine: bool = typer.Option(False, help="several --target as one multi-hot signal (one map) instead of one map each"),
            colorbar: bool = typer.Option(True, help="draw a colour bar (ticks, label) beside each overlay"),
            scale: str = typer.Option("shared", help="colour scale: 'shared' (one per method and layer across an "
                                                     "image's classes: a weak class looks weak) or 'max' (each map by its own maximum)"),
            alpha: float = typer.Option(0.5, help="weight of the heat map over the photo, 0..1"),
            cmap: str = typer.Option("jet", help="colour map: jet (built in) or any matplotlib name when "
                                                 "matplotlib is installed (pip install 'onnx-excite[plot]')"),
            full_res: bool = typer.Option(False, "--full-res", help="image-space maps and overlays at the photo's full size "
                                                                   "(default: long side at most 1600 px)"),
            batch_size: int = typer.Option(8, help="images per run (same-size images share a batch)"),
            workers: Optional[int] = typer.Option(None, help="threads that decode the next images and write the "
                                                  "outputs while the model runs (default: the CPU count, 2 to 4; "
                                                  "1: none); the files are the same"),
            logits: Optional[str] = _logits_option(),
            blur: bool = typer.Option(True, "--blur/--no-blur", help="the paper's Gaussian blur (sigma = 0.02 max(W, H)) "
                                                                     "of the image-space grad/deconv/guided/LRP maps"),
            device: str = typer.Option("auto", help="cpu, cuda (an error when CUDA cannot run) or auto (CUDA when available)"),
            masks: int = MASKS, mask_cells: int = MASK_CELLS, mask_p: float = MASK_P,
            seed: int = typer.Option(0, help="seed of RISE's masks (the same masks for every image)"),
            mask_batch: int = MASK_BATCH,
            outputs: str = typer.Option(",".join(EXPLAIN_OUTPUTS), "--outputs", help=OUTPUTS_HELP),
            image_format: str = typer.Option("png", "--format", help=FORMAT_HELP),
            ray: Optional[str] = RAY, actors: int = ACTORS, ray_batch: int = RAY_BATCH,
            cpus_per_actor: float = CPUS, gpus_per_actor: float = GPUS):
    """Write maps (.npy at layer resolution and upsampled to the image), overlays and panels (.png, .jpg or .webp) and a record per image.

    Re-running with the same settings skips images whose outputs are complete (their records say so).
    """
    from onnx_excite.apps.explain import ExplainOptions, explain_files

    opts = ExplainOptions(model=model, layers=list(layer or []), targets=list(target or []), top=top,
                          methods=_methods(method, contrastive), rule=rule, out_dir=out_dir,
                          size=size, mean=mean, std=std, batch_size=batch_size, combine=combine, colorbar=colorbar,
                          scale=scale, alpha=alpha, cmap=cmap, full_res=full_res, logits=logits, blur=blur, device=device,
                          workers=workers, masks=masks, mask_cells=mask_cells, mask_p=mask_p, seed=seed,
                          mask_batch=mask_batch, outputs=outputs, format=image_format)
    settings = ray_settings(ray, actors, ray_batch, cpus_per_actor, gpus_per_actor)
    if settings is not None:
        from onnx_excite.apps.distributed import explain_on_ray

        summary, stats = explain_on_ray(inputs, opts, settings, warn=_warn,
                                        on_error=lambda image, reason: err.print(f"error: {reason}", markup=False, soft_wrap=True))
    else:
        shown = min(5, max(3, top))
        summary = explain_files(inputs, opts, console=out, errors=err, warn=_warn,
                                on_record=lambda rec, skipped=False: _print_record(rec, skipped, shown))
    _note_logits(summary.logits_choice)
    for note in summary.notes:
        err.print(f"note: {note}", markup=False, soft_wrap=True)
    if summary.providers:
        out.print("providers: " + ", ".join(summary.providers), markup=False)
    if summary.input_size:
        out.print(f"model input: {summary.input_size[0]}x{summary.input_size[1]} (the size the model declares)", markup=False)
    if summary.skipped:
        out.print(f"skipped {summary.skipped} image(s) already explained with these settings", markup=False)
    if settings is not None:
        print_run_summary(out, "explained", stats)
    out.print(f"wrote {summary.written} file(s) to {out_dir} for {summary.images} image(s) in "
              f"{summary.seconds:.{1 if summary.seconds >= 10 else 2}f} s, "
              f"{summary.images_per_s:.2f} images/s", markup=False, soft_wrap=True)
    if summary.failed:
        err.print(f"error: {summary.failed} input(s) could not be read or explained", markup=False)
        raise typer.Exit(2)


def _warn(message: str) -> None:
    err.print(f"warning: {message}", markup=False, soft_wrap=True)


def _print_record(rec: dict, skipped: bool = False, shown: int = 3) -> None:
    """One image's ``shown`` top predictions (explain: max(3, --top), at most the record's 5)."""
    best = ", ".join(f"{t['label']} ({t['prob']:.2f})" for t in rec["top5"][:shown])
    out.print(f"{Path(rec['image']).name}: {best}" + ("  [already done]" if skipped else ""), markup=False)


@app.command()
@friendly
def demo(out_dir: Path = typer.Option(Path("excite_demo"), "-o", "--output", help="output folder")):
    """Explain the bundled photos with the default ImageNet model (MWP and c-MWP overlays)."""
    from onnx_excite.apps.explain import run_demo

    summary, path = run_demo(out_dir, console=out, errors=err)
    for rec in summary.records:
        best = rec["top5"][0]
        out.print(f"{Path(rec['image']).name}: {best['label']} ({best['prob']:.2f})", markup=False)
        for o in rec["outputs"]:
            out.print(f"  {o['method']:5s} {o['layer']}: {o['overlay']}", markup=False)
    out.print(f"summary (top-5 per image): {path}", markup=False)


from . import eval_cmd  # noqa: E402,F401  (registers `eval pointing|localization`)
from .eval_cmd import eval_app  # noqa: E402,F401  (`eval` group; cli/ground.py adds `eval grounding`)


from onnx_excite.cli import info as _info  # noqa: E402,F401  (registers `models` and `classes`)
from onnx_excite.cli import methods_cmd as _methods_cmd  # noqa: E402,F401  (registers `methods`)
from onnx_excite.cli import ground as _ground  # noqa: E402,F401  (ground, eval grounding)
from onnx_excite.cli import serve_cmds  # noqa: E402,F401  (serving commands register on `app`)
from onnx_excite.cli import bench_explain_cmd  # noqa: E402,F401  (registers `bench-explain`)


def main() -> None:  # console script entry point
    app()


if __name__ == "__main__":
    main()
