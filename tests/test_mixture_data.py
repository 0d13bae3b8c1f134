"""Mixture of consensuses on real raters: BU-BIL cells, ten experts and seven
crowd workers per image (``../shared/data/bu-bil-dataset1``).

What is asserted holds whatever the clustering turns out to be: raters with
identical masks share a component, the fit does not depend on the raters'
order, the ELBO climbs in every stage. How many components are found and
whether experts and crowd workers separate is measured by
``benchmarks/mixture.py bubil`` (results in models/mixture.md).
"""

from __future__ import annotations

import numpy as np
import pytest

import bayesfuse

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def case(shared_data):
    from bayesfuse.datasets import bubil_case

    return bubil_case("B31", root=shared_data)


@pytest.fixture(scope="module")
def result(case):
    return bayesfuse.fuse(case.raters, "mixture", progress=False)


def test_identical_raters_share_a_component(case, result):
    names = case.raters.rater_names
    masks = case.raters.binary()
    i, j = names.index("expert/Person2_Amira"), names.index("expert/Person2_ImageJ")
    assert np.array_equal(masks[i], masks[j]), "the data set's twin raters differ: update this test"
    resp = result.group("raters")["responsibility"].values
    np.testing.assert_allclose(resp[i], resp[j], atol=1e-9)
    np.testing.assert_allclose(resp.sum(1), 1.0)


def test_elbo_climbs_within_every_stage_on_real_data(result):
    opt = result.tree["optimizer"]
    obj, stage = opt["objective"].values, opt["fit"].values
    for seg in np.split(np.arange(obj.size), np.flatnonzero(np.diff(stage) != 0) + 1):
        assert np.all(np.diff(obj[seg]) >= -1e-9 * np.abs(obj[seg][1:]))


def test_rater_order_does_not_matter_on_real_data(case, result):
    perm = np.random.default_rng(0).permutation(case.raters.n_raters)
    again = bayesfuse.fuse(case.raters.subset(perm), "mixture", progress=False)
    assert again.tree.attrs["n_components"] == result.tree.attrs["n_components"]
    before = result.raters.loc[again.rater_names]
    cols = [c for c in before.columns if c.startswith("responsibility")]
    np.testing.assert_allclose(again.raters[cols].values, before[cols].values, atol=1e-6)
