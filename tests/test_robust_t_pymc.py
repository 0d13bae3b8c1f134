"""The PyMC form of the robust model: log-densities against scipy, draws from q, NUTS against VB."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bayesfuse import gaussian as G
from bayesfuse.models import robust_t as R


@pytest.fixture(scope="module")
def small():
    cfg = R.Config(basis_spacing=4.0)
    data, _ = R.simulate(cfg, (8, 8), 3, random_seed=3)
    res = R.fit(data, cfg, max_iter=400, tol=1e-10, progress=False)
    return cfg, data, res


def _reference_logp(cfg, data, fixed, T, b, tau, W):
    """log p(D~, T~, b, tau, W) of (eq:rt-model) written with scipy."""
    kd = G.prepare(data, cfg.link)
    Dt = kd.coords()  # (P, N, D)
    P, N, D = Dt.shape
    Sigma, nu = fixed["Sigma"], fixed["nu"]
    Tf = T.reshape(N, D)
    val = 0.0
    for p in range(P):
        for n in range(N):
            val += stats.multivariate_normal.logpdf(Dt[p, n], Tf[n] + b[p], Sigma[p] / tau.reshape(P, N)[p, n])
    val += stats.gamma.logpdf(tau, nu.reshape(-1, 1, 1) / 2, scale=2 / nu.reshape(-1, 1, 1)).sum()
    val += stats.norm.logpdf(b, 0, 1 / np.sqrt(fixed["beta"])).sum()
    basis = R.KroneckerBasis.create(data.shape, cfg.basis_spacing)
    mean = W.reshape(D, -1) @ basis.dense().T + fixed["m"][:, None]
    val += stats.norm.logpdf(Tf.T, mean, np.sqrt(fixed["sigma_T"])).sum()
    val += stats.norm.logpdf(W, 0, 1 / np.sqrt(fixed["alpha"])).sum()
    return val


def test_explicit_model_logp_equals_scipy(small):
    cfg, data, res = small
    fixed = R.fixed_from_result(res)
    assert np.abs(fixed["m"]).max() > 0.1  # the spatial prior's mean enters the reference below
    model = R.build_model(data, cfg, "fixed", fixed)
    assert {v.name for v in model.free_RVs} == {"T", "b", "tau", "W"}
    assert model.named_vars_to_dims["tau"] == ("rater", "x", "y")
    assert model.named_vars_to_dims["T"] == ("x", "y", "class")
    rng = np.random.default_rng(0)
    point = model.initial_point()
    T = rng.normal(0.6, 0.2, size=point["T"].shape)
    b = rng.normal(0, 0.05, size=point["b"].shape)
    tau = rng.gamma(2.0, 0.5, size=point["tau_log__"].shape)
    W = rng.normal(0, 0.5, size=point["W"].shape)
    point.update(T=T, b=b, tau_log__=np.log(tau), W=W)
    logp = model.compile_logp(jacobian=False)(point)
    assert logp == pytest.approx(_reference_logp(cfg, data, fixed, T, b, tau, W), rel=1e-9)


def test_marginal_student_t_logp_equals_scipy(small):
    cfg, data, res = small
    fixed = R.fixed_from_result(res)
    model = R.build_model(data, cfg, "fixed", fixed, tau="marginal")
    assert "tau" not in {v.name for v in model.free_RVs}
    point = model.initial_point()
    rng = np.random.default_rng(1)
    T = rng.normal(0.6, 0.2, size=point["T"].shape)
    point["T"] = T
    fn = model.compile_fn(model.logp(vars=model.observed_RVs, jacobian=False), inputs=[model.rvs_to_values[model["T"]], model.rvs_to_values[model["b"]]], point_fn=False)
    logp_obs = fn(T, point["b"])
    Dt = G.prepare(data, cfg.link).coords()
    b = point["b"]
    Tf = T.reshape(-1, 2)
    ref = sum(
        stats.multivariate_t.logpdf(Dt[p, n], Tf[n] + b[p], fixed["Sigma"][p], df=fixed["nu"][p])
        for p in range(Dt.shape[0])
        for n in range(Dt.shape[1])
    )
    assert logp_obs == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("likelihood", ["student-t", "gaussian"])
def test_mean_split_bias_is_the_same_posterior(small, likelihood):
    """bias_form="mean-split" (T~ = V - sum_p A_p b_p, b = b_mean + b_dev) is a change of
    variables with a constant Jacobian: its log density differs from the per-rater
    form's by one constant at every point, and T, b are deterministics of the same dims."""
    from dataclasses import replace

    import pytensor.tensor as pt

    cfg, data, res = small
    cfg = replace(cfg, likelihood=likelihood)
    fixed = R.fixed_from_result(R.fit(data, cfg, progress=False))
    m0 = R.build_model(data, cfg, "fixed", fixed)
    m1 = R.build_model(data, cfg, "fixed", fixed, bias_form="mean-split")
    assert {v.name for v in m1.free_RVs} >= {"V", "b_mean", "b_dev", "W"}
    for v in ("T", "b"):
        assert m1.named_vars_to_dims[v] == m0.named_vars_to_dims[v]
    f0, f1 = m0.compile_logp(), m1.compile_logp()
    bdev = m1["b_dev"]
    to_value = m1.rvs_to_transforms[bdev]
    rng = np.random.default_rng(2)
    diffs = []
    for _ in range(3):
        p0, p1 = m0.initial_point(), m1.initial_point()
        T = rng.normal(0.6, 0.2, size=p0["T"].shape)
        b = rng.normal(0, 0.05, size=p0["b"].shape)
        W = rng.normal(0, 0.5, size=p0["W"].shape)
        p0.update(T=T, b=b, W=W)
        bm = b.mean(axis=0)
        A = R.bias_weights(fixed["Sigma"])
        np.testing.assert_allclose(A.sum(axis=0), np.eye(2), atol=1e-12)
        p1.update(V=T + np.einsum("pij,pj->i", A, b), b_mean=bm, W=W)
        p1["b_dev_zerosum__"] = to_value.forward(pt.as_tensor((b - bm).T), *bdev.owner.inputs).eval()
        if "tau_log__" in p0:
            p0["tau_log__"] = p1["tau_log__"] = rng.normal(0, 0.5, size=p0["tau_log__"].shape)
        diffs.append(float(f0(p0)) - float(f1(p1)))
        # the deterministics give back T and b
        outs = m1.replace_rvs_by_values([m1["T"], m1["b"]])
        fn = m1.compile_fn(outs, inputs=m1.value_vars, on_unused_input="ignore", point_fn=False)
        got = fn(*[p1[v.name] for v in m1.value_vars])
        np.testing.assert_allclose(got[0], T, atol=1e-12)
        np.testing.assert_allclose(got[1], b, atol=1e-12)
    assert np.ptp(diffs) < 1e-8 * max(1.0, abs(diffs[0]))
    with pytest.raises(R.ConfigError):
        R.build_model(data, replace(cfg, bias="none"), "fixed", fixed, bias_form="mean-split")

    # whitened (W, b_mean): z_k = R' (W_k, b_mean_k) with R R' their conditional precision
    m2 = R.build_model(data, cfg, "fixed", fixed, bias_form="mean-split", whiten=True)
    assert {v.name for v in m2.free_RVs} >= {"V", "Wb_white", "b_dev"} and "W" not in {v.name for v in m2.free_RVs}
    assert m2.named_vars_to_dims["W"] == m0.named_vars_to_dims["W"]
    basis = R.KroneckerBasis.create(data.shape, cfg.basis_spacing)
    G1 = np.hstack([basis.dense(), np.ones((int(np.prod(data.shape)), 1))])
    P = data.n_raters
    prec = np.diag(np.r_[np.full(basis.n_basis, fixed["alpha"]), P * fixed["beta"]]) + G1.T @ G1 / fixed["sigma_T"]
    Rc = np.linalg.cholesky(prec)
    f2 = m2.compile_logp()
    outs = m2.replace_rvs_by_values([m2["W"], m2["b_mean"]])
    fw = m2.compile_fn(outs, inputs=m2.value_vars, on_unused_input="ignore", point_fn=False)
    diffs2 = []
    for _ in range(3):
        p1 = m1.initial_point()
        p1.update({k: rng.normal(0, 0.1, size=np.shape(v)) for k, v in p1.items()})
        p2 = {k: v for k, v in p1.items() if k in {v_.name for v_ in m2.value_vars}}
        theta = np.hstack([p1["W"].reshape(2, -1), p1["b_mean"][:, None]])  # (D, L + 1)
        p2["Wb_white"] = theta @ Rc
        got = fw(*[p2[v.name] for v in m2.value_vars])
        np.testing.assert_allclose(got[0], p1["W"], atol=1e-10)
        np.testing.assert_allclose(got[1], p1["b_mean"], atol=1e-10)
        diffs2.append(float(f1(p1)) - float(f2(p2)))
    assert np.ptp(diffs2) < 1e-8 * max(1.0, abs(diffs2[0]))


def test_ml_bias_gauge_sums_to_zero_over_raters(small):
    """continuous STAPLE under hyper="prior": the ML biases' weak prior fixes their
    common shift by a zero sum over the raters (not over the link coordinates)."""
    import pymc as pm

    _, data, _ = small
    cfg = R.Config(likelihood="gaussian", bias="ml", spatial_prior=False)
    model = R.build_model(data, cfg, "prior")
    b = pm.draw(model["b"], draws=3, random_seed=0)  # (3, rater, class)
    assert b.shape[1:] == (data.n_raters, 2)
    np.testing.assert_allclose(b.sum(axis=1), 0.0, atol=1e-9)
    assert np.abs(b.sum(axis=2)).max() > 1e-3


def test_posterior_draws_follow_q_with_the_model_names(small):
    cfg, data, res = small
    post = R.posterior_draws(res, n=4000, random_seed=0)["posterior"]
    model = R.build_model(data, cfg, "fixed", R.fixed_from_result(res))
    for v in ("T", "b", "tau", "W"):
        assert post[v].dims == ("chain", "draw") + model.named_vars_to_dims[v]
    var = res.group("variational")
    mu = var["mu_T"].transpose("x", "y", "class").values
    sd = np.sqrt(np.diagonal(var["S_T"].values, axis1=-2, axis2=-1))
    np.testing.assert_allclose(post["T"].mean(("chain", "draw")).values, mu, atol=5 * sd.max() / np.sqrt(4000))
    np.testing.assert_allclose(post["T"].std(("chain", "draw")).values, sd, rtol=0.06)
    np.testing.assert_allclose(post["tau"].mean(("chain", "draw")).values, var["tau_mean"].values, rtol=0.08)
    # a region keeps only its voxels
    sub = R.posterior_draws(res, n=10, region={"x": slice(2, 5)}, random_seed=0)["posterior"]
    assert sub["T"].sizes["x"] == 3 and sub["tau"].sizes["x"] == 3


@pytest.mark.nuts
def test_nuts_agrees_with_vb_on_a_small_problem(small):
    """NUTS on the exact posterior (hyperparameters pinned at the VB's) against q."""
    import arviz_stats as azs
    import nutpie

    cfg, data, res = small
    model = R.build_model(data, cfg, "fixed", R.fixed_from_result(res))
    compiled = nutpie.compile_pymc_model(model)
    tree = nutpie.sample(compiled, draws=400, tune=400, chains=2, seed=7, progress_bar=False)
    post = tree["posterior"]
    diverging = int(tree["sample_stats"]["diverging"].sum())
    assert diverging <= 8  # of 800 draws
    rhat = azs.rhat(tree, var_names=["T", "b"])
    assert float(max(rhat[v].max() for v in rhat.data_vars)) < 1.05
    var = res.group("variational")
    mu_vb = var["mu_T"].transpose("x", "y", "class").values
    mean_nuts = post["T"].mean(("chain", "draw")).values
    sd_nuts = post["T"].std(("chain", "draw")).values
    # the consensus: VB means within a fraction of the posterior sd of NUTS
    assert np.mean(np.abs(mean_nuts - mu_vb) / sd_nuts) < 0.35
    # local reliabilities: the VB's E[tau] ranks the voxels as the posterior does
    tau_nuts = post["tau"].mean(("chain", "draw")).values.ravel()
    assert np.corrcoef(tau_nuts, var["tau_mean"].values.ravel())[0, 1] > 0.8
    # mean-field VB is known to under-state the spread of T~ (it drops the
    # correlation with b and tau); it must not over-state it
    sd_vb = np.sqrt(np.diagonal(var["S_T"].values, axis1=-2, axis2=-1))
    assert np.median(sd_vb / sd_nuts) < 1.1
