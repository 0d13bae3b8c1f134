"""RaterMaps: kinds, views, validation of bad input."""

import numpy as np
import pytest

from bayesfuse.data import RaterMaps
from bayesfuse.errors import InputError


@pytest.fixture
def masks():
    rng = np.random.default_rng(0)
    return [(rng.random((8, 9, 5)) > 0.5).astype(np.uint8) for _ in range(3)]


def test_binary_masks_are_held_compactly(masks):
    d = RaterMaps.from_arrays(masks, spacing=(1.0, 2.0, 3.0))
    assert d.kind == "binary" and d.n_classes == 2
    assert d.maps.dims == ("rater", "x", "y", "z")
    assert d.maps.dtype == np.uint8
    assert d.shape == (8, 9, 5) and d.n_raters == 3
    np.testing.assert_allclose(np.diag(d.affine)[:3], [1, 2, 3])
    p = d.probabilities()
    assert p.shape == (3, 8, 9, 5, 2)
    np.testing.assert_array_equal(p[..., 1], np.stack(masks))
    np.testing.assert_array_equal(d.foreground(), np.stack(masks))


def test_two_dimensional(masks):
    d = RaterMaps.from_arrays([m[..., 0] for m in masks])
    assert d.spatial_dims == ("x", "y") and d.ndim == 2


def test_0_255_masks_recognised(masks, caplog):
    caplog.set_level("INFO")
    d = RaterMaps.from_arrays([m * 255 for m in masks])
    assert d.kind == "binary"
    np.testing.assert_array_equal(d.binary(), np.stack(masks))
    assert "0, 255" in caplog.text


def test_labels_with_k_classes():
    rng = np.random.default_rng(1)
    labs = [rng.integers(0, 4, size=(6, 6, 3)) for _ in range(3)]
    d = RaterMaps.from_arrays(labs)
    assert d.kind == "labels" and d.n_classes == 4
    p = d.probabilities()
    np.testing.assert_array_equal(np.argmax(p, axis=-1), np.stack(labs))
    with pytest.raises(InputError, match="binary"):
        d.binary()


def test_label_outside_declared_classes():
    labs = [np.zeros((4, 4), int), np.full((4, 4), 3)]
    with pytest.raises(InputError, match=r"rater1: label value 3 outside the declared classes 0..2"):
        RaterMaps.from_arrays(labs, n_classes=3)


def test_binary_declared_refuses_labels():
    labs = [np.zeros((4, 4), int), np.full((4, 4), 2)]
    with pytest.raises(InputError, match="must be 0/1"):
        RaterMaps.from_arrays(labs, kind="binary", names=["a.nii.gz", "b.nii.gz"])


def test_probability_maps_with_class_axis():
    rng = np.random.default_rng(2)
    probs = [rng.dirichlet(np.ones(3), size=(5, 6, 4)).astype(np.float32) for _ in range(2)]
    d = RaterMaps.from_arrays(probs)
    assert d.kind == "probability" and d.n_classes == 3 and d.has_class_axis
    assert d.maps.dims[-1] == "class"


def test_classes_must_sum_to_one():
    rng = np.random.default_rng(3)
    good = rng.dirichlet(np.ones(3), size=(5, 6, 4))
    bad = good.copy()
    bad[0, 0, 0] = [0.5, 0.5, 0.5]
    with pytest.raises(InputError, match=r"b: class probabilities do not sum to 1 on 1 voxel"):
        RaterMaps.from_arrays([good, bad], names=["a", "b"])


@pytest.mark.parametrize("bad_value, message", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                                                (1.5, r"outside \[0, 1\]"), (-0.1, "negative")])
def test_bad_values(bad_value, message):
    a = np.full((4, 4, 4), 0.3, dtype=np.float32)
    b = a.copy()
    b[1, 2, 3] = bad_value
    with pytest.raises(InputError, match=f"second.nii.gz: .*{message}"):
        RaterMaps.from_arrays([a, b], names=["first.nii.gz", "second.nii.gz"])


def test_shape_mismatch():
    with pytest.raises(InputError, match=r"r1: shape \(4, 5\) differs from r0's \(4, 4\)"):
        RaterMaps.from_arrays([np.zeros((4, 4)), np.zeros((4, 5))], names=["r0", "r1"])


def test_fewer_than_two_raters():
    with pytest.raises(InputError, match="1 rater\\(s\\) given; fusion needs at least 2"):
        RaterMaps.from_arrays([np.zeros((4, 4))])


def test_mask_and_image_checked(masks):
    with pytest.raises(InputError, match="mask: the region-of-interest mask is empty"):
        RaterMaps.from_arrays(masks, mask=np.zeros((8, 9, 5)))
    with pytest.raises(InputError, match="image: shape"):
        RaterMaps.from_arrays(masks, image=np.zeros((8, 9)))
    with pytest.raises(InputError, match="mask: a region-of-interest mask must hold only 0 and 1"):
        RaterMaps.from_arrays(masks, mask=np.full((8, 9, 5), 0.5))
    d = RaterMaps.from_arrays(masks, mask=np.ones((8, 9, 5)), image=np.ones((8, 9, 5)))
    assert d.roi().dtype == bool and d.image.dims == ("x", "y", "z")


def test_mixed_binary_and_probability_become_probability(masks):
    p = np.full(masks[0].shape, 0.25, dtype=np.float32)
    d = RaterMaps.from_arrays([masks[0], p])
    assert d.kind == "probability" and d.maps.dtype == np.float32
    np.testing.assert_array_equal(d.foreground()[0], masks[0])


def test_subset_and_checksum(masks):
    d = RaterMaps.from_arrays(masks)
    s = d.subset(["rater2", 0])
    assert s.rater_names == ["rater2", "rater0"]
    assert d.checksum() != s.checksum()
    assert d.checksum() == RaterMaps.from_arrays(masks).checksum()


# ---------------------------------------------------------------- downsample
def test_downsample_mean_is_the_block_average_with_partial_blocks():
    rng = np.random.default_rng(3)
    masks = [(rng.random((9, 6, 5)) > 0.6).astype(np.uint8) for _ in range(3)]
    aff = np.diag([0.5, 1.0, 2.0, 1.0])
    aff[:3, 3] = [10.0, -4.0, 7.0]
    d = RaterMaps.from_arrays(masks, affine=aff, image=rng.random((9, 6, 5)))
    s = d.downsample(4)
    assert s.kind == "probability" and s.shape == (3, 2, 2) and s.spacing == (2.0, 4.0, 8.0)
    m = np.stack(masks).astype(float)
    # the last block along x holds one voxel (9 = 4 + 4 + 1), along z one (5 = 4 + 1)
    assert s.maps.values[1, 2, 1, 1] == pytest.approx(m[1, 8:9, 4:6, 4:5].mean())
    assert s.maps.values[2, 0, 0, 0] == pytest.approx(m[2, :4, :4, :4].mean())
    assert s.image.values[1, 0, 1] == pytest.approx(d.image.values[4:8, :4, 4:5].mean())
    # the new origin is the centre of the first block in world coordinates
    np.testing.assert_allclose(s.affine[:3, 3], aff[:3, :3] @ [1.5, 1.5, 1.5] + aff[:3, 3])


def test_downsample_majority_and_stride_keep_hard_labels():
    block = np.zeros((2, 2, 2), dtype=np.uint8)
    block.flat[:3] = 2
    block.flat[3:6] = 1          # 3 x label 2, 3 x label 1, 2 x label 0: a tie goes to 1
    other = np.zeros((2, 2, 2), dtype=np.uint8)
    other.flat[:5] = 2
    d = RaterMaps.from_arrays([block, other], n_classes=3)
    maj = d.downsample(2, "majority")
    assert maj.kind == "labels" and maj.shape == (1, 1, 1)
    assert maj.maps.values.ravel().tolist() == [1, 2]
    frac = d.downsample(2)
    assert frac.has_class_axis and frac.n_classes == 3
    np.testing.assert_allclose(frac.maps.values[0, 0, 0, 0], [2 / 8, 3 / 8, 3 / 8])
    big = RaterMaps.from_arrays([np.arange(60).reshape(6, 5, 2) % 2 for _ in range(2)])
    st = big.downsample((3, 2, 2), "stride")
    # centre of each block: offsets 1 (x), 1 (y, clipped to 4 in the last partial block), 1 (z)
    np.testing.assert_array_equal(st.maps.values[0], big.maps.values[0][np.ix_([1, 4], [1, 3, 4], [1])])


def test_downsample_refuses_what_it_cannot_do():
    rng = np.random.default_rng(4)
    prob = RaterMaps.from_arrays([rng.random((6, 6, 4)).astype(np.float32) for _ in range(2)])
    with pytest.raises(InputError, match="majority needs hard labels"):
        prob.downsample(2, "majority")
    with pytest.raises(InputError, match="positive integer"):
        prob.downsample(0)
    with pytest.raises(InputError, match="how must be"):
        prob.downsample(2, "median")
    roi = np.zeros((6, 6, 4), dtype=np.uint8)
    roi[:3, :3, :2] = 1
    d = RaterMaps.from_arrays([rng.random((6, 6, 4)).astype(np.float32) for _ in range(2)], mask=roi)
    np.testing.assert_array_equal(d.downsample(3).roi()[:, :, 0], [[True, False], [False, False]])
