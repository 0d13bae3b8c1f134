"""PSTAPLE: STAPLE for probabilistic segmentations, regularised by an MRF.

Akhondi-Asl and Warfield (IEEE TMI 2013) extend STAPLE to raters who give a
probability map instead of a label map. Each rater p has a K x K performance
matrix ``theta[p, k', k] = p(rater decides k' | truth k)``; the rater's map
``D[p, n]`` is soft evidence on the rater's hidden decision at voxel n, so
that ``p(D[p, n] | T_n = k) ∝ sum_k' D[p, n, k'] theta[p, k', k]``. The truth
has a Potts (Markov random field) prior whose interaction strength
``mrf_beta`` the user sets: seed 000 found the results sensitive to it, so it
is exposed and the comparison study varies it.

The solver is EM (``mrf_beta = 0``) or variational EM with a mean-field
E-step (``mrf_beta > 0``); every update is derived in ``models/pstaple.md``
and increases the recorded objective. On hard labels with the MRF off the
updates are STAPLE's, exactly (tested against ``bayesfuse.models.staple``).

References
----------
.. [1] A. Akhondi-Asl and S. K. Warfield, "Simultaneous truth and performance
   level estimation through fusion of probabilistic segmentations", IEEE
   Trans. Med. Imaging 32(10), 2013. What this module had to reconstruct is
   listed in the card, section "What we chose".
.. [2] S. K. Warfield, K. H. Zou, W. M. Wells, "Simultaneous truth and
   performance level estimation (STAPLE)", IEEE TMI 23(7), 2004 (the MRF
   and its mean-field approximation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import xarray as xr

from .. import progress as _progress
from ..data import RaterMaps
from ..errors import ConfigError
from ..result import FusionResult

#: Smallest performance entry: a rater who never decides k' for truth k still
#: gets this much, so that one unusual voxel cannot make a class impossible
#: (log 0) and the E-step never divides 0 by 0.
THETA_FLOOR = 1e-10


@dataclass(frozen=True)
class Config:
    """Options of PSTAPLE.

    Attributes
    ----------
    mrf_beta : float
        Strength of the Potts prior on the truth, beta >= 0 (eq:pstaple-mrf):
        the log-prior rewards each pair of face-neighbouring voxels sharing a
        class by beta. 0 switches the MRF off (plain EM, exact likelihood).
    prior : {"mean", "estimate"}
        Class prior f (the MRF's external field): ``"mean"`` fixes it to the
        raters' mean class fractions (the convention of ITK's STAPLE);
        ``"estimate"`` updates it by EM (eq:pstaple-prior); MRF off only.
    m_step : {"em", "fractional"}
        ``"em"``: the EM M-step of the soft-evidence likelihood
        (eq:pstaple-mstep), which never decreases the objective.
        ``"fractional"``: STAPLE's M-step with the probabilities used as
        fractional counts (eq:pstaple-mstep-fractional), the form the STAPLE
        family writes; it is not an EM step of (eq:pstaple-lik) and may lower
        the objective. Both are STAPLE's M-step on hard labels.
    mrf_sweeps : int
        Red-black mean-field sweeps per E-step when ``mrf_beta > 0``.
    init_theta : float
        Diagonal of the initial performance matrices (off-diagonal entries
        share the rest); used for the first E-step.
    """

    mrf_beta: float = 0.0
    prior: Literal["mean", "estimate"] = "mean"
    m_step: Literal["em", "fractional"] = "em"
    mrf_sweeps: int = 1
    init_theta: float = 0.9

    def __post_init__(self):
        if not (np.isfinite(self.mrf_beta) and self.mrf_beta >= 0):
            raise ConfigError(f"mrf_beta must be a finite number >= 0, not {self.mrf_beta!r}")
        if self.prior not in ("mean", "estimate"):
            raise ConfigError(f"prior must be 'mean' or 'estimate', not {self.prior!r}")
        if self.m_step not in ("em", "fractional"):
            raise ConfigError(f"m_step must be 'em' or 'fractional', not {self.m_step!r}")
        if int(self.mrf_sweeps) != self.mrf_sweeps or self.mrf_sweeps < 1:
            raise ConfigError(f"mrf_sweeps must be a positive integer, not {self.mrf_sweeps!r}")
        if self.prior == "estimate" and self.mrf_beta > 0:
            # With the MRF on, the partition function Z(beta, f) depends on f,
            # so mean(W) is no longer the maximiser over f.
            raise ConfigError("prior='estimate' needs mrf_beta=0: with the MRF on, the class prior is a fixed external field (use prior='mean')")
        if not 0 < self.init_theta < 1:
            raise ConfigError(f"init_theta must lie in (0, 1), not {self.init_theta!r}")


# ------------------------------------------------------------------ updates
def soft_vote(D: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """``(D[p, n] . theta[p, :, k])`` for every rater, voxel and true class.

    A sum of K broadcast products rather than a matrix product: with K x K
    matrices of size 2 or 3, numpy's matmul spends its time per row.
    """
    out = D[:, :, :1] * theta[:, None, 0, :]
    for j in range(1, D.shape[2]):
        out += D[:, :, j : j + 1] * theta[:, None, j, :]
    return out


def log_likelihood_terms(D: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Per voxel and true class, sum over raters of log p(D[p, n] | T_n = k).

    Parameters
    ----------
    D : ndarray (P, N, K)
        Raters' probability maps on the simplex.
    theta : ndarray (P, K, K)
        ``theta[p, k', k] = p(decision k' | truth k)``; columns sum to 1.

    Returns
    -------
    ndarray (N, K)
        ``sum_p log sum_k' D[p, n, k'] theta[p, k', k]`` (up to the constant
        of the soft evidence, which depends on neither theta nor T).

    References
    ----------
    models/pstaple.md (eq:pstaple-lik)
    """
    return np.log(soft_vote(D, theta)).sum(axis=0)


def neighbour_sum(W: np.ndarray, ndim: int) -> np.ndarray:
    """Sum of W over each voxel's face neighbours (4 in 2-D, 6 in 3-D).

    ``W`` has the spatial axes first and the class axis last; voxels beyond
    the border (and outside the region of interest, where W is 0) add
    nothing.
    """
    out = np.zeros_like(W)
    for ax in range(ndim):
        lo = [slice(None)] * W.ndim
        hi = [slice(None)] * W.ndim
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        out[tuple(hi)] += W[tuple(lo)]
        out[tuple(lo)] += W[tuple(hi)]
    return out


def _softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=-1, keepdims=True)


def e_step(loglik: np.ndarray, log_prior: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Posterior of the truth without MRF, and the log-likelihood.

    Parameters
    ----------
    loglik : ndarray (N, K)
        From :func:`log_likelihood_terms`.
    log_prior : ndarray (K,)
        log f.
    counts : ndarray (N,), optional
        How many voxels share each row (rows are distinct patterns of the
        raters' values, see :func:`unique_patterns`); 1 by default.

    Returns
    -------
    W : ndarray (N, K)
        ``W[n, k] = p(T_n = k | D; theta)``.
    loglik_total : float
        ``sum_n log sum_k f_k prod_p (D theta)_k``, the EM objective.

    References
    ----------
    models/pstaple.md (eq:pstaple-estep), models/pstaple.md (eq:pstaple-loglik)
    """
    a = loglik + log_prior
    m = a.max(axis=-1, keepdims=True)
    e = np.exp(a - m)
    s = e.sum(axis=-1, keepdims=True)
    lse = (m + np.log(s))[:, 0]
    total = float(lse.sum() if counts is None else lse @ counts)
    return e / s, total


def mean_field_sweep(W: np.ndarray, a0: np.ndarray, beta: float, colours: np.ndarray, inside: np.ndarray | None) -> np.ndarray:
    """One red-black mean-field sweep of the Potts model, in place.

    Each half-sweep sets every voxel of one colour to the exact maximiser of
    the free energy given its neighbours (which all have the other colour):
    ``W[n] = softmax(a0[n] + beta * sum_{m ~ n} W[m])``.

    Parameters
    ----------
    W : ndarray (*spatial, K)
        Current q(T); zero outside the region of interest.
    a0 : ndarray (*spatial, K)
        ``log f + log-likelihood`` per voxel and class.
    beta : float
        MRF strength.
    colours : ndarray (*spatial) of bool
        Parity of the voxel index sum (True = "red").
    inside : ndarray (*spatial) of bool or None
        Region of interest (None: every voxel).

    References
    ----------
    models/pstaple.md (eq:pstaple-meanfield), the Potts prior of
    models/pstaple.md (eq:pstaple-mrf)
    """
    ndim = W.ndim - 1
    for colour in (True, False):
        sel = colours == colour
        if inside is not None:
            sel &= inside
        a = a0[sel] + beta * neighbour_sum(W, ndim)[sel]
        W[sel] = _softmax(a)
    return W


def free_energy(W: np.ndarray, a0: np.ndarray, beta: float, inside: np.ndarray | None) -> float:
    """Mean-field free energy (without the constant -log Z(beta)).

    ``sum_n sum_k W[n,k] a0[n,k] + beta * sum_{n~m} sum_k W[n,k] W[m,k]
    - sum_n sum_k W[n,k] log W[n,k]``; at beta = 0 and the optimal W it
    equals the log-likelihood (eq:pstaple-loglik).

    References
    ----------
    models/pstaple.md (eq:pstaple-free-energy)
    """
    ndim = W.ndim - 1
    sel = (Ellipsis,) if inside is None else (inside,)
    Wi = W[sel]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.sum(np.where(Wi > 0, Wi * np.log(Wi), 0.0))
    pair = 0.5 * np.sum(W * neighbour_sum(W, ndim))
    return float(np.sum(Wi * a0[sel]) + beta * pair + ent)


def m_step_theta(D: np.ndarray, W: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """EM update of the performance matrices for soft evidence.

    ``theta_new[p, k', k] = sum_n W[n,k] r[p,n,k',k] / sum_n W[n,k]`` with
    ``r[p,n,k',k] = D[p,n,k'] theta[p,k',k] / sum_j D[p,n,j] theta[p,j,k]``,
    the posterior of the rater's hidden decision; computed without forming r
    as ``theta * (D_p' (W / (D_p theta_p)))``.

    Parameters
    ----------
    D : ndarray (P, N, K)
    W : ndarray (N, K)
        Posterior (or mean-field q) of the truth; when the rows of D are
        distinct patterns, the sum of W over the voxels sharing each pattern
        (the update is linear in W).
    theta : ndarray (P, K, K)
        Current performance matrices.

    Returns
    -------
    ndarray (P, K, K), columns on the simplex, entries >= THETA_FLOOR.

    References
    ----------
    models/pstaple.md (eq:pstaple-mstep)
    """
    ratio = W[None] / soft_vote(D, theta)  # (P, N, K)
    new = theta * np.einsum("pnj,pnk->pjk", D, ratio)
    return _normalise_columns(new)


def m_step_theta_fractional(D: np.ndarray, W: np.ndarray) -> np.ndarray:
    """STAPLE's M-step with probabilities as fractional counts.

    ``theta_new[p, k', k] = sum_n W[n,k] D[p,n,k'] / sum_n W[n,k]``.

    References
    ----------
    models/pstaple.md (eq:pstaple-mstep-fractional)
    """
    new = np.einsum("pnj,nk->pjk", D, W)
    return _normalise_columns(new)


def m_step_prior(W: np.ndarray) -> np.ndarray:
    """EM update of the class prior: ``f_k = mean_n W[n, k]``.

    References
    ----------
    models/pstaple.md (eq:pstaple-prior)
    """
    f = W.reshape(-1, W.shape[-1]).sum(axis=0)
    return f / f.sum()


def _normalise_columns(theta: np.ndarray) -> np.ndarray:
    theta = np.maximum(theta / theta.sum(axis=1, keepdims=True), THETA_FLOOR)
    return theta / theta.sum(axis=1, keepdims=True)


def initial_theta(n_raters: int, k: int, diag: float) -> np.ndarray:
    off = (1 - diag) / (k - 1)
    t = np.full((k, k), off)
    np.fill_diagonal(t, diag)
    return np.broadcast_to(t, (n_raters, k, k)).copy()


def mean_prior(D: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """The raters' mean class fractions (the fixed prior of ``prior="mean"``),
    with rows weighted by ``counts`` when they are distinct patterns."""
    f = D.mean(axis=0).mean(axis=0) if counts is None else counts @ D.mean(axis=0) / counts.sum()
    f = np.maximum(f, THETA_FLOOR)
    return f / f.sum()


# ---------------------------------------------------------------------- fit
def _inputs(data: RaterMaps):
    """Raters' maps as (P, N_roi, K) float64, and the ROI."""
    roi = data.roi()
    probs = data.probabilities(dtype=np.float32)
    if roi is None:
        D = probs.reshape(data.n_raters, -1, probs.shape[-1]).astype(np.float64)
    else:
        D = probs[:, roi].astype(np.float64)
    return D, roi


def unique_patterns(data: RaterMaps) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The distinct per-voxel patterns of the raters' values, with counts.

    Every update depends on a voxel only through its pattern D[:, n, :]
    (and, with the MRF, its neighbours' W), so the solver works on the M
    distinct patterns: far from every contour all raters agree exactly
    (masks, and saturated probability maps), and M is a small fraction of N.

    Returns
    -------
    D : ndarray (P, M, K) float64
        The patterns.
    inverse : ndarray (N_roi,)
        Pattern of each voxel (inside the ROI, in C order).
    counts : ndarray (M,)
        Voxels per pattern.
    roi : ndarray of bool or None
    """
    roi = data.roi()
    probs = data.probabilities(dtype=np.float32)
    P, K = probs.shape[0], probs.shape[-1]
    flat = probs.reshape(P, -1, K) if roi is None else probs[:, roi]
    rows = np.ascontiguousarray(flat.transpose(1, 0, 2)).reshape(flat.shape[1], P * K)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * P * K)))[:, 0]
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    D = flat[:, first].astype(np.float64)
    return D, inverse.ravel(), counts.astype(np.float64), roi


def fit(
    data: RaterMaps,
    config: Config | None = None,
    *,
    max_iter: int = 200,
    tol: float = 1e-8,
    random_seed=None,
    progress: bool | None = None,
    method: str = "pstaple",
) -> FusionResult:
    """Fuse raters' probability maps (or masks) with PSTAPLE.

    Parameters
    ----------
    data : RaterMaps
        Binary masks, labels or probability maps with K classes (masks and
        labels are degenerate probabilities).
    config : Config, optional
    max_iter : int
        Maximum number of E/M rounds.
    tol : float
        Stop when the objective changes by less than ``tol`` times its
        magnitude between two rounds.
    random_seed : optional
        Accepted for the contract; the solver is deterministic.
    progress : bool, optional
        Progress bar (None: on unless silenced).
    method : str
        Registry name recorded in the result.

    Returns
    -------
    FusionResult
        ``/consensus`` holds q(T); ``/raters`` the performance matrices
        ``theta`` (rater, decision, truth) and, for K = 2, ``sensitivity``
        and ``specificity``; ``/variational`` the class prior; the objective
        is the EM log-likelihood (MRF off) or the mean-field free energy
        without its constant -log Z(beta) (MRF on).
    """
    config = config or Config()
    t0 = time.perf_counter()
    D, inverse, counts, roi = unique_patterns(data)
    P, M, K = D.shape
    theta = initial_theta(P, K, config.init_theta)
    f = mean_prior(D, counts)
    beta = float(config.mrf_beta)
    shape = data.shape

    def to_grid(values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Per-pattern values (M, K) onto the grid (*spatial, K)."""
        grid = np.full(shape + (K,), fill, dtype=np.float64)
        if roi is None:
            grid.reshape(-1, K)[...] = values[inverse]
        else:
            grid[roi] = values[inverse]
        return grid

    def per_pattern_sums(W_grid: np.ndarray) -> np.ndarray:
        """Sum of q(T) over the voxels of each pattern, (M, K)."""
        Wv = W_grid.reshape(-1, K) if roi is None else W_grid[roi]
        return np.stack([np.bincount(inverse, weights=Wv[:, k], minlength=M) for k in range(K)], axis=-1)

    if beta > 0:
        colours = (np.indices(shape).sum(axis=0) % 2) == 0
        # Start q(T) from the mean of the raters' maps (the soft vote).
        W_grid = to_grid(D.mean(axis=0))
    trace: list[float] = []
    converged, stop = False, "max_iter"
    with _progress.bar(f"{method} EM", total=max_iter, progress=progress) as bar:
        for it in range(max_iter):
            loglik = log_likelihood_terms(D, theta)
            log_f = np.log(f)
            if beta == 0:
                W_u, obj = e_step(loglik, log_f, counts)
                Wsum = W_u * counts[:, None]
            else:
                a0 = to_grid(loglik + log_f)
                for _ in range(int(config.mrf_sweeps)):
                    mean_field_sweep(W_grid, a0, beta, colours, roi)
                obj = free_energy(W_grid, a0, beta, roi)
                Wsum = per_pattern_sums(W_grid)
            if not np.isfinite(obj):
                raise FloatingPointError(f"{method}: the objective became {obj} at iteration {it + 1}")
            trace.append(obj)
            bar.advance(info=f"objective {obj:.8g}")
            if it > 0 and abs(trace[-1] - trace[-2]) <= tol * abs(trace[-1]):
                converged, stop = True, "tol"
                break
            if config.m_step == "em":
                theta = m_step_theta(D, Wsum, theta)
            else:
                theta = m_step_theta_fractional(D, Wsum)
            if config.prior == "estimate":
                f = m_step_prior(Wsum)

    if beta == 0:
        prob = to_grid(W_u).astype(np.float32)
    else:
        prob = W_grid.astype(np.float32)
    if roi is not None:
        prob[~roi, 0] = 1.0
    raters = {"theta": (("rater", "decision", "truth"), theta)}
    if K == 2:
        raters["sensitivity"] = ("rater", theta[:, 1, 1].copy())
        raters["specificity"] = ("rater", theta[:, 0, 0].copy())
    raters_ds = xr.Dataset(raters, coords={"decision": np.arange(K), "truth": np.arange(K)})
    variational = xr.Dataset({"prior": ("class", f)}, coords={"class": np.arange(K)})
    name = "EM log-likelihood" if beta == 0 else "mean-field free energy (without -log Z(beta))"
    return FusionResult.build(
        method=method,
        data=data,
        config=config,
        probability=prob,
        variational=variational,
        raters=raters_ds,
        objective=np.asarray(trace),
        objective_name=name,
        converged=converged,
        stop_reason=stop,
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------- PyMC
def build_model(data: RaterMaps, config: Config | None = None, hyper: str = "fixed", fixed: dict | None = None):
    """The declarative PyMC form of PSTAPLE without MRF.

    The truth T_n is summed out (eq:pstaple-loglik) and each rater's map
    enters as soft evidence through a ``pm.Potential``; every column of every
    ``theta[p]`` has a flat Dirichlet(1) prior, so the posterior mode is the
    EM estimate. ``hyper="fixed"`` pins the class prior f at
    ``fixed["prior"]`` (default: the raters' mean fractions, as ``fit`` with
    ``prior="mean"``); ``hyper="prior"`` gives f a Dirichlet(1) prior.

    Raises
    ------
    ConfigError
        For ``mrf_beta > 0``: the Potts prior couples all voxels' discrete
        labels and its partition function is intractable, so the labels can
        neither be summed out nor sampled by NUTS.
    """
    import pymc as pm
    import pytensor.tensor as pt

    config = config or Config()
    if config.mrf_beta > 0:
        raise ConfigError("pstaple: no PyMC form with the MRF on (mrf_beta > 0): the Potts prior's partition function is intractable and NUTS cannot sample discrete labels; use mrf_beta=0")
    D, _ = _inputs(data)
    P, N, K = D.shape
    coords = {"rater": data.rater_names, "decision": np.arange(K), "truth": np.arange(K), "voxel": np.arange(N), "class": np.arange(K)}
    with pm.Model(coords=coords) as model:
        d = pm.Data("D", D, dims=("rater", "voxel", "class"))
        # Dirichlet over the decision axis, one per (rater, truth): draw with
        # the truth axis second to last, then swap to (rater, decision, truth).
        theta_t = pm.Dirichlet("theta_t", a=np.ones((P, K, K)), dims=("rater", "truth", "decision"))
        theta = pm.Deterministic("theta", theta_t.transpose(0, 2, 1), dims=("rater", "decision", "truth"))
        if hyper == "fixed":
            f = np.asarray((fixed or {}).get("prior", mean_prior(D)), dtype=np.float64)
            log_f = pt.as_tensor(np.log(f))
        elif hyper == "prior":
            f = pm.Dirichlet("prior", a=np.ones(K), dims="class")
            log_f = pt.log(f)
        else:
            raise ConfigError(f"hyper must be 'fixed' or 'prior', not {hyper!r}")
        # (P, N, K) @ (P, K, K) -> (P, N, K): sum_k' D theta per true class
        lik = pt.log(pt.matmul(d, theta)).sum(axis=0)
        pm.Potential("soft_evidence", pm.math.logsumexp(lik + log_f, axis=-1).sum())
    return model


def fixed_from_result(result: FusionResult) -> dict:
    """The class prior the EM used, to pin in ``build_model(hyper="fixed")``."""
    return {"prior": result.group("variational")["prior"].values}
