"""Faithfulness of attention maps: deletion and insertion (Petsiuk et al., RISE, BMVC 2018),
or ROAD's MoRF / LeRF (Rong et al., ICML 2022), on a VOC / COCO dataset or a plain image folder.

For each (image, target) pair and each method, the map (upsampled to the model input, blurred
where the method says so, as the pointing game scores it) orders the input pixels, most
salient first; :mod:`.perturb` changes them step by step and records the target's softmax
probability after each step. The area under each curve (trapezoid over the fraction of pixels
changed, in [0, 1]) is the item's score: a low deletion / MoRF area and a high insertion /
LeRF area mean the map found what the model uses.

Targets (``target``): ``label``: every annotated class of a VOC / COCO image that maps to the
model's outputs (the mapping of the other protocols; a class of several outputs scores their
summed probability); ``top1``: the model's own top class on the unperturbed image (the only
choice for a plain folder). Besides the methods of :mod:`onnx_excite.methods` (the black-box
``rise`` included: its masked forwards run through the same session as the curves), ``center``
(a cone falling from the centre, as in the localization) and ``random`` (uniform noise,
seeded per image) are scored. Ties in a map are broken by one seeded random order per image.

Maps come from the cache of the pointing game (``<out>/cache/pointing``; with
``resize="square"`` that of the localization), so a folder already evaluated reuses them.
The result is an :class:`EvalResult` (``protocol="faithfulness"``) with per-method mean areas
and seeded 95 % bootstrap intervals, paired comparisons of every two methods (paired bootstrap
of the mean difference and Wilcoxon signed-rank, Holm-adjusted), written as results.md,
results.csv, comparisons.csv, results.json and faithfulness_curves.png.
"""
from __future__ import annotations

import collections
import hashlib
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ...errors import ExciteError
from ...methods import BLACK_BOX, METHODS
from ..rise import RiseSettings
from . import metrics, stats
from .cache import MapCache, missing_classes, missing_rise, rise_key
from .compute import MapComputer, ModelError, model_spec, rise_entries
from .datasets import IMAGE_SUFFIXES, ImageRecord, _image_size, read_dataset
from .mapping import ClassMapping, resolve_mapping
from .perturb import CURVES, CurveJob, ForwardModel, Perturbation, removal_ranks, run_curves, step_counts
from .result import EvalResult
from .scoring import blurred

__all__ = ["run_faithfulness", "FAITH_BASELINES", "read_folder", "detect_format", "map_for"]

#: maps that need no attention method
FAITH_BASELINES = {"center": "a cone falling from the image centre to the corners",
                   "random": "uniform noise, seeded per image"}
TARGETS = ("auto", "label", "top1")
FORMATS = ("auto", "voc", "coco", "folder")


def detect_format(data) -> str:
    """``coco`` for a .json file, ``voc`` for a folder with Annotations/ or ImageSets/, else ``folder``."""
    p = Path(data)
    if p.is_file():
        if p.suffix.lower() == ".json":
            return "coco"
        raise ExciteError(f"{p}: give a dataset folder, an image folder or a COCO instances JSON")
    if not p.is_dir():
        raise ExciteError(f"{p}: no such folder or file")
    if (p / "Annotations").is_dir() or (p / "ImageSets").is_dir():
        return "voc"
    return "folder"


def read_folder(folder) -> tuple:
    """``(records, problems)`` for the images directly in ``folder`` (no annotations; sorted by
    name; unreadable files are problems)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExciteError(f"{folder}: no such folder")
    problems, records = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES and p.is_file()):
        try:
            w, h = _image_size(path)
        except ExciteError as exc:
            problems.append(f"{exc}; image skipped")
            continue
        records.append(ImageRecord(path.stem, path, int(w), int(h), [], path.name))
    if not records and not problems:
        raise ExciteError(f"{folder}: no images here ({', '.join(sorted({s.lower() for s in IMAGE_SUFFIXES}))})")
    return records, problems


def _image_seed(seed: int, rec: ImageRecord) -> list:
    digest = hashlib.sha256((rec.key or rec.id).encode("utf-8", "surrogatepass")).hexdigest()
    return [int(seed), int(digest[:8], 16)]


def map_for(method: str, layer: Optional[str], stored: dict, cls: str, height: int, width: int,
            rng: np.random.Generator, blur: bool = True, rise: Optional[RiseSettings] = None) -> np.ndarray:
    """The (height, width) saliency that orders the pixels of one (image, target) for ``method``."""
    if method == "center":
        return metrics.center_map(width, height)
    if method == "random":
        return rng.random((height, width))
    if method == "rise":
        return metrics.upsample(stored[rise_key(rise, cls)], width, height)
    return blurred(method, metrics.upsample(stored[f"{method}|{layer}|{cls}"], width, height), blur)


def _labels(methods: Sequence[str], layers: Sequence[str]) -> list:
    out = []
    for m in methods:
        if m in FAITH_BASELINES or m in BLACK_BOX:
            out.append((m, m, None))
        else:
            out.extend((f"{m}:{l}", m, l) for l in layers)
    return out


def _check_methods(methods) -> list:
    known = list(METHODS) + list(BLACK_BOX) + list(FAITH_BASELINES)
    methods = list(dict.fromkeys(str(m).strip().lower() for m in methods if str(m).strip()))
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        import difflib

        close = difflib.get_close_matches(bad[0], known, n=1) if bad else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ExciteError(f"unknown method {bad[0] if bad else '(none)'!r}{hint}; use {', '.join(known)}")
    return methods


def run_faithfulness(data=None, fmt: str = "auto", model: str = "default",
                     methods: Sequence[str] = ("mwp", "cmwp", "center", "random"),
                     layers: Optional[Sequence[str]] = None, mapping=None, out_dir="eval_out", size: int = 224, *,
                     resize: str = "shorter", target: str = "auto", perturbation: Optional[Perturbation] = None,
                     rule: str = "positive", logits: Optional[str] = None, blur: bool = True, device: str = "auto",
                     seed: int = 0, n_boot: int = 2000, split: Optional[str] = None, image_dir=None,
                     limit: Optional[int] = None, ids: Optional[Sequence[str]] = None, batch_size: int = 16,
                     cache: bool = True, threads: Optional[int] = None, rise: Optional[RiseSettings] = None,
                     on_progress: Optional[Callable[[int, int], None]] = None,
                     on_error: Optional[Callable[[str, str], None]] = None) -> EvalResult:
    """Deletion / insertion (or ROAD MoRF / LeRF) areas of ``methods`` on a dataset; returns the
    :class:`EvalResult` (also written to ``out_dir``). See the module docstring; ``perturbation``
    holds the steps, substrates and the batch size of the perturbed inputs, ``batch_size`` that
    of the map computation; ``n_boot`` bootstrap resamples (seeded by ``seed``); ``rise`` the
    settings of the black-box ``"rise"`` (default: 1000 masks, 7 x 7 cells, p 0.5, seeded by ``seed``)."""
    t0 = time.perf_counter()
    pert = perturbation if perturbation is not None else Perturbation()
    methods = _check_methods(methods)
    excite = [m for m in methods if m in METHODS]
    rise = (rise if rise is not None else RiseSettings(seed=seed)) if "rise" in methods else None
    if fmt not in FORMATS:
        raise ExciteError(f"unknown dataset format {fmt!r}; use {', '.join(FORMATS)}")
    if target not in TARGETS:
        raise ExciteError(f"unknown target {target!r}; use label or top1")
    if resize not in ("shorter", "square"):
        raise ExciteError(f"unknown resize {resize!r}; use shorter or square")
    if data is None:
        raise ExciteError("no dataset given")
    if model is None:
        raise ExciteError("faithfulness needs a model (a path or 'default')")
    from ...io.checks import at_least, output_dir

    size = at_least(size, 1, "--size")
    at_least(batch_size, 1, "--batch-size")
    n_boot = at_least(n_boot, 1, "--bootstrap")
    out_dir = output_dir(out_dir)

    fmt = detect_format(data) if fmt == "auto" else fmt
    if target == "auto":
        target = "top1" if fmt == "folder" else "label"
    if target == "label" and fmt == "folder":
        raise ExciteError(f"{data}: a plain image folder has no labels; use --target top1 (or a VOC / COCO dataset)")
    if fmt == "folder":
        records, problems = read_folder(data)
    else:
        records, problems = read_dataset(data, fmt, split=split, image_dir=image_dir)
    if ids is not None:
        wanted = set(ids)
        records = [r for r in records if r.id in wanted]
    if limit is not None:
        records = records[:at_least(limit, 1, "--limit")]

    from ...run.devices import providers_for

    providers_for(device)   # --device cuda without CUDA: fail before any work
    protocol_cache = "localization" if resize == "square" else "pointing"
    spec = model_spec(model, layers, excite, rule, protocol_cache, size, logits=logits, device=device)
    forward = ForwardModel(spec.source, spec.logits, spec.layout, device, threads)
    num_classes = spec.num_classes
    if num_classes is None:   # learn it from the first readable image
        for rec in records:
            try:
                arr = spec.input_array(rec.path)
                num_classes = int(forward((arr if spec.layout == "NCHW" else arr.transpose(2, 0, 1))[None]).shape[1])
                break
            except ModelError:
                raise
            except ExciteError:
                continue
        spec.num_classes = num_classes
    if target == "label":
        dataset_classes = sorted({o.name for r in records for o in r.objects})
        cmap = resolve_mapping(mapping, dataset_classes, num_classes, spec.class_names)
    else:
        cmap = ClassMapping(source="the model's top-1 class", num_classes=num_classes)
    labels = _labels(methods, spec.layers if excite else [])
    map_cache = MapCache(out_dir / "cache", protocol_cache, spec.meta) if (cache and (excite or rise)) else None
    computer = MapComputer(spec, threads) if excite else None

    items, skipped = [], []
    unmapped = collections.Counter()
    counts = {"images_read": len(records), "images_evaluated": 0, "items": 0, "items_difficult": 0, "skipped": 0,
              "images_failed": 0, "maps_computed": 0, "maps_cached": 0}
    loop_t0 = time.perf_counter()
    for done, rec in enumerate(records, 1):
        outcome = _evaluate(rec, spec, forward, computer, map_cache, cmap, target, labels, pert, seed, blur,
                            batch_size, unmapped, rise)
        if outcome.get("skip"):
            skipped.append({"image": rec.id, "reason": outcome["skip"]})
            counts["images_failed"] += bool(outcome.get("failed"))
        else:
            items.extend(outcome["items"])
            counts["images_evaluated"] += 1
            counts["maps_computed"] += bool(outcome.get("computed"))
            counts["maps_cached"] += bool(outcome.get("cached"))
        if on_progress:
            on_progress(done, len(records))
    loop_s = time.perf_counter() - loop_t0
    counts["items"], counts["skipped"] = len(items), len(skipped)
    counts["forward_inputs"] = int(forward.runs)
    counts["images_per_s"] = round(counts["images_evaluated"] / loop_s, 3) if loop_s > 0 else None
    counts["inputs_per_s"] = round(forward.runs / loop_s, 1) if loop_s > 0 else None

    summary, comparisons = summarize(items, [lab for lab, _, _ in labels], pert, n_boot, seed)
    res = EvalResult(protocol="faithfulness", settings={}, counts=counts, summary=summary, items=items,
                     problems=list(problems), skipped=skipped,
                     unmapped={c: int(unmapped.get(c, 0)) for c in sorted(cmap.unmapped)},
                     unmapped_reasons=dict(sorted(cmap.unmapped.items())), mapping=cmap.to_json(),
                     comparisons=comparisons)
    if on_error:
        for s in skipped:
            on_error(s["image"], s["reason"])
    import dataclasses

    res.settings = {"data": str(data), "fmt": fmt, "model": str(model), "methods": methods,
                    "labels": [lab for lab, _, _ in labels], "layers": list(spec.layers if excite else []),
                    "rule": rule, "mapping": cmap.source, "size": size, "input": spec.describe_input(),
                    "target": target, "perturbation": dataclasses.asdict(pert), "curves": list(pert.curves),
                    "perturbation_text": pert.describe(), "seed": seed, "bootstrap": n_boot, "blur": bool(blur),
                    "logits": computer.logits_record() if computer else None, "split": split, "limit": limit,
                    "providers": list(forward.session.get_providers()),
                    **({"rise": rise.to_json()} if rise else {})}
    res.seconds = round(time.perf_counter() - t0, 3)
    from .run import write_results

    write_results(res, out_dir)
    return res


def _evaluate(rec: ImageRecord, spec, forward: ForwardModel, computer, map_cache, cmap: ClassMapping, target: str,
              labels: list, pert: Perturbation, seed: int, blur: bool, batch_size: int, unmapped,
              rise: Optional[RiseSettings] = None) -> dict:
    """The items of one image, or ``{"skip": reason}``."""
    if target == "label":
        present = rec.classes()
        classes = [c for c in present if c in cmap.indices]
        unmapped.update(c for c in present if c not in cmap.indices)
        if not classes:
            return {"skip": "no mapped class present" if present else "no objects"}
    try:
        arr = spec.input_array(rec.path)
    except ModelError:
        raise
    except ExciteError as exc:
        return {"skip": str(exc), "failed": True}
    x = arr if spec.layout == "NCHW" else arr.transpose(2, 0, 1)
    if target == "top1":
        k = int(np.argmax(forward(x[None])[0]))
        cls = f"top1 #{k}"
        cmap.indices[cls] = (k,)
        cmap.how[cls] = "top-1"
        classes = [cls]
    out: dict = {"items": []}
    stored: dict = {}
    excite = [(m, l) for _, m, l in labels if l is not None]
    if excite or rise is not None:
        stored = map_cache.load(rec) if map_cache else {}
        todo = missing_classes(stored, classes, cmap.indices, spec.methods, spec.layers) if excite else []
        rise_todo = missing_rise(stored, classes, cmap.indices, rise) if rise is not None else []
        if todo or rise_todo:
            if todo:
                stored.update(computer.compute(arr, todo, cmap, batch_size))
            if rise_todo:   # the masked forwards run through the session of the curves
                stored.update(rise_entries(forward, x, rise_todo, cmap, rise))
            out["computed"] = True
            if map_cache is not None:
                map_cache.save(rec, stored)
        else:
            out["cached"] = True
    _, h, w = x.shape
    image_seed = _image_seed(seed, rec)
    tiebreak = np.random.default_rng(image_seed + [0]).random((h, w))
    noise = np.random.default_rng(image_seed + [1])
    counts = step_counts(h * w, pert.steps, pert.step_pixels)
    xs = counts / float(h * w)
    for cls in classes:
        idx = tuple(int(i) for i in cmap.indices[cls])
        jobs, keys = [], []
        for label, method, layer in labels:
            ranks = removal_ranks(map_for(method, layer, stored, cls, h, w, noise, blur, rise), tiebreak)
            for kind in pert.curves:
                jobs.append(CurveJob(kind, ranks, counts, idx))
                keys.append((label, kind))
        curves = run_curves(forward, x, jobs, pert, seed=image_seed[1] % (2 ** 32))
        item = {"image": rec.id, "class": cls, "target": list(idx), "name": _name(cls, idx, spec.class_names),
                "x": [round(float(v), 6) for v in xs], "auc": {}, "curves": {}}
        for (label, kind), curve in zip(keys, curves):
            item["auc"].setdefault(label, {})[kind] = stats.auc(curve, xs)
            item["curves"].setdefault(label, {})[kind] = [round(float(v), 6) for v in curve]
        out["items"].append(item)
    return out


def _name(cls: str, idx: tuple, class_names) -> str:
    if not cls.startswith("top1 #"):
        return cls
    return class_names[idx[0]] if class_names and idx[0] < len(class_names) else str(idx[0])


def summarize(items: list, labels: Sequence[str], pert: Perturbation, n_boot: int = 2000, seed: int = 0) -> tuple:
    """``(summary, comparisons)``: per label and curve the mean area, its bootstrap interval and
    the mean curve (on ``steps + 1`` equally spaced fractions); per curve and pair of labels the
    paired bootstrap of the mean difference and the Wilcoxon test (Holm-adjusted over the pairs)."""
    grid_n = (int(pert.steps) if not pert.step_pixels else 100) + 1
    grid = np.linspace(0.0, 1.0, grid_n)
    summary = {}
    for label in labels:
        s = {"n": len(items)}
        for kind in pert.curves:
            values = [it["auc"][label][kind] for it in items]
            mean, lo, hi = stats.bootstrap_ci(values, n_boot, seed=seed)
            if items:
                curve = np.mean([np.interp(grid, it["x"], it["curves"][label][kind]) for it in items], axis=0)
                curve = [round(float(v), 6) for v in curve]
            else:
                curve = []
            s[kind] = {"mean": mean, "low": lo, "high": hi, "better": CURVES[kind], "curve": curve}
        s["x"] = [round(float(v), 6) for v in grid]
        summary[label] = s
    comparisons = []
    for kind in pert.curves:
        rows = []
        for a, b in stats.pairs(labels):
            va = [it["auc"][a][kind] for it in items]
            vb = [it["auc"][b][kind] for it in items]
            boot = stats.paired_bootstrap(va, vb, n_boot, seed=seed)
            wil = stats.wilcoxon(va, vb)
            rows.append({"curve": kind, "a": a, "b": b, "better": CURVES[kind], "n": boot["n"],
                         "mean_diff": boot["mean_diff"], "low": boot["low"], "high": boot["high"],
                         "p_bootstrap": boot["p"], "p_wilcoxon": wil["p"], "wilcoxon": wil["method"]})
        for row, adj in zip(rows, stats.holm([r["p_wilcoxon"] for r in rows])):
            row["p_wilcoxon_holm"] = adj
        comparisons.extend(rows)
    return summary, comparisons
