"""What makes `explain` over a folder fast changes no output: the graph's own top-1 choice
gives the maps and logits of a forward-then-explain run bit for bit; the written files of a
run with writer threads are the files of a run without (byte for byte, records included)."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import gap_classifier, tiny_model
from onnx_excite.run.runtime import TOP1_SIGNAL, Exciter


def _batch(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("methods", [("mwp", "cmwp"), ("grad", "guided"), ("deconv", "c-grad", "lrp-epsilon")])
@pytest.mark.parametrize("model, layer, shape", [(tiny_model(), "r1", (3, 3, 8, 8)),
                                                 (gap_classifier(7, 6, 2, 1), "r1", (4, 3, 20, 28))])
def test_top1_in_the_graph_equals_the_class_fed(model, layer, shape, methods):
    """Every method family (the gradient family's top node reads only the signal, so it can sit
    before the logits' producer: the top-1 rewrite sorts the graph again)."""
    x = _batch(0, shape)
    plain = Exciter(model, [layer], methods=methods)
    both = Exciter(model, [layer], methods=methods, top1=True)
    assert both.top1 and not plain.top1 and TOP1_SIGNAL not in [o.name for o in plain.built.model.graph.output]
    logits = plain.logits(x)
    top = logits.argmax(axis=1)
    fed = plain.explain(x, top)
    chosen = both.explain(x, None)
    assert np.array_equal(chosen.signal, np.eye(logits.shape[1], dtype=np.float32)[top])
    assert np.array_equal(chosen.logits, logits) and np.array_equal(both.logits(x), logits)
    for method in methods:
        assert np.array_equal(chosen.maps[method][layer], fed.maps[method][layer])
        assert chosen.maps[method][layer].any() or method.startswith("c-")   # a clipped contrast can be 0
    other = (top + 1) % logits.shape[1]   # a fed signal on the same graph: the weight 0 leaves it as fed
    a, b = plain.explain(x, other), both.explain(x, other)
    for method in methods:
        assert np.array_equal(a.maps[method][layer], b.maps[method][layer])
        assert not np.array_equal(a.maps[method][layer], fed.maps[method][layer]) or method.startswith("c-")


def test_without_top1_targets_are_required():
    from onnx_excite import ExciteError

    with pytest.raises(ExciteError, match="no targets given"):
        Exciter(tiny_model(), ["r1"], methods=("mwp",)).explain(_batch(0, (1, 3, 8, 8)), None)


def _outputs(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "explanations.jsonl"}


def _records(folder: Path) -> list:
    """The records without the files' modification times, with the folder's name taken out."""
    out = []
    for line in (folder / "explanations.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec["stamps"] = {Path(k).name: v[0] for k, v in rec["stamps"].items()}   # sizes; the times differ
        out.append(json.dumps(rec, sort_keys=True).replace(str(folder), "OUT"))
    return out


@pytest.mark.parametrize("args", [dict(top=2, methods=("mwp", "cmwp")), dict(targets=["1", "3"], methods=("mwp",))])
def test_writer_threads_write_the_files_of_one_thread(tmp_path, args):
    """Photos of two sizes (batches split by size), an unreadable file, top-2 or given targets:
    one thread and four write the same bytes and the same records in the same order."""
    import shutil

    from PIL import Image

    from onnx_excite.apps.explain import ExplainOptions, explain_files, sample_images

    src = tmp_path / "in"
    src.mkdir()
    for p in sample_images():
        shutil.copy(p, src)
        Image.open(p).resize((90, 70)).save(src / f"small_{p.stem}.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    model = tmp_path / "gap.onnx"
    onnx.save(gap_classifier(7, 6, 2, 1), str(model))
    summaries = {}
    for workers in (1, 4):
        opts = ExplainOptions(model=str(model), layers=["r1"], out_dir=tmp_path / f"w{workers}", batch_size=2,
                              workers=workers, **args)
        summaries[workers] = explain_files([src], opts)
    one, four = summaries[1], summaries[4]
    assert (one.written, one.failed, one.skipped) == (four.written, four.failed, four.skipped) and one.failed == 1
    files = _outputs(tmp_path / "w1")
    assert len(files) == one.written - 1 and files == _outputs(tmp_path / "w4")
    assert len(_records(tmp_path / "w1")) == 6 and _records(tmp_path / "w1") == _records(tmp_path / "w4")


def test_a_write_that_fails_on_a_thread_keeps_the_records_before_it(tmp_path, monkeypatch):
    """The third image's overlay cannot be written: the run stops with one error, the records
    of the images before it are stored (in order), none after it; a re-run finishes the rest."""
    import shutil

    from onnx_excite import ExciteError
    from onnx_excite.apps.explain import ExplainOptions, explain_files, sample_images
    import onnx_excite.render.overlay as render

    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        shutil.copy(sample_images()[i % 3], src / f"{i}.jpg")
    model = tmp_path / "gap.onnx"
    onnx.save(gap_classifier(7, 6, 2, 1), str(model))
    real = render.save_png

    def fails(img, path):
        if Path(path).name.startswith("2.") and not Path(path).name.endswith("panel.png"):
            raise PermissionError(13, "Permission denied")
        real(img, path)

    monkeypatch.setattr(render, "save_png", fails)
    opts = ExplainOptions(model=str(model), layers=["r1"], methods=("mwp",), out_dir=tmp_path / "out", workers=3)
    with pytest.raises(ExciteError, match="cannot write the outputs of 2.jpg .*Permission denied"):
        explain_files([src], opts)
    assert [Path(r["image"]).name for r in map(json.loads, (tmp_path / "out" / "explanations.jsonl").open())] \
        == ["0.jpg", "1.jpg"]
    assert not (tmp_path / "out" / ".onnx-excite.lock").exists()
    monkeypatch.setattr(render, "save_png", real)
    again = explain_files([src], opts)
    assert again.skipped == 2 and len(again.records) == 6


def test_float16_conversion_is_numpys_bit_for_bit():
    """Random bit patterns (every class: zeros, subnormals, normals, ties, overflow, inf, NaN
    payloads) and the boundaries give numpy's own float16 bits (checked once over all 2^32
    float32 patterns as well)."""
    import warnings

    from onnx_excite.io.half import to_float16

    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 2 ** 32, size=1 << 21, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0, 0x80000000, 0x33000000, 0x33000001, 0x337FFFFF, 0x38800000, 0x387FFFFF, 0x38801000,
                      0x38803000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FFFFF, 0x47800000, 0x7F800000,
                      0xFF800000, 0x7F800001, 0x7FC00000, 0x7F802000, 0xFFFFFFFF], np.uint32)
    x = np.concatenate([patterns, edges, edges | 0x80000000]).view(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = x.astype(np.float16)
        got = to_float16(x)
    assert got.dtype == np.float16 and np.array_equal(got.view(np.uint16), expected.view(np.uint16))
    tiny = np.random.default_rng(1).random((48, 64)).astype(np.float32) * 1e-5   # a map's typical pixels
    assert np.array_equal(to_float16(tiny).view(np.uint16), tiny.astype(np.float16).view(np.uint16))
    assert to_float16(tiny).shape == (48, 64)


def test_bench_explain_reports_the_folder_beside_the_graph(tmp_path):
    """bench-explain: one row for the graph, one per --workers, every image explained in each
    round (in a temporary folder, removed after), ratios = images/s over the graph's."""
    import shutil

    from typer.testing import CliRunner

    from onnx_excite.apps.bench_explain import run_explain_bench
    from onnx_excite.apps.explain import ExplainOptions, sample_images
    from onnx_excite.cli.app import app

    src = tmp_path / "in"
    src.mkdir()
    for p in sample_images():
        shutil.copy(p, src)
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    model = tmp_path / "gap.onnx"
    onnx.save(gap_classifier(7, 6, 2, 1), str(model))
    opts = ExplainOptions(model=str(model), layers=["r1"], top=2, batch_size=2, out_dir=tmp_path / "unused")
    report = run_explain_bench([src], opts, workers=(1, 3), rounds=2)
    assert [r.workers for r in report.rows] == [None, 1, 3] and report.runs_per_batch == 2
    assert all(len(r.seconds) == 2 and r.images == 3 and r.images_per_s > 0 for r in report.rows)
    assert report.ratio(report.graph) == 1.0
    assert report.ratio(report.rows[1]) == pytest.approx(report.rows[1].images_per_s / report.graph.images_per_s)
    assert not (tmp_path / "unused").exists()
    res = CliRunner().invoke(app, ["bench-explain", str(model), str(src), "-l", "r1", "-t", "1", "--rounds", "1",
                                   "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "graph (Exciter.explain)" in res.output and "ratio explain folder (workers 2) / graph:" in res.output


@pytest.mark.parametrize("args", [dict(top=1), dict(targets=["2", "5"]), dict(targets=["2", "5"], combine=True)])
def test_explain_runs_no_forward_beforehand(tmp_path, monkeypatch, args):
    """--top 1 (the class chosen in the graph) and --target (classes known before the run) need
    no forward first: Exciter.logits is never called, and the stored maps are Exciter.explain's
    for the class fed, the logits in the records the forward's."""
    from onnx_excite.apps.explain import ExplainOptions, explain_files, sample_images
    from onnx_excite.io.images import load_image, preprocess

    model = tmp_path / "gap.onnx"
    onnx.save(gap_classifier(7, 6, 2, 1), str(model))
    photo = sample_images()[0]
    x, _ = preprocess(load_image(photo), size=224, resize="shorter")
    plain = Exciter(str(model), ["r1"], methods=("mwp",), input_shapes={"x": [None, *x.shape]})
    logits = plain.logits(x[None])
    monkeypatch.setattr(Exciter, "logits", lambda self, x: pytest.fail("a forward before the run"))
    summary = explain_files([photo], ExplainOptions(model=str(model), layers=["r1"], methods=("mwp",),
                                                    out_dir=tmp_path / "out", workers=1, **args))
    record = summary.records[0]
    assert [t["logit"] for t in record["top5"]] == pytest.approx(sorted(logits[0], reverse=True)[:5], abs=0)
    classes = [o["targets"] for o in record["outputs"]]
    assert classes == ([[int(logits[0].argmax())]] if "top" in args else [[2, 5]] if args.get("combine") else [[2], [5]])
    for out, wanted in zip(record["outputs"], classes):
        signal = np.zeros((1, 7), np.float32)
        signal[0, wanted] = 1.0
        assert np.array_equal(np.load(out["map"]), plain.explain(x[None], signal).maps["mwp"]["r1"][0])
