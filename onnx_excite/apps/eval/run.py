"""Run the pointing game or dominant-object localization on a dataset with a model.

:func:`run_evaluation` reads the dataset, resolves the class mapping, and for every image asks
the protocol's scorer (:mod:`.scoring`) which classes to explain, computes their maps
(:mod:`.compute`; cached per image by :mod:`.cache`, so re-runs with another tolerance, more
methods or after an interruption reuse them), scores them and writes ``results.json``,
``results.md``, ``results.csv`` and PNG plots. The images are evaluated in this process, or on
a Ray cluster with ``ray=RaySettings(...)`` (:mod:`onnx_excite.apps.distributed`): the same
per-image function runs on the workers, so the results are the same.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ...errors import ExciteError
from . import metrics
from ..rise import RiseSettings
from .cache import MapCache, missing_classes, missing_rise, rise_key
from .compute import DEFAULT_MODEL_LAYER, MapComputer, ModelError, ModelSpec, learn_num_classes, model_spec
from .datasets import ImageRecord, read_dataset
from .mapping import ClassMapping, resolve_mapping
from .report import write_reports
from .result import EvalResult, load_results
from .scoring import LocalizationScorer, PointingScorer

__all__ = ["run_evaluation", "load_results", "EvalPlan", "ImageOutcome", "evaluate_image", "ModelError",
           "PROTOCOLS", "METHODS", "DEFAULT_MODEL_LAYER"]

PROTOCOLS = ("pointing", "localization")
from ...methods import BASELINES, BLACK_BOX, METHODS as _REGISTERED  # noqa: E402

EXCITE_METHODS = tuple(_REGISTERED)   # every registered attention method (onnx-excite methods)
METHODS = EXCITE_METHODS + tuple(BLACK_BOX) + tuple(BASELINES)

#: on_progress(images done, images in all)
ProgressFn = Callable[[int, int], None]
#: on_error(image id, reason): an image that could not be evaluated (the run goes on)
ErrorFn = Callable[[str, str], None]


def result_labels(methods: Sequence[str], layers: Sequence[str]) -> list[tuple]:
    """(label, method, layer) per result row: ``cmwp:features.13``, ..., ``rise``, ``center``."""
    out = []
    for m in methods:
        if m in BASELINES or m in BLACK_BOX:
            out.append((m, m, None))
        else:
            out.extend((f"{m}:{l}", m, l) for l in layers)
    return out


@dataclass
class EvalPlan:
    """Everything needed to evaluate one image, in any process (plain, picklable data)."""

    scorer: object                   # PointingScorer or LocalizationScorer
    mapping: ClassMapping
    spec: Optional[ModelSpec] = None  # None: no map method (center only); spec.methods: the graph methods
    cache: Optional[MapCache] = None
    batch_size: int = 16
    rise: Optional[RiseSettings] = None   # RISE's settings when "rise" is evaluated

    def missing(self, rec: ImageRecord, classes, stored: dict) -> tuple:
        """(classes whose graph maps are missing, classes whose RISE maps are missing)."""
        graph = (missing_classes(stored, classes, self.mapping.indices, self.spec.methods, self.spec.layers)
                 if self.spec.methods else [])
        rise = missing_rise(stored, classes, self.mapping.indices, self.rise) if self.rise is not None else []
        return graph, rise

    def needs_input(self, rec: ImageRecord) -> bool:
        """Whether this image's maps must be computed (its pixels are needed)."""
        if self.spec is None:
            return False
        sel = self.scorer.select(rec)
        if sel.skip:
            return False
        stored = self.cache.load(rec) if self.cache else {}
        return any(self.missing(rec, sel.classes, stored))


@dataclass
class ImageOutcome:
    """What one image contributed: scored items, or why it was skipped; unmapped classes seen."""

    image: str
    items: list = field(default_factory=list)
    unmapped: list = field(default_factory=list)
    skipped: Optional[str] = None
    failed: bool = False            # the image could not be read
    computed: bool = False          # maps computed now
    cached: bool = False            # maps read from the cache
    logits: Optional[dict] = None   # which output was explained, and how it was chosen (maps computed now)


def evaluate_image(rec: ImageRecord, plan: EvalPlan, computer: Optional[MapComputer],
                   arr: Optional[np.ndarray] = None) -> ImageOutcome:
    """Select, compute (or read from the cache) and score one image. An unreadable image gives an
    outcome with ``skipped`` set; a :class:`ModelError` propagates (it stops the run)."""
    sel = plan.scorer.select(rec)
    out = ImageOutcome(rec.id, unmapped=sel.unmapped, skipped=sel.skip)
    if sel.skip:
        return out
    maps = {}
    if plan.spec is not None:
        spec = plan.spec
        stored = plan.cache.load(rec) if plan.cache else {}
        todo, rise_todo = plan.missing(rec, sel.classes, stored)
        if todo or rise_todo:
            try:
                if arr is None:
                    arr = spec.input_array(rec.path)
            except ModelError:
                raise
            except ExciteError as exc:
                out.skipped, out.failed = str(exc), True
                return out
            if todo:
                stored.update(computer.compute(arr, todo, plan.mapping, plan.batch_size))
                out.logits = computer.logits_record()
            if rise_todo:
                stored.update(computer.compute_rise(arr, rise_todo, plan.mapping, plan.rise))
            out.computed = True
            if plan.cache is not None:
                plan.cache.save(rec, stored)
        else:
            out.cached = True
        maps = {(m, l, c): stored[f"{m}|{l}|{c}"] for m in spec.methods for l in spec.layers for c in sel.classes}
        if plan.rise is not None:
            maps.update({("rise", None, c): stored[rise_key(plan.rise, c)] for c in sel.classes})
    out.items = plan.scorer.score(rec, sel.classes, maps)
    return out


def run_evaluation(protocol: str = "pointing", data=None, fmt: str = "voc", model: Optional[str] = "default",
                   methods: Sequence[str] = ("cmwp", "mwp", "center"), layers: Optional[Sequence[str]] = None,
                   mapping=None, out_dir="eval_out", tolerance: float = 15, size: int = 224, *,
                   split: Optional[str] = None, image_dir=None, rule: str = "positive", held_out: float = 0.2,
                   seed: int = 0, limit: Optional[int] = None, ids: Optional[Sequence[str]] = None,
                   batch_size: int = 16, cache: bool = True, dominant: str = "all",
                   on_progress: Optional[ProgressFn] = None, on_error: Optional[ErrorFn] = None,
                   ray=None, logits: Optional[str] = None, blur: bool = True, device: str = "auto",
                   rise: Optional[RiseSettings] = None) -> EvalResult:
    """Evaluate ``methods`` on a dataset; returns the :class:`EvalResult` (also written to ``out_dir``).

    * ``protocol``: ``"pointing"`` (input: shorter side resized to ``size``) or
      ``"localization"`` (input: ``size`` x ``size``; alpha chosen on a seeded ``held_out``
      fraction of the images, error on the rest);
    * ``data`` / ``fmt``: a VOC folder (``split``: ImageSets/Main/<split>.txt, default test/val/
      trainval/all) or a COCO instances JSON (``image_dir``: where its images are);
    * ``model``: an ONNX classifier path or ``"default"`` (MobileNetV2, layer ``features.13``);
      not loaded when ``methods`` is only ``["center"]`` and no ``mapping`` is given;
    * ``mapping``: a mapping file, a bundled mapping name (``"voc_sample_to_imagenet"``), a dict,
      or None (class names that are indices or model class names map directly); classes
      without a mapping are skipped and listed in ``EvalResult.unmapped``; without a model
      (center only) every class is evaluated;
    * ``dominant`` (localization): the dominant class is the largest among ``"all"`` classes
      present (an image whose dominant class is unmapped is skipped, as in the paper's
      definition) or among the ``"mapped"`` ones;
    * ``limit`` / ``ids``: evaluate only the first ``limit`` images / these ids;
    * ``on_progress(done, total)``, ``on_error(image id, reason)``: called as images finish;
    * ``ray``: a :class:`onnx_excite.apps.distributed.RaySettings` to evaluate on a Ray cluster;
    * ``logits``: the output explained (default: :func:`~onnx_excite.graph.canonicalize.resolve_logits`
      chooses; the choice is in ``res.settings["logits"]``);
    * ``blur``: the paper's Gaussian blur (sigma = 0.02 * max(W, H) of the upsampled map) for
      the methods declared with ``blur`` (grad, deconv, guided, LRP, c-grad, c-deconv);
      False scores every map unblurred;
    * ``rise``: the :class:`~onnx_excite.apps.rise.RiseSettings` of the black-box ``"rise"``
      method (default: 1000 masks, 7 x 7 cells, p 0.5, seeded by ``seed``); its maps, at the
      model input's resolution, are cached beside the others, keyed by these settings.
    """
    t0 = time.perf_counter()
    if protocol not in PROTOCOLS:
        raise ExciteError(f"unknown protocol {protocol!r}; use pointing or localization")
    methods = list(dict.fromkeys(str(m).lower() for m in methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        import difflib

        close = difflib.get_close_matches(bad[0], METHODS, n=1) if bad else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ExciteError(f"unknown method {bad[0] if bad else '(none)'!r}{hint}; use {', '.join(METHODS)}")
    excite = [m for m in methods if m in EXCITE_METHODS]
    rise = (rise if rise is not None else RiseSettings(seed=seed)) if "rise" in methods else None
    if dominant not in ("all", "mapped"):
        raise ExciteError(f"dominant must be 'all' or 'mapped', not {dominant!r}")
    if data is None:
        raise ExciteError("no dataset given")
    from ...io.checks import at_least, output_dir

    size = at_least(size, 1, "--size")
    at_least(batch_size, 1, "--batch-size")
    out_dir = output_dir(out_dir)

    records, problems = read_dataset(data, fmt, split=split, image_dir=image_dir)
    if ids is not None:
        wanted = set(ids)
        records = [r for r in records if r.id in wanted]
    if limit is not None:
        records = records[:int(limit)]
    dataset_classes = sorted({o.name for r in records for o in r.objects})

    spec = None
    if excite or rise or mapping is not None:
        if model is None:
            raise ExciteError("attention methods and a mapping need a model (a path or 'default')")
        from ...run.devices import providers_for

        providers_for(device)   # --device cuda without CUDA: fail before any work
        spec = model_spec(model, layers, excite, rule, protocol, size, logits=logits, device=device)
        if excite:
            learn_num_classes(spec, records)
        cmap = resolve_mapping(mapping, dataset_classes, spec.num_classes, spec.class_names)
        evaluated = set(cmap.indices)
    else:
        cmap = ClassMapping(source="<none: center only, every class>")
        evaluated = set(dataset_classes)
    layer_list = spec.layers if (spec and excite) else []
    labels = result_labels(methods, layer_list)

    if protocol == "pointing":
        scorer = PointingScorer(labels, evaluated, tolerance, blur=bool(blur))
    else:
        among = evaluated if dominant == "mapped" else None
        eligible = [r.id for r in records if metrics.dominant_class(r, among) in evaluated]
        scorer = LocalizationScorer(labels, evaluated, metrics.held_out_ids(eligible, held_out, seed),
                                    spec.size if spec else int(size), among, blur=bool(blur))
    plan = EvalPlan(scorer, cmap, spec if (excite or rise) else None,
                    MapCache(out_dir / "cache", protocol, spec.meta) if (cache and spec and (excite or rise)) else None,
                    batch_size, rise)

    if ray is not None:
        from ..distributed import evaluate_on_ray

        outcomes = evaluate_on_ray(records, plan, ray, on_progress=on_progress)
    else:
        outcomes = []
        computer = MapComputer(plan.spec) if plan.spec is not None else None
        for done, rec in enumerate(records, 1):
            outcomes.append(evaluate_image(rec, plan, computer))
            if on_progress:
                on_progress(done, len(records))
    res = assemble(protocol, records, outcomes, plan, problems, cmap)
    if on_error:
        for s in res.skipped:
            on_error(s["image"], s["reason"])
    res.settings = {"data": str(data), "fmt": fmt, "model": None if spec is None else str(model),
                    "methods": methods, "labels": [lab for lab, _, _ in labels], "layers": list(layer_list),
                    "rule": rule, "mapping": cmap.source, "tolerance": tolerance, "size": size,
                    "input": spec.describe_input() if spec else ("-" if protocol == "pointing" else f"{size}x{size}"),
                    "held_out": held_out, "seed": seed, "alphas": [float(a) for a in metrics.ALPHAS],
                    "split": split, "limit": limit, "dominant": dominant,
                    "logits": next((o.logits for o in outcomes if o.logits), None), "blur": bool(blur),
                    **({"rise": rise.to_json()} if rise else {})}
    res.seconds = round(time.perf_counter() - t0, 3)
    write_results(res, out_dir)
    return res


def assemble(protocol: str, records: Sequence[ImageRecord], outcomes: Sequence[ImageOutcome], plan: EvalPlan,
             problems: list, cmap: ClassMapping) -> EvalResult:
    """One result from the per-image outcomes (in the order of ``records``)."""
    items, skipped = [], []
    unmapped = collections.Counter()
    for o in outcomes:
        items.extend(o.items)
        unmapped.update(o.unmapped)
        if o.skipped:
            skipped.append({"image": o.image, "reason": o.skipped})
    counts = {"images_read": len(records), "images_evaluated": sum(1 for o in outcomes if o.items),
              "items": len(items), "items_difficult": sum(1 for it in items if it.get("difficult")),
              "skipped": len(skipped), "images_failed": sum(o.failed for o in outcomes),
              "maps_computed": sum(o.computed for o in outcomes),
              "maps_cached": sum(o.cached for o in outcomes)}
    return EvalResult(protocol=protocol, settings={}, counts=counts, summary=plan.scorer.summarize(items),
                      items=items, problems=list(problems), skipped=skipped,
                      unmapped={c: int(unmapped.get(c, 0)) for c in sorted(cmap.unmapped)},
                      unmapped_reasons=dict(sorted(cmap.unmapped.items())), mapping=cmap.to_json())


def write_results(res: EvalResult, out_dir) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_reports(res, out_dir)
    files["json"] = str(out_dir / "results.json")
    res.files = files
    res.save(out_dir / "results.json")
