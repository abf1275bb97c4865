"""Deployment commands: the CUDA coverage check, and `throughput` (the device benchmark).

Registered on the typer app of :mod:`onnx_excite.cli.app` by a one-line import there.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from onnx_excite.cli.app import err, out
from onnx_excite.errors import ExciteError


def check_cuda_command(model: Path, provider: str, layer: Optional[List[str]], output: Optional[str]) -> None:
    """`onnx-excite check --provider cuda MODEL`: every node that would leave the GPU, with the reason."""
    import typer

    from onnx_excite.cuda_coverage import check_companion

    if provider != "cuda":
        raise ExciteError(f"unknown provider {provider!r}; choose cpu or cuda")
    report = check_companion(str(model), layers=layer, output=output)
    for f in report.findings:
        out.print(str(f), markup=False)
    summary = (f"{report.nodes} nodes (forward + {'/'.join(report.methods)} for layer(s) {', '.join(report.layers)}) "
               f"against the CUDA kernels of onnxruntime-gpu {report.table_version}: ")
    if report.fallbacks:
        out.print(summary + f"{len(report.fallbacks)} would fall back to the CPU", markup=False)
        raise typer.Exit(1)
    out.print(summary + "all on CUDA", markup=False)
