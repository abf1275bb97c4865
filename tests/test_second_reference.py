"""A second, separately written float64 reference (tests/reference.py, with its own generator
tests/netgen.py incl. residual blocks): the library's maps must match it too."""
import numpy as np
import pytest

import netgen
import reference
from onnx_excite import Exciter


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("residual", [False, True])
def test_library_matches_second_reference(seed, residual):
    model = netgen.random_cnn(seed, residual=residual, signed=seed % 2 == 1)
    layers = netgen.layer_names(model)
    x = netgen.random_input(model, batch=2, seed=seed, nonneg=False).astype(np.float32)
    ex = Exciter(model, layers, methods=("mwp", "cmwp"))
    signal = np.random.default_rng(seed).random((2, ex.num_classes)).astype(np.float32)
    res = ex.explain(x, signal)
    plain = reference.excitation_reference(model, x, signal, layers)
    contrast = reference.excitation_reference(model, x, signal, layers, contrastive=True)
    for method, want in (("mwp", plain), ("cmwp", contrast)):
        for layer in layers:
            scale = max(np.abs(want["map"][layer]).max(), np.abs(plain["P"][layer]).max())
            err = np.abs(res.maps[method][layer] - want["map"][layer]).max()
            assert err <= 1e-4 * scale + 1e-30, (method, layer, err, scale)
