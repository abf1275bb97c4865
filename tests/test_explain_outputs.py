"""`explain --outputs` writes exactly the files chosen (and the records list exactly those),
`--format jpg|webp` writes files that decode at the overlay's size, a re-run after a jpg run
skips the finished images, bad choices are one error line, and the final line gives the
throughput."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import gap_classifier
from onnx_excite import ExciteError
from onnx_excite.apps.explain import OUTPUTS, ExplainOptions, explain_files, parse_outputs, sample_images
from onnx_excite.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two photos (one small PNG, so two input sizes) and a 7-class classifier; top-2, one method:
    per image 2 classes x 1 method x 1 layer."""
    root = tmp_path_factory.mktemp("outputs")
    src = root / "in"
    src.mkdir()
    shutil.copy(sample_images()[0], src / "a.jpg")
    Image.open(sample_images()[1]).resize((90, 70)).save(src / "b.png")
    model = root / "gap.onnx"
    onnx.save(gap_classifier(7, 6, 2, 1), str(model))
    return root, src, model


def _opts(model, out, **kw):
    base = dict(model=str(model), layers=["r1"], methods=("mwp",), top=2, out_dir=out, workers=1)
    return ExplainOptions(**(base | kw))


def _expected_names(summary, outputs, suffix=".png") -> set:
    """The files each choice stands for, from the classes each image's record names."""
    names = set()
    for rec in summary.records:
        stem = Path(rec["image"]).stem
        tags = ["+".join(map(str, o["targets"])) for o in rec["outputs"]]
        for tag in tags:
            base = f"{stem}.{tag}.mwp.r1"
            names |= {f"{base}.npy"} if "npy" in outputs else set()
            names |= {f"{base}.image.npy"} if "image-npy" in outputs else set()
            names |= {f"{base}{suffix}"} if "overlay" in outputs else set()
            names |= {f"{stem}.{tag}.panel{suffix}"} if "panel" in outputs else set()
        if "panel" in outputs and len(tags) > 1:
            names.add(f"{stem}.classes.panel{suffix}")
    if "record" in outputs:
        names.add("explanations.jsonl")
    return names


@pytest.mark.parametrize("outputs", [("overlay",), ("panel",), ("npy",), ("image-npy",), ("record",),
                                     ("overlay", "record"), OUTPUTS])
def test_each_choice_writes_exactly_those_files(setup, tmp_path, outputs):
    root, src, model = setup
    out = tmp_path / "out"
    summary = explain_files([src], _opts(model, out, outputs=",".join(outputs)))
    assert len(summary.records) == 2 and summary.failed == 0
    assert all(len(r["outputs"]) == 2 for r in summary.records)   # the classes explained, whatever is written
    on_disk = {p.name for p in out.iterdir() if p.name != ".onnx-excite.lock"}
    assert on_disk == _expected_names(summary, outputs)
    assert summary.written == len(on_disk)
    listed = set()
    for rec in summary.records:
        for o in rec["outputs"]:
            listed |= {Path(v).name for k, v in o.items() if k in ("map", "map_image", "overlay", "panel", "classes_panel")}
            assert ("vmax" in o) == any(x in outputs for x in ("overlay", "panel", "image-npy"))
    assert listed == on_disk - {"explanations.jsonl"}
    if "record" in outputs:   # the records on disk are those returned, listing the same files
        stored = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
        assert [r["outputs"] for r in stored] == [r["outputs"] for r in summary.records]


def test_the_chosen_files_are_those_of_the_full_run(setup, tmp_path):
    """A choice changes what is written, not a value: the npy maps of `--outputs npy` are the
    full run's, the overlay bytes of `--outputs overlay` the full run's."""
    root, src, model = setup
    full = explain_files([src], _opts(model, tmp_path / "full"))
    explain_files([src], _opts(model, tmp_path / "npy", outputs="npy"))
    explain_files([src], _opts(model, tmp_path / "ov", outputs="overlay"))
    for rec in full.records:
        for o in rec["outputs"]:
            name = Path(o["map"]).name
            assert np.array_equal(np.load(o["map"]), np.load(tmp_path / "npy" / name))
            assert Path(o["overlay"]).read_bytes() == (tmp_path / "ov" / Path(o["overlay"]).name).read_bytes()


@pytest.mark.parametrize("fmt, pil", [("jpg", "JPEG"), ("webp", "WEBP")])
def test_lossy_formats_decode_at_the_overlays_size(setup, tmp_path, fmt, pil):
    """Overlays and panels in jpg/webp: the file names end with the format, the files decode as
    that format at the size of the PNG of the same overlay, and look like it (mean error)."""
    root, src, model = setup
    png = explain_files([src], _opts(model, tmp_path / "png", outputs="overlay,panel,record"))
    lossy = explain_files([src], _opts(model, tmp_path / fmt, outputs="overlay,panel,record", format=fmt))
    for a, b in zip(png.records, lossy.records):
        for oa, ob in zip(a["outputs"], b["outputs"]):
            for key in ("overlay", "panel"):
                assert ob[key].endswith(f".{fmt}") and Path(ob[key]).is_file()
                with Image.open(oa[key]) as want, Image.open(ob[key]) as got:
                    assert got.format == pil and got.size == want.size
                    diff = np.abs(np.asarray(got.convert("RGB"), np.float64) - np.asarray(want.convert("RGB"), np.float64))
                    assert diff.mean() < 6, diff.mean()
    photo = Image.open(src / "a.jpg")
    overlay = lossy.records[0]["outputs"][0]["overlay"]
    assert Image.open(overlay).height == photo.height          # the photo's own height (colour bar beside)
    assert not list((tmp_path / fmt).glob("*.png"))


def test_resume_after_a_jpg_run_skips_the_done_images(setup, tmp_path):
    root, src, model = setup
    out = tmp_path / "out"
    first = explain_files([src], _opts(model, out, format="jpg"))
    assert first.skipped == 0 and first.images == 2
    again = explain_files([src], _opts(model, out, format="jpg"))
    assert again.skipped == 2 and again.images == 0 and again.written == 1   # explanations.jsonl, as counted before
    Path(first.records[1]["outputs"][0]["overlay"]).unlink()   # one file gone: that image is done again
    third = explain_files([src], _opts(model, out, format="jpg"))
    assert third.skipped == 1 and third.images == 1
    png = explain_files([src], _opts(model, out))               # another format: other files, not skipped
    assert png.skipped == 0 and png.images == 2
    only_record = explain_files([src], _opts(model, tmp_path / "rec", outputs="record"))
    assert explain_files([src], _opts(model, tmp_path / "rec", outputs="record")).skipped == 2
    assert only_record.written == 1   # the JSONL file alone


def test_without_record_nothing_is_kept_and_every_image_is_done_again(setup, tmp_path):
    root, src, model = setup
    out = tmp_path / "out"
    for _ in range(2):
        summary = explain_files([src], _opts(model, out, outputs="overlay"))
        assert summary.skipped == 0 and summary.images == 2
    assert not (out / "explanations.jsonl").exists()
    inside = tmp_path / "photos"
    shutil.copytree(src, inside)
    with pytest.raises(ExciteError, match="without record into a folder of input images"):
        explain_files([inside], _opts(model, inside, outputs="overlay"))
    assert sorted(p.name for p in inside.iterdir()) == ["a.jpg", "b.png"]


def test_bad_choices_are_one_error_line(setup, tmp_path):
    root, src, model = setup
    assert parse_outputs("record, overlay") == ("overlay", "record") and parse_outputs(["npy"]) == ("npy",)
    for bad in ("overlay,pngs", ""):
        with pytest.raises(ExciteError, match="choose a comma list of overlay, panel, npy, image-npy, record"):
            explain_files([src], _opts(model, tmp_path / "x", outputs=bad))
    with pytest.raises(ExciteError, match="--format must be one of png, jpg, webp, not 'gif'"):
        explain_files([src], _opts(model, tmp_path / "x", format="gif"))
    assert not (tmp_path / "x").exists()   # refused before anything is written
    for args, text in ((["--outputs", "overlay,heatmap"], "unknown output 'heatmap'"),
                       (["--format", "tiff"], "--format must be one of png, jpg, webp")):
        res = runner.invoke(app, ["explain", str(model), str(src), "-l", "r1", "-o", str(tmp_path / "y"), *args])
        assert res.exit_code == 2 and "Traceback" not in res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], res.output


def test_the_final_line_gives_the_throughput(setup, tmp_path):
    root, src, model = setup
    res = runner.invoke(app, ["explain", str(model), str(src), "-l", "r1", "-m", "mwp", "--outputs", "overlay,record",
                              "--format", "jpg", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    m = re.fullmatch(r"wrote (\d+) file\(s\) to .* for (\d+) image\(s\) in ([\d.]+) s, ([\d.]+) images/s", last)
    assert m, last
    files, images, seconds, rate = int(m[1]), int(m[2]), float(m[3]), float(m[4])
    assert (files, images) == (3, 2) and seconds > 0
    assert rate == pytest.approx(images / seconds, rel=0.1)   # the rate of the time shown (rounded to 0.1 s)
    assert sorted(p.suffix for p in (tmp_path / "o").iterdir() if not p.name.startswith(".")) == [".jpg", ".jpg", ".jsonl"]


def test_the_cli_default_is_the_librarys():
    from onnx_excite.cli import app as cli

    assert cli.EXPLAIN_OUTPUTS == OUTPUTS


def test_progress_lines_off_a_terminal_and_the_bar_on_one(setup, tmp_path, monkeypatch):
    """Off a terminal: a line every `every_s` seconds with the count, images/s and ETA (fake
    clock), none once the job is done; on a terminal: explain's bar shows images/s and the ETA."""
    import io

    from rich.console import Console

    from onnx_excite.io.progress import ImageProgress, format_eta

    now = [0.0]
    log = Console(file=io.StringIO(), width=200)
    with ImageProgress(log, "pointing", 10, lines=True, every_s=5, clock=lambda: now[0]) as advance:
        for _ in range(10):
            now[0] += 2.0
            advance(1)
    lines = log.file.getvalue().splitlines()
    assert lines == ["pointing: 3/10 images, 0.50 images/s, ETA 14 s", "pointing: 6/10 images, 0.50 images/s, ETA 8 s",
                     "pointing: 9/10 images, 0.50 images/s, ETA 2 s"]
    assert format_eta(125) == "2 min 05 s" and format_eta(7260) == "2 h 01 min"
    quiet = Console(file=io.StringIO(), width=200)
    with ImageProgress(quiet, "explaining", 10, every_s=0, clock=lambda: now[0]) as advance:   # lines not asked
        advance(5)
    assert quiet.file.getvalue() == ""

    from onnx_excite.cli import eval_cmd

    monkeypatch.setattr(eval_cmd, "PROGRESS_EVERY_S", 0.0)
    log = Console(file=io.StringIO(), width=200)
    report = eval_cmd._Progress(log, "localization")
    for done in (1, 2, 3):
        report(done, 4)
    report.close()
    assert [ln.split(",")[0] for ln in log.file.getvalue().splitlines()] == \
        ["localization: 1/4 images", "localization: 2/4 images", "localization: 3/4 images"]

    root, src, model = setup
    many = tmp_path / "many"
    many.mkdir()
    for i in range(5):
        shutil.copy(src / "a.jpg", many / f"{i}.jpg")
    term = Console(file=io.StringIO(), force_terminal=True, width=160)
    explain_files([many], _opts(model, tmp_path / "o", outputs="npy,record"), console=term)
    shown = term.file.getvalue()
    assert "images/s" in shown and "ETA" in shown and "explaining (2 classes per image)" in shown


def test_bench_explain_rows_per_outputs_and_format(setup, tmp_path, monkeypatch):
    """bench-explain --outputs/--format: one row per combination (a format once for outputs
    without overlays or panels), each run writing just those files (seen through the explain
    call it makes), the graph's own images/s printed."""
    import onnx_excite.apps.explain as explain_mod
    from onnx_excite.apps.bench_explain import run_explain_bench

    root, src, model = setup
    seen, original = [], explain_mod.explain_files

    def spy(inputs, opts, **kw):   # run_explain_bench imports explain_files when it runs
        summary = original(inputs, opts, **kw)
        seen.append(sorted(p.suffix for p in Path(opts.out_dir).iterdir() if not p.name.startswith(".")))
        return summary

    monkeypatch.setattr(explain_mod, "explain_files", spy)
    report = run_explain_bench([src], _opts(model, tmp_path / "unused"), workers=(1,), rounds=1,
                               outputs=["overlay", "npy", "record,overlay"], formats=["png", "jpg"])
    monkeypatch.setattr(explain_mod, "explain_files", original)
    assert [r.name for r in report.rows] == [
        "graph (Exciter.explain)", "explain folder, workers 1, outputs overlay",
        "explain folder, workers 1, outputs overlay, jpg", "explain folder, workers 1, outputs npy",
        "explain folder, workers 1, outputs overlay,record", "explain folder, workers 1, outputs overlay,record, jpg"]
    assert seen == [[".png"] * 4, [".jpg"] * 4, [".npy"] * 4, [".jsonl"] + [".png"] * 4,
                                    [".jpg"] * 4 + [".jsonl"]]
    res = runner.invoke(app, ["bench-explain", str(model), str(src), "-l", "r1", "-m", "mwp", "--rounds", "1",
                              "--workers", "1", "--outputs", "npy", "--format", "webp"])
    assert res.exit_code == 0, res.output
    assert "ratio explain folder (workers 1, outputs npy) / graph:" in res.output
    assert re.search(r"graph alone: [\d.]+ images/s", res.output)
    bad = runner.invoke(app, ["bench-explain", str(model), str(src), "-l", "r1", "--outputs", "png"])
    assert bad.exit_code == 2 and "unknown output 'png'" in bad.output


def test_jpg_overlays_in_the_input_folder_are_not_explained_again(setup, tmp_path):
    """-o the input folder with --format jpg: the records list the .jpg overlays, so a re-run
    neither takes them for photos nor redoes the photos."""
    root, src, model = setup
    folder = tmp_path / "photos"
    shutil.copytree(src, folder)
    first = explain_files([folder], _opts(model, folder, outputs="overlay,record", format="jpg"))
    assert len(first.records) == 2 and len(list(folder.glob("*.mwp.r1.jpg"))) == 4
    again = explain_files([folder], _opts(model, folder, outputs="overlay,record", format="jpg"))
    assert again.skipped == 2 and again.images == 0 and len(again.records) == 2


def test_the_large_job_warning_names_the_files_chosen():
    from types import SimpleNamespace

    from onnx_excite.apps.explain import warn_if_large

    said = []
    setup = SimpleNamespace(per_image=1, layers=["a", "b"])
    for outputs in ("overlay,npy,panel", "record"):
        warn_if_large(1500, setup, SimpleNamespace(methods=("mwp",), graph_methods=("mwp",), outputs=outputs), said.append)
    assert said == ["1500 image(s) x 1 classes x 1 method(s) x 2 layer(s): 3000 maps, each with its .npy and overlay, "
                    "plus 1500 panels", "1500 image(s) x 1 classes x 1 method(s) x 2 layer(s): 3000 maps"]
