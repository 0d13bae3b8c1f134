"""STAPLE and multi-label STAPLE: updates against brute force, EM properties,
parity with SimpleITK's STAPLEImageFilter, degenerate inputs, options."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import minimize

import bayesfuse
from bayesfuse import phantoms
from bayesfuse.data import RaterMaps
from bayesfuse.errors import ConfigError, InputError
from bayesfuse.models import staple

sitk = pytest.importorskip("SimpleITK")


# --------------------------------------------------------------------------
# helpers
def sitk_staple(masks: np.ndarray, confidence_weight: float = 1.0):
    """SimpleITK's STAPLE on 0/1 masks (P, *spatial): (consensus, sens, spec)."""
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1)
    f.SetConfidenceWeight(confidence_weight)
    out = f.Execute([sitk.GetImageFromArray(np.ascontiguousarray(m)) for m in masks])
    return sitk.GetArrayFromImage(out), np.array(f.GetSensitivity()), np.array(f.GetSpecificity())


def assert_parity(result, masks, confidence_weight=1.0):
    w, se, sp = sitk_staple(masks, confidence_weight)
    assert np.all(np.isfinite(w))
    assert np.max(np.abs(result.consensus.values - w)) <= 1e-4
    assert np.max(np.abs(result.raters["sensitivity"].values - se)) <= 1e-4
    assert np.max(np.abs(result.raters["specificity"].values - sp)) <= 1e-4


def random_patterns(rng, p, k, n):
    values = rng.integers(0, k, size=(p, n))
    counts = rng.integers(1, 50, size=n).astype(float)
    theta = rng.dirichlet(np.ones(k) * 2, size=(p, k))
    prior = rng.dirichlet(np.ones(k) * 3)
    return values, counts, theta, prior


# --------------------------------------------------------------------------
# update functions
def test_e_step_is_bayes_rule():
    rng = np.random.default_rng(0)
    values, counts, theta, prior = random_patterns(rng, 4, 3, 30)
    resp, logz = staple.e_step(values, theta, prior)
    for j in range(values.shape[1]):
        joint = np.array([prior[a] * np.prod([theta[i, a, values[i, j]] for i in range(4)]) for a in range(3)])
        np.testing.assert_allclose(resp[j], joint / joint.sum(), rtol=1e-12)
        np.testing.assert_allclose(logz[j], np.log(joint.sum()), rtol=1e-12)


@pytest.mark.parametrize("alpha_value", [1.0, 2.5])
def test_m_step_maximises_the_bound_over_the_simplex(alpha_value):
    rng = np.random.default_rng(1)
    k = 3
    stats = rng.random((2, k, k)) * 20
    alpha = np.full((k, k), alpha_value)
    theta = staple.m_step_theta(stats, alpha)
    for i in range(2):
        for a in range(k):
            def neg(z, i=i, a=a):
                t = np.exp(z - z.max())
                t /= t.sum()
                return -np.sum((stats[i, a] + alpha[a] - 1) * np.log(t))
            best = minimize(neg, np.zeros(k), method="BFGS", options={"gtol": 1e-10})
            t = np.exp(best.x - best.x.max())
            np.testing.assert_allclose(theta[i, a], t / t.sum(), atol=1e-6)


def test_m_step_keeps_a_row_without_weight():
    stats = np.zeros((1, 2, 2))
    stats[0, 0] = [5.0, 1.0]
    prev = np.array([[[0.9, 0.1], [0.3, 0.7]]])
    theta = staple.m_step_theta(stats, np.ones((2, 2)), prev)
    np.testing.assert_allclose(theta[0, 1], prev[0, 1])
    np.testing.assert_allclose(theta[0, 0], [5 / 6, 1 / 6])


@pytest.mark.parametrize("options", [
    {},
    {"prior": "estimate"},
    {"sensitivity_prior": (3.0, 2.0), "specificity_prior": (5.0, 1.5)},
    {"init_sensitivity": 0.6, "init_specificity": 0.7},
    {"mode": "multi"},
    {"mode": "multi", "prior": "estimate", "confusion_prior": 2.0},
])
def test_objective_never_decreases(options):
    n_classes = 3 if options.get("mode") == "multi" else 2
    data, _ = staple.simulate(shape=(20, 22, 18), n_raters=5, random_seed=4, n_classes=n_classes)
    cfg = staple.Config(**options)
    res = staple.fit(data, cfg, progress=False, tol=1e-14)
    obj = res.objective
    # from the second iteration on (the first starts from the vote, not an E-step)
    assert np.all(np.diff(obj) >= -1e-9 * np.abs(obj[1:]))
    assert res.n_iter > 3


def test_gradient_vanishes_at_convergence():
    data, _ = staple.simulate(shape=(24, 24, 24), n_raters=4, random_seed=5)
    cfg = staple.Config(sensitivity_prior=(2.0, 2.0))
    res = staple.fit(data, cfg, progress=False, tol=1e-15)
    pd = staple.pattern_data(data, cfg)
    prior = res.tree["variational"]["prior"].values
    alpha = staple.concentration(cfg, 2)

    def objective(sens, spec):
        theta = np.stack([np.stack([spec, 1 - spec], -1), np.stack([1 - sens, sens], -1)], axis=1)
        _, logz = staple.e_step(pd.values, theta, prior)
        return staple.log_posterior(pd.counts, logz, theta, alpha)

    sens, spec = res.raters["sensitivity"].values, res.raters["specificity"].values
    f0 = objective(sens, spec)
    h = 1e-6
    for i in range(4):
        for which in ("sens", "spec"):
            s2, p2 = sens.copy(), spec.copy()
            (s2 if which == "sens" else p2)[i] += h
            s3, p3 = sens.copy(), spec.copy()
            (s3 if which == "sens" else p3)[i] -= h
            grad = (objective(s2, p2) - objective(s3, p3)) / (2 * h)
            # the objective is a sum over ~14000 voxels: a gradient of 1e-2 is ~0
            assert abs(grad) < 1e-2, (which, i, grad, f0)


def test_information_matches_finite_differences():
    rng = np.random.default_rng(6)
    p = 3
    q = rng.random((p, 40))
    q[:, :10] = np.round(q[:, :10])
    counts = rng.integers(1, 20, 40).astype(float)
    sens, spec, prior1 = rng.uniform(0.6, 0.9, p), rng.uniform(0.7, 0.95, p), 0.3

    def loglik(params):
        se, sp = params[:p, None], params[p:, None]
        f1 = q * se + (1 - q) * (1 - se)
        f0 = q * (1 - sp) + (1 - q) * sp
        l1 = np.log(prior1) + np.log(f1).sum(0)
        l0 = np.log1p(-prior1) + np.log(f0).sum(0)
        return float(np.dot(counts, np.logaddexp(l1, l0))
                     + np.sum(np.log(params[:p]) + 2 * np.log1p(-params[p:])))  # Beta(2,1), Beta(1,3)

    grad, info = staple.binary_information(q, counts, sens, spec, prior1, (2.0, 1.0), (1.0, 3.0))
    x = np.concatenate([sens, spec])
    h = 1e-5
    num_grad = np.array([(loglik(x + h * e) - loglik(x - h * e)) / (2 * h) for e in np.eye(2 * p)])
    np.testing.assert_allclose(grad, num_grad, rtol=1e-6, atol=1e-6)
    num_hess = np.array([[(loglik(x + h * a + h * b) - loglik(x + h * a - h * b) - loglik(x - h * a + h * b)
                           + loglik(x - h * a - h * b)) / (4 * h * h) for b in np.eye(2 * p)] for a in np.eye(2 * p)])
    np.testing.assert_allclose(-info, num_hess, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------
# parity with SimpleITK (configured alike: vote start, raters' prior,
# ITK's stopping rule on the parameters)
ITK_LIKE = {"criterion": "theta"}


@pytest.mark.parametrize("kind,seed", [("simple", 0), ("outlier", 1)])
def test_parity_with_simpleitk_on_phantoms(kind, seed):
    ph = phantoms.make_phantom(kind, shape=(48, 52, 40), n_raters=5, random_seed=seed)
    res = bayesfuse.fuse(ph.raters, "staple", progress=False, **ITK_LIKE)
    assert_parity(res, ph.raters.binary())


def test_parity_with_simpleitk_on_model_data_and_confidence_weight():
    data, _ = staple.simulate(shape=(30, 34, 26), n_raters=6, random_seed=7)
    assert_parity(bayesfuse.fuse(data, "staple", progress=False, **ITK_LIKE), data.binary())
    res = bayesfuse.fuse(data, "staple", progress=False, confidence_weight=1.3, **ITK_LIKE)
    assert_parity(res, data.binary(), confidence_weight=1.3)


@pytest.mark.data
def test_parity_with_simpleitk_on_liver_tumour(liver_files):
    res = bayesfuse.fuse([str(p) for p in liver_files["raters"]], "staple", progress=False, **ITK_LIKE)
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1)
    out = f.Execute([sitk.ReadImage(str(p)) for p in liver_files["raters"]])
    # SimpleITK arrays are (z, y, x); nibabel's (x, y, z)
    w = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    assert np.max(np.abs(res.consensus.values - w)) <= 1e-4
    np.testing.assert_allclose(res.raters["sensitivity"].values, f.GetSensitivity(), atol=1e-4)
    np.testing.assert_allclose(res.raters["specificity"].values, f.GetSpecificity(), atol=1e-4)


# --------------------------------------------------------------------------
# reductions and options
def test_multi_staple_with_two_classes_is_staple():
    data, _ = staple.simulate(shape=(22, 20, 24), n_raters=5, random_seed=8)
    a = bayesfuse.fuse(data, "staple", progress=False)
    b = bayesfuse.fuse(data, "multi-staple", progress=False)
    np.testing.assert_allclose(b.consensus.values, a.consensus.values, atol=1e-7)
    np.testing.assert_allclose(b.raters["sensitivity"].values, a.raters["sensitivity"].values, atol=1e-12)
    np.testing.assert_allclose(b.raters["specificity"].values, a.raters["specificity"].values, atol=1e-12)
    assert a.n_iter == b.n_iter


def test_multi_staple_recovers_confusion_of_simulated_raters():
    sens = np.array([0.9, 0.8, 0.85, 0.7, 0.95])
    spec = np.array([0.95, 0.9, 0.97, 0.85, 0.99])
    data, truth = staple.simulate(shape=(40, 40, 40), n_raters=5, random_seed=9, n_classes=3,
                                  sensitivity=sens, specificity=spec)
    res = bayesfuse.fuse(data, "multi-staple", progress=False)
    conf = res.tree["raters"]["confusion"].values
    np.testing.assert_allclose(conf[:, 0, 0], spec, atol=0.02)
    np.testing.assert_allclose(conf[:, 1, 1], sens, atol=0.03)
    np.testing.assert_allclose(conf[:, 2, 2], sens, atol=0.03)
    assert np.mean(res.labels.values == truth["truth"]) > 0.99


def test_region_of_interest_equals_fusing_the_cropped_volume():
    data, _ = staple.simulate(shape=(30, 30, 30), n_raters=4, random_seed=10)
    roi = np.zeros(data.shape, dtype=bool)
    roi[5:25, 3:20, 8:30] = True
    inside = RaterMaps.from_arrays(list(data.binary()[:, 5:25, 3:20, 8:30]))
    masked = bayesfuse.fuse(data, "staple", mask=roi, progress=False)
    cropped = bayesfuse.fuse(inside, "staple", progress=False)
    np.testing.assert_allclose(masked.consensus.values[5:25, 3:20, 8:30], cropped.consensus.values, atol=1e-7)
    np.testing.assert_allclose(masked.raters["sensitivity"].values, cropped.raters["sensitivity"].values, atol=1e-12)
    outside = masked.consensus.values[~roi]
    assert np.all(outside == 0) and np.all(masked.labels.values[~roi] == 0)


def test_leave_out_unanimous_uses_only_disagreement_voxels():
    data, _ = staple.simulate(shape=(26, 26, 26), n_raters=4, random_seed=11)
    cfg = staple.Config(leave_out_unanimous=True)
    res = staple.fit(data, cfg, progress=False)
    masks = data.binary().reshape(4, -1)
    unanimous = np.all(masks == masks[:1], axis=0)
    # the estimate equals EM on the disagreement voxels' pattern table alone
    values, counts = np.unique(masks[:, ~unanimous], axis=1, return_counts=True)
    pd = staple.PatternData(patterns=None, values=values, counts=counts.astype(float), unanimous=np.zeros(values.shape[1], bool), n_classes=2)
    prior = staple.class_prior(cfg, pd, "test")
    np.testing.assert_allclose(res.tree["variational"]["prior"].values, prior)
    flat = res.consensus.values.reshape(-1)
    np.testing.assert_array_equal(flat[unanimous], masks[0, unanimous])
    full = staple.fit(data, staple.Config(), progress=False)
    # background that everybody leaves out inflates the specificities
    assert np.all(res.raters["specificity"].values < full.raters["specificity"].values)


# --------------------------------------------------------------------------
# degenerate inputs: clear messages or correct results, never NaN
def test_all_zero_rater_gets_sensitivity_zero_and_no_nan():
    data, _ = staple.simulate(shape=(20, 20, 20), n_raters=4, random_seed=12)
    masks = data.binary().copy()
    masks[2] = 0
    res = bayesfuse.fuse(list(masks), "staple", progress=False, **ITK_LIKE)
    assert np.all(np.isfinite(res.consensus.values))
    assert res.raters["sensitivity"].values[2] == 0.0
    assert res.raters["specificity"].values[2] == 1.0
    assert_parity(res, masks)


def test_raters_that_agree_everywhere_give_their_mask():
    data, _ = staple.simulate(shape=(16, 16, 16), n_raters=1 + 2, random_seed=13)
    mask = data.binary()[0]
    res = bayesfuse.fuse([mask, mask, mask], "staple", progress=False)
    np.testing.assert_array_equal(res.consensus.values, mask.astype(np.float32))
    np.testing.assert_array_equal(res.raters["sensitivity"].values, 1.0)
    np.testing.assert_array_equal(res.raters["specificity"].values, 1.0)
    with pytest.raises(InputError, match="agree on every voxel"):
        bayesfuse.fuse([mask, mask, mask], "staple", progress=False, leave_out_unanimous=True)


def test_empty_masks_are_refused_where_simpleitk_returns_nan():
    z = np.zeros((12, 12, 12), dtype=np.uint8)
    w, se, _ = sitk_staple(np.stack([z, z, z]))
    assert np.isnan(w).all() and np.isnan(se).all()
    with pytest.raises(InputError, match="nothing to fuse"):
        bayesfuse.fuse([z, z, z], "staple", progress=False)


def test_a_single_rater_is_refused_with_a_message():
    m = np.zeros((10, 10, 10), dtype=np.uint8)
    m[3:6, 3:6, 3:6] = 1
    with pytest.raises(InputError, match="fusion needs at least 2"):
        bayesfuse.fuse([m], "staple", progress=False)
    one = RaterMaps.from_arrays([m], min_raters=1)
    with pytest.raises(InputError, match="STAPLE needs at least 2"):
        staple.fit(one, progress=False)


def test_0_255_masks_give_the_same_result_as_0_1():
    data, _ = staple.simulate(shape=(16, 18, 14), n_raters=3, random_seed=14)
    masks = data.binary()
    a = bayesfuse.fuse(list(masks), "staple", progress=False)
    b = bayesfuse.fuse(list(masks * np.uint8(255)), "staple", progress=False)
    np.testing.assert_array_equal(a.consensus.values, b.consensus.values)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="both"):
        staple.Config(init_sensitivity=0.9)
    with pytest.raises(ConfigError):
        staple.Config(prior=1.5)
    with pytest.raises(ConfigError, match="Beta"):
        staple.Config(sensitivity_prior=(0.5, 1.0))
    with pytest.raises(ConfigError, match="binary STAPLE only"):
        staple.Config(mode="multi", confidence_weight=2.0)
    data, _ = staple.simulate(shape=(12, 12, 12), n_raters=3, random_seed=15)
    with pytest.raises(InputError, match="not inside"):
        bayesfuse.fuse(data, "staple", confidence_weight=1e6, progress=False)


def test_probability_maps_are_refused_by_staple():
    rng = np.random.default_rng(16)
    with pytest.raises(InputError, match="binary"):
        bayesfuse.fuse(list(rng.random((3, 8, 8, 8)).astype(np.float32)), "staple", progress=False)


# --------------------------------------------------------------------------
# result contents
def test_result_tables_and_posterior_draws(tmp_path):
    data, _ = staple.simulate(shape=(20, 20, 20), n_raters=3, random_seed=17)
    res = bayesfuse.fuse(data, "staple", progress=False)
    table = res.raters
    for col in ("sensitivity", "specificity", "confusion_1_1", "confusion_0_0"):
        assert col in table.columns
    np.testing.assert_allclose(table["confusion_1_1"], table["sensitivity"])
    res.save(tmp_path)
    back = bayesfuse.FusionResult.load(tmp_path)
    draws = back.posterior_draws(500, random_seed=0)["posterior"]
    assert draws["sensitivity"].dims == ("chain", "draw", "rater")
    mean = draws["sensitivity"].mean(("chain", "draw")).values
    np.testing.assert_allclose(mean, table["sensitivity"], atol=0.02)
    assert staple.fixed_from_result(res)["prior"] == pytest.approx(res.tree["variational"]["prior"].values.tolist())
    multi = bayesfuse.fuse(data, "multi-staple", progress=False)
    with pytest.raises(NotImplementedError, match="point estimate"):
        multi.posterior_draws(10)


@pytest.mark.data
def test_cli_staple_on_liver_tumour(liver_files, tmp_path):
    from bayesfuse.cli import main

    out = tmp_path / "out"
    code = main(["fuse", *map(str, liver_files["raters"]), "--method", "staple", "--out", str(out), "--quiet"])
    assert code == 0
    import pandas as pd

    table = pd.read_csv(out / "raters.csv", index_col=0)
    assert list(table.index) == [p.name for p in liver_files["raters"]] or len(table) == 3
    assert table["sensitivity"].between(0, 1).all() and table["specificity"].between(0.99, 1).all()


# --------------------------------------------------------------------------
def test_model_cards_and_code_cite_the_same_equations():
    """Every (eq:...) label of the cards is cited by the code, and every
    citation names a label that the card defines."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cards = {name: set(re.findall(r"\(eq:([a-z0-9-]+)\)\s*$", (root / "models" / name).read_text(), re.M))
             for name in ("staple.md", "soft_staple.md")}
    assert len(cards["staple.md"]) >= 10 and len(cards["soft_staple.md"]) >= 10
    cited = {name: set() for name in cards}
    for path in ("bayesfuse/models/staple.py", "bayesfuse/models/soft_staple.py", "bayesfuse/patterns.py"):
        text = (root / path).read_text()
        for card, rest in re.findall(r"models/(\w+\.md) ((?:\(eq:[a-z0-9-]+\)(?:, )?)+)", text):
            cited[card] |= set(re.findall(r"eq:([a-z0-9-]+)", rest))
    for name in cards:
        assert cited[name] <= cards[name], f"{name}: cited but not defined: {cited[name] - cards[name]}"
        assert cards[name] <= cited[name], f"{name}: defined but never cited: {cards[name] - cited[name]}"
