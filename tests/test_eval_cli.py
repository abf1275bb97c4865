"""`onnx-excite eval` end to end with the default model on tests/data/voc_sample (10 real photos of
the VOC-layout sample; the full 85-image evaluation is the command in the README's "Evaluation")."""
import json

from typer.testing import CliRunner

from conftest import VOC_SAMPLE
from onnx_excite.cli.app import app

runner = CliRunner()
VOC = VOC_SAMPLE


def _summary(folder):
    return json.loads((folder / "results.json").read_text())["summary"]


def test_pointing_game_default_model(tmp_path):
    full = tmp_path / "full"
    res = runner.invoke(app, ["eval", "pointing", "--data", str(VOC), "--mapping", "voc_sample_to_imagenet",
                              "--methods", "cmwp,mwp,center", "-o", str(full)])
    assert res.exit_code == 0, res.output
    for method in ("cmwp:features.13", "mwp:features.13", "center"):
        assert method in res.output
    summary = _summary(full)
    # contrastive MWP points better than MWP, which points better than the image centre
    # (here 27, 24 and 17 hits of 50 pairs; on the full sample see the README)
    assert summary["cmwp:features.13"]["mean_accuracy"] > summary["mwp:features.13"]["mean_accuracy"] > summary["center"]["mean_accuracy"]
    assert (full / "pointing_per_class.png").exists() and (full / "results.csv").exists()
    # the classes the mapping leaves out are counted and listed, loudly
    n = len(json.loads((full / "results.json").read_text())["unmapped"])
    assert n > 0 and f"warning: {n} dataset class(es) have no model mapping and were NOT evaluated" in res.output
    assert "door (" in res.output


def test_pointing_without_mapping_says_how_many_classes_are_unmapped(tmp_path):
    res = runner.invoke(app, ["eval", "pointing", "--data", str(VOC), "--methods", "cmwp,center", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    unmapped = json.loads((tmp_path / "results.json").read_text())["unmapped"]
    # only 4 of the bundled sample's 27 classes match an ImageNet class name
    mapped = {"bookcase", "cup", "pillow", "vase"}
    assert len(unmapped) == 23 and not mapped & set(unmapped) and {"person", "door", "chair"} <= set(unmapped)
    assert "warning: 23 dataset class(es) have no model mapping" in res.output
    assert all(f"{c} (" in res.output for c in unmapped)


def test_localization_from_coco_json(tmp_path):
    res = runner.invoke(app, ["eval", "localization", "--data", str(VOC / "instances_coco.json"), "--format", "coco",
                              "--mapping", "voc_sample_to_imagenet", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "alpha_error.png").exists()
    assert "cmwp:features.13" in _summary(tmp_path)


def test_eval_bad_data_is_one_line(tmp_path):
    res = runner.invoke(app, ["eval", "pointing", "--data", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.startswith("error:") and "Traceback" not in res.output


def test_eval_device_cpu_runs_and_cuda_without_a_gpu_is_one_line(tmp_path):
    """`--device cpu` evaluates on the CPU provider; `--device cuda` where this onnxruntime has no CUDA
    provider is refused in one line before anything is written (no silent CPU fallback)."""
    import onnxruntime as ort

    res = runner.invoke(app, ["eval", "pointing", "--data", str(VOC), "--mapping", "voc_sample_to_imagenet",
                              "--methods", "mwp,center", "--device", "cpu", "-o", str(tmp_path / "cpu")])
    assert res.exit_code == 0, res.output
    assert "mwp:features.13" in _summary(tmp_path / "cpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():   # a GPU build: cuda must run too
        return
    out = tmp_path / "cuda"
    res = runner.invoke(app, ["eval", "localization", "--data", str(VOC), "--methods", "mwp", "--device", "cuda",
                              "-o", str(out)])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "CUDA" in errors[0] and "Traceback" not in res.output
    assert not (out / "results.json").exists()
