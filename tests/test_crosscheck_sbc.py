"""Simulation-based calibration (bayesfuse check --sbc): uniform PITs for the
solver as written, PITs piled at the ends when an update is wrong."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from bayesfuse import cli, crosscheck_sbc
from bayesfuse.models import staple

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


def test_pit_is_the_share_below_with_ties_split():
    rng = np.random.default_rng(0)
    draws = np.arange(10.0)[:, None] * np.ones((1, 3))
    p = crosscheck_sbc.pit(draws, np.array([4.5, -1.0, 20.0]), rng)
    np.testing.assert_allclose(p, [0.5, 0.0, 1.0])
    # a point q (every draw equal to the truth): uniform by the random split
    ties = np.array([crosscheck_sbc.pit(np.ones((5, 1)), np.ones(1), rng)[0] for _ in range(2000)])
    assert abs(ties.mean() - 0.5) < 0.03 and ties.min() < 0.05 and ties.max() > 0.95


def test_staple_sbc_passes(tmp_path, capsys):
    code = cli.main(["check", "--method", "staple", "--sbc", "30", "--seed", "1", "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "VERDICT: PASS" in out
    table = pd.read_csv(tmp_path / "s" / "sbc.csv")
    assert set(table["variable"]) == {"sensitivity", "specificity"} and len(table) == 8
    assert (table["p_value"] >= crosscheck_sbc.ALPHA / 8).all()
    # PITs of a calibrated q: mean about 1/2, about 10 % outside [0.05, 0.95]
    assert abs(table["mean_pit"].mean() - 0.5) < 0.08 and table["tails"].mean() < 0.2
    tree = xr.open_datatree(tmp_path / "s" / "sbc.nc", engine="h5netcdf")
    assert tree["prior_sbc"]["sensitivity"].sizes == {"chain": 1, "draw": 30, "rater": 4}
    assert (tmp_path / "s" / "sbc_ecdf_pit.png").stat().st_size > 10_000


def test_sbc_fails_with_a_wrong_update(monkeypatch):
    def wrong_axis(stats, alpha, previous=None):
        num = stats + (alpha - 1.0)[None]
        return num / num.sum(axis=1, keepdims=True)

    monkeypatch.setattr(staple, "m_step_theta", wrong_axis)
    res = crosscheck_sbc.run("staple", n_sims=30, random_seed=1)
    assert not res.passed and "VERDICT: FAIL" in res.verdict()
    assert res.table["tails"].mean() > 0.5


def test_sbc_needs_a_generative_story(tmp_path):
    # soft-STAPLE's likelihood is an expected log-likelihood: no story to draw soft maps from
    code = cli.main(["check", "--method", "soft-staple", "--sbc", "5", "--out", str(tmp_path / "x")])
    assert code == 2 and not (tmp_path / "x" / "sbc.csv").exists()
