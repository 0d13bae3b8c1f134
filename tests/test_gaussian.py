"""Tests of bayesfuse.gaussian: link spaces, small algebra, q(T), Sigma M-step, summaries."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, special, stats

from bayesfuse import gaussian as G
from bayesfuse.data import RaterMaps


def _spd(rng, n, d, scale=1.0):
    A = rng.normal(size=(n, d, d))
    return scale * (A @ np.swapaxes(A, -1, -2) + d * np.eye(d))


def _simplex(rng, shape, k):
    g = rng.gamma(1.0, size=shape + (k,))
    return g / g.sum(-1, keepdims=True)


# ------------------------------------------------------------------ links
@pytest.mark.parametrize("k", [2, 3, 5])
def test_helmert_basis_is_orthonormal_and_sum_free(k):
    H = G.helmert_basis(k)
    np.testing.assert_allclose(H.T @ H, np.eye(k - 1), atol=1e-12)
    np.testing.assert_allclose(H.sum(axis=0), 0, atol=1e-12)


@pytest.mark.parametrize("link", ["sqrt", "logit", "identity"])
@pytest.mark.parametrize("k", [2, 3])
def test_link_space_round_trip(link, k):
    rng = np.random.default_rng(0)
    p = _simplex(rng, (50,), k)
    sp = G.link_space(link, k)
    r = sp.forward(p)
    assert r.shape == (50, k if link == "sqrt" else k - 1)
    np.testing.assert_allclose(sp.inverse(r), p, atol=1e-6)


def test_logit_coordinate_is_scaled_log_odds():
    sp = G.link_space("logit", 2)
    p = np.array([[0.2, 0.8], [0.9, 0.1]])
    np.testing.assert_allclose(sp.forward(p)[:, 0], np.log(p[:, 1] / p[:, 0]) / np.sqrt(2))


@pytest.mark.parametrize("link", ["sqrt", "logit", "identity"])
def test_foreground_kernel_storage_matches_link_space(link):
    rng = np.random.default_rng(1)
    fg = rng.uniform(size=(3, 6, 5)).astype(np.float32)
    fg[0, 0, 0], fg[1, 0, 0] = 0.0, 1.0  # the ends of [0, 1]
    data = RaterMaps.from_arrays(fg, kind="probability")
    kd = G.prepare(data, link)
    assert kd.X.shape == (3, 30, 1) and kd.mode != G.MODE_PRE
    ref = kd.space.forward(np.stack([1 - fg, fg], -1).reshape(3, 30, 2))
    np.testing.assert_allclose(kd.coords(), ref, rtol=1e-6, atol=1e-6)


def test_class_axis_kernel_storage():
    rng = np.random.default_rng(2)
    p = _simplex(rng, (3, 4, 5), 3).astype(np.float32)
    data = RaterMaps.from_arrays(p, kind="probability", class_axis=True)
    kd = G.prepare(data, "logit")
    assert kd.mode == G.MODE_PRE and kd.X.shape == (3, 20, 2)
    np.testing.assert_allclose(kd.coords(), kd.space.forward(p.reshape(3, 20, 3)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- algebra
def test_inv_logdet_and_mahalanobis_against_numpy():
    rng = np.random.default_rng(3)
    A = _spd(rng, 7, 3)
    inv, ld = G.inv_logdet(A)
    np.testing.assert_allclose(inv, np.linalg.inv(A), rtol=1e-10)
    np.testing.assert_allclose(ld, np.linalg.slogdet(A)[1], rtol=1e-10)
    r = rng.normal(size=(7, 11, 3))
    m = G.mahalanobis(r, A[:, None])
    ref = np.array([[r[p, n] @ np.linalg.solve(A[p], r[p, n]) for n in range(11)] for p in range(7)])
    np.testing.assert_allclose(m, ref, rtol=1e-10)


def test_inv_logdet_refuses_indefinite():
    with pytest.raises(np.linalg.LinAlgError):
        G.inv_logdet(np.array([[1.0, 2.0], [2.0, 1.0]]))


# ----------------------------------------------------------------- q(T)
def _dense_qT(Dt, w, Sigma, bias, prior_var, prior_mean):
    P, N, D = Dt.shape
    Sinv = np.linalg.inv(Sigma)
    mu = np.empty((D, N))
    S = np.empty((N, D, D))
    for n in range(N):
        lam = np.zeros((D, D)) if prior_var is None else np.eye(D) / prior_var
        h = np.zeros(D) if prior_var is None else prior_mean[:, n] / prior_var
        for p in range(P):
            lam += w[p, n] * Sinv[p]
            h += w[p, n] * Sinv[p] @ (Dt[p, n] - bias[p])
        S[n] = np.linalg.inv(lam)
        mu[:, n] = S[n] @ h
    return mu, S


@pytest.mark.parametrize("per_voxel", [True, False])
@pytest.mark.parametrize("prior", [True, False])
def test_update_q_T_equals_dense_posterior(per_voxel, prior):
    rng = np.random.default_rng(4)
    P, N, K = 4, 40, 3
    kd = G.prepare(RaterMaps.from_arrays(_simplex(rng, (P, 5, 8), K).astype(np.float32), kind="probability", class_axis=True), "sqrt")
    Dt = kd.coords()
    w = rng.gamma(2.0, 0.5, size=(P, N)) if per_voxel else np.broadcast_to(rng.gamma(2.0, size=(P, 1)), (P, N))
    Sigma = _spd(rng, P, K, 0.01)
    bias = rng.normal(scale=0.05, size=(P, K))
    pv, pm = (0.3, rng.normal(size=(K, N))) if prior else (None, None)
    mu, logdet, S = G.update_q_T(kd, w if per_voxel else w[:, 0], Sigma, bias, pv, pm, return_cov=True)
    mu_ref, S_ref = _dense_qT(Dt, w, Sigma, bias, pv, pm if prior else None)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(S, S_ref, rtol=1e-8)
    np.testing.assert_allclose(logdet, np.linalg.slogdet(S_ref)[1].sum(), rtol=1e-9)


def test_update_q_T_maximises_expected_log_joint():
    """mu is the argmax of sum_p w E log N(D~ | T~ + b, Sigma/w) + log N(T~ | m, Sigma_T)."""
    rng = np.random.default_rng(5)
    P, K = 3, 2
    data = RaterMaps.from_arrays(rng.uniform(size=(P, 1, 1)).astype(np.float32) * np.ones((P, 1, 1), np.float32), kind="probability")
    kd = G.prepare(data, "sqrt")
    Dt = kd.coords()[:, 0]
    w = rng.gamma(2.0, size=(P, 1))
    Sigma = _spd(rng, P, K, 0.02)
    bias = rng.normal(scale=0.1, size=(P, K))
    m = rng.normal(size=(K, 1))
    mu, _ = G.update_q_T(kd, w, Sigma, bias, 0.5, m)
    Sinv = np.linalg.inv(Sigma)

    def neg(t):
        val = sum(0.5 * w[p, 0] * (Dt[p] - t - bias[p]) @ Sinv[p] @ (Dt[p] - t - bias[p]) for p in range(P))
        return val + 0.5 * np.sum((t - m[:, 0]) ** 2) / 0.5

    opt = optimize.minimize(neg, np.zeros(K), method="BFGS", options={"gtol": 1e-12})
    np.testing.assert_allclose(mu[:, 0], opt.x, atol=1e-6)


def test_update_q_T_flat_prior_without_weight_is_refused():
    rng = np.random.default_rng(6)
    kd = G.prepare(RaterMaps.from_arrays(rng.uniform(size=(2, 3, 3)).astype(np.float32), kind="probability"), "sqrt")
    with pytest.raises(FloatingPointError):
        G.update_q_T(kd, np.zeros((2, 9)), _spd(rng, 2, 2))


# ------------------------------------------------------------ Sigma M-step
def test_covariance_m_step_equals_dense_and_is_the_maximiser():
    rng = np.random.default_rng(7)
    P, N, K = 3, 60, 2
    kd = G.prepare(RaterMaps.from_arrays(rng.uniform(size=(P, 6, 10)).astype(np.float32), kind="probability"), "sqrt")
    Dt = kd.coords()
    w = rng.gamma(2.0, 0.5, size=(P, N))
    mu = rng.normal(0.5, 0.2, size=(K, N))
    S = _spd(rng, N, K, 1e-3)
    b = rng.normal(scale=0.05, size=(P, K))
    Sb = _spd(rng, P, K, 1e-4)
    Sigma = G.covariance_m_step(kd, w, mu, S, b, Sb)
    e = Dt - mu.T[None] - b[:, None]
    ref = (np.einsum("pn,pni,pnj->pij", w, e, e) + np.einsum("pn,nij->pij", w, S) + w.sum(1)[:, None, None] * Sb) / N
    np.testing.assert_allclose(Sigma, ref, rtol=1e-10)

    # the M-step maximises -N/2 log|Sigma| - 1/2 Tr(Sigma^-1 M) for rater 0
    M = ref[0] * N

    def neg(theta):
        L = np.array([[np.exp(theta[0]), 0], [theta[1], np.exp(theta[2])]])
        Sg = L @ L.T
        return 0.5 * N * np.linalg.slogdet(Sg)[1] + 0.5 * np.trace(np.linalg.solve(Sg, M))

    opt = optimize.minimize(neg, np.zeros(3), method="BFGS", options={"gtol": 1e-10})
    L = np.array([[np.exp(opt.x[0]), 0], [opt.x[1], np.exp(opt.x[2])]])
    np.testing.assert_allclose(L @ L.T, Sigma[0], rtol=1e-4)


def test_clip_covariance_is_the_constrained_maximiser():
    rng = np.random.default_rng(8)
    N, eps = 10.0, 0.05
    V = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    M = N * (V * np.array([0.01, 0.2, 1.0])) @ V.T
    clipped, n_low = G.clip_covariance(M[None] / N, eps)
    assert n_low == 1
    np.testing.assert_allclose(np.linalg.eigvalsh(clipped[0]).min(), eps, rtol=1e-10)

    def obj(Sg):
        return -0.5 * N * np.linalg.slogdet(Sg)[1] - 0.5 * np.trace(np.linalg.solve(Sg, M))

    # Sigma = eps I + A A' spans exactly {Sigma >= eps I}
    def neg(a):
        A = a.reshape(3, 3)
        return -obj(eps * np.eye(3) + A @ A.T)

    best = min((optimize.minimize(neg, rng.normal(size=9), method="BFGS") for _ in range(3)), key=lambda r: r.fun)
    assert obj(clipped[0]) >= -best.fun - 1e-6
    assert obj(clipped[0]) == pytest.approx(-best.fun, abs=1e-4)


# ---------------------------------------------------------------- summaries
def test_summaries_mc_agree_with_quadrature_and_exact_logit_quantiles():
    rng = np.random.default_rng(9)
    N = 200
    mu = rng.normal(0, 2, size=(N, 1))
    S = rng.uniform(0.05, 1.0, size=(N, 1, 1))
    mc = G.probability_summaries(mu, S, "logit", method="mc", n_draws=4096, random_seed=1, mass=0.9)
    quad = G.probability_summaries(mu, S, "logit", method="quadrature", n_nodes=40, mass=0.9)
    np.testing.assert_allclose(mc["consensus_mean"], quad["consensus_mean"], atol=0.005)
    np.testing.assert_allclose(mc["consensus_sd"], quad["consensus_sd"], atol=0.005)
    # F^-1 is monotone in the one logit coordinate: quantiles map exactly
    z = stats.norm.ppf(0.95)
    sd = np.sqrt(S[:, 0, 0])
    hi = special.expit(np.sqrt(2) * (mu[:, 0] + z * sd))
    np.testing.assert_allclose(quad["consensus_hi"][:, 1], hi, rtol=1e-5)
    np.testing.assert_allclose(quad["consensus_lo"][:, 0], 1 - hi, rtol=1e-4, atol=1e-6)
    # (scrambled Sobol draws: the quantile error is well below plain MC's 0.035 sd)
    upper_link = special.logit(mc["consensus_hi"][:, 1].astype(float)) / np.sqrt(2)
    np.testing.assert_allclose(upper_link, mu[:, 0] + z * sd, atol=0.05 * sd.max())
    assert np.all(mc["consensus_lo"] <= mc["consensus_hi"])


def test_summaries_sqrt_against_brute_force_sampling():
    rng = np.random.default_rng(10)
    mu = np.array([[0.9, 0.3], [0.5, 0.6], [0.1, 0.95]])
    S = _spd(rng, 3, 2, 1e-3)
    quad = G.probability_summaries(mu, S, "sqrt", method="quadrature", n_nodes=11, mass=None)
    mc = G.probability_summaries(mu, S, "sqrt", method="mc", n_draws=8192, random_seed=0, mass=0.8)
    assert "consensus_lo" not in quad
    for n in range(3):
        t = rng.multivariate_normal(mu[n], S[n], size=400_000)
        fg = t[:, 1] ** 2 / (t**2).sum(1)
        assert quad["consensus_mean"][n, 1] == pytest.approx(fg.mean(), abs=2e-3)
        assert quad["consensus_sd"][n, 1] == pytest.approx(fg.std(), rel=0.02)
        assert mc["consensus_sd"][n, 1] == pytest.approx(fg.std(), rel=0.03)
        lo, hi = np.quantile(fg, [0.1, 0.9])
        assert mc["consensus_lo"][n, 1] == pytest.approx(lo, abs=0.05 * fg.std())
        assert mc["consensus_hi"][n, 1] == pytest.approx(hi, abs=0.05 * fg.std())


def test_summaries_keep_leading_dims_and_are_reproducible():
    rng = np.random.default_rng(11)
    mu = rng.uniform(0.2, 0.8, size=(4, 5, 3))
    S = np.broadcast_to(0.01 * np.eye(3), (4, 5, 3, 3)).copy()
    a = G.probability_summaries(mu, S, "sqrt", random_seed=3, n_draws=64)
    b = G.probability_summaries(mu, S, G.link_space("sqrt", 3), random_seed=3, n_draws=64, block_size=3)
    assert a["consensus_hi"].shape == (4, 5, 3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(a["consensus_mean"].sum(-1), 1, atol=1e-5)
    c = G.probability_summaries(mu, S, "sqrt", random_seed=4, n_draws=64)
    assert not np.array_equal(a["consensus_hi"], c["consensus_hi"])


def test_quantile_selection_matches_numpy():
    rng = np.random.default_rng(12)
    for n in (1, 2, 7, 64, 257):
        a = rng.normal(size=n)
        for q in (0.0, 0.05, 0.5, 0.95, 1.0):
            assert G._quantile(a.copy(), q) == pytest.approx(np.quantile(a, q), abs=1e-12)
