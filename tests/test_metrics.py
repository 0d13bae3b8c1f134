"""Overlap and surface-distance metrics: hand-worked values and SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest

from bayesfuse import metrics
from bayesfuse.errors import InputError


# ------------------------------------------------------------------- overlap
A = np.array([[1, 1, 0, 0],
              [0, 1, 0, 0],
              [0, 0, 0, 0]])
B = np.array([[1, 0, 0, 0],
              [1, 1, 1, 0],
              [0, 0, 0, 0]])
# |A| = 3, |B| = 4, |A n B| = 2, 12 voxels: 7 negatives in A.


def test_dice_by_hand():
    assert metrics.dice(A, B) == pytest.approx(2 * 2 / 7)
    assert metrics.dice(A, A) == 1.0
    assert metrics.dice(A, np.zeros_like(A)) == 0.0
    assert metrics.dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert metrics.dice(A.astype(bool), B.astype(np.float32)) == pytest.approx(4 / 7)


def test_dice_with_roi():
    roi = np.zeros_like(A, dtype=bool)
    roi[:, :2] = True  # drops B's voxel (1, 2)
    assert metrics.dice(A, B, roi=roi) == pytest.approx(2 * 2 / 6)


def test_sensitivity_specificity_by_hand():
    # truth A, prediction B: TP 2, FN 1, FP 2, TN 7.
    assert metrics.sensitivity(A, B) == pytest.approx(2 / 3)
    assert metrics.specificity(A, B) == pytest.approx(7 / 9)
    roi = np.ones_like(A, dtype=bool)
    roi[2] = False  # four true negatives leave
    assert metrics.specificity(A, B, roi=roi) == pytest.approx(3 / 5)
    assert metrics.sensitivity(A, B, roi=roi) == pytest.approx(2 / 3)
    empty = np.zeros_like(A)
    assert metrics.sensitivity(empty, B) == 1.0
    assert metrics.specificity(np.ones_like(A), B) == 1.0


def test_soft_dice_by_hand():
    t = np.array([1.0, 0.3, 0.0, 0.0])
    p = np.array([1.0, 0.5, 0.5, 0.0])
    # sum T P = 1.15; 0.5 sum P + 0.5 sum T = 1.0 + 0.65
    assert metrics.soft_dice(t, p) == pytest.approx(1.15 / 1.65)
    assert metrics.soft_dice(t, p, roi=np.array([1, 1, 0, 1])) == pytest.approx(1.15 / 1.4)
    assert metrics.soft_dice(A, B) == pytest.approx(metrics.dice(A, B))
    assert metrics.soft_dice(np.zeros(4), np.zeros(4)) == 1.0


def test_metrics_refuse_bad_input():
    with pytest.raises(InputError, match="binary"):
        metrics.dice(A * 0.5, B)
    with pytest.raises(InputError, match="binary"):
        metrics.hausdorff(A, B * 2, 1.0)
    with pytest.raises(InputError, match="shape"):
        metrics.dice(A, B[:, :3])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        metrics.soft_dice(np.array([0.2, 1.5]), np.array([0.0, 1.0]))
    with pytest.raises(InputError, match="spacing"):
        metrics.hd95(A, B, (1.0, 1.0, 1.0))


# ---------------------------------------------------------- surface distances
def test_surface_distances_by_hand_with_anisotropic_spacing():
    # a = {(0, 0)}, b = {(0, 0), (0, 3)}, spacing (1, 0.5): b's extra voxel is
    # 3 x 0.5 = 1.5 mm from a. Directed: a -> b [0]; b -> a [0, 1.5].
    a = np.zeros((3, 6), bool)
    b = np.zeros((3, 6), bool)
    a[0, 0] = b[0, 0] = b[0, 3] = True
    spacing = (1.0, 0.5)
    d_ab, d_ba = metrics.surface_distances(a, b, spacing)
    np.testing.assert_allclose(d_ab, [0.0])
    np.testing.assert_allclose(np.sort(d_ba), [0.0, 1.5])
    assert metrics.hausdorff(a, b, spacing) == pytest.approx(1.5)
    assert metrics.hd95(a, b, spacing) == pytest.approx(0.95 * 1.5)  # linear interpolation
    assert metrics.mean_surface_distance(a, b, spacing) == pytest.approx(0.5 * (0 + 0.75))


def test_surface_excludes_the_interior():
    # A 5 x 5 square against the 3 x 3 square at its centre, spacing (2, 1):
    # only the rings count. Outer ring -> inner ring: 1 mm along y, 2 mm
    # along x, sqrt(5) mm at the corners; inner ring -> outer ring: 1 or 2.
    a = np.zeros((9, 9), bool)
    b = np.zeros((9, 9), bool)
    a[2:7, 2:7] = True
    b[3:6, 3:6] = True
    spacing = (2.0, 1.0)
    d_ab, d_ba = metrics.surface_distances(a, b, spacing)
    assert d_ab.size == 16 and d_ba.size == 8
    assert sorted(d_ab.tolist()) == pytest.approx([1.0] * 6 + [2.0] * 6 + [np.sqrt(5)] * 4)
    assert sorted(d_ba.tolist()) == pytest.approx([1.0] * 6 + [2.0] * 2)
    assert metrics.hausdorff(a, b, spacing) == pytest.approx(np.sqrt(5))
    assert metrics.mean_surface_distance(a, b, spacing) == pytest.approx(
        0.5 * ((6 + 12 + 4 * np.sqrt(5)) / 16 + 10 / 8))


def test_empty_mask_conventions():
    z = np.zeros((5, 5, 4), bool)
    m = z.copy()
    m[2, 2, 2] = True
    assert metrics.hausdorff(z, z, 1.0) == 0.0 and metrics.hd95(z, z, 1.0) == 0.0
    assert metrics.hausdorff(z, m, 1.0) == np.inf and metrics.hd95(m, z, 1.0) == np.inf
    assert metrics.mean_surface_distance(z, m, 1.0) == np.inf
    assert metrics.mean_surface_distance(z, z, 1.0) == 0.0


def test_roi_masks_both_inputs():
    rng = np.random.default_rng(0)
    a = rng.random((20, 20, 10)) < 0.3
    b = rng.random((20, 20, 10)) < 0.3
    roi = np.zeros(a.shape, bool)
    roi[5:15, 3:18, 2:9] = True
    for fn in (metrics.hausdorff, metrics.hd95, metrics.mean_surface_distance):
        assert fn(a, b, (1.0, 0.7, 2.0), roi=roi) == fn(a & roi, b & roi, (1.0, 0.7, 2.0))


def test_masks_on_the_image_border():
    # The image border counts as outside: a full first slice has a surface.
    a = np.zeros((6, 6, 6), bool)
    a[0] = True
    b = np.zeros_like(a)
    b[:2] = True
    assert metrics.hausdorff(a, b, (1.5, 1.0, 1.0)) == pytest.approx(1.5)


# ------------------------------------------------------------------ SimpleITK
def _ellipsoids(spacing):
    shape = (44, 38, 26)
    axes = [np.arange(n) * h for n, h in zip(shape, spacing)]
    grids = np.meshgrid(*axes, indexing="ij")

    def ellipsoid(centre, radii):
        return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1

    return ellipsoid((18, 22, 27), (9, 10, 13)), ellipsoid((22, 20, 29), (11, 8, 12))


def _sitk_image(sitk, mask, spacing):
    # numpy (x, y, z) order becomes SimpleITK's (z, y, x): reverse the spacing.
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    return img


def test_hausdorff_matches_simpleitk():
    sitk = pytest.importorskip("SimpleITK")
    spacing = (0.9, 1.3, 2.2)
    a, b = _ellipsoids(spacing)
    f = sitk.HausdorffDistanceImageFilter()
    f.Execute(_sitk_image(sitk, a, spacing), _sitk_image(sitk, b, spacing))
    assert metrics.hausdorff(a, b, spacing) == pytest.approx(f.GetHausdorffDistance(), rel=1e-5)
    # Not symmetric in the axes: swapping the spacing changes the answer.
    assert metrics.hausdorff(a, b, spacing[::-1]) != pytest.approx(f.GetHausdorffDistance(), rel=1e-3)


def test_hd95_and_surface_distances_match_simpleitk():
    # The reference in SimpleITK's own terms (as in its segmentation-evaluation
    # notebook): contour voxels (face connectivity) of one mask, sampled in the
    # Maurer distance map of the other's contour.
    sitk = pytest.importorskip("SimpleITK")
    spacing = (0.9, 1.3, 2.2)
    a, b = _ellipsoids(spacing)

    def directed(src, dst):
        cs = sitk.GetArrayFromImage(sitk.LabelContour(_sitk_image(sitk, src, spacing), fullyConnected=False)) > 0
        cd = sitk.LabelContour(_sitk_image(sitk, dst, spacing), fullyConnected=False)
        dm = sitk.SignedMaurerDistanceMap(cd, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
        return np.abs(sitk.GetArrayFromImage(dm))[cs]

    ref_ab, ref_ba = directed(a, b), directed(b, a)
    d_ab, d_ba = metrics.surface_distances(a, b, spacing)
    np.testing.assert_allclose(np.sort(d_ab), np.sort(ref_ab), atol=1e-4)
    np.testing.assert_allclose(np.sort(d_ba), np.sort(ref_ba), atol=1e-4)
    expected = max(np.percentile(ref_ab, 95), np.percentile(ref_ba, 95))
    assert metrics.hd95(a, b, spacing) == pytest.approx(expected, abs=1e-4)
    assert metrics.hd95(a, b, spacing) < metrics.hausdorff(a, b, spacing)
