"""Majority vote and mean: ties, K classes, region of interest."""

import numpy as np
import pytest

import bayesfuse
from bayesfuse.errors import ConfigError
from bayesfuse.models.baselines import majority_vote


def test_tie_rules_binary():
    # Four raters, a 2-2 tie on voxel 0, 3-1 on voxel 1, 1-3 on voxel 2.
    labels = np.array([[1, 1, 0], [1, 1, 0], [0, 1, 1], [0, 0, 0]])
    hi = majority_vote(labels, 2, "highest")
    lo = majority_vote(labels, 2, "lowest")
    split = majority_vote(labels, 2, "split")
    np.testing.assert_array_equal(hi[:, 1], [1, 1, 0])
    np.testing.assert_array_equal(lo[:, 1], [0, 1, 0])
    np.testing.assert_array_equal(split[:, 1], [0.5, 1, 0])


def test_multiclass_three_way_tie():
    labels = np.array([[0], [1], [2], [2], [1], [0]])
    np.testing.assert_allclose(majority_vote(labels, 3, "split")[0], [1 / 3] * 3)
    assert np.argmax(majority_vote(labels, 3, "highest")[0]) == 2
    assert np.argmax(majority_vote(labels, 3, "lowest")[0]) == 0


def test_majority_vote_matches_count_rule():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 10, 11, 6)) > 0.4
    r = bayesfuse.fuse(list(masks), "majority-vote")
    np.testing.assert_array_equal(r.labels.values, (masks.sum(0) >= 3).astype(np.uint8))
    assert r.raters["dice_to_consensus"].between(0, 1).all()


def test_mean_of_probabilities_and_roi():
    rng = np.random.default_rng(1)
    p = rng.random((3, 8, 8)).astype(np.float32)
    roi = np.zeros((8, 8), bool)
    roi[2:6, 2:6] = True
    r = bayesfuse.fuse(list(p), "mean", mask=roi)
    expected = np.where(roi, p.mean(0), 0)
    np.testing.assert_allclose(r.consensus.values, expected, rtol=1e-6)


def test_bad_tie_option():
    with pytest.raises(ConfigError, match="ties must be"):
        bayesfuse.fuse([np.zeros((3, 3)), np.ones((3, 3))], "majority-vote", ties="coin")
