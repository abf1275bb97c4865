"""A numpy interpreter of the method declarations of onnx_excite/methods.py: it executes a
``Method`` using only its fields (rule variant per op family, ReLU gate, top signal, dual,
reduction, clip), over tests/method_ref.py's forward graph. It is the executable spec of what
the companion-graph builder has to emit for a declaration (issue 12, phase 2); the tests
check it against the independent reference tests/method_ref.py."""
import numpy as np

import method_ref as mr
from onnx_excite.methods import Method
from reference import LINEAR, _attrs, _unbroadcast


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

    def reduce(p, layer):
        if method.reduce in ("grad-cam", "grad-cam++"):   # weights from P over the positions, times A
            a = vals[layer]
            pos = tuple(range(2, p.ndim))
            if method.reduce == "grad-cam":
                w = p.mean(axis=pos, keepdims=True)
            else:   # as the declaration says it is emitted: ReLU(P) / (2 + S P), 0 where that is 0
                den = 2.0 + a.sum(axis=pos, keepdims=True) * p
                w = _div(np.maximum(p, 0.0), den).sum(axis=pos, keepdims=True)
            return (w * a).sum(axis=1)
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
        m = reduce(p, layer)
        if P_dual is not None:
            m = l1(m) - l1(reduce(P_dual.get(layer, np.zeros(vals[layer].shape)), layer))
        maps[layer] = np.maximum(m, 0.0) if method.clip else m
    return {"map": maps, "P": Ps, "logits": s}
