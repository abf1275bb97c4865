"""`onnx-excite ground` and `onnx-excite eval grounding`: text-to-region grounding (the
paper's section 4.3). Registered on the app by a one-line import in cli/app.py."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from onnx_excite.cli.app import app, err, eval_app, friendly, out
from onnx_excite.errors import ExciteError


def _gamma(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ExciteError(f"--gamma must be a number in [0, 1], not {text!r}") from None
    if not 0 <= value <= 1:
        raise ExciteError(f"--gamma must be in [0, 1], not {value}")
    return value


@app.command()
@friendly
def ground(model: str = typer.Argument(..., help="ONNX classifier path, or 'default'"),
           image: Path = typer.Argument(..., help="image file"),
           phrases: List[str] = typer.Argument(..., help="phrase(s) to ground, e.g. \"a brown dog\" (one output each)"),
           vocab: Optional[Path] = typer.Option(None, "--vocab", help="vocabulary file: JSON word -> output indices, "
                                                "JSON list of class names, or TSV 'word<TAB>i,j' (default: the model's class names)"),
           proposals: str = typer.Option("selective-search", "--proposals", help="boxes file (JSON/CSV) or folder, "
                                         "or 'selective-search' (needs the 'ground' extra)"),
           top: int = typer.Option(5, "--top", help="boxes written and drawn"),
           method: str = typer.Option("cmwp", "--method", "-m", help="attention method for the word maps (mwp, cmwp)"),
           weights: str = typer.Option("predicted", "--weights", help="a word's classes weighted by the model's posterior (predicted) or alike (uniform)"),
           gamma: str = typer.Option("0.5", "--gamma", help="f(R) = S_R / A_R^gamma, in [0, 1]"),
           size: int = typer.Option(300, "--size", help="shorter side of the resized image (models that take any size)"),
           layer: Optional[str] = typer.Option(None, "--layer", "-l", help="map layer (default: the model profile's)"),
           nms_iou: float = typer.Option(0.7, "--nms-iou", help="non-maximum suppression IoU threshold"),
           out_dir: Path = typer.Option(Path("ground_out"), "-o", "--output", help="output folder")):
    """Rank region proposals for phrases by the classifier's attention to their words.

    Writes per phrase the ranked boxes (JSON), the phrase map (.npy) and an overlay (PNG).
    """
    from onnx_excite.apps.explain import safe_name
    from onnx_excite.apps.grounding import Grounder, proposal_source
    from onnx_excite.apps.grounding.render import write_grounding
    from onnx_excite.io.checks import output_dir
    from onnx_excite.io.images import load_image

    if top < 1:
        raise ExciteError("--top must be at least 1")
    output_dir(out_dir, "-o")   # before the work, not after it
    photo = load_image(image)
    grounder = Grounder(model, vocab=vocab, method=method, layer=layer, size=size, gamma=_gamma(gamma), nms_iou=nms_iou,
                        weights=weights)
    boxes = proposal_source(proposals).boxes(photo, image.stem)
    for phrase in phrases:
        result = grounder.ground(photo, phrase, boxes)
        paths = write_grounding(photo, result, out_dir, f"{image.stem}.{safe_name(phrase)}", top,
                                extra={"image": str(image), "model": model, "layer": grounder.layer})
        skipped = result.phrase.stop + result.phrase.oov
        out.print(f'"{phrase}": words {result.phrase.keys or "-"}'
                  + (f"; out of vocabulary: {', '.join(result.phrase.oov)}" if result.phrase.oov else "")
                  + (f"; stop words: {', '.join(result.phrase.stop)}" if result.phrase.stop and not result.phrase.keys else ""),
                  markup=False)
        if not result.phrase.words:
            err.print(f"warning: no word of {phrase!r} is in the vocabulary ({', '.join(skipped) or 'empty phrase'}): "
                      "no map, no ranking", markup=False)
        table = Table("rank", "x1", "y1", "x2", "y2", "score", title=f"{len(boxes)} proposals, gamma {result.gamma:g}")
        for i in range(min(top, len(result.boxes))):
            x1, y1, x2, y2 = result.boxes[i]
            table.add_row(str(i + 1), f"{x1:.0f}", f"{y1:.0f}", f"{x2:.0f}", f"{y2:.0f}", f"{result.scores[i]:.4g}")
        if len(result.boxes):
            out.print(table)
        for path in paths.values():
            out.print(f"  {path}", markup=False)


@eval_app.command("grounding")
@friendly
def eval_grounding(data: Path = typer.Option(..., "--data", help="Flickr30k Entities folder (Sentences/, Annotations/, images)"),
                   split: str = typer.Option("test", "--split", help="split file to evaluate (test, val, train) or 'all'"),
                   heldout: str = typer.Option("auto", "--heldout", help="split on which gamma is chosen; 'auto': val when "
                                               "val.txt exists; 'none'"),
                   model: str = typer.Option("default", "--model", help="ONNX classifier or 'default'"),
                   method: str = typer.Option("cmwp", "--method", "-m", help="attention method (mwp, cmwp)"),
                   weights: str = typer.Option("predicted", "--weights", help="a word's classes weighted by the model's posterior (predicted) or alike (uniform)"),
                   vocab: Optional[Path] = typer.Option(None, "--vocab", help="vocabulary file (default: the model's class names)"),
                   layer: Optional[str] = typer.Option(None, "--layer", "-l", help="map layer (default: the model profile's)"),
                   proposals: str = typer.Option("selective-search", "--proposals", help="'selective-search', or a boxes "
                                                 "folder (<image id>.json/.csv) or file keyed by image id"),
                   gamma: str = typer.Option("auto", "--gamma", help="'auto' (chosen on the held-out split) or a number in [0, 1]"),
                   size: int = typer.Option(300, "--size", help="shorter side of the resized image"),
                   gt: str = typer.Option("union", "--gt", help="hit with the union box of a phrase's boxes (the protocol) or 'any' box"),
                   small: float = typer.Option(0.1, "--small-fraction", help="small instance: ground truth below this fraction of the image"),
                   images: Optional[Path] = typer.Option(None, "--images", help="photo folder (default: Images/ or flickr30k-images/ in --data)"),
                   limit: Optional[int] = typer.Option(None, "--limit", help="evaluate only the first N images of the split"),
                   out_dir: Path = typer.Option(Path("ground_eval"), "-o", "--output", help="results folder (proposals are cached there)")):
    """Phrase localization on Flickr30k Entities (recall@1/5/10, mAP) vs the proposal base.

    Also per phrase type and for small instances; the proposal base ranks the same
    proposals in their own order.
    """
    from onnx_excite.apps.grounding.evaluate import GroundingEvalOptions, run_grounding_eval
    from onnx_excite.io.checks import output_dir

    output_dir(out_dir, "-o")   # before the work, not after it

    opts = GroundingEvalOptions(data=str(data), split=split, heldout=heldout, model=model, method=method, weights=weights,
                                vocab=str(vocab) if vocab else None, layer=layer, proposals=proposals, gamma=gamma,
                                size=size, gt=gt, small_fraction=small, image_dir=str(images) if images else None,
                                limit=limit, out_dir=str(out_dir))
    from rich.progress import Progress

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("grounding", total=None)

        def advance(n: int, total: int) -> None:
            bar.update(task, total=total, advance=n)

        res = run_grounding_eval(opts, progress=advance)
    lines = Path(res["files"]["markdown"]).read_text().splitlines()
    start = lines.index("## All phrases")
    end = lines.index("## Phrases with a vocabulary word")
    for line in lines[start + 2:end]:
        if line.startswith("|") or line.startswith("##"):
            out.print(line, markup=False)
    out.print(f"gamma {res['settings']['gamma']:g}: {res['settings']['gamma_choice']}", markup=False)
    out.print(f"done in {res['seconds']:.1f} s; {res['counts']['queries']} phrases in {res['counts']['images']} images", markup=False)
    for path in res["files"].values():
        out.print(f"  {path}", markup=False)
    if res["problems"]:
        err.print(f"{len(res['problems'])} problem(s) in the data were skipped (listed in results.json); first: "
                  f"{res['problems'][0]}", markup=False)


@eval_app.command("entities-from-detection")
@friendly
def eval_entities_from_detection(
        data: Path = typer.Option(..., "--data", help="detection dataset: VOC folder or COCO instances JSON"),
        fmt: str = typer.Option("voc", "--format", help="voc or coco"),
        split: Optional[str] = typer.Option(None, "--split", help="VOC split (ImageSets/Main/<split>.txt)"),
        mapping: Optional[str] = typer.Option(None, "--mapping", help="class -> model outputs (JSON file or bundled "
                                              "name): also writes vocabulary.json for `eval grounding --vocab`"),
        val_every: int = typer.Option(5, "--val-every", help="every n-th image goes to val.txt (gamma is chosen there)"),
        out_dir: Path = typer.Option(..., "-o", "--output", help="folder for the Flickr30k Entities-format copy")):
    """A VOC/COCO detection set as grounding queries in the Flickr30k Entities format.

    One phrase "the <class>" per class present, with all its boxes, for `eval grounding`.
    """
    from onnx_excite.apps.grounding.convert import detection_to_entities

    res = detection_to_entities(data, out_dir, fmt=fmt, split=split, mapping=mapping, val_every=val_every)
    out.print(f"wrote {res['images']} images, {res['phrases']} phrases ({res['classes']} classes) to {res['out']}: "
              f"val {res['val']}, test {res['test']}", markup=False)
    if "vocabulary" in res:
        out.print(f"  {res['vocabulary']}: {res['mapped']} classes mapped"
                  + (f"; unmapped: {', '.join(res['unmapped'])}" if res["unmapped"] else ""), markup=False)
    if res["problems"]:
        err.print(f"{len(res['problems'])} problem(s) in the data were skipped; first: {res['problems'][0]}", markup=False)
