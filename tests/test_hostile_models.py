"""Models that used to end in a traceback: each gets one `error:` line and exit 2."""
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnx_excite import build_excitation_model
from onnx_excite.cli.app import app
from onnx_excite.errors import ExciteError


def _model(path, out4d=False, no_inputs=False, custom=False):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"])]
    last = "r"
    if custom:
        nodes.append(helper.make_node("Foo", ["r"], ["q"], domain="my.domain"))
        last = "q"
    nodes.append(helper.make_node("GlobalAveragePool", [last], ["g"]))
    if out4d:
        inits.append(numpy_helper.from_array(rng.normal(size=(5, 4, 1, 1)).astype(np.float32), "fc"))
        nodes.append(helper.make_node("Conv", ["g", "fc"], ["y"]))
        out = ["N", 5, 1, 1]
    else:
        inits.append(numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "fc"))
        nodes += [helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["y"])]
        out = ["N", 5]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])]
    if no_inputs:
        inits.append(numpy_helper.from_array(rng.normal(size=(1, 3, 16, 16)).astype(np.float32), "x"))
        inputs = []
    graph = helper.make_graph(nodes, "m", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("my.domain", 1)] if custom else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))
    return model


def _one_error(args, match):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and match in res.output, res.output
    assert "Traceback" not in res.output


def test_logits_of_a_1x1_conv_head_are_explained(tmp_path):
    """(N, K, 1, 1) logits (a 1x1 conv classifier) were a TypeError in explain."""
    _model(tmp_path / "m.onnx", out4d=True)
    img = _photo(tmp_path / "i.png")
    res = _explain(tmp_path / "m.onnx", img, "-l", "r", "-o", tmp_path / "o", "--top", "2")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "o").glob("i.*.png"))) >= 2


def test_a_model_with_no_inputs(tmp_path):
    _model(tmp_path / "m.onnx", no_inputs=True)
    _one_error(["check", tmp_path / "m.onnx"], "the model has no inputs")
    image = tmp_path / "i.png"
    from PIL import Image
    Image.new("RGB", (20, 20)).save(image)
    _one_error(["explain", tmp_path / "m.onnx", image, "-l", "r", "-o", tmp_path / "o"], "the model has no inputs")


def test_a_layer_below_a_custom_domain_op(tmp_path):
    """The shapes below an op shape inference does not know are unknown: the pool's rule says so."""
    model = _model(tmp_path / "m.onnx", custom=True)
    with pytest.raises(ExciteError, match="input rank unknown"):
        build_excitation_model(model, ["q"], ("mwp",))
    with pytest.raises(ExciteError, match="no excitation rule for op type Foo"):
        build_excitation_model(model, ["r"], ("mwp",))


def test_a_device_file_is_refused_not_read(tmp_path):
    """`check /dev/zero` would read without end."""
    _one_error(["check", "/dev/zero"], "not a regular file")


@pytest.mark.parametrize("line", ['{"image": null, "settings": {}, "outputs": []}',
                                  '{"image": "a.png", "settings": {}, "outputs": "oops"}',
                                  '{"image": "a.png", "settings": 3, "outputs": []}', '[1, 2]', '{"image": "a.png", "out'])
def test_a_bad_record_line_is_dropped_and_said(tmp_path, line):
    from onnx_excite.io.records import RecordStore

    good = '{"image": "b.png", "settings": {"k": 1}, "outputs": []}'
    (tmp_path / "explanations.jsonl").write_text(good + "\n" + line + "\n")
    store = RecordStore(tmp_path)
    assert [r["image"] for r in store.records.values()] == ["b.png"]
    assert len(store.skipped) == 1 and store.skipped[0].startswith("line 2: ")
    store.put({"image": "c.png", "settings": {}, "outputs": []})
    store.put({"image": "c.png", "settings": {}, "outputs": [{"x": 1}]})   # a rewrite drops the bad line
    assert "oops" not in (tmp_path / "explanations.jsonl").read_text()
    assert RecordStore(tmp_path).skipped == []


def test_explain_resumes_past_a_bad_record(tmp_path):
    from PIL import Image

    _model(tmp_path / "m.onnx")
    Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "i.png")
    out = tmp_path / "o"
    out.mkdir()
    (out / "explanations.jsonl").write_text('{"image": null, "outputs": "oops"}\n')
    res = CliRunner().invoke(app, ["explain", str(tmp_path / "m.onnx"), str(tmp_path / "i.png"), "-l", "r", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "no records and are dropped" in res.output and "Traceback" not in res.output


def test_two_images_with_one_name_keep_their_own_files(tmp_path):
    from PIL import Image

    _model(tmp_path / "m.onnx")
    for folder, colour in (("s1", (200, 10, 10)), ("s2", (10, 10, 200))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (20, 20), colour).save(tmp_path / folder / "cat.png")
    out = tmp_path / "o"
    args = ["explain", str(tmp_path / "m.onnx"), "-l", "r", "-o", str(out), "-m", "mwp"]
    res = CliRunner().invoke(app, args[:2] + [str(tmp_path / "s1" / "cat.png"), str(tmp_path / "s2" / "cat.png")] + args[2:])
    assert res.exit_code == 0, res.output
    import json
    records = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    files = [sorted(v for o in r["outputs"] for v in o.values() if isinstance(v, str) and v.endswith(".png"))
             for r in records]
    assert len(records) == 2 and not set(files[0]) & set(files[1])
    assert all(Path(f).is_file() for fs in files for f in fs)
    # a later run of one of them alone keeps using its own name
    again = CliRunner().invoke(app, args[:2] + [str(tmp_path / "s2" / "cat.png")] + args[2:] + ["--top", "2"])
    assert again.exit_code == 0, again.output
    assert all(Path(f).is_file() for fs in files for f in fs)


def _photo(path, colour=(200, 10, 10)):
    from PIL import Image

    Image.new("RGB", (20, 20), colour).save(path)
    return path


def _explain(*args):
    return CliRunner().invoke(app, ["explain", *[str(a) for a in args]])


def test_a_rerun_after_other_settings_rewrote_the_files_is_not_skipped(tmp_path):
    _model(tmp_path / "m.onnx")
    img = _photo(tmp_path / "i.png")
    base = [tmp_path / "m.onnx", img, "-l", "r", "-o", tmp_path / "o", "-m", "mwp"]
    assert _explain(*base).exit_code == 0
    assert _explain(*base, "--alpha", "0.9").exit_code == 0     # same file names, other pixels
    again = _explain(*base)
    assert again.exit_code == 0, again.output
    import json
    records = [json.loads(line) for line in (tmp_path / "o" / "explanations.jsonl").read_text().splitlines()]
    from onnx_excite.io.records import is_complete
    assert all(is_complete(r) for r in records if r["settings"]["alpha"] == 0.5)
    first = [r for r in records if r["settings"]["alpha"] == 0.5][0]
    overlay = Path(next(o["overlay"] for o in first["outputs"] if "overlay" in o))
    # the overlay on disk is the one of alpha 0.5 again (the re-run wrote it, not skipped it)
    assert first["stamps"][str(overlay)][1] == overlay.stat().st_mtime_ns


_HOLD = """
import sys, time
from pathlib import Path
from onnx_excite.errors import ExciteError
from onnx_excite.io.records import FolderLock
out, release = Path(sys.argv[1]), Path(sys.argv[2])
try:
    with FolderLock(out):
        print("held", flush=True)
        while not release.exists():
            time.sleep(0.02)
except ExciteError as exc:
    print("refused", exc, flush=True)
"""


def _holder(out, release):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", _HOLD, str(out), str(release)], stdout=subprocess.PIPE,
                            text=True, cwd=str(Path(__file__).resolve().parents[1]))


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    _model(tmp_path / "m.onnx")
    img = _photo(tmp_path / "i.png")
    out = tmp_path / "o"
    out.mkdir()
    holder = _holder(out, tmp_path / "release")
    try:
        assert holder.stdout.readline().strip() == "held"
        _one_error(["explain", tmp_path / "m.onnx", img, "-l", "r", "-o", out],
                   f"another onnx-excite run (process {holder.pid})")
    finally:
        holder.kill()   # SIGKILL: no cleanup runs, the lock file stays on disk
        holder.wait()
    assert (out / ".onnx-excite.lock").read_text() == str(holder.pid)
    res = _explain(tmp_path / "m.onnx", img, "-l", "r", "-o", out)   # the kernel released the dead run's lock
    assert res.exit_code == 0, res.output
    assert not (out / ".onnx-excite.lock").exists()


def test_runs_that_start_together_take_the_lock_once(tmp_path):
    """Six processes race for one folder: exactly one holds it, the others are refused while
    it lives (nobody lets go before every process has answered); then it is free again."""
    from onnx_excite.io.records import FolderLock

    out, release = tmp_path / "o", tmp_path / "release"
    out.mkdir()
    racers = [_holder(out, release) for _ in range(6)]
    try:
        answers = [r.stdout.readline().split()[0] for r in racers[:]]
    finally:
        release.write_text("")
        for r in racers:
            r.wait(timeout=60)
    assert sorted(answers) == ["held"] + ["refused"] * 5, answers
    assert not (out / ".onnx-excite.lock").exists()
    with FolderLock(out):
        assert (out / ".onnx-excite.lock").read_text() == str(os.getpid())
        with pytest.raises(ExciteError, match="another onnx-excite run"):
            with FolderLock(out):
                pass
    assert not (out / ".onnx-excite.lock").exists()


def test_an_output_folder_inside_the_input_folder_is_not_explained(tmp_path):
    _model(tmp_path / "m.onnx")
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "a.png")
    for _ in range(2):
        res = _explain(tmp_path / "m.onnx", photos, "-l", "r", "-o", photos)
        assert res.exit_code == 0, res.output
    import json
    records = [json.loads(line) for line in (photos / "explanations.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in records] == ["a.png"]


def test_symbolic_link_loops(tmp_path):
    _model(tmp_path / "m.onnx")
    (tmp_path / "d" / "e").mkdir(parents=True)
    os_link = __import__("os").symlink
    os_link(tmp_path / "d", tmp_path / "d" / "e" / "back")      # a folder loop a ** glob must not follow
    os_link(tmp_path / "d" / "e" / "back2", tmp_path / "d" / "e" / "back2")   # ... and a dangling self-loop
    _photo(tmp_path / "d" / "e" / "p.png")
    res = _explain(tmp_path / "m.onnx", str(tmp_path / "d" / "**" / "*.png"), "-l", "r", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    loop = tmp_path / "loop.png"
    os_link(loop, loop)
    _one_error(["explain", tmp_path / "m.onnx", loop, "-l", "r", "-o", tmp_path / "o2"], "symbolic link loop")


@pytest.mark.parametrize("bad", [["-l", "nope"], ["-l", "r", "--logits", "nope"]])
def test_a_model_error_on_a_folder_is_one_line(tmp_path, bad):
    _model(tmp_path / "m.onnx")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(10):
        _photo(photos / f"p{i}.png", (20 * i, 10, 10))
    res = _explain(tmp_path / "m.onnx", photos, *bad, "-o", tmp_path / "o")
    assert res.exit_code == 2, res.output
    assert res.output.count("error:") == 1, res.output


def test_ground_checks_its_output_folder_before_the_work(tmp_path):
    _model(tmp_path / "m.onnx")
    img = _photo(tmp_path / "i.png")
    (tmp_path / "file").write_text("x")
    _one_error(["ground", tmp_path / "m.onnx", img, "red thing", "-l", "r", "-o", tmp_path / "file" / "sub"],
               "a part of this path is an existing file")
    _one_error(["eval", "grounding", "--data", tmp_path, "-o", tmp_path / "file" / "sub"], "a part of this path is an existing file")
