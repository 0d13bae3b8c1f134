"""The stable Python entry point: :func:`fuse`.

``bayesfuse.fuse(raters, method, **options)`` accepts the rater container,
a list of file paths, or a list / stacked array of maps (rater axis first),
converts binary masks to probabilities when asked (``to_prob``), finds the
method in the zoo, and returns its :class:`~bayesfuse.result.FusionResult`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from .data import RaterMaps
from .errors import ConfigError
from .io import load_raters
from .models import get_model
from .result import FusionResult

#: Binary-to-probability conversions that ``to_prob`` names (see
#: :mod:`bayesfuse.preprocess`).
TO_PROB = ("none", "euclidean", "geodesic", "soft-dilation")


def as_rater_maps(
    raters: RaterMaps | Sequence[str | os.PathLike] | Sequence[np.ndarray] | np.ndarray,
    *,
    image=None,
    mask=None,
    spacing=None,
    affine=None,
    kind=None,
    n_classes=None,
    invert: bool = False,
) -> RaterMaps:
    """Turn any accepted form of input into a validated :class:`RaterMaps`."""
    if isinstance(raters, RaterMaps):
        if image is None and mask is None:
            return raters
        return RaterMaps.from_arrays(
            list(raters.maps.values), kind=raters.kind, n_classes=raters.n_classes,
            class_axis=raters.has_class_axis, spacing=raters.spacing, affine=raters.affine,
            image=_array_or_file(image) if image is not None else (None if raters.image is None else raters.image.values),
            mask=_array_or_file(mask) if mask is not None else raters.roi(),
            names=raters.rater_names, sources=raters.sources, checksums=raters.checksums,
        )
    if isinstance(raters, (str, os.PathLike)):
        raters = [raters]
    if isinstance(raters, (list, tuple)) and raters and isinstance(raters[0], (str, os.PathLike)):
        return load_raters(raters, image=image, mask=mask, kind=kind, n_classes=n_classes, invert=invert, spacing=spacing)
    return RaterMaps.from_arrays(
        raters, kind=kind, n_classes=n_classes, spacing=spacing, affine=affine,
        image=_array_or_file(image), mask=_array_or_file(mask),
    )


def _array_or_file(x):
    if x is None:
        return None
    if isinstance(x, (str, os.PathLike)):
        from .io import read_image

        return read_image(x)[0]
    return np.asarray(x)


def convert(data: RaterMaps, to_prob: str = "none", **options: Any) -> RaterMaps:
    """Binary masks to probability maps (``to_prob`` in :data:`TO_PROB`)."""
    if to_prob in (None, "none"):
        if options:
            raise ConfigError(f"options {sorted(options)} given without a --to-prob conversion")
        return data
    if to_prob not in TO_PROB:
        raise ConfigError(f"unknown conversion {to_prob!r}; choose one of {', '.join(TO_PROB)}")
    from . import preprocess

    return preprocess.to_probability(data, to_prob, **options)


def fuse(
    raters,
    method: str,
    *,
    image=None,
    mask=None,
    spacing=None,
    affine=None,
    kind=None,
    n_classes=None,
    invert: bool = False,
    to_prob: str = "none",
    to_prob_options: dict | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    random_seed=None,
    progress: bool | None = None,
    **options: Any,
) -> FusionResult:
    """Fuse several raters' maps into a consensus with the named method.

    Parameters
    ----------
    raters : RaterMaps, list of paths, or list / stacked array of maps
        The raters (rater axis first for arrays). Files: see
        :func:`bayesfuse.io.load_raters`.
    method : str
        A name from the zoo (``bayesfuse models``): ``"staple"``,
        ``"robust-t"``, ``"majority-vote"``, ...
    image, mask : path or array, optional
        Intensity image (for geodesic maps, soft masks and reports) and region
        of interest.
    spacing, affine : optional
        Geometry of arrays (files carry their own).
    to_prob : {"none", "euclidean", "geodesic", "soft-dilation"}
        Convert binary masks to probabilities first;
        ``to_prob_options`` go to :func:`bayesfuse.preprocess.to_probability`.
    max_iter, tol, random_seed, progress : optional
        Solver settings; None keeps the model's defaults.
    **options
        Fields of the method's ``Config`` (``bayesfuse models`` lists them).

    Returns
    -------
    FusionResult
    """
    spec = get_model(method)
    config = spec.config(**options)
    data = as_rater_maps(raters, image=image, mask=mask, spacing=spacing, affine=affine, kind=kind, n_classes=n_classes, invert=invert)
    data = convert(data, to_prob, **(to_prob_options or {}))
    kwargs: dict[str, Any] = {"random_seed": random_seed, "progress": progress, "method": method}
    if max_iter is not None:
        kwargs["max_iter"] = int(max_iter)
    if tol is not None:
        kwargs["tol"] = float(tol)
    return spec.load().fit(data, config, **kwargs)
