"""`onnx-excite bench-explain`: explain over a folder against the companion graph's own images/s."""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from onnx_excite.cli.app import _methods, app, err, friendly, out


@app.command("bench-explain")
@friendly
def bench_explain(model: str = typer.Argument(..., help="ONNX classifier path, or 'default'"),
                  inputs: List[str] = typer.Argument(..., help="image files, folders or quoted globs"),
                  layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="map layer (repeatable; default: the model profile's)"),
                  target: Optional[List[str]] = typer.Option(None, "--target", "-t", help="class index or name (repeatable)"),
                  top: int = typer.Option(1, help="explain the top-K classes when no --target is given"),
                  method: Optional[List[str]] = typer.Option(None, "--method", "-m", help="attention method (repeatable; default mwp and cmwp)"),
                  batch_size: int = typer.Option(8, help="images per run, for explain and the graph alike"),
                  workers: Optional[List[int]] = typer.Option(None, help="explain's --workers (repeatable: one row each; "
                                                              "default: explain's default, and 1)"),
                  rounds: int = typer.Option(3, help="interleaved rounds (medians are reported)"),
                  size: Optional[int] = typer.Option(None, help="as explain's --size"),
                  outputs: Optional[List[str]] = typer.Option(None, "--outputs", help="explain's --outputs (repeatable: "
                                                              "one row each; default: explain's, every file)"),
                  image_format: Optional[List[str]] = typer.Option(None, "--format", help="explain's --format for the "
                                                                   "overlays and panels (repeatable: one row each; default png)"),
                  device: str = typer.Option("auto", help="cpu, cuda or auto")):
    """Images/s of `explain` over the images (every file written, into a temporary folder) beside the
    companion graph's own images/s (Exciter.explain on the same preprocessed images, same batches), and their ratio."""
    from onnx_excite.apps.bench_explain import run_explain_bench
    from onnx_excite.apps.explain import ExplainOptions, default_workers

    opts = ExplainOptions(model=model, layers=list(layer or []), targets=list(target or []), top=top,
                          methods=_methods(method, False), batch_size=batch_size, size=size,
                          device=device)
    settings = list(dict.fromkeys(workers or [default_workers(), 1]))
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"
    report = run_explain_bench(inputs, opts, workers=settings, rounds=rounds, outputs=outputs or (),
                               formats=image_format or ())
    sizes = ", ".join("x".join(map(str, s)) for s in report.input_sizes)
    table = Table("variant", "images", "median s", "images/s", "x graph",
                  title=f"{Path(model).name}: {report.images} images, input {sizes}, batch {report.batch_size}, "
                        f"{report.runs_per_batch} run(s) per batch, {report.providers[0]}")
    for row in report.rows:
        table.add_row(row.name, str(row.images), f"{statistics.median(row.seconds):.2f}",
                      f"{row.images_per_s:.2f}", f"{report.ratio(row):.2f}")
    out.print(table)
    for row in report.rows[1:]:
        label = row.name.removeprefix("explain folder, ")
        out.print(f"ratio explain folder ({label}) / graph: {report.ratio(row):.2f}", markup=False)
    out.print(f"graph alone: {report.graph.images_per_s:.2f} images/s", markup=False)
    out.print(f"medians of {rounds} interleaved round(s); explain's times include loading the model and writing every "
              f"file; CPUs {os.cpu_count()}, load average at the start {load}", markup=False)
