"""`onnx-excite eval pointing|localization|faithfulness`: parse, run the evaluation, render the EvalResult."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from onnx_excite.methods import BASELINES, method_help

from .app import MASK_BATCH, MASK_CELLS, MASK_P, MASKS, _logits_option, app, err, friendly, out
from .ray_options import ACTORS, CPUS, GPUS, RAY, RAY_BATCH, print_run_summary, ray_settings

eval_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The paper's evaluations: pointing game and dominant-object localization; faithfulness (deletion / insertion).")
app.add_typer(eval_app, name="eval")


def print_result(res, out, err) -> None:
    """The overall table, the unmapped classes (loudly), counts, files and data problems."""
    from onnx_excite.apps.eval.report import unmapped_line

    choice = res.settings.get("logits")
    if choice and len(choice.get("candidates", [])) > 1 and choice.get("reason") != "given":
        err.print(f"note: logits = {choice['output']!r} ({choice['reason']}; outputs: {', '.join(choice['candidates'])}); "
                  f"choose another with --logits", markup=False, soft_wrap=True)
    header, rows = res.overall_table()
    table = Table(*header, title=f"{res.protocol}: {res.counts['images_evaluated']} of {res.counts['images_read']} "
                                 f"images evaluated, {res.counts['items']} {res.unit}")
    for row in rows:
        table.add_row(*row)
    out.print(table)
    if res.unmapped:
        err.print(f"warning: {len(res.unmapped)} dataset class(es) have no model mapping and were NOT evaluated "
                  f"(mapping: {res.settings.get('mapping')}); skipped {res.unit} in brackets: {unmapped_line(res)}",
                  markup=False, soft_wrap=True)
        err.print("  to evaluate them, map them to model outputs in a --mapping file (examples: "
                  "onnx_excite/data/mappings/)", markup=False)
    c = res.counts
    out.print(f"{res.protocol} done in {res.seconds:.1f} s: {c['maps_computed']} image(s) computed, "
              f"{c['maps_cached']} from the cache, {c['skipped']} skipped ({c['images_failed']} unreadable)", markup=False)
    for path in res.files.values():
        out.print(f"  {path}", markup=False)
    if res.problems:
        err.print(f"{len(res.problems)} problem(s) in the data were skipped (listed in results.json); first: "
                  f"{res.problems[0]}", markup=False, soft_wrap=True)


#: seconds between the progress lines printed when stderr is not a terminal (a log, a pipe)
PROGRESS_EVERY_S = 10.0


class _Progress:
    """``on_progress(done, total)`` for the library: a bar with images/s and the ETA on a
    terminal, a line every PROGRESS_EVERY_S seconds otherwise; started with the first report."""

    def __init__(self, console, description: str):
        self.console, self.description, self.bar = console, description, None

    def __call__(self, done, total) -> None:
        if self.bar is None:
            from onnx_excite.io.progress import ImageProgress

            self.bar = ImageProgress(self.console, self.description, total, minimum=1, lines=True,
                                     every_s=PROGRESS_EVERY_S)
            self.bar.__enter__()
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _eval(protocol: str, data: Path, fmt: str, model: str, methods: str, layer: Optional[List[str]],
          mapping: Optional[str], out_dir: Path, tolerance: float, size: int, rule: str, ray, actors: int,
          ray_batch: int, cpus: float, gpus: float, logits: Optional[str] = None,
          blur: bool = True, device: str = "auto", rise=None, seed: int = 0):
    from onnx_excite.apps.eval import run_evaluation

    settings = ray_settings(ray, actors, ray_batch, cpus, gpus)
    kwargs = dict(protocol=protocol, data=str(data), fmt=fmt, model=model,
                  methods=[m.strip() for m in methods.split(",") if m.strip()], layers=layer or None,
                  mapping=mapping, out_dir=str(out_dir), tolerance=tolerance, size=size, rule=rule, ray=settings,
                  logits=logits, blur=blur, device=device, rise=rise, seed=seed)
    t0 = time.perf_counter()
    if settings is None:  # one process: our own progress bar, started with the first image; on Ray, Ray Data's
        on_progress = _Progress(err, protocol)
        try:
            res = run_evaluation(**kwargs, on_progress=on_progress)
        finally:
            on_progress.close()
    else:
        res = run_evaluation(**kwargs)
    print_result(res, out, err)
    if settings is not None:
        from onnx_excite.apps.distributed import RunStats

        read, failed = res.counts["images_read"], res.counts["images_failed"]
        stats = RunStats(images=read, done=read - failed, failed=failed, seconds=time.perf_counter() - t0)
        print_run_summary(out, "evaluated", stats)


_DATA = typer.Option(..., "--data", help="dataset folder (VOC layout) or COCO instances JSON")
_FMT = typer.Option("voc", "--format", help="voc or coco")
_MODEL = typer.Option("default", "--model", help="ONNX classifier or 'default'")
_METHODS = typer.Option("cmwp,mwp,center", "--methods",
                        help=f"comma-separated attention methods (see `onnx-excite methods`: {method_help()}) "
                             f"and/or the {', '.join(BASELINES)} baseline")
_BLUR = typer.Option(True, "--blur/--no-blur",
                     help="the paper's Gaussian blur (sigma = 0.02 max(W, H)) of grad/deconv/guided/LRP maps before scoring")
_LAYER = typer.Option(None, "--layer", "-l", help="map layer (default: the model profile's)")
_MAPPING = typer.Option(None, "--mapping", help="dataset class -> model output indices (JSON file or bundled name)")
_OUT = typer.Option(Path("eval_out"), "-o", "--output", help="results folder (maps are cached there)")
_RULE = typer.Option("positive", help="positive or paper")
_DEVICE = typer.Option("auto", help="cpu, cuda (an error when CUDA cannot run) or auto (CUDA when available)")
_SEED = typer.Option(0, help="seed of RISE's masks (and of the localization's held-out split)")


def _rise(masks: int, cells: int, p: float, seed: int, batch: int):
    from onnx_excite.apps.rise import RiseSettings

    return RiseSettings(masks=masks, cells=cells, p=p, seed=seed, batch_size=batch)


@eval_app.command("pointing")
@friendly
def eval_pointing(data: Path = _DATA, fmt: str = _FMT, model: str = _MODEL, methods: str = _METHODS,
                  layer: Optional[List[str]] = _LAYER, mapping: Optional[str] = _MAPPING, out_dir: Path = _OUT,
                  tolerance: float = typer.Option(15, help="hit tolerance in pixels"),
                  size: int = typer.Option(224, help="shorter side of the resized image"),
                  rule: str = _RULE, ray: Optional[str] = RAY, actors: int = ACTORS, ray_batch: int = RAY_BATCH,
                  cpus_per_actor: float = CPUS, gpus_per_actor: float = GPUS,
                  logits: Optional[str] = _logits_option(), blur: bool = _BLUR, device: str = _DEVICE,
                  masks: int = MASKS, mask_cells: int = MASK_CELLS, mask_p: float = MASK_P, seed: int = _SEED,
                  mask_batch: int = MASK_BATCH):
    """Pointing game (all and difficult subsets, with the center baseline)."""
    _eval("pointing", data, fmt, model, methods, layer, mapping, out_dir, tolerance, size, rule, ray, actors,
          ray_batch, cpus_per_actor, gpus_per_actor, logits, blur, device,
          _rise(masks, mask_cells, mask_p, seed, mask_batch), seed)

@eval_app.command("localization")
@friendly
def eval_localization(data: Path = _DATA, fmt: str = _FMT, model: str = _MODEL, methods: str = _METHODS,
                      layer: Optional[List[str]] = _LAYER, mapping: Optional[str] = _MAPPING, out_dir: Path = _OUT,
                      size: int = typer.Option(224, help="square input size"), rule: str = _RULE,
                      ray: Optional[str] = RAY, actors: int = ACTORS, ray_batch: int = RAY_BATCH,
                      cpus_per_actor: float = CPUS, gpus_per_actor: float = GPUS,
                      logits: Optional[str] = _logits_option(), blur: bool = _BLUR, device: str = _DEVICE,
                      masks: int = MASKS, mask_cells: int = MASK_CELLS, mask_p: float = MASK_P, seed: int = _SEED,
                      mask_batch: int = MASK_BATCH):
    """Dominant-object localization (alpha * mean threshold, alpha chosen on a held-out split)."""
    _eval("localization", data, fmt, model, methods, layer, mapping, out_dir, 15, size, rule, ray, actors,
          ray_batch, cpus_per_actor, gpus_per_actor, logits, blur, device,
          _rise(masks, mask_cells, mask_p, seed, mask_batch), seed)



_FAITH_METHODS = typer.Option("mwp,cmwp,center,random", "--methods",
                              help=f"comma-separated attention methods (see `onnx-excite methods`: {method_help()}) "
                                   "and/or the center and random (seeded) baselines")


@eval_app.command("faithfulness")
@friendly
def eval_faithfulness(data: Path = typer.Option(..., "--data", help="VOC folder, COCO instances JSON or a plain image folder"),
                      fmt: str = typer.Option("auto", "--format", help="auto, voc, coco or folder"),
                      model: str = _MODEL, methods: str = _FAITH_METHODS,
                      layer: Optional[List[str]] = _LAYER, mapping: Optional[str] = _MAPPING, out_dir: Path = _OUT,
                      target: str = typer.Option("auto", help="label (the annotated classes, mapped as by pointing) "
                                                              "or top1 (the model's top class; auto: label on VOC / "
                                                              "COCO, top1 on an image folder)"),
                      steps: int = typer.Option(32, help="steps from no pixel to all pixels changed"),
                      step_pixels: Optional[int] = typer.Option(None, "--step-pixels",
                                                                help="pixels changed per step (instead of --steps)"),
                      baseline: str = typer.Option("zero", help="what deleted pixels become: zero (0 after the "
                                                                "model's normalisation), mean (the image's) or blur"),
                      blur_sigma: float = typer.Option(5.0, help="sigma in input pixels of the blurred copy "
                                                                 "insertion starts from"),
                      imputation: str = typer.Option("fixed", help="fixed (deletion and insertion) or road (ROAD's "
                                                                   "noisy linear imputation: MoRF and LeRF)"),
                      batch_size: int = typer.Option(32, "--batch-size", help="perturbed inputs per forward batch"),
                      size: int = typer.Option(224, help="shorter side of the resized image (square: both sides)"),
                      square: bool = typer.Option(False, "--square/--shorter",
                                                  help="resize to size x size (the localization's input and map cache) "
                                                       "instead of the shorter side (the pointing game's)"),
                      limit: Optional[int] = typer.Option(None, help="evaluate only the first N images"),
                      seed: int = typer.Option(0, help="seed of the random map, the tie order, the bootstrap and "
                                                       "RISE's masks"),
                      bootstrap: int = typer.Option(2000, help="bootstrap resamples"),
                      rule: str = _RULE, logits: Optional[str] = _logits_option(), blur: bool = _BLUR,
                      device: str = _DEVICE, masks: int = MASKS, mask_cells: int = MASK_CELLS,
                      mask_p: float = MASK_P, mask_batch: int = MASK_BATCH):
    """Deletion and insertion (RISE), or ROAD's MoRF and LeRF: the target's probability as the
    most salient pixels go, areas with bootstrap intervals and paired tests."""
    from onnx_excite.apps.eval.faithfulness import run_faithfulness
    from onnx_excite.apps.eval.perturb import Perturbation

    pert = Perturbation(steps=steps, step_pixels=step_pixels, baseline=baseline, blur_sigma=blur_sigma,
                        imputation=imputation, batch_size=batch_size)
    on_progress = _Progress(err, "faithfulness")
    try:
        res = run_faithfulness(str(data), fmt, model, [m.strip() for m in methods.split(",") if m.strip()],
                               layer or None, mapping, str(out_dir), size, resize="square" if square else "shorter",
                               target=target, perturbation=pert, rule=rule, logits=logits, blur=blur, device=device,
                               seed=seed, n_boot=bootstrap, limit=limit, on_progress=on_progress,
                               rise=_rise(masks, mask_cells, mask_p, seed, mask_batch))
    finally:
        on_progress.close()
    print_result(res, out, err)
    c = res.counts
    out.print(f"  {c['images_per_s']} images/s, {c['forward_inputs']} perturbed inputs ({c['inputs_per_s']} inputs/s)",
              markup=False)
