"""The cross-check's statistics on inputs with known answers (no NUTS)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import stats as sps

from bayesfuse.crosscheck_stats import (
    ESS_MIN, RHAT_MAX, bernoulli_stats, element_stats, nuts_health, pareto_khat, share_within,
)


def draws(values: np.ndarray, dims=("rater",)) -> xr.DataArray:
    """(chain, draw, *dims) from (S, *shape) with 2 chains."""
    s = values.shape[0] // 2
    return xr.DataArray(values[: 2 * s].reshape((2, s) + values.shape[1:]), dims=("chain", "draw", *dims),
                        coords={dims[0]: [f"r{i}" for i in range(values.shape[1])]})


def test_element_stats_measure_shift_spread_and_coverage():
    rng = np.random.default_rng(0)
    n = 40000
    nuts = rng.normal(0.0, 2.0, size=(n, 3))
    # q: right, shifted by 0.3 sd, half as wide
    q = np.stack([rng.normal(0, 2, n), rng.normal(0.6, 2, n), rng.normal(0, 1, n)], axis=1)
    st = element_stats(draws(q), draws(nuts), mass=0.9)
    np.testing.assert_allclose(st["zscore"].values, [0.0, 0.3, 0.0], atol=0.03)
    np.testing.assert_allclose(st["sd_ratio"].values, [1.0, 1.0, 0.5], atol=0.03)
    # NUTS mass inside q's central 90 % interval: 0.9; shifted by 0.3 sd; inside +-1.645 * 1 for sd 2
    shifted = sps.norm.cdf(1.645 - 0.3) - sps.norm.cdf(-1.645 - 0.3)
    np.testing.assert_allclose(st["coverage"].values, [0.9, shifted, 2 * sps.norm.cdf(1.645 / 2) - 1], atol=0.01)
    # W1 between N(0, 2) and N(0.6, 2) is 0.6, i.e. 0.3 NUTS sd; N(0, 1) vs N(0, 2): E|X| difference 2/sqrt(2 pi)
    np.testing.assert_allclose(st["wasserstein"].values, [0.0, 0.3, (2 - 1) * np.sqrt(2 / np.pi) / 2], atol=0.03)
    assert list(st["rater"].values) == ["r0", "r1", "r2"]


def test_element_stats_of_a_point_estimate():
    rng = np.random.default_rng(1)
    nuts = rng.normal(1.0, 0.5, size=(4000, 2))
    q = np.broadcast_to([1.0, 2.0], (4000, 2)).copy()
    st = element_stats(draws(q), draws(nuts))
    assert np.all(st["sd_q"].values == 0) and np.all(st["sd_ratio"].values == 0)
    np.testing.assert_allclose(st["zscore"].values, [0.0, 2.0], atol=0.06)
    assert np.all(st["coverage"].values == 0)


def test_element_stats_refuse_misaligned_coordinates():
    a = draws(np.zeros((10, 2)))
    b = a.assign_coords(rater=["x", "y"])
    with pytest.raises(ValueError, match="coordinates"):
        element_stats(a, b)


def test_bernoulli_stats_by_hand():
    w_q = np.array([0.5, 0.9, 0.0, 0.02])
    w_n = np.array([0.5, 0.8, 0.0, 0.05])
    st = bernoulli_stats(w_q, w_n, ("x",), mass=0.9)
    sd_n = np.sqrt(w_n * (1 - w_n))
    np.testing.assert_allclose(st["zscore"].values, [0, 0.1 / sd_n[1], 0, -0.03 / sd_n[3]])
    np.testing.assert_allclose(st["sd_ratio"].values[[0, 1, 3]],
                               np.sqrt(w_q * (1 - w_q))[[0, 1, 3]] / sd_n[[0, 1, 3]])
    assert st["sd_ratio"].values[2] == 0  # 0 / 0: both certain
    # q's 90 % interval: [0, 1] at w = 0.5 and 0.9 (covers everything); {0} at w = 0 and 0.02
    np.testing.assert_allclose(st["coverage"].values, [1, 1, 1, 0.95])
    np.testing.assert_allclose(st["wasserstein"].values * sd_n, np.abs(w_q - w_n), atol=1e-12)


def test_pareto_khat_grows_as_q_misses_posterior_mass():
    """p = N(0, I_4); q = N(0, s^2 I_4). A narrow q misses the tails: large k (the
    sign convention of arviz-stats' psislw is what this guards: with the
    ratios the other way round a narrow q would look perfect)."""
    rng = np.random.default_rng(2)
    ks = {}
    for s in (0.5, 0.9, 1.5):
        x = rng.normal(0, s, (4000, 4))
        log_ratio = (sps.norm.logpdf(x) - sps.norm.logpdf(x, scale=s)).sum(axis=1)
        ks[s] = pareto_khat(log_ratio)
    assert ks[0.5] > 0.7 > 0.5 > ks[0.9] > ks[1.5]
    assert pareto_khat(np.full(100, 3.0)) == -np.inf
    assert pareto_khat(np.array([0.0, np.inf, 1.0])) == np.inf


def test_share_within():
    z = np.array([0.1, -0.4, 0.6, -2.0])
    assert share_within(z, 0.5) == 0.5
    assert share_within(z, 0.5, np.array([True, False, False, False])) == 1.0


def _tree(post: dict, diverging=None) -> xr.DataTree:
    chains, n = next(iter(post.values())).shape[:2]
    ds = xr.Dataset({k: (("chain", "draw") + tuple(f"d{i}" for i in range(v.ndim - 2)), v) for k, v in post.items()})
    div = np.zeros((chains, n), bool) if diverging is None else diverging
    return xr.DataTree.from_dict({"/posterior": ds, "/sample_stats": xr.Dataset({"diverging": (("chain", "draw"), div)})})


def test_nuts_health_flags_each_failure():
    rng = np.random.default_rng(3)
    good = rng.normal(size=(4, 500, 3))
    h = nuts_health(_tree({"a": good}))
    assert h.ok and h.rhat_max <= RHAT_MAX and h.ess_bulk_min >= ESS_MIN and h.divergences == 0
    stuck = good.copy()
    stuck[0] += 3.0  # one chain elsewhere
    h = nuts_health(_tree({"a": good[..., 0], "b": stuck}))
    assert not h.ok and h.rhat_max > 1.2 and "b[" in h.worst and "NOT healthy" in h.message()
    sticky = np.cumsum(rng.normal(size=(4, 500)), axis=1) * 0.05 + rng.normal(size=(4, 1)) * 0.01
    h = nuts_health(_tree({"a": sticky}))
    assert not h.ok and h.ess_bulk_min < ESS_MIN
    div = np.zeros((4, 500), bool)
    div[2, 10] = True
    h = nuts_health(_tree({"a": good}, div))
    assert not h.ok and h.divergences == 1
