"""`--ray [ADDRESS]` and the Ray options shared by `explain` and `eval`, and the run summary."""
from __future__ import annotations

import re
from typing import Optional

import typer
from typer.core import TyperGroup

#: what `--ray` may take as its address; anything else after a bare `--ray` is the next argument
_ADDRESS = re.compile(r"^(auto|local|[a-z][a-z0-9+.-]*://\S+|[\w.-]+:\d+)$")


def with_ray_default(args: list) -> list:
    """``--ray`` with no address (last, or followed by something that is not one) -> ``--ray local``."""
    out = []
    for i, a in enumerate(args):
        out.append(a)
        if a == "--ray" and (i + 1 >= len(args) or not _ADDRESS.match(str(args[i + 1]))):
            out.append("local")
    return out


class RayAwareGroup(TyperGroup):
    """The root command group: lets ``--ray`` stand without a value (a local Ray instance)."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, with_ray_default(list(args)))


RAY = typer.Option(None, "--ray", metavar="[ADDRESS]",
                   help="run on Ray: alone = a local instance; 'auto' = the cluster this machine is in; "
                        "'ray://host:10001' = a remote head (needs the 'ray' extra)")
ACTORS = typer.Option(2, "--actors", help="with --ray: model workers (one model each)")
RAY_BATCH = typer.Option(8, "--ray-batch", help="with --ray: images per call of a model worker")
CPUS = typer.Option(0.5, "--cpus-per-actor", help="with --ray: CPUs each model worker reserves (and its ORT threads)")
GPUS = typer.Option(0.0, "--gpus-per-actor", help="with --ray: GPUs each model worker reserves (e.g. 1 with onnxruntime-gpu)")


def ray_settings(address: Optional[str], actors: int, batch: int, cpus: float, gpus: float):
    if address is None:
        return None
    from onnx_excite.apps.distributed import RaySettings, check_reachable

    settings = RaySettings(address=address, actors=actors, batch_size=batch, cpus_per_actor=cpus, gpus_per_actor=gpus)
    settings.check()
    check_reachable(address)     # before any work: an address that does not answer is one line
    return settings


def print_run_summary(console, what: str, stats) -> None:
    """One line: images done, failed, resumed; seconds and images/s."""
    parts = [f"{stats.done} image(s) {what}"]
    if stats.resumed:
        parts.append(f"{stats.resumed} already done (skipped)")
    if stats.failed:
        parts.append(f"{stats.failed} failed")
    console.print(f"ray: {', '.join(parts)} in {stats.seconds:.1f} s ({stats.images_per_second:.2f} images/s)",
                  markup=False)
