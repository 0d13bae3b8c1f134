"""Loaders of the real data sets (skipped where ../shared/data is absent)."""

import numpy as np
import pytest

from bayesfuse import datasets

pytestmark = pytest.mark.data


def _dice(a, b):
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


def test_align_crop_recovers_offset():
    rng = np.random.default_rng(0)
    target = np.zeros((60, 80), np.uint8)
    target[20:35, 30:52] = 1
    target[rng.integers(0, 60, 20), rng.integers(0, 80, 20)] = 1
    crop = target[12:45, 25:70].copy()
    assert datasets.align_crop(crop, target) == (12, 25)


def test_bubil_crowd_masks_aligned_on_image_grid(shared_data):
    case = datasets.bubil_case("B01", root=shared_data)
    groups = case.groups
    assert sum(g == "expert" for g in groups.values()) == 10
    assert sum(g == "crowd" for g in groups.values()) == 7
    masks = case.raters.binary()
    assert masks.shape[1:] == case.raters.image.shape
    # Aligned crowd masks overlap the gold standard as well as raters do,
    # which they could not at a wrong offset (unaligned Dice is ~0).
    crowd = [m for n, m in zip(case.raters.rater_names, masks) if groups[n] == "crowd"]
    assert min(_dice(m, case.reference) for m in crowd) > 0.7


def test_bubil_gold_standard_is_one_expert(shared_data):
    case = datasets.bubil_case("B05", raters="experts", root=shared_data)
    d = {n: _dice(m, case.reference) for n, m in zip(case.raters.rater_names, case.raters.binary())}
    equal = {n for n, v in d.items() if v > 0.999}
    assert equal == {f"expert/{r}" for r in datasets.BUBIL_GOLD_RATERS}
    held_out = datasets.bubil_case("B05", raters="experts", root=shared_data, exclude_gold_rater=True)
    assert held_out.raters.n_raters == 8
    rest = {n: _dice(m, held_out.reference) for n, m in zip(held_out.raters.rater_names, held_out.raters.binary())}
    assert max(rest.values()) < 0.99


def test_lidc_reference_is_majority_vote_ties_to_foreground(shared_data):
    ids = datasets.lidc_cases("test", shared_data, min_raters=4)[:10]
    assert ids
    for cid in ids:
        case = datasets.lidc_case(cid, "test", shared_data)
        votes = case.raters.binary().sum(0)
        np.testing.assert_array_equal(case.reference, (2 * votes >= case.raters.n_raters).astype(np.uint8))


def test_liver(shared_data):
    case = datasets.liver_tumor(shared_data)
    assert case.raters.n_raters == 3 and case.raters.image is not None
    assert case.raters.spacing == pytest.approx((1.73431,) * 3, rel=1e-5)


def test_export_case_writes_one_suffix(tmp_path):
    # rater names read from files keep their suffix (the liver case's Patient01Homo_Rad01.nii.gz)
    from bayesfuse.data import RaterMaps

    m = np.zeros((2, 8, 8, 4), dtype=np.uint8)
    m[:, 2:6, 2:6, 1:3] = 1
    raters = RaterMaps.from_arrays(m, kind="binary", names=["Rad01.nii.gz", "Rad02.tif"])
    case = datasets.Case("c", raters, groups={"Rad01.nii.gz": "expert", "Rad02.tif": "expert"})
    written = datasets.export_case(case, tmp_path)
    assert sorted(p.name for p in written) == ["Rad01.nii.gz", "Rad02.nii.gz", "groups.csv"]
    assert (tmp_path / "groups.csv").read_text().splitlines()[1:] == ["Rad01.nii.gz,expert", "Rad02.nii.gz,expert"]
