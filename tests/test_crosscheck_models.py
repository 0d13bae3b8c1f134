"""Pieces of bayesfuse.crosscheck_models that need no NUTS run: robust-t's
per-voxel mode finder (why NUTS's chains disagree) and its density."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from bayesfuse.crosscheck_models import _local_modes, robust_t_modes


@pytest.mark.parametrize("ndim", [1, 2])
def test_local_modes_finds_basins_and_masses(ndim):
    """A mixture 0.3 N(-2, 0.5^2) + 0.7 N(2, 0.5^2) per axis-0 (times a normal in axis 1):
    two basins of mass 0.3 and 0.7, to the mass of the grid cell between them."""
    g = np.linspace(-5, 5, 401)
    lp1 = np.logaddexp(np.log(0.3) + stats.norm.logpdf(g, -2, 0.5), np.log(0.7) + stats.norm.logpdf(g, 2, 0.5))
    lp = lp1 if ndim == 1 else lp1[:, None] + stats.norm.logpdf(g, 0, 1)[None, :]
    peaks, masses, basin = _local_modes(lp)
    assert masses.size == 2
    np.testing.assert_allclose(masses, [0.7, 0.3], atol=1e-4)  # the grid cell on the basin boundary
    assert g[peaks[0, 0]] == pytest.approx(2, abs=0.03) and g[peaks[1, 0]] == pytest.approx(-2, abs=0.03)
    assert basin.shape == lp.shape and basin.reshape(401, -1)[100, 0] == 1 and basin.reshape(401, -1)[300, 0] == 0


def test_robust_t_modes_on_a_split_voxel():
    """The raters of one voxel far apart in units of the Student-t scale (sd 0.01,
    nu < 1): several modes; two chains in the lowest rater's mode and two in the
    highest rater's differ by 1 in their share of draws in the heaviest mode."""
    from bayesfuse import gaussian as G
    from bayesfuse import phantoms
    from bayesfuse.models import robust_t as R

    data = phantoms.make_phantom("outlier", random_seed=0).raters.downsample(16, "mean")
    cfg = R.Config(spatial_prior=False, bias="none")
    res = R.fit(data, cfg, progress=False)
    fixed = {"Sigma": np.broadcast_to(1e-4 * np.eye(2), (data.n_raters, 2, 2)).copy(), "nu": np.full(data.n_raters, 0.8)}
    Dt = G.prepare(data, cfg.link).coords().reshape((data.n_raters,) + data.shape + (2,))
    spread = Dt[..., 1].max(axis=0) - Dt[..., 1].min(axis=0)
    idx = np.unravel_index(int(np.argmax(spread)), data.shape)
    assert spread[idx] > 0.1  # 10 scale units apart
    at = Dt[(slice(None),) + idx]
    lo, hi = at[int(np.argmin(at[:, 1]))], at[int(np.argmax(at[:, 1]))]
    rng = np.random.default_rng(0)
    T = np.broadcast_to(Dt.mean(axis=0), (4, 50) + Dt.shape[1:]).copy()
    T[(slice(0, 2), slice(None)) + idx] = lo + 0.001 * rng.standard_normal((2, 50, 2))
    T[(slice(2, 4), slice(None)) + idx] = hi + 0.001 * rng.standard_normal((2, 50, 2))
    post = xr.Dataset({"T": (("chain", "draw") + res.spatial_dims + ("class",), T)})
    ds, notes = robust_t_modes(data, cfg, res, fixed, post, voxels=np.array([idx]))
    assert int(ds["n_modes"][0]) >= 2
    assert 0 < float(ds["mass_second"][0]) <= float(ds["mass_heaviest"][0]) < 1
    assert np.ptp(ds["share_chain"].values[0]) == 1.0
    assert len(notes) == 1 and "1 voxels examined" in notes[0]
