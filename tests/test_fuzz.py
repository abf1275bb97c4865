"""Fuzz: random valid CNN graphs, degenerate inputs, maps vs the reference, never NaN/Inf.

`python -m pytest -m fuzz` runs 1,000 graphs; the default run checks a slice of 40.
"""
import numpy as np
import pytest

from cnn_gen import input_shape, random_cnn
from excitation_ref import Reference
from onnx_excite import Exciter


def _fuzz_one(seed):
    rng = np.random.default_rng(seed)
    kind = seed % 4
    model, layers = random_cnn(10_000 + seed, bias=bool(kind % 2), signed=kind >= 2)
    shape = (2,) + input_shape(model)
    x = rng.normal(size=shape).astype(np.float32)
    x[1] = 0.0 if seed % 3 == 0 else -np.abs(x[1])    # all-zero or all-negative sample: dead units
    ex = Exciter(model, layers, methods=("mwp", "cmwp"))
    signal = rng.random((2, ex.num_classes)).astype(np.float32)
    res = ex.explain(x, signal)
    ref = Reference(model)
    plain = ref.run(x, signal, layers)
    if ref.near_ties:
        # a max-pool window holds two values equal up to float32 rounding: the float32
        # graph may route to either; only finiteness is comparable
        for per_layer in res.maps.values():
            assert all(np.isfinite(m).all() for m in per_layer.values())
        return
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, signal, layers, contrastive=contrastive) if contrastive else plain
        for layer in layers:
            got = res.maps[method][layer]
            assert np.isfinite(got).all(), (seed, layer, method)
            # c-MWP is a difference of two MWP-sized terms: its error is relative to their size
            scale = max(np.abs(want["map"][layer]).max(), np.abs(plain["P"][layer]).max())
            assert np.abs(got - want["map"][layer]).max() <= 1e-4 * scale + 1e-30, (seed, layer, method)


@pytest.mark.parametrize("seed", range(40))
def test_fuzz_slice(seed):
    _fuzz_one(seed)


@pytest.mark.fuzz
@pytest.mark.parametrize("seed", range(40, 1040))
def test_fuzz_full(seed):
    _fuzz_one(seed)
