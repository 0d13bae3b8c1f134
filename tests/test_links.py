"""Link functions: round trips, safety at 0 and 1, the Hellinger tie."""

import numpy as np
import pytest

from bayesfuse.links import EPS, LINKS, get_link


def _simplex(rng, n, k, hard_fraction=0.3):
    p = rng.dirichlet(np.ones(k), size=n)
    hard = rng.random(n) < hard_fraction
    onehot = np.eye(k)[rng.integers(0, k, size=n)]
    p[hard] = onehot[hard]
    return p


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("name", ["sqrt", "identity"])
def test_round_trip_exact(name, k):
    rng = np.random.default_rng(0)
    p = _simplex(rng, 2000, k)
    link = get_link(name)
    back = link.inverse(link.forward(p))
    np.testing.assert_allclose(back, p, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_logit_round_trip_within_clipping(k):
    rng = np.random.default_rng(1)
    p = _simplex(rng, 2000, k)
    back = LINKS["logit"].inverse(LINKS["logit"].forward(p))
    # Probabilities are clipped to [EPS, 1 - EPS] before the log: exact away
    # from the corners, within a few EPS at them.
    np.testing.assert_allclose(back, p, atol=k * EPS * 2)
    interior = (p > 1e-3).all(axis=1)
    np.testing.assert_allclose(back[interior], p[interior], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LINKS))
def test_safe_at_zero_and_one(name):
    p = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    link = get_link(name)
    r = link.forward(p)
    assert np.all(np.isfinite(r))
    back = link.inverse(r)
    assert np.all(np.isfinite(back))
    np.testing.assert_allclose(back.sum(axis=-1), 1.0)
    # An all-zero vector (no information) goes to the uniform distribution.
    np.testing.assert_allclose(back[2], [0.5, 0.5], atol=1e-6 if name == "logit" else 0)


def test_sqrt_link_is_hellinger():
    # ||sqrt(p) - sqrt(q)||^2 = 2 H^2(p, q) with H the Hellinger distance.
    rng = np.random.default_rng(2)
    p, q = rng.dirichlet(np.ones(4), size=2)
    h2 = 1 - np.sum(np.sqrt(p * q))
    d = LINKS["sqrt"].forward(p) - LINKS["sqrt"].forward(q)
    assert np.isclose(d @ d, 2 * h2)


def test_logit_k2_is_log_odds():
    p = np.array([[0.2, 0.8]])
    r = LINKS["logit"].forward(p)
    assert np.isclose(r[0, 1] - r[0, 0], np.log(0.8 / 0.2))


def test_unknown_link():
    with pytest.raises(ValueError, match="unknown link"):
        get_link("probit")
