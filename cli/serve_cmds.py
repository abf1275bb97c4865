"""Deployment commands: the CUDA coverage check, `export` and `bench-device` (the device benchmark).

Registered on the typer app of :mod:`onnx_excite.cli.app` by a one-line import there.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from onnx_excite.cli.app import _share_option, out
from onnx_excite.errors import ExciteError
from onnx_excite.graph.options import BuildOptions
from onnx_excite.graph.share import parse_share
from onnx_excite.targets.options import ExportOptions


def check_cuda_command(model, provider: str, options: BuildOptions) -> None:
    """`onnx-excite check --provider cuda MODEL`: every node that would leave the GPU, with the reason."""
    import typer

    from onnx_excite.run.cuda_coverage import check_companion

    if provider != "cuda":
        raise ExciteError(f"unknown provider {provider!r}; choose cpu or cuda")
    report = check_companion(model, options)
    for f in report.findings:
        out.print(str(f), markup=False)
    summary = (f"{report.nodes} nodes (forward + {'/'.join(report.methods)} for layer(s) {', '.join(report.layers)}) "
               f"against the CUDA kernels of onnxruntime-gpu {report.table_version}: ")
    if report.fallbacks:
        out.print(summary + f"{len(report.fallbacks)} would fall back to the CPU or not run as written", markup=False)
        raise typer.Exit(1)
    out.print(summary + "all on CUDA", markup=False)


def export_command(model: Path, out_path: Optional[Path], options: ExportOptions) -> None:
    """`onnx-excite export`: :func:`onnx_excite.targets.export.export`, and what it wrote."""
    from onnx_excite.cli.app import _note_logits
    from onnx_excite.targets.export import export

    result = export(str(model), out_path, options)
    _note_logits(result.built.logits_choice)
    for note in result.notes:
        out.print(f"note: {note}", markup=False, soft_wrap=True)
    if result.folder is not None:
        out.print(f"wrote Triton model folder {result.folder} (config.pbtxt, 1/model.onnx)", markup=False, soft_wrap=True)
    if out_path is not None:
        out.print(f"wrote {out_path}", markup=False)
    if result.serving is None:
        built = result.built
        out.print(f"  inputs : {', '.join(built.inputs)}, {built.signal} (N x {built.num_classes})", markup=False)
        out.print(f"  outputs: {built.logits} (logits), " + ", ".join(built.maps.values()), markup=False)
    else:
        fmt = lambda s: f"{s.name} ({'x'.join('N' if i == 0 and d is None else '?' if d is None else str(d) for i, d in enumerate(s.dims))})"  # noqa: E731
        out.print("  inputs : " + ", ".join(fmt(s) for s in result.serving.inputs), markup=False, soft_wrap=True)
        out.print("  outputs: " + ", ".join(fmt(s) for s in result.serving.outputs), markup=False, soft_wrap=True)


def _register():
    import typer
    from rich.table import Table

    from onnx_excite.cli.app import _input_shapes, app, friendly

    @app.command("bench-device")
    @friendly
    def bench_device(model: str = typer.Argument(..., help="ONNX classifier, 'default', or 'vgg16-random'"),
                     layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="map layer (repeatable; "
                                                               "default: the model profile's)"),
                     device: str = typer.Option("auto", help="cpu, cuda (an error when CUDA cannot run) or auto"),
                     batch: Optional[List[int]] = typer.Option(None, "--batch", help="batch sizes (repeatable; default 1 and 32)"),
                     runs: int = typer.Option(20, help="timed runs per variant and batch"),
                     rule: str = typer.Option("positive", help="positive or paper"),
                     input_shape: Optional[str] = typer.Option(None, help="pin the input shape, e.g. '1,3,224,224'"),
                     share_adjoints: str = _share_option()):
        """Latency (batch 1), throughput (images/s, batch 32) and peak device memory of forward vs
        forward+MWP vs forward+c-MWP on the providers in use, as ratios to the forward alone."""
        from onnx_excite.apps.bench_device import DeviceBenchOptions, run_device_bench
        from onnx_excite.models.resolve import resolve_model

        share = parse_share(share_adjoints)
        resolved = resolve_model(model, allow_recipes=True, fully_conv=True)
        layers = list(layer or resolved.default_layers)
        if not layers:
            raise ExciteError("no layer given and the model has no profile default: pass --layer")
        if runs < 1 or any(b < 1 for b in batch or []):
            raise ExciteError("--runs and --batch must be at least 1")
        shapes = _input_shapes(resolved.model, input_shape) if input_shape else None
        options = DeviceBenchOptions(layers=layers, device=device, batches=tuple(batch or (1, 32)), runs=runs, rule=rule,
                                     input_shapes=shapes, share_adjoints=share)
        rows, providers = run_device_bench(resolved.model, options=options)
        out.print("providers: " + ", ".join(providers), markup=False)
        table = Table("variant", "batch", "ms", "img/s", "x fwd img/s", "MiB", "x fwd MiB",
                      title=f"{Path(model).name}, layer {', '.join(layers)}")
        for r in rows:
            table.add_row(r.variant, str(r.batch), f"{r.median_ms:.3f}", f"{r.images_per_s:.1f}", f"{r.throughput_ratio:.2f}",
                          "n/a" if r.peak_mib is None else f"{r.peak_mib:.0f}",
                          "n/a" if r.memory_ratio is None else f"{r.memory_ratio:.2f}")
        out.print(table)


_register()
