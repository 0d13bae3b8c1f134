"""Agreement between two segmentations: overlap and boundary distances.

Overlap: :func:`dice`, :func:`soft_dice`, :func:`sensitivity`,
:func:`specificity`. Boundary: :func:`hausdorff`, :func:`hd95` and
:func:`mean_surface_distance`, in mm, from :func:`surface_distances`.

Conventions
-----------
- Masks are boolean or 0/1 arrays (2-D or 3-D); anything else is refused
  rather than silently thresholded (use :func:`soft_dice` for probabilities).
- ``roi``: an optional boolean region of interest. Voxels outside it count as
  background in both masks, as in the fusion models (outside the ROI the
  consensus is background).
- No NaN: a ratio whose denominator is zero takes the value it tends to when
  the two masks agree perfectly. Dice of two empty masks is 1.0; sensitivity
  without any positive in the truth is 1.0 (nothing was missed); specificity
  without any negative is 1.0. Surface distances: both masks empty gives 0.0,
  exactly one empty gives ``inf``.
- Surfaces (MedPy's and MONAI's definition): the voxels of a mask that have a
  face neighbour (6-connectivity in 3-D, 4 in 2-D) outside it, the image
  border counting as outside. The distance from a surface voxel of one mask to
  the other mask's surface is the Euclidean distance in mm between voxel
  centres (``spacing`` per axis), computed with distance transforms (no
  pairwise point distances), on the bounding box of the two masks only.
- HD95 is MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger
  of the two directed 95th percentiles (numpy's linear interpolation), the
  same construction as the Hausdorff distance (the larger of the two directed
  maxima). MedPy's ``hd95`` instead takes the 95th percentile of the two
  directed sets pooled, which is at most the larger directed percentile (up
  to interpolation) and equals it when both directions err alike.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError


def _mask(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == bool:
        return a
    if not np.all((a == 0) | (a == 1)):
        raise InputError(name, "holds values other than 0 and 1; this metric needs binary masks (soft_dice takes probabilities)")
    return a.astype(bool)


def _pair(a, b, roi, names=("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    a, b = _mask(a, names[0]), _mask(b, names[1])
    if a.shape != b.shape:
        raise InputError(names[1], f"shape {b.shape} differs from {names[0]}'s {a.shape}")
    if roi is not None:
        r = _mask(roi, "roi")
        if r.shape != a.shape:
            raise InputError("roi", f"shape {r.shape} differs from the masks' {a.shape}")
        a, b = a & r, b & r
    return a, b


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else float(num) / float(den)


def dice(a, b, roi=None) -> float:
    """Dice coefficient ``2 |A n B| / (|A| + |B|)`` of two binary masks.

    Parameters
    ----------
    a, b : array_like of bool or 0/1
        Masks of the same shape.
    roi : array_like of bool, optional
        Region of interest; voxels outside count as background.

    Returns
    -------
    float
        In [0, 1]; 1.0 when both masks are empty.
    """
    a, b = _pair(a, b, roi)
    return _ratio(2 * np.count_nonzero(a & b), np.count_nonzero(a) + np.count_nonzero(b))


def soft_dice(truth, pred, roi=None) -> float:
    """Soft Dice ``sum T P / (0.5 sum P + 0.5 sum T)`` of two probability maps.

    Equals :func:`dice` on binary maps, and stays valid when the truth is soft
    (seed 001, Eq. 14; MODELS.md section 3).

    Parameters
    ----------
    truth, pred : array_like of float in [0, 1]
        Foreground probabilities, same shape.
    roi : array_like of bool, optional
        Region of interest; voxels outside are left out.

    Returns
    -------
    float
        In [0, 1]; 1.0 when both maps are zero everywhere.
    """
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    if t.shape != p.shape:
        raise InputError("pred", f"shape {p.shape} differs from truth's {t.shape}")
    for name, v in (("truth", t), ("pred", p)):
        if not (np.all(np.isfinite(v)) and v.min(initial=0) >= 0 and v.max(initial=0) <= 1):
            raise InputError(name, "soft Dice needs probabilities in [0, 1] (no NaN)")
    if roi is not None:
        r = _mask(roi, "roi")
        if r.shape != t.shape:
            raise InputError("roi", f"shape {r.shape} differs from the maps' {t.shape}")
        t, p = t[r], p[r]
    return _ratio(np.vdot(t.ravel(), p.ravel()), 0.5 * (p.sum() + t.sum()))


def sensitivity(truth, pred, roi=None) -> float:
    """True positive rate ``|T n P| / |T|``; 1.0 when the truth is empty."""
    t, p = _pair(truth, pred, roi, ("truth", "pred"))
    return _ratio(np.count_nonzero(t & p), np.count_nonzero(t))


def specificity(truth, pred, roi=None) -> float:
    """True negative rate ``|~T n ~P| / |~T|`` (inside ``roi`` when given).

    1.0 when the truth has no negative voxel.
    """
    t, p = _pair(truth, pred, roi, ("truth", "pred"))
    if roi is not None:
        r = _mask(roi, "roi")
        neg = r & ~t
    else:
        neg = ~t
    return _ratio(np.count_nonzero(neg & ~p), np.count_nonzero(neg))


def as_spacing(spacing, ndim: int) -> np.ndarray:
    """Voxel sizes in mm, one per axis (a scalar is repeated; None is 1 mm)."""
    s = np.atleast_1d(np.asarray(1.0 if spacing is None else spacing, dtype=float))
    if s.size == 1:
        s = np.repeat(s, ndim)
    if s.size != ndim or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise InputError("spacing", f"expected {ndim} positive voxel sizes (mm), got {tuple(s.tolist())}")
    return s


def _surface(m: np.ndarray) -> np.ndarray:
    # border_value=0: a voxel on the image border is a surface voxel.
    return m & ~ndi.binary_erosion(m, structure=ndi.generate_binary_structure(m.ndim, 1), border_value=0)


def surface_distances(a, b, spacing=None, roi=None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm) between two binary masks.

    Parameters
    ----------
    a, b : array_like of bool or 0/1, 2-D or 3-D
    spacing : float or sequence of float, optional
        Voxel size in mm per axis (default 1).
    roi : array_like of bool, optional
        Region of interest; voxels outside count as background.

    Returns
    -------
    d_ab, d_ba : numpy.ndarray of float64
        For every surface voxel of ``a``, the distance to the nearest surface
        voxel of ``b``; and the reverse. Empty when the mask they start from
        is empty; ``inf`` when the other mask is empty.
    """
    a, b = _pair(a, b, roi)
    sp = as_spacing(spacing, a.ndim)
    union = a | b
    if not union.any():
        return np.zeros(0), np.zeros(0)
    # Cropping to the union's box (+1 voxel so that the crop's edge does not
    # create surface) leaves every distance unchanged: all surface voxels and
    # their nearest partners lie inside it.
    box = ndi.find_objects(union.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, a.shape))
    sa, sb = _surface(a[box]), _surface(b[box])
    out = []
    for src, dst in ((sa, sb), (sb, sa)):
        if not src.any():
            out.append(np.zeros(0))
        elif not dst.any():
            out.append(np.full(np.count_nonzero(src), np.inf))
        else:
            out.append(ndi.distance_transform_edt(~dst, sampling=sp)[src])
    return out[0], out[1]


def _directed_stat(a, b, spacing, roi, stat) -> float:
    d_ab, d_ba = surface_distances(a, b, spacing, roi)
    if d_ab.size == 0 and d_ba.size == 0:
        return 0.0
    if d_ab.size == 0 or d_ba.size == 0:
        return float("inf")
    return float(max(stat(d_ab), stat(d_ba)))


def hausdorff(a, b, spacing=None, roi=None) -> float:
    """Symmetric Hausdorff distance (mm) between the surfaces of two masks.

    The larger of the two directed maxima of :func:`surface_distances`.
    0.0 when both masks are empty, ``inf`` when exactly one is.
    """
    return _directed_stat(a, b, spacing, roi, np.max)


def hd95(a, b, spacing=None, roi=None, percentile: float = 95.0) -> float:
    """95th-percentile Hausdorff distance (mm), MONAI's definition.

    The larger of the two directed ``percentile``-th percentiles of
    :func:`surface_distances` (see the module notes for MedPy's pooled
    variant). 0.0 when both masks are empty, ``inf`` when exactly one is.
    """
    if not 0 <= percentile <= 100:
        raise InputError("percentile", f"must lie in [0, 100], got {percentile}")
    return _directed_stat(a, b, spacing, roi, lambda d: np.percentile(d, percentile))


def mean_surface_distance(a, b, spacing=None, roi=None) -> float:
    """Average symmetric surface distance (mm), MedPy's ``assd``.

    The average of the two directed mean distances of
    :func:`surface_distances`. 0.0 when both masks are empty, ``inf`` when
    exactly one is.
    """
    d_ab, d_ba = surface_distances(a, b, spacing, roi)
    if d_ab.size == 0 and d_ba.size == 0:
        return 0.0
    if d_ab.size == 0 or d_ba.size == 0:
        return float("inf")
    return float(0.5 * (d_ab.mean() + d_ba.mean()))
