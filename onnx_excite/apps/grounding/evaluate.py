"""Phrase localization on Flickr30k Entities: the attention re-ranking against the
proposals' own order ("proposal base"), as in the paper's Table 4.

For every query (see :mod:`.flickr30k`) the same proposals (after the same NMS at IoU
0.7) are ranked twice: by f(R) = S_R / A_R^gamma on the phrase map, and in the
proposals' own order. A phrase with no vocabulary word has no map: it keeps the
proposal order (and is counted as ``no_vocabulary``); the in-vocabulary subset is
reported separately too.

gamma is chosen from [0 : 0.25 : 1] on held-out images by recall@1 (ties: recall@5,
recall@10, then the gamma closest to 0.5): the ``val`` split when the data has
``val.txt``, or ``heldout`` given explicitly; with no held-out data a fixed gamma
(0.5 unless given) is used and the report says so. The sweep over all gammas on the
evaluated split is written too, for information only.
"""
from __future__ import annotations

import csv
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import ExciteError
from . import metrics, scoring
from .core import Grounder
from .flickr30k import EntityImage, read_flickr30k_entities
from .proposals import proposal_source, read_boxes_file

BASE = "proposal base"


@dataclass
class GroundingEvalOptions:
    data: str
    split: str | None = "test"
    heldout: str | None = "auto"        # a split name, 'none', or 'auto' (val when val.txt exists)
    model: str = "default"
    method: str = "cmwp"
    weights: str = "predicted"
    vocab: str | None = None
    layer: str | None = None
    proposals: str = "selective-search"
    gamma: str | float = "auto"          # 'auto' or a number in [0, 1]
    size: int = 300
    gt: str = "union"
    small_fraction: float = 0.1
    nms_iou: float = 0.7
    image_dir: str | None = None
    limit: int | None = None
    out_dir: str = "ground_eval"


class _ProposalCache:
    """Proposals per image, kept as JSON under ``<out>/proposals/<source>/`` so a re-run
    (another gamma, method or model) does not recompute them."""

    def __init__(self, spec, out_dir: Path):
        self.source = proposal_source(spec)
        self.dir = out_dir / "proposals" / self.source.name if self.source.name != "file" else None

    def boxes(self, image, key: str) -> np.ndarray:
        if self.dir is not None:
            f = self.dir / f"{key}.json"
            if f.is_file():
                return read_boxes_file(f)
        boxes = self.source.boxes(image, key)
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            f = self.dir / f"{key}.json"
            f.write_text(json.dumps(np.round(boxes, 3).tolist()))
        return boxes


def _score_image(img: EntityImage, grounder: Grounder, proposals: _ProposalCache, opts: GroundingEvalOptions) -> list:
    """Per query: its record with the hits of every gamma and of the proposal base."""
    from ...io.images import load_image

    photo = load_image(img.image_path)
    if photo.size != (img.width, img.height):
        raise ExciteError(f"{img.image_path}: the photo is {photo.size[0]}x{photo.size[1]}, "
                          f"the annotation says {img.width}x{img.height}")
    boxes = proposals.boxes(photo, img.image_id)
    parsed = [grounder.parse(q.text) for q in img.queries]
    word_maps = grounder.word_maps(photo, [w for p in parsed for w in p.words])
    base_boxes, _ = scoring.rank_boxes(None, boxes, iou_threshold=opts.nms_iou)
    records = []
    for q, p in zip(img.queries, parsed):
        base_hits = metrics.hit_list(base_boxes, q.boxes, opts.gt)
        pmap = grounder.phrase_map(p, word_maps)
        per_gamma = {}
        for gamma in scoring.GAMMAS:
            if pmap is None:
                per_gamma[gamma] = base_hits
            else:
                ranked, _ = scoring.rank_boxes(pmap, boxes, gamma, opts.nms_iou)
                per_gamma[gamma] = metrics.hit_list(ranked, q.boxes, opts.gt)
        records.append({"image": img.image_id, "sentence": q.sentence, "phrase": q.text, "entity": q.entity,
                        "types": q.types, "words": p.keys, "oov": p.oov, "in_vocabulary": bool(p.words),
                        "small": metrics.is_small(q.boxes, img.width, img.height, opts.small_fraction),
                        "gt_boxes": len(q.boxes), "proposals": len(boxes), "base": base_hits, "gammas": per_gamma})
    return records


def _scored(records, key) -> list:
    return [metrics.Scored(r["types"], r["small"], r["base"] if key == BASE else r["gammas"][key]) for r in records]


def choose_gamma(records: list) -> tuple[float, dict]:
    """The gamma with the best recall@1 on ``records`` (ties: recall@5, recall@10, closest to 0.5)."""
    table = {g: metrics.summarize(_scored(records, g)) for g in scoring.GAMMAS}
    best = max(scoring.GAMMAS, key=lambda g: (table[g]["recall@1"], table[g]["recall@5"], table[g]["recall@10"],
                                             -abs(g - 0.5)))
    return best, table


def run_grounding_eval(opts: GroundingEvalOptions, progress: Callable[[int, int], None] | None = None) -> dict:
    """Evaluate, write results.json / results.md / queries.csv under ``opts.out_dir``, return the results.
    ``progress(n_done, total)`` is called with 0 at the start of each split (held-out, then
    evaluated) and with 1 after each image."""
    t0 = time.time()
    out_dir = Path(opts.out_dir)
    if opts.gt not in ("union", "any"):
        raise ExciteError(f"--gt must be union or any, not {opts.gt!r}")
    if not 0 < opts.small_fraction <= 1:
        raise ExciteError(f"the small-instance fraction must be in (0, 1], not {opts.small_fraction}")
    fixed_gamma = None
    if str(opts.gamma) != "auto":
        try:
            fixed_gamma = float(opts.gamma)
        except ValueError:
            raise ExciteError(f"--gamma must be 'auto' or a number in [0, 1], not {opts.gamma!r}") from None
        if not 0 <= fixed_gamma <= 1:
            raise ExciteError(f"--gamma must be in [0, 1], not {fixed_gamma}")
    images, problems = read_flickr30k_entities(opts.data, opts.split, opts.image_dir, opts.limit)
    heldout_name = opts.heldout
    if heldout_name == "auto":
        heldout_name = "val" if fixed_gamma is None and (Path(opts.data) / "val.txt").is_file() and opts.split != "val" else None
    if heldout_name in ("none", ""):
        heldout_name = None
    held, held_problems = ([], [])
    if heldout_name and fixed_gamma is None:
        held, held_problems = read_flickr30k_entities(opts.data, heldout_name, opts.image_dir, opts.limit)
    if not any(img.queries for img in images):
        raise ExciteError(f"{opts.data}: no phrase with a ground-truth box in split {opts.split!r}"
                          + (f" ({len(problems)} problem(s); first: {problems[0]})" if problems else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    grounder = Grounder(opts.model, vocab=opts.vocab, method=opts.method, layer=opts.layer, size=opts.size,
                        nms_iou=opts.nms_iou, weights=opts.weights)
    proposals = _ProposalCache(opts.proposals, out_dir)

    def score(imgs, probs) -> list:
        recs = []
        if progress:
            progress(0, len(imgs))
        for img in imgs:
            try:
                recs.extend(_score_image(img, grounder, proposals, opts))
            except ExciteError as exc:
                probs.append(f"{exc}; image skipped")
            if progress:
                progress(1, len(imgs))
        return recs

    held_records = score(held, held_problems) if held else []
    records = score(images, problems)
    if not records:
        raise ExciteError(f"no image could be evaluated; first problem: {problems[0] if problems else '-'}")
    if fixed_gamma is not None:
        gamma, how = fixed_gamma, "given"
    elif held_records:
        gamma, _ = choose_gamma(held_records)
        how = f"chosen on the held-out split {heldout_name!r} ({len(held_records)} phrases) by recall@1"
    else:
        gamma, how = 0.5, "0.5 (the paper's default): no held-out split (no val.txt; pass --heldout SPLIT)"
    label = f"{opts.method} (gamma {gamma:g})"
    summary = {label: metrics.breakdown(_scored(records, gamma)), BASE: metrics.breakdown(_scored(records, BASE))}
    in_vocab = [r for r in records if r["in_vocabulary"]]
    summary_in_vocab = {label: metrics.summarize(_scored(in_vocab, gamma)), BASE: metrics.summarize(_scored(in_vocab, BASE))}
    sweep = {f"{g:g}": metrics.summarize(_scored(records, g)) for g in scoring.GAMMAS}
    skipped = Counter()
    for img in images:
        skipped.update(img.skipped)
    res = {
        "protocol": "grounding",
        "settings": {"data": str(opts.data), "split": opts.split, "model": opts.model, "method": opts.method, "weights": opts.weights,
                     "layer": grounder.layer, "vocabulary": grounder.vocab.source, "proposals": str(opts.proposals),
                     "size": grounder.size, "gt": opts.gt, "iou": 0.5, "nms_iou": opts.nms_iou,
                     "small_fraction": opts.small_fraction, "gamma": gamma, "gamma_choice": how},
        "counts": {"images": len({r["image"] for r in records}), "queries": len(records),
                   "in_vocabulary": len(in_vocab), "no_vocabulary": len(records) - len(in_vocab),
                   "small": sum(r["small"] for r in records), "not_scored": dict(skipped),
                   "mean_proposals": float(np.mean([r["proposals"] for r in records]))},
        "summary": summary, "in_vocabulary": summary_in_vocab, "gamma_sweep": sweep,
        "oov_words": Counter(w for r in records for w in r["oov"]).most_common(30),
        "problems": problems + held_problems, "seconds": time.time() - t0,
    }
    _write(res, records, gamma, out_dir)
    return res


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def markdown(res: dict) -> str:
    s, c = res["settings"], res["counts"]
    cols = ["recall@1", "recall@5", "recall@10", "mAP", "upper_bound"]
    head = "| ranking | R@1 | R@5 | R@10 | mAP | upper bound | phrases |\n|---|---|---|---|---|---|---|"

    def rows(table: dict) -> list[str]:
        return [f"| {name} | " + " | ".join(_pct(v[c_]) for c_ in cols) + f" | {v['n']} |" for name, v in table.items()]

    out = ["# Phrase localization (Flickr30k Entities protocol)", "",
           f"- data `{s['data']}` split `{s['split']}`: {c['images']} images, {c['queries']} phrases with boxes "
           f"({c['in_vocabulary']} with a vocabulary word; {c['small']} small); not scored: {c['not_scored'] or '-'}",
           f"- model `{s['model']}` layer `{s['layer']}`, method {s['method']} ({s['weights']} class weights), vocabulary: {s['vocabulary']}, "
           f"shorter side {s['size']} px",
           f"- proposals: {s['proposals']} (mean {c['mean_proposals']:.0f} per image), NMS IoU {s['nms_iou']}; "
           f"hit: IoU >= 0.5 with the {'union box of the ground-truth boxes' if s['gt'] == 'union' else 'any ground-truth box'}",
           f"- gamma = {s['gamma']:g}: {s['gamma_choice']}", "", "## All phrases", "", head]
    out += rows({k: v["all"] for k, v in res["summary"].items()})
    out += ["", f"## Small instances (ground truth < {100 * s['small_fraction']:g} % of the image)", "", head]
    out += rows({k: v["small"] for k, v in res["summary"].items()})
    out += ["", "## Phrases with a vocabulary word", "", head]
    out += rows(res["in_vocabulary"])
    out += ["", "## Per phrase type", "", "| type | ranking | R@1 | R@5 | R@10 | mAP | upper bound | phrases |",
            "|---|---|---|---|---|---|---|---|"]
    names = list(res["summary"])
    for t in sorted(res["summary"][names[0]]["types"]):
        for name in names:
            v = res["summary"][name]["types"][t]
            out.append(f"| {t} | {name} | " + " | ".join(_pct(v[c_]) for c_ in cols) + f" | {v['n']} |")
    out += ["", "## gamma sweep on the evaluated split (information only; gamma is not chosen here)", "",
            "| gamma | R@1 | R@5 | R@10 | mAP |", "|---|---|---|---|---|"]
    for g, v in res["gamma_sweep"].items():
        out.append(f"| {g} | " + " | ".join(_pct(v[c_]) for c_ in cols[:4]) + " |")
    if res["oov_words"]:
        out += ["", "Most frequent out-of-vocabulary words: " + ", ".join(f"{w} ({n})" for w, n in res["oov_words"])]
    if res["problems"]:
        out += ["", f"{len(res['problems'])} problem(s) reading the data (see results.json); first: {res['problems'][0]}"]
    return "\n".join(out) + "\n"


def _write(res: dict, records: list, gamma: float, out_dir: Path) -> None:
    files = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "csv": out_dir / "queries.csv"}
    res["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(res, indent=2))
    files["markdown"].write_text(markdown(res))
    with files["csv"].open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "sentence", "entity", "phrase", "types", "words", "oov", "small", "gt_boxes",
                    "proposals", "first_hit", "first_hit_base"])
        for r in records:
            hits, base = r["gammas"][gamma], r["base"]
            w.writerow([r["image"], r["sentence"], r["entity"], r["phrase"], "/".join(r["types"]), " ".join(r["words"]),
                        " ".join(r["oov"]), int(r["small"]), r["gt_boxes"], r["proposals"],
                        int(np.argmax(hits)) + 1 if hits.any() else "", int(np.argmax(base)) + 1 if base.any() else ""])
