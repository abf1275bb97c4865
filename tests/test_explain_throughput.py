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


@pytest.mark.parametrize("model, layer, shape", [(tiny_model(), "r1", (3, 3, 8, 8)),
                                                 (gap_classifier(7, 6, 2, 1), "r1", (4, 3, 20, 28))])
def test_top1_in_the_graph_equals_the_class_fed(model, layer, shape):
    x = _batch(0, shape)
    plain = Exciter(model, [layer], methods=("mwp", "cmwp"))
    both = Exciter(model, [layer], methods=("mwp", "cmwp"), top1=True)
    assert both.top1 and not plain.top1 and TOP1_SIGNAL not in [o.name for o in plain.built.model.graph.output]
    logits = plain.logits(x)
    top = logits.argmax(axis=1)
    fed = plain.explain(x, top)
    chosen = both.explain(x, None)
    assert np.array_equal(chosen.signal, np.eye(logits.shape[1], dtype=np.float32)[top])
    assert np.array_equal(chosen.logits, logits) and np.array_equal(both.logits(x), logits)
    for method in ("mwp", "cmwp"):
        assert np.array_equal(chosen.maps[method][layer], fed.maps[method][layer])
        assert chosen.maps[method][layer].any()
    other = (top + 1) % logits.shape[1]   # a fed signal on the same graph: the weight 0 leaves it as fed
    a, b = plain.explain(x, other), both.explain(x, other)
    for method in ("mwp", "cmwp"):
        assert np.array_equal(a.maps[method][layer], b.maps[method][layer])
        assert not np.array_equal(a.maps[method][layer], fed.maps[method][layer])


def test_without_top1_targets_are_required():
    from onnx_excite import ExciteError

    with pytest.raises(ExciteError, match="no targets given"):
        Exciter(tiny_model(), ["r1"], methods=("mwp",)).explain(_batch(0, (1, 3, 8, 8)), None)
