"""Calibration of the per-voxel intervals on phantoms from the models' own
stories: the measures themselves, then each model's coverage."""

from __future__ import annotations

import numpy as np
import pytest

from bayesfuse import calibration
from bayesfuse.models import REGISTRY


def test_coverage_counts_truths_inside_the_bounds():
    lo = np.array([0.0, 0.2, 0.5, 0.9])
    hi = np.array([0.1, 0.4, 0.6, 1.0])
    truth = np.array([0.1, 0.5, 0.55, 1.0])  # ends count as inside
    assert calibration.coverage(lo, hi, truth) == 0.75
    assert calibration.coverage(lo, hi, truth, where=np.array([False, True, True, False])) == 0.5


def test_calibration_error_limits():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = rng.random(p.size) < p  # outcomes drawn from the predictions: calibrated
    assert calibration.calibration_error(p, y) < 0.01
    # predictions pushed towards certainty are miscalibrated by about the push
    assert calibration.calibration_error(np.clip(1.5 * p - 0.25, 0, 1), y) > 0.05
    assert calibration.calibration_error(np.zeros(10), np.ones(10)) == 1.0


def test_true_quantity_by_posterior_kind():
    labels = np.array([[0, 1], [2, 1]])
    np.testing.assert_array_equal(calibration.true_quantity({"truth": labels == 1}, 2, "categorical"), [[0, 1], [0, 1]])
    onehot = calibration.true_quantity({"labels": labels}, 3, "categorical")
    assert onehot.shape == (2, 2, 3) and np.all(onehot.sum(-1) == 1) and onehot[1, 0, 2] == 1
    t = np.random.default_rng(0).random((2, 2))
    np.testing.assert_array_equal(calibration.true_quantity({"probability": np.stack([1 - t, t], -1)}, 2, "gaussian"), t)
    with pytest.raises(KeyError, match="no true probability"):
        calibration.true_quantity({"truth": labels}, 2, "gaussian")


def test_staple_label_posterior_is_calibrated_on_its_own_story():
    """EM's label posterior: its {0, 1} intervals hold the true label at least
    as often as the mass says (an exact property of a calibrated Bernoulli
    posterior), and its probabilities match the observed frequencies."""
    if "staple" not in REGISTRY:
        pytest.skip("staple has not landed")
    df = calibration.calibrate("staple", n_reps=2, shape=(28, 28, 20), n_raters=5, mass=0.9, random_seed=0)
    assert (df["solver"] == "EM").all() and (df["contested"] > 1000).all()
    assert (df["coverage_contested"] >= 0.9 - 0.01).all()
    assert (df["calibration_error"] < 0.03).all()
    md = calibration.markdown(calibration.summary_table([df]))
    assert md.count("\n") == 2 and "| staple | EM | 0.9 | 2 |" in md


def _nuts_coverage(method, n_reps, seed):
    if method not in REGISTRY:
        pytest.skip(f"{method} has not landed")
    if not hasattr(REGISTRY[method].load(), "build_model"):
        pytest.skip(f"{method} has no PyMC form yet")
    return calibration.calibrate_nuts(method, n_reps=n_reps, shape=(8, 8, 4), n_raters=5,
                                      options={"link": "logit"}, random_seed=seed, pin="truth")


@pytest.mark.nuts
def test_nuts_coverage_of_the_gaussian_model_is_near_nominal():
    """Truth drawn from the model's story, hyperparameters pinned at the drawn
    values: an exact posterior covers 90 % of the truths on average. 256
    spatially correlated voxels per case, so one case's coverage varies by a
    few points; the mean of two cases must lie within 0.06 of 0.9."""
    df = _nuts_coverage("gaussian", 2, 0)
    assert (df["voxels"] == 256).all()
    assert abs(df["coverage"].mean() - 0.9) < 0.06, df[["rep", "coverage"]]


@pytest.mark.nuts
@pytest.mark.slow
def test_nuts_coverage_of_robust_t_is_near_nominal():
    df = _nuts_coverage("robust-t", 4, 0)
    assert abs(df["coverage"].mean() - 0.9) < 0.05, df[["rep", "coverage"]]
