"""Method declarations (onnx_excite.methods): the registry, the `methods` command, and the
declarations executed by tests/method_spec.py (a numpy interpreter of the declarations: what
phase 2's builder will emit as ONNX) against the independent reference tests/method_ref.py."""
import numpy as np
import pytest
from typer.testing import CliRunner

import method_ref as mr
import netgen
from onnx_excite.cli.app import app
from onnx_excite.errors import ExciteError
from onnx_excite.methods import METHODS, RULE_PARTS, Method, RuleVariant, get_method, method_names
from method_nets import feature_layers, net as _net, num_classes, reduce_mean_head
from method_spec import interpret


# ----------------------------------------------------------------------------------------
# declarations == reference
# ----------------------------------------------------------------------------------------

def test_every_reference_method_is_registered():
    assert set(method_names()) == set(mr.METHODS) | set(mr.TOKEN_METHODS)
    assert {m for m in METHODS if not get_method(m).sweeps} == set(mr.TOKEN_METHODS)
    for name in ("mwp", "cmwp"):
        assert name in METHODS


CASES = [("residual", 0), ("residual", 1), ("signed", 2), ("signed", 3), ("concat", 0), ("nobias", 4),
         ("resnet_block", 0), ("mobilenet_block", 1), ("reduce_mean", 2)]


@pytest.mark.parametrize("kind,seed", CASES)
@pytest.mark.parametrize("method", [m for m in mr.METHODS if m not in ("cam", "c-cam")])
def test_declaration_matches_reference(method, kind, seed):
    model, layers = _net(kind, seed)
    if get_method(method).layers == "feature-maps":   # Grad-CAM: layers with positions, not the input
        layers = feature_layers(model, layers)
    rng = np.random.default_rng(seed)
    x = netgen.random_input(model, batch=2, seed=seed, nonneg=False).astype(np.float64) if kind != "concat" \
        else rng.normal(size=(2, 3, 10, 8))
    if kind == "mobilenet_block":
        x = 5.0 * x  # some ReLU6 inputs above 6
    k = num_classes(model)
    e = np.eye(k)[rng.integers(0, k, size=2)]
    for rule in (("positive", "paper") if method.startswith("cmwp") or method == "mwp" else ("positive",)):
        got = interpret(get_method(method), model, x, e, layers, rule=rule)
        want = mr.method_reference(model, x, e, layers, method, rule=rule)
        for layer in layers:
            scale = np.abs(want["map"][layer]).max()
            # separately normalised maps are differences of maps summing to 1: 1e-15 is rounding
            floor = 1e-15 if get_method(method).dual == "separate" else 0.0
            assert np.abs(got["map"][layer] - want["map"][layer]).max() <= 1e-9 * scale + floor, (method, rule, layer)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", ["cam", "c-cam"])
def test_cam_declarations_match_reference(method, seed):
    model = netgen.random_cnn(seed, head="gap_gemm", hidden=False)
    if seed % 2:
        model = reduce_mean_head(model)
    feat, _ = mr.cam_head(mr.Graph(model))
    x = netgen.random_input(model, batch=2, seed=seed).astype(np.float64)
    e = np.random.default_rng(seed).random((2, netgen.num_classes(model)))
    assert get_method(method).layers == "last-feature-map"
    got = interpret(get_method(method), model, x, e, [feat])["map"][feat]
    want = mr.method_reference(model, x, e, [feat], method)["map"][feat]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_interpreter_sees_a_wrong_declaration():
    """A declaration with one field changed no longer matches its reference."""
    import dataclasses

    model, layers = _net("residual", 0)
    x = netgen.random_input(model, batch=1, seed=0, nonneg=False).astype(np.float64)
    e = np.eye(netgen.num_classes(model))[[1]]
    want = mr.method_reference(model, x, e, ["input"], "guided")["map"]["input"]
    wrong = dataclasses.replace(get_method("guided"), relu="forward-mask")
    got = interpret(wrong, model, x, e, ["input"])["map"]["input"]
    assert np.abs(got - want).max() > 1e-6 * np.abs(want).max()


@pytest.mark.parametrize("seed", range(3))
def test_declared_mass(seed):
    """The ``mass`` field: what sum P over a layer is on a bias-free ReLU net (non-negative
    input, one-hot signal of the top class)."""
    model = netgen.random_cnn(seed, bias=False, residual=False)
    layers = netgen.layer_names(model)
    x = netgen.random_input(model, batch=2, seed=seed).astype(np.float64)
    g = mr.Graph(model)
    top = g.forward(x)[g.logits_name()].argmax(axis=1)   # a positive logit: some z > 0 there
    e = np.eye(netgen.num_classes(model))[top]
    for name, method in METHODS.items():
        if method.layers != "any" or method.mass == "none":
            continue
        res = interpret(method, model, x, e, layers)
        for layer in layers:
            mass = res["P"][layer].reshape(2, -1).sum(axis=1)
            if method.mass == "signal":
                np.testing.assert_allclose(mass, e.sum(axis=1), rtol=1e-9, err_msg=name)
            elif method.mass == "score":
                np.testing.assert_allclose(mass, (e * res["logits"]).sum(axis=1), rtol=1e-4, err_msg=name)
            elif method.dual == "difference":
                assert np.abs(mass).max() <= 1e-9, name
            else:  # separate: the L1-normalised target minus dual maps (before the clip) sum to 0
                unclipped = dataclasses_replace(method, clip=False)
                m = interpret(unclipped, model, x, e, [layer])["map"][layer]
                assert np.abs(m.reshape(2, -1).sum(axis=1)).max() <= 1e-9, name


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


# ----------------------------------------------------------------------------------------
# the registry and the sharing plan
# ----------------------------------------------------------------------------------------

def test_get_method_names_the_choices():
    assert get_method("grad").reduce == "abs-max"
    with pytest.raises(ExciteError, match="did you mean 'grad'"):
        get_method("gard")
    with pytest.raises(ExciteError, match="choose from mwp, cmwp"):
        get_method("nope")


def test_declarations_validate_their_fields():
    with pytest.raises(ValueError):
        RuleVariant((("b", "W"),))
    with pytest.raises(ValueError):
        Method("x", "x", linear=RuleVariant(None), pool=RuleVariant(None), add=RuleVariant(None), relu="sometimes",
               quantity="q")
    with pytest.raises(ValueError, match="a sweep needs a RuleVariant"):
        Method("x", "x", linear=None, pool=None, add=None, relu="none", quantity="q")
    with pytest.raises(ValueError, match="a rollout method has no rule variants"):
        Method("x", "x", linear=RuleVariant(None), pool=None, add=None, relu="none", quantity="q", mass="none", kind="rollout")
    with pytest.raises(ValueError, match="a rollout method has no rule variants"):   # nor a mass to expect
        Method("x", "x", linear=None, pool=None, add=None, relu="none", quantity="q", kind="rollout")
    assert RuleVariant(None).resolve("paper") == RULE_PARTS["paper"]
    with pytest.raises(ExciteError, match="unknown rule"):
        RuleVariant(None).resolve("both")


def test_paper_post_processing_flags():
    assert {m for m, d in METHODS.items() if d.blur} == {"grad", "deconv", "guided", "lrp-epsilon", "lrp-zplus",
                                                         "c-grad", "c-deconv"}
    assert get_method("c-grad").dual == get_method("c-deconv").dual == "separate"
    assert get_method("cmwp").dual == get_method("cmwp-nonorm").dual == "difference"


def test_sweep_keys_group_methods_with_one_target_sweep():
    key = {m: get_method(m).sweep_key for m in METHODS}
    assert key["grad"] == key["c-grad"] and key["deconv"] == key["c-deconv"]
    assert key["mwp"] == key["cmwp-postnorm"] == key["cmwp"]   # the same rules; cmwp differs only at the classifier
    assert len({key["grad"], key["deconv"], key["guided"], key["mwp"], key["cam"]}) == 5


def test_a_method_is_a_map_from_op_family_to_entry():
    mwp, grad, deconv = get_method("mwp"), get_method("grad"), get_method("deconv")
    assert [mwp.variant(f) for f in ("rectifier", "activation", "arithmetic")] == ["none", "pass", "excitation"]
    assert [grad.variant(f) for f in ("rectifier", "activation", "arithmetic")] == ["forward-mask", "derivative",
                                                                                    "chain-rule"]
    assert deconv.variant("activation") == "pass" and deconv.variant("rectifier") == "backward-relu"
    assert mwp.variant("linear") is mwp.linear
    with pytest.raises(ValueError):
        mwp.variant("route")   # a family no method changes has no entry


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def test_methods_command_lists_every_method():
    runner = CliRunner()
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    for name in METHODS:
        assert name in res.output
    res = runner.invoke(app, ["methods", "--detail", "--rule", "paper"])
    assert res.exit_code == 0, res.output
    assert "a W+ /Z" in res.output and "Z+eps (bias in Z)" in res.output
    assert "    values      winning probability\n" in res.output and "    contrastive c-grad\n" in res.output
    res = runner.invoke(app, ["methods", "--rule", "nope"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == ["error: unknown rule 'nope'; choose from positive, paper"]
