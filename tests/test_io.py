"""Reading rater files and writing results: geometry, errors, atomic writes."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from bayesfuse import io
from bayesfuse.errors import InputError, OutputExistsError


def _write(path, arr, affine=None):
    affine = np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


@pytest.fixture
def three_masks(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        m = (rng.random((10, 12, 6)) > 0.6).astype(np.uint8)
        paths.append(_write(tmp_path / f"r{i}.nii.gz", m))
    return paths


def test_list_of_files(three_masks):
    d = io.load_raters(three_masks)
    assert d.n_raters == 3 and d.kind == "binary"
    assert d.rater_names == ["r0.nii.gz", "r1.nii.gz", "r2.nii.gz"]
    assert d.spacing == (1.5, 1.5, 2.0)
    assert set(d.checksums) == {"r0.nii.gz", "r1.nii.gz", "r2.nii.gz"}


def test_one_4d_file_raters_last(tmp_path):
    rng = np.random.default_rng(1)
    stack = (rng.random((10, 12, 6, 4)) > 0.5).astype(np.uint8)
    p = _write(tmp_path / "all.nii.gz", stack)
    d = io.load_raters([p])
    assert d.n_raters == 4
    np.testing.assert_array_equal(d.binary()[2], stack[..., 2])


def test_tiff_stack_raters_last(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(2)
    stack = rng.random((1, 16, 16, 3)) > 0.5
    tifffile.imwrite(tmp_path / "annots.tif", stack)
    d = io.load_raters(tmp_path / "annots.tif")
    assert d.n_raters == 3 and d.shape == (16, 16) and d.kind == "binary"


def test_png_inverted(tmp_path):
    from PIL import Image

    paths = []
    for i in range(2):
        a = np.full((20, 30), 255, np.uint8)
        a[5:10 + i, 5:15] = 0  # object drawn black
        Image.fromarray(a).convert("RGB").save(tmp_path / f"m{i}.png")
        paths.append(tmp_path / f"m{i}.png")
    d = io.load_raters(paths, invert=True)
    assert d.kind == "binary"
    assert d.binary()[0].sum() == 50 and d.binary()[1].sum() == 60


def test_affine_mismatch_named(three_masks, tmp_path):
    m = np.asarray(nib.load(str(three_masks[0])).dataobj)
    bad = _write(tmp_path / "shifted.nii.gz", m, np.diag([1.5, 1.5, 2.0, 1.0]) + np.array([[0, 0, 0, 5.0], [0] * 4, [0] * 4, [0] * 4]))
    with pytest.raises(InputError, match=r"shifted.nii.gz: affine differs .* from \S*r0.nii.gz.s"):
        io.load_raters([three_masks[0], bad])


def test_truncated_file(three_masks, tmp_path):
    raw = three_masks[1].read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"cut.nii.gz: cannot be read"):
        io.load_raters([three_masks[0], cut])


def test_not_an_image(three_masks, tmp_path):
    junk = tmp_path / "notes.nii.gz"
    junk.write_bytes(gzip.compress(b"hello"))
    with pytest.raises(InputError, match="notes.nii.gz: cannot be read"):
        io.load_raters([three_masks[0], junk])
    with pytest.raises(InputError, match="missing.nii.gz: no such file"):
        io.load_raters([three_masks[0], tmp_path / "missing.nii.gz"])


def test_mask_file_errors_name_the_file(three_masks, tmp_path):
    empty = _write(tmp_path / "roi.nii.gz", np.zeros((10, 12, 6), np.uint8))
    with pytest.raises(InputError, match="roi.nii.gz: the region-of-interest mask is empty"):
        io.load_raters(three_masks, mask=empty)


def test_write_nifti_keeps_affine_and_is_atomic(tmp_path, monkeypatch):
    aff = np.array([[-1.7, 0, 0, 10], [0, -1.7, 0, 20], [0, 0, 1.7, -5], [0, 0, 0, 1]])
    arr = np.random.default_rng(0).random((5, 6, 7)).astype(np.float64)
    out = io.write_nifti(tmp_path / "x.nii.gz", arr, aff)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, aff, atol=1e-6)
    assert img.header.get_xyzt_units()[0] == "mm"

    # A crash during the write leaves the old file intact and no temporary file.
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(RuntimeError):
        io.write_nifti(tmp_path / "x.nii.gz", np.zeros((5, 6, 7)), aff)
    assert sorted(os.listdir(tmp_path)) == ["x.nii.gz"]
    np.testing.assert_allclose(nib.load(str(out)).get_fdata(), arr.astype(np.float32))


def test_write_refuses_overwrite_without_force(tmp_path):
    io.write_nifti(tmp_path / "a.nii.gz", np.zeros((3, 3, 3)), np.eye(4))
    with pytest.raises(OutputExistsError):
        io.write_nifti(tmp_path / "a.nii.gz", np.zeros((3, 3, 3)), np.eye(4), force=False)


def test_two_d_with_extra_axis_gets_singleton_z(tmp_path):
    out = io.write_nifti(tmp_path / "t.nii.gz", np.zeros((4, 5, 3)), np.eye(4), spatial_ndim=2)
    assert nib.load(str(out)).shape == (4, 5, 1, 3)
