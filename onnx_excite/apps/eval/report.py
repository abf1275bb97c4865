"""results.md, results.csv and PNG plots (drawn with Pillow) from an :class:`EvalResult`
(faithfulness: also comparisons.csv and the mean curves)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .perturb import CURVES as CURVES_BETTER
from .result import EvalResult, pct

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]

_pct = pct


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------
def _settings_lines(res: EvalResult) -> list[str]:
    s = res.settings
    c = res.counts
    lines = [f"- data: `{s['data']}` ({s['fmt']}), model: `{s['model']}`, layers: {', '.join(s['layers']) or '–'}, "
             f"rule: {s['rule']}, input: {s['input']}"]
    if res.protocol == "pointing":
        lines.append(f"- tolerance: {s['tolerance']} px; images evaluated: {c['images_evaluated']} of "
                     f"{c['images_read']} read; (image, class) pairs: {c['items']} ({c['items_difficult']} difficult)")
    else:
        lines.append(f"- alpha grid: 0:0.5:10, chosen on a held-out split (fraction {s['held_out']}, seed {s['seed']}); "
                     f"images evaluated: {c['images_evaluated']} of {c['images_read']} read")
    if res.unmapped:
        lines.append(f"- **{len(res.unmapped)} dataset class(es) have no model mapping and are not evaluated** "
                     f"(mapping: `{s['mapping']}`; skipped {res.unit} in brackets): {unmapped_line(res)}")
    if res.problems:
        lines.append(f"- {len(res.problems)} problem(s) reading the data (see results.json)")
    if c.get("skipped"):
        lines.append(f"- {c['skipped']} image(s) skipped during evaluation (see results.json)")
    return lines


def unmapped_line(res: EvalResult) -> str:
    """``door (3), tap (5), ...``: each unmapped class with the pairs/images it made the run skip."""
    return ", ".join(f"{k} ({n} {res.unit})" for k, n in sorted(res.unmapped.items()))


def markdown(res: EvalResult) -> str:
    methods = list(res.summary)
    out = [f"# {'Pointing game' if res.protocol == 'pointing' else 'Dominant-object localization'}", ""]
    out += _settings_lines(res) + [""]
    header, rows = res.overall_table()
    if res.protocol == "pointing":
        out += ["Mean accuracy over classes (%): all (image, class) pairs and the difficult subset.", ""]
    else:
        out += ["Error (%) at the alpha chosen on the held-out split, on the other images.", ""]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    if res.protocol == "pointing":
        out += ["", "Per class accuracy (%), all / difficult:", ""]
        classes = sorted({c for m in methods for c in res.summary[m]["per_class"]})
        out.append("| class | pairs | difficult | " + " | ".join(methods) + " |")
        out.append("|---|---|---|" + "---|" * len(methods))
        for c in classes:
            first = next(res.summary[m]["per_class"][c] for m in methods if c in res.summary[m]["per_class"])
            cells = []
            for m in methods:
                pc = res.summary[m]["per_class"].get(c)
                cells.append("–" if pc is None else f"{_pct(pc['accuracy'])} / {_pct(pc['difficult_accuracy'])}")
            out.append(f"| {c} | {first['hits'] + first['misses']} | "
                       f"{first['difficult_hits'] + first['difficult_misses']} | " + " | ".join(cells) + " |")
    else:
        out += ["", "Per dominant class, test images and error (%):", ""]
        classes = sorted({c for m in methods for c in res.summary[m]["per_class"]})
        out.append("| class | images | " + " | ".join(methods) + " |")
        out.append("|---|---|" + "---|" * len(methods))
        for c in classes:
            first = next(res.summary[m]["per_class"][c] for m in methods if c in res.summary[m]["per_class"])
            cells = [_pct(res.summary[m]["per_class"][c]["error"]) if c in res.summary[m]["per_class"] else "–"
                     for m in methods]
            out.append(f"| {c} | {first['correct'] + first['wrong']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------
def write_csv(res: EvalResult, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if res.protocol == "pointing":
            w.writerow(["method", "class", "subset", "hits", "misses", "accuracy"])
            for m, s in res.summary.items():
                w.writerow([m, "(mean over classes)", "all", s["hits"], s["misses"], s["mean_accuracy"]])
                w.writerow([m, "(mean over classes)", "difficult", s["difficult_hits"], s["difficult_misses"],
                            s["mean_accuracy_difficult"]])
                for c, pc in s["per_class"].items():
                    w.writerow([m, c, "all", pc["hits"], pc["misses"], pc["accuracy"]])
                    w.writerow([m, c, "difficult", pc["difficult_hits"], pc["difficult_misses"], pc["difficult_accuracy"]])
        else:
            w.writerow(["method", "class", "alpha", "correct", "wrong", "error"])
            for m, s in res.summary.items():
                n_test = s["n_test"]
                wrong = None if s["error"] is None else int(round(s["error"] * n_test))
                w.writerow([m, "(all test images)", s["alpha"], None if wrong is None else n_test - wrong, wrong, s["error"]])
                for c, pc in s["per_class"].items():
                    w.writerow([m, c, s["alpha"], pc["correct"], pc["wrong"], pc["error"]])


# ---------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------
def bar_chart(rows: list, series: list, values: dict, title: str, path: Path, xlabel: str = "") -> None:
    """Horizontal grouped bars: one group per row label, one bar per series; ``values[(row, series)]``
    in [0, 1] or None."""
    font, small = _font(13), _font(11)
    bar_h, gap, left, right, top = 9, 8, 150, 40, 56
    group_h = bar_h * len(series) + gap
    width = 820
    height = top + group_h * len(rows) + 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black", font=font)
    lx = 10
    for k, s in enumerate(series):  # legend
        d.rectangle([lx, 30, lx + 12, 42], fill=PALETTE[k % len(PALETTE)])
        d.text((lx + 16, 29), s, fill="black", font=small)
        lx += 28 + int(d.textlength(s, font=small))
    plot_w = width - left - right
    y_end = top + group_h * len(rows)
    for t in range(0, 11, 2):  # grid
        x = left + plot_w * t / 10
        d.line([x, top - 4, x, y_end], fill=(220, 220, 220))
        d.text((x - 8, y_end + 4), f"{t / 10:.1f}", fill="black", font=small)
    if xlabel:
        d.text((left + plot_w / 2 - 30, y_end + 20), xlabel, fill="black", font=small)
    for i, r in enumerate(rows):
        y = top + i * group_h
        d.text((10, y + group_h / 2 - 9), str(r)[:22], fill="black", font=small)
        for k, s in enumerate(series):
            v = values.get((r, s))
            if v is None:
                continue
            y0 = y + k * bar_h
            d.rectangle([left, y0, left + plot_w * max(0.0, min(1.0, v)), y0 + bar_h - 2], fill=PALETTE[k % len(PALETTE)])
    d.line([left, top - 4, left, y_end], fill="black")
    img.save(path)


def curve_chart(curves: dict, title: str, path: Path) -> None:
    """Error vs alpha: ``curves[name] = (alphas, held_out_errors, test_errors, chosen_alpha)``;
    test error as a solid line, held-out error as dots, the chosen alpha as a vertical tick."""
    font, small = _font(13), _font(11)
    width, height, left, right, top, bottom = 760, 450, 60, 20, 70, 50
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black", font=font)
    pw, ph = width - left - right, height - top - bottom
    alphas_all = [a for c in curves.values() for a in c[0]] or [0, 10]
    amax = max(alphas_all) or 1.0

    def xy(a, e):
        return left + pw * a / amax, top + ph * (1 - e)

    for t in range(0, 11, 2):
        _, y = xy(0, t / 10)
        d.line([left, y, left + pw, y], fill=(225, 225, 225))
        d.text((20, y - 7), f"{t / 10:.1f}", fill="black", font=small)
    for a in range(0, int(amax) + 1):
        x, _ = xy(a, 0)
        d.text((x - 4, top + ph + 6), str(a), fill="black", font=small)
    d.text((left + pw / 2 - 20, top + ph + 24), "alpha", fill="black", font=small)
    d.text((left - 40, top - 14), "error", fill="black", font=small)
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    lx = 10
    for k, (name, (alphas, held, test, chosen)) in enumerate(curves.items()):
        col = PALETTE[k % len(PALETTE)]
        label = f"{name} (alpha {chosen:g})" if chosen is not None else name
        d.rectangle([lx, 32, lx + 12, 44], fill=col)
        d.text((lx + 16, 31), label, fill="black", font=small)
        lx += 28 + int(d.textlength(label, font=small))
        pts = [xy(a, e) for a, e in zip(alphas, test) if e is not None]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for a, e in zip(alphas, held):
            if e is not None:
                x, y = xy(a, e)
                d.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], outline=col)
        if chosen is not None:  # a tick per method, stacked so equal choices stay visible
            x, _ = xy(chosen, 0)
            d.line([x, top + ph - 8 * (k + 1), x, top + ph - 8 * k - 1], fill=col, width=3)
    img.save(path)


def write_reports(res: EvalResult, out_dir: Path) -> dict:
    """results.md, results.csv and the plots; returns their paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if res.protocol == "faithfulness":
        return write_faithfulness_reports(res, out_dir)
    files = {"markdown": out_dir / "results.md", "csv": out_dir / "results.csv"}
    files["markdown"].write_text(markdown(res), encoding="utf-8")
    write_csv(res, files["csv"])
    methods = list(res.summary)
    if res.protocol == "pointing":
        classes = sorted({c for m in methods for c in res.summary[m]["per_class"]})
        vals = {(c, m): res.summary[m]["per_class"][c]["accuracy"]
                for m in methods for c in res.summary[m]["per_class"]}
        files["per_class_plot"] = out_dir / "pointing_per_class.png"
        bar_chart(classes, methods, vals, f"Pointing game accuracy per class (tolerance {res.settings['tolerance']} px)",
                  files["per_class_plot"], "accuracy")
    else:
        classes = sorted({c for m in methods for c in res.summary[m]["per_class"]})
        vals = {(c, m): res.summary[m]["per_class"][c]["error"]
                for m in methods for c in res.summary[m]["per_class"]}
        files["per_class_plot"] = out_dir / "localization_per_class.png"
        bar_chart(classes, methods, vals, "Localization error per dominant class (test images)",
                  files["per_class_plot"], "error")
        curves = {m: (s["curve"]["alpha"], s["curve"]["held_out_error"], s["curve"]["test_error"], s["alpha"])
                  for m, s in res.summary.items() if s.get("curve")}
        files["alpha_plot"] = out_dir / "alpha_error.png"
        curve_chart(curves, "Localization error vs alpha (line: test images, dots: held-out)", files["alpha_plot"])
    return {k: str(v) for k, v in files.items()}


# ---------------------------------------------------------------------------
# faithfulness (deletion / insertion, ROAD)
# ---------------------------------------------------------------------------
def _p_text(p) -> str:
    return "–" if p is None else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def faithfulness_markdown(res: EvalResult) -> str:
    from .result import auc_text, ci_text

    s, c = res.settings, res.counts
    kinds = s["curves"]
    out = ["# Faithfulness: " + " and ".join(kinds), ""]
    out.append(f"- data: `{s['data']}` ({s['fmt']}), model: `{s['model']}`, layers: {', '.join(s['layers']) or '–'}, "
               f"rule: {s['rule']}, input: {s['input']}, targets: "
               + ("the annotated classes (mapping: `" + str(s['mapping']) + "`)" if s["target"] == "label"
                  else "the model's top-1 class"))
    out.append(f"- perturbation: {s['perturbation_text']}; batches of {s['perturbation']['batch_size']} inputs")
    out.append(f"- images evaluated: {c['images_evaluated']} of {c['images_read']} read; (image, target) pairs: "
               f"{c['items']}; {c['forward_inputs']} perturbed inputs, {c['images_per_s']} images/s, "
               f"{c['inputs_per_s']} inputs/s")
    out.append(f"- mean area under the curve (x: fraction of pixels changed, trapezoid) with a 95 % percentile "
               f"bootstrap interval ({s['bootstrap']} resamples of the pairs, seed {s['seed']}); random and ties: "
               f"seed {s['seed']}")
    if res.unmapped:
        out.append(f"- **{len(res.unmapped)} dataset class(es) have no model mapping and are not evaluated** "
                   f"(skipped pairs in brackets): {unmapped_line(res)}")
    if res.problems:
        out.append(f"- {len(res.problems)} problem(s) reading the data (see results.json)")
    if c.get("skipped"):
        out.append(f"- {c['skipped']} image(s) skipped during evaluation (see results.json)")
    header, rows = res.overall_table()
    out += ["", "Mean area under each curve (↓: lower is better, ↑: higher is better) and its 95 % interval.",
            "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    for kind in kinds:
        comps = [r for r in res.comparisons if r["curve"] == kind]
        if not comps:
            continue
        out += ["", f"Paired comparisons, {kind} AUC (a - b over the same pairs; "
                    f"{'negative' if CURVES_BETTER[kind] == 'lower' else 'positive'} favours a): mean difference, "
                    "95 % bootstrap interval, two-sided p of the paired bootstrap and of the Wilcoxon signed-rank "
                    "test (Holm-adjusted over the pairs of this table)", ""]
        out.append("| a | b | mean a - b | 95 % CI | p (bootstrap) | p (Wilcoxon) | p (Wilcoxon, Holm) |")
        out.append("|---|---|---|---|---|---|---|")
        for r in comps:
            diff = "–" if r["mean_diff"] is None else f"{r['mean_diff']:+.4f}"
            out.append(f"| {r['a']} | {r['b']} | {diff} | {ci_text(r['low'], r['high'])} | {_p_text(r['p_bootstrap'])} "
                       f"| {_p_text(r['p_wilcoxon'])} | {_p_text(r['p_wilcoxon_holm'])} |")
    return "\n".join(out) + "\n"




def write_faithfulness_csv(res: EvalResult, path: Path, comparisons_path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "curve", "better", "mean_auc", "ci_low", "ci_high", "pairs"])
        for m, s in res.summary.items():
            for kind in res.settings["curves"]:
                k = s[kind]
                w.writerow([m, kind, k["better"], k["mean"], k["low"], k["high"], s["n"]])
    with open(comparisons_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        cols = ["curve", "a", "b", "better", "n", "mean_diff", "low", "high", "p_bootstrap", "p_wilcoxon",
                "wilcoxon", "p_wilcoxon_holm"]
        w.writerow(cols)
        for r in res.comparisons:
            w.writerow([r.get(k) for k in cols])


def faithfulness_chart(res: EvalResult, path: Path) -> None:
    """The mean curves, one panel per curve kind (probability vs fraction of pixels changed)."""
    font, small = _font(13), _font(11)
    kinds = res.settings["curves"]
    labels = list(res.summary)
    pw, ph, left, gap, top, bottom = 420, 300, 60, 50, 60 + 16 * ((len(labels) + 2) // 3), 50
    width = left + len(kinds) * (pw + gap)
    height = top + ph + bottom
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"Faithfulness: mean target probability ({res.counts['items']} pairs)", fill="black", font=font)
    for k, lab in enumerate(labels):   # legend: three per row
        x, y = 10 + (k % 3) * 300, 30 + 16 * (k // 3)
        col = PALETTE[k % len(PALETTE)]
        d.rectangle([x, y + 2, x + 12, y + 12], fill=col)
        aucs = ", ".join(f"{kd[:3]} {res.summary[lab][kd]['mean']:.3f}" for kd in kinds
                         if res.summary[lab][kd]["mean"] is not None)
        d.text((x + 16, y), f"{lab} ({aucs})"[:46], fill="black", font=small)
    ymax = max([v for lab in labels for kd in kinds for v in res.summary[lab][kd]["curve"]] + [1e-6])
    ymax = min(1.0, float(np.ceil(ymax * 10) / 10)) if ymax > 0.1 else ymax * 1.1
    for p, kind in enumerate(kinds):
        x0 = left + p * (pw + gap)
        d.rectangle([x0, top, x0 + pw, top + ph], outline="black")
        d.text((x0 + pw / 2 - 40, top - 16), f"{kind} ({CURVES_BETTER[kind]} AUC is better)", fill="black", font=small)
        for t in range(0, 6):
            y = top + ph * (1 - t / 5)
            d.line([x0, y, x0 + pw, y], fill=(225, 225, 225))
            d.text((x0 - 40, y - 7), f"{ymax * t / 5:.2f}", fill="black", font=small)
            xt = x0 + pw * t / 5
            d.text((xt - 8, top + ph + 6), f"{t / 5:.1f}", fill="black", font=small)
        d.text((x0 + pw / 2 - 60, top + ph + 24), "fraction of pixels changed", fill="black", font=small)
        for k, lab in enumerate(labels):
            s = res.summary[lab]
            ys = s[kind]["curve"]
            if len(ys) < 2:
                continue
            pts = [(x0 + pw * xv, top + ph * (1 - min(yv / ymax, 1.0))) for xv, yv in zip(s["x"], ys)]
            d.line(pts, fill=PALETTE[k % len(PALETTE)], width=2)
    img.save(path)


def write_faithfulness_reports(res: EvalResult, out_dir: Path) -> dict:
    files = {"markdown": out_dir / "results.md", "csv": out_dir / "results.csv",
             "comparisons": out_dir / "comparisons.csv", "curves_plot": out_dir / "faithfulness_curves.png"}
    files["markdown"].write_text(faithfulness_markdown(res), encoding="utf-8")
    write_faithfulness_csv(res, files["csv"], files["comparisons"])
    faithfulness_chart(res, files["curves_plot"])
    return {k: str(v) for k, v in files.items()}
