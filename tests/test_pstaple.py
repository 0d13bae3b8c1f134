"""PSTAPLE: updates against brute force, monotone objective, reduction to
STAPLE on hard labels, MRF behaviour, PyMC log-density, recovery."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize

import bayesfuse
from bayesfuse.data import RaterMaps
from bayesfuse.errors import ConfigError
from bayesfuse.models import REGISTRY
from bayesfuse.models import pstaple as ps

CARD = Path(__file__).resolve().parents[1] / "models" / "pstaple.md"


# ------------------------------------------------------------------ helpers
def _simulate(shape=(30, 30, 12), thetas=((0.9, 0.97), (0.75, 0.99), (0.95, 0.85), (0.6, 0.95)), seed=0):
    """Binary truth (a box) and raters flipping labels with given (sens, spec)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, bool)
    sl = tuple(slice(s // 4, 3 * s // 4) for s in shape)
    truth[sl] = True
    masks = []
    for se, sp in thetas:
        m = np.where(truth, rng.random(shape) < se, rng.random(shape) > sp)
        masks.append(m.astype(np.uint8))
    return truth, np.array(masks)


def _soft(masks, seed=1, k=2):
    """Soft maps: each rater's label blurred towards the other class at random."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.55, 1.0, masks.shape)
    fg = np.where(masks == 1, conf, 1 - conf)
    return fg.astype(np.float32)


def _random_simplex(rng, shape, k):
    x = rng.gamma(1.0, size=shape + (k,))
    return x / x.sum(-1, keepdims=True)


def staple_reference(labels: np.ndarray, k: int, prior: np.ndarray, max_iter: int = 500, tol: float = 1e-12):
    """STAPLE's two formulas written out directly (Warfield 2004), K classes.

    E-step: W[n,k] ∝ f_k prod_p theta[p, y[p,n], k];
    M-step: theta[p,j,k] = sum_{n: y[p,n] = j} W[n,k] / sum_n W[n,k].
    """
    P, N = labels.shape
    theta = ps.initial_theta(P, k, 0.9)
    onehot = np.eye(k)[labels]  # (P, N, K)
    prev = -np.inf
    for _ in range(max_iter):
        logw = np.log(prior) + sum(np.log(theta[p][labels[p]]) for p in range(P))
        m = logw.max(1, keepdims=True)
        ll = float(np.sum(m[:, 0] + np.log(np.exp(logw - m).sum(1))))
        W = np.exp(logw - m)
        W /= W.sum(1, keepdims=True)
        if abs(ll - prev) <= tol * abs(ll):
            break
        prev = ll
        theta = np.einsum("pnj,nk->pjk", onehot, W) / W.sum(0)
        theta = np.maximum(theta, ps.THETA_FLOOR)
        theta /= theta.sum(1, keepdims=True)
    return W, theta


# ----------------------------------------------------------- card citations
def test_every_card_label_is_cited_and_every_citation_exists():
    card = CARD.read_text()
    labels = set(re.findall(r"\(eq:(pstaple-[a-z-]+)\)", card))
    src = Path(ps.__file__).read_text()
    cited = set(re.findall(r"models/pstaple\.md \(eq:(pstaple-[a-z-]+)\)", src))
    assert cited, "no citation found in the module"
    assert cited <= labels, f"cited but not in the card: {cited - labels}"
    assert labels <= cited, f"in the card but never cited: {labels - cited}"


# --------------------------------------------------- updates vs brute force
def test_m_step_maximises_expected_complete_loglik():
    """(eq:pstaple-mstep) against a numerical maximiser of Q(theta)."""
    rng = np.random.default_rng(3)
    P, N, K = 2, 200, 3
    D = _random_simplex(rng, (P, N), K)
    W = _random_simplex(rng, (N,), K)
    old = np.stack([_random_simplex(rng, (K,), K).T for _ in range(P)])  # columns on simplex
    r = D[:, :, :, None] * old[:, None] / np.einsum("pnj,pjk->pnk", D, old)[:, :, None, :]

    def q(theta):
        return float(np.einsum("nk,pnjk,pjk->", W, r, np.log(theta)))

    new = ps.m_step_theta(D, W, old)
    np.testing.assert_allclose(new.sum(1), 1.0, atol=1e-12)

    def neg(z):
        z = z.reshape(P, K, K)
        th = np.exp(z - z.max(1, keepdims=True))
        return -q(th / th.sum(1, keepdims=True))

    best = minimize(neg, np.log(old).ravel(), method="BFGS", options={"gtol": 1e-9})
    assert q(new) >= -best.fun - 1e-7
    z = best.x.reshape(P, K, K)
    th = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(new, th / th.sum(1, keepdims=True), atol=2e-4)


def test_em_fixed_point_is_a_local_maximum_of_the_likelihood():
    """At convergence no direction on the simplex raises (eq:pstaple-loglik)."""
    truth, masks = _simulate(shape=(16, 16, 6))
    fg = _soft(masks)
    data = RaterMaps.from_arrays(list(fg))
    r = bayesfuse.fuse(data, "pstaple", tol=1e-13, max_iter=2000, prior="estimate", progress=False)
    theta = r.group("raters")["theta"].values
    f = r.group("variational")["prior"].values
    D, _ = ps._inputs(data)

    def loglik(z):
        z = z.reshape(-1)
        th = z[: theta.size].reshape(theta.shape)
        th = np.exp(th - th.max(1, keepdims=True))
        th /= th.sum(1, keepdims=True)
        lf = z[theta.size:] - np.logaddexp.reduce(z[theta.size:])
        return -ps.e_step(ps.log_likelihood_terms(D, th), lf)[1]

    z0 = np.concatenate([np.log(theta).ravel(), np.log(f)])
    best = minimize(loglik, z0, method="BFGS", options={"gtol": 1e-8})
    assert -best.fun - (-loglik(z0)) < 1e-5 * abs(best.fun)
    assert r.objective[-1] == pytest.approx(-loglik(z0), rel=1e-12)


def test_mean_field_update_maximises_free_energy_per_voxel():
    """(eq:pstaple-meanfield): after a sweep, every voxel of the colour updated
    last sits at its exact conditional maximum: random alternatives do worse."""
    rng = np.random.default_rng(5)
    shape, K, beta = (7, 6), 3, 0.8
    a0 = rng.normal(size=shape + (K,))
    W = _random_simplex(rng, shape, K)
    colours = (np.indices(shape).sum(0) % 2) == 0
    W1 = ps.mean_field_sweep(W.copy(), a0, beta, colours, None)
    f1 = ps.free_energy(W1, a0, beta, None)
    assert f1 >= ps.free_energy(W, a0, beta, None)
    last = np.argwhere(~colours)
    for _ in range(200):
        i, j = last[rng.integers(len(last))]
        alt = W1.copy()
        alt[i, j] = _random_simplex(rng, (), K)
        assert ps.free_energy(alt, a0, beta, None) <= f1 + 1e-12


def test_free_energy_equals_loglik_without_mrf():
    rng = np.random.default_rng(7)
    D = _random_simplex(rng, (3, 50), 2)
    theta = ps.initial_theta(3, 2, 0.8)
    ll = ps.log_likelihood_terms(D, theta)
    f = np.array([0.6, 0.4])
    W, total = ps.e_step(ll, np.log(f))
    a0 = (ll + np.log(f)).reshape(5, 10, 2)
    assert ps.free_energy(W.reshape(5, 10, 2), a0, 0.0, None) == pytest.approx(total, rel=1e-12)


# ---------------------------------------------------------- monotonicity
@pytest.mark.parametrize("beta,prior", [(0.0, "estimate"), (0.0, "mean"), (0.7, "mean")])
def test_objective_never_decreases(beta, prior):
    truth, masks = _simulate(shape=(24, 24, 8))
    fg = _soft(masks)
    r = bayesfuse.fuse(list(fg), "pstaple", mrf_beta=beta, prior=prior, tol=1e-12, max_iter=60, progress=False)
    obj = r.objective
    assert obj.size > 5
    assert np.all(np.diff(obj) >= -1e-10 * np.abs(obj[1:]))


def test_objective_never_decreases_three_classes():
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 3, (20, 20))
    truth[:10] = 0
    maps = []
    for p in range(3):
        noisy = np.where(rng.random(truth.shape) < 0.8, truth, rng.integers(0, 3, truth.shape))
        soft = 0.7 * np.eye(3)[noisy] + 0.3 * _random_simplex(rng, truth.shape, 3)
        maps.append(soft.astype(np.float32))
    data = RaterMaps.from_arrays(maps, class_axis=True)
    r = bayesfuse.fuse(data, "pstaple", mrf_beta=0.3, tol=1e-12, max_iter=40, progress=False)
    assert r.n_classes == 3
    assert np.all(np.diff(r.objective) >= -1e-10 * np.abs(r.objective[1:]))


# ----------------------------------------------------------- reductions
def test_reduces_to_staple_formulas_on_hard_labels():
    truth, masks = _simulate()
    labels = masks.reshape(masks.shape[0], -1)
    f = ps.mean_prior(np.eye(2)[labels])
    W_ref, theta_ref = staple_reference(labels, 2, f)
    r = bayesfuse.fuse(list(masks), "pstaple", tol=1e-12, max_iter=500, progress=False)
    np.testing.assert_allclose(r.group("raters")["theta"].values, theta_ref, atol=1e-8)
    np.testing.assert_allclose(r.consensus.values.ravel(), W_ref[:, 1], atol=1e-6)
    # the fractional M-step is the same update on hard labels
    r2 = bayesfuse.fuse(list(masks), "pstaple", m_step="fractional", tol=1e-12, max_iter=500, progress=False)
    np.testing.assert_allclose(r2.group("raters")["theta"].values, theta_ref, atol=1e-8)


@pytest.mark.skipif("staple" not in REGISTRY, reason="bayesfuse.models.staple has not landed yet")
def test_reduces_to_the_zoo_staple_on_hard_labels():
    truth, masks = _simulate()
    st = bayesfuse.fuse(list(masks), "staple", tol=1e-12, max_iter=500, progress=False)
    r = bayesfuse.fuse(list(masks), "pstaple", tol=1e-12, max_iter=500, progress=False)
    np.testing.assert_allclose(r.raters["sensitivity"], st.raters["sensitivity"], atol=1e-5)
    np.testing.assert_allclose(r.raters["specificity"], st.raters["specificity"], atol=1e-5)
    np.testing.assert_allclose(r.consensus.values, st.consensus.values, atol=1e-4)


@pytest.mark.skipif("soft-staple-simplified" not in REGISTRY, reason="bayesfuse.models.soft_staple has not landed yet")
def test_equals_simplified_soft_staple_without_mrf():
    """Two independent implementations of one likelihood: for K = 2 and no
    MRF, (eq:pstaple-lik) is simplified soft-STAPLE's noisy-observation model
    (MODELS.md section 3), so both EMs reach the same fixed point."""
    truth, masks = _simulate(shape=(24, 24, 8))
    fg = _soft(masks)
    a = bayesfuse.fuse(list(fg), "pstaple", tol=1e-12, max_iter=3000, progress=False)
    b = bayesfuse.fuse(list(fg), "soft-staple-simplified", tol=1e-12, max_iter=3000, progress=False)
    np.testing.assert_allclose(a.raters["sensitivity"], b.raters["sensitivity"], atol=1e-4)
    np.testing.assert_allclose(a.raters["specificity"], b.raters["specificity"], atol=1e-4)
    np.testing.assert_allclose(a.consensus.values, b.consensus.values, atol=1e-4)


def test_soft_maps_differ_from_their_argmax():
    """Soft evidence is used: the soft maps do not give their labels' answer."""
    truth, masks = _simulate(shape=(20, 20, 8))
    fg = _soft(masks)
    soft = bayesfuse.fuse(list(fg), "pstaple", progress=False)
    hard = bayesfuse.fuse(list((fg > 0.5).astype(np.uint8)), "pstaple", progress=False)
    assert np.abs(soft.consensus.values - hard.consensus.values).max() > 0.05


def test_recovers_known_performance():
    thetas = ((0.9, 0.97), (0.75, 0.99), (0.95, 0.85), (0.6, 0.95))
    truth, masks = _simulate(shape=(40, 40, 20), thetas=thetas)
    r = bayesfuse.fuse(list(masks), "pstaple", prior="estimate", progress=False)
    np.testing.assert_allclose(r.raters["sensitivity"], [t[0] for t in thetas], atol=0.02)
    np.testing.assert_allclose(r.raters["specificity"], [t[1] for t in thetas], atol=0.01)


def test_mrf_smooths_and_improves_dice():
    truth, masks = _simulate(shape=(32, 32, 12), thetas=((0.75, 0.9),) * 3, seed=4)
    dice = {}
    for beta in (0.0, 1.0):
        lab = bayesfuse.fuse(list(masks), "pstaple", mrf_beta=beta, progress=False).labels.values.astype(bool)
        dice[beta] = 2 * (lab & truth).sum() / (lab.sum() + truth.sum())
    assert dice[1.0] > dice[0.0] + 0.05


def test_region_of_interest_is_background_outside():
    truth, masks = _simulate(shape=(16, 16, 6))
    roi = np.zeros(truth.shape, bool)
    roi[2:14, 2:14, 1:5] = True
    for beta in (0.0, 0.5):
        r = bayesfuse.fuse(list(masks), "pstaple", mask=roi, mrf_beta=beta, progress=False)
        assert np.all(r.consensus.values[~roi] == 0)
        inside = bayesfuse.fuse([m[roi].reshape(-1, 1) for m in masks], "pstaple", progress=False) if beta == 0 else None
        if inside is not None:
            np.testing.assert_allclose(r.consensus.values[roi], inside.consensus.values.ravel(), atol=1e-6)


# ------------------------------------------------------------- options
def test_bad_options():
    with pytest.raises(ConfigError, match="mrf_beta"):
        bayesfuse.fuse([np.zeros((4, 4)), np.ones((4, 4))], "pstaple", mrf_beta=-1)
    with pytest.raises(ConfigError, match="prior='estimate' needs mrf_beta=0"):
        bayesfuse.fuse([np.zeros((4, 4)), np.ones((4, 4))], "pstaple", mrf_beta=0.5, prior="estimate")
    with pytest.raises(ConfigError, match="no PyMC form"):
        ps.build_model(RaterMaps.from_arrays([np.zeros((4, 4)), np.ones((4, 4))]), ps.Config(mrf_beta=0.5))


# ----------------------------------------------------------------- PyMC
def test_pymc_logp_matches_loglik():
    """The PyMC model's log-density is (eq:pstaple-loglik) plus the flat
    Dirichlet constants (log (K-1)! per column), at random parameters."""
    from math import lgamma

    rng = np.random.default_rng(2)
    fg = _soft(_simulate(shape=(6, 5, 2))[1])
    data = RaterMaps.from_arrays(list(fg))
    model = ps.build_model(data, ps.Config())
    D, _ = ps._inputs(data)
    f = ps.mean_prior(D)
    logp = model.compile_logp(jacobian=False)
    P, K = D.shape[0], D.shape[2]
    for _ in range(3):
        theta = np.stack([_random_simplex(rng, (K,), K).T for _ in range(P)])
        point = {"theta_t_simplex__": _stick_breaking_inverse(model, theta.transpose(0, 2, 1))}
        expected = ps.e_step(ps.log_likelihood_terms(D, theta), np.log(f))[1] + P * K * lgamma(K)
        assert float(logp(point)) == pytest.approx(expected, rel=1e-9)


def _stick_breaking_inverse(model, value):
    """Unconstrained value of a Dirichlet whose constrained value is ``value``."""
    rv = model["theta_t"]
    tr = model.rvs_to_transforms[rv]
    return tr.forward(value).eval()


@pytest.mark.nuts
def test_nuts_posterior_centres_on_the_em_estimate():
    """With flat Dirichlet priors the EM estimate is the posterior mode; on a
    small case (hundreds of voxels) NUTS's posterior mean lies within two
    posterior sd of it, and the sd is small (the data pin theta down)."""
    import nutpie

    truth, masks = _simulate(shape=(16, 16, 4), thetas=((0.9, 0.95), (0.8, 0.9), (0.7, 0.97)), seed=8)
    fg = _soft(masks, seed=9)
    data = RaterMaps.from_arrays(list(fg))
    r = bayesfuse.fuse(data, "pstaple", tol=1e-12, max_iter=2000, progress=False)
    model = ps.build_model(data, ps.Config(), hyper="fixed", fixed=ps.fixed_from_result(r))
    compiled = nutpie.compile_pymc_model(model)
    tree = nutpie.sample(compiled, draws=400, tune=400, chains=2, seed=3, progress_bar=False)
    theta = tree["posterior"]["theta"]
    mean = theta.mean(("chain", "draw")).values
    sd = theta.std(("chain", "draw")).values
    em = r.group("raters")["theta"].values
    assert np.all(sd < 0.1)
    assert np.all(np.abs(mean - em) < 2 * sd + 1e-3)
