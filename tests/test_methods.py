"""Method declarations (onnx_excite.methods): the registry, the `methods` command, and the
declarations executed by a small numpy interpreter (what phase 2's builder will emit as ONNX)
against the independent reference tests/method_ref.py."""
import numpy as np
import pytest
from typer.testing import CliRunner

import method_ref as mr
import netgen
from onnx_excite.cli.app import app
from onnx_excite.errors import ExciteError
from onnx_excite.methods import (METHODS, RULE_PARTS, Method, RuleVariant, get_method, method_names,
                                 runnable_methods, shared_linear_parts, shared_sweeps)
from reference import LINEAR, _attrs, _unbroadcast
from method_nets import net as _net, num_classes, reduce_mean_head


# ----------------------------------------------------------------------------------------
# a numpy interpreter of the declarations (uses only the Method's fields)
# ----------------------------------------------------------------------------------------

def _act(factor, a):
    return {"1": None, "a": a, "a+": np.maximum(a, 0.0), "a-": np.minimum(a, 0.0)}[factor]


def _weight(kind, w):
    return {"W": w, "W+": np.maximum(w, 0.0), "W-": np.minimum(w, 0.0), "1": np.ones_like(w)}[kind]


def _div(p, z):
    return np.divide(p, z, out=np.zeros_like(p), where=z != 0)


def _normalise(variant, p, z):
    if variant.normalise == "none":
        return p
    if variant.normalise == "Z":
        return _div(p, z)
    eps = 1e-6 * np.abs(z).reshape(z.shape[0], -1).max(axis=1).reshape((-1,) + (1,) * (z.ndim - 1))
    return _div(p, z + eps * np.where(z >= 0, 1.0, -1.0))


def _apply(variant, rule, a, w, b, p, fwd, adj):
    """P_in = sum_parts act * adj(R, weight), R = P normalised by Z = sum_parts fwd(act, weight) (+ b)."""
    parts = variant.resolve(rule)
    acts = [(_act(f, a), _weight(k, w)) for f, k in parts]
    z = None
    if variant.normalise != "none":
        z = sum(fwd(np.ones_like(a) if act is None else act, wt) for act, wt in acts)
        if variant.bias == "in-Z":
            z = z + b
    r = _normalise(variant, p, z)
    return sum(adj(r, wt) if act is None else act * adj(r, wt) for act, wt in acts)


def interpret(method: Method, model, x, e, layers, rule="positive"):
    g = mr.Graph(model)
    vals = g.forward(x)
    logits = g.logits_name()
    s = vals[logits]
    top = e * s if method.top == "score" else np.asarray(e, np.float64)
    clf = g.classifier(logits) if method.dual != "none" else None

    def sweep(classifier_sign):
        P = {logits: top}
        for n in reversed(g.nodes):
            if n.output[0] not in P:
                continue
            p = P[n.output[0]]
            for name, q in node_rule(n, p, classifier_sign if n is clf else 1).items():
                if name not in g.const:
                    P[name] = P[name] + q if name in P else q
        return P

    def node_rule(n, p, sign):
        op = n.op_type
        if op in LINEAR or op == "BatchNormalization":   # BN: weight s, bias t (per channel)
            name, a, w, fwd, adj, to_act = g.linear_parts(n, vals)
            p2 = p.reshape(-1, w.shape[1]) if op == "MatMul" else p
            b = mr._bias(g, n, vals, p2.shape)
            if sign == "difference":
                q = _apply(method.linear, rule, a, w, b, p2, fwd, adj) - _apply(method.linear, rule, a, -w, -b, p2, fwd, adj)
            else:
                q = _apply(method.linear, rule, a, sign * w, sign * b, p2, fwd, adj)
            return {name: to_act(q)}
        if op in ("Relu", "Clip"):  # rectifiers; the forward mask is where the derivative is 1
            x_ = vals[n.input[0]]
            lo, hi = g.clip_bounds(n, [vals[i] if i else None for i in n.input]) if op == "Clip" else (0.0, np.inf)
            mask = (x_ > lo) & (x_ < hi)
            gate = {"forward-mask": lambda: p * mask, "backward-relu": lambda: np.maximum(p, 0.0),
                    "both": lambda: np.maximum(p, 0.0) * mask, "none": lambda: p}[method.relu]
            return {n.input[0]: gate()}
        if op in ("Identity", "Dropout"):
            return {n.input[0]: p}
        if op in ("Flatten", "Reshape"):
            return {n.input[0]: p.reshape(vals[n.input[0]].shape)}
        if op == "Concat":
            axis = int(_attrs(n)["axis"])
            return dict(zip(n.input, np.split(p, np.cumsum([vals[i].shape[axis] for i in n.input])[:-1], axis=axis)))
        if op == "MaxPool":
            return mr._backward_node(g, n, vals, p, None, 1)   # first-maximum routing, as everywhere
        if op in ("AveragePool", "GlobalAveragePool", "ReduceMean"):
            a, scatter, wsum, cnt = mr._pool_parts(g, n, vals)
            # the pool as a linear layer with weight 1/cnt ("W"), or 1 (unit weight, "1")
            fwd = lambda act, wt: wsum(act) * wt                       # noqa: E731
            adj = lambda r, wt: scatter(r * wt)                        # noqa: E731
            return {n.input[0]: _apply(method.pool, rule, a, 1.0 / cnt, 0.0, p, fwd, adj)}
        if op == "Add":
            data = [i for i in n.input if i not in g.const]
            const = sum((vals[i] for i in n.input if i in g.const), np.zeros(()))
            if len(data) == 1 and method.add.bias == "ignored":
                return {data[0]: _unbroadcast(p, vals[data[0]].shape)}   # a bias Add
            xs = [np.broadcast_to(vals[i], p.shape) for i in data]
            parts = method.add.resolve(rule)
            acts = [[_act(f, x_) for x_ in xs] for f, k in parts]
            signs = [{"W": 1.0, "W+": 1.0, "W-": 0.0, "1": 1.0}[k] for _, k in parts]
            z = None
            if method.add.normalise != "none":
                z = sum(sg * (np.ones_like(x_) if ac is None else ac) for part, sg in zip(acts, signs) for ac, x_ in zip(part, xs))
                if method.add.bias == "in-Z":
                    z = z + const
            r = _normalise(method.add, p, z)
            out = {}
            for part, sg in zip(acts, signs):
                for name, ac in zip(data, part):
                    q = sg * (r if ac is None else ac * r)
                    out[name] = out.get(name, 0.0) + _unbroadcast(q, vals[name].shape)
            return out
        raise NotImplementedError(op)

    def reduce(p):
        if p.ndim < 3:
            return np.abs(p) if method.reduce == "abs-max" else p
        return np.abs(p).max(axis=1) if method.reduce == "abs-max" else p.sum(axis=1)

    def l1(m):
        return _div(m, np.abs(m).reshape(len(m), -1).sum(axis=1).reshape((-1,) + (1,) * (m.ndim - 1)))

    P = sweep("difference" if method.dual == "difference" else 1)
    P_dual = sweep(-1) if method.dual == "separate" else None
    maps, Ps = {}, {}
    for layer in layers:
        p = P.get(layer, np.zeros(vals[layer].shape))
        Ps[layer] = p
        m = reduce(p)
        if P_dual is not None:
            m = l1(m) - l1(reduce(P_dual.get(layer, np.zeros(vals[layer].shape))))
        maps[layer] = np.maximum(m, 0.0) if method.clip else m
    return {"map": maps, "P": Ps, "logits": s}


# ----------------------------------------------------------------------------------------
# declarations == reference
# ----------------------------------------------------------------------------------------

def test_every_reference_method_is_registered():
    assert set(method_names()) == set(mr.METHODS)
    for name in ("mwp", "cmwp"):
        assert name in METHODS


CASES = [("residual", 0), ("residual", 1), ("signed", 2), ("signed", 3), ("concat", 0), ("nobias", 4),
         ("resnet_block", 0), ("mobilenet_block", 1), ("reduce_mean", 2)]


@pytest.mark.parametrize("kind,seed", CASES)
@pytest.mark.parametrize("method", [m for m in mr.METHODS if m not in ("cam", "c-cam")])
def test_declaration_matches_reference(method, kind, seed):
    model, layers = _net(kind, seed)
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
        Method("x", "x", linear=RuleVariant(None), pool=RuleVariant(None), add=RuleVariant(None), relu="sometimes")
    assert RuleVariant(None).resolve("paper") == RULE_PARTS["paper"]
    with pytest.raises(ExciteError, match="unknown rule"):
        RuleVariant(None).resolve("both")


def test_paper_post_processing_flags():
    assert {m for m, d in METHODS.items() if d.blur} == {"grad", "deconv", "guided", "lrp-epsilon", "lrp-zplus",
                                                         "c-grad", "c-deconv"}
    assert get_method("c-grad").dual == get_method("c-deconv").dual == "separate"
    assert get_method("cmwp").dual == get_method("cmwp-nonorm").dual == "difference"


def test_shared_sweeps():
    groups = dict((tuple(names), key) for key, names in shared_sweeps(["grad", "c-grad", "mwp", "cmwp-postnorm", "deconv",
                                                                         "c-deconv", "guided", "cmwp"]))
    assert ("grad", "c-grad") in groups and ("deconv", "c-deconv") in groups and ("guided",) in groups
    assert ("mwp", "cmwp-postnorm", "cmwp") in groups   # the same rules; cmwp differs only at the classifier


def test_shared_linear_parts():
    plan = shared_linear_parts(["mwp", "cmwp", "lrp-zplus", "grad", "deconv", "guided", "cmwp-nonorm"])
    assert plan[("Z", RULE_PARTS["positive"])] == ["mwp", "cmwp", "lrp-zplus"]
    assert plan[("adj", "W")] == ["grad", "deconv", "guided"]
    assert plan[("adj", "W+")] == ["mwp", "cmwp", "lrp-zplus", "cmwp-nonorm"]
    paper = shared_linear_parts(["mwp", "lrp-zplus"], rule="paper")
    assert paper[("Z", RULE_PARTS["paper"])] == ["mwp"]


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
    waiting = [m for m in METHODS if m not in runnable_methods()]
    assert {"mwp", "cmwp"} <= set(runnable_methods())
    footer = [l for l in res.output.splitlines() if l.startswith("declared, not yet run")]
    assert footer == ([f"declared, not yet run by explain/eval/bench: {', '.join(waiting)}"] if waiting else [])
    res = runner.invoke(app, ["methods", "--rule", "nope"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == ["error: unknown rule 'nope'; choose from positive, paper"]
