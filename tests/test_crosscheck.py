"""The cross-check of every model with a PyMC form: it passes for the solvers as
written, and fails when a deliberately wrong update is injected.

Each case runs NUTS (nutpie, 4 chains x 1000 draws (the command's defaults)) on the outlier phantom
downsampled 8 times (8 x 8 x 6 voxels, as ``bayesfuse check --phantom outlier
--downsample 8``). The compiled model is cached by structure, so the
injected-error runs and the command-line runs only sample again.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from bayesfuse import cli, crosscheck, phantoms
from bayesfuse.crosscheck_models import CRITERIA
from bayesfuse.models import REGISTRY, pstaple, staple
from bayesfuse.models import soft_staple as ss

pytest.importorskip("nutpie")
pytestmark = [pytest.mark.nuts, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

NUTS = {"draws": 1000, "tune": 1000, "chains": 4}


@pytest.fixture(scope="module")
def outlier():
    return phantoms.make_phantom("outlier", random_seed=0).raters


def small(raters, method):
    return raters.downsample(8, CRITERIA[method].downsample)


#: Options per model. With flat priors every simplified soft-STAPLE estimate on
#: this phantom is 1 (the soft reports are all explained as observation noise),
#: where any M-step with the same fixed point agrees: Beta(2, 2) priors give
#: interior estimates, so that the injected error has something to change.
OPTIONS = {"soft-staple-simplified": {"sensitivity_prior": (2.0, 2.0), "specificity_prior": (2.0, 2.0)}}

_RUNS: dict = {}


def check(raters, method) -> crosscheck.CrossCheck:
    return crosscheck.run(small(raters, method), method, options=OPTIONS.get(method), random_seed=0, **NUTS)


def checked(raters, method) -> crosscheck.CrossCheck:
    """The correct solver's cross-check, run once per module."""
    if method not in _RUNS:
        _RUNS[method] = check(raters, method)
    return _RUNS[method]


EM_MODELS = ["staple", "multi-staple", "soft-staple", "soft-staple-simplified", "pstaple"]


def test_every_model_with_a_pymc_form_is_covered():
    """A model that lands with a PyMC form needs criteria (and a case below)."""
    missing = [s.name for s in REGISTRY.values() if s.pymc and s.name not in CRITERIA]
    assert not missing, f"no cross-check criteria for {sorted(missing)}"


@pytest.mark.parametrize("method", EM_MODELS)
def test_correct_solver_passes(outlier, method):
    cc = checked(outlier, method)
    assert cc.health.ok, cc.health.message()
    assert cc.passed, cc.verdict()
    s = cc.summary.set_index("variable")
    assert list(s.index) == [r.variable for r in CRITERIA[method].rules] + ["mode"]
    # the consensus is compared on the contested voxels, and there are some
    assert s.loc["consensus", "compared"] >= 5
    assert s.loc["consensus", "share_within"] >= 0.95
    assert s.loc["mode", "mode_gap"] <= crosscheck.ModeCheck.TOL
    assert "VERDICT: PASS" in cc.verdict()


def _wrong_axis(stats, alpha, previous=None):
    """An M-step normalised over the true class: p(x | y) where p(y | x) belongs."""
    num = stats + (alpha - 1.0)[None]
    return num / num.sum(axis=1, keepdims=True)


def _paper_counts(data):
    """The paper's literal soft-STAPLE M-step ('remains the same', eq:soft-paper-mstep):
    statistics sum_t q_it w_t in place of sum_B Q(B) r_B(1) b_i."""
    q = np.ascontiguousarray(data.foreground(np.float64).reshape(data.n_raters, -1))

    def counts(values, hist, resp, k):
        w1 = ss.soft_posterior(q, resp[:, 1])
        out = np.empty((q.shape[0], 2, 2))
        out[:, 1, 1] = q @ w1
        out[:, 1, 0] = w1.sum() - out[:, 1, 1]
        out[:, 0, 0] = (1 - q) @ (1 - w1)
        out[:, 0, 1] = (1 - w1).sum() - out[:, 0, 0]
        return out

    return counts


@pytest.mark.parametrize("method, where, name", [
    ("staple", staple, "m_step_theta"),
    ("soft-staple", staple, "expected_counts"),
    ("soft-staple-simplified", staple, "m_step_theta"),
    ("pstaple", pstaple, "m_step_theta"),
])
def test_wrong_update_fails(outlier, monkeypatch, method, where, name):
    right = checked(outlier, method)
    data = small(outlier, method)
    if name == "expected_counts":
        wrong = _paper_counts(data)
    elif method == "pstaple":
        # STAPLE's M-step with the probabilities as fractional counts (the card's
        # option m_step="fractional"): not the EM update of the soft-evidence model
        def wrong(D, W, theta):
            return pstaple.m_step_theta_fractional(D, W)
    else:
        wrong = _wrong_axis
    monkeypatch.setattr(where, name, wrong)
    cc = check(outlier, method)
    assert cc.nuts.attrs["compile_cached"] == 1  # the same PyMC model: only the solver changed
    assert cc.health.ok, cc.health.message()
    assert not cc.passed and cc.exit_code == crosscheck.EXIT_DISAGREE
    assert not cc.mode.passed, cc.verdict()
    assert "VERDICT: FAIL" in cc.verdict()
    # the correct solver's estimate moved
    r, w = right.result.raters, cc.result.raters
    col = "sensitivity" if "sensitivity" in r else r.columns[0]
    assert np.abs(r[col].values - w[col].values).max() > 0.01


def test_outputs(outlier, tmp_path):
    cc = checked(outlier, "staple")
    written = cc.write(tmp_path / "c")
    assert sorted(p.name for p in written) == sorted(crosscheck.OUTPUTS)
    summary = pd.read_csv(tmp_path / "c" / "summary.csv")
    assert list(summary.columns) == list(crosscheck.SUMMARY_COLUMNS)
    assert summary["passed"].astype(str).isin(["True", "1", "1.0"]).all()
    tree = xr.open_datatree(tmp_path / "c" / "crosscheck.nc", engine="h5netcdf")
    assert {"nuts", "solver", "stats"} <= set(tree.children)
    assert tree["nuts/posterior"]["sensitivity"].sizes == {"chain": 4, "draw": 1000, "rater": 5}
    assert tree["solver/posterior"]["sensitivity"].sizes["draw"] == 4000
    assert "consensus" in tree["solver"].children and tree.attrs["passed"] == 1
    np.testing.assert_allclose(tree["stats/consensus"]["zscore"].values, cc.stats["consensus"]["zscore"].values)
    from PIL import Image

    for name in ("marginals.png", "zscore_map.png", "sd_ratio_map.png"):
        with Image.open(tmp_path / "c" / name) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    with pytest.raises(Exception, match="exists"):
        cc.write(tmp_path / "c")


def test_command_passes_and_refuses_unhealthy_nuts(outlier, tmp_path, capsys):
    checked(outlier, "staple")  # compiles once for the module
    code = cli.main(["check", "--method", "staple", "--phantom", "outlier", "--downsample", "8",
                     "--out", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "VERDICT: PASS" in out and (tmp_path / "c" / "summary.csv").is_file()
    # too few draws: ESS < 400, so no agreement may be claimed, whatever the numbers say
    code = cli.main(["check", "--method", "staple", "--phantom", "outlier", "--downsample", "8",
                     "--draws", "50", "--tune", "50", "--out", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert code == crosscheck.EXIT_UNHEALTHY
    assert "NUTS NOT healthy" in out and "no agreement is claimed" in out
    # a model without a PyMC form is refused before any work
    code = cli.main(["check", "--method", "majority-vote", "--phantom", "outlier", "--out", str(tmp_path / "e")])
    assert code == 2 or code is None


def test_table_row_and_readme_block(outlier, tmp_path):
    from bayesfuse import crosscheck_table as ct

    cc = checked(outlier, "staple")
    r = ct.row(cc)
    assert r["model"] == "`staple`" and r["verdict"] == "PASS" and r["NUTS health"].startswith("ok")
    s = cc.summary.set_index("variable")
    assert r["voxels within 0.5 sd"] == f"{s.loc['consensus', 'share_within']:.1%} of {int(s.loc['consensus', 'compared'])} contested"
    assert r["k-hat"] == f"{cc.khat:.2f}"
    table = ct.markdown([r], "python -m bayesfuse.crosscheck_table staple")
    readme = tmp_path / "README.md"
    readme.write_text("# Zoo\n\ntext before\n")
    ct.update_readme(readme, table)
    first = readme.read_text()
    assert first.startswith("# Zoo\n\ntext before\n") and ct.START in first and "| `staple` |" in first
    ct.update_readme(readme, table.replace("PASS", "FAIL"))
    second = readme.read_text()
    # the block is replaced, not appended again
    assert second.count(ct.START) == 1 and "| FAIL |" in second and "| PASS |" not in second


def test_command_on_rater_files(outlier, tmp_path, capsys):
    """The same check from NIfTI files as from the phantom (same data: the compiled model is reused)."""
    from bayesfuse import io

    checked(outlier, "staple")
    files = []
    for name, mask in zip(outlier.rater_names, outlier.binary()):
        files.append(str(io.write_nifti(tmp_path / f"{name}.nii.gz", mask, outlier.affine)))
    code = cli.main(["check", "--method", "staple", *files, "--downsample", "8", "--out", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert code == 0 and "VERDICT: PASS" in out and "downsampled x8 by majority from 64x64x48" in out
    from_files = pd.read_csv(tmp_path / "c" / "summary.csv").set_index("variable")
    from_phantom = checked(outlier, "staple").summary.set_index("variable")
    np.testing.assert_allclose(from_files.loc["consensus", "share_within"], from_phantom.loc["consensus", "share_within"])
    # probability maps cannot be reduced by a block majority: a one-line input error, nothing written
    code = cli.main(["check", "--method", "soft-staple", "--phantom", "probability", "--downsample", "8",
                     "--downsample-how", "majority", "--out", str(tmp_path / "p")])
    assert code == 2 and not (tmp_path / "p" / "summary.csv").exists()
    assert "majority needs hard labels" in capsys.readouterr().err
