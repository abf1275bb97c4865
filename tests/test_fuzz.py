"""Fuzz: random valid CNN graphs and random transformer-era graphs (tests/transformer_gen.py:
patch tokens, class tokens, pre-norm attention blocks, ConvNeXt blocks), degenerate inputs, maps
vs the reference, never NaN/Inf. A graph the library refuses fails its case (the ExciteError).

`python -m pytest -m fuzz` runs 1,000 CNN graphs and 250 transformer graphs (``FUZZ_COUNT=N``:
N and N // 4); the default run checks a slice of 40 and 8.
"""
import os

import numpy as np
import pytest

from cnn_gen import input_shape, random_cnn
from excitation_ref import Reference
from onnx_excite import Exciter
from transformer_gen import FEATURES, random_transformer

COUNT = int(os.environ.get("FUZZ_COUNT", "1000"))


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
@pytest.mark.parametrize("seed", range(40, 40 + COUNT))
def test_fuzz_full(seed):
    _fuzz_one(seed)


def _fuzz_transformer(seed):
    """mwp and cmwp (P per channel and the maps) at the input, conv maps, the tokens (N, T, C) and
    channels-last maps vs the reference; a token layer with class tokens is mapped on its patch
    grid (the class tokens dropped)."""
    case = random_transformer(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2,) + input_shape(case.model)).astype(np.float32)
    x[1] = 0.0 if seed % 3 == 0 else -np.abs(x[1])    # all-zero or all-negative sample
    ex = Exciter(case.model, case.layers, methods=("mwp", "cmwp"), channels=True)
    signal = rng.random((2, ex.num_classes)).astype(np.float32)
    res = ex.explain(x, signal)
    ref = Reference(case.ref_model)   # the decomposed layer norms written as the op they are fused to
    plain = ref.run(x, signal, case.layers, channel_axes=case.axes)
    np.testing.assert_allclose(res.logits, plain["logits"], rtol=1e-4, atol=1e-4)
    for contrastive, method in ((False, "mwp"), (True, "cmwp")):
        want = ref.run(x, signal, case.layers, contrastive=True, channel_axes=case.axes) if contrastive else plain
        for layer in case.layers:
            got, p = res.maps[method][layer], res.channels[method][layer]
            assert np.isfinite(got).all() and np.isfinite(p).all(), (seed, layer, method)
            expected = want["map"][layer]
            if layer in case.grids:
                expected = expected[:, case.grids[layer]:].reshape(got.shape)
            assert got.shape == expected.shape and p.shape == want["P"][layer].shape, (seed, layer, method)
            # c-MWP is a difference of two MWP-sized terms: its error is relative to their size
            scale = max(np.abs(want["map"][layer]).max(), np.abs(want["P"][layer]).max(),
                        np.abs(plain["P"][layer]).max()) + 1e-30
            assert np.abs(p - want["P"][layer]).max() <= 1e-4 * scale, (seed, layer, method)
            assert np.abs(got - expected).max() <= 1e-4 * scale, (seed, layer, method)
    return case


@pytest.mark.parametrize("seed", range(8))
def test_fuzz_transformer_slice(seed):
    _fuzz_transformer(seed)


@pytest.mark.fuzz
@pytest.mark.parametrize("seed", range(8, 8 + max(1, COUNT // 4)))
def test_fuzz_transformer_full(seed):
    _fuzz_transformer(seed)


def test_transformer_generator_covers_its_pieces():
    """The first 60 transformer graphs hold every piece the generator draws (each graph's tags)."""
    seen = set().union(*(random_transformer(seed).features for seed in range(60)))
    assert seen == FEATURES, FEATURES - seen
