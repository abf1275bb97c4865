"""Class names: indices, whole descriptions and each synonym, case-insensitively; suggestions for
unknown names; ambiguous names refused; `onnx-excite classes`."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import onnx_excite
from conftest import photo
from onnx_excite import ExciteError
from onnx_excite.classes import class_index, find_classes, related_classes, synonyms
from onnx_excite.cli.app import app

runner = CliRunner()
IMAGENET = json.loads((Path(onnx_excite.__file__).parent / "data" / "imagenet_classes.json").read_text())


@pytest.mark.parametrize("name", ["249", "malamute", "Malamute", "malemute", "Alaskan malamute", "ALASKAN  MALAMUTE ",
                                  "malamute, malemute, Alaskan malamute"])
def test_malamute_by_any_name(name):
    assert class_index(name, IMAGENET) == 249


def test_every_unshared_synonym_names_its_class():
    owners = {}
    for i, desc in enumerate(IMAGENET):
        for s in synonyms(desc):
            owners.setdefault(s.lower(), set()).add(i)
    checked = 0
    for s, idx in owners.items():
        if len(idx) == 1:
            assert class_index(s.upper(), IMAGENET) == next(iter(idx)), s
            checked += 1
        else:
            with pytest.raises(ExciteError, match="ambiguous"):
                class_index(s, IMAGENET)
    assert checked > 1700                                   # ImageNet has ~1,800 distinct synonyms
    assert {frozenset(v) for v in owners.values() if len(v) > 1} >= {frozenset({134, 517})}   # crane


def test_ambiguous_and_unknown_names():
    with pytest.raises(ExciteError, match=r"'crane' is ambiguous: 134 \(crane\), 517 \(crane\); give the index"):
        class_index("crane", IMAGENET)
    with pytest.raises(ExciteError, match=r"unknown class name 'malamut'; did you mean 'malamute' \(249\)"):
        class_index("malamut", IMAGENET)
    with pytest.raises(ExciteError, match=r"did you mean 'Siberian husky' \(250\)"):
        class_index("siberian huskie", IMAGENET)
    with pytest.raises(ExciteError, match="list them with `onnx-excite classes`"):
        class_index("qwertyuiop", IMAGENET)
    with pytest.raises(ExciteError, match="out of range 0..999"):
        class_index("1000", IMAGENET)
    with pytest.raises(ExciteError, match="no class names; give an index"):
        class_index("dog", None, 10)
    assert class_index("7", None, 10) == 7


def test_find_classes():
    assert find_classes(IMAGENET, "HUSKY") == [(248, IMAGENET[248]), (250, "Siberian husky")]
    assert len(find_classes(IMAGENET)) == 1000


def test_broader_words_offer_the_classes_they_name():
    """A word the grounding vocabulary maps to classes is refused with those classes, not with
    look-alike spellings: ImageNet's hypernym groups first, else a synonym's head noun."""
    assert related_classes("horse", IMAGENET) == [339]
    assert related_classes("Dog", IMAGENET) == list(range(151, 269))
    retrievers = [i for i, d in enumerate(IMAGENET) if any(s.lower().endswith(" retriever") for s in synonyms(d))]
    assert related_classes("retriever", IMAGENET) == retrievers and len(retrievers) == 5
    with pytest.raises(ExciteError, match=r"^unknown class name 'horse': no class is called that; "
                                          r"it is a broader name for 339 \(sorrel\); give one of them$"):
        class_index("horse", IMAGENET)
    with pytest.raises(ExciteError, match=r"151 \(Chihuahua\).* and 110 more \(`onnx-excite classes --grep dog`\)"):
        class_index("dog", IMAGENET)
    # the hypernym list is ImageNet's: other class names only get the head-noun rule
    own = ["red horse", "blue horse", "cart"]
    assert related_classes("horse", own) == [0, 1] and related_classes("cart", own) == []
    with pytest.raises(ExciteError, match=r"broader name for 0 \(red horse\), 1 \(blue horse\)"):
        class_index("horse", own)
    assert (339, "sorrel") in find_classes(IMAGENET, "horse")
    assert [i for i, _ in find_classes(IMAGENET, "horse")] == [339, 344, 603, 990]


def test_classes_command(tiny_path):
    res = runner.invoke(app, ["classes", "--grep", "malamute"])
    assert res.exit_code == 0 and res.output.split() == ["249", "malamute,", "malemute,", "Alaskan", "malamute"]
    res = runner.invoke(app, ["classes", "default"])
    lines = res.output.splitlines()
    assert res.exit_code == 0 and len(lines) == 1000 and lines[0].split(None, 1) == ["0", "tench, Tinca tinca"]
    res = runner.invoke(app, ["classes", "--grep", "horse"])
    assert res.exit_code == 0 and res.output.splitlines()[0].split() == ["339", "sorrel"], res.output
    res = runner.invoke(app, ["classes", "--grep", "no such thing"])
    assert res.exit_code == 1 and "no class name contains" in res.output
    res = runner.invoke(app, ["classes", str(tiny_path)])
    assert res.exit_code == 2 and res.output.startswith("error:") and "give target classes as indices" in res.output


def test_explain_takes_synonyms_and_suggests(tmp_path):
    res = runner.invoke(app, ["explain", "default", str(photo("dog.jpg")), "-t", "alaskan malamute", "-m", "mwp",
                              "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "explanations.jsonl").read_text())
    assert [o["targets"] for o in record["outputs"]] == [[249]]
    res = runner.invoke(app, ["explain", "default", str(photo("dog.jpg")), "-t", "malamut", "-m", "mwp",
                              "-o", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.startswith("error: unknown class name 'malamut'; did you mean 'malamute' (249)")
