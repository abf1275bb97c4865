"""Run the pointing game or dominant-object localization on a dataset with a model.

:func:`run_evaluation` reads the dataset, computes the maps with :class:`~onnx_excite.Exciter`
(one per input shape; the top signal of a class is multi-hot over its mapped model outputs),
caches them per image in ``out_dir/cache/<protocol>/<id>.npz`` (re-runs with another
tolerance, or with more methods, reuse what is there), scores every method and writes
``results.json`` (settings, per-item outcomes, summaries), ``results.md``, ``results.csv`` and
PNG plots. ``shard="i/n"`` evaluates every n-th image from the i-th (0-based);
:func:`merge_shards` combines shard folders into one result.
"""
from __future__ import annotations

import collections
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ExciteError
from . import metrics
from .datasets import ImageRecord, read_dataset
from .mapping import ClassMapping, resolve_mapping
from .report import write_reports

PROTOCOLS = ("pointing", "localization")
from ..methods import METHODS as _REGISTERED

EXCITE_METHODS = tuple(_REGISTERED)   # every registered attention method (onnx-excite methods)
METHODS = EXCITE_METHODS + ("center",)
DEFAULT_MODEL_LAYER = "features.13"
CACHE_VERSION = "1"
#: keep at most this many companion graphs (one per input shape) alive
MAX_EXCITERS = 8


class ModelError(ExciteError):
    """The model cannot be built or run (unknown layer, unsupported op, ORT failure): stops the
    evaluation, unlike an unreadable image, which is reported and skipped."""


def parse_shard(shard) -> Optional[tuple]:
    """``"i/n"`` (0 <= i < n) or ``(i, n)`` -> ``(i, n)``; None -> None."""
    if shard is None or shard == "":
        return None
    if isinstance(shard, (tuple, list)) and len(shard) == 2:
        i, n = shard
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
        if not m:
            raise ExciteError(f"cannot read shard {shard!r}: give i/n with 0 <= i < n, e.g. 0/4")
        i, n = m.groups()
    i, n = int(i), int(n)
    if not (n >= 1 and 0 <= i < n):
        raise ExciteError(f"shard {i}/{n}: need 0 <= i < n")
    return i, n


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "image"


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _num_outputs(model) -> Optional[int]:
    """The static size of the last dimension of the model's only output, if it has one (with
    several outputs the Exciter's logits resolution decides, and tells)."""
    import onnx

    try:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
        if len(proto.graph.output) != 1:
            return None
        dims = proto.graph.output[0].type.tensor_type.shape.dim
        return int(dims[-1].dim_value) if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0 else None
    except Exception:
        return None


class _ModelRunner:
    """The model, its preprocessing, one Exciter per input shape, the map cache."""

    def __init__(self, model: str, layers, methods, rule: str, protocol: str, size: int, cache_dir: Optional[Path],
                 logits: Optional[str] = None):
        from ..explain import resolve_model

        self.logits = logits
        self.logits_choice = None

        self.name = str(model)
        self.source, self.profile = resolve_model(self.name)
        self.layers = list(layers or self.profile.default_layers or
                           ([DEFAULT_MODEL_LAYER] if self.name == "default" else []))
        if not self.layers and methods:
            raise ExciteError("no layer given and the model has no default: pass layers=[...] "
                              "(see `onnx-excite layers MODEL`)")
        self.methods, self.rule, self.protocol = list(methods), rule, protocol
        p = self.profile
        if protocol == "localization":
            self.resize, self.size = "square", int(size)
        elif p.resize == "square":  # a fixed-size model whose head could not be made fully convolutional
            self.resize, self.size = "square", int(p.input_size)
        else:
            self.resize, self.size = "shorter", int(size)
        self.class_names = p.load_class_names()
        self.num_classes = len(self.class_names) if self.class_names else _num_outputs(self.source)
        path = self.source if isinstance(self.source, (str, Path)) else self.name
        key = _file_sha256(path)
        if not isinstance(self.source, (str, Path)):
            key += "+fullyconv"
        self.meta = json.dumps({"version": CACHE_VERSION, "model": key, "logits": logits, "rule": rule, "resize": self.resize,
                                "size": self.size, "mean": list(p.mean), "std": list(p.std), "scale": p.scale,
                                "channel_order": p.channel_order, "layout": p.layout}, sort_keys=True)
        self.cache_dir = cache_dir
        self.exciters: collections.OrderedDict = collections.OrderedDict()
        self.computed = self.cached = 0

    def input_array(self, rec: ImageRecord) -> np.ndarray:
        from ..images import load_image, preprocess

        p = self.profile
        arr, _ = preprocess(load_image(rec.path), size=self.size, resize=self.resize, crop=None, mean=p.mean,
                            std=p.std, scale=p.scale, channel_order=p.channel_order, layout=p.layout)
        return arr

    def ensure_num_classes(self, records: Sequence[ImageRecord]) -> None:
        """Models without class names or a static output size: build the first Exciter to learn it."""
        for rec in records:
            if self.num_classes is not None:
                return
            try:
                arr = self.input_array(rec)
            except ExciteError:  # unreadable image: reported later, try the next one
                continue
            self.exciter(arr.shape)

    def describe_input(self) -> str:
        if self.resize == "square":
            return f"{self.size}x{self.size}"
        return f"shorter side {self.size}"

    def exciter(self, shape):
        if shape in self.exciters:
            self.exciters.move_to_end(shape)
            return self.exciters[shape]
        from ..canonicalize import first_input_name
        from ..runtime import Exciter

        try:
            ex = Exciter(self.source, self.layers, methods=tuple(self.methods), rule=self.rule, logits=self.logits,
                         input_shapes={first_input_name(self.source): [None, *shape]})
            self.logits_choice = ex.built.logits_choice
        except ModelError:
            raise
        except ExciteError as exc:
            raise ModelError(str(exc)) from None
        if self.num_classes is None:
            self.num_classes = ex.num_classes
        elif ex.num_classes != self.num_classes:
            raise ModelError(f"the model has {ex.num_classes} outputs but {self.num_classes} class names")
        self.exciters[shape] = ex
        while len(self.exciters) > MAX_EXCITERS:
            self.exciters.popitem(last=False)
        return ex

    def _cache_path(self, rec: ImageRecord) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        return self.cache_dir / self.protocol / f"{_safe(rec.id)}.npz"

    def _read_cache(self, path: Optional[Path]) -> dict:
        if path is None or not path.is_file():
            return {}
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["meta"]) != self.meta:
                    return {}
                return {k: z[k] for k in z.files if k != "meta"}
        except Exception:  # unreadable cache: recompute
            return {}

    def maps(self, rec: ImageRecord, classes: Sequence[str], mapping: ClassMapping, batch_size: int = 16) -> dict:
        """``{(method, layer, class): map at layer resolution}``, from the cache or computed."""
        path = self._cache_path(rec)
        stored = self._read_cache(path)

        def fresh(c):
            idx = stored.get(f"idx|{c}")
            if idx is None or tuple(int(v) for v in idx) != tuple(mapping.indices[c]):
                return False
            return all(f"{m}|{l}|{c}" in stored for m in self.methods for l in self.layers)

        todo = [c for c in classes if not fresh(c)]
        if todo:
            arr = self.input_array(rec)
            ex = self.exciter(arr.shape)
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                batch = np.repeat(arr[None], len(chunk), axis=0)
                if max(i for c in chunk for i in mapping.indices[c]) >= ex.num_classes:
                    raise ModelError(f"{mapping.source}: an output index is out of range for a model with "
                                     f"{ex.num_classes} outputs (a mapping for another model?)")
                try:
                    res = ex.explain(batch, mapping.signal(chunk, ex.num_classes))
                except ExciteError as exc:
                    raise ModelError(str(exc)) from None
                for i, c in enumerate(chunk):
                    stored[f"idx|{c}"] = np.asarray(mapping.indices[c], np.int64)
                    for m in self.methods:
                        for l in self.layers:
                            stored[f"{m}|{l}|{c}"] = np.asarray(res.maps[m][l][i], np.float32)
            self.computed += 1
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp.npz")
                np.savez_compressed(tmp, meta=np.array(self.meta), **stored)
                tmp.replace(path)
        else:
            self.cached += 1
        return {(m, l, c): stored[f"{m}|{l}|{c}"] for m in self.methods for l in self.layers for c in classes}


def _labels(methods: Sequence[str], layers: Sequence[str]) -> list[tuple]:
    """(label, method, layer) per result row: ``cmwp:features.13``, ..., ``center``."""
    out = []
    for m in methods:
        if m == "center":
            out.append(("center", "center", None))
        else:
            out.extend((f"{m}:{l}", m, l) for l in layers)
    return out


def _summarize(protocol: str, items: list, labels: Sequence[str]) -> dict:
    if protocol == "pointing":
        return {lab: metrics.pointing_summary(items, lab) for lab in labels}
    return {lab: metrics.localization_summary(items, lab) for lab in labels}


def _progress(enabled: bool, total: int, description: str):
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
    return _ProgressCtx(prog, total, description)


class _ProgressCtx:
    def __init__(self, prog, total, description):
        self.prog, self.total, self.description = prog, total, description

    def __enter__(self):
        self.prog.__enter__()
        task = self.prog.add_task(self.description, total=self.total)
        return lambda: self.prog.advance(task)

    def __exit__(self, *exc):
        return self.prog.__exit__(*exc)


def _logits_record(runner) -> Optional[dict]:
    """Which output was explained, and how it was chosen (None before any map was computed)."""
    choice = getattr(runner, "logits_choice", None)
    if choice is None:
        return None
    return {"tensor": choice.tensor, "output": choice.output, "reason": choice.reason,
            "candidates": list(choice.candidates)}


def run_evaluation(protocol: str = "pointing", data=None, fmt: str = "voc", model: Optional[str] = "default",
                   methods: Sequence[str] = ("cmwp", "mwp", "center"), layers: Optional[Sequence[str]] = None,
                   mapping=None, out_dir="eval_out", tolerance: float = 15, size: int = 224, shard=None,
                   progress: bool = True, *, split: Optional[str] = None, image_dir=None, rule: str = "positive",
                   held_out: float = 0.2, seed: int = 0, limit: Optional[int] = None,
                   ids: Optional[Sequence[str]] = None, batch_size: int = 16, cache: bool = True,
                   dominant: str = "all", logits: Optional[str] = None, blur: bool = True) -> dict:
    """Evaluate ``methods`` on a dataset; returns the results dict (also written to ``out_dir``).

    * ``protocol``: ``"pointing"`` (input: shorter side resized to ``size``) or
      ``"localization"`` (input: ``size`` x ``size``; alpha chosen on a seeded ``held_out``
      fraction of the images, error on the rest);
    * ``data`` / ``fmt``: a VOC folder (``split``: ImageSets/Main/<split>.txt, default test/val/
      trainval/all) or a COCO instances JSON (``image_dir``: where its images are);
    * ``model``: an ONNX classifier path or ``"default"`` (MobileNetV2, layer ``features.13``);
      not loaded when ``methods`` is only ``["center"]`` and no ``mapping`` is given;
    * ``mapping``: a mapping file, a bundled mapping name (``"voc_sample_to_imagenet"``), a dict,
      or None (class names that are indices or model class names map directly); classes
      without a mapping are skipped and reported; without a model (center only) every class is
      evaluated;
    * ``dominant`` (localization): the dominant class is the largest among ``"all"`` classes
      present (an image whose dominant class is unmapped is skipped, as in the paper's
      definition) or among the ``"mapped"`` ones;
    * ``limit`` / ``ids``: evaluate only the first ``limit`` images / these ids;
    * ``shard``: ``"i/n"``, every n-th image from the i-th; merge with :func:`merge_shards`;
    * ``logits``: the output explained (default: :func:`~onnx_excite.canonicalize.resolve_logits`
      chooses; the choice is in ``res["logits"]``);
    * ``blur``: the paper's Gaussian blur (sigma = 0.02 * max(W, H) of the upsampled map) for
      the methods declared with ``blur`` (grad, deconv, guided, LRP, c-grad, c-deconv);
      False scores every map unblurred.
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
    shard_t = parse_shard(shard)
    if dominant not in ("all", "mapped"):
        raise ExciteError(f"dominant must be 'all' or 'mapped', not {dominant!r}")
    if data is None:
        raise ExciteError("no dataset given")
    from ..checks import at_least, output_dir

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

    runner = None
    if excite or mapping is not None:
        if model is None:
            raise ExciteError("attention methods and a mapping need a model (a path or 'default')")
        runner = _ModelRunner(model, layers, excite, rule, protocol, size, out_dir / "cache" if cache else None,
                              logits=logits)
        if excite:
            runner.ensure_num_classes(records)
        cmap = resolve_mapping(mapping, dataset_classes, runner.num_classes, runner.class_names)
        evaluated = set(cmap.indices)
    else:
        cmap = ClassMapping(source="<none: center only, every class>")
        evaluated = set(dataset_classes)
    layer_list = runner.layers if (runner and excite) else []
    labels = _labels(methods, layer_list)

    held = set()
    if protocol == "localization":
        among = evaluated if dominant == "mapped" else None
        eligible = [r.id for r in records if metrics.dominant_class(r, among) in evaluated]
        held = metrics.held_out_ids(eligible, held_out, seed)
    todo = records if shard_t is None else records[shard_t[0]::shard_t[1]]

    items: list = []
    skipped: list = []
    unmapped_counts = collections.Counter()
    evaluated_images = 0
    desc = f"{protocol} {'' if shard_t is None else f'shard {shard_t[0]}/{shard_t[1]} '}".strip()
    with _progress(progress, len(todo), desc) as advance:
        for rec in todo:
            try:
                n = _evaluate_image(rec, protocol, labels, runner if excite else None, cmap, evaluated,
                                    unmapped_counts, held, tolerance, size, batch_size, items, skipped,
                                    among if protocol == "localization" else None, blur)
                evaluated_images += n
            except ModelError:
                raise
            except ExciteError as exc:  # an unreadable image: report and go on
                skipped.append({"image": rec.id, "reason": str(exc)})
            if advance:
                advance()

    label_names = [lab for lab, _, _ in labels]
    res = {
        "protocol": protocol,
        "settings": {"data": str(data), "fmt": fmt, "model": None if runner is None else str(model),
                     "methods": methods, "labels": label_names, "layers": list(layer_list), "rule": rule,
                     "mapping": cmap.source, "tolerance": tolerance, "size": size,
                     "input": runner.describe_input() if runner else ("-" if protocol == "pointing" else f"{size}x{size}"),
                     "shard": None if shard_t is None else f"{shard_t[0]}/{shard_t[1]}",
                     "held_out": held_out, "seed": seed, "alphas": [float(a) for a in metrics.ALPHAS],
                     "split": split, "limit": limit, "dominant": dominant,
                     "logits": _logits_record(runner), "blur": bool(blur)},
        "counts": {"images_read": len(records), "images_in_shard": len(todo), "images_evaluated": evaluated_images,
                   "items": len(items), "items_difficult": sum(1 for it in items if it.get("difficult")),
                   "skipped": len(skipped), "maps_computed": runner.computed if runner else 0,
                   "maps_cached": runner.cached if runner else 0},
        "problems": problems,
        "skipped": skipped,
        "unmapped": {c: int(unmapped_counts.get(c, 0)) for c in sorted(cmap.unmapped)},
        "unmapped_reasons": dict(sorted(cmap.unmapped.items())),
        "mapping": cmap.to_json(),
        "summary": _summarize(protocol, items, label_names),
        "items": items,
    }
    res["seconds"] = round(time.perf_counter() - t0, 3)
    _write(res, out_dir)
    return res


def _evaluate_image(rec: ImageRecord, protocol, labels, runner, cmap, evaluated, unmapped_counts, held,
                    tolerance, size, batch_size, items, skipped, among=None, blur=True) -> int:
    """Append this image's items; returns 1 when the image was evaluated, else 0 (reason in ``skipped``)."""
    if protocol == "pointing":
        present = rec.classes()
        for c in present:
            if c not in evaluated:
                unmapped_counts[c] += 1
        classes = [c for c in present if c in evaluated]
        if not classes:
            skipped.append({"image": rec.id, "reason": "no mapped class present" if present else "no objects"})
            return 0
        maps = runner.maps(rec, classes, cmap, batch_size) if runner else {}
        for c in classes:
            objs = rec.objects_of(c)
            item = {"image": rec.id, "class": c, "difficult": metrics.is_difficult(rec, c), "hits": {}, "points": {}}
            for label, method, layer in labels:
                if method == "center":
                    point = metrics.center_point(rec.width, rec.height)
                else:
                    point = metrics.max_point(_blurred(method, metrics.upsample(maps[(method, layer, c)], rec.width,
                                                                                rec.height), blur))
                item["points"][label] = list(point)
                item["hits"][label] = metrics.pointing_hit(point, objs, tolerance)
            items.append(item)
        return 1
    dom = metrics.dominant_class(rec, among)
    if dom is None:
        skipped.append({"image": rec.id, "reason": "no objects"})
        return 0
    if dom not in evaluated:
        unmapped_counts[dom] += 1
        skipped.append({"image": rec.id, "reason": f"dominant class {dom!r} is not mapped"})
        return 0
    maps = runner.maps(rec, [dom], cmap, batch_size) if runner else {}
    size = runner.size if runner else int(size)
    gt = [o.box for o in rec.objects_of(dom)]
    item = {"image": rec.id, "class": dom, "held_out": rec.id in held, "correct": {}}
    for label, method, layer in labels:
        m = metrics.center_map(size, size) if method == "center" else \
            _blurred(method, metrics.upsample(maps[(method, layer, dom)], size, size), blur)
        item["correct"][label] = [bool(v) for v in metrics.localization_curve(m, (rec.width, rec.height), gt)]
    items.append(item)
    return 1


def _blurred(method: str, upsampled: np.ndarray, blur: bool) -> np.ndarray:
    """The paper's Gaussian blur of an upsampled map for the methods declared with it."""
    from ..methods import get_method
    from ..postprocess import blur_sigma, gaussian_blur

    if not blur or not get_method(method).blur:
        return upsampled
    h, w = upsampled.shape
    return gaussian_blur(upsampled, blur_sigma(w, h)).astype(np.float32)


def _write(res: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_reports(res, out_dir)
    files["json"] = str(out_dir / "results.json")
    res["files"] = files
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1), encoding="utf-8")
    tmp.replace(out_dir / "results.json")


def load_results(out_dir) -> dict:
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        raise ExciteError(f"{path}: no results here (run run_evaluation with this out_dir first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExciteError(f"{path}: malformed JSON ({exc})") from None


#: settings that must agree for shards to be merged
_SAME = ("data", "fmt", "model", "labels", "rule", "mapping", "tolerance", "size", "held_out", "seed", "split", "limit",
         "dominant", "blur")


def merge_shards(out_dirs: Sequence, out_dir=None) -> dict:
    """One result from the folders of several shards of the same run: the per-item outcomes are
    pooled and the summaries recomputed (for localization, alpha is chosen again on the pooled
    held-out images). Written to ``out_dir`` when given."""
    parts = [load_results(d) for d in out_dirs]
    if out_dir is not None:
        from ..checks import output_dir

        output_dir(out_dir)
    if not parts:
        raise ExciteError("no shard folders given")
    first = parts[0]
    for d, p in zip(out_dirs, parts):
        if p["protocol"] != first["protocol"]:
            raise ExciteError(f"{d}: protocol {p['protocol']} differs from {first['protocol']}")
        for k in _SAME:
            if p["settings"].get(k) != first["settings"].get(k):
                raise ExciteError(f"{d}: setting {k!r} = {p['settings'].get(k)!r} differs from "
                                  f"{first['settings'].get(k)!r} in {out_dirs[0]}")
    shards = [p["settings"].get("shard") for p in parts]
    if len(set(shards)) != len(shards):
        raise ExciteError(f"the same shard appears twice: {shards}")
    items, seen = [], set()
    for d, p in zip(out_dirs, parts):
        for it in p["items"]:
            key = (it["image"], it["class"])
            if key in seen:
                raise ExciteError(f"{d}: image {it['image']} ({it['class']}) is in more than one shard")
            seen.add(key)
            items.append(it)
    items.sort(key=lambda it: (it["image"], it["class"]))
    labels = first["settings"]["labels"]
    counts = {k: sum(p["counts"].get(k, 0) for p in parts)
              for k in ("images_in_shard", "images_evaluated", "skipped", "maps_computed", "maps_cached")}
    counts.update(images_read=first["counts"]["images_read"], items=len(items),
                  items_difficult=sum(1 for it in items if it.get("difficult")))
    unmapped = collections.Counter()
    for p in parts:
        unmapped.update(p.get("unmapped", {}))
    res = {
        "protocol": first["protocol"],
        "settings": dict(first["settings"], shard=None, merged_from=[str(d) for d in out_dirs], shards=shards),
        "counts": counts,
        "problems": list(dict.fromkeys(m for p in parts for m in p.get("problems", []))),
        "skipped": [s for p in parts for s in p.get("skipped", [])],
        "unmapped": {c: int(unmapped[c]) for c in sorted(first.get("unmapped", {}))},
        "unmapped_reasons": first.get("unmapped_reasons", {}),
        "mapping": first.get("mapping"),
        "summary": _summarize(first["protocol"], items, labels),
        "items": items,
        "seconds": round(sum(p.get("seconds", 0) for p in parts), 3),
    }
    if out_dir is not None:
        _write(res, Path(out_dir))
    return res
