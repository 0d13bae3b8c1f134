"""Per-voxel posterior summaries of the consensus, for every model.

One entry point, :func:`summarize`, turns any :class:`~bayesfuse.result.FusionResult`
into maps that say, per voxel, how sure the model is of the consensus, in
probability space:

``consensus_mean``
    posterior mean of the quantity below (written only where it differs from
    the stored consensus, i.e. for models whose consensus is a plug-in such as
    ``F^-1(mu_T)``);
``consensus_sd``
    posterior standard deviation;
``consensus_lo``, ``consensus_hi``
    a central (equal-tailed) credible interval of the given mass (default
    0.9): the ``(1 - mass) / 2`` and ``(1 + mass) / 2`` posterior quantiles;
``entropy``
    Shannon entropy (nats) of the consensus' class distribution.

For two classes every map holds the foreground only (as ``consensus.nii.gz``);
for K > 2 it carries a ``class`` dim.

Which quantity the interval is about depends on the kind of posterior the model
has, chosen by generic rules on the result's schema (no per-model cases):

``"gaussian"``
    variational models with q(T~[n]) Gaussian in link space (the
    ``/variational`` group holds its mean ``mu_T`` and covariance ``S_T``, the
    link is named by the ``link`` option of the config). The quantity is the
    true consensus T[n, k] = F^-1(T~[n])_k, a probability; its summaries come
    from :mod:`bayesfuse.gaussian` (closed form or streamed Monte Carlo in
    blocks, never all draws of the volume at once).
``"categorical"``
    models with a generative story (``pymc=True`` in the registry) and no
    Gaussian q: EM models whose consensus *is* the posterior of the hidden
    label given the point-estimated rater parameters (the STAPLE family,
    PSTAPLE with its mean-field labels): the quantity is the
    label indicator 1[x_n = k], a Bernoulli variable with mean w = p(x_n = k),
    sd sqrt(w (1 - w)), and quantiles in {0, 1}: lo = 1 exactly where
    w > (1 + mass) / 2 (surely this class), hi = 1 where w > (1 - mass) / 2
    (possibly this class). These are exact given theta; the uncertainty of
    theta itself is not in them (an EM point estimate has none to give).
``"none"``
    deterministic rules (majority vote, mean): no posterior, so only the
    entropy of the consensus is given.

A model module may override the rules with its own
``voxel_summaries(result, mass, random_seed) -> dict`` (arrays as above).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from .errors import ConfigError

#: Names of the maps :func:`summarize` may produce (the order the report uses).
SUMMARY_MAPS = ("consensus_mean", "consensus_sd", "consensus_lo", "consensus_hi", "entropy")

#: Default mass of the central credible interval.
DEFAULT_MASS = 0.9

#: Variables of ``/variational`` that mark a Gaussian q(T~) in link space.
GAUSSIAN_VARS = ("mu_T", "S_T")


def check_mass(mass: float) -> float:
    """The credible mass as a float in (0, 1), or a ConfigError."""
    try:
        m = float(mass)
    except (TypeError, ValueError):
        raise ConfigError(f"interval mass must be a number in (0, 1), not {mass!r}") from None
    if not 0 < m < 1:
        raise ConfigError(f"interval mass must lie strictly between 0 and 1, not {m:g}")
    return m


def entropy(prob: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) of categorical distributions along ``axis``.

    0 log 0 is taken as 0, so one-hot vectors give exactly 0 and the uniform
    vector over K classes gives log K.
    """
    from scipy.special import entr

    p = np.asarray(prob, dtype=np.float64)
    return entr(np.clip(p, 0, 1)).sum(axis=axis)


def categorical_summaries(prob: np.ndarray, mass: float = DEFAULT_MASS) -> dict[str, np.ndarray]:
    """Exact summaries of the label indicators 1[x = k] with p(x = k) = prob[..., k].

    Parameters
    ----------
    prob : ndarray (..., K)
        Posterior class probabilities per voxel.
    mass : float
        Credible mass of the central interval.

    Returns
    -------
    dict of ndarray (..., K)
        ``consensus_sd`` = sqrt(w (1 - w)); ``consensus_lo`` and
        ``consensus_hi``: the (1 - mass)/2 and (1 + mass)/2 quantiles of a
        Bernoulli(w) variable (0 or 1). The lower quantile at level a is the
        smallest x in {0, 1} with F(x) >= a, and F(0) = 1 - w, so
        lo = 1 iff 1 - w < (1 - mass)/2 and hi = 1 iff 1 - w < (1 + mass)/2.
        The interval holds the true indicator with probability >= mass.
    """
    mass = check_mass(mass)
    w = np.clip(np.asarray(prob, dtype=np.float32), 0, 1)
    a_lo, a_hi = (1 - mass) / 2, (1 + mass) / 2
    return {
        "consensus_sd": np.sqrt(w * (1 - w)),
        "consensus_lo": (1 - w < a_lo).astype(np.float32),
        "consensus_hi": (1 - w < a_hi).astype(np.float32),
    }


def posterior_kind(result) -> str:
    """``"gaussian"``, ``"categorical"`` or ``"none"``: see the module docstring."""
    var = result.group("variational")
    if all(v in var for v in GAUSSIAN_VARS):
        return "gaussian"
    from .models import REGISTRY

    spec = REGISTRY.get(result.method)
    # A model with a generative story (a PyMC form) and no Gaussian q is an EM
    # model whose consensus is the posterior of the hidden label.
    if spec is not None and spec.pymc:
        return "categorical"
    return "none"


def _module(result):
    from .models import REGISTRY

    spec = REGISTRY.get(result.method)
    return None if spec is None else spec.load()


def _link_name(result) -> str:
    var = result.group("variational")
    return str(var.attrs.get("link", result.tree.attrs.get("link", result.config.get("link", "sqrt"))))


def _gaussian(result, mass: float, random_seed) -> dict[str, np.ndarray]:
    """Summaries of T = F^-1(T~) under q(T~) = N(mu_T, S_T), by :func:`bayesfuse.gaussian.probability_summaries`.

    ``mu_T`` holds the link coordinates with one non-spatial dim (any
    position), ``S_T`` the covariances with two trailing ones.
    """
    from . import gaussian

    var = result.group("variational")
    sdims = result.spatial_dims
    mu = var["mu_T"].transpose(*sdims, ...).values
    cov = var["S_T"].transpose(*sdims, ...).values
    seed = random_seed if random_seed is not None else 0
    return gaussian.probability_summaries(mu, cov, _link_name(result), mass=mass, random_seed=seed)


def summarize(result, mass: float = DEFAULT_MASS, *, random_seed: Any = 0) -> xr.Dataset:
    """Per-voxel posterior summaries of a result's consensus in probability space.

    Parameters
    ----------
    result : FusionResult
        Any model's result.
    mass : float
        Credible mass of the central interval (default 0.9).
    random_seed : int or Generator, optional
        Seed of the Monte Carlo draws where a closed form is not available
        (summaries are reproducible for a given seed).

    Returns
    -------
    xarray.Dataset
        The variables of :data:`SUMMARY_MAPS` that the model's posterior
        supports, with spatial dims (plus ``class`` for K > 2); every variable
        carries attrs ``quantity``, ``interval``, ``mass`` and
        ``description`` (the text written into the NIfTI header).
    """
    mass = check_mass(mass)
    sdims = result.spatial_dims
    k = result.n_classes
    prob = result.probability.transpose(*sdims, "class").values
    kind = posterior_kind(result)
    module = _module(result)
    custom = getattr(module, "voxel_summaries", None) if module is not None else None
    if custom is not None:
        arrays = dict(custom(result, mass=mass, random_seed=random_seed))
        quantity = str(arrays.pop("quantity", "the consensus probability T[n, k]"))
        kind = "model"
    elif kind == "gaussian":
        arrays = _gaussian(result, mass, random_seed)
        quantity = f"the consensus probability T[n, k] = F^-1(T~[n])_k under q(T~) (link {_link_name(result)})"
        note = result.group("variational").attrs.get("note", "")
        if note:
            quantity += f"; {note}"
    elif kind == "categorical":
        arrays = categorical_summaries(prob, mass)
        quantity = "the label indicator 1[truth = k] given the point-estimated rater parameters"
    else:
        arrays = {}
        quantity = "none: the method is a deterministic rule without a posterior"
    ent = entropy(prob).astype(np.float32)

    cls = np.arange(k)
    out = xr.Dataset(coords={"class": cls} if k > 2 else None)
    pct_lo, pct_hi = 50 * (1 - mass), 50 * (1 + mass)
    text = {
        "consensus_mean": "posterior mean",
        "consensus_sd": "posterior sd",
        "consensus_lo": f"{pct_lo:g}% quantile (central {100 * mass:g}% interval)",
        "consensus_hi": f"{pct_hi:g}% quantile (central {100 * mass:g}% interval)",
    }
    for name in SUMMARY_MAPS[:-1]:
        if name not in arrays:
            continue
        a = np.asarray(arrays[name], dtype=np.float32)
        if a.shape != prob.shape:
            raise ValueError(f"{result.method}: summary {name} has shape {a.shape}, expected {prob.shape}")
        if name == "consensus_mean" and np.allclose(a, prob, atol=1e-6):
            continue
        if not np.all(np.isfinite(a)):
            raise FloatingPointError(f"{result.method}: summary {name} holds NaN or infinite values")
        da = xr.DataArray(a[..., 1], dims=sdims) if k == 2 else xr.DataArray(a, dims=sdims + ("class",))
        da.attrs.update(
            quantity=quantity,
            interval="central (equal-tailed)",
            mass=mass,
            posterior=kind,
            description=f"bayesfuse {result.method} {text[name]}",
        )
        out[name] = da
    out["entropy"] = xr.DataArray(ent, dims=sdims, attrs={
        "quantity": "Shannon entropy of the consensus' class distribution",
        "units": "nat",
        "posterior": kind,
        "description": f"bayesfuse {result.method} entropy of the consensus (nats)",
    })
    out.attrs.update(mass=mass, interval="central (equal-tailed)", posterior=kind, quantity=quantity)
    return out


def attach(result, mass: float = DEFAULT_MASS, *, random_seed: Any = 0, rules: bool = False):
    """The result with the summaries of :func:`summarize` added to ``/maps``.

    Returns a new :class:`~bayesfuse.result.FusionResult` (the input is left
    as it was); :meth:`~bayesfuse.result.FusionResult.save` then writes every
    summary as ``<name>.nii.gz`` beside the consensus. A map the model wrote
    itself under the same name (e.g. ``consensus_sd``) is replaced by the
    summary, so that the sd and the interval come from one computation.

    Deterministic rules (no posterior) are returned unchanged unless
    ``rules`` is True, in which case they get the entropy map alone.
    """
    from .result import FusionResult

    if not rules and posterior_kind(result) == "none" and getattr(_module(result), "voxel_summaries", None) is None:
        return result
    summ = summarize(result, mass, random_seed=random_seed)
    tree = result.tree.copy()
    maps = result.group("maps")
    maps = maps.drop_vars([v for v in SUMMARY_MAPS if v in maps])
    for v, da in summ.data_vars.items():
        maps[v] = da
    maps.attrs.update(interval_mass=summ.attrs["mass"], interval="central (equal-tailed)", posterior=summ.attrs["posterior"])
    tree["maps"] = xr.DataTree(maps)
    return FusionResult(tree)


def interval_mass(result) -> float | None:
    """The mass of the intervals stored in a result's ``/maps``, if any."""
    maps = result.group("maps")
    if "consensus_lo" not in maps:
        return None
    return float(maps["consensus_lo"].attrs.get("mass", maps.attrs.get("interval_mass", DEFAULT_MASS)))
