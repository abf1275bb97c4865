"""The paper's map post-processing (onnx_excite.render.postprocess) against plain numpy expectations."""
import numpy as np
import pytest

from onnx_excite.errors import ExciteError
from onnx_excite.render.maps import upsample
from onnx_excite.render.postprocess import (blur_sigma, gaussian_blur, gaussian_kernel1d, postprocess_for,
                                     postprocess_map)


def _gauss(sigma, radius):
    k = np.arange(-radius, radius + 1)
    g = np.exp(-k ** 2 / (2.0 * sigma ** 2))
    return g / g.sum()


def _refl(i, n):
    """Half-sample symmetric extension index: ... 1 0 | 0 1 ... n-1 | n-1 ..."""
    i = i % (2 * n)
    return i if i < n else 2 * n - 1 - i


def _direct_blur(m, sigma):
    """Brute-force 2-D sum with explicit reflected indices (no np.pad)."""
    radius = int(np.ceil(4 * sigma))
    g = _gauss(sigma, radius)
    h, w = m.shape
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    out[y, x] += g[dy + radius] * g[dx + radius] * m[_refl(y + dy, h), _refl(x + dx, w)]
    return out


def test_sigma_is_two_percent_of_the_longer_side():
    assert blur_sigma(224, 224) == pytest.approx(4.48)
    assert blur_sigma(500, 375) == pytest.approx(10.0)
    assert blur_sigma(375, 500) == pytest.approx(10.0)


def test_kernel_is_the_normalised_sampled_gaussian():
    for sigma in (0.3, 1.0, 2.5, 4.48):
        g = gaussian_kernel1d(sigma)
        radius = int(np.ceil(4 * sigma))
        np.testing.assert_allclose(g, _gauss(sigma, radius), rtol=1e-13)
    np.testing.assert_array_equal(gaussian_kernel1d(0.0), [1.0])


def test_blur_of_a_delta_is_the_gaussian():
    sigma = 2.0
    m = np.zeros((31, 29))
    m[15, 14] = 1.0
    out = gaussian_blur(m, sigma)
    g = _gauss(sigma, 8)
    want = np.zeros_like(m)
    want[7:24, 6:23] = np.outer(g, g)
    np.testing.assert_allclose(out, want, atol=1e-15)
    ys, xs = np.mgrid[:31, :29]
    var_y = (out * (ys - 15) ** 2).sum()
    assert var_y == pytest.approx(sigma ** 2, rel=2e-3)  # the truncated Gaussian's variance


@pytest.mark.parametrize("shape,sigma", [((12, 17), 1.3), ((5, 7), 3.0), ((9, 4), 0.6), ((3, 3), 5.0)])
def test_blur_matches_direct_sum_and_preserves_mass(shape, sigma):
    rng = np.random.default_rng(sum(shape))
    m = rng.random(shape) * (rng.random(shape) < 0.3)   # sparse, with mass near the borders
    m[0, 0] = m[-1, -1] = 1.0
    out = gaussian_blur(m, sigma)
    np.testing.assert_allclose(out, _direct_blur(m, sigma), rtol=1e-12, atol=1e-15)
    assert out.sum() == pytest.approx(m.sum(), rel=1e-12)
    np.testing.assert_allclose(gaussian_blur(np.full(shape, 2.5), sigma), 2.5, rtol=1e-13)


def test_blur_is_separable_over_batches():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 10, 11))
    out = gaussian_blur(maps, 1.7)
    for i in range(3):
        np.testing.assert_allclose(out[i], gaussian_blur(maps[i], 1.7), rtol=1e-14)


def test_postprocess_upsamples_then_blurs():
    rng = np.random.default_rng(1)
    m = rng.random((7, 9)).astype(np.float32)
    up = upsample(m, (90, 70))
    np.testing.assert_array_equal(postprocess_map(m, (90, 70), blur=False), up)
    got = postprocess_map(m, (90, 70), blur=True)
    np.testing.assert_allclose(got, gaussian_blur(up, 0.02 * 90), rtol=1e-5, atol=1e-6)
    assert got.shape == (70, 90) and got.dtype == np.float32
    # blur flag per method: grad blurs, mwp does not; the override turns it off
    np.testing.assert_allclose(postprocess_for("grad", m, (90, 70)), got, rtol=1e-6)
    np.testing.assert_array_equal(postprocess_for("mwp", m, (90, 70)), up)
    np.testing.assert_array_equal(postprocess_for("grad", m, (90, 70), blur=False), up)


def test_bad_values_raise_excite_errors():
    with pytest.raises(ExciteError, match="sigma"):
        gaussian_blur(np.zeros((4, 4)), -1.0)
    with pytest.raises(ExciteError, match="2-D"):
        postprocess_map(np.zeros((2, 4, 4)))
    with pytest.raises(ExciteError, match="unknown method"):
        postprocess_for("gard", np.zeros((4, 4)))
