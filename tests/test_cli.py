"""The command line end to end: outputs, geometry, and every bad input."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bayesfuse.cli import main


def _write(path, arr, affine=None):
    affine = np.diag([1.2, 1.2, 2.5, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return str(path)


@pytest.fixture
def raters(tmp_path):
    rng = np.random.default_rng(0)
    base = np.zeros((20, 22, 10), np.uint8)
    base[5:15, 6:16, 2:8] = 1
    paths = []
    for i in range(3):
        m = base.copy()
        m[rng.integers(0, 20, 5), rng.integers(0, 22, 5), rng.integers(0, 10, 5)] ^= 1
        paths.append(_write(tmp_path / f"rater{i}.nii.gz", m))
    return paths


def _outputs(d):
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_fuse_writes_four_outputs_with_input_affine(raters, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["fuse", "--method", "majority-vote", "--out", str(out), *raters]) == 0
    assert _outputs(out) == ["consensus.nii.gz", "labels.nii.gz", "raters.csv", "result.nc"]
    ref = nib.load(raters[0])
    cons = nib.load(str(out / "consensus.nii.gz"))
    assert cons.get_data_dtype() == np.float32 and cons.shape == ref.shape
    np.testing.assert_allclose(cons.affine, ref.affine)
    lab = np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj)
    votes = sum(np.asarray(nib.load(p).dataobj).astype(int) for p in raters)
    np.testing.assert_array_equal(lab, (votes >= 2).astype(np.uint8))
    table = pd.read_csv(out / "raters.csv")
    assert list(table["rater"]) == ["rater0.nii.gz", "rater1.nii.gz", "rater2.nii.gz"]
    assert "wrote" in capsys.readouterr().out


def test_refuses_overwrite_then_force(raters, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["fuse", "-m", "mean", "--out", str(out), "-q", *raters]) == 0
    before = (out / "consensus.nii.gz").stat().st_mtime_ns
    assert main(["fuse", "-m", "mean", "--out", str(out), "-q", *raters]) == 2
    assert "exists; use --force" in capsys.readouterr().err
    assert (out / "consensus.nii.gz").stat().st_mtime_ns == before
    assert main(["fuse", "-m", "mean", "--out", str(out), "-q", "--force", *raters]) == 0


def _bad_case(tmp_path, raters, case):
    """Rater file lists that must be refused, and the words of the message."""
    base = np.asarray(nib.load(raters[0]).dataobj)
    if case == "shape":
        return [raters[0], _write(tmp_path / "small.nii.gz", base[:-1])], "small.nii.gz: shape"
    if case == "affine":
        return [raters[0], _write(tmp_path / "moved.nii.gz", base, np.diag([1.2, 1.2, 3.0, 1.0]))], "moved.nii.gz: affine differs"
    if case == "nan":
        a = base.astype(np.float32) * 0.7
        a[1, 1, 1] = np.nan
        return [raters[0], _write(tmp_path / "nan.nii.gz", a)], "nan.nii.gz: 1 voxel(s) are NaN or infinite"
    if case == "range":
        a = base.astype(np.float32) * 1.3 + 0.1
        return [raters[0], _write(tmp_path / "range.nii.gz", a)], "range.nii.gz: values outside [0, 1]"
    if case == "simplex":
        a = np.stack([base * 0.6, base * 0.6 + 0.2], axis=-1).astype(np.float32)
        return [_write(tmp_path / "s0.nii.gz", a), _write(tmp_path / "s1.nii.gz", a)], "s0.nii.gz: class probabilities do not sum to 1"
    if case == "one":
        return [raters[0]], "fusion needs at least 2"
    if case == "truncated":
        raw = open(raters[1], "rb").read()
        p = tmp_path / "trunc.nii.gz"
        p.write_bytes(raw[: len(raw) // 3])
        return [raters[0], str(p)], "trunc.nii.gz: cannot be read"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["shape", "affine", "nan", "range", "simplex", "one", "truncated"])
def test_bad_input_one_line_error_nothing_written(raters, tmp_path, capsys, case):
    files, words = _bad_case(tmp_path, raters, case)
    out = tmp_path / f"out-{case}"
    code = main(["fuse", "-m", "mean", "--out", str(out), *files])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("bayesfuse: error: ")
    assert words in err
    assert _outputs(out) == []


def test_labels_outside_declared_classes(raters, tmp_path, capsys):
    base = np.asarray(nib.load(raters[0]).dataobj) * 3
    f = _write(tmp_path / "three.nii.gz", base.astype(np.uint8))
    code = main(["fuse", "-m", "majority-vote", "--classes", "3", "--out", str(tmp_path / "o"), raters[0], f])
    assert code == 2
    assert "three.nii.gz: label value 3 outside the declared classes 0..2" in capsys.readouterr().err


def test_empty_roi_mask(raters, tmp_path, capsys):
    roi = _write(tmp_path / "roi.nii.gz", np.zeros((20, 22, 10), np.uint8))
    code = main(["fuse", "-m", "mean", "--mask", roi, "--out", str(tmp_path / "o"), *raters])
    assert code == 2
    assert "roi.nii.gz: the region-of-interest mask is empty" in capsys.readouterr().err


def test_0_255_masks_are_fused_not_nan(raters, tmp_path):
    files = []
    for i, p in enumerate(raters):
        a = np.asarray(nib.load(p).dataobj) * 255
        files.append(_write(tmp_path / f"w{i}.nii.gz", a.astype(np.uint8)))
    out = tmp_path / "o"
    assert main(["fuse", "-m", "mean", "-q", "--out", str(out), *files]) == 0
    cons = nib.load(str(out / "consensus.nii.gz")).get_fdata()
    assert np.isfinite(cons).all() and cons.max() == 1.0 and set(np.unique(cons)) <= {0, 1 / 3, 2 / 3, 1.0} | set(np.unique(cons.astype(np.float32)))


def test_unknown_method_and_option(raters, tmp_path, capsys):
    assert main(["fuse", "-m", "nope", "--out", str(tmp_path / "o"), *raters]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["fuse", "-m", "majority-vote", "-o", "bogus=1", "--out", str(tmp_path / "o"), *raters]) == 2
    assert "unknown option(s) bogus" in capsys.readouterr().err


def test_models_lists_zoo(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "majority-vote" in out and "mean" in out


def test_entry_point_runs_as_a_program(raters, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bayesfuse.cli", "fuse", "-m", "majority-vote", "-q", "--out", str(tmp_path / "o"), raters[0]],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "fusion needs at least 2" in r.stderr


@pytest.mark.data
def test_liver_majority_vote(liver_files, tmp_path):
    out = tmp_path / "o"
    assert main(["fuse", "--method", "majority-vote", "-q", "--out", str(out), *map(str, liver_files["raters"])]) == 0
    ref = nib.load(str(liver_files["raters"][0]))
    for name in ("consensus.nii.gz", "labels.nii.gz"):
        img = nib.load(str(out / name))
        np.testing.assert_allclose(img.affine, ref.affine)
        assert img.shape == ref.shape
