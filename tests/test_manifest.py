"""Reading a study: CSV manifests and the folder layout (bayesfuse.manifest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bayesfuse.errors import InputError
from bayesfuse.io import write_nifti
from bayesfuse.manifest import Subject, read_csv, read_folder, read_manifest


def _mask(seed: int, shape=(12, 10, 8)) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) < 0.4).astype(np.uint8)


def _nifti(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(path, arr, np.diag([0.8, 0.8, 2.0, 1.0]))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------- CSV
def test_csv_columns_paths_and_names(tmp_path):
    d = tmp_path / "study"
    d.mkdir()
    absolute = tmp_path / "elsewhere" / "b_r2.nii.gz"
    csv = _write(d / "m.csv", "\ufeffSubject , rater_alice,rater: bob,ROI,truth,site,image\n"
                 f"a,a/r1.nii.gz,a/r2.nii.gz,a/roi.nii.gz,a/gt.nii.gz,paris,\n"
                 "# commented,x.nii.gz,,,,,\n"
                 "\n"
                 f"b,,{absolute},,,lyon,b/ct.nii.gz\n")
    m = read_manifest(csv)
    assert m.ids == ["a", "b"]
    a, b = m["a"], m["b"]
    # Relative paths are relative to the CSV's folder, whatever the cwd.
    assert a.raters == (d / "a/r1.nii.gz", d / "a/r2.nii.gz")
    assert a.rater_names == ("rater_alice", "bob")
    assert a.mask == d / "a/roi.nii.gz" and a.reference == d / "a/gt.nii.gz" and a.image is None
    assert a.meta == {"site": "paris"}
    # An empty cell: that rater did not segment this subject.
    assert b.raters == (absolute,) and b.rater_names == ("bob",)
    assert b.image == d / "b/ct.nii.gz" and b.mask is None
    assert m.rater_names == ["rater_alice", "bob"]
    assert set(a.files()) == {"rater:rater_alice", "rater:bob", "mask", "reference"}


@pytest.mark.parametrize("text, problem", [
    ("id,rater1\na,x.nii\n", "no 'subject' column"),
    ("subject,image\na,x.nii\n", "no rater column"),
    ("subject,rater1,Rater1\na,x,y\n", "repeated column(s) rater1"),
    ("subject,rater1,mask,roi\na,x,m,r\n", "all give the mask"),
    ("subject,rater:ann,rater: ann\na,x,y\n", "several columns name rater(s) ann"),
    ("subject,rater1\na,x.nii\nA,y.nii\n", "repeats 'a'"),
    ("subject,rater1\na/b,x.nii\n", "cannot name an output folder"),
    ("subject,rater1\n.hidden,x.nii\n", "cannot name an output folder"),
    ("subject,rater1\nsummary.csv,x.nii\n", "cannot name an output folder"),
    ("subject,rater1\n,x.nii\n", "empty subject id"),
    ("subject,rater1\na,x.nii,extra\n", "3 cells for 2 columns"),
    ("subject,rater1,rater2\na,,\n", "lists no rater file"),
    ("subject,rater1\n", "lists no subject"),
    ("\n\n", "the manifest is empty"),
])
def test_csv_refused_with_file_and_problem(tmp_path, text, problem):
    csv = _write(tmp_path / "m.csv", text)
    with pytest.raises(InputError) as e:
        read_manifest(csv)
    msg = str(e.value)
    assert "m.csv" in msg and problem in msg and "\n" not in msg


def test_csv_errors_name_the_line(tmp_path):
    csv = _write(tmp_path / "m.csv", "subject,rater1\nok,x.nii\nbad/id,y.nii\n")
    with pytest.raises(InputError, match=r"m\.csv, line 3: subject id 'bad/id'"):
        read_csv(csv)


def test_not_a_text_file_and_missing_path(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe binary")
    with pytest.raises(InputError, match="not a UTF-8 text file"):
        read_manifest(p)
    with pytest.raises(InputError, match="no such manifest file or study folder"):
        read_manifest(tmp_path / "absent.csv")


def test_files_are_not_checked_when_reading(tmp_path):
    # A missing file fails its subject at load time, not the whole study.
    m = read_manifest(_write(tmp_path / "m.csv", "subject,rater1,rater2\na,gone1.nii.gz,gone2.nii.gz\n"))
    with pytest.raises(InputError, match="gone1.nii.gz: no such file"):
        m["a"].load()


# ------------------------------------------------------------------- folder
def test_folder_layouts(tmp_path):
    root = tmp_path / "study"
    # raters/ sub-folder: only images count, sorted by name.
    for name in ("zed", "amy"):
        _nifti(root / "s1" / "raters" / f"{name}.nii.gz", _mask(1))
    (root / "s1" / "raters" / "notes.txt").write_text("not an image")
    _nifti(root / "s1" / "mask.nii.gz", np.ones((12, 10, 8), np.uint8))
    _nifti(root / "s1" / "reference.nii.gz", _mask(2))
    # Flat, as `bayesfuse datasets ... --out STUDY/<subject>` writes it.
    for name in ("r1", "r2", "r3"):
        _nifti(root / "s2" / f"{name}.nii.gz", _mask(3))
    _nifti(root / "s2" / "image.nii.gz", _mask(4).astype(np.float32))
    _nifti(root / "s2" / "truth.nii.gz", _mask(5))
    (root / "s2" / "groups.csv").write_text("rater,group\n")
    # Not subjects: hidden, or holding no image.
    _nifti(root / ".cache" / "r.nii.gz", _mask(6))
    (root / "docs").mkdir()
    (root / "docs" / "README.txt").write_text("x")

    m = read_manifest(root)
    assert m.ids == ["s1", "s2"]
    s1, s2 = m["s1"], m["s2"]
    assert s1.rater_names == ("amy", "zed") and s1.raters[0] == root / "s1/raters/amy.nii.gz"
    assert s1.mask == root / "s1/mask.nii.gz" and s1.reference == root / "s1/reference.nii.gz" and s1.image is None
    assert s2.rater_names == ("r1", "r2", "r3")
    assert s2.image == root / "s2/image.nii.gz" and s2.reference == root / "s2/truth.nii.gz"


def test_folder_refusals(tmp_path):
    root = tmp_path / "study"
    (root / "empty").mkdir(parents=True)
    with pytest.raises(InputError, match="no subject found"):
        read_folder(root)
    _nifti(root / "s1" / "r1.nii.gz", _mask(1))
    _nifti(root / "s1" / "image.nii.gz", _mask(1))
    _nifti(root / "s1" / "image.nii", _mask(1))
    with pytest.raises(InputError, match="study/s1: several files give the image: image.nii, image.nii.gz"):
        read_folder(root)
    (root / "s2" / "raters").mkdir(parents=True)
    (root / "s1" / "image.nii").unlink()
    with pytest.raises(InputError, match="study/s2/raters: holds no image file"):
        read_folder(root)


def test_folder_to_csv_round_trip(tmp_path):
    root = tmp_path / "study"
    for s in ("p1", "p2"):
        for r in ("a", "b"):
            _nifti(root / s / "raters" / f"{r}.nii.gz", _mask(7))
        _nifti(root / s / "reference.nii.gz", _mask(8))
    m = read_folder(root)
    back = read_csv(m.write_csv(tmp_path / "frozen.csv"))
    assert back.subjects == m.subjects
    # Rater names that do not start with "rater" get the prefix "rater:", which reading strips.
    assert (tmp_path / "frozen.csv").read_text().splitlines()[0] == "subject,rater:a,rater:b,reference"


# ----------------------------------------------------------------- subjects
def test_subject_load_names_raters_as_the_manifest(tmp_path):
    truth = _mask(9)
    files = [_nifti(tmp_path / f"seg_{i}.nii.gz", _mask(10 + i)) for i in range(3)]
    roi = _nifti(tmp_path / "roi.nii.gz", np.ones_like(truth))
    ref = _nifti(tmp_path / "gt.nii.gz", truth)
    s = Subject(id="x", raters=tuple(files), rater_names=("alice", "bob", "carol"), mask=roi, reference=ref)
    data = s.load()
    assert data.rater_names == ["alice", "bob", "carol"]
    assert data.sources == tuple(map(str, files))  # errors still name the files
    np.testing.assert_array_equal(data.maps.values[1], _mask(11))
    assert data.roi() is not None and data.roi().all()
    np.testing.assert_array_equal(s.load_reference(data.shape), truth)
    with pytest.raises(InputError, match=r"gt.nii.gz: reference shape \(12, 10, 8\) differs from the raters' \(4, 4, 4\)"):
        s.load_reference((4, 4, 4))
    prob = _nifti(tmp_path / "soft.nii.gz", np.full(truth.shape, 0.3, np.float32))
    with pytest.raises(InputError, match="soft.nii.gz: the reference must hold labels"):
        Subject(id="x", raters=s.raters, rater_names=s.rater_names, reference=prob).load_reference(truth.shape)


def test_subject_with_one_4d_file_numbers_its_raters(tmp_path):
    stack = np.stack([_mask(i) for i in range(3)], axis=-1)
    f = _nifti(tmp_path / "all.nii.gz", stack)
    data = Subject(id="x", raters=(f,), rater_names=("raters",)).load()
    assert data.n_raters == 3
    assert data.rater_names == ["raters[0]", "raters[1]", "raters[2]"]
    np.testing.assert_array_equal(data.maps.values[2], _mask(2))
