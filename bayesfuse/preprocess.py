"""Binary masks to probability maps, and soft masks from binary masks.

Fusion models that work on the simplex (robust Student-t fusion, mixture of
consensuses, soft-STAPLE) need each rater's map as probabilities. From binary
masks the project offers three conversions (MODELS.md sections 3 and 4):

``euclidean``
    the sigmoid of the signed Euclidean distance to the mask boundary, the
    "log-odds maps" of seed 000, section 2.1;
``geodesic``
    the same with a signed *geodesic* distance whose local cost grows with
    the image gradient, so that the map follows intensity edges (seed 000,
    section 2.1, after Criminisi et al.'s geodesic distance, its ref. [8]);
``soft-dilation``
    the anatomical soft mask of seed 001, section 3: 1 inside the mask, a
    soft label ``gamma`` on a dilated ring kept where the image looks like
    the lesion, 0 elsewhere.

Conventions
-----------
Signed distances are in mm (``spacing`` is the voxel size per axis), negative
inside the mask and positive outside. The boundary is the surface half way
between the last voxel centre inside and the first outside: both distances
are computed by the fast-marching method of scikit-fmm on the level-set
function ``-1/2`` inside, ``+1/2`` outside, whose zero level lies there; the
geodesic distance is the same computation with a speed ``1 / cost``, so with
no edge weight it equals the Euclidean distance exactly. Probabilities are
``expit(-slope * d)``: 0.5 on the boundary, above 0.5 inside.

An empty mask has no boundary: its distance is ``+inf`` everywhere and its
probability 0; a full mask gives ``-inf`` and 1. Far from the boundary the
sigmoid is saturated, so the probability functions compute distances only
within ``SATURATION / slope`` mm of the mask (exact there, see
:func:`signed_distance`) and give the rest exactly 0 or 1.

What the geodesic maps buy
--------------------------
Thresholding one rater's map at 0.5 returns its mask with either distance;
the difference shows after fusion. On phantoms whose raters scatter around
an object with a visible edge (``tests/test_preprocess.py``: four raters,
boundary noise of 2 mm), the voxel-wise mean of geodesic maps thresholded at
0.5 lies closer to the truth than that of Euclidean maps: mean surface
distance 2-8 % smaller on average over seeds, for every edge weight, sigma
and slope tried, and smaller on each seed with the defaults. The gain comes from
raters on opposite sides of the edge: the edge pushes each one's vote
towards its own side. Where the raters already agree to within a voxel, the
edge's blurred ramp makes every map harder there and the mean fusion tends
to a majority vote in that one-voxel band, which can cost a few tenths of a
mm (seen with five raters at symmetric offsets of +-3 mm, more so with
heavy edge weights).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import skfmm
from scipy import ndimage as ndi
from scipy.special import expit

from . import progress as _progress
from .data import RaterMaps
from .errors import ConfigError, InputError
from .metrics import as_spacing as _as_spacing

#: The conversions :func:`to_probability` knows.
METHODS = ("euclidean", "geodesic", "soft-dilation")

#: ``|slope * d|`` beyond which the sigmoid counts as saturated: expit(-25) is
#: 1.4e-11, far below the 1e-6 clipping of the logit link, so voxels farther
#: than ``SATURATION / slope`` mm from the boundary get exactly 0 or 1.
SATURATION = 25.0

#: Default sigmoid slope (1/mm): the probability falls from 0.73 to 0.27
#: across 2 mm around the boundary, about the scatter of raters' contours.
DEFAULT_SLOPE = 1.0

#: Default edge weight of the geodesic cost (mm per unit of object contrast).
#: Chosen on phantoms over several rater scatters (see the module notes):
#: heavier weights help more where raters straddle an edge and harm more
#: where they already agree to within a voxel.
DEFAULT_EDGE_WEIGHT = 2.5


# --------------------------------------------------------------------------- checks
def _as_mask(mask, name: str = "mask") -> np.ndarray:
    """A 2-D or 3-D boolean array from a 0/1 array, or a clear error."""
    a = np.asarray(mask)
    if a.ndim not in (2, 3):
        raise InputError(name, f"expected a 2-D or 3-D mask, got shape {a.shape}")
    if a.dtype == bool:
        return a
    if not np.all((a == 0) | (a == 1)):
        raise InputError(name, "holds values other than 0 and 1; these conversions are defined for binary masks")
    return a.astype(bool)


def _as_image(image, shape: tuple[int, ...], name: str = "image") -> np.ndarray:
    if image is None:
        raise InputError(name, "an intensity image is required (--image)")
    img = np.asarray(image)
    if img.shape != shape:
        raise InputError(name, f"shape {img.shape} differs from the mask's {shape}")
    img = img.astype(np.float64, copy=False)
    if not np.all(np.isfinite(img)):
        raise InputError(name, "holds NaN or infinite intensities")
    return img


def _positive(name: str, value, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, not {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'non-negative' if allow_zero else 'positive'} and finite, not {value!r}")
    return v


# --------------------------------------------------------------------------- boxes
def _box(mask: np.ndarray, spacing: np.ndarray, margin_mm: float | None) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin_mm`` (+1 voxel), clipped to the image.

    ``None`` (or an infinite margin) gives the whole image.
    """
    if margin_mm is None or not math.isfinite(margin_mm):
        return tuple(slice(0, n) for n in mask.shape)
    found = ndi.find_objects(mask.astype(np.uint8))[0]
    pad = [int(math.ceil(margin_mm / h)) + 1 for h in spacing]
    return tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(found, pad, mask.shape))


def _fill_outside(sub: np.ndarray, box: tuple[slice, ...], shape, band: float | None) -> np.ndarray:
    """Place distances computed in ``box`` into a float32 volume.

    Outside the box (farther than ``band`` from a mask that the box contains)
    and wherever ``|d| > band``, the value is ``+inf`` outside the mask and
    ``-inf`` inside, so that the result does not depend on the box.
    """
    out = np.full(shape, np.inf, dtype=np.float32)
    if band is not None:
        sub = np.where(np.abs(sub) > band, np.copysign(np.inf, sub), sub)
    out[box] = sub
    return out


def _fmm_signed(mask: np.ndarray, spacing: np.ndarray, speed: np.ndarray | None = None,
                band: float | None = None) -> np.ndarray:
    """Signed distance (or travel time with ``speed``) to the half-way boundary.

    ``mask`` must hold both inside and outside voxels. With ``band``, the
    marching stops there (scikit-fmm's narrow band) and farther voxels get
    ``+-inf``.
    """
    # The zero level of +-1/2 lies half way between unlike neighbours, and
    # scikit-fmm locates it by linear interpolation, per axis with its own dx.
    phi = np.where(mask, -0.5, 0.5)
    narrow = 0.0 if band is None else float(band)
    # travel_time with unit speed rather than skfmm.distance (as accurate,
    # differs by up to 0.06 voxel): one code path, so that a geodesic
    # distance with a cost of 1 is exactly the Euclidean one.
    if speed is None:
        speed = np.ones(mask.shape)
    d = skfmm.travel_time(phi, speed, dx=spacing, order=2, narrow=narrow)
    d = np.ma.where(mask, -d, d)
    far = np.ma.getmaskarray(d)
    d = np.asarray(np.ma.getdata(d), dtype=np.float64)
    if far.any():
        d[far] = np.where(mask[far], -np.inf, np.inf)
    return d


def _degenerate(mask: np.ndarray) -> float | None:
    """``+inf`` for an empty mask, ``-inf`` for a full one, else None."""
    if not mask.any():
        return np.inf
    if mask.all():
        return -np.inf
    return None


# --------------------------------------------------------------------------- Euclidean
def signed_distance(mask, spacing=None, *, band: float | None = None) -> np.ndarray:
    """Signed Euclidean distance (mm) to the boundary of a binary mask.

    Parameters
    ----------
    mask : array_like of bool or 0/1, 2-D or 3-D
        The binary mask.
    spacing : float or sequence of float, optional
        Voxel size in mm along each axis (default 1 mm).
    band : float, optional
        Compute only within ``band`` mm of the boundary; farther voxels get
        ``+inf`` (outside) or ``-inf`` (inside). Values within the band are
        those of the full computation (the box that holds the mask and a
        margin of ``band`` contains every shortest path to such a voxel).

    Returns
    -------
    numpy.ndarray of float32
        Negative inside the mask, positive outside; zero on the surface half
        way between the last voxel centre inside and the first outside, so
        a voxel next to the boundary along an axis of size ``h`` is at
        ``+-h/2``. Empty mask: ``+inf`` everywhere; full mask: ``-inf``.

    Notes
    -----
    Computed with scikit-fmm's second-order fast marching (``skfmm.travel_time``
    at unit speed, ``dx = spacing``), which honours anisotropic voxels and
    places the boundary between voxels by interpolation. Against an analytic
    sphere the error is below half the largest voxel size plus 0.5 mm (the
    voxelised sphere itself is only known to half a voxel), about -0.07 mm on
    average.
    """
    m = _as_mask(mask)
    sp = _as_spacing(spacing, m.ndim)
    band = None if band is None else _positive("band", band)
    deg = _degenerate(m)
    if deg is not None:
        return np.full(m.shape, deg, dtype=np.float32)
    box = _box(m, sp, band)
    return _fill_outside(_fmm_signed(m[box], sp, band=band), box, m.shape, band)


def _sigmoid(d: np.ndarray, slope: float) -> np.ndarray:
    # expit is stable at +-inf (exactly 0 and 1) and never overflows.
    return expit(-slope * d.astype(np.float32, copy=False)).astype(np.float32, copy=False)


def euclidean_probability(mask, spacing=None, slope: float = DEFAULT_SLOPE) -> np.ndarray:
    """Foreground probability as the sigmoid of the signed Euclidean distance.

    Parameters
    ----------
    mask : array_like of bool or 0/1, 2-D or 3-D
    spacing : float or sequence of float, optional
        Voxel size in mm per axis.
    slope : float
        Steepness of the sigmoid in 1/mm: ``p = expit(-slope * d)`` with
        ``d`` from :func:`signed_distance`. Larger slopes give harder maps.

    Returns
    -------
    numpy.ndarray of float32
        0.5 on the boundary, above 0.5 inside, decreasing with the distance;
        exactly 0 (1) for an empty (full) mask.

    References
    ----------
    Seed 000, section 2.1 ("log-odds maps", its ref. [13]); MODELS.md section 4.
    """
    slope = _positive("slope", slope)
    d = signed_distance(mask, spacing, band=SATURATION / slope)
    return _sigmoid(d, slope)


# --------------------------------------------------------------------------- geodesic
def _robust_sd(x: np.ndarray) -> float:
    """Standard deviation from the median absolute deviation (Gaussian scaled)."""
    if x.size == 0:
        return 0.0
    return 1.4826 * float(np.median(np.abs(x - np.median(x))))


def intensity_scale(mask, image, spacing=None, *, band: float | None = None) -> float:
    """The intensity contrast of an object against its surroundings.

    The unit in which :func:`geodesic_cost` measures intensity changes, so
    that one set of defaults serves CT (HU or 8-bit), MRI and normalised
    crops alike.

    Parameters
    ----------
    mask : array_like of bool or 0/1
        The object.
    image : array_like
        Intensities on the mask's grid.
    spacing : float or sequence of float, optional
        Voxel size in mm.
    band : float, optional
        Width in mm of the bands on each side of the boundary whose
        intensities are compared (default: three voxels of the coarsest axis).

    Returns
    -------
    float
        ``max(|median inside - median outside|, noise)`` over the two bands,
        where ``noise`` is the mean of the two bands' robust standard
        deviations (1.4826 x MAD). The floor keeps an object without a visible
        edge from turning image noise into walls. When both are zero (a flat
        image, or no boundary), the image's interquartile range, or 1.
    """
    m = _as_mask(mask)
    sp = _as_spacing(spacing, m.ndim)
    img = _as_image(image, m.shape)
    band = 3.0 * float(sp.max()) if band is None else _positive("band", band)
    scale = 0.0
    if _degenerate(m) is None:
        box = _box(m, sp, band)
        mb, ib = m[box], img[box]
        d_in = ndi.distance_transform_edt(mb, sampling=sp)
        d_out = ndi.distance_transform_edt(~mb, sampling=sp)
        inside = ib[mb & (d_in <= band)]
        outside = ib[~mb & (d_out <= band)]
        contrast = abs(float(np.median(inside)) - float(np.median(outside)))
        noise = 0.5 * (_robust_sd(inside) + _robust_sd(outside))
        scale = max(contrast, noise)
    if scale <= 0:
        q1, q3 = np.percentile(img, [25, 75])
        scale = float(q3 - q1) if q3 > q1 else 1.0
    return scale


def _gradient_magnitude(image: np.ndarray, spacing: np.ndarray, sigma: float) -> np.ndarray:
    """|grad I| in intensity units per mm, after Gaussian smoothing of ``sigma`` mm."""
    if sigma == 0:
        grads = np.gradient(image, *spacing)
        return np.sqrt(sum(g * g for g in grads))
    sig_vox = sigma / spacing  # isotropic smoothing in mm on anisotropic voxels
    sq = np.zeros(image.shape)
    for ax in range(image.ndim):
        order = [0] * image.ndim
        order[ax] = 1
        g = ndi.gaussian_filter(image, sigma=sig_vox, order=order, mode="nearest") / spacing[ax]
        sq += g * g
    return np.sqrt(sq)


def geodesic_cost(image, spacing=None, *, scale: float, edge_weight: float = DEFAULT_EDGE_WEIGHT,
                  sigma: float | None = None) -> np.ndarray:
    """Local cost per mm of the geodesic distance.

    ``cost = sqrt(1 + (edge_weight * |grad G_sigma * I| / scale)**2)``: 1 in
    flat regions (Euclidean length), large across edges. Crossing a step
    edge of height ``scale`` adds ``int (cost - 1) ds`` to a path, at most
    ``edge_weight`` mm: about ``edge_weight - 3.4 sigma`` for strong weights,
    less for weak ones (0.8 mm for the default 2.5 mm at ``sigma`` = 1 mm;
    2.4 mm for 5 mm; 6.6 mm for 10 mm). The cost is isotropic (fast marching
    needs a scalar speed), so moving along an edge inside its blurred ramp is
    charged too, unlike Criminisi et al.'s directional metric.

    Parameters
    ----------
    image : array_like, 2-D or 3-D
    spacing : float or sequence of float, optional
        Voxel size in mm.
    scale : float
        Intensity unit (see :func:`intensity_scale`), positive.
    edge_weight : float
        Weight of the gradient, in mm per unit of contrast: the most a path
        gains by crossing an edge of height ``scale`` (0 gives the Euclidean
        distance). Plays the part of Criminisi et al.'s gamma.
    sigma : float, optional
        Gaussian smoothing in mm before the gradient, against noise (default:
        the finest voxel size; 0 for none).

    Returns
    -------
    numpy.ndarray of float64, at least 1
    """
    img = np.asarray(image, dtype=np.float64)
    sp = _as_spacing(spacing, img.ndim)
    scale = _positive("scale", scale)
    edge_weight = _positive("edge_weight", edge_weight, allow_zero=True)
    sigma = float(sp.min()) if sigma is None else _positive("sigma", sigma, allow_zero=True)
    if edge_weight == 0:
        return np.ones(img.shape)
    g = _gradient_magnitude(img, sp, sigma)
    return np.sqrt(1.0 + (edge_weight * g / scale) ** 2)


def _geodesic_box_cost(image, box, spacing, scale, edge_weight, sigma) -> np.ndarray:
    """The cost on ``box``, smoothing with the image around it (not zero padding)."""
    sigma_eff = float(spacing.min()) if sigma is None else sigma
    pad = [int(math.ceil(4 * sigma_eff / h)) + 1 for h in spacing]
    outer = tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(box, pad, image.shape))
    cost = geodesic_cost(image[outer], spacing, scale=scale, edge_weight=edge_weight, sigma=sigma)
    inner = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(box, outer))
    return cost[inner]


def geodesic_signed_distance(mask, image, spacing=None, *, edge_weight: float = DEFAULT_EDGE_WEIGHT,
                             sigma: float | None = None, scale: float | None = None,
                             band: float | None = None) -> np.ndarray:
    """Signed geodesic distance (mm) to the mask boundary, following image edges.

    The length of a path is the integral of :func:`geodesic_cost` along it, so
    paths that cross intensity edges are long; the distance of a voxel is the
    shortest such length from the boundary (Criminisi et al., seed 000's
    ref. [8]), computed by fast marching (``skfmm.travel_time`` with speed
    ``1 / cost``), not by a hand-written Dijkstra.

    Parameters
    ----------
    mask : array_like of bool or 0/1, 2-D or 3-D
    image : array_like
        Intensities on the same grid (any units).
    spacing : float or sequence of float, optional
        Voxel size in mm.
    edge_weight : float
        Extra mm for crossing an edge of the object's contrast (0 gives
        :func:`signed_distance`). See :func:`geodesic_cost`.
    sigma : float, optional
        Smoothing (mm) before the gradient; default the finest voxel size.
    scale : float, optional
        Intensity unit; default :func:`intensity_scale` of this mask.
    band : float, optional
        Compute only within ``band`` mm (geodesic) of the boundary; as in
        :func:`signed_distance`, values there are exact and the rest are
        ``+-inf`` (the geodesic distance is never shorter than the Euclidean
        one, so the box of the mask grown by ``band`` holds every path).

    Returns
    -------
    numpy.ndarray of float32
        Same sign convention as :func:`signed_distance`; ``+-inf`` for an
        empty / full mask.
    """
    m = _as_mask(mask)
    sp = _as_spacing(spacing, m.ndim)
    img = _as_image(image, m.shape)
    band = None if band is None else _positive("band", band)
    deg = _degenerate(m)
    if deg is not None:
        return np.full(m.shape, deg, dtype=np.float32)
    if scale is None:
        scale = intensity_scale(m, img, sp)
    box = _box(m, sp, band)
    cost = _geodesic_box_cost(img, box, sp, scale, edge_weight, sigma)
    return _fill_outside(_fmm_signed(m[box], sp, speed=1.0 / cost, band=band), box, m.shape, band)


def geodesic_probability(mask, image, spacing=None, slope: float = DEFAULT_SLOPE, *,
                         edge_weight: float = DEFAULT_EDGE_WEIGHT, sigma: float | None = None,
                         scale: float | None = None) -> np.ndarray:
    """Foreground probability as the sigmoid of the signed geodesic distance.

    Parameters are those of :func:`geodesic_signed_distance`, and ``slope``
    (1/mm) as in :func:`euclidean_probability`.

    Returns
    -------
    numpy.ndarray of float32
        0.5 on the boundary, above 0.5 inside; falls off faster than the
        Euclidean map across intensity edges.

    References
    ----------
    Seed 000, section 2.1; MODELS.md section 4.
    """
    slope = _positive("slope", slope)
    d = geodesic_signed_distance(mask, image, spacing, edge_weight=edge_weight, sigma=sigma,
                                 scale=scale, band=SATURATION / slope)
    return _sigmoid(d, slope)


# --------------------------------------------------------------------------- soft dilation
def _dilate_relative(mask: np.ndarray, spacing: np.ndarray, size: float) -> np.ndarray:
    """Dilate each connected component by ``(size - 1)`` times its equivalent radius."""
    labels, n = ndi.label(mask, structure=np.ones((3,) * mask.ndim))
    voxel = float(np.prod(spacing))
    out = mask.copy()
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        comp = labels[sl] == i
        measure = comp.sum() * voxel  # mm^3 (3-D) or mm^2 (2-D)
        r_eq = (3 * measure / (4 * np.pi)) ** (1 / 3) if mask.ndim == 3 else np.sqrt(measure / np.pi)
        # At least the finest voxel, else small lesions would get no ring at all.
        radius = max((size - 1.0) * r_eq, float(spacing.min()))
        pad = [int(math.ceil(radius / h)) + 1 for h in spacing]
        box = tuple(slice(max(s.start - p, 0), min(s.stop + p, nn)) for s, p, nn in zip(sl, pad, mask.shape))
        comp_box = labels[box] == i
        out[box] |= ndi.distance_transform_edt(~comp_box, sampling=spacing) <= radius
    return out


def soft_dilation(mask, image, spacing=None, *, gamma: float = 0.3, radius: float | None = None,
                  size: float = 1.2, threshold: float | str = "auto",
                  direction: str = "auto", limit: float | str | None = "auto") -> np.ndarray:
    """Soft mask: 1 inside, ``gamma`` on a lesion-like dilated ring, 0 elsewhere.

    The anatomical protocol of seed 001, section 3 (MODELS.md section 3):
    dilate the mask, keep the dilated voxels whose intensity looks like the
    lesion, give them the soft label ``gamma``.

    Parameters
    ----------
    mask : array_like of bool or 0/1, 2-D or 3-D
    image : array_like
        Intensities on the same grid (FLAIR in the paper).
    spacing : float or sequence of float, optional
        Voxel size in mm; the dilation is a ball in mm (an ellipsoid in
        voxels on anisotropic grids).
    gamma : float
        Soft label of the kept ring, 0 < gamma < 1 (paper: 0.3).
    radius : float, optional
        Dilation radius in mm, the same for every lesion. Overrides ``size``.
    size : float
        The paper's "dilation size 120%", read as a linear size relative to
        each lesion: every connected component (26-connected in 3-D) is
        dilated by ``(size - 1) * r_eq``, ``r_eq`` being the radius of the
        ball (disc in 2-D) of its volume, so that its equivalent diameter
        grows by the factor ``size``; at least by the finest voxel size, so
        that small lesions get a ring too. Must exceed 1.
    threshold : float or "auto"
        Intensity limit for keeping a ring voxel. ``"auto"``: half way
        between the median intensity inside the mask and the median over
        the whole (unthresholded) ring, i.e. keep the ring voxels that look
        more like the lesion than like its surroundings.
    direction : {"auto", "above", "below"}
        Keep ring voxels with intensity ``>= threshold`` (``"above"``:
        hyperintense lesions, e.g. MS lesions in FLAIR as in the paper) or
        ``<= threshold`` (``"below"``: hypodense lesions, e.g. many liver
        tumours in CT). ``"auto"``: ``"above"`` when the median inside the
        mask is at least the ring's median, else ``"below"``.
    limit : float, "auto" or None
        A second bound, on the far side of the lesion's intensities: ring
        voxels beyond it are unlike the lesion too (air or fat beside a
        hypodense liver tumour, bright artefacts beside a FLAIR lesion) and
        are dropped. ``"auto"``: the 5th percentile of the intensities inside
        the mask for ``"below"``, the 95th for ``"above"``. None: no second
        bound, the paper's one-sided rule.

    Returns
    -------
    numpy.ndarray of float32
        Values in exactly {0, gamma, 1} (gamma as float32).

    References
    ----------
    Seed 001, section 3 and its ref. [8]; MODELS.md section 3.
    """
    m = _as_mask(mask)
    sp = _as_spacing(spacing, m.ndim)
    img = _as_image(image, m.shape)
    gamma = _positive("gamma", gamma)
    if not gamma < 1:
        raise ConfigError(f"gamma must lie strictly between 0 and 1, not {gamma!r}")
    if direction not in ("auto", "above", "below"):
        raise ConfigError(f"direction must be 'auto', 'above' or 'below', not {direction!r}")
    if not (isinstance(threshold, str) and threshold == "auto"):
        threshold = _finite("threshold", threshold)
    if limit is not None and not (isinstance(limit, str) and limit == "auto"):
        limit = _finite("limit", limit)
    out = m.astype(np.float32)
    if _degenerate(m) is not None:
        return out
    if radius is not None:
        radius = _positive("radius", radius)
        box = _box(m, sp, radius)
        dilated = np.zeros_like(m)
        dilated[box] = ndi.distance_transform_edt(~m[box], sampling=sp) <= radius
    else:
        size = _positive("size", size)
        if not size > 1:
            raise ConfigError(f"size is the dilated lesion's size relative to the lesion and must exceed 1, not {size!r}")
        dilated = _dilate_relative(m, sp, size)
    ring = dilated & ~m
    if not ring.any():
        return out
    med_in, med_ring = float(np.median(img[m])), float(np.median(img[ring]))
    if direction == "auto":
        direction = "above" if med_in >= med_ring else "below"
    if threshold == "auto":
        threshold = 0.5 * (med_in + med_ring)
    if limit == "auto":
        limit = float(np.percentile(img[m], 95 if direction == "above" else 5))
    if direction == "above":
        keep = ring & (img >= threshold) & (img <= (np.inf if limit is None else limit))
    else:
        keep = ring & (img <= threshold) & (img >= (-np.inf if limit is None else limit))
    out[keep] = np.float32(gamma)
    return out


def _finite(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number or 'auto', not {value!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, not {value!r}")
    return v


# --------------------------------------------------------------------------- container
#: Options of each conversion, with their defaults (``None``: computed).
OPTIONS: dict[str, dict[str, Any]] = {
    "euclidean": {"slope": DEFAULT_SLOPE},
    "geodesic": {"slope": DEFAULT_SLOPE, "edge_weight": DEFAULT_EDGE_WEIGHT, "sigma": None, "scale": None},
    "soft-dilation": {"gamma": 0.3, "radius": None, "size": 1.2, "threshold": "auto", "direction": "auto",
                      "limit": "auto"},
}


def _binary_masks(data: RaterMaps, method: str) -> np.ndarray:
    if data.kind == "binary" or (data.kind == "labels" and data.n_classes == 2):
        return data.maps.values.astype(bool)
    what = {"probability": "probability maps", "labels": f"labels with {data.n_classes} classes"}[data.kind]
    who = data.sources[0] if data.sources else "raters"
    raise InputError(who, f"the raters hold {what}; the {method} conversion is defined for binary (0/1) masks only")


def _shared_scale(masks: np.ndarray, image: np.ndarray, spacing: np.ndarray) -> float:
    """One intensity unit for all raters, from their majority-vote mask."""
    vote = masks.mean(axis=0) >= 0.5
    if _degenerate(vote) is not None:
        vote = masks.any(axis=0)
    return intensity_scale(vote, image, spacing)


def to_probability(data: RaterMaps, method: str, *, progress: bool | None = None, **options: Any) -> RaterMaps:
    """Convert every rater's binary mask to a foreground probability map.

    Parameters
    ----------
    data : RaterMaps
        Binary masks (two-class labels are accepted too).
    method : {"euclidean", "geodesic", "soft-dilation"}
        :func:`euclidean_probability`, :func:`geodesic_probability` or
        :func:`soft_dilation`.
    progress : bool, optional
        Show a progress bar over the raters.
    **options
        The chosen function's options (see :data:`OPTIONS`). For
        ``geodesic`` the intensity ``scale`` defaults to the
        :func:`intensity_scale` of the raters' majority vote, shared by all
        raters so that they see the same cost map.

    Returns
    -------
    RaterMaps
        ``kind="probability"``, ``n_classes=2``, maps float32
        ``(rater, *spatial)`` holding the foreground probability.

    Raises
    ------
    InputError
        Maps that are not binary; no ``data.image`` for ``geodesic`` or
        ``soft-dilation``.
    ConfigError
        An unknown method or option, or a bad option value.
    """
    if method not in OPTIONS:
        raise ConfigError(f"unknown conversion {method!r}; choose one of {', '.join(METHODS)}")
    valid = OPTIONS[method]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for the {method} conversion; valid: {', '.join(valid)}")
    opts = {**valid, **options}
    masks = _binary_masks(data, method)
    sp = np.asarray(data.spacing, dtype=float)
    image = None
    if method in ("geodesic", "soft-dilation"):
        if data.image is None:
            raise InputError("image", f"--image is required for the {method} conversion")
        image = data.image.values.astype(np.float64, copy=False)

    if method == "euclidean":
        slope = _positive("slope", opts["slope"])

        def convert(m):
            return euclidean_probability(m, sp, slope)
    elif method == "geodesic":
        slope = _positive("slope", opts["slope"])
        scale = opts["scale"] if opts["scale"] is not None else _shared_scale(masks, image, sp)
        geo = {k: opts[k] for k in ("edge_weight", "sigma")}

        def convert(m):
            return geodesic_probability(m, image, sp, slope, scale=scale, **geo)
    else:
        soft = {k: opts[k] for k in OPTIONS["soft-dilation"]}

        def convert(m):
            return soft_dilation(m, image, sp, **soft)

    values = np.empty(masks.shape, dtype=np.float32)
    with _progress.bar(f"{method} maps", total=len(masks), progress=progress) as bar:
        for i, m in enumerate(masks):
            values[i] = convert(m)
            bar.advance()
    return data.with_maps(values, kind="probability", n_classes=2)
