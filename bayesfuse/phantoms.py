"""Synthetic multi-rater cases with known truth (phantoms).

A phantom is a smooth object (a smooth union of a few random ellipsoids plus a
separate satellite blob, lightly deformed by a smooth random field), its
signed distance map, an intensity image whose edges follow it, and P raters
drawn around it. Every rater is a threshold of one continuous field,

.. math::

    d_i(x) = s(x) - \\delta_i - \\sigma_i\\, n_i(x),

where ``s`` is the signed distance to the truth's boundary in mm (negative
inside), ``delta_i`` is the rater's signed boundary offset in mm (positive:
over-segmentation), ``n_i`` is a smooth Gaussian random field with unit
variance, squared-exponential covariance of length ``noise_scale_mm`` and zero
mean over the truth's surface, and ``sigma_i`` is the rater's boundary noise in
mm. A binary rater is ``d_i < 0``; a "network" rater is
``sigmoid(-d_i / slope_i)``. Because ``s`` is a true distance, the mean signed
displacement of rater i's boundary is ``delta_i`` mm on any spacing.

Kinds (:data:`PHANTOM_KINDS`):

``simple``
    binary raters with offsets and boundary noise.
``outlier``
    ``simple`` plus one rater who, inside one ball on the boundary
    (:attr:`Phantom.outlier_region`), adds a blob (``outlier_mode="add"``),
    cuts one away (``"remove"``) or does both on the two halves of the ball
    (``"both"``), and behaves like the others elsewhere.
``clusters``
    raters drawn around two or three truths (``n_clusters``): truth 1 has an
    extra lobe, truth 2 a bite taken out elsewhere; ``membership`` says which
    truth each rater follows (contiguous blocks).
``soft``
    the ``simple`` raters turned into soft masks by conditional dilation on
    the image (:func:`bayesfuse.preprocess.soft_dilation`): levels 0,
    ``gamma``, 1.
``probability``
    continuous network-like maps ``sigmoid(-d_i / slope_i)``.
``multiclass``
    K = 3 nested labels: 0 background, 1 the object, 2 a core inside it.

The same seed gives bit-identical phantoms, and the parts use independent
random streams: the truth does not depend on the kind or the number of raters,
rater i's noise does not depend on P, and ``outlier`` is ``simple`` plus the
outlier's blob.

Size and accuracy: the distance map and the noise fields are computed on a
near-isotropic working grid (the voxels decimated or refined by integer
factors per axis, at most about :data:`WORK_VOXELS` nodes) and brought to the
voxels by linear interpolation, the same for truth and raters. Seven raters on
180 x 256 x 256 take a few seconds of one core. Measured (tests): the distance
map is within 0.45 mm of the exact distance to its zero set (mean 0.03 mm,
first-order fast marching overestimates slightly), and noise-free offsets of
up to 2 mm come out within 0.2 mm (0.35 mm with 1 mm boundary noise), on
isotropic and anisotropic voxels alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import xarray as xr

from .data import RaterMaps, default_affine, spatial_dims
from .errors import ConfigError

__all__ = ["PHANTOM_KINDS", "Phantom", "make_phantom"]

#: The kinds :func:`make_phantom` makes.
PHANTOM_KINDS: tuple[str, ...] = ("simple", "outlier", "clusters", "soft", "probability", "multiclass")

#: Default spatial shape per dimensionality (1 mm voxels by default).
DEFAULT_SHAPE = {2: (128, 128), 3: (64, 64, 48)}

#: Smallest size along any axis: smaller grids cannot hold the object and its raters.
MIN_SIZE = 16

#: The distance map and noise fields run on a working grid of about this
#: many nodes at most (fast marching is the costly step).
WORK_VOXELS = 1_500_000

#: Default spread (mm) of the raters' offsets per kind: smaller where the
#: phantom's point lies elsewhere (clusters, the core of the multiclass
#: phantom) so that +-1.5 mm offsets do not drown it on small objects.
MAX_OFFSET_MM = {"clusters": 0.75, "multiclass": 1.0}
_DEFAULT_MAX_OFFSET = 1.5

#: Default number of raters per kind.
DEFAULT_RATERS = {"clusters": 6}
_DEFAULT_P = 5

#: Options accepted through ``**options``, with their defaults (None: derived).
OPTIONS: dict[str, Any] = {
    "offset_mm": None,          # per-rater signed boundary offset (mm); default symmetric, +-max_offset_mm
    "max_offset_mm": None,      # spread of the default offsets (see MAX_OFFSET_MM)
    "noise_mm": None,           # per-rater boundary noise sd (mm); default 0.4..1.2 in random order
    "noise_scale_mm": 6.0,      # correlation length of the boundary noise (mm)
    "slope_mm": 1.0,            # "probability": width of the sigmoid (mm), scalar or per rater
    "gamma": 0.3,               # "soft": the ring's soft label
    "soft_options": None,       # "soft": more keyword arguments for preprocess.soft_dilation
    "outlier": None,            # add the outlier rater (default: only for kind "outlier")
    "outlier_rater": None,      # index of the outlier rater (default: the middle one)
    "outlier_mode": "add",      # "add" | "remove" | "both"
    "outlier_radius_mm": None,  # radius of the outlier ball (default: 0.65 x the object's equivalent radius)
    "lobe_radius_mm": None,     # "clusters": radius of the lobe / bite (default: 0.6 (2-D) or 1.1 (3-D) x equivalent radius)
    "n_lobes": 3,               # ellipsoids in the main body
    "n_satellites": 1,          # separate small blobs
    "contrast": 1.0,            # image: object minus background intensity (background is 1.0)
    "image_noise": 0.1,         # image: white noise sd, relative to the contrast
    "bias_field": 0.1,          # image: amplitude of the smooth multiplicative bias
    "edge_mm": None,            # image: edge width (mm); default half the smallest voxel size
}

_OUTLIER_MODES = ("add", "remove", "both")


@dataclass
class Phantom:
    """A synthetic multi-rater case with its known truth.

    Attributes
    ----------
    kind : str
        One of :data:`PHANTOM_KINDS`.
    raters : RaterMaps
        The raters' maps (names ``rater0`` .. ``rater{P-1}``), with ``.image``
        set to an intensity image whose edges follow the (first) truth.
    truth : numpy.ndarray
        (*spatial) uint8 labels of the first truth (0/1; 0/1/2 for
        ``multiclass``).
    truths : numpy.ndarray
        (C, *spatial) uint8: every truth (C = 1 except for ``clusters``).
    membership : numpy.ndarray
        (P,) int: the truth each rater was drawn around.
    params : dict
        The true per-rater parameters and how the phantom was made:
        ``offset_mm``, ``noise_mm``, ``noise_scale_mm``, ``outlier`` (P,
        bool), ``outlier_rater``, ``outlier_mode``, ``slope_mm``, ``gamma``,
        measured ``sensitivity`` / ``specificity`` (binary-like kinds, against
        each rater's own truth, before softening) or ``confusion`` (P, K, K,
        rows: true class), ``spacing``, ``random_seed`` (the entropy that
        reproduces it), ``band_mm``, ``work_grid``, ...
    outlier_region : numpy.ndarray or None
        (*spatial) bool: the ball in which the outlier rater departs from its
        truth; None without an outlier.
    signed_distance : numpy.ndarray or None
        (*spatial) float32: signed distance (mm, negative inside) to the first
        truth's boundary, clipped at ``+-params["band_mm"]``.
    """

    kind: str
    raters: RaterMaps
    truth: np.ndarray
    truths: np.ndarray
    membership: np.ndarray
    params: dict
    outlier_region: np.ndarray | None = None
    signed_distance: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_raters(self) -> int:
        return self.raters.n_raters

    def __repr__(self) -> str:
        return (
            f"Phantom({self.kind!r}, {self.n_raters} raters, {self.raters.kind}, "
            f"shape={self.truth.shape}, spacing={self.raters.spacing}, truths={self.truths.shape[0]}, "
            f"outlier={'yes' if self.outlier_region is not None else 'no'})"
        )


# ============================================================================ API
def make_phantom(
    kind: str = "simple",
    *,
    ndim: int | None = None,
    shape: Sequence[int] | None = None,
    n_raters: int | None = None,
    n_clusters: int = 2,
    random_seed: int | np.random.SeedSequence | np.random.Generator | None = 0,
    spacing: float | Sequence[float] | None = None,
    **options: Any,
) -> Phantom:
    """Make a synthetic multi-rater case with known truth.

    Parameters
    ----------
    kind : str
        One of :data:`PHANTOM_KINDS` (see the module docstring).
    ndim : {2, 3}, optional
        Spatial dimensions; default ``len(shape)`` when ``shape`` is given,
        else 3.
    shape : sequence of int, optional
        Spatial shape; default 64 x 64 x 48 (3-D) or 128 x 128 (2-D). At least
        16 voxels along each axis.
    n_raters : int, optional
        P; default 6 for ``clusters``, 5 otherwise.
    n_clusters : {2, 3}
        Number of truths of the ``clusters`` phantom.
    random_seed : int, SeedSequence, Generator or None
        Seed; the same seed gives bit-identical phantoms. None draws fresh
        entropy, recorded in ``params["random_seed"]``.
    spacing : float or sequence of float, optional
        Voxel size in mm (anisotropic allowed); default 1 mm.
    **options
        See :data:`OPTIONS`: ``offset_mm``, ``noise_mm`` (scalars or one value
        per rater), ``noise_scale_mm``, ``slope_mm``, ``gamma``,
        ``soft_options``, ``outlier``, ``outlier_rater``, ``outlier_mode``,
        ``outlier_radius_mm``, ``lobe_radius_mm``, ``n_lobes``,
        ``n_satellites``, ``contrast``, ``image_noise``, ``bias_field``,
        ``edge_mm``.

    Returns
    -------
    Phantom

    Raises
    ------
    ConfigError
        Unknown kind or option, or an option value that cannot be used.
    NotImplementedError
        ``kind="soft"`` while :func:`bayesfuse.preprocess.soft_dilation` is
        missing from this installation.
    """
    spec = _validate(kind, ndim, shape, n_raters, n_clusters, random_seed, spacing, options)
    grid = spec.grid
    p = spec.n_raters
    streams = {name: _child(spec.seed, k) for k, name in enumerate(("shape", "image", "raters", "outlier", "clusters", "core"))}
    noise = spec.noise_mm
    if noise is None:
        noise = np.random.default_rng(_child(streams["raters"], 0)).permutation(np.linspace(0.4, 1.2, p))
    offsets, slope = spec.offset_mm, spec.slope_mm
    # Generous band: the distance map is exact within it and clipped outside.
    band = max(12.0, 4 * float(np.max(np.abs(offsets))) + 6 * float(noise.max()) + 12 * float(slope.max()), 10 * spec.edge_mm)

    # ---- truth(s), on the working grid
    ellipsoids, phi, n_sat_made = _shape_level(grid, np.random.default_rng(streams["shape"]), spec.n_lobes, spec.n_satellites)
    sdf0 = _signed_distance(phi, grid, band)
    r_eq = _equivalent_radius(sdf0, grid)
    fields = [sdf0]
    extra: dict[str, Any] = {}
    if kind == "clusters":
        # The truths must differ by more voxels than the raters' own offsets
        # and noise move along the whole surface, or no method could tell a
        # cluster from a rater's habit; in 3-D the surface grows faster than
        # a lobe of the same relative size, hence the larger factor (at 0.6
        # in 3-D the mixture found the clusters on 1 of 6 seeds, at 1.1 on 6).
        lobe_factor = 0.6 if len(grid.shape) == 2 else 1.1
        lobe_r = spec.lobe_radius_mm or max(lobe_factor * r_eq, 2 * max(grid.spacing))
        fields += _cluster_truths(sdf0, grid, np.random.default_rng(streams["clusters"]), spec.n_truths, lobe_r, band)
        extra["lobe_radius_mm"] = lobe_r
    core = None
    if kind == "multiclass":
        core = _core_distance(ellipsoids, sdf0, grid, np.random.default_rng(streams["core"]), band)
    fine_truths = [grid.upsample(f) for f in fields]
    truths = np.stack([(f < 0).astype(np.uint8) for f in fine_truths])
    core_fine = None
    if core is not None:
        core_fine = grid.upsample(core)
        truths[0] += core_fine < 0
    ball, region = None, None
    if spec.outlier:
        radius = spec.outlier_radius_mm or max(0.65 * r_eq, 2 * max(grid.spacing))
        ball = _outlier_ball(sdf0, grid, np.random.default_rng(streams["outlier"]), radius, spec.outlier_mode)
        region = np.zeros(grid.shape, dtype=bool)
        region[ball["slices"]] = ball["sdf"] < 0
        extra.update(outlier_radius_mm=radius, outlier_centre_mm=ball["centre"])

    # ---- raters: thresholds (or sigmoids) of d_i = s - offset_i - noise_i n_i
    maps = np.empty((p,) + grid.shape, dtype=np.float32 if kind == "probability" else np.uint8)
    for i in range(p):
        rng_i = np.random.default_rng(_child(streams["raters"], 1, i))
        own = fields[spec.membership[i]]
        d = grid.upsample(own - offsets[i] - noise[i] * _centred_noise(grid, rng_i, spec.noise_scale_mm, own))
        if spec.outlier and i == spec.outlier_rater:
            _apply_outlier(d, ball, spec.outlier_mode)
        if kind == "probability":
            from scipy.special import expit

            maps[i] = expit(-d / slope[i])
        elif kind == "multiclass":
            dc = grid.upsample(core - offsets[i] - noise[i] * _centred_noise(grid, rng_i, spec.noise_scale_mm, core))
            np.maximum(dc, d, out=dc)  # the rater's core lies inside its object
            maps[i] = (d < 0).astype(np.uint8) + (dc < 0)
        else:
            maps[i] = d < 0

    # ---- image (edges follow the first truth)
    image = _image(fine_truths[0], core_fine, grid, np.random.default_rng(streams["image"]),
                   spec.contrast, spec.image_noise, spec.bias_field, spec.edge_mm)

    params: dict[str, Any] = {
        "kind": kind,
        "offset_mm": offsets,
        "noise_mm": noise,
        "noise_scale_mm": spec.noise_scale_mm,
        "outlier": np.arange(p) == spec.outlier_rater if spec.outlier else np.zeros(p, dtype=bool),
        "outlier_rater": spec.outlier_rater if spec.outlier else None,
        "outlier_mode": spec.outlier_mode if spec.outlier else None,
        "n_clusters": spec.n_truths,
        "n_satellites": n_sat_made,
        "equivalent_radius_mm": r_eq,
        "spacing": grid.spacing,
        "shape": grid.shape,
        "random_seed": spec.seed.entropy,
        "band_mm": band,
        "work_grid": {"spacing_mm": grid.work_spacing, "factors": grid.factors, "refine": grid.refine},
        "image": {"background": 1.0, "contrast": spec.contrast, "noise": spec.image_noise * spec.contrast,
                  "bias_field": spec.bias_field, "edge_mm": spec.edge_mm},
        **extra,
        **_performance(maps > 0.5 if kind == "probability" else maps, truths, spec.membership, kind),
    }
    if kind == "probability":
        params["slope_mm"] = slope
    if kind == "soft":
        params["gamma"] = spec.gamma
        soft = np.empty(maps.shape, dtype=np.float32)
        for i in range(p):
            soft[i] = spec.soft_fn(maps[i], image, grid.spacing, gamma=spec.gamma, **spec.soft_options)
        maps = soft

    rkind = {"probability": "probability", "soft": "probability", "multiclass": "labels"}.get(kind, "binary")
    raters = _rater_maps(maps, rkind, 3 if kind == "multiclass" else 2, grid, image)
    return Phantom(
        kind=kind,
        raters=raters,
        truth=truths[0],
        truths=truths,
        membership=spec.membership,
        params=params,
        outlier_region=region,
        signed_distance=fine_truths[0],
    )


# ============================================================================ options
@dataclass(frozen=True)
class _Spec:
    """The validated request: every option checked before any work is done."""

    grid: "_Grid"
    n_raters: int
    n_truths: int
    membership: np.ndarray
    seed: np.random.SeedSequence
    offset_mm: np.ndarray
    noise_mm: np.ndarray | None  # None: drawn from the raters' stream
    noise_scale_mm: float
    slope_mm: np.ndarray
    gamma: float
    soft_fn: Any
    soft_options: dict
    outlier: bool
    outlier_rater: int
    outlier_mode: str
    outlier_radius_mm: float | None
    lobe_radius_mm: float | None
    n_lobes: int
    n_satellites: int
    contrast: float
    image_noise: float
    bias_field: float
    edge_mm: float


def _validate(kind, ndim, shape, n_raters, n_clusters, random_seed, spacing, options) -> _Spec:
    if kind not in PHANTOM_KINDS:
        raise ConfigError(f"unknown phantom kind {kind!r}; choose one of {', '.join(PHANTOM_KINDS)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown phantom option(s) {', '.join(map(repr, unknown))}; known: {', '.join(OPTIONS)}")
    o = {**OPTIONS, **options}
    grid = _make_grid(ndim, shape, spacing)
    n_clusters = _check_int("n_clusters", n_clusters, 2)
    if kind == "clusters":
        if n_clusters not in (2, 3):
            raise ConfigError(f"n_clusters must be 2 or 3, got {n_clusters}")
    elif n_clusters != 2:
        raise ConfigError(f"n_clusters applies to the 'clusters' phantom only (kind {kind!r})")
    n_truths = n_clusters if kind == "clusters" else 1
    p = DEFAULT_RATERS.get(kind, _DEFAULT_P) if n_raters is None else _check_int("n_raters", n_raters, 2)
    if p < n_truths:
        raise ConfigError(f"n_raters={p} is fewer than the {n_truths} truths of the 'clusters' phantom")
    # Contiguous blocks: rater0.. around truth 0, then truth 1, ...
    membership = np.repeat(np.arange(n_truths), [len(b) for b in np.array_split(np.arange(p), n_truths)])

    max_offset = o["max_offset_mm"]
    max_offset = MAX_OFFSET_MM.get(kind, _DEFAULT_MAX_OFFSET) if max_offset is None else _check_nonneg("max_offset_mm", max_offset)
    offsets = _per_rater("offset_mm", o["offset_mm"], p, default=_default_offsets(membership, max_offset))
    noise = None if o["noise_mm"] is None else _per_rater("noise_mm", o["noise_mm"], p, low=0.0)
    noise_scale = _check_positive("noise_scale_mm", o["noise_scale_mm"])
    slope = _per_rater("slope_mm", o["slope_mm"], p, low=0.0, strict=True)
    gamma = _check_positive("gamma", o["gamma"])
    if not gamma < 1:
        raise ConfigError(f"gamma must lie in (0, 1), got {gamma}")
    soft_options = o["soft_options"] or {}
    if not isinstance(soft_options, dict):
        raise ConfigError(f"soft_options must be a dict of soft_dilation arguments, got {soft_options!r}")
    soft_fn = None
    if kind == "soft":
        soft_fn = _soft_dilation()
        import inspect

        try:
            inspect.signature(soft_fn).bind(None, None, None, gamma=gamma, **soft_options)
        except TypeError as exc:
            raise ConfigError(f"soft_options {sorted(soft_options)} do not fit soft_dilation: {exc}") from None

    outlier = kind == "outlier" if o["outlier"] is None else bool(o["outlier"])
    if kind == "clusters" and outlier:
        raise ConfigError("the 'clusters' phantom has no outlier rater (use kind 'outlier')")
    mode = o["outlier_mode"]
    if mode not in _OUTLIER_MODES:
        raise ConfigError(f"outlier_mode must be one of {', '.join(_OUTLIER_MODES)}, got {mode!r}")
    out_rater = p // 2 if o["outlier_rater"] is None else _check_int("outlier_rater", o["outlier_rater"], 0)
    if out_rater >= p:
        raise ConfigError(f"outlier_rater={out_rater} but there are {p} raters (0..{p - 1})")
    bias = _check_nonneg("bias_field", o["bias_field"])
    if bias >= 0.5:
        raise ConfigError(f"bias_field must be below 0.5 (a multiplicative bias keeping intensities positive), got {bias}")
    return _Spec(
        grid=grid.working(noise_scale),
        n_raters=p,
        n_truths=n_truths,
        membership=membership,
        seed=_seed_sequence(random_seed),
        offset_mm=offsets,
        noise_mm=noise,
        noise_scale_mm=noise_scale,
        slope_mm=slope,
        gamma=gamma,
        soft_fn=soft_fn,
        soft_options=dict(soft_options),
        outlier=outlier,
        outlier_rater=out_rater,
        outlier_mode=mode,
        outlier_radius_mm=_radius_option("outlier_radius_mm", o["outlier_radius_mm"], grid),
        lobe_radius_mm=_radius_option("lobe_radius_mm", o["lobe_radius_mm"], grid),
        n_lobes=_check_int("n_lobes", o["n_lobes"], 1),
        n_satellites=_check_int("n_satellites", o["n_satellites"], 0),
        contrast=_check_positive("contrast", o["contrast"]),
        image_noise=_check_nonneg("image_noise", o["image_noise"]),
        bias_field=bias,
        edge_mm=_check_positive("edge_mm", o["edge_mm"]) if o["edge_mm"] is not None else 0.5 * min(grid.spacing),
    )


def _performance(hard: np.ndarray, truths: np.ndarray, membership: np.ndarray, kind: str) -> dict:
    """Each rater's measured performance against its own truth: sensitivity
    and specificity, or (multiclass) the row-normalised confusion matrix."""
    if kind == "multiclass":
        return {"confusion": _confusion(hard, truths[0], 3)}
    p = hard.shape[0]
    flat = hard.reshape(p, -1).astype(bool, copy=False)
    own = truths[membership].reshape(p, -1).astype(bool)
    tp = np.count_nonzero(flat & own, axis=1)
    pos = np.count_nonzero(own, axis=1)
    fp = np.count_nonzero(flat, axis=1) - tp
    neg = own.shape[1] - pos
    return {"sensitivity": tp / np.maximum(pos, 1), "specificity": 1 - fp / np.maximum(neg, 1)}


# ============================================================================ grid
@dataclass(frozen=True)
class _Grid:
    """The voxel grid, and the near-isotropic working grid of the smooth fields.

    Along each axis the working grid either decimates the voxels by an
    integer ``factor`` (node j on voxel ``j * factor``, the last node possibly
    beyond the grid so that every voxel is interpolated) or refines them by
    an integer ``refine`` (voxel i on node ``i * refine``, read back exactly).
    Fast marching needs near-isotropic nodes: next to the interface it
    measures distance along the one axis where the level function changes
    sign, which on a 0.8 x 0.8 x 2 mm grid puts the boundary up to 1.2 mm off.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    factors: tuple[int, ...] = ()
    refine: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def work_shape(self) -> tuple[int, ...]:
        return tuple(
            -(-(n - 1) // s) + 1 if s > 1 else (n - 1) * k + 1
            for n, s, k in zip(self.shape, self.factors, self.refine)
        )

    @property
    def work_spacing(self) -> tuple[float, ...]:
        return tuple(h * s / k for h, s, k in zip(self.spacing, self.factors, self.refine))

    @property
    def extent(self) -> np.ndarray:
        """Distance (mm) between the first and last voxel centres per axis."""
        return np.array([(n - 1) * h for n, h in zip(self.shape, self.spacing)])

    def working(self, noise_scale: float) -> "_Grid":
        """The working grid: node size ``h`` the same along every axis (to an
        integer ratio with the voxel size), at least the smallest voxel size,
        large enough for at most about WORK_VOXELS nodes, and at most half
        the noise correlation length."""
        volume = float(np.prod([n * h for n, h in zip(self.shape, self.spacing)]))
        h = max(min(self.spacing), (volume / WORK_VOXELS) ** (1 / self.ndim))
        h = max(min(h, noise_scale / 2), min(self.spacing))
        factors, refine = [], []
        for sp in self.spacing:
            factors.append(max(1, round(h / sp)) if sp <= h else 1)
            refine.append(max(1, round(sp / h)) if sp > h else 1)
        return _Grid(self.shape, self.spacing, tuple(factors), tuple(refine))

    def work_axes(self) -> list[np.ndarray]:
        """Node positions (mm) per axis, shaped for broadcasting."""
        out = []
        for a, (m, h) in enumerate(zip(self.work_shape, self.work_spacing)):
            shp = [1] * self.ndim
            shp[a] = m
            out.append((np.arange(m) * h).astype(np.float32).reshape(shp))
        return out

    def fine_axes(self, slices=None) -> list[np.ndarray]:
        """Voxel-centre positions (mm) per axis (optionally of a crop), for broadcasting."""
        out = []
        for a, (n, h) in enumerate(zip(self.shape, self.spacing)):
            idx = np.arange(n) if slices is None else np.arange(n)[slices[a]]
            shp = [1] * self.ndim
            shp[a] = idx.size
            out.append((idx * h).reshape(shp))
        return out

    def upsample(self, a: np.ndarray) -> np.ndarray:
        """A working-grid field on the voxels (float32): refined axes are read
        at their nodes, decimated axes interpolated linearly."""
        a = np.asarray(a, dtype=np.float32)
        if any(k > 1 for k in self.refine):
            a = a[tuple(slice(None, None, k) for k in self.refine)]
        for axis in range(self.ndim):
            if self.factors[axis] > 1:
                a = _upsample_axis(a, axis, self.shape[axis], self.factors[axis])
        return np.ascontiguousarray(a)


def _upsample_axis(a: np.ndarray, axis: int, n: int, s: int) -> np.ndarray:
    """Linear interpolation along one axis from nodes ``j * s`` to ``0 .. n-1``.

    Fine voxels ``r, r + s, r + 2s, ...`` share the weight ``r / s``: each
    residue is one strided slice, so there is no gather.
    """
    shape = list(a.shape)
    shape[axis] = n
    out = np.empty(shape, dtype=np.float32)

    def at(sl):
        idx = [slice(None)] * a.ndim
        idx[axis] = sl
        return tuple(idx)

    for r in range(s):
        count = len(range(r, n, s))
        dst = out[at(slice(r, n, s))]
        np.copyto(dst, a[at(slice(0, count))])
        if r:
            w = np.float32(r / s)
            dst *= 1 - w
            dst += w * a[at(slice(1, count + 1))]
    return out


def _make_grid(ndim, shape, spacing) -> _Grid:
    if shape is not None:
        try:
            shape = tuple(int(n) for n in shape)
        except (TypeError, ValueError):
            raise ConfigError(f"shape must be a sequence of integers, got {shape!r}") from None
        if ndim is not None and ndim != len(shape):
            raise ConfigError(f"shape {shape} has {len(shape)} dims but ndim={ndim}")
        ndim = len(shape)
    ndim = 3 if ndim is None else ndim
    if ndim not in (2, 3):
        raise ConfigError(f"phantoms are 2-D or 3-D, got ndim={ndim}")
    shape = DEFAULT_SHAPE[ndim] if shape is None else shape
    if min(shape) < MIN_SIZE:
        raise ConfigError(f"shape {shape} is too small: at least {MIN_SIZE} voxels along each axis")
    if spacing is None:
        spacing = (1.0,) * ndim
    sp = np.atleast_1d(np.asarray(spacing, dtype=float))
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.size != ndim or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ConfigError(f"spacing must be {ndim} positive voxel sizes in mm, got {spacing!r}")
    return _Grid(shape, tuple(float(h) for h in sp), (1,) * ndim, (1,) * ndim)


# ============================================================================ random fields
def _seed_sequence(random_seed) -> np.random.SeedSequence:
    if isinstance(random_seed, np.random.SeedSequence):
        return random_seed
    if isinstance(random_seed, np.random.Generator):
        return np.random.SeedSequence(int(random_seed.integers(2**63)))
    if random_seed is None or (isinstance(random_seed, (int, np.integer)) and not isinstance(random_seed, bool) and random_seed >= 0):
        return np.random.SeedSequence(None if random_seed is None else int(random_seed))
    raise ConfigError(f"random_seed must be a non-negative integer, a SeedSequence, a Generator or None, got {random_seed!r}")


def _child(seq: np.random.SeedSequence, *key: int) -> np.random.SeedSequence:
    """The stream named ``key`` under ``seq``: unlike ``spawn``, stateless, so
    each part of a phantom draws the same numbers whatever else is made."""
    return np.random.SeedSequence(seq.entropy, spawn_key=tuple(seq.spawn_key) + key, pool_size=seq.pool_size)


def _gaussian_field(grid: _Grid, rng: np.random.Generator, scale_mm: float) -> np.ndarray:
    """A smooth stationary Gaussian field on the working grid, unit variance.

    White noise on a lattice (step at most the kernel's sd, reaching three sd
    beyond the grid) convolved with a Gaussian kernel of sd
    ``scale_mm / sqrt(2)``: the covariance is ``exp(-r^2 / (2 scale_mm^2))``.
    The kernel is separable, so the field is a product of one small matrix
    per axis with the lattice noise (BLAS, no filtering pass over the grid);
    normalising each matrix's rows gives exactly unit variance at every node,
    edges included.
    """
    mats = []
    for n, h in zip(grid.work_shape, grid.work_spacing):
        # Correlations shorter than half a node are white noise on this grid.
        sd = max(scale_mm / math.sqrt(2), 0.5 * h)
        # A lattice step of one sd leaves a variance ripple of 2 exp(-pi^2)
        # (1e-4) before the row normalisation removes it.
        step = sd
        x = np.arange(n) * h
        lattice = np.arange(-3 * sd, x[-1] + 3 * sd + step, step)
        k = np.exp(-0.5 * ((x[:, None] - lattice[None, :]) / sd) ** 2)
        k /= np.sqrt(np.sum(k**2, axis=1, keepdims=True))
        mats.append(k.astype(np.float32))
    out = rng.standard_normal(tuple(m.shape[1] for m in mats), dtype=np.float32)
    for axis, k in enumerate(mats):
        out = np.moveaxis(np.tensordot(k, out, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(out)


def _centred_noise(grid: _Grid, rng: np.random.Generator, scale_mm: float, sdf: np.ndarray) -> np.ndarray:
    """A unit-variance boundary-noise field with zero mean over the surface ``sdf = 0``.

    Centring makes the rater's mean boundary displacement equal to its offset,
    rather than equal to it only in expectation.
    """
    f = _gaussian_field(grid, rng, scale_mm)
    near = np.abs(sdf) < 0.5 * max(grid.work_spacing)
    if near.any():
        f -= np.float32(f[near].mean())
    return f


# ============================================================================ shapes
def _normalised_axes(grid: _Grid) -> list[np.ndarray]:
    """Coarse node positions mapped to [-1, 1] over the field of view."""
    half = grid.extent / 2
    return [(x - half[a]) / half[a] for a, x in enumerate(grid.work_axes())]


def _ellipsoid_level(u: list[np.ndarray], centre: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``|M (u - c)| - 1``: negative inside the ellipsoid, about distance / radius near it."""
    diffs = [x - c for x, c in zip(u, centre)]
    a = m.T @ m
    q2 = 0.0
    for i in range(len(u)):
        for j in range(i, len(u)):
            q2 = q2 + (a[i, j] if i == j else 2 * a[i, j]) * diffs[i] * diffs[j]
    return np.sqrt(q2) - 1.0


def _smooth_min(levels: list[np.ndarray], k: float) -> np.ndarray:
    """Smooth union of level functions: the quadratic smooth minimum
    ``min(a, b) - h^2 k / 4`` with ``h = max(k - |a - b|, 0) / k``, which equals
    the minimum where the two differ by more than ``k``."""
    out = levels[0]
    for b in levels[1:]:
        h = np.maximum(k - np.abs(out - b), 0.0) / k
        out = np.minimum(out, b) - h * h * (k / 4)
    return out


def _random_ellipsoid(rng, d, centre, radius_range):
    from scipy.stats import special_ortho_group

    rot = special_ortho_group.rvs(d, random_state=rng)
    radii = rng.uniform(*radius_range, size=d)
    return np.asarray(centre, dtype=float), np.diag(1 / radii) @ rot.T


def _unit_vector(rng, d) -> np.ndarray:
    v = rng.standard_normal(d)
    return v / np.linalg.norm(v)


def _shape_level(grid: _Grid, rng: np.random.Generator, n_lobes: int, n_sat: int):
    """Level function of the truth on the working grid (negative inside).

    A main body (smooth union of ``n_lobes`` random ellipsoids near the
    centre) plus ``n_sat`` separate smaller blobs, deformed by a smooth random
    field. Coordinates are normalised to the field of view, so the object
    fills it alike on any shape and spacing.
    """
    d = grid.ndim
    u = _normalised_axes(grid)
    c0 = rng.uniform(-0.1, 0.1, size=d)
    ellipsoids = [_random_ellipsoid(rng, d, c0, (0.32, 0.45))]
    for _ in range(n_lobes - 1):
        ellipsoids.append(_random_ellipsoid(rng, d, c0 + 0.25 * _unit_vector(rng, d), (0.24, 0.36)))
    main = _smooth_min([_ellipsoid_level(u, c, m) for c, m in ellipsoids], 0.3)
    levels = [main]
    made = 0
    for _ in range(n_sat):
        body = _smooth_min(levels, 0.3)
        for _try in range(100):
            centre = rng.uniform(0.6, 0.85) * _unit_vector(rng, d)
            if np.any(np.abs(centre) > 0.78):
                continue  # keep it inside the field of view
            e = _random_ellipsoid(rng, d, centre, (0.11, 0.17))
            lev = _ellipsoid_level(u, *e)
            # Keep it only where it stays apart from everything made so far.
            if not np.any((lev < 0.4) & (body < 0.4)):
                ellipsoids.append(e)
                levels.append(lev)
                made += 1
                break
    phi = _smooth_min(levels, 0.1)
    scale = 0.15 * float(grid.extent.min())
    phi = phi + 0.06 * _gaussian_field(grid, rng, scale)
    return ellipsoids, phi, made


def _signed_distance(phi: np.ndarray, grid: _Grid, band: float) -> np.ndarray:
    """Signed distance (mm, negative inside) to the zero set of ``phi``.

    Fast marching (scikit-fmm) initialised by interpolating ``phi`` across
    the zero crossing, so the boundary sits between nodes, not on them;
    exact within ``band`` mm, clipped to ``+-band`` outside.
    """
    import skfmm

    if not (np.any(phi < 0) and np.any(phi > 0)):
        raise ConfigError("the phantom's object does not fit this grid; use a larger shape")
    dist = skfmm.distance(phi, dx=list(grid.work_spacing), narrow=band)
    if np.ma.isMaskedArray(dist):
        dist = np.where(np.ma.getmaskarray(dist), np.sign(phi) * band, dist.filled(0))
    return np.clip(dist, -band, band).astype(np.float32)


def _equivalent_radius(sdf: np.ndarray, grid: _Grid) -> float:
    """Radius (mm) of the ball (disc in 2-D) with the object's volume (area)."""
    vol = np.count_nonzero(sdf < 0) * float(np.prod(grid.work_spacing))
    unit = math.pi if grid.ndim == 2 else 4 * math.pi / 3
    return (vol / unit) ** (1 / grid.ndim)


def _radius_option(name, value, grid: _Grid) -> float | None:
    """A radius option in mm (None: derived from the object later)."""
    if value is None:
        return None
    r = _check_positive(name, value)
    if r < 2 * max(grid.spacing):
        raise ConfigError(f"{name}={r:.3g} mm is below two voxels ({2 * max(grid.spacing):.3g} mm)")
    return r


def _boundary_point(sdf: np.ndarray, grid: _Grid, rng: np.random.Generator, reach: float, avoid=()):
    """A random point on the main body's boundary (mm) whose ``reach``-ball
    lies inside the field of view, with its outward unit normal; far from the
    ``avoid`` points. The main body (largest component), because on a small
    satellite the raters' own noise can be as large as the feature."""
    from scipy import ndimage

    h = max(grid.work_spacing)
    labels, n = ndimage.label(sdf < h)
    main = labels == (1 + int(np.argmax(ndimage.sum_labels(np.ones_like(sdf), labels, np.arange(1, n + 1)))))
    near = (np.abs(sdf) < 0.5 * h) & main
    idx = np.argwhere(near)
    pos = idx * np.asarray(grid.work_spacing)
    # Room: distance to the nearest side of the field of view. Where no point
    # has the room asked for, take the roomiest tenth (the feature is clipped).
    room = np.min(np.minimum(pos, grid.extent - pos), axis=1)
    keep = room >= reach
    if not keep.any():
        keep = room >= np.quantile(room, 0.9)
    idx, pos = idx[keep], pos[keep]
    if len(avoid):
        dmin = np.min(np.linalg.norm(pos[:, None, :] - np.asarray(avoid)[None], axis=2), axis=1)
        keep = dmin >= np.quantile(dmin, 0.75)
        idx, pos = idx[keep], pos[keep]
    k = int(rng.integers(len(idx)))
    # Outward normal: central differences of the distance map at that node.
    g = np.zeros(grid.ndim)
    for a in range(grid.ndim):
        hi = idx[k].copy()
        lo = idx[k].copy()
        hi[a] = min(hi[a] + 1, sdf.shape[a] - 1)
        lo[a] = max(lo[a] - 1, 0)
        g[a] = (sdf[tuple(hi)] - sdf[tuple(lo)]) / max((hi[a] - lo[a]) * grid.work_spacing[a], 1e-12)
    n = g / max(np.linalg.norm(g), 1e-12)
    return pos[k], n


def _ball_distance(axes: list[np.ndarray], centre, radius) -> np.ndarray:
    return np.sqrt(sum((x - c) ** 2 for x, c in zip(axes, centre))) - radius


def _cluster_truths(sdf0, grid, rng, n_clusters, radius, band) -> list[np.ndarray]:
    """Truth 1: truth 0 with an extra lobe; truth 2: truth 0 with a bite taken out elsewhere."""
    axes = grid.work_axes()
    blend = 0.25 * radius
    p1, n1 = _boundary_point(sdf0, grid, rng, 1.5 * radius + max(grid.spacing))
    lobe = _ball_distance(axes, p1 + 0.5 * radius * n1, radius)
    out = [_signed_distance(_smooth_min([sdf0.astype(float), lobe], blend), grid, band)]
    if n_clusters == 3:
        p2, n2 = _boundary_point(sdf0, grid, rng, 1.2 * radius, avoid=[p1])
        bite = _ball_distance(axes, p2 - 0.2 * radius * n2, radius)
        out.append(_signed_distance(-_smooth_min([-sdf0.astype(float), bite], blend), grid, band))
    return out


def _core_distance(ellipsoids, sdf0, grid, rng, band) -> np.ndarray:
    """Distance map of the core of the multiclass phantom: the object's
    ellipsoids at 5/8 size, deformed, and kept 1.5 voxels inside the object."""
    u = _normalised_axes(grid)
    levels = [_ellipsoid_level(u, c, 1.6 * m) for c, m in ellipsoids]
    phi = _smooth_min(levels, 0.3) + 0.06 * _gaussian_field(grid, rng, 0.1 * float(grid.extent.min()))
    core = _signed_distance(phi, grid, band)
    return np.maximum(core, sdf0 + 1.5 * max(grid.spacing))


# ============================================================================ outlier
def _outlier_ball(sdf0, grid, rng, radius, mode) -> dict:
    anchor, normal = _boundary_point(sdf0, grid, rng, radius + max(grid.spacing))
    # Most of the ball where the rater departs: outside the truth for a blob
    # it adds, inside for one it removes; across the boundary for both.
    centre = anchor + {"add": 0.25, "remove": -0.25, "both": 0.0}[mode] * radius * normal
    tangent = _unit_vector(rng, grid.ndim)
    tangent -= tangent.dot(normal) * normal
    tangent /= max(np.linalg.norm(tangent), 1e-12)
    lo = [max(0, int(math.floor((c - radius) / h)) - 1) for c, h in zip(centre, grid.spacing)]
    hi = [min(n, int(math.ceil((c + radius) / h)) + 2) for c, h, n in zip(centre, grid.spacing, grid.shape)]
    slices = tuple(slice(a, b) for a, b in zip(lo, hi))
    axes = grid.fine_axes(slices)
    ball = _ball_distance(axes, centre, radius).astype(np.float32)
    side = sum((x - c) * t for x, c, t in zip(axes, centre, tangent)).astype(np.float32)
    return {"centre": centre, "normal": normal, "tangent": tangent, "slices": slices, "sdf": ball, "side": side}


def _apply_outlier(d: np.ndarray, ball: dict, mode: str) -> None:
    """Constructive solid geometry on the rater's field, in place: union with
    the ball ("add"), subtraction of it ("remove"), or both on its two halves."""
    sub = d[ball["slices"]]
    b, side = ball["sdf"], ball["side"]
    if mode == "add":
        np.minimum(sub, b, out=sub)
    elif mode == "remove":
        np.maximum(sub, -b, out=sub)
    else:
        np.minimum(sub, np.maximum(b, -side), out=sub)
        np.maximum(sub, -np.maximum(b, side), out=sub)


# ============================================================================ image
def _image(sdf, core, grid, rng, contrast, noise, bias, edge) -> np.ndarray:
    """Background 1, object 1 + contrast (core 1 + 2 contrast), edges blurred
    over ``edge`` mm on the truth's boundary, a smooth multiplicative bias and
    white noise."""
    from scipy.special import expit

    img = expit(-sdf / np.float32(edge)).astype(np.float32)
    if core is not None:
        img += expit(-core / np.float32(edge))
    img *= np.float32(contrast)
    img += np.float32(1.0)
    if bias > 0:
        img *= grid.upsample(1 + bias * np.clip(_gaussian_field(grid, rng, 0.5 * float(grid.extent.max())), -3, 3))
    if noise > 0:
        img += np.float32(noise * contrast) * rng.standard_normal(grid.shape, dtype=np.float32)
    return img


# ============================================================================ helpers
def _rater_maps(maps: np.ndarray, kind: str, k: int, grid: _Grid, image: np.ndarray) -> RaterMaps:
    # The bare constructor: the maps are valid by construction, and
    # from_arrays would copy them twice (hundreds of MB at benchmark sizes).
    sdims = spatial_dims(grid.ndim)
    names = [f"rater{i}" for i in range(maps.shape[0])]
    return RaterMaps(
        maps=xr.DataArray(maps, dims=("rater", *sdims), coords={"rater": names}, name="maps"),
        kind=kind,
        n_classes=k,
        spacing=grid.spacing,
        affine=default_affine(grid.spacing),
        image=xr.DataArray(image, dims=sdims, name="image"),
        sources=tuple(names),
    )


def _confusion(labels: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """(P, K, K) row-normalised confusion matrices, rows: true class."""
    p = labels.shape[0]
    out = np.zeros((p, k, k))
    t = truth.ravel().astype(np.intp)
    for i in range(p):
        out[i] = np.bincount(t * k + labels[i].ravel(), minlength=k * k).reshape(k, k)
    return out / np.maximum(out.sum(axis=2, keepdims=True), 1)


def _default_offsets(membership: np.ndarray, m: float) -> np.ndarray:
    """Symmetric offsets within each truth's raters: -m .. +m mm."""
    out = np.zeros(membership.size)
    for c in np.unique(membership):
        sel = membership == c
        out[sel] = np.linspace(-m, m, int(sel.sum())) if sel.sum() > 1 else 0.0
    return out


def _per_rater(name, value, p, default=None, low=None, strict=False) -> np.ndarray:
    if value is None:
        value = default
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number or one number per rater, got {value!r}") from None
    if arr.ndim == 0:
        arr = np.full(p, float(arr))
    if arr.shape != (p,):
        raise ConfigError(f"{name} must be a number or {p} numbers (one per rater), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    if low is not None and (np.any(arr <= low) if strict else np.any(arr < low)):
        raise ConfigError(f"{name} must be {'>' if strict else '>='} {low:g}, got {arr.tolist()}")
    return arr


def _check_int(name, value, low) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(f"{name} must be at least {low}, got {value}")
    return int(value)


def _check_positive(name, value) -> float:
    v = _check_nonneg(name, value)
    if v == 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")
    return v


def _check_nonneg(name, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} must be a finite non-negative number, got {value!r}")
    return v


def _soft_dilation():
    try:
        from .preprocess import soft_dilation
    except ImportError:
        raise NotImplementedError(
            "the 'soft' phantom needs bayesfuse.preprocess.soft_dilation, which this installation does not have yet"
        ) from None
    return soft_dilation
