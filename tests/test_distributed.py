"""explain and eval on a real local Ray instance give the single-process results; a worker that
dies is retried; re-runs skip what is done. Data: the bundled sample photos, a tiny model."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from test_eval_data import tiny_gap_model

from onnx_excite import ExciteError
from onnx_excite.apps.distributed import ExplainActor, RaySettings, explain_on_ray, list_inputs
from onnx_excite.apps.eval import run_evaluation
from onnx_excite.apps.explain import ExplainOptions, explain_files, sample_images
from onnx_excite.apps.rise import RiseSettings

import ray  # noqa: E402  (the `test` extra installs it)

SETTINGS = RaySettings(actors=2, batch_size=2)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


gap_model = tiny_gap_model   # conv-relu-conv-relu ('feat') - global avg pool - gemm: any input size


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "gap.onnx"
    onnx.save(gap_model(), str(path))
    return str(path)


@pytest.fixture
def photos(tmp_path):
    """The three bundled photos and a corrupt one."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sample_images():
        shutil.copy(p, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def _files(folder: Path) -> dict:
    """Every output file's bytes, the records aside (compare those with `_jsonl`)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "explanations.jsonl"}


def _jsonl(folder: Path) -> str:
    """The records with the output folder's name masked and without the file stamps (each run
    stamps its own files' modification times)."""
    lines = []
    for line in (folder / "explanations.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("stamps", None)
        lines.append(json.dumps(rec).replace(str(folder), "OUT"))
    return "\n".join(lines)


def test_explain_on_ray_equals_one_process_and_resumes(local_ray, model_path, photos, tmp_path):
    opts = dict(model=model_path, layers=["feat"], methods=("mwp", "cmwp"), top=2, batch_size=1)
    one = explain_files([photos], ExplainOptions(out_dir=tmp_path / "one", **opts))
    opts_r = ExplainOptions(out_dir=tmp_path / "ray", **opts)
    summary, stats = explain_on_ray([str(photos)], opts_r, SETTINGS)
    assert (stats.images, stats.done, stats.failed, stats.resumed) == (4, 3, 1, 0)
    assert summary.failed == one.failed == 1 and summary.written == one.written
    assert summary.providers == one.providers and summary.logits_choice == one.logits_choice is not None
    assert stats.errors[0][0].endswith("broken.jpg") and "cannot read image" in stats.errors[0][1]
    a, b = _files(tmp_path / "one"), _files(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 3 * 2 * 2 * 3 + 3 * 2 + 3
    # (npy, image.npy, png per image, class and method; a panel per image and class; a classes panel per image)
    for name in a:
        if name != "explanations.jsonl":
            assert a[name] == b[name], name                          # byte for byte
    assert _jsonl(tmp_path / "one") == _jsonl(tmp_path / "ray")

    # a re-run skips every finished image and leaves the records as they are
    before = (tmp_path / "ray" / "explanations.jsonl").read_text()
    before_records = _jsonl(tmp_path / "ray")
    summary, stats = explain_on_ray([str(photos)], opts_r, SETTINGS)
    assert (stats.resumed, stats.done, stats.failed) == (3, 0, 1)
    assert (tmp_path / "ray" / "explanations.jsonl").read_text() == before
    # an interrupted run: one image's outputs incomplete, its record missing -> only it is redone
    lines = before.splitlines()
    (tmp_path / "ray" / "explanations.jsonl").write_text(lines[0] + "\n" + lines[2] + "\n" + lines[1][:40])
    (tmp_path / "ray" / next(n for n in b if n.startswith("eagle") and n.endswith(".png"))).unlink()
    summary, stats = explain_on_ray([str(photos)], opts_r, SETTINGS)
    assert (stats.resumed, stats.done) == (2, 1) and summary.skipped == 2
    assert [json.loads(r)["image"] for r in lines] == [rec["image"] for rec in summary.records]   # input order
    assert _jsonl(tmp_path / "ray") == before_records   # the redone image's stamps are new
    assert _files(tmp_path / "ray") == b


def test_explain_on_ray_batched_maps_match(local_ray, model_path, photos, tmp_path):
    """Several images per model run: the maps agree with one process to 1e-6 (RISE's too)."""
    opts = dict(model=model_path, layers=["feat"], methods=("cmwp", "rise"), top=1, batch_size=4, masks=16)
    explain_files([photos], ExplainOptions(out_dir=tmp_path / "one", **opts))
    explain_on_ray([str(photos / "*.jpg")], ExplainOptions(out_dir=tmp_path / "ray", **opts),
                   RaySettings(actors=1, batch_size=4))
    names = sorted(p.name for p in (tmp_path / "one").glob("*.npy"))
    assert names and names == sorted(p.name for p in (tmp_path / "ray").glob("*.npy"))
    assert len([n for n in names if ".rise.x." in n]) == 2 * 3
    for n in names:
        np.testing.assert_allclose(np.load(tmp_path / "ray" / n), np.load(tmp_path / "one" / n), rtol=1e-6, atol=1e-7)


class DiesOnce(ExplainActor):
    """The first call in the whole job kills its worker process (a marker file says it happened)."""

    marker = None

    def __call__(self, batch):
        marker = Path(self.marker)
        if not marker.exists():
            marker.write_text("died")
            os._exit(1)
        return super().__call__(batch)


def test_a_worker_that_dies_is_retried(local_ray, model_path, photos, tmp_path):
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    DiesOnce.marker = str(tmp_path / "died")
    opts = ExplainOptions(model=model_path, layers=["feat"], methods=("mwp",), out_dir=tmp_path / "out")
    summary, stats = explain_on_ray([str(photos)], opts, RaySettings(actors=1, batch_size=1, max_restarts=2),
                                    _actor_cls=DiesOnce)
    assert (tmp_path / "died").read_text() == "died"
    images = [json.loads(line)["image"] for line in (tmp_path / "out" / "explanations.jsonl").read_text().splitlines()]
    assert images == [str(photos / n) for n in ("dog.jpg", "eagle.jpg", "horses.jpg")]   # each once, in order
    assert (stats.done, stats.failed) == (3, 1)


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------
BOXES = {  # hand-drawn boxes on the bundled photos (x0, y0, x1, y1)
    "dog": [("dog", (60, 100, 260, 370)), ("bicycle", (60, 60, 400, 310)), ("truck", (300, 40, 470, 120))],
    "eagle": [("bird", (40, 40, 480, 320))],
    "horses": [("horse", (0, 80, 160, 320)), ("horse", (170, 90, 290, 290)), ("horse", (290, 60, 512, 339)),
               ("person", (180, 80, 240, 260))],
}
MAPPING = {"mapping": {"dog": [0], "bird": [1, 2], "horse": [3], "bicycle": [2]}, "unmapped": ["person"]}


@pytest.fixture
def voc(tmp_path):
    """A VOC folder over the bundled photos, plus one annotated image whose file is corrupt."""
    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    photos = {p.stem: p for p in sample_images()}
    ids = list(BOXES) + ["corrupt"]
    for i in ids:
        objs = BOXES.get(i, [("dog", (10, 10, 100, 100))])
        if i in photos:
            shutil.copy(photos[i], root / "JPEGImages" / f"{i}.jpg")
            from PIL import Image

            with Image.open(photos[i]) as im:
                w, h = im.size
        else:
            # a readable header (the dataset reader accepts it), truncated pixel data
            (root / "JPEGImages" / f"{i}.jpg").write_bytes(photos["dog"].read_bytes()[:3000])
            w, h = 512, 384
        xml = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                      f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objs)
        (root / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{xml}</annotation>")
    (root / "ImageSets/Main/test.txt").write_text("\n".join(ids) + "\n")
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps(MAPPING))
    return root, mapping


def _comparable(folder: Path) -> dict:
    res = json.loads((folder / "results.json").read_text())
    for k in ("seconds", "files"):
        res.pop(k)
    return res


@pytest.mark.parametrize("protocol", ["pointing", "localization"])
def test_eval_on_ray_equals_one_process(local_ray, model_path, voc, tmp_path, protocol):
    root, mapping = voc
    kw = dict(methods=["cmwp", "mwp", "rise", "center"], layers=["feat"], mapping=str(mapping), held_out=0.34,
              rise=RiseSettings(masks=16, cells=3))
    one = run_evaluation(protocol, root, "voc", model_path, out_dir=tmp_path / "one", **kw)
    on_ray = run_evaluation(protocol, root, "voc", model_path, out_dir=tmp_path / "ray", ray=SETTINGS, **kw)
    assert on_ray.counts["maps_computed"] == 3 and on_ray.counts["images_failed"] == one.counts["images_failed"] == 1
    assert "cannot read image" in next(s["reason"] for s in on_ray.skipped if s["image"] == "corrupt")
    assert _comparable(tmp_path / "one") == _comparable(tmp_path / "ray")
    for name in ("results.md", "results.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()
    for f in (tmp_path / "one" / "cache" / protocol).glob("*.npz"):
        a, b = np.load(f), np.load(tmp_path / "ray" / "cache" / protocol / f.name)
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            if k != "meta":
                np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert one.unmapped_classes == ["person", "truck"] and "truck (" in (tmp_path / "ray" / "results.md").read_text()
    # a second run on Ray reads every map from the cache
    again = run_evaluation(protocol, root, "voc", model_path, out_dir=tmp_path / "ray", ray=SETTINGS, **kw)
    assert (again.counts["maps_computed"], again.counts["maps_cached"]) == (0, 3)
    assert again.summary == one.summary


def test_model_error_on_a_worker_stops_the_job(local_ray, model_path, voc, tmp_path):
    root, mapping = voc
    with pytest.raises(ExciteError, match="nosuchlayer"):
        run_evaluation("pointing", root, "voc", model_path, methods=["cmwp"], layers=["nosuchlayer"],
                       mapping=str(mapping), out_dir=tmp_path / "o", ray=RaySettings(actors=1, max_restarts=0))


def test_cli_ray_explain_and_eval(local_ray, model_path, photos, voc, tmp_path):
    from onnx_excite.cli.app import app

    runner = CliRunner()
    res = runner.invoke(app, ["explain", model_path, str(photos), "-l", "feat", "-o", str(tmp_path / "x"),
                              "--ray", "--actors", "1"])
    assert res.exit_code == 2, res.output            # the corrupt photo: exit 2 after doing the others
    assert "3 image(s) explained" in res.output and "1 failed" in res.output and "images/s" in res.output
    assert "broken.jpg: cannot read image" in res.output
    root, mapping = voc
    res = runner.invoke(app, ["eval", "pointing", "--data", str(root), "--model", model_path, "-l", "feat",
                              "--mapping", str(mapping), "-o", str(tmp_path / "e"), "--ray", "local", "--actors", "1"])
    assert res.exit_code == 0, res.output
    assert "cmwp:feat" in res.output and "images/s" in res.output and "3 image(s) evaluated, 1 failed" in res.output
    assert "2 dataset class(es) have no model mapping" in res.output and "person (1 pairs)" in res.output


def test_list_inputs_reads_uris(tmp_path, photos):
    """file:// URIs go through pyarrow's filesystems (the same code reads s3:// and gs://)."""
    uri = f"file://{photos}"
    found = list_inputs([uri])
    assert [str(f) for f in found] == [f"file://{photos / n}" for n in ("broken.jpg", "dog.jpg", "eagle.jpg", "horses.jpg")]
    assert [f.stem for f in list_inputs([f"{uri}/e*.jpg"])] == ["eagle"]
    with pytest.raises(ExciteError, match="no such file or folder"):
        list_inputs([f"file://{tmp_path}/nope"])
    from onnx_excite.apps.distributed import load_any_image

    assert load_any_image(found[1]).size == (512, 384)
    with pytest.raises(ExciteError, match="broken.jpg: cannot read image"):
        load_any_image(found[0])


def test_ray_missing_is_one_line(monkeypatch):
    import sys

    from onnx_excite.apps.distributed import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ExciteError, match=r"pip install 'onnx-excite\[ray\]'"):
        import_ray()


def test_explain_on_ray_writes_the_chosen_outputs(local_ray, model_path, photos, tmp_path):
    """--outputs overlay --format jpg on Ray: the files of one process, byte for byte, and no
    explanations.jsonl (nothing to resume from: a re-run explains every image again)."""
    opts = dict(model=model_path, layers=["feat"], methods=("mwp",), top=1, batch_size=2, outputs="overlay",
                format="jpg")
    one = explain_files([photos], ExplainOptions(out_dir=tmp_path / "one", **opts))
    summary, stats = explain_on_ray([str(photos)], ExplainOptions(out_dir=tmp_path / "ray", **opts), SETTINGS)
    a, b = _files(tmp_path / "one"), _files(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 3 and all(n.endswith(".mwp.feat.jpg") for n in a)
    assert a == b and summary.written == one.written == 3 and summary.images == 3
    assert not (tmp_path / "ray" / "explanations.jsonl").exists()
    _, again = explain_on_ray([str(photos)], ExplainOptions(out_dir=tmp_path / "ray", **opts), SETTINGS)
    assert (again.resumed, again.done) == (0, 3)


def test_explain_on_ray_without_records_refuses_the_input_folder(model_path, photos):
    with pytest.raises(ExciteError, match="without record into a folder of input images"):
        explain_on_ray([str(photos)], ExplainOptions(model=model_path, layers=["feat"], out_dir=photos,
                                                     outputs="overlay"), SETTINGS)
    assert sorted(p.name for p in photos.iterdir()) == ["broken.jpg", "dog.jpg", "eagle.jpg", "horses.jpg"]
