"""Robust-t through the CLI on real raters: an LIDC crop (4 radiologists).

Whether crowd workers get lower reliability than experts on BU-BIL is
measured by ``benchmarks/robust_t.py bubil`` (card, "On real data"): the
direction holds on 7 of 9 images only, so no test asserts it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.data


def test_cli_fuses_an_lidc_case_from_files(shared_data, tmp_path):
    import nibabel as nib

    from bayesfuse import cli, datasets, metrics

    case = datasets.lidc_case("pid_0007_nod_0_slice_10", root=shared_data)
    files = datasets.export_case(case, tmp_path / "in")
    raters = sorted(str(f) for f in files if f.name.startswith("radiologist"))
    assert len(raters) == 4
    out = tmp_path / "out"
    rc = cli.main(["fuse", "--method", "robust-t", "--to-prob", "euclidean", "--max-iter", "60", "--quiet", "--out", str(out), *raters])
    assert rc == 0
    table = pd.read_csv(out / "raters.csv", index_col=0)
    assert len(table) == 4
    assert np.all(np.isfinite(table[["nu", "mean_tau", "mean_tau_contested"]].to_numpy()))
    # reliabilities are posterior means of Gamma variables: positive, and
    # lower where the raters disagree than over the whole crop
    assert np.all(table["mean_tau_contested"] > 0)
    assert np.all(table["mean_tau_contested"] < table["mean_tau"])
    labels = np.asarray(nib.load(out / "labels.nii.gz").dataobj).reshape(case.reference.shape)
    # the source's consensus is the radiologists' majority vote
    assert metrics.dice(labels, case.reference) > 0.85
    tau = nib.load(out / "tau.nii.gz")
    assert tau.shape[-1] == 4
