"""FusionResult: schema, raters table, save/load, atomic saving."""

import os

import nibabel as nib
import numpy as np
import pytest
import xarray as xr

from bayesfuse.data import RaterMaps
from bayesfuse.errors import OutputExistsError
from bayesfuse.models.baselines import Config
from bayesfuse.result import FusionResult


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return RaterMaps.from_arrays([(rng.random((6, 7, 4)) > 0.5) for _ in range(3)], spacing=(1, 2, 3))


def _result(data, k=2):
    rng = np.random.default_rng(1)
    prob = rng.dirichlet(np.ones(k), size=data.shape).astype(np.float32)
    return FusionResult.build(
        method="mean", data=data, config=Config(), probability=prob,
        raters={"sensitivity": ("rater", [0.9, 0.8, 0.7]),
                "confusion": (("rater", "true_class", "rater_class"), rng.random((3, 2, 2)))},
        maps={"tau": (("rater", "x", "y", "z"), rng.random((3, *data.shape)).astype(np.float32))},
        objective=[-10.0, -5.0, -4.9], converged=True, stop_reason="tol",
    )


def test_schema_and_accessors(data):
    r = _result(data)
    assert set(r.tree.children) == {"consensus", "raters", "maps", "optimizer"}
    assert r.consensus.dims == ("x", "y", "z")
    assert r.probability.dims == ("x", "y", "z", "class")
    np.testing.assert_array_equal(r.labels.values, np.argmax(r.probability.values, axis=-1))
    assert r.converged is True and r.n_iter == 3
    np.testing.assert_allclose(r.affine[:3, :3], np.diag([1, 2, 3]))
    t = r.raters
    assert list(t.index) == data.rater_names
    assert list(t.columns) == ["sensitivity", "confusion_0_0", "confusion_0_1", "confusion_1_0", "confusion_1_1"]
    np.testing.assert_allclose(t["confusion_1_0"], r.tree["raters"]["confusion"].values[:, 1, 0])


def test_k_classes_consensus_keeps_class_dim(data):
    r = _result(data, k=3)
    assert r.consensus.dims == ("x", "y", "z", "class")


def test_nan_consensus_refused(data):
    prob = np.full(data.shape, np.nan)
    with pytest.raises(FloatingPointError, match="NaN"):
        FusionResult.build(method="mean", data=data, config=Config(), probability=prob)


def test_save_load_round_trip(data, tmp_path):
    r = _result(data)
    written = r.save(tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == ["consensus.nii.gz", "labels.nii.gz", "raters.csv", "result.nc", "tau.nii.gz"]
    tau = nib.load(str(tmp_path / "out" / "tau.nii.gz"))
    assert tau.shape == (*data.shape, 3)  # raters on the last axis
    np.testing.assert_allclose(tau.get_fdata()[..., 1], r.tree["maps"]["tau"].values[1], rtol=1e-6)
    back = FusionResult.load(tmp_path / "out")
    xr.testing.assert_allclose(back.consensus, r.consensus)
    assert back.raters.equals(r.raters) or np.allclose(back.raters.values, r.raters.values)
    assert back.config == {"rule": "majority-vote", "ties": "highest"}
    assert [p for p in os.listdir(tmp_path / "out") if p.startswith(".")] == []


def test_save_refuses_overwrite(data, tmp_path):
    r = _result(data)
    r.save(tmp_path)
    with pytest.raises(OutputExistsError):
        r.save(tmp_path)
    r.save(tmp_path, force=True)


def test_crash_while_saving_leaves_nothing(data, tmp_path, monkeypatch):
    import bayesfuse.result as result_mod

    def boom(tree, path):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(result_mod, "write_tree", boom)
    with pytest.raises(OSError):
        _result(data).save(tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


def test_array_input_hashed_only_when_saved(data, tmp_path, monkeypatch):
    calls = []
    real = RaterMaps.checksum
    monkeypatch.setattr(RaterMaps, "checksum", lambda self: calls.append(1) or real(self))
    r = _result(data)
    assert calls == [] and "input_checksum" not in r.tree.attrs
    r.save(tmp_path / "o")
    assert calls == [1]
    assert FusionResult.load(tmp_path / "o").tree.attrs["input_checksum"] == real(data)


def test_file_input_identified_by_file_checksums(data):
    a = RaterMaps.from_arrays(list(data.maps.values), checksums={"r0.nii.gz": "aa", "r1.nii.gz": "bb", "r2.nii.gz": "cc"})
    b = RaterMaps.from_arrays(list(data.maps.values), checksums={"r0.nii.gz": "aa", "r1.nii.gz": "bb", "r2.nii.gz": "cd"})
    assert a.checksum() != b.checksum()
    r = FusionResult.build(method="mean", data=a, config=Config(), probability=np.zeros(data.shape))
    assert r.tree.attrs["input_checksum"] == a.checksum()
