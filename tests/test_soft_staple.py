"""Soft-STAPLE (exact and simplified): the derived M-steps against brute-force
objectives, the paper's literal M-step, reductions to STAPLE, the soft
pattern histogram, limits and degenerate inputs, the paper's protocol end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import bayesfuse
from bayesfuse import phantoms
from bayesfuse.data import RaterMaps
from bayesfuse.errors import InputError
from bayesfuse.models import soft_staple as ss
from bayesfuse.models import staple


# --------------------------------------------------------------------------
# brute-force objectives, written independently of the module
def l_soft(q, sens, spec, prior1, counts=None):
    """sum_t c_t sum_B q_t(B) log p(B): loops over all 2^P patterns."""
    p = q.shape[0]
    c = np.ones(q.shape[1]) if counts is None else counts
    total = 0.0
    for b in itertools.product([0, 1], repeat=p):
        b = np.array(b)
        q_b = np.prod(np.where(b[:, None] == 1, q, 1 - q), axis=0)
        p1 = prior1 * np.prod(np.where(b == 1, sens, 1 - sens))
        p0 = (1 - prior1) * np.prod(np.where(b == 1, 1 - spec, spec))
        total += np.sum(c * q_b) * np.log(p1 + p0)
    return total


def l_simple(q, sens, spec, prior1, counts=None):
    c = np.ones(q.shape[1]) if counts is None else counts
    f1 = q * sens[:, None] + (1 - q) * (1 - sens[:, None])
    f0 = q * (1 - spec[:, None]) + (1 - q) * spec[:, None]
    with np.errstate(divide="ignore"):  # a factor 0 under one class is fine
        return float(np.dot(c, np.logaddexp(np.log(prior1) + np.log(f1).sum(0), np.log1p(-prior1) + np.log(f0).sum(0))))


def grad_fd(fun, sens, spec, h=1e-6):
    out = []
    for which in (0, 1):
        for i in range(sens.size):
            a, b = [sens.copy(), spec.copy()], [sens.copy(), spec.copy()]
            a[which][i] += h
            b[which][i] -= h
            out.append((fun(*a) - fun(*b)) / (2 * h))
    return np.array(out)


def soft_maps(rng, shape=(14, 12, 10), p=4, quantised=False):
    """Soft maps around a ball: raters' own noisy versions of it."""
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grid))
    maps = []
    for i in range(p):
        edge = 0.6 + 0.08 * rng.standard_normal()
        m = 1 / (1 + np.exp((r - edge) / 0.08)) + 0.1 * rng.standard_normal(shape)
        m = np.clip(m, 0, 1)
        if quantised:
            m = np.where(m > 0.7, 1.0, np.where(m > 0.25, 0.3, 0.0))
        maps.append(m.astype(np.float32))
    return RaterMaps.from_arrays(maps, kind="probability")


def fitted(result):
    return (result.raters["sensitivity"].values, result.raters["specificity"].values,
            float(result.tree["variational"]["prior"].values[1]))


# --------------------------------------------------------------------------
# exact soft-STAPLE
def test_soft_histogram_and_posterior_against_brute_force():
    rng = np.random.default_rng(0)
    for p in (1, 2, 5):
        q = rng.random((p, 37))
        w = rng.random(37)
        hist = ss.soft_histogram(q, w)
        g = rng.random(2**p)
        post = ss.soft_posterior(q, g)
        for code, b in enumerate(ss.all_patterns(p).T):
            q_b = np.prod(np.where(b[:, None] == 1, q, 1 - q), axis=0)
            assert hist[code] == pytest.approx(np.dot(w, q_b), rel=1e-12)
        brute = sum(g[code] * np.prod(np.where(b[:, None] == 1, q, 1 - q), axis=0)
                    for code, b in enumerate(ss.all_patterns(p).T))
        np.testing.assert_allclose(post, brute, rtol=1e-12)


@pytest.mark.parametrize("quantised", [False, True])
def test_exact_objective_never_decreases_and_is_l_soft(quantised):
    data = soft_maps(np.random.default_rng(1), quantised=quantised)
    res = bayesfuse.fuse(data, "soft-staple", progress=False, tol=1e-14)
    obj = res.objective
    assert res.n_iter > 3
    assert np.all(np.diff(obj) >= -1e-9 * np.abs(obj[1:]))
    sens, spec, prior1 = fitted(res)
    q = data.foreground().reshape(data.n_raters, -1).astype(float)
    assert obj[-1] == pytest.approx(l_soft(q, sens, spec, prior1), rel=1e-10)
    assert bool(res.tree.attrs["compressed"]) == quantised


def test_exact_fixed_point_is_stationary_and_the_papers_is_not():
    data = soft_maps(np.random.default_rng(2), p=4)
    q = data.foreground().reshape(4, -1).astype(float)
    res = bayesfuse.fuse(data, "soft-staple", progress=False, tol=1e-15, prior="estimate")
    sens, spec, prior1 = fitted(res)
    # the prior is estimated too, so the full gradient includes d/dprior
    g_ours = grad_fd(lambda s, p: l_soft(q, s, p, prior1), sens, spec)
    assert np.max(np.abs(g_ours)) < 1e-3 * q.shape[1] ** 0.5
    # the paper's literal M-step, iterated to its own fixed point
    se, sp, pr = np.full(4, 0.8), np.full(4, 0.9), prior1
    for _ in range(2000):
        theta = staple.initial_theta(4, 2, 0.5, 0.5)
        theta[:, 1] = np.stack([1 - se, se], -1)
        theta[:, 0] = np.stack([sp, 1 - sp], -1)
        resp, _ = staple.e_step(ss.all_patterns(4), theta, np.array([1 - pr, pr]))
        w1 = ss.soft_posterior(q, resp[:, 1])
        new_se, new_sp = ss.m_step_paper(q, np.ones(q.shape[1]), w1)
        pr = w1.mean()
        if max(np.abs(new_se - se).max(), np.abs(new_sp - sp).max()) < 1e-13:
            break
        se, sp = new_se, new_sp
    g_paper = grad_fd(lambda s, p: l_soft(q, s, p, pr), se, sp)
    assert np.max(np.abs(g_paper)) > 100 * max(np.max(np.abs(g_ours)), 1e-3)
    assert l_soft(q, se, sp, pr) < l_soft(q, sens, spec, prior1) - 1.0
    # and the two M-steps really differ on soft data
    assert np.max(np.abs(se - sens)) > 1e-3


@pytest.mark.parametrize("method", ["soft-staple", "soft-staple-simplified"])
@pytest.mark.parametrize("options", [{}, {"prior": "estimate"}, {"init_sensitivity": 0.7, "init_specificity": 0.8},
                                     {"leave_out_unanimous": True}])
def test_hard_maps_give_staples_result(method, options):
    data, _ = staple.simulate(shape=(18, 20, 16), n_raters=5, random_seed=3)
    ref = bayesfuse.fuse(data, "staple", progress=False, **options)
    as_prob = RaterMaps.from_arrays(list(data.binary().astype(np.float32)), kind="probability")
    for d in (data, as_prob):
        res = bayesfuse.fuse(d, method, progress=False, **options)
        np.testing.assert_allclose(res.consensus.values, ref.consensus.values, atol=1e-7)
        np.testing.assert_allclose(res.raters["sensitivity"].values, ref.raters["sensitivity"].values, atol=1e-10)
        np.testing.assert_allclose(res.raters["specificity"].values, ref.raters["specificity"].values, atol=1e-10)


def test_patterns_and_voxels_give_the_same_result():
    data = soft_maps(np.random.default_rng(4), quantised=True, p=5)
    roi = np.zeros(data.shape, dtype=bool)
    roi[2:12, :, 1:9] = True
    for method in ("soft-staple", "soft-staple-simplified"):
        for opts in ({}, {"leave_out_unanimous": True}):
            a = bayesfuse.fuse(data, method, mask=roi, progress=False, **opts)
            b = bayesfuse.fuse(data, method, mask=roi, progress=False, max_levels=2, **opts)  # forces voxels
            assert a.tree.attrs["compressed"] == 1 and b.tree.attrs["compressed"] == 0
            np.testing.assert_allclose(a.consensus.values, b.consensus.values, atol=1e-6)
            np.testing.assert_allclose(a.raters["sensitivity"].values, b.raters["sensitivity"].values, atol=1e-9)
            assert np.all(a.consensus.values[~roi] == 0)


def test_exact_limit_on_raters_points_to_the_simplified_model():
    rng = np.random.default_rng(5)
    p = ss.MAX_EXACT_RATERS + 1
    soft = RaterMaps.from_arrays(list(rng.random((p, 6, 6, 4)).astype(np.float32)), kind="probability")
    with pytest.raises(InputError, match="soft-staple-simplified"):
        bayesfuse.fuse(soft, "soft-staple", progress=False)
    assert np.all(np.isfinite(bayesfuse.fuse(soft, "soft-staple-simplified", progress=False).consensus.values))
    # hard maps have no limit (the pattern count is the histogram)
    hard, _ = staple.simulate(shape=(10, 10, 10), n_raters=p, random_seed=6)
    res = bayesfuse.fuse(hard, "soft-staple", progress=False)
    ref = bayesfuse.fuse(hard, "staple", progress=False)
    np.testing.assert_allclose(res.consensus.values, ref.consensus.values, atol=1e-7)


# --------------------------------------------------------------------------
# simplified soft-STAPLE
def test_simplified_e_step_against_numpy():
    rng = np.random.default_rng(7)
    q = rng.random((6, 500)).astype(np.float32)
    q[:, :50] = np.round(q[:, :50])
    counts = rng.integers(0, 5, 500).astype(float)
    theta = staple.initial_theta(6, 2, 0.8, 0.9)
    theta[:, 1, 1] = rng.uniform(0.6, 0.95, 6)
    theta[:, 1, 0] = 1 - theta[:, 1, 1]
    prior = np.array([0.7, 0.3])
    post = np.zeros(500, dtype=np.float32)
    stats, cw, ll = ss.simplified_e_step(q, counts, theta, prior, posterior=post)
    qd = q.astype(float)
    se, sp = theta[:, 1, 1][:, None], theta[:, 0, 0][:, None]
    f1 = qd * se + (1 - qd) * (1 - se)
    f0 = qd * (1 - sp) + (1 - qd) * sp
    l1 = np.log(0.3) + np.log(f1).sum(0)
    l0 = np.log(0.7) + np.log(f0).sum(0)
    w1 = np.exp(l1 - np.logaddexp(l1, l0))
    np.testing.assert_allclose(post, w1, rtol=1e-6)
    assert ll == pytest.approx(np.dot(counts, np.logaddexp(l1, l0)), rel=1e-12)
    np.testing.assert_allclose(stats[:, 1, 1], ((counts * w1) * (qd * se / f1)).sum(1), rtol=1e-10)
    np.testing.assert_allclose(stats[:, 0, 0], ((counts * (1 - w1)) * ((1 - qd) * sp / f0)).sum(1), rtol=1e-10)
    np.testing.assert_allclose(cw, [np.dot(counts, 1 - w1), np.dot(counts, w1)], rtol=1e-12)


def test_simplified_products_do_not_underflow_with_many_raters():
    rng = np.random.default_rng(8)
    p = 300
    q = rng.random((p, 20)).astype(np.float32)
    theta = staple.initial_theta(p, 2, 0.6, 0.6)
    theta[:5, 1, 1], theta[:5, 1, 0] = 1e-200, 1 - 1e-200
    prior = np.array([0.5, 0.5])
    post = np.zeros(20, dtype=np.float32)
    _, _, ll = ss.simplified_e_step(q, None, theta, prior, posterior=post)
    qd = q.astype(float)
    se, sp = theta[:, 1, 1][:, None], theta[:, 0, 0][:, None]
    l1 = np.log(0.5) + np.log(qd * se + (1 - qd) * (1 - se)).sum(0)
    l0 = np.log(0.5) + np.log(qd * (1 - sp) + (1 - qd) * sp).sum(0)
    assert ll == pytest.approx(np.logaddexp(l1, l0).sum(), rel=1e-10)
    np.testing.assert_allclose(post, np.exp(l1 - np.logaddexp(l1, l0)), rtol=1e-5, atol=1e-30)


def confident_maps(rng, shape=(14, 12, 10), p=4, quantised=False):
    """Soft reports of raters who also make hard mistakes (flips), so that the
    simplified model's optimum is inside (0, 1)."""
    truth = np.zeros(shape, dtype=bool)
    truth[3:11, 2:10, 2:8] = True
    maps = []
    for i in range(p):
        y = truth ^ (rng.random(shape) < 0.08 + 0.03 * i)
        if quantised:
            m = np.where(y, 0.8, 0.2)
        else:
            m = np.where(y, rng.uniform(0.55, 1.0, shape), rng.uniform(0.0, 0.45, shape))
        maps.append(m.astype(np.float32))
    return RaterMaps.from_arrays(maps, kind="probability")


@pytest.mark.parametrize("quantised", [False, True])
def test_simplified_objective_never_decreases_and_gradient_vanishes(quantised):
    data = confident_maps(np.random.default_rng(9), quantised=quantised)
    # Beta(2, 2) priors keep the optimum inside (0, 1): with flat priors the
    # simplified model often calls every rater perfect (theta = 1) and lets
    # the soft values explain the disagreement
    beta = {"sensitivity_prior": (2.0, 2.0), "specificity_prior": (2.0, 2.0)}
    res = bayesfuse.fuse(data, "soft-staple-simplified", progress=False, tol=1e-15, max_iter=20000, **beta)
    obj = res.objective
    assert np.all(np.diff(obj) >= -1e-9 * np.abs(obj[1:]))
    q = data.foreground().reshape(data.n_raters, -1).astype(float)
    sens, spec, prior1 = fitted(res)
    assert np.all((sens > 0.5) & (sens < 0.999)) and np.all((spec > 0.5) & (spec < 0.999))

    def log_post(s, p):
        return l_simple(q, s, p, prior1) + np.sum(np.log(s) + np.log1p(-s) + np.log(p) + np.log1p(-p))

    g = grad_fd(log_post, sens, spec)
    assert np.max(np.abs(g)) < 1e-2
    # the objective is L_simple plus the log Beta(2, 2) densities (log 6 each)
    assert obj[-1] == pytest.approx(log_post(sens, spec) + 2 * q.shape[0] * np.log(6), rel=1e-10)
    # the paper's "M-step remains the same" is not a fixed point of L_simple
    w1 = np.zeros(q.shape[1], dtype=np.float32)
    ss.simplified_e_step(q, None, res.tree["raters"]["confusion"].values, np.array([1 - prior1, prior1]), posterior=w1)
    se_paper, _ = ss.m_step_paper(q, np.ones(q.shape[1]), w1.astype(float))
    assert np.max(np.abs(se_paper - sens)) > 0.02


def test_simplified_flat_prior_may_call_every_rater_perfect():
    data = confident_maps(np.random.default_rng(9), quantised=True)
    res = bayesfuse.fuse(data, "soft-staple-simplified", progress=False)
    assert np.all(np.isfinite(res.consensus.values))
    np.testing.assert_allclose(res.raters["sensitivity"].values, 1.0, atol=1e-6)


# --------------------------------------------------------------------------
# degenerate inputs
@pytest.mark.parametrize("method", ["soft-staple", "soft-staple-simplified"])
def test_degenerate_soft_inputs(method):
    data = soft_maps(np.random.default_rng(10))
    maps = data.maps.values.copy()
    maps[1] = 0.0
    res = bayesfuse.fuse(RaterMaps.from_arrays(list(maps), kind="probability"), method, progress=False)
    assert np.all(np.isfinite(res.consensus.values))
    assert res.raters["sensitivity"].values[1] == 0.0
    zero = np.zeros((3, 8, 8, 8), dtype=np.float32)
    with pytest.raises(InputError, match="nothing to fuse"):
        bayesfuse.fuse(RaterMaps.from_arrays(list(zero), kind="probability"), method, progress=False)
    with pytest.raises(InputError, match="at least 2"):
        ss.fit(RaterMaps.from_arrays([maps[0]], kind="probability", min_raters=1), progress=False)
    same = [maps[0], maps[0], maps[0]]
    res = bayesfuse.fuse(RaterMaps.from_arrays(same, kind="probability"), method, progress=False)
    assert np.all(np.isfinite(res.consensus.values))


def test_results_save_and_draw(tmp_path):
    data = soft_maps(np.random.default_rng(11), quantised=True)
    res = bayesfuse.fuse(data, "soft-staple", progress=False)
    res.save(tmp_path)
    back = bayesfuse.FusionResult.load(tmp_path)
    draws = back.posterior_draws(400, random_seed=1)["posterior"]
    assert draws["specificity"].shape == (1, 400, data.n_raters)
    assert ss.fixed_from_result(res)["prior"][1] == pytest.approx(float(res.tree["variational"]["prior"][1]))
    for col in ("sensitivity", "specificity", "confusion_1_1"):
        assert col in back.raters.columns


# --------------------------------------------------------------------------
def test_soft_phantom_compresses_and_differs_from_staple():
    ph = phantoms.make_phantom("soft", shape=(40, 40, 32), n_raters=5, random_seed=12)
    levels = np.unique(ph.raters.maps.values)
    assert levels.size <= 3
    res = bayesfuse.fuse(ph.raters, "soft-staple", progress=False)
    assert res.tree.attrs["compressed"] == 1
    w = res.consensus.values
    assert np.any((w > 0.05) & (w < 0.95))
    maps = ph.raters.maps.values
    hard = bayesfuse.fuse(RaterMaps.from_arrays(list((maps == 1).astype(np.uint8))), "staple", progress=False)
    # outside every hard mask but on some rater's soft ring, STAPLE on the
    # hard masks sees unanimous background; soft-STAPLE keeps the ring's evidence
    ring = np.all(maps < 1, axis=0) & np.any(maps > 0, axis=0)
    assert ring.sum() >= 5
    assert np.all(w[ring] > 10 * hard.consensus.values[ring])


@pytest.mark.data
def test_cli_soft_staple_with_soft_dilation_on_liver(liver_files, tmp_path):
    """The paper's protocol end to end: soft masks by conditional dilation on
    the CT, then exact soft-STAPLE (the issue's command)."""
    from bayesfuse.cli import main

    out = tmp_path / "out"
    code = main(["fuse", "--method", "soft-staple", "--image", str(liver_files["image"]), "--to-prob", "soft-dilation",
                 *map(str, liver_files["raters"]), "--out", str(out), "--quiet"])
    assert code == 0
    res = bayesfuse.FusionResult.load(out)
    assert res.method == "soft-staple" and res.tree.attrs["compressed"] == 1
    w = res.consensus.values
    assert np.all(np.isfinite(w))
    # soft values on the ring, certainty inside
    assert np.count_nonzero((w > 0.05) & (w < 0.95)) > 100
    assert np.count_nonzero(w > 0.99) > 1000
    import pandas as pd

    table = pd.read_csv(out / "raters.csv", index_col=0)
    assert table["sensitivity"].between(0.5, 1).all()
