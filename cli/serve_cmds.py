"""Deployment commands: the CUDA coverage check, and `throughput` (the device benchmark).

Registered on the typer app of :mod:`onnx_excite.cli.app` by a one-line import there.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from onnx_excite.cli.app import _share_option, out
from onnx_excite.errors import ExciteError
from onnx_excite.graph.share import parse_share


def check_cuda_command(model: Path, provider: str, layer: Optional[List[str]], output: Optional[str]) -> None:
    """`onnx-excite check --provider cuda MODEL`: every node that would leave the GPU, with the reason."""
    import typer

    from onnx_excite.run.cuda_coverage import check_companion

    if provider != "cuda":
        raise ExciteError(f"unknown provider {provider!r}; choose cpu or cuda")
    report = check_companion(str(model), layers=layer, output=output)
    for f in report.findings:
        out.print(str(f), markup=False)
    summary = (f"{report.nodes} nodes (forward + {'/'.join(report.methods)} for layer(s) {', '.join(report.layers)}) "
               f"against the CUDA kernels of onnxruntime-gpu {report.table_version}: ")
    if report.fallbacks:
        out.print(summary + f"{len(report.fallbacks)} would fall back to the CPU or not run as written", markup=False)
        raise typer.Exit(1)
    out.print(summary + "all on CUDA", markup=False)


def export_command(model: Path, out_path: Optional[Path], layers, methods, rule, channels, input_shapes,
                   signal, map_size, resize, normalize, fp16, dynamic_batch, serving_dir, name, max_batch_size,
                   logits=None, share_adjoints: str = "dense") -> None:
    """`onnx-excite export`: build, post-process, write the model (and the Triton folder), verify."""
    import onnx

    from onnx_excite.targets.serving import export_model, write_triton_repository

    if out_path is None and serving_dir is None:
        raise ExciteError("give -o/--output FILE and/or --serving DIR")
    from onnx_excite.io.checks import output_dir, output_file
    from onnx_excite.cli.app import _note_logits
    from onnx_excite.models.default import layers_or_default

    share = parse_share(share_adjoints)
    layers = layers_or_default(str(model), layers)
    if out_path is not None:
        output_file(out_path, "-o", protect=[model])
    if serving_dir is not None:
        output_dir(serving_dir, "--serving")
    exp = export_model(str(model), layers, methods=methods, rule=rule, channels=channels, input_shapes=input_shapes,
                       signal=signal, map_size=map_size, resize=resize, normalize=normalize, fp16=fp16,
                       dynamic_batch=dynamic_batch, serving=serving_dir is not None, logits=logits,
                       share_adjoints=share)
    _note_logits(exp.built.logits_choice)
    for note in exp.notes:
        out.print(f"note: {note}", markup=False, soft_wrap=True)
    written = []
    if out_path is not None:
        try:
            if exp.serving is None:
                exp.built.save(out_path)
            else:
                onnx.save(exp.serving.model, str(out_path))
        except OSError as exc:
            raise ExciteError(f"-o {out_path}: cannot write ({exc.strerror or type(exc).__name__})") from None
        written.append(out_path)
    if serving_dir is not None:
        folder = write_triton_repository(exp.serving, serving_dir, name or f"{model.stem}_excite".replace(" ", "_"),
                                         max_batch_size=max_batch_size)
        written.append(folder / "1" / "model.onnx")
        out.print(f"wrote Triton model folder {folder} (config.pbtxt, 1/model.onnx)", markup=False, soft_wrap=True)
    for path in written:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:  # a bug of ours, not of the user's model
            path.unlink()
            raise ExciteError(f"internal: the built model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    if out_path is not None:
        out.print(f"wrote {out_path}", markup=False)
    if exp.serving is None:
        built = exp.built
        out.print(f"  inputs : {', '.join(built.inputs)}, {built.signal} (N x {built.num_classes})", markup=False)
        out.print(f"  outputs: {built.logits} (logits), " + ", ".join(built.maps.values()), markup=False)
    else:
        fmt = lambda s: f"{s.name} ({'x'.join('N' if i == 0 and d is None else '?' if d is None else str(d) for i, d in enumerate(s.dims))})"  # noqa: E731
        out.print("  inputs : " + ", ".join(fmt(s) for s in exp.serving.inputs), markup=False, soft_wrap=True)
        out.print("  outputs: " + ", ".join(fmt(s) for s in exp.serving.outputs), markup=False, soft_wrap=True)


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
        from onnx_excite.apps.bench_device import run_device_bench
        from onnx_excite.apps.explain import resolve_model
        from onnx_excite.models.synthetic import RECIPES

        share = parse_share(share_adjoints)

        if model in RECIPES:
            source, layers = RECIPES[model](), list(layer or [])
        else:
            source, profile = resolve_model(model)
            layers = list(layer or profile.default_layers)
        if not layers:
            raise ExciteError("no layer given and the model has no profile default: pass --layer")
        if runs < 1 or any(b < 1 for b in batch or []):
            raise ExciteError("--runs and --batch must be at least 1")
        shapes = _input_shapes(source, input_shape) if input_shape and model not in RECIPES else None
        rows, providers = run_device_bench(source, layers, device=device, batches=tuple(batch or (1, 32)),
                                           runs=runs, rule=rule, input_shapes=shapes, share_adjoints=share)
        out.print("providers: " + ", ".join(providers), markup=False)
        table = Table("variant", "batch", "ms", "img/s", "x fwd img/s", "MiB", "x fwd MiB",
                      title=f"{Path(model).name}, layer {', '.join(layers)}")
        for r in rows:
            table.add_row(r.variant, str(r.batch), f"{r.median_ms:.3f}", f"{r.images_per_s:.1f}", f"{r.throughput_ratio:.2f}",
                          "n/a" if r.peak_mib is None else f"{r.peak_mib:.0f}",
                          "n/a" if r.memory_ratio is None else f"{r.memory_ratio:.2f}")
        out.print(table)


_register()
