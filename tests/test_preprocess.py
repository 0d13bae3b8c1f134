"""Binary masks to probabilities (Euclidean, geodesic) and soft dilation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.special import expit

from bayesfuse import api, metrics, preprocess as pp
from bayesfuse.data import RaterMaps
from bayesfuse.errors import ConfigError, InputError


def _radius(shape, spacing, centre):
    axes = [(np.arange(n) - c) * h for n, h, c in zip(shape, spacing, centre)]
    grids = np.meshgrid(*axes, indexing="ij")
    return np.sqrt(sum(g * g for g in grids))


# ----------------------------------------------------------------- signed distance
@pytest.mark.parametrize("axis, spacing", [(0, (0.7, 1.3)), (1, (0.7, 1.3))])
def test_signed_distance_half_plane_is_exact_in_mm(axis, spacing):
    # A planar boundary between voxels 9 and 10 along `axis`: the distance
    # of voxel i is (i - 9.5) * h exactly, negative inside.
    shape = (20, 16)
    idx = np.indices(shape)[axis]
    d = pp.signed_distance(idx < 10, spacing)
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, (idx - 9.5) * spacing[axis], atol=1e-5)


def test_signed_distance_honours_slice_thickness():
    z = np.indices((12, 10, 9))[2]
    d = pp.signed_distance(z < 4, (0.8, 0.8, 3.0))
    np.testing.assert_allclose(d, (z - 3.5) * 3.0, atol=1e-5)
    # The first voxels on either side sit half a slice from the boundary.
    assert d[5, 5, 3] == pytest.approx(-1.5) and d[5, 5, 4] == pytest.approx(1.5)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5), (2.2, 0.7, 1.1)])
def test_signed_distance_of_a_sphere(spacing):
    shape = tuple(int(60 / h) for h in spacing)
    centre = [n / 2 - 0.37 for n in shape]
    r = _radius(shape, spacing, centre)
    radius = 11.3
    d = pp.signed_distance(r <= radius, spacing).astype(float)
    truth = r - radius
    near = np.abs(truth) < 8
    err = d[near] - truth[near]
    # The voxelised sphere is known to half a voxel (half a slice at the
    # poles); fast marching adds a few tenths of a mm.
    assert np.abs(err).max() < 0.5 * max(spacing) + 0.5
    assert np.abs(err).mean() < 0.3 and abs(err.mean()) < 0.1
    assert np.all(d[r <= radius] < 0) and np.all(d[r > radius] > 0)


def test_signed_distance_of_a_disc_2d():
    spacing = (0.5, 0.5)
    r = _radius((80, 80), spacing, (40.2, 39.7))
    d = pp.signed_distance(r <= 12.0, spacing).astype(float)
    near = np.abs(r - 12.0) < 6
    assert np.abs(d[near] - (r[near] - 12.0)).max() < 0.3


def test_signed_distance_empty_and_full():
    assert np.all(pp.signed_distance(np.zeros((6, 7)), 1.0) == np.inf)
    assert np.all(pp.signed_distance(np.ones((6, 7, 5), dtype=bool), 1.0) == -np.inf)


def test_signed_distance_band_agrees_with_full_computation():
    spacing = (1.0, 1.2, 1.7)
    r = _radius((50, 44, 30), spacing, (20, 21, 14))
    mask = r <= 6
    full = pp.signed_distance(mask, spacing)
    banded = pp.signed_distance(mask, spacing, band=5.0)
    inside_band = np.abs(full) <= 5.0
    np.testing.assert_allclose(banded[inside_band], full[inside_band], atol=1e-5)
    assert np.all(np.isinf(banded[~inside_band]))
    assert np.all(np.sign(banded[~inside_band]) == np.sign(full[~inside_band]))


def test_signed_distance_refuses_bad_input():
    with pytest.raises(InputError, match="binary"):
        pp.signed_distance(np.array([[0, 1], [2, 0]]), 1.0)
    with pytest.raises(InputError, match="spacing"):
        pp.signed_distance(np.zeros((4, 4)), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="2-D or 3-D"):
        pp.signed_distance(np.zeros(5), 1.0)


# ---------------------------------------------------------------- sigmoid maps
def _blob(spacing=(1.0, 1.0, 2.0), shape=(40, 40, 20)):
    r = _radius(shape, spacing, [n / 2 for n in shape])
    return r <= 8.5, spacing


def test_euclidean_probability_is_the_sigmoid_of_the_distance_and_monotone():
    mask, spacing = _blob()
    p = pp.euclidean_probability(mask, spacing, slope=0.8)
    d = pp.signed_distance(mask, spacing).astype(float)
    assert p.dtype == np.float32
    finite = np.abs(d) < pp.SATURATION / 0.8
    np.testing.assert_allclose(p[finite], expit(-0.8 * d[finite]), atol=1e-6)
    order = np.argsort(d, axis=None, kind="stable")
    assert np.all(np.diff(p.ravel()[order].astype(float)) <= 1e-7)
    # Thresholding one rater's map returns its mask.
    np.testing.assert_array_equal(p > 0.5, mask)


def test_euclidean_probability_is_one_half_on_the_boundary():
    x = np.indices((20, 8))[0]
    p = pp.euclidean_probability(x < 10, (0.6, 1.0), slope=1.3)
    # Voxels 9 and 10 sit +-0.3 mm from the boundary: symmetric about 0.5.
    assert p[9, 0] + p[10, 0] == pytest.approx(1.0, abs=1e-6)
    assert p[9, 0] == pytest.approx(expit(1.3 * 0.3), abs=1e-6)


def test_slope_sharpens_the_map():
    mask, spacing = _blob()
    soft = pp.euclidean_probability(mask, spacing, slope=0.5)
    hard = pp.euclidean_probability(mask, spacing, slope=2.0)
    live = (hard > 1e-6) & (hard < 1 - 1e-6)
    assert live.sum() > 100
    assert np.all(np.abs(hard[live] - 0.5) > np.abs(soft[live] - 0.5))


def test_sigmoid_maps_saturate_exactly_far_away():
    mask, spacing = _blob(shape=(80, 40, 20))
    p = pp.euclidean_probability(mask, spacing, slope=2.0)
    d = pp.signed_distance(mask, spacing)
    assert np.all(p[d > pp.SATURATION / 2.0] == 0.0)
    assert p[d < 0].min() > 0.5


def test_sigmoid_maps_of_empty_and_full_masks():
    img = np.random.default_rng(0).normal(size=(12, 10, 6))
    for fn in (lambda m: pp.euclidean_probability(m, 1.0),
               lambda m: pp.geodesic_probability(m, img, 1.0)):
        zero, one = fn(np.zeros(img.shape)), fn(np.ones(img.shape))
        assert np.all(zero == 0.0) and np.all(one == 1.0)
        assert not np.isnan(zero).any() and not np.isnan(one).any()


def test_bad_slope_is_a_config_error():
    with pytest.raises(ConfigError, match="slope"):
        pp.euclidean_probability(np.eye(5), 1.0, slope=0)
    with pytest.raises(ConfigError, match="slope"):
        pp.euclidean_probability(np.eye(5), 1.0, slope="steep")


# -------------------------------------------------------------------- geodesic
def test_geodesic_equals_euclidean_without_edges():
    mask, spacing = _blob()
    euclid = pp.signed_distance(mask, spacing)
    flat = np.full(mask.shape, 7.0)
    np.testing.assert_allclose(pp.geodesic_signed_distance(mask, flat, spacing), euclid, atol=1e-5)
    noisy = np.random.default_rng(1).normal(size=mask.shape)
    np.testing.assert_allclose(pp.geodesic_signed_distance(mask, noisy, spacing, edge_weight=0), euclid, atol=1e-5)


def test_geodesic_distance_adds_the_cost_of_crossing_an_edge():
    # A straight step edge at x = 24.5 (bright left) and a rater whose
    # boundary lies at x = 15.5: along x, the geodesic distance is the
    # integral of the cost, i.e. the Euclidean distance plus
    # int (sqrt(1 + (w g / scale)^2) - 1) dx over the edge.
    shape, spacing = (48, 6, 5), (0.9, 1.0, 1.2)
    x = np.indices(shape)[0]
    image = np.where(x < 25, 3.0, 1.0)
    mask = x < 16
    w, scale = 5.0, 2.0
    geo = pp.geodesic_signed_distance(mask, image, spacing, edge_weight=w, scale=scale).astype(float)
    euc = pp.signed_distance(mask, spacing).astype(float)
    cost = pp.geodesic_cost(image, spacing, scale=scale, edge_weight=w)[:, 2, 2]
    extra = np.concatenate([[0.0], np.cumsum(0.5 * (cost[1:] + cost[:-1]) - 1.0) * spacing[0]])
    expected = euc[:, 2, 2] + (extra - extra[15:17].mean())
    # Fast marching integrates the steep cost to about 1 % inside the edge,
    # and to a few hundredths of a mm once past it.
    np.testing.assert_allclose(geo[16:, 2, 2], expected[16:], rtol=0.02, atol=0.05)
    np.testing.assert_allclose(geo[30:, 2, 2], expected[30:], atol=0.05)
    beyond = geo[40, 2, 2] - euc[40, 2, 2]
    assert 2.0 < beyond < w  # at most w * (contrast / scale); the smoothing takes some
    # Inside the rater's mask, away from the edge, nothing changes.
    np.testing.assert_allclose(geo[:14], euc[:14], atol=1e-5)


def test_geodesic_probability_drops_across_an_edge():
    shape, spacing = (48, 6, 5), (1.0, 1.0, 1.0)
    x = np.indices(shape)[0]
    image = np.where(x < 25, 3.0, 1.0)
    mask = x < 16
    pe = pp.euclidean_probability(mask, spacing)
    pg = pp.geodesic_probability(mask, image, spacing, scale=2.0, edge_weight=5.0)
    np.testing.assert_array_equal(pg > 0.5, mask)
    assert np.all(pg[28:34] < pe[28:34]) and np.all(pg[28:] <= pe[28:])
    np.testing.assert_allclose(pg[:14], pe[:14], atol=1e-6)


def test_intensity_scale_is_the_object_contrast():
    rng = np.random.default_rng(3)
    mask, spacing = _blob()
    for contrast, offset in ((200.0, -1000.0), (0.01, 0.0)):
        image = offset + contrast * mask + 0.05 * contrast * rng.normal(size=mask.shape)
        assert pp.intensity_scale(mask, image, spacing) == pytest.approx(contrast, rel=0.05)
    # No edge: the floor is the noise, not zero.
    noise = rng.normal(scale=4.0, size=mask.shape)
    assert pp.intensity_scale(mask, noise, spacing) == pytest.approx(4.0, rel=0.15)
    assert pp.intensity_scale(mask, np.zeros(mask.shape), spacing) == 1.0


def _fused_error(raters: RaterMaps, truth, method, **options):
    maps = pp.to_probability(raters, method, progress=False, **options).maps.values
    return metrics.mean_surface_distance(maps.mean(axis=0) >= 0.5, truth, raters.spacing)


def test_geodesic_fusion_follows_the_intensity_edge_better():
    # Raters scatter around a true object whose edge the image shows; each is
    # converted with both distances, fused by the voxel-wise mean and
    # thresholded at 0.5. With the default options the geodesic fusion lies
    # closer to the truth on every seed (Euclidean errors 0.6-1 mm); the
    # slow test below varies the options.
    from bayesfuse.phantoms import make_phantom

    ratios = []
    for seed in range(4):
        ph = make_phantom("simple", shape=(40, 40, 32), n_raters=4, noise_mm=2.0, random_seed=seed)
        euc = _fused_error(ph.raters, ph.truth, "euclidean")
        geo = _fused_error(ph.raters, ph.truth, "geodesic")
        ratios.append(geo / euc)
    assert max(ratios) < 1.0, ratios
    assert np.mean(ratios) < 0.97, ratios


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {"edge_weight": 1.25}, {"edge_weight": 5.0}, {"edge_weight": 10.0},
    {"sigma": 0.5}, {"sigma": 2.0}, {"slope": 0.5}, {"slope": 2.0},
])
def test_geodesic_fusion_gain_is_not_tuned_to_one_setting(options):
    from bayesfuse.phantoms import make_phantom

    ratios = []
    for seed in range(5):
        ph = make_phantom("simple", shape=(40, 40, 32), n_raters=4, noise_mm=2.0, random_seed=seed)
        euc = _fused_error(ph.raters, ph.truth, "euclidean", **({"slope": options["slope"]} if "slope" in options else {}))
        geo = _fused_error(ph.raters, ph.truth, "geodesic", **options)
        ratios.append(geo / euc)
    assert np.mean(ratios) < 1.0, ratios
    assert sum(r < 1.0 for r in ratios) >= 4, ratios


# ---------------------------------------------------------------- soft dilation
def _dilation(mask, spacing, radius):
    return ndi.distance_transform_edt(~mask, sampling=spacing) <= radius


def _lesion_image(mask, bright=True, seed=0):
    """Lesion +-60 over a background of 100 (noise sd 3), and a lesion-like
    halo (+-45) on the side x < 16 only (a minority of the ring)."""
    rng = np.random.default_rng(seed)
    img = 100.0 + 3.0 * rng.normal(size=mask.shape)
    halo = np.indices(mask.shape)[0] < 16
    sign = 1.0 if bright else -1.0
    img += sign * 60.0 * mask + sign * 45.0 * (halo & ~mask)
    return img


def test_soft_dilation_levels_ring_and_threshold():
    spacing = (1.0, 1.0, 2.0)
    r = _radius((40, 40, 20), spacing, (20, 20, 10))
    mask = r <= 7
    img = _lesion_image(mask)
    out = pp.soft_dilation(mask, img, spacing, gamma=0.3, radius=3.0)
    assert out.dtype == np.float32
    assert set(np.unique(out).tolist()) == {0.0, float(np.float32(0.3)), 1.0}
    assert np.all(out[mask] == 1.0)
    ring = out == np.float32(0.3)
    dilated = _dilation(mask, spacing, 3.0) & ~mask
    assert np.all(dilated[ring])  # inside the dilation, outside the mask
    # "auto": half way between the lesion's median and the ring's median, and
    # no brighter than the lesion's 95th percentile.
    thr = 0.5 * (np.median(img[mask]) + np.median(img[dilated]))
    np.testing.assert_array_equal(ring, dilated & (img >= thr) & (img <= np.percentile(img[mask], 95)))
    # The halo side is kept, the normal side is dropped.
    x = np.indices(mask.shape)[0]
    assert ring[x < 16].sum() > 30 and ring[x >= 16].sum() == 0


def test_soft_dilation_direction_and_explicit_threshold():
    spacing = (1.0, 1.0, 1.0)
    r = _radius((30, 30, 30), spacing, (20, 15, 15))
    mask = r <= 6
    dark = _lesion_image(mask, bright=False)
    auto = pp.soft_dilation(mask, dark, spacing, radius=2.0)
    below = pp.soft_dilation(mask, dark, spacing, radius=2.0, direction="below")
    np.testing.assert_array_equal(auto, below)
    halo = (np.indices(mask.shape)[0] < 16) & _dilation(mask, spacing, 2.0) & ~mask
    np.testing.assert_array_equal(auto == np.float32(0.3), halo)
    above = pp.soft_dilation(mask, dark, spacing, radius=2.0, direction="above", threshold=80.0, limit=None)
    ring = above == np.float32(0.3)
    assert np.all(dark[ring] >= 80.0) and ring.sum() > 0 and not np.any(ring & halo)
    everything = pp.soft_dilation(mask, dark, spacing, radius=2.0, direction="above", threshold=-1e9, limit=None)
    np.testing.assert_array_equal(everything > 0, _dilation(mask, spacing, 2.0))


def test_soft_dilation_limit_drops_what_is_darker_than_the_lesion():
    # A hypodense lesion (40) in tissue (100) beside air (0) on the side
    # x >= 24: the air passes "below the threshold" but is unlike the lesion.
    spacing = (1.0, 1.0, 1.0)
    r = _radius((30, 30, 30), spacing, (20, 15, 15))
    mask = r <= 6
    x = np.indices(mask.shape)[0]
    img = np.where(x >= 24, 0.0, 100.0) - 60.0 * mask + np.random.default_rng(2).normal(0, 3, mask.shape)
    img[mask] = 40.0 + np.random.default_rng(3).normal(0, 3, mask.sum())
    ring = _dilation(mask, spacing, 2.0) & ~mask
    one_sided = pp.soft_dilation(mask, img, spacing, radius=2.0, limit=None) == np.float32(0.3)
    limited = pp.soft_dilation(mask, img, spacing, radius=2.0) == np.float32(0.3)
    np.testing.assert_array_equal(one_sided, ring & (x >= 24))
    assert not limited.any()
    explicit = pp.soft_dilation(mask, img, spacing, radius=2.0, limit=-10.0) == np.float32(0.3)
    np.testing.assert_array_equal(explicit, one_sided)


def test_soft_dilation_radius_is_in_mm_on_anisotropic_grids():
    spacing = (1.0, 1.0, 3.0)
    mask = np.zeros((21, 21, 9), bool)
    mask[8:13, 8:13, 3:6] = True
    out = pp.soft_dilation(mask, np.ones(mask.shape), spacing, radius=2.5, threshold=-1e9, direction="above")
    ring = out == np.float32(0.3)
    assert ring[6:8, 10, 4].all() and not ring[5, 10, 4]  # two voxels in-plane
    assert not ring[10, 10, 2] and not ring[10, 10, 6]  # no slice above or below (3 mm > 2.5 mm)


def test_soft_dilation_relative_size_per_lesion():
    # "120%": each lesion's equivalent diameter grows by 20 %, so a large
    # lesion gets a wider ring than a small one; at least one voxel.
    spacing = (1.0, 1.0, 1.0)
    shape = (70, 40, 40)
    big = _radius(shape, spacing, (20, 20, 20)) <= 12.0
    small = _radius(shape, spacing, (55, 20, 20)) <= 3.0
    mask = big | small
    out = pp.soft_dilation(mask, np.ones(shape), spacing, size=1.2, threshold=-1e9, direction="above")
    ring = out == np.float32(0.3)
    left = np.indices(shape)[0] < 40
    width_big = ndi.distance_transform_edt(~big)[ring & left].max()
    width_small = ndi.distance_transform_edt(~small)[ring & ~left].max()
    delta_big = 0.2 * (3 * big.sum() / (4 * np.pi)) ** (1 / 3)
    assert delta_big - 0.5 < width_big <= delta_big
    assert width_small == 1.0  # 0.2 r_eq = 0.6 mm, raised to one voxel
    np.testing.assert_array_equal(ring, (_dilation(big, spacing, delta_big) | _dilation(small, spacing, 1.0)) & ~mask)
    assert np.all(out[mask] == 1.0)


def test_soft_dilation_edge_cases_and_options():
    img = np.ones((10, 10))
    assert np.all(pp.soft_dilation(np.zeros((10, 10)), img, 1.0) == 0)
    assert np.all(pp.soft_dilation(np.ones((10, 10)), img, 1.0) == 1)
    mask = np.zeros((10, 10))
    mask[4:6, 4:6] = 1
    for bad in ({"gamma": 1.0}, {"gamma": 0.0}, {"size": 0.9}, {"direction": "up"},
                {"threshold": "median"}, {"radius": -1.0}, {"limit": "low"}):
        with pytest.raises(ConfigError):
            pp.soft_dilation(mask, img, 1.0, **bad)
    with pytest.raises(InputError, match="image"):
        pp.soft_dilation(mask, np.ones((9, 10)), 1.0)


# --------------------------------------------------------------- to_probability
def _raters(kind="binary", image=True, seed=0):
    rng = np.random.default_rng(seed)
    spacing = (1.0, 1.0, 1.5)
    shape = (30, 28, 20)
    r = _radius(shape, spacing, (15, 14, 10))
    masks = [(r <= 7 + rng.normal(0, 0.7)).astype(np.uint8) for _ in range(3)]
    if kind == "probability":
        masks = [m * 0.8 + 0.1 for m in masks]
    img = 1.0 + (r <= 7) + 0.1 * rng.normal(size=shape) if image else None
    return RaterMaps.from_arrays(masks, spacing=spacing, image=img, sources=["a.nii.gz", "b.nii.gz", "c.nii.gz"])


@pytest.mark.parametrize("method", pp.METHODS)
def test_to_probability_output(method):
    data = _raters()
    out = pp.to_probability(data, method, progress=False)
    assert out.kind == "probability" and out.n_classes == 2
    assert out.maps.dims == ("rater", "x", "y", "z") and out.maps.dtype == np.float32
    assert out.rater_names == data.rater_names and out.spacing == data.spacing
    v = out.maps.values
    assert np.all((v >= 0) & (v <= 1)) and not np.isnan(v).any()
    np.testing.assert_array_equal(v >= (0.5 if method != "soft-dilation" else 1.0), data.binary() == 1)
    # The same maps as the per-rater function (geodesic: with the shared scale).
    m0 = data.binary()[0]
    img = data.image.values
    expected = {
        "euclidean": lambda: pp.euclidean_probability(m0, data.spacing),
        "geodesic": lambda: pp.geodesic_probability(
            m0, img, data.spacing, scale=pp.intensity_scale(data.binary().mean(0) >= 0.5, img, data.spacing)),
        "soft-dilation": lambda: pp.soft_dilation(m0, img, data.spacing),
    }[method]()
    np.testing.assert_array_equal(v[0], expected)


def test_to_probability_passes_options():
    data = _raters()
    a = pp.to_probability(data, "euclidean", slope=3.0, progress=False).maps.values
    b = api.convert(data, "euclidean", slope=3.0).maps.values
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[1], pp.euclidean_probability(data.binary()[1], data.spacing, 3.0))
    soft = pp.to_probability(data, "soft-dilation", gamma=0.45, radius=2.0, progress=False).maps.values
    assert set(np.unique(soft).tolist()) <= {0.0, float(np.float32(0.45)), 1.0}


def test_to_probability_errors():
    with pytest.raises(InputError, match=r"a\.nii\.gz.*binary"):
        pp.to_probability(_raters("probability"), "euclidean")
    for method in ("geodesic", "soft-dilation"):
        with pytest.raises(InputError, match="--image is required"):
            pp.to_probability(_raters(image=False), method)
    with pytest.raises(ConfigError, match="gamma.*valid: slope"):
        pp.to_probability(_raters(), "euclidean", gamma=0.3)
    with pytest.raises(ConfigError, match="valid: gamma, radius, size, threshold, direction, limit"):
        pp.to_probability(_raters(), "soft-dilation", slope=1.0)
    with pytest.raises(ConfigError, match="unknown conversion"):
        pp.to_probability(_raters(), "gaussian")
    with pytest.raises(ConfigError, match="edge_weight"):
        pp.to_probability(_raters(), "geodesic", edge_weight=-1)


@pytest.mark.data
def test_liver_ct_conversions_are_sensible(liver_files):
    data = api.as_rater_maps([str(p) for p in liver_files["raters"]], image=str(liver_files["image"]))
    masks = data.binary().astype(bool)
    dist = np.stack([pp.signed_distance(m, data.spacing, band=31.0) for m in masks])
    for method in pp.METHODS:
        v = pp.to_probability(data, method, progress=False).maps.values
        assert np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1
        np.testing.assert_array_equal(v >= (0.5 if method != "soft-dilation" else 1.0), masks)
        if method == "soft-dilation":
            for d, s in zip(dist, v):
                ring = (s > 0) & (s < 1)
                # Tumours of about 12 mm equivalent radius: a ring of one or
                # two 1.73 mm voxels, of which the hypodense part is kept.
                assert 50 < ring.sum() and d[ring].max() < 4.0
        else:
            # Soft within a voxel of the boundary, saturated far away.
            near = np.abs(dist) < 1.0
            assert np.all(v[dist > 30] < 1e-6)
            assert np.all((v[near] > 0.1) & (v[near] < 0.9))
