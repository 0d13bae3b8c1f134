"""The cross-check of the VB models (robust-t, mixture) against NUTS: it passes
for the solvers as written and fails when a deliberately wrong update is
injected.

Small problems so that each case stays under a minute on a shared machine:
the outlier phantom downsampled 16 times (4 x 4 x 3 voxels) for robust-t
(NUTS samples T~, b, tau, W: about 360 free values), 8 times for the mixture
(its posterior is over the component weights w only).
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from bayesfuse import crosscheck, phantoms
from bayesfuse.crosscheck_models import CRITERIA
from bayesfuse.models import mixture, robust_t

pytest.importorskip("nutpie")
pytestmark = [pytest.mark.nuts, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]

#: The command's defaults (4 x 1000 draws): with 4 x 500 robust-t's largest r_hat
#: came out at 1.0087 and 1.0104 in two runs, on the threshold.
NUTS = {"draws": 1000, "tune": 1000, "chains": 4}
FACTOR = {"robust-t": 16, "mixture": 8}


@pytest.fixture(scope="module")
def outlier():
    return phantoms.make_phantom("outlier", random_seed=0).raters


def check(raters, method, options=None) -> crosscheck.CrossCheck:
    data = raters.downsample(FACTOR[method], CRITERIA[method].downsample)
    return crosscheck.run(data, method, options=options, random_seed=0, **NUTS)


_RUNS: dict = {}


def checked(raters, method) -> crosscheck.CrossCheck:
    if method not in _RUNS:
        _RUNS[method] = check(raters, method)
    return _RUNS[method]


@pytest.mark.parametrize("method", ["robust-t", "mixture"])
def test_correct_solver_passes(outlier, method):
    cc = checked(outlier, method)
    assert cc.health.ok, cc.health.message()
    assert cc.passed, cc.verdict()
    s = cc.summary.set_index("variable")
    assert list(s.index) == [r.variable for r in CRITERIA[method].rules]
    assert np.isfinite(cc.khat) and cc.khat <= CRITERIA[method].khat_max
    assert "VERDICT: PASS" in cc.verdict()


def test_robust_t_summary(outlier):
    """T~ per voxel and coordinate is the required variable; b, tau, W are reported with their own k-hat."""
    cc = checked(outlier, "robust-t")
    s = cc.summary.set_index("variable")
    assert s.loc["T", "required"] and s.loc["T", "compared"] == 4 * 4 * 3 * 2
    assert s.loc["T", "share_within"] >= 0.95
    assert not s.loc["tau", "required"] and np.isfinite(s.loc["tau", "khat"])
    assert cc.stats["tau"]["zscore"].dims == ("rater", "x", "y", "z")


def test_mixture_components_and_labels(outlier):
    """Two clusters of raters on the outlier phantom; the NUTS chains are in q's labelling
    (relabelled if not) and the raters' assignments agree."""
    cc = checked(outlier, "mixture")
    assert cc.result.group("variational").sizes["component"] == 2
    st = cc.stats["responsibility"]
    assert st["zscore"].dims == ("rater", "component")
    # each rater's assignment: the same component, with the same certainty
    np.testing.assert_allclose(st["mean_q"].values, st["mean_nuts"].values, atol=0.05)
    assert set(np.argmax(st["mean_q"].values, axis=1)) == {0, 1}


def test_mixture_relabels_swapped_chains(outlier):
    """A chain in the other labelling is brought back to q's (label switching is no disagreement)."""
    from bayesfuse.crosscheck_models import align_components

    cc = checked(outlier, "mixture")
    post = cc.nuts["posterior"].to_dataset()
    swapped = post.copy()
    for name in ("w", "responsibility"):
        da = post[name]
        parts = [da.isel(chain=c) if c else da.isel(chain=c).isel(component=[1, 0]).assign_coords(component=da["component"].values)
                 for c in range(da.sizes["chain"])]
        swapped[name] = xr.concat(parts, dim="chain").transpose(*da.dims)
    back, notes = align_components("mixture", cc.result, swapped)
    assert len(notes) == 1 and "chain 0" in notes[0]
    np.testing.assert_array_equal(back["w"].values, post["w"].values)
    np.testing.assert_array_equal(back["responsibility"].values, post["responsibility"].values)


def test_robust_t_bias_update_without_prior_term_fails(outlier, monkeypatch):
    """q(b) without the prior's precision beta (eq:rt-qb): the biases go to their
    maximum-likelihood values, which the pinned prior does not allow.

    beta is fixed at the correct solver's estimate (``beta=`` option): the
    wrong update would otherwise also change the estimated beta (to a weak
    prior, under which NUTS no longer mixes along the common shift of T~ and b
    and the check stops at "NUTS not healthy", a failure for another reason)."""
    right = checked(outlier, "robust-t")
    beta = float(right.result.group("variational")["beta"])
    exact = robust_t._q_b_from_stats

    def without_prior(sw, s1, Sigma, beta):
        return exact(sw, s1, Sigma, None if beta is None else 0.0)

    monkeypatch.setattr(robust_t, "_q_b_from_stats", without_prior)
    cc = check(outlier, "robust-t", options={"beta": beta})
    assert cc.health.ok, cc.health.message()
    assert not cc.passed and cc.exit_code == crosscheck.EXIT_DISAGREE, cc.verdict()
    assert "VERDICT: FAIL" in cc.verdict()
    s = cc.summary.set_index("variable")
    # the biases fail; the consensus moves less than 0.5 sd (with the variance floor of 1e-4,
    # the default until 2026-12, T failed too)
    assert not s.loc["b", "passed"]
    assert s.loc["b", "share_within"] < CRITERIA["robust-t"].rules[1].share  # measured 0.7
    assert right.summary.set_index("variable").loc["b", "share_within"] >= CRITERIA["robust-t"].rules[1].share
    assert np.abs(right.result.group("variational")["mu_b"].values
                  - cc.result.group("variational")["mu_b"].values).max() > 1e-3


def test_mixture_precision_with_sd_for_variance_fails(outlier, monkeypatch):
    """q(w_m) weighting the raters by 1/sigma_p where (eq:mix-qw) has 1/sigma_p^2
    (sigma_p^2 < 1 here, so the precision is too small): q(w) comes out wider
    than the posterior, which the mean field cannot be.

    (Leaving sigma_p^2 out altogether changes the boosting's choice to a
    single component, whose check is trivially right: no test of q(w).)"""
    right = checked(outlier, "mixture")
    exact = mixture.update_q_w

    def sd_for_variance(a, r, sigma2, prior_var):
        return exact(a, r, np.sqrt(sigma2), prior_var)

    monkeypatch.setattr(mixture, "update_q_w", sd_for_variance)
    cc = check(outlier, "mixture")
    assert cc.result.group("variational").sizes["component"] == right.result.group("variational").sizes["component"]
    assert cc.nuts.attrs["compile_cached"] == 1  # pi, sigma^2 are data of the same PyMC model
    assert cc.health.ok, cc.health.message()
    assert not cc.passed and cc.exit_code == crosscheck.EXIT_DISAGREE, cc.verdict()
    s = cc.summary.set_index("variable")
    assert not s.loc["w", "passed"] and s.loc["w", "sd_ratio_median"] > CRITERIA["mixture"].rules[0].sd_ratio[1]
