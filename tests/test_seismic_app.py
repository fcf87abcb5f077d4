import os
import sys

import numpy as np
import pytest

pytest.importorskip("pylops")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "applications",
                                "seismic_imaging"))
from earth_models import earth_model, earth_models, reflectivity  # noqa: E402
from forward import poststack_operator, simulate  # noqa: E402


@pytest.mark.parametrize("kind", ["layered", "folded", "faulted"])
def test_earth_models_are_blocky_and_deepen(kind):
    rng = np.random.default_rng(0)
    m = earth_model((32, 24), rng, kind, texture=0.0)
    assert m.shape == (32, 24) and np.isfinite(m).all()
    assert abs((earth_model((32, 24), np.random.default_rng(0), kind, texture=0.1) - m).std() - 0.1) < 0.02
    assert 3 <= len(np.unique(m)) <= 8  # piecewise constant layers
    if kind == "layered":
        assert (np.diff(m, axis=1) == 0).all()  # flat layers: constant along x
    else:
        assert (np.diff(m, axis=1) != 0).any()
    assert earth_models(3, (8, 4, 4), seed=1).shape == (3, 1, 8, 4, 4)
    assert np.allclose(reflectivity(np.ones((5, 2))), 0)


@pytest.mark.parametrize("shape", [(32, 16), (16, 8, 8)])
def test_poststack_operator_is_linear_with_a_true_adjoint(shape):
    op = poststack_operator(shape)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=op.shape[1]), rng.normal(size=op.shape[0])
    assert np.isclose((op @ a) @ b, a @ (op.H @ b), rtol=1e-10)
    m = earth_models(2, shape, seed=3)
    clean, noisy = simulate(m, 0.0, seed=4), simulate(m, 0.05, seed=4)
    assert clean.shape == m.shape
    assert np.allclose(clean[0, 0], (op @ m[0, 0].ravel()).reshape(shape))
    assert abs((noisy - clean).std() - 0.05) < 0.01
    # the data see interfaces only: a constant model gives (almost) no data away from the edges
    flat = simulate(np.ones((1, 1) + shape), 0.0, seed=0)[0, 0]
    assert np.abs(flat[4:-4]).max() < 1e-10
