"""`bench --compare torchray --compare zennit`: the PyTorch peers' table (see onnx_excite/bench_torch.py)."""
from __future__ import annotations

from rich.table import Table

COMPARE_HELP = ("also run a PyTorch peer on the same weights (onnx2torch) and time its excitation backprop at the "
                "first map layer against its own forward: torchray (EB and contrastive EB) or zennit (its "
                "ExcitationBackprop composite); repeatable; needs pip install 'onnx-excite[bench]'")


def render_peers(report, out) -> None:
    """The peers' rows (median ms, x their own torch forward), versions and what each runs."""
    table = Table("library", "variant", "median ms", "min ms", "x own forward",
                  title=f"PyTorch peers, same weights, layer {report.layer}, torch threads {report.threads} "
                        f"(= ORT intra-op threads)")
    for row in report.rows:
        table.add_row(row.library, row.name, f"{row.median_ms:.3f}", f"{row.min_ms:.3f}", f"{row.ratio:.2f}")
    out.print(table)
    out.print("versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()), markup=False)
    for note in report.notes:
        out.print(f"note: {note}", markup=False, soft_wrap=True)
