"""bayesfuse compare: the study on a phantom dataset, its statistics against
scipy, leave-one-rater-out, failures and bad input, the command line, Dask."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

import bayesfuse
from bayesfuse import compare as cmp
from bayesfuse import metrics
from bayesfuse.cli import main
from bayesfuse.errors import ConfigError, InputError, OutputExistsError

SENS_SPEC = ((0.9, 0.98), (0.8, 0.99), (0.95, 0.9), (0.7, 0.97))


def _write_study(root, n_cases=6, n_raters=4, seed=0, shape=(24, 20)):
    """Folder layout: STUDY/<s>/raters/r<i>.nii.gz and reference.nii.gz (the truth)."""
    rng = np.random.default_rng(seed)
    aff = np.diag([1.5, 1.5, 1.0, 1.0])
    for s in range(n_cases):
        d = root / f"s{s:02d}"
        (d / "raters").mkdir(parents=True)
        truth = np.zeros(shape, np.uint8)
        c = rng.integers(7, 13, 2)
        truth[c[0] - 5 : c[0] + 5, c[1] - 4 : c[1] + 5] = 1
        nib.save(nib.Nifti1Image(truth, aff), d / "reference.nii.gz")
        for p, (se, sp) in enumerate(SENS_SPEC[:n_raters]):
            m = np.where(truth == 1, rng.random(shape) < se, rng.random(shape) > sp).astype(np.uint8)
            nib.save(nib.Nifti1Image(m, aff), d / "raters" / f"r{p}.nii.gz")
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return _write_study(tmp_path_factory.mktemp("study") / "study")


# ------------------------------------------------------------- end to end
def test_compare_writes_scores_tests_and_plots(study, tmp_path):
    out = tmp_path / "out"
    res = cmp.compare(study, "majority-vote,staple,pstaple,pstaple:mrf_beta=1,mean", out,
                      reference="majority-vote", workers=0, progress=False)
    for name in cmp.OUTPUTS:
        assert (out / name).is_file(), name
    assert (out / "boxplots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 6 * 5
    assert set(scores["method"]) == {"majority-vote", "staple", "pstaple", "pstaple:mrf_beta=1", "mean"}
    assert (scores["error"].isna() | (scores["error"] == "")).all()
    # Known limit: majority vote scored against the majority vote is perfect.
    mv = scores[scores["method"] == "majority-vote"]
    assert np.allclose(mv["dice"], 1.0) and np.allclose(mv["hausdorff"], 0.0)
    tests = pd.read_csv(out / "wilcoxon.csv")
    assert len(tests) == 4 * len(cmp.METRICS)
    assert set(tests["against"]) == {"majority-vote"}
    # no method beats majority vote's perfect Dice; where a method differs in
    # all 6 cases the exact two-sided p of 6 one-signed differences is 2 / 2**6,
    # where it never differs there is nothing to test (p = 1)
    d = tests[tests["metric"] == "dice"].set_index("method")
    assert set(d["direction"]) <= {"worse", "equal"}
    all6, none = d[d["n_nonzero"] == 6], d[d["n_nonzero"] == 0]
    assert len(all6) >= 2  # the MRF and the mean change the labels in every case
    np.testing.assert_allclose(all6["p_value"], 2 / 2**6)
    assert all6["significant"].all() and (all6["direction"] == "worse").all()
    assert (none["p_value"] == 1.0).all() and (none["direction"] == "equal").all()
    study_json = json.loads((out / "study.json").read_text())
    assert study_json["n_scored_cases"] == 6 and study_json["against"] == "majority-vote"
    assert res["scores"].shape[0] == 30


def test_scores_match_direct_metrics(study, tmp_path):
    """A row of scores.csv equals fusing that case and scoring it by hand."""
    res = cmp.compare(study, "pstaple", tmp_path / "o", reference="manifest", workers=0, progress=False)
    row = res["scores"].query("case == 's03'").iloc[0]
    subj = study / "s03"
    r = bayesfuse.fuse(sorted((subj / "raters").glob("*.nii.gz")), "pstaple", progress=False)
    ref = np.asarray(nib.load(subj / "reference.nii.gz").dataobj)
    lab = r.labels.values
    assert row["dice"] == pytest.approx(metrics.dice(lab, ref))
    assert row["hd95"] == pytest.approx(metrics.hd95(lab, ref, (1.5, 1.5)))
    assert row["hausdorff"] == pytest.approx(metrics.hausdorff(lab, ref, (1.5, 1.5)))
    assert row["soft_dice"] == pytest.approx(metrics.soft_dice(ref.astype(float), r.consensus.values))


def test_leave_one_rater_out(study, tmp_path):
    res = cmp.compare(study, "majority-vote,pstaple", tmp_path / "o", leave_one_rater_out=True, workers=0, progress=False)
    scores = res["scores"]
    assert len(scores) == 6 * 4 * 2
    assert set(scores["held_out"]) == {f"r{p}" for p in range(4)}  # raters named as in the study
    assert (scores["n_raters"] == 3).all()
    # one unit by hand: rater 2 held out of case s01, the other three fused
    subj = study / "s01"
    files = sorted((subj / "raters").glob("*.nii.gz"))
    held = files[2]
    r = bayesfuse.fuse([f for f in files if f != held], "majority-vote")
    ref = np.asarray(nib.load(held).dataobj)
    row = scores[(scores["case"] == "s01") & (scores["method"] == "majority-vote")].iloc[2]
    assert row["dice"] == pytest.approx(metrics.dice(r.labels.values, ref))
    # tests pair cases on the mean over held-out raters
    t = res["wilcoxon"].query("metric == 'dice'").iloc[0]
    assert t["n"] == 6
    means = scores.groupby(["case", "method"])["dice"].mean().unstack()
    expected = wilcoxon(means["pstaple"], means["majority-vote"])
    assert t["p_value"] == pytest.approx(expected.pvalue)


def test_leave_one_out_leaves_out_two_rater_cases(tmp_path):
    root = _write_study(tmp_path / "s", n_cases=2, n_raters=4)
    _write_study(tmp_path / "t", n_cases=1, n_raters=2, seed=5)
    (tmp_path / "t" / "s00").rename(root / "two")
    cmp.compare(root, "majority-vote,mean", tmp_path / "o", leave_one_rater_out=True, workers=0, progress=False)
    info = json.loads((tmp_path / "o" / "study.json").read_text())
    assert list(info["left_out"]) == ["two"] and "at least 3" in info["left_out"]["two"]
    assert "two" not in set(pd.read_csv(tmp_path / "o" / "scores.csv")["case"])


# ------------------------------------------------------------- statistics
def _scores_from(values: dict[str, list[float]], metric="dice"):
    rows = []
    for m, vals in values.items():
        for i, v in enumerate(vals):
            rows.append({"case": f"c{i}", "held_out": "", "method": m, "diagonal_mm": 100.0, metric: v, "error": ""})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("zero_method", cmp.ZERO_METHODS)
def test_wilcoxon_table_matches_scipy(zero_method):
    rng = np.random.default_rng(0)
    base = rng.random(25)
    vals = {
        "ref": base,
        "a": base + rng.normal(0.05, 0.05, 25),          # mostly better
        "b": np.round(base - 0.02 * (rng.random(25) > 0.3), 2),  # ties and zeros
        "c": base[:25].copy(),                            # identical: all zero differences
    }
    vals["b"][:5] = base[:5]
    scores = _scores_from(vals)
    table = cmp.wilcoxon_table(scores, "ref", metrics=["dice"], zero_method=zero_method).set_index("method")
    for m in ("a", "b"):
        expected = wilcoxon(vals[m], vals["ref"], zero_method=zero_method)
        assert table.loc[m, "statistic"] == pytest.approx(expected.statistic)
        assert table.loc[m, "p_value"] == pytest.approx(expected.pvalue)
        assert table.loc[m, "n"] == 25
        assert table.loc[m, "n_nonzero"] == np.count_nonzero(vals[m] - vals["ref"])
    assert table.loc["a", "direction"] == "better" and table.loc["a", "significant"]
    assert table.loc["b", "direction"] == "worse"
    assert table.loc["c", "p_value"] == 1.0 and table.loc["c", "direction"] == "equal"
    assert not table.loc["c", "significant"]


def test_box_plot_marks_are_per_metric():
    """Each panel's marks come from its own metric's tests (the panels share
    their labels, so marks in the labels showed one metric's tests on all)."""
    rng = np.random.default_rng(1)
    base = rng.random(12)
    scores = pd.concat([_scores_from({"ref": base, "a": base + 0.1, "b": base}, "dice"),
                        _scores_from({"ref": base, "a": base, "b": base + 0.1}, "hd95")["hd95"]], axis=1)
    table = cmp.wilcoxon_table(scores, "ref", metrics=["dice", "hd95"])
    assert cmp.significance_marks(table, "dice") == {"a": "**+"}
    assert cmp.significance_marks(table, "hd95") == {"b": "**-"}


def test_holm_adjustment():
    np.testing.assert_allclose(cmp.holm([0.01, 0.04, 0.03, np.nan]), [0.03, 0.06, 0.06, np.nan])
    np.testing.assert_allclose(cmp.holm([0.5, 0.2]), [0.5, 0.4])


def test_distance_direction_and_infinite_capped_at_diagonal():
    scores = _scores_from({"ref": [5.0, 6.0, 7.0, 8.0, 9.0, 4.0], "x": [1.0, 2.0, np.inf, 3.0, 2.0, 1.0]}, metric="hd95")
    cs = cmp.case_scores(scores, "hd95")
    assert cs.loc["c2", "x"] == 100.0
    table = cmp.wilcoxon_table(scores, "ref", metrics=["hd95"]).set_index("method")
    expected = wilcoxon(cs["x"], cs["ref"])
    assert table.loc["x", "p_value"] == pytest.approx(expected.pvalue)
    assert table.loc["x", "direction"] == "better"  # smaller distances, despite one capped failure


def test_score_known_values():
    ref = np.zeros((10, 10), int)
    ref[2:6, 2:6] = 1
    prob = np.zeros((10, 10, 2))
    prob[..., 0] = 1
    prob[2:6, 2:8] = [0.2, 0.8]  # 16 of 24 voxels agree
    s = cmp.score(prob, ref, spacing=(2.0, 1.0))
    assert s["dice"] == pytest.approx(2 * 16 / 40)
    assert s["hausdorff"] == pytest.approx(2.0)  # two columns too many, 1 mm each
    assert s["soft_dice"] == pytest.approx(16 * 0.8 / (0.5 * 24 * 0.8 + 0.5 * 16))
    empty = np.zeros((10, 10, 2))
    empty[..., 0] = 1
    assert cmp.score(empty, ref)["hausdorff"] == np.inf


# -------------------------------------------------------- failures, input
def test_failing_method_is_recorded_not_fatal(study, tmp_path):
    # staple needs binary masks: on probability maps it refuses; the others go on
    res = cmp.compare(study, "mean,staple", tmp_path / "o", to_prob="euclidean", workers=0, progress=False,
                      against="mean")
    assert (res["scores"]["error"] == "").all()  # staple gets the masks, not the converted maps
    from bayesfuse.data import RaterMaps

    rng = np.random.default_rng(1)
    cases = [(f"c{i}", RaterMaps.from_arrays(list(rng.random((3, 8, 8)).astype(np.float32)))) for i in range(3)]
    res = cmp.compare_cases(cases, "mean,staple", tmp_path / "p", workers=0, progress=False)
    bad = res["scores"].query("method == 'staple'")
    assert (bad["error"].str.len() > 0).all() and bad["dice"].isna().all()
    assert res["wilcoxon"].query("method == 'staple'")["n"].eq(0).all()


def test_bad_input_writes_nothing(study, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match="unknown method"):
        cmp.compare(study, "majority-vote,no-such-method", out, workers=0)
    with pytest.raises(ConfigError, match="unknown option"):
        cmp.compare(study, "pstaple:no_such_option=1", out, workers=0)
    with pytest.raises(ConfigError, match="listed twice"):
        cmp.compare(study, "mean,mean", out, workers=0)
    with pytest.raises(ConfigError, match="against"):
        cmp.compare(study, "mean,staple", out, against="pstaple", workers=0)
    with pytest.raises(InputError, match="no such file"):
        cmp.compare(study, "mean,staple", out, reference="gt/{subject}.nii.gz", workers=0)
    assert not out.exists()
    cmp.compare(study, "mean,majority-vote", out, workers=0, progress=False)
    with pytest.raises(OutputExistsError, match="--force"):
        cmp.compare(study, "mean,majority-vote", out, workers=0, progress=False)


def test_reference_pattern_and_csv_manifest(study, tmp_path):
    rows = ["subject,rater1,rater2,rater3"]
    for s in ("s00", "s01", "s02"):
        rows.append(",".join([s] + [str(study / s / "raters" / f"r{p}.nii.gz") for p in range(3)]))
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "gt").mkdir()
    for s in ("s00", "s01", "s02"):
        (tmp_path / "gt" / f"{s}.nii.gz").write_bytes((study / s / "reference.nii.gz").read_bytes())
    res = cmp.compare(tmp_path / "m.csv", "majority-vote,pstaple", tmp_path / "o", reference="gt/{subject}.nii.gz",
                      workers=0, progress=False)
    assert sorted(res["scores"]["case"].unique()) == ["s00", "s01", "s02"]
    assert (res["scores"]["dice"] < 1).any()  # scored against the truth, not the vote


# ------------------------------------------------------------ command line
def test_cli_end_to_end_and_errors(study, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["compare", str(study), "--methods", "majority-vote,pstaple,pstaple:mrf_beta=0.5", "--reference",
               "manifest", "--against", "pstaple", "--out", str(out), "--workers", "0", "--quiet"])
    assert rc == 0
    tests = pd.read_csv(out / "wilcoxon.csv")
    assert set(tests["against"]) == {"pstaple"} and set(tests["method"]) == {"majority-vote", "pstaple:mrf_beta=0.5"}
    rc = main(["compare", str(study), "--methods", "mean,bogus", "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "bogus" in err
    assert not (tmp_path / "x").exists()


# -------------------------------------------------------------------- Dask
def test_dask_run_equals_in_process(tmp_path):
    root = _write_study(tmp_path / "s", n_cases=8, n_raters=3, shape=(16, 16))
    a = cmp.compare(root, "majority-vote,pstaple", tmp_path / "a", workers=0, progress=False)["scores"]
    b = cmp.compare(root, "majority-vote,pstaple", tmp_path / "b", workers=2, progress=False)["scores"]
    cols = ["case", "method", "dice", "hd95", "hausdorff", "soft_dice"]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True))
