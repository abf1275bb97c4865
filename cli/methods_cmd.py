"""`onnx-excite methods`: the registered attention methods (onnx_excite.methods.METHODS) and the
black-box ones (BLACK_BOX: no companion graph)."""
from __future__ import annotations

import typer
from rich.table import Table

from onnx_excite.cli.app import app, friendly, out


@app.command("methods")
@friendly
def methods(detail: bool = typer.Option(False, "--detail", "-d",
                                        help="also show each method's rule per op family, dual, top signal and mass"),
            rule: str = typer.Option("positive", help="excitation rule whose parts the MWP family shows (positive or paper)")):
    """List the attention methods with a one-line description (kind: in the companion graph, or black box)."""
    from onnx_excite.methods import method_table

    rows = method_table(rule=rule)
    if not detail:
        table = Table("method", "kind", "map", "blur", "description", title="attention methods")
        for row in rows:
            table.add_row(row["method"], row["kind"], row["map"], row["blur"], row["description"])
        out.print(table)
    else:
        for row in rows:
            out.print(f"{row['method']}: {row['description']}", markup=False)
            keys = ("kind", "linear", "pool", "add", "relu", "top", "dual", "map", "blur", "mass", "layers", "values",
                    "contrastive")
            for key in keys if row["kind"] == "graph" else ("kind", "top", "map", "blur", "layers", "values"):
                out.print(f"    {key:11s} {row[key]}", markup=False)
