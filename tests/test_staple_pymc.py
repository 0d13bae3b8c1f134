"""The STAPLE family's PyMC models against the EM solvers: log densities,
MAP = EM fixed point with flat priors, NUTS on small downsampled cases."""

from __future__ import annotations

import numpy as np
import pytest

import bayesfuse
from bayesfuse import phantoms
from bayesfuse.data import RaterMaps
from bayesfuse.models import soft_staple as ss
from bayesfuse.models import staple

pm = pytest.importorskip("pymc")


def to_value_space(model, values: dict) -> dict:
    """A point of the model's value variables (transformed) from natural values."""
    point = {}
    for rv in model.free_RVs:
        value_var = model.rvs_to_values[rv]
        tr = model.rvs_to_transforms.get(rv)
        x = np.asarray(values[rv.name], dtype=float)
        point[value_var.name] = tr.forward(x, *rv.owner.inputs).eval() if tr is not None else x
    return point


def theta_from(sens, spec):
    return np.stack([np.stack([spec, 1 - spec], -1), np.stack([1 - sens, sens], -1)], axis=1)


def soft_case(seed=0, shape=(12, 12, 10), p=4, quantised=False, confidence=0.55):
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, dtype=bool)
    truth[2:9, 3:10, 2:8] = True
    maps = []
    for i in range(p):
        y = truth ^ (rng.random(shape) < 0.06 + 0.03 * i)
        m = np.where(y, rng.uniform(confidence, 1.0, shape), rng.uniform(0.0, 1.0 - confidence, shape))
        if quantised:
            m = np.where(m > 0.75, 1.0, np.where(m > 0.4, 0.5, 0.0))
        maps.append(m.astype(np.float32))
    return RaterMaps.from_arrays(maps, kind="probability")


# --------------------------------------------------------------------------
def test_staple_log_density_is_the_em_objective():
    rng = np.random.default_rng(0)
    data, _ = staple.simulate(shape=(14, 14, 14), n_raters=4, random_seed=1)
    cfg = staple.Config(sensitivity_prior=(2.0, 1.5), specificity_prior=(3.0, 1.2))
    model = staple.build_model(data, cfg)
    logp = model.compile_logp(jacobian=False)
    pd = staple.pattern_data(data, cfg)
    prior = staple.class_prior(cfg, pd, "test")
    alpha = staple.concentration(cfg, 2)
    for _ in range(3):
        sens, spec = rng.uniform(0.5, 0.99, 4), rng.uniform(0.5, 0.99, 4)
        theta = theta_from(sens, spec)
        _, logz = staple.e_step(pd.values, theta, prior)
        ours = staple.log_posterior(pd.counts, logz, theta, alpha)
        assert logp(to_value_space(model, {"sensitivity": sens, "specificity": spec})) == pytest.approx(ours, rel=1e-10)


def test_multi_staple_log_density_is_the_em_objective():
    rng = np.random.default_rng(1)
    data, _ = staple.simulate(shape=(12, 12, 12), n_raters=3, random_seed=2, n_classes=3)
    cfg = staple.Config(mode="multi", confusion_prior=1.5)
    model = staple.build_model(data, cfg)
    logp = model.compile_logp(jacobian=False)
    pd = staple.pattern_data(data, cfg)
    prior = staple.class_prior(cfg, pd, "test")
    theta = rng.dirichlet(np.ones(3) * 3, size=(3, 3))
    _, logz = staple.e_step(pd.values, theta, prior)
    ours = staple.log_posterior(pd.counts, logz, theta, staple.concentration(cfg, 3))
    assert logp(to_value_space(model, {"confusion": theta})) == pytest.approx(ours, rel=1e-10)


@pytest.mark.parametrize("model_name", ["exact", "simplified"])
def test_soft_log_density_is_the_em_objective(model_name):
    rng = np.random.default_rng(2)
    data = soft_case(3)
    cfg = ss.Config(model=model_name, sensitivity_prior=(2.0, 2.0))
    model = ss.build_model(data, cfg)
    logp = model.compile_logp(jacobian=False)
    q = data.foreground().reshape(4, -1).astype(float)
    prior1 = float(q.mean())
    sens, spec = rng.uniform(0.6, 0.95, 4), rng.uniform(0.6, 0.95, 4)
    if model_name == "exact":
        hist = ss.soft_histogram(q)
        _, logz = staple.e_step(ss.all_patterns(4), theta_from(sens, spec), np.array([1 - prior1, prior1]))
        data_term = float(np.dot(hist, logz))
    else:
        _, _, data_term = ss.simplified_e_step(q, None, theta_from(sens, spec), np.array([1 - prior1, prior1]))
    ours = data_term + staple.log_dirichlet(theta_from(sens, spec), ss._alpha(cfg))
    assert logp(to_value_space(model, {"sensitivity": sens, "specificity": spec})) == pytest.approx(ours, rel=1e-9)


# --------------------------------------------------------------------------
def map_estimate(model):
    point = pm.find_MAP(model=model, return_inferencedata=False, jitter=False, progressbar=False,
                        maxiter=5000)
    return np.asarray(point["sensitivity"]), np.asarray(point["specificity"])


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("method", ["staple", "soft-staple", "soft-staple-simplified"])
def test_map_equals_the_em_fixed_point_with_flat_priors(method):
    if method == "staple":
        data, _ = staple.simulate(shape=(16, 16, 16), n_raters=4, random_seed=3)
        mod = staple
    else:
        # confident soft reports of raters who also err: an interior optimum
        # of the simplified model under flat priors
        data = soft_case(4, quantised=method == "soft-staple", confidence=0.9 if method == "soft-staple-simplified" else 0.55)
        mod = ss
    res = bayesfuse.fuse(data, method, progress=False, tol=1e-15)
    sens, spec = res.raters["sensitivity"].values, res.raters["specificity"].values
    if method == "soft-staple-simplified":
        assert np.all(sens < 0.999) and np.all(spec < 0.999), "the test needs an interior optimum"
    config = bayesfuse.get_model(method).config()
    model = mod.build_model(data, config, "fixed", mod.fixed_from_result(res))
    map_sens, map_spec = map_estimate(model)
    np.testing.assert_allclose(map_sens, sens, atol=1e-3)
    np.testing.assert_allclose(map_spec, spec, atol=1e-3)


# --------------------------------------------------------------------------
def nuts(model, seed):
    nutpie = pytest.importorskip("nutpie")
    compiled = nutpie.compile_pymc_model(model)
    return nutpie.sample(compiled, draws=500, tune=500, chains=4, cores=2, seed=seed, progress_bar=False)


def check_nuts_against_em(trace, result, laplace_ratio=None):
    import arviz as az

    post = trace["posterior"]
    assert int(trace["sample_stats"]["diverging"].sum()) == 0
    rhat = az.rhat(trace, var_names=["sensitivity", "specificity"])
    ess = az.ess(trace, var_names=["sensitivity", "specificity"])
    for name in ("sensitivity", "specificity"):
        assert float(rhat[name].max()) < 1.01
        assert float(ess[name].min()) > 400
        draws = post[name].values.reshape(-1, post[name].shape[-1])
        em = result.raters[name].values
        lo, hi = np.quantile(draws, [0.005, 0.995], axis=0)
        assert np.all((lo <= em) & (em <= hi)), (name, lo, em, hi)
        if laplace_ratio is not None:
            lap = result.posterior_draws(4000, random_seed=0)["posterior"][name].values.reshape(4000, -1)
            ratio = lap.std(axis=0) / draws.std(axis=0)
            assert np.all((ratio > 1 / laplace_ratio) & (ratio < laplace_ratio)), (name, ratio)


@pytest.mark.nuts
def test_nuts_covers_staple_em_on_a_downsampled_case():
    data, _ = staple.simulate(shape=(40, 40, 40), n_raters=4, random_seed=5,
                              sensitivity=[0.8, 0.7, 0.9, 0.75], specificity=[0.9, 0.95, 0.85, 0.92])
    small = RaterMaps.from_arrays(list(data.binary()[:, ::3, ::3, ::3]))
    res = bayesfuse.fuse(small, "staple", progress=False, tol=1e-14)
    model = staple.build_model(small, None, "fixed", staple.fixed_from_result(res))
    check_nuts_against_em(nuts(model, 1), res, laplace_ratio=1.25)


@pytest.mark.nuts
@pytest.mark.parametrize("method", ["soft-staple", "soft-staple-simplified"])
def test_nuts_covers_soft_em_on_a_downsampled_phantom(method):
    ph = phantoms.make_phantom("probability", shape=(48, 48, 40), n_raters=4, random_seed=6)
    maps = ph.raters.maps.values[:, ::3, ::3, ::3]
    small = RaterMaps.from_arrays(list(maps), kind="probability")
    simplified = method == "soft-staple-simplified"
    options = {"sensitivity_prior": (2.0, 2.0), "specificity_prior": (2.0, 2.0)} if simplified else {}
    res = bayesfuse.fuse(small, method, progress=False, tol=1e-14, **options)
    config = bayesfuse.get_model(method).config(**options)
    model = ss.build_model(small, config, "fixed", ss.fixed_from_result(res))
    # near theta = 1 the simplified model's posterior is skewed: the Laplace
    # standard deviations come out about 1.4-1.6 times NUTS's (card)
    check_nuts_against_em(nuts(model, 2), res, laplace_ratio=1.8 if simplified else 1.25)
