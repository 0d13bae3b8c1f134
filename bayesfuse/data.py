"""RaterMaps: P raters' maps of one subject, with geometry, image and ROI.

The container every model takes. It is backed by an :class:`xarray.DataArray`
with named dims:

- ``rater``, then the spatial dims ``x``, ``y`` and (3-D) ``z`` in nibabel's
  array order;
- ``class`` last, for probability maps with K classes.

Three kinds of input are held as given, without widening them in memory:

``binary``
    0/1 masks, stored as ``uint8`` (P, *spatial).
``labels``
    integer label maps with K classes 0..K-1, stored as the smallest unsigned
    integer type (P, *spatial).
``probability``
    probability maps, stored as ``float32``: either (P, *spatial) holding the
    foreground probability of a two-class problem, or (P, *spatial, K) on the
    simplex.

Models ask for the view they need (:meth:`RaterMaps.binary`,
:meth:`RaterMaps.labels`, :meth:`RaterMaps.foreground`,
:meth:`RaterMaps.probabilities`); each view checks that it makes sense for the
data and says why when it does not.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

import numpy as np
import xarray as xr

from .errors import InputError

log = logging.getLogger(__name__)

Kind = Literal["binary", "labels", "probability"]
SPATIAL_DIMS = ("x", "y", "z")

#: Tolerance on sum_k p_k = 1 for probability maps read from files (float32
#: storage and resampling by other tools leave errors of about 1e-4).
SIMPLEX_TOL = 1e-3


def spatial_dims(ndim: int) -> tuple[str, ...]:
    """Names of the spatial dims for a 2-D or 3-D image."""
    if ndim not in (2, 3):
        raise ValueError(f"images must be 2-D or 3-D, got {ndim} spatial dims")
    return SPATIAL_DIMS[:ndim]


def default_affine(spacing: Sequence[float]) -> np.ndarray:
    """A diagonal affine with the given voxel spacing (mm) and origin 0."""
    aff = np.eye(4)
    for i, s in enumerate(spacing):
        aff[i, i] = float(s)
    return aff


def _describe(sources: Sequence[str], i: int) -> str:
    return sources[i] if i < len(sources) else f"rater {i}"


def check_finite(arr: np.ndarray, source: str) -> None:
    """Refuse NaN and infinity, saying how many voxels carry them."""
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        n = int(np.count_nonzero(bad))
        if n:
            raise InputError(source, f"{n} voxel(s) are NaN or infinite")


def classify_values(arr: np.ndarray, source: str) -> tuple[Kind, np.ndarray]:
    """Decide what a single rater's array holds and return it in its storage type.

    Rules, in order:

    1. boolean, or only the values {0, 1}: ``binary``;
    2. only {0, 255} (8-bit masks as many tools save them): ``binary``, with
       an info message; 255 becomes 1;
    3. non-negative integers (in an integer dtype, or integral floats above
       1): ``labels``;
    4. floats in [0, 1]: ``probability``;
    5. anything else (negative values, non-integral values above 1): error.
    """
    check_finite(arr, source)
    if arr.dtype == bool:
        return "binary", arr.astype(np.uint8)
    if arr.size == 0:
        raise InputError(source, "the image is empty (no voxels)")
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise InputError(source, f"negative values (min {float(lo):g}): rater maps hold labels or probabilities in [0, 1]")
    integral = np.issubdtype(arr.dtype, np.integer) or bool(np.all(np.mod(arr, 1) == 0))
    if integral:
        if hi <= 1:
            return "binary", arr.astype(np.uint8)
        values = np.unique(arr)
        if values.size <= 2 and set(values.tolist()) <= {0, 255}:
            log.info("%s: values {0, 255} read as a binary mask (255 = foreground)", source)
            return "binary", (arr == 255).astype(np.uint8)
        if hi > np.iinfo(np.uint16).max:
            raise InputError(source, f"label value {float(hi):g} is too large to be a class index")
        return "labels", arr.astype(np.uint8 if hi < 256 else np.uint16)
    if hi > 1:
        raise InputError(source, f"values outside [0, 1] (min {float(lo):g}, max {float(hi):g}) that are not integer labels")
    return "probability", arr.astype(np.float32)


@dataclass(frozen=True)
class RaterMaps:
    """P raters' maps of one subject, with voxel geometry.

    Build it with :meth:`from_arrays` (or :func:`bayesfuse.io.load_raters` for
    files), which validates everything; the bare constructor trusts its input.

    Attributes
    ----------
    maps : xarray.DataArray
        dims ``("rater", "x", "y"[, "z"][, "class"])``; coords ``rater`` hold
        the raters' names (the input file names when read from files).
    kind : {"binary", "labels", "probability"}
    n_classes : int
        K, the number of classes (2 for binary masks).
    spacing : tuple of float
        Voxel size in mm along each spatial dim.
    affine : numpy.ndarray
        4 x 4 voxel-to-world matrix (nibabel convention), kept for writing.
    image : xarray.DataArray or None
        Intensity image on the same grid (spatial dims), if given.
    mask : xarray.DataArray or None
        Boolean region of interest (spatial dims), if given.
    sources : tuple of str
        One label per rater for error messages (file name or "rater i").
    checksums : dict
        SHA-256 of each input file, when read from files.
    """

    maps: xr.DataArray
    kind: Kind
    n_classes: int
    spacing: tuple[float, ...]
    affine: np.ndarray
    image: xr.DataArray | None = None
    mask: xr.DataArray | None = None
    sources: tuple[str, ...] = ()
    checksums: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_arrays(
        cls,
        raters: Sequence[np.ndarray] | np.ndarray,
        *,
        kind: Kind | None = None,
        n_classes: int | None = None,
        class_axis: bool | None = None,
        spacing: Sequence[float] | None = None,
        affine: np.ndarray | None = None,
        image: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        names: Sequence[str] | None = None,
        sources: Sequence[str] | None = None,
        checksums: dict[str, str] | None = None,
        min_raters: int = 2,
    ) -> "RaterMaps":
        """Validate and hold a list (or stacked array, rater axis first) of maps.

        Parameters
        ----------
        raters : sequence of arrays, or an array with the rater axis first
            Each rater's map: spatial (2-D or 3-D), or spatial + class axis
            for K-class probability maps.
        kind : {"binary", "labels", "probability"}, optional
            Declare the kind instead of inferring it; the values are checked
            against it (e.g. ``"binary"`` refuses a map holding a 2).
        n_classes : int, optional
            K. For labels, every value must lie in 0..K-1.
        class_axis : bool, optional
            Whether each rater's array ends with a class axis. Inferred when
            not given: a trailing axis whose entries sum to 1 on every voxel
            and ``ndim == 4`` (or 3 with K-class 2-D maps when
            ``n_classes`` matches the last axis).
        spacing, affine : optional
            Voxel geometry; ``affine`` wins when both are given, and either
            is derived from the other. Default: 1 mm isotropic.
        image, mask : array, optional
            Intensity image and region of interest on the same grid.
        names, sources : sequence of str, optional
            Rater names (coords) and labels used in error messages.
        min_raters : int
            Fewer raters than this is an error (fusion needs at least two).
        """
        arrays = [np.asarray(r) for r in raters]
        p = len(arrays)
        names = list(names) if names is not None else [f"rater{i}" for i in range(p)]
        sources = tuple(sources) if sources is not None else tuple(names)
        if len(names) != p:
            raise InputError("raters", f"{len(names)} names for {p} raters")
        if p < min_raters:
            what = sources[0] if p else "raters"
            raise InputError(what, f"{p} rater(s) given; fusion needs at least {min_raters}")

        ref_shape = arrays[0].shape
        for i, a in enumerate(arrays):
            if a.shape != ref_shape:
                raise InputError(_describe(sources, i), f"shape {a.shape} differs from {_describe(sources, 0)}'s {ref_shape}")

        if class_axis is None:
            class_axis = _looks_like_class_axis(arrays[0], n_classes)
        nd = arrays[0].ndim - (1 if class_axis else 0)
        if nd not in (2, 3):
            raise InputError(_describe(sources, 0), f"expected a 2-D or 3-D map{' with a class axis' if class_axis else ''}, got shape {ref_shape}")
        sdims = spatial_dims(nd)

        if class_axis:
            stored, kind_found, k = _validate_class_maps(arrays, sources, n_classes, kind)
            dims = ("rater", *sdims, "class")
        else:
            stored, kind_found, k = _validate_plain_maps(arrays, sources, n_classes, kind)
            dims = ("rater", *sdims)

        spacing_t, affine_a = _geometry(spacing, affine, nd)
        coords = {"rater": names}
        if class_axis:
            coords["class"] = np.arange(k)
        maps = xr.DataArray(stored, dims=dims, coords=coords, name="maps")

        spatial_shape = stored.shape[1 : 1 + nd]
        img = None
        if image is not None:
            image = np.asarray(image)
            if image.shape != spatial_shape:
                raise InputError("image", f"shape {image.shape} differs from the raters' {spatial_shape}")
            check_finite(image, "image")
            img = xr.DataArray(image.astype(np.float32, copy=False), dims=sdims, name="image")
        roi = None
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != spatial_shape:
                raise InputError("mask", f"shape {mask.shape} differs from the raters' {spatial_shape}")
            check_finite(mask, "mask")
            mkind, mstored = classify_values(mask, "mask")
            if mkind != "binary":
                raise InputError("mask", "a region-of-interest mask must hold only 0 and 1 (or 0 and 255)")
            if not mstored.any():
                raise InputError("mask", "the region-of-interest mask is empty")
            roi = xr.DataArray(mstored.astype(bool), dims=sdims, name="mask")

        return cls(
            maps=maps,
            kind=kind_found,
            n_classes=k,
            spacing=spacing_t,
            affine=affine_a,
            image=img,
            mask=roi,
            sources=sources,
            checksums=dict(checksums or {}),
        )

    # ------------------------------------------------------------ properties
    @property
    def n_raters(self) -> int:
        return int(self.maps.sizes["rater"])

    @property
    def rater_names(self) -> list[str]:
        return [str(r) for r in self.maps["rater"].values]

    @property
    def spatial_dims(self) -> tuple[str, ...]:
        return tuple(d for d in self.maps.dims if d in SPATIAL_DIMS)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape."""
        return tuple(int(self.maps.sizes[d]) for d in self.spatial_dims)

    @property
    def ndim(self) -> int:
        return len(self.spatial_dims)

    @property
    def has_class_axis(self) -> bool:
        return "class" in self.maps.dims

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    # ------------------------------------------------------------------ views
    def binary(self) -> np.ndarray:
        """0/1 masks as uint8 (P, *spatial); only for binary data.

        Two-class label maps qualify (their labels are 0 and 1).
        """
        if self.kind == "binary" or (self.kind == "labels" and self.n_classes == 2):
            return self.maps.values.astype(np.uint8, copy=False)
        raise InputError(self._who(), f"this method needs binary (0/1) masks; the raters hold {self._what()}")

    def labels(self) -> np.ndarray:
        """Integer labels (P, *spatial): as given, or the argmax of probabilities."""
        if self.kind in ("binary", "labels"):
            return self.maps.values
        if self.has_class_axis:
            return np.argmax(self.maps.values, axis=-1).astype(np.uint8 if self.n_classes < 256 else np.uint16)
        return (self.maps.values > 0.5).astype(np.uint8)

    def foreground(self, dtype=np.float32) -> np.ndarray:
        """Foreground probability (P, *spatial) of a two-class problem."""
        if self.n_classes != 2:
            raise InputError(self._who(), f"a foreground map needs two classes; the raters hold {self.n_classes}")
        v = self.maps.values
        if self.has_class_axis:
            v = v[..., 1]
        return v.astype(dtype, copy=False)

    def probabilities(self, dtype=np.float32) -> np.ndarray:
        """Probability maps on the simplex, (P, *spatial, K).

        Binary masks and labels become one-hot vectors; a foreground map p
        becomes (1 - p, p).
        """
        v = self.maps.values
        if self.has_class_axis:
            return v.astype(dtype, copy=False)
        if self.kind == "probability":
            fg = v.astype(dtype, copy=False)
            return np.stack([1 - fg, fg], axis=-1)
        k = self.n_classes
        out = np.zeros(v.shape + (k,), dtype=dtype)
        np.put_along_axis(out, v[..., None].astype(np.intp), 1, axis=-1)
        return out

    def roi(self) -> np.ndarray | None:
        """The region-of-interest mask as a boolean array, or None."""
        return None if self.mask is None else self.mask.values

    # --------------------------------------------------------------- derived
    def with_maps(self, values: np.ndarray, kind: Kind, n_classes: int | None = None) -> "RaterMaps":
        """The same subject with new maps (e.g. after conversion to probabilities)."""
        k = self.n_classes if n_classes is None else n_classes
        dims = ("rater", *self.spatial_dims) + (("class",) if values.ndim == self.ndim + 2 else ())
        coords = {"rater": self.maps["rater"].values}
        if "class" in dims:
            coords["class"] = np.arange(values.shape[-1])
        maps = xr.DataArray(values, dims=dims, coords=coords, name="maps")
        return replace(self, maps=maps, kind=kind, n_classes=k)

    def subset(self, raters: Sequence[int] | Sequence[str]) -> "RaterMaps":
        """Keep some raters (by index or name), in the order given."""
        idx = [self.rater_names.index(r) if isinstance(r, str) else int(r) for r in raters]
        return replace(
            self,
            maps=self.maps.isel(rater=idx),
            sources=tuple(self.sources[i] for i in idx) if self.sources else (),
        )

    def downsample(self, factor: int | Sequence[int], how: Literal["mean", "majority", "stride"] = "mean") -> "RaterMaps":
        """The same subject on a grid coarser by an integer factor per spatial axis.

        Made for the NUTS cross-check (:mod:`bayesfuse.crosscheck`), which
        needs a small problem of the same kind as the full one.

        Parameters
        ----------
        factor : int or sequence of int
            Block size along each spatial axis (one value for all axes).
        how : {"mean", "majority", "stride"}
            ``mean``: block average. Probability maps stay probability maps;
            binary masks become foreground fractions and K-class labels
            class fractions (probability maps with a class axis), the input
            of the soft and Gaussian models. ``majority``: the most frequent
            label of each block (binary masks and labels only; ties go to the
            lower label), keeping the kind, for models that fuse hard
            labels (STAPLE). ``stride``: the voxel at the centre of each
            block (any kind, kept).

        Returns
        -------
        RaterMaps
            Spatial shape ceil(n / factor) per axis (a partial block at the
            end of an axis is reduced over the voxels it has); spacing times
            the factor, origin at the centre of the first block. The image
            is block-averaged; the region of interest keeps the blocks that
            are at least half inside it. File checksums are dropped (the
            maps are new).
        """
        nd = self.ndim
        f = np.broadcast_to(np.asarray(factor), (nd,))
        if not (np.issubdtype(f.dtype, np.integer) and np.all(f >= 1)):
            raise InputError("downsample", f"factor must be a positive integer (or one per axis), not {factor!r}")
        f = tuple(int(v) for v in f)
        if how not in ("mean", "majority", "stride"):
            raise InputError("downsample", f"how must be 'mean', 'majority' or 'stride', not {how!r}")
        if how == "majority" and self.kind == "probability":
            raise InputError(self._who(), "a block majority needs hard labels; these are probability maps (use how='mean' or 'stride')")
        starts = [np.arange(0, n, s) for n, s in zip(self.shape, f)]
        centres = [np.minimum(st + s // 2, n - 1) for st, n, s in zip(starts, self.shape, f)]

        def block_mean(a: np.ndarray, first_axis: int) -> np.ndarray:
            out = np.asarray(a, dtype=np.float64)
            for i, st in enumerate(starts):
                ax = first_axis + i
                counts = np.diff(np.append(st, out.shape[ax])).reshape((-1,) + (1,) * (out.ndim - ax - 1))
                out = np.add.reduceat(out, st, axis=ax) / counts
            return out

        values = self.maps.values
        class_axis, kind = self.has_class_axis, self.kind
        if how == "stride":
            new = values[np.ix_(np.arange(self.n_raters), *centres)] if not class_axis else \
                values[np.ix_(np.arange(self.n_raters), *centres, np.arange(self.n_classes))]
        elif kind == "probability":
            new = np.stack([block_mean(v, 0) for v in values]).astype(np.float32)
        else:
            k = self.n_classes
            frac = np.stack([np.stack([block_mean(v == c, 0) for c in range(k)], axis=-1) for v in values])
            if how == "majority":
                new = np.argmax(frac, axis=-1)
            elif k == 2:
                new, kind = frac[..., 1].astype(np.float32), "probability"
            else:
                new, kind, class_axis = frac.astype(np.float32), "probability", True
        image = None if self.image is None else block_mean(self.image.values, 0).astype(np.float32)
        mask = None if self.mask is None else block_mean(self.mask.values, 0) >= 0.5
        if how == "stride":
            image = None if self.image is None else self.image.values[np.ix_(*centres)]
            mask = None if self.mask is None else self.mask.values[np.ix_(*centres)]
        affine = self.affine.copy()
        offset = np.array([(s - 1) / 2 if how != "stride" else s // 2 for s in f] + [0.0] * (3 - nd))
        affine[:3, 3] = self.affine[:3, :3] @ offset + self.affine[:3, 3]
        affine[:3, :nd] = self.affine[:3, :nd] * np.array(f)[None, :]
        return RaterMaps.from_arrays(
            list(new), kind=kind, n_classes=self.n_classes, class_axis=class_axis, affine=affine,
            image=image, mask=mask, names=self.rater_names, sources=self.sources or None,
        )

    def checksum(self) -> str:
        """SHA-256 identifying the input.

        When the maps were read from files, the files' own SHA-256 (taken
        while loading) identify them, with the kind, K and shape; hashing the
        decoded arrays again would cost ten read passes over the data. Maps
        built from arrays are hashed byte by byte.
        """
        h = hashlib.sha256()
        if self.checksums:
            for k in sorted(self.checksums):
                h.update(f"{k}={self.checksums[k]}".encode())
            h.update(f"{self.kind}:{self.n_classes}:{tuple(self.maps.shape)}".encode())
        else:
            # hashlib reads the array's buffer: same bytes as tobytes(), no copy
            h.update(np.ascontiguousarray(self.maps.values))
        return h.hexdigest()

    def to_dataset(self) -> xr.Dataset:
        """Everything as one :class:`xarray.Dataset` (maps, image, mask, attrs)."""
        ds = xr.Dataset({"maps": self.maps})
        if self.image is not None:
            ds["image"] = self.image
        if self.mask is not None:
            ds["mask"] = self.mask
        ds.attrs.update(
            kind=self.kind,
            n_classes=self.n_classes,
            spacing=list(self.spacing),
            affine=self.affine.ravel().tolist(),
        )
        return ds

    def _who(self) -> str:
        if self.sources:
            return self.sources[0] if self.n_raters == 1 else f"{self.sources[0]} (and the other raters)"
        return "raters"

    def _what(self) -> str:
        if self.kind == "labels":
            return f"labels with {self.n_classes} classes"
        if self.kind == "probability":
            return "probability maps"
        return "binary masks"

    def __repr__(self) -> str:
        return (
            f"RaterMaps({self.n_raters} raters, {self.kind}, K={self.n_classes}, "
            f"shape={self.shape}, spacing={tuple(round(s, 4) for s in self.spacing)}, "
            f"image={'yes' if self.image is not None else 'no'}, mask={'yes' if self.mask is not None else 'no'})"
        )


# ---------------------------------------------------------------------------
def _looks_like_class_axis(a: np.ndarray, n_classes: int | None) -> bool:
    if a.ndim == 4:
        return True
    if a.ndim != 3 or not np.issubdtype(a.dtype, np.floating):
        return False
    if n_classes is not None and a.shape[-1] == n_classes and n_classes <= 16:
        return True
    return False


def _geometry(spacing, affine, nd: int) -> tuple[tuple[float, ...], np.ndarray]:
    if affine is not None:
        affine = np.asarray(affine, dtype=float)
        if affine.shape != (4, 4):
            raise InputError("affine", f"expected a 4 x 4 matrix, got shape {affine.shape}")
        if spacing is None:
            spacing = np.sqrt((affine[:3, :nd] ** 2).sum(axis=0))
    if spacing is None:
        spacing = (1.0,) * nd
    spacing = tuple(float(s) for s in np.atleast_1d(spacing))
    if len(spacing) == 1:
        spacing = spacing * nd
    if len(spacing) != nd:
        raise InputError("spacing", f"{len(spacing)} values for a {nd}-D image")
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise InputError("spacing", f"voxel sizes must be positive, got {spacing}")
    if affine is None:
        affine = default_affine(spacing)
    return spacing, affine


def _validate_plain_maps(arrays, sources, n_classes, kind):
    kinds = []
    stored = []
    for i, a in enumerate(arrays):
        src = _describe(sources, i)
        k_i, s_i = classify_values(a, src)
        if kind == "probability" and k_i == "binary":
            # 0/1 maps declared as probabilities are degenerate probabilities.
            k_i, s_i = "probability", s_i.astype(np.float32)
        if kind == "binary" and k_i != "binary":
            raise InputError(src, f"labels must be 0/1 for a binary method; found values up to {float(a.max()):g}")
        kinds.append(k_i)
        stored.append(s_i)
    found = set(kinds)
    if found == {"binary"}:
        result_kind, k = "binary", 2
        if n_classes not in (None, 2):
            result_kind, k = "labels", int(n_classes)
    elif found <= {"binary", "labels"}:
        result_kind = "labels"
        hi = int(max(int(s.max()) for s in stored))
        k = int(n_classes) if n_classes is not None else hi + 1
    elif found <= {"binary", "probability"}:
        # Some raters give hard masks, others probabilities: all probability.
        result_kind, k = "probability", 2
        if n_classes not in (None, 2):
            raise InputError(_describe(sources, 0), f"maps without a class axis hold one foreground probability, so K = 2, not {n_classes}")
    else:
        i = kinds.index("labels")
        raise InputError(_describe(sources, i), "holds integer labels while other raters hold probabilities")
    if kind is not None and kind != result_kind and not (kind == "labels" and result_kind == "binary"):
        raise InputError(_describe(sources, 0), f"declared {kind} but the values are {result_kind}")
    if kind == "labels":
        result_kind = "labels"
    if result_kind == "labels":
        for i, s in enumerate(stored):
            hi = int(s.max())
            if hi >= k:
                raise InputError(_describe(sources, i), f"label value {hi} outside the declared classes 0..{k - 1}")
        if k < 2:
            raise InputError(_describe(sources, 0), "labels need at least two classes")
    dtype = np.float32 if result_kind == "probability" else (np.uint8 if k < 256 else np.uint16)
    out = np.empty((len(stored),) + stored[0].shape, dtype=dtype)
    for i, s in enumerate(stored):
        out[i] = s
    return out, result_kind, k


def _validate_class_maps(arrays, sources, n_classes, kind):
    k = arrays[0].shape[-1]
    if n_classes is not None and n_classes != k:
        raise InputError(_describe(sources, 0), f"class axis of length {k} but {n_classes} classes declared")
    if kind not in (None, "probability"):
        raise InputError(_describe(sources, 0), f"maps with a class axis are probability maps, not {kind}")
    if k < 2:
        raise InputError(_describe(sources, 0), "a class axis needs at least two classes")
    out = np.empty((len(arrays),) + arrays[0].shape, dtype=np.float32)
    for i, a in enumerate(arrays):
        src = _describe(sources, i)
        check_finite(a, src)
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            raise InputError(src, f"values outside [0, 1] (min {lo:g}, max {hi:g})")
        s = a.sum(axis=-1, dtype=np.float64)
        dev = float(np.max(np.abs(s - 1)))
        if dev > SIMPLEX_TOL:
            n = int(np.count_nonzero(np.abs(s - 1) > SIMPLEX_TOL))
            raise InputError(src, f"class probabilities do not sum to 1 on {n} voxel(s) (largest deviation {dev:.3g})")
        out[i] = a
    return out, "probability", k
