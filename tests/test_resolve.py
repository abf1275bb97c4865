"""resolve_model: the one way from a name to a model, for every command and entry point."""
import onnx
import pytest

from conftest import tiny_model
from onnx_excite import ExciteError
from onnx_excite.models import mobilenet_v2, synthetic
from onnx_excite.models.resolve import resolve_model


def test_a_path(tiny_path):
    resolved = resolve_model(str(tiny_path))
    assert resolved.model == str(tiny_path) and resolved.recipe is None
    assert resolved.default_layers == ["p1"] and resolved.layers_chosen_by_graph   # the map its head pools
    assert resolved.profile.resize == "square" and resolved.profile.input_size == 8   # its fixed 8 x 8 input
    assert resolve_model(tiny_path).model == str(tiny_path)                          # a Path as well
    assert resolved.layers(["r1"]) == ["r1"] and resolved.layers(None) == ["p1"]


def test_a_model_with_no_feature_map_has_no_default_layer(tmp_path):
    """A dense classifier on a vector: no layer to suggest, so naming none is one error line."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["logits"], transB=1)], "dense",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], [w])
    path = tmp_path / "dense.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    resolved = resolve_model(str(path))
    assert resolved.default_layers == [] and not resolved.layers_chosen_by_graph
    with pytest.raises(ExciteError, match="no map layer given and the model has no default one"):
        resolved.layers(None)


def test_default():
    resolved = resolve_model("default")
    assert resolved.model == str(mobilenet_v2.load_default_model())
    assert resolved.default_layers == ["features.13"] and resolved.layers(None) == ["features.13"]
    assert resolved.profile.name == "mobilenet_v2" and len(resolved.class_names()) == 1000


def test_a_recipe_only_where_allowed(tmp_path, monkeypatch):
    resolved = resolve_model("tiny-cnn", allow_recipes=True)
    assert resolved.recipe == "tiny-cnn" and resolved.layers(None) == synthetic.RECIPE_LAYERS["tiny-cnn"]
    assert resolved.model.SerializeToString() == synthetic.tiny_cnn().SerializeToString()
    assert resolved.model is resolved.model                      # made once
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExciteError) as err:
        resolve_model("tiny-cnn")                                # explain, eval ...: no recipes
    assert str(err.value) == "tiny-cnn: no such model file"


def test_a_proto_is_taken_as_it_is():
    model = tiny_model()
    resolved = resolve_model(model)
    assert resolved.model is model and resolved.layers(["r1"]) == ["r1"]


@pytest.mark.parametrize("allow_recipes", [False, True])
def test_an_unknown_name_is_one_error_line(tmp_path, allow_recipes):
    for name in (tmp_path / "nope.onnx", "vgg17-random"):
        with pytest.raises(ExciteError) as err:
            resolve_model(str(name), allow_recipes=allow_recipes)
        assert str(err.value) == f"{name}: no such model file" and "\n" not in str(err.value)


def test_fully_conv_turns_a_fixed_size_dense_head_into_convolutions(tmp_path):
    path = tmp_path / "vgg.onnx"
    onnx.save(synthetic.vgg16(size=32, num_classes=10), str(path))
    as_is, converted = resolve_model(str(path)), resolve_model(str(path), fully_conv=True)
    assert as_is.model == str(path) and not as_is.converted and as_is.profile.resize == "square"
    assert converted.converted and isinstance(converted.model, onnx.ModelProto)
    assert "Gemm" not in {n.op_type for n in converted.model.graph.node} and converted.profile.resize == "shorter"
