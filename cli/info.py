"""`onnx-excite models` and `onnx-excite classes`: what the default model is, and class names."""
from __future__ import annotations

from typing import Optional

import typer

from onnx_excite.cli.app import app, friendly, out


@app.command()
@friendly
def models(rebuild: bool = typer.Option(False, "--rebuild", help="build the default model again from the installed weights")):
    """The default model: where it is cached, its profile (input size, mean/std, layer), how to rebuild it."""
    from onnx_excite.models.default import default_model_info, resolve_model_path

    if rebuild:
        out.print(f"rebuilt {resolve_model_path('default', rebuild=True)}", markup=False, soft_wrap=True)
    info = default_model_info()
    p = info.profile
    size = f"{info.size_bytes / 1e6:.1f} MB" if info.size_bytes else ""
    rows = [
        ("model", f"{info.name}: {info.description}, {info.num_classes} classes"),
        ("cached", f"{info.cache_path} ({size})" if info.cached
         else f"{info.cache_path} (not built yet: built on first use, about 2 s)"),
        ("weights", str(info.weights) if info.weights else f"not installed: {info.install_command}"),
        ("input", f"RGB, {p.layout}, any size (symbolic H, W); explain/eval resize the shorter side to "
                  f"{info.map_size}, no crop; classification transform: shorter side {p.input_size}, "
                  f"center crop {p.crop}"),
        ("mean/std", f"pixels {'/ 255' if abs(p.scale * 255 - 1) < 1e-9 else f'x {p.scale:g}'}, mean {', '.join(f'{v:g}' for v in p.mean)}, "
                     f"std {', '.join(f'{v:g}' for v in p.std)}"),
        ("layer", f"{', '.join(p.default_layers)} (default map layer; `onnx-excite layers default` lists all)"),
        ("rebuild", f"{info.rebuild_command} (or delete {info.cache_path.name}: it is rebuilt on next use)"),
    ]
    for key, value in rows:
        out.print(f"{key:9s} {value}", markup=False, soft_wrap=True)   # paths never cut


@app.command()
@friendly
def classes(model: str = typer.Argument("default", help="ONNX classifier, or 'default'"),
            grep: Optional[str] = typer.Option(None, "--grep", help="only classes whose name contains WORD (case-insensitive), or that WORD is a broader name for (horse: sorrel)")):
    """List the class indices and names (each comma-separated synonym is accepted as a --target)."""
    from onnx_excite.classes import find_classes
    from onnx_excite.models.resolve import resolve_model

    found = find_classes(resolve_model(model).class_names(), grep)
    for index, name in found:
        out.print(f"{index:5d}  {name}", markup=False, soft_wrap=True)
    if grep and not found:
        out.print(f"no class name contains {grep!r}", markup=False)
        raise typer.Exit(1)
