"""Robust Student-t fusion with bias and spatial priors (VB), its Gaussian variant, continuous STAPLE.

Model 1 of MODELS.md (seed 000, section 2 and supplement 1.1); card
``models/robust_t.md``. One module serves three registry names through
:class:`Config` defaults:

``robust-t``
    Student-t likelihood (a Gaussian scale mixture with local reliabilities
    tau[n, p] ~ Gamma(nu_p/2, nu_p/2)), bias prior b_p ~ N(0, I/beta),
    spatial prior T~[n] ~ N(W Phi_n + m, Sigma_T I) on Gaussian bases, with
    a constant mean m per link coordinate.
``gaussian``
    the same with tau fixed to 1 (nu -> infinity).
``continuous-staple``
    Gaussian, per-rater bias (maximum likelihood, no prior) and covariance,
    flat prior on the consensus: Warfield, Zou and Wells (2008). The biases
    are only determined up to a common shift; the gauge sum_p b_p = 0 is
    chosen (card, section "Continuous STAPLE").

The solver is mean-field VB, q(T~) q(b) q(tau) q(W), with point estimates of
beta, Sigma_p, nu_p, alpha, m and Sigma_T. Each iteration is one fused pass over
the data (per voxel: q(tau) then q(T~), both exact coordinate updates, with
the sufficient statistics of every global update accumulated on the way),
followed by the small global updates and the spatial prior's Kronecker
algebra (:mod:`bayesfuse.spatial`). The ELBO, every term included, is
recorded at every iteration and never decreases.

Pure update functions (``update_q_tau``, ``update_q_b``, ``update_beta``,
``update_nu``, ``update_alpha``, ``update_m``, ``update_sigma_T``; q(T~) and Sigma_p live in
:mod:`bayesfuse.gaussian`, q(W) in :mod:`bayesfuse.spatial`) state each
update on its own; the fused pass is tested to equal their composition, and
each of them to maximise :func:`elbo_reference` in its block.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import xarray as xr
from numba import get_num_threads, njit, prange
from threadpoolctl import threadpool_limits
from scipy import optimize, special

from .. import gaussian as G
from ..data import RaterMaps
from ..errors import ConfigError, InputError
from ..progress import bar
from ..result import FusionResult
from ..spatial import KroneckerBasis

LOG2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------ config
def _check_axes_value(name, value, allow_none=False):
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be given")
    vals = (value,) if np.ndim(value) == 0 else tuple(value)
    for v in vals:
        if not isinstance(v, (int, float)) or not v > 0 and name != "basis_origin":
            raise ValueError(f"{name} must be positive numbers, got {value!r}")


@dataclass(frozen=True)
class Config:
    """Options and hyperparameters of the robust model and its variants.

    Attributes
    ----------
    likelihood : {"student-t", "gaussian"}
        Student-t (local reliabilities tau) or Gaussian (tau = 1).
    link : {"sqrt", "logit", "identity"}
        Link from the simplex to link space (``bayesfuse.gaussian.LinkSpace``):
        sqrt keeps K coordinates, logit and identity K - 1.
    bias : {"prior", "ml", "none"}
        ``prior``: b_p ~ N(0, I / beta), q(b) Gaussian, beta estimated (or
        fixed by ``beta``). ``ml``: b_p a parameter without prior, estimated
        by maximum likelihood with the gauge sum_p b_p = 0 when the consensus
        has a flat prior (continuous STAPLE). ``none``: b_p = 0.
    spatial_prior : bool
        T~[n] ~ N(W Phi_n + m, Sigma_T I) with Gaussian bases and a constant
        mean m per link coordinate (else a flat prior).
    basis_spacing, basis_width, basis_origin : float or tuple, one per axis
        Distance between basis centres, their standard deviation (default:
        the spacing) and the position of the first centre (default: half a
        spacing), in ``basis_units``. Larger spacing and width give a
        smoother consensus.
    basis_units : {"voxel", "mm"}
    nu_init : float
        Starting degrees of freedom.
    nu : float or None
        Fix nu_p to this value for every rater instead of estimating it.
    nu_bounds : (float, float)
        Range of the nu update (the root is capped at the upper end: nu ->
        infinity is the Gaussian model).
    beta, alpha, sigma_T : float or None
        Fix the bias precision, the weights' precision, the prior variance
        of T~ at this value (None: estimated).
    min_variance : float or None
        Eigenvalue floor of Sigma_p (Sigma_T's floor is the smaller of this
        and 1e-4, 1e-2 for logit: :attr:`sigma_T_floor`), in squared link
        units: the resolution below which a rater is not believed more
        precise. Default (None): 1e-3 for sqrt and identity (an sd of 0.032),
        1e-2 for logit (0.1 in log-odds). It binds only where raters agree
        exactly over much of the image (binary masks, saturated probability
        maps): there the maximum-likelihood Sigma_p goes to zero (the
        Student-t likelihood is unbounded for tied data) and nu to its lower
        bound; see the card, section "Ties and the variance floor" (why
        1e-3: at 1e-4, the default until 2026-12-06, the posterior of T~ is
        multimodal where raters disagree, nu_p sits near 1, and most fits
        converged several times more slowly).
    storage : {"auto", "float32", "float64"}
        Storage of per-voxel state (tau^, mu_T, prior mean); ``auto`` takes
        float64 up to 4 million rater-voxels and float32 above. Sums are
        always accumulated in float64.
    sd_nodes : int
        Gauss-Hermite points per coordinate for the ``consensus_sd`` map.
    relax : float
        Over-relaxation factor omega of the Gaussian mean steps, in [1, 2)
        (card, section "Over-relaxation", eq:rt-overrelax): each q(T~[n])
        mean and the (q(W), m) mean move omega times the way to their exact
        block optimum, which still never lowers the ELBO for omega < 2; the
        (q(W), m) factor then grows while the ELBO keeps rising and falls
        back to the plain step when it would not. 1: plain coordinate ascent.
        The spatial prior's front-like slow directions converge several
        times faster (card, measured).
    gauge_step : bool
        After each iteration, maximise the ELBO exactly along the common
        shift of the biases against the consensus and the spatial prior's
        mean (b_p + c, T~ - c, m - c; card, section "Order of the updates
        and monotonicity", eq:rt-gauge): c = -mean_p mu_b, the biases
        centred. On by default: plain coordinate ascent only creeps along
        this direction and does not converge.
    """

    likelihood: Literal["student-t", "gaussian"] = "student-t"
    link: Literal["sqrt", "logit", "identity"] = "sqrt"
    bias: Literal["prior", "ml", "none"] = "prior"
    spatial_prior: bool = True
    basis_spacing: float | tuple = 4.0
    basis_width: float | tuple | None = None
    basis_origin: float | tuple | None = None
    basis_units: Literal["voxel", "mm"] = "voxel"
    nu_init: float = 10.0
    nu: float | None = None
    nu_bounds: tuple = (0.5, 1000.0)
    beta: float | None = None
    alpha: float | None = None
    sigma_T: float | None = None
    min_variance: float | None = None
    storage: Literal["auto", "float32", "float64"] = "auto"
    sd_nodes: int = 5
    gauge_step: bool = True
    relax: float = 1.8

    def __post_init__(self):
        choices = {
            "likelihood": ("student-t", "gaussian"),
            "link": ("sqrt", "logit", "identity"),
            "bias": ("prior", "ml", "none"),
            "basis_units": ("voxel", "mm"),
            "storage": ("auto", "float32", "float64"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not isinstance(self.spatial_prior, (bool, np.bool_)):
            raise ConfigError(f"spatial_prior must be true or false, got {self.spatial_prior!r}")
        try:
            _check_axes_value("basis_spacing", self.basis_spacing)
            _check_axes_value("basis_width", self.basis_width, allow_none=True)
            if self.basis_origin is not None:
                vals = (self.basis_origin,) if np.ndim(self.basis_origin) == 0 else tuple(self.basis_origin)
                if not all(isinstance(v, (int, float)) for v in vals):
                    raise ValueError(f"basis_origin must be numbers, got {self.basis_origin!r}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        lo, hi = self.nu_bounds
        if not 0 < lo < hi:
            raise ConfigError(f"nu_bounds must satisfy 0 < low < high, got {self.nu_bounds}")
        if not lo <= self.nu_init <= hi:
            raise ConfigError(f"nu_init {self.nu_init} lies outside nu_bounds {self.nu_bounds}")
        for name in ("nu", "beta", "alpha", "sigma_T"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"{name} must be a positive number or None, got {v!r}")
        if self.min_variance is not None and not self.min_variance >= 0:
            raise ConfigError(f"min_variance must be >= 0 or None, got {self.min_variance}")
        if not (isinstance(self.relax, (int, float)) and 1.0 <= self.relax < 2.0):
            raise ConfigError(f"relax must be a number in [1, 2), got {self.relax!r}")
        if not isinstance(self.gauge_step, (bool, np.bool_)):
            raise ConfigError(f"gauge_step must be true or false, got {self.gauge_step!r}")
        if int(self.sd_nodes) < 2:
            raise ConfigError(f"sd_nodes must be at least 2, got {self.sd_nodes}")

    @property
    def robust(self) -> bool:
        return self.likelihood == "student-t"

    @property
    def variance_floor(self) -> float:
        """``min_variance``, or the link's default when it is None."""
        if self.min_variance is not None:
            return float(self.min_variance)
        return 1e-2 if self.link == "logit" else 1e-3

    @property
    def sigma_T_floor(self) -> float:
        """Floor of Sigma_T: the smaller of :attr:`variance_floor` and 1e-4 (1e-2 for logit).

        Sigma_T is the consensus's spread about its smooth prior mean, not a
        rater's noise: the reasons for raising the raters' floor to 1e-3
        (card, "Ties and the variance floor") do not apply to it, and on the
        model's own simulations its true value (3.2e-4 for sqrt) lies below
        1e-3, where a floor would widen every interval.
        """
        return min(self.variance_floor, 1e-2 if self.link == "logit" else 1e-4)


# ------------------------------------------------------ pure update functions
def update_q_tau(Dt, mu_T, S_T, mu_b, S_b, Sigma, nu):
    """q(tau[n,p]) = Gamma(a_p, c[n,p]) (shape, rate).

    a_p = (nu_p + D) / 2,
    c[n,p] = nu_p / 2 + 1/2 [ e' Sigma_p^-1 e + Tr(Sigma_p^-1 S_b[p]) + Tr(Sigma_p^-1 S_T[n]) ],
    e = D~[p,n] - mu_T[n] - mu_b[p].

    Parameters
    ----------
    Dt : ndarray (P, N, D)
    mu_T : ndarray (D, N)
    S_T : ndarray (N, D, D)
    mu_b, S_b : ndarray (P, D), (P, D, D)
    Sigma : ndarray (P, D, D)
    nu : ndarray (P,)

    Returns
    -------
    a : ndarray (P,)
    c : ndarray (P, N)

    References
    ----------
    models/robust_t.md (eq:rt-qtau)
    """
    P, N, D = Dt.shape
    Sinv, _ = G.inv_logdet(Sigma)
    e = Dt - mu_T.T[None] - mu_b[:, None]
    quad = np.einsum("pni,pij,pnj->pn", e, Sinv, e)
    tr_T = np.einsum("pij,nji->pn", Sinv, S_T)
    tr_b = np.einsum("pij,pji->p", Sinv, S_b)
    c = nu[:, None] / 2 + 0.5 * (quad + tr_T + tr_b[:, None])
    return (nu + D) / 2, c


def update_q_b(Dt, tau, mu_T, Sigma, beta):
    """q(b_p) = N(mu_b[p], S_b[p]) under the prior b_p ~ N(0, I / beta).

    S_b[p] = (beta I + sum_n tau^[n,p] Sigma_p^-1)^-1,
    mu_b[p] = S_b[p] Sigma_p^-1 sum_n tau^[n,p] (D~[p,n] - mu_T[n]).

    With ``beta = 0`` and the bias a parameter (``bias="ml"``) this is the
    maximum-likelihood bias, S_b = 0: mu_b = sum_n tau (D~ - mu_T) / sum_n tau.

    Parameters
    ----------
    Dt : ndarray (P, N, D)
    tau : ndarray (P, N)
        tau^ (ones for the Gaussian model).
    mu_T : ndarray (D, N)
    Sigma : ndarray (P, D, D)
    beta : float or None
        None for the maximum-likelihood bias.

    Returns
    -------
    mu_b, S_b : ndarray (P, D), (P, D, D)

    References
    ----------
    models/robust_t.md (eq:rt-qb)
    """
    sw = tau.sum(axis=1)
    s1 = np.einsum("pn,pni->pi", tau, Dt - mu_T.T[None])
    return _q_b_from_stats(sw, s1, Sigma, beta)


def _q_b_from_stats(sw, s1, Sigma, beta):
    P, D = s1.shape
    if beta is None:
        return s1 / sw[:, None], np.zeros((P, D, D))
    Sinv, _ = G.inv_logdet(Sigma)
    S_b, _ = G.inv_logdet(beta * np.eye(D) + sw[:, None, None] * Sinv)
    mu_b = np.einsum("pij,pjk,pk->pi", S_b, Sinv, s1)
    return mu_b, S_b


def update_beta(mu_b, S_b):
    """beta = P D / sum_p ( Tr S_b[p] + mu_b[p]' mu_b[p] ).

    References
    ----------
    models/robust_t.md (eq:rt-beta)
    """
    P, D = mu_b.shape
    return P * D / (np.trace(S_b, axis1=1, axis2=2).sum() + np.sum(mu_b**2))


def _nu_equation(nu, mean_gap):
    return math.log(nu / 2) - special.digamma(nu / 2) + 1.0 + mean_gap


def update_nu(sum_elog_minus_tau, n_voxels, bounds=(0.5, 1000.0)):
    """nu_p solving  sum_n [ -psi(nu/2) + log(nu/2) + 1 + E log tau - E tau ] = 0.

    The left side divided by N is log(nu/2) - psi(nu/2) + 1 + g with
    g = mean_n (E log tau - E tau) < -1, strictly decreasing in nu from +inf
    to 1 + g < 0, so the root is unique; it is found by Brent's method in
    ``bounds`` and capped at the ends (the upper cap stands for nu -> inf).

    Parameters
    ----------
    sum_elog_minus_tau : ndarray (P,)
        sum_n (E[log tau[n,p]] - E[tau[n,p]]).
    n_voxels : int
    bounds : (float, float)

    Returns
    -------
    ndarray (P,)

    References
    ----------
    models/robust_t.md (eq:rt-nu)
    """
    lo, hi = bounds
    out = np.empty(len(sum_elog_minus_tau))
    for p, s in enumerate(np.asarray(sum_elog_minus_tau, dtype=float)):
        g = s / n_voxels
        if _nu_equation(hi, g) >= 0:
            out[p] = hi
        elif _nu_equation(lo, g) <= 0:
            out[p] = lo
        else:
            out[p] = optimize.brentq(_nu_equation, lo, hi, args=(g,), xtol=1e-10, rtol=1e-12)
    return out


def update_alpha(mu_W, s_W, n_classes_dim):
    """alpha = L D / sum_k ( Tr S_W + mu_W[k]' mu_W[k] ), S_W shared by the D rows.

    Parameters
    ----------
    mu_W : ndarray (D, *basis_shape)
        The means of q(W), or their eigenbasis coordinates U' mu_W (same norm).
    s_W : ndarray (*basis_shape)
        Eigenvalues of S_W (its trace is their sum).
    n_classes_dim : int
        D.

    References
    ----------
    models/robust_t.md (eq:rt-alpha)
    """
    L = s_W.size
    return L * n_classes_dim / (n_classes_dim * s_W.sum() + np.sum(mu_W**2))


def update_m(sum_mu_T, sum_prior_W, n_voxels):
    """m_k = 1/N sum_n ( mu_T[n,k] - Phi_n' mu_W[k] ), the spatial prior's constant mean.

    Parameters
    ----------
    sum_mu_T : ndarray (D,)
        sum_n mu_T[n, k] over every voxel of the grid.
    sum_prior_W : ndarray (D,)
        sum_n Phi_n' mu_W[k] (= <Psi' 1, U' mu_W[k]>: no pass over the volume).
    n_voxels : int
        N.

    Returns
    -------
    ndarray (D,)

    References
    ----------
    models/robust_t.md (eq:rt-mean)
    """
    return (np.asarray(sum_mu_T, float) - np.asarray(sum_prior_W, float)) / n_voxels


def update_m_joint(sum_mu_T, z_raw, z1, s_W, sigma_T, n_voxels):
    """m maximising the ELBO jointly with q(W), q(W) = N(S_W Phi' (mu_T - m) / Sigma_T, S_W).

    With q(W) at its optimum for each m, the ELBO's terms in m are
    -1/2 (y_k)' K^-1 y_k per coordinate, y_k = mu_T[:, k] - m_k 1 and
    K^-1 = I / Sigma_T - Phi S_W Phi' / Sigma_T^2, so
    m_k = 1' K^-1 mu_T[:, k] / 1' K^-1 1, in the eigenbasis of Phi' Phi:

        m_k = ( sum_n mu_T[n,k] / Sigma_T - <z_1, s z_k> / Sigma_T^2 ) / ( N / Sigma_T - <z_1, s z_1> / Sigma_T^2 ),

    z_k = Psi' mu_T[:, k], z_1 = Psi' 1, s the eigenvalues of S_W. The
    result also satisfies (eq:rt-mean) with the q(W) it implies.

    Parameters
    ----------
    sum_mu_T : ndarray (D,)
    z_raw : ndarray (D, *basis_shape)
        Psi' mu_T per coordinate.
    z1 : ndarray (*basis_shape)
        Psi' 1.
    s_W : ndarray (*basis_shape)
    sigma_T : float
    n_voxels : int

    Returns
    -------
    ndarray (D,)

    References
    ----------
    models/robust_t.md (eq:rt-mean-joint)
    """
    D = z_raw.shape[0]
    w = (z1 * s_W).reshape(-1)
    num = np.asarray(sum_mu_T, float) / sigma_T - z_raw.reshape(D, -1) @ w / sigma_T**2
    den = n_voxels / sigma_T - float(z1.reshape(-1) @ w) / sigma_T**2
    return num / den


def update_sigma_T(sum_mu2, cross, quad_W, sum_S_diag, trace_SW_G, n_voxels, dim):
    """Sigma_T = 1/(N D) sum_n sum_k [ (y[n,k] - Phi_n' mu_W[k])^2 + S_T[n]_kk + Phi_n' S_W Phi_n ].

    y = mu_T - m, the consensus less the prior's constant mean. The squares
    are expanded so that no pass over the volume is needed:
    sum_n (y - Phi' mu_W)^2 = sum y^2 - 2 <Phi' y, mu_W> + mu_W' Phi'Phi mu_W,
    and sum_n Phi_n' S_W Phi_n = Tr(S_W Phi' Phi) per row.

    Parameters
    ----------
    sum_mu2 : float
        sum_{n,k} y[n,k]^2.
    cross : float
        sum_k <Phi' y[k], mu_W[k]>.
    quad_W : float
        sum_k mu_W[k]' Phi'Phi mu_W[k].
    sum_S_diag : float
        sum_{n,k} S_T[n]_kk.
    trace_SW_G : float
        Tr(S_W Phi' Phi).
    n_voxels, dim : int
        N (every voxel of the grid) and D.

    References
    ----------
    models/robust_t.md (eq:rt-sigma-T)
    """
    return (sum_mu2 - 2 * cross + quad_W + sum_S_diag + dim * trace_SW_G) / (n_voxels * dim)


# ------------------------------------------------------------ the fused pass
@njit(parallel=True, cache=True)
def _vb_pass(X, mode, tau, mu_T, prior_mean, obs, Sinv, Sinv_prev, mu_b, mu_b_tau, trace_b, a_tau, nu,
             prior_prec, prior_prec_prev, robust, block, relax=1.0):
    """One sweep over the voxels: q(tau[n, :]) then q(T~[n]) at each voxel.

    Both are exact coordinate updates of the ELBO (eq:rt-qtau, eq:rt-qT); voxels
    are independent given the global parameters, so the sweep may run in
    any order and in parallel. Returns the sums every global update needs.

    ``mu_b_tau`` is the bias the q(tau) step pairs with the stored mu_T (the
    current mu_b less a pending gauge shift, see :func:`_gauge_step`). The
    new mu_T and E[tau] are read back after they are stored, so that with
    float32 storage every sum (and so the ELBO) is that of the stored,
    rounded values, which the next pass starts from.

    ``relax`` (omega in [1, 2)) over-relaxes the q(T~[n]) mean: it moves
    from its current value (the stored mu_T less the pending gauge shift
    mu_b - mu_b_tau) omega times the way to the optimum (eq:rt-overrelax),
    which still raises the ELBO's block; the covariance is the optimum.

    References
    ----------
    models/robust_t.md (eq:rt-overrelax)
    """
    P, N = X.shape[0], X.shape[1]
    D = mu_T.shape[0]
    has_obs = obs.shape[0] > 0
    has_mean = prior_mean.shape[1] > 0
    nb = (N + block - 1) // block
    sw = np.zeros((nb, P))
    s1 = np.zeros((nb, P, D))
    s2 = np.zeros((nb, P, D, D))
    sS = np.zeros((nb, P, D, D))
    slogc = np.zeros((nb, P))
    glob = np.zeros((nb, 1 + 2 * D))  # sum log|S_T|, sum mu_T^2 per k, sum S_T[k, k] per k
    short = np.zeros(nb)  # ELBO the over-relaxed mean steps give up against plain ones (eq:rt-overrelax)
    var_prior = 1.0 / prior_prec if prior_prec > 0 else 0.0
    logdet_prior = D * math.log(var_prior) if prior_prec > 0 else 0.0
    for ib in prange(nb):
        d = np.empty((P, D))
        lam = np.empty((D, D))
        L = np.empty((D, D))
        Sold = np.empty((D, D))
        Sn = np.empty((D, D))
        h = np.empty(D)
        m = np.empty(D)
        e = np.empty(D)
        t = np.empty(P)
        logc = np.zeros(P)
        for n in range(ib * block, min(N, (ib + 1) * block)):
            if has_obs and obs[n] == 0:
                # no rater sees this voxel: q(T~[n]) is the prior N(Phi_n mu_W, Sigma_T I)
                for i in range(D):
                    mi = prior_mean[i, n] if has_mean else 0.0
                    if relax != 1.0:
                        old = mu_T[i, n] - (mu_b[0, i] - mu_b_tau[0, i])
                        short[ib] += (1.0 - relax) ** 2 * 0.5 * prior_prec * (mi - old) ** 2
                        mi = old + relax * (mi - old)
                    mu_T[i, n] = mi
                    mi = mu_T[i, n]
                    glob[ib, 1 + i] += mi * mi
                    glob[ib, 1 + D + i] += var_prior
                glob[ib, 0] += logdet_prior
                continue
            for p in range(P):
                G.load_d(X, p, n, mode, d[p])
            if robust:
                # q(T~[n])'s current covariance, from the values it was computed with
                for i in range(D):
                    for j in range(D):
                        lam[i, j] = prior_prec_prev if i == j else 0.0
                for p in range(P):
                    tp = tau[p, n]
                    for i in range(D):
                        for j in range(D):
                            lam[i, j] += tp * Sinv_prev[p, i, j]
                G.chol(lam, L, D)
                G.chol_inverse(L, Sold, D)
                for p in range(P):
                    for i in range(D):
                        e[i] = d[p, i] - mu_T[i, n] - mu_b_tau[p, i]
                    q = 0.0
                    tr = 0.0
                    for i in range(D):
                        for j in range(D):
                            q += e[i] * Sinv[p, i, j] * e[j]
                            tr += Sinv[p, i, j] * Sold[j, i]
                    c = 0.5 * nu[p] + 0.5 * (q + tr + trace_b[p])
                    tau[p, n] = a_tau[p] / c
                    t[p] = tau[p, n]  # as stored; its rate a / t
                    logc[p] = math.log(a_tau[p] / t[p])
            else:
                for p in range(P):
                    t[p] = 1.0
            # q(T~[n]) with the new tau
            for i in range(D):
                h[i] = prior_prec * (prior_mean[i, n] if has_mean else 0.0)
                for j in range(D):
                    lam[i, j] = prior_prec if i == j else 0.0
            for p in range(P):
                for i in range(D):
                    e[i] = d[p, i] - mu_b[p, i]
                for i in range(D):
                    acc = 0.0
                    for j in range(D):
                        lam[i, j] += t[p] * Sinv[p, i, j]
                        acc += Sinv[p, i, j] * e[j]
                    h[i] += t[p] * acc
            ld = G.chol(lam, L, D)
            G.chol_solve(L, h, m, D)
            G.chol_inverse(L, Sn, D)
            glob[ib, 0] -= ld
            if relax != 1.0:
                # over-relaxed step from q(T~[n])'s current mean (in the bias's gauge); the
                # plain step's block gain is 1/2 d' Lambda d (d = optimum - current)
                for i in range(D):
                    e[i] = m[i] - (mu_T[i, n] - (mu_b[0, i] - mu_b_tau[0, i]))
                gq = 0.0
                for i in range(D):
                    for j in range(D):
                        gq += e[i] * lam[i, j] * e[j]
                short[ib] += (1.0 - relax) ** 2 * 0.5 * gq
                for i in range(D):
                    m[i] = m[i] - e[i] + relax * e[i]
            for i in range(D):
                mu_T[i, n] = m[i]
                m[i] = mu_T[i, n]  # as stored
                glob[ib, 1 + i] += m[i] * m[i]
                glob[ib, 1 + D + i] += Sn[i, i]
            for p in range(P):
                tp = t[p]
                sw[ib, p] += tp
                slogc[ib, p] += logc[p]
                for i in range(D):
                    e[i] = d[p, i] - m[i]
                for i in range(D):
                    s1[ib, p, i] += tp * e[i]
                    for j in range(D):
                        s2[ib, p, i, j] += tp * e[i] * e[j]
                        sS[ib, p, i, j] += tp * Sn[i, j]
    return sw.sum(0), s1.sum(0), s2.sum(0), sS.sum(0), slogc.sum(0), glob.sum(0), short.sum()


#: LLVM flags of the D = 2 pass: reassociation lets the per-rater loops over a
#: block's voxels vectorise (sums change order, not value beyond rounding);
#: no finite-math assumptions.
_FASTMATH = {"reassoc", "contract", "nsz"}

#: The sum of log c takes one log() per product of _LOG_FACTORS values, the
#: products formed in _LOG_LANES independent lanes so that the multiplications
#: vectorise. c lies in [nu_min / 2, ~1e8] for any sane floor, so a product of
#: 16 stays far inside float64's range; one that does not is taken value by value.
_LOG_LANES = 16
_LOG_FACTORS = 16


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _sum_log(v, n):
    """sum_j log v[j] over v[:n] (v > 0), one log per product of _LOG_FACTORS values.

    log() is the pass's one libm call; it does not vectorise, so it is taken
    of products (formed lane-wise, which vectorises) and only while a product
    stays far inside float64's normal range, else value by value. The sum
    differs from the plain one by rounding (about _LOG_FACTORS eps per log).
    """
    s = 0.0
    chunk = _LOG_LANES * _LOG_FACTORS
    pr = np.empty(_LOG_LANES)
    n_full = n - n % chunk
    for j0 in range(0, n_full, chunk):
        for k in range(_LOG_LANES):
            pr[k] = v[j0 + k]
        for g in range(1, _LOG_FACTORS):
            for k in range(_LOG_LANES):
                pr[k] *= v[j0 + g * _LOG_LANES + k]
        for k in range(_LOG_LANES):
            x = pr[k]
            if 1e-290 < x < 1e290:
                s += math.log(x)
            else:
                for g in range(_LOG_FACTORS):
                    s += math.log(v[j0 + g * _LOG_LANES + k])
    for j in range(n_full, n):
        s += math.log(v[j])
    return s


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _copy(dst, src, n):
    """dst[:n] = src[:n] (cast to dst's type). Offsets go into the slices, not the indices:
    an index like ``a[n0 + j]`` gets numba's negative-index wraparound select, which keeps
    LLVM from contiguous vector loads; ``a[j]`` over ``range`` does not."""
    for j in range(n):
        dst[j] = src[j]


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _band_rows_into(out, phi, Zk, lo, hi, c0, C, add):
    """out[:C] = add + sum_{l in lo:hi} phi[l] Zk[l, c0:c0 + C]: one voxel row of the prior mean
    (four bases per sweep of ``out``, so that it is loaded and stored a quarter as often)."""
    for cl in range(C):
        out[cl] = add
    l = lo
    while l + 4 <= hi:
        f0, f1, f2, f3 = phi[l], phi[l + 1], phi[l + 2], phi[l + 3]
        z0, z1 = Zk[l, c0 : c0 + C], Zk[l + 1, c0 : c0 + C]
        z2, z3 = Zk[l + 2, c0 : c0 + C], Zk[l + 3, c0 : c0 + C]
        for cl in range(C):
            out[cl] += (f0 * z0[cl] + f1 * z1[cl]) + (f2 * z2[cl] + f3 * z3[cl])
        l += 4
    while l < hi:
        f0 = phi[l]
        z0 = Zk[l, c0 : c0 + C]
        for cl in range(C):
            out[cl] += f0 * z0[cl]
        l += 1


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _band_cols_add(out, phi, r, R, C):
    """out[:C] += sum_{s < R} phi[s] r[s C : (s + 1) C]: one basis's row of the residual's projection
    (four voxel rows per sweep of ``out``)."""
    s = 0
    while s + 4 <= R:
        f0, f1, f2, f3 = phi[s], phi[s + 1], phi[s + 2], phi[s + 3]
        j = s * C
        r0, r1 = r[j : j + C], r[j + C : j + 2 * C]
        r2, r3 = r[j + 2 * C : j + 3 * C], r[j + 3 * C : j + 4 * C]
        for cl in range(C):
            out[cl] += (f0 * r0[cl] + f1 * r1[cl]) + (f2 * r2[cl] + f3 * r3[cl])
        s += 4
    while s < R:
        f0 = phi[s]
        r0 = r[s * C : s * C + C]
        for cl in range(C):
            out[cl] += f0 * r0[cl]
        s += 1


@njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _vb_pass2(X0, X1, mode, tau, mu_T, obs, Sinv, Sinv_prev, mu_b, mu_b_tau, trace_b, a_tau, nu,
              prior_prec, prior_prec_prev, robust, relax, single, S_q, S_valid, store_tau,
              M, groups, strip, Phi0, PhiT, Z, m, proj):
    """:func:`_vb_pass` written out for D = 2 (two classes with the sqrt link), with the spatial
    prior's first-axis products fused in.

    Layout. The N voxels are rows of ``M`` (the grid's first axis by the
    rest, C order; one row of N without the spatial prior). The pass runs
    over column strips of ``strip`` columns in parallel; each strip walks
    down the row groups ``groups[g] = (a, b, lo, hi)`` (rows a:b, whose
    bases along the first axis are lo:hi, see ``spatial.row_bands``), and a
    block is one group of one strip. Per-voxel values are gathered from the
    volumes into contiguous scratch and scattered back, so every step below
    is a loop over raters outside and the block's voxels inside, on short
    contiguous vectors, with the 2 x 2 algebra in closed form. An unobserved
    voxel gets weight 0 for every rater, which makes its q(T~) the prior
    without a branch. Every loop over a block's voxels vectorises (LLVM's
    loop-vectorize remarks): no ``max()`` (a call) in them, no division
    checks (``error_model="numpy"``: the divisors are precisions'
    determinants and rates, positive), the per-voxel solve split from the
    stores of mu_T it reads back.

    Spatial prior (``Z`` (2, L_0, M) not empty). The prior mean of a block
    is formed here, m + Phi_0[rows, lo:hi] Z[:, lo:hi, cols] in float64
    (``Z`` = the other axes' products of U_0 v_W, float64), and is not
    stored; after q(T~) the block adds Phi_0[rows, lo:hi]' (mu_T - prior
    mean) to ``proj[:, lo:hi, cols]``: the first axis's product of the
    residual's projection, which the q(W) step completes on the small stack
    (``KroneckerBasis.project_rest_eig``). It is taken in ``proj``'s type,
    the storage type (``PhiT`` = Phi_0' in that type): float32 for float32
    storage, as the residual's sgemm was (the residual is small, so its
    float32 rounding is small in absolute terms: section "Float32 storage"
    of the card). A strip owns its columns of ``proj``, so strips do not
    race. This replaces two sweeps over the volume (the prior mean's
    expansion, the residual's projection) and the stored prior mean.

    ``single`` (float32 storage): the per-rater scratch (D~ and the weights)
    is float32 and the square roots are taken in float32. That is the same
    D~ as float64 roots rounded to float32 (a correctly rounded float32
    root), 3e-8 off the float64 value, the same in every pass; the weights
    are the stored float32 E[tau] (times 0 or 1) exactly; every difference
    and sum is formed in float64. Stored values (mu_T, S_q, E[tau]) pass
    through scratch of the storage type, so that the sums are those of the
    values as stored.

    ``S_q`` (3, N) (robust model): q(T~)'s covariances (S00, S01, S11) in the
    storage type, written by the q(T~) step; with ``S_valid`` (they are the
    ones the last pass wrote, from the current E[tau], ``Sinv_prev`` and
    ``prior_prec_prev``) the q(tau) step reads them instead of rebuilding
    them from E[tau]. An empty ``S_q`` (3, 0): not kept.

    ``store_tau`` False (robust, with ``S_q`` kept: this pass writes it):
    E[tau] is computed, used and summed as always but not written to
    ``tau``; nothing in the next pass reads it then (q(tau) is rebuilt from
    mu_T and ``S_q``).
    """
    P, N = X0.shape[0], X0.shape[1]
    has_obs = obs.shape[0] > 0
    has_mean = Z.shape[1] > 0
    n_groups = groups.shape[0]
    n_strips = (M + strip - 1) // strip
    rows_max = 0
    for g in range(n_groups):
        if groups[g, 1] - groups[g, 0] > rows_max:
            rows_max = groups[g, 1] - groups[g, 0]
    L0 = Z.shape[1]
    acc = np.zeros((n_strips, P, 10))  # sw, s1[2], s2[00, 01, 11], sS[00, 01, 11], slogc
    glob = np.zeros((n_strips, 7))  # sum log|S_T|, sum mu_T^2 [2], sum S_T[k, k] [2], sum mu_T [2]
    short = np.zeros(n_strips)  # ELBO the over-relaxed mean steps give up against plain ones (eq:rt-overrelax)
    s00, s01, s11 = Sinv[:, 0, 0].copy(), Sinv[:, 0, 1].copy(), Sinv[:, 1, 1].copy()
    q00, q01, q11 = Sinv_prev[:, 0, 0].copy(), Sinv_prev[:, 0, 1].copy(), Sinv_prev[:, 1, 1].copy()
    b0, b1 = mu_b[:, 0].copy(), mu_b[:, 1].copy()
    bt0, bt1 = mu_b_tau[:, 0].copy(), mu_b_tau[:, 1].copy()
    sh0, sh1 = b0[0] - bt0[0], b1[0] - bt1[0]  # pending gauge shift of the stored mu_T
    keep_S = S_q.shape[1] > 0
    for ic in prange(n_strips):
        c0 = ic * strip
        C = min(M, c0 + strip) - c0
        Bm = rows_max * C
        d0 = np.empty((P, Bm), dtype=mu_T.dtype)
        d1 = np.empty((P, Bm), dtype=mu_T.dtype)
        t = np.empty((P, Bm), dtype=mu_T.dtype)
        w = np.empty(Bm)
        c = np.empty(Bm)
        u0 = np.empty(Bm)
        u1 = np.empty(Bm)
        l00 = np.empty(Bm)
        l01 = np.empty(Bm)
        l11 = np.empty(Bm)
        h0 = np.empty(Bm)
        h1 = np.empty(Bm)
        k00 = np.empty(Bm)
        k01 = np.empty(Bm)
        k11 = np.empty(Bm)
        pm0 = np.empty(Bm)
        pm1 = np.empty(Bm)
        st0 = np.empty(Bm, dtype=mu_T.dtype)  # values as stored: mu_T, then S_q
        st1 = np.empty(Bm, dtype=mu_T.dtype)
        st2 = np.empty(Bm, dtype=mu_T.dtype)
        rr0 = np.empty(Bm, dtype=proj.dtype)  # the residual mu_T - prior mean, in proj's type
        rr1 = np.empty(Bm, dtype=proj.dtype)
        if has_mean:
            for k in range(2):
                for l in range(L0):
                    pr = proj[k, l, c0 : c0 + C]
                    for cl in range(C):
                        pr[cl] = 0.0
        for g in range(n_groups):
            ga, gb, lo, hi = groups[g, 0], groups[g, 1], groups[g, 2], groups[g, 3]
            R = gb - ga
            B = R * C
            # gather: weights, D~, the stored mu_T (and S_q or E[tau])
            for s in range(R):
                n0 = (ga + s) * M + c0
                jb = s * C
                ws, us0, us1 = w[jb : jb + C], u0[jb : jb + C], u1[jb : jb + C]
                m0s, m1s = mu_T[0, n0 : n0 + C], mu_T[1, n0 : n0 + C]
                if has_obs:
                    os_ = obs[n0 : n0 + C]
                    for cl in range(C):
                        ws[cl] = 0.0 if os_[cl] == 0 else 1.0
                else:
                    for cl in range(C):
                        ws[cl] = 1.0
                _copy(us0, m0s, C)
                _copy(us1, m1s, C)
            for p in range(P):
                for s in range(R):
                    n0 = (ga + s) * M + c0
                    jb = s * C
                    x0 = X0[p, n0 : n0 + C]
                    e0s, e1s = d0[p, jb : jb + C], d1[p, jb : jb + C]
                    if mode == G.MODE_SQRT2:
                        if single:
                            one = np.float32(1.0)
                            zero = np.float32(0.0)
                            for cl in range(C):
                                f32 = np.float32(x0[cl])
                                g32 = one - f32
                                e0s[cl] = np.sqrt(g32 if g32 > zero else zero)
                                e1s[cl] = np.sqrt(f32 if f32 > zero else zero)
                        else:
                            for cl in range(C):
                                f = np.float64(x0[cl])
                                gg = 1.0 - f
                                e0s[cl] = math.sqrt(gg if gg > 0.0 else 0.0)
                                e1s[cl] = math.sqrt(f if f > 0.0 else 0.0)
                    else:
                        x1 = X1[p, n0 : n0 + C]
                        for cl in range(C):
                            e0s[cl] = x0[cl]
                            e1s[cl] = x1[cl]
            if robust and S_valid:
                # q(T~)'s current covariance, as the last pass stored it
                for s in range(R):
                    n0 = (ga + s) * M + c0
                    jb = s * C
                    _copy(l00[jb : jb + C], S_q[0, n0 : n0 + C], C)
                    _copy(l01[jb : jb + C], S_q[1, n0 : n0 + C], C)
                    _copy(l11[jb : jb + C], S_q[2, n0 : n0 + C], C)
            elif robust:
                # q(T~)'s current covariance, from the values it was computed with
                for j in range(B):
                    l00[j] = prior_prec_prev
                    l01[j] = 0.0
                    l11[j] = prior_prec_prev
                for p in range(P):
                    for s in range(R):
                        n0 = (ga + s) * M + c0
                        jb = s * C
                        ws, ts = w[jb : jb + C], tau[p, n0 : n0 + C]
                        a0s, a1s, a2s = l00[jb : jb + C], l01[jb : jb + C], l11[jb : jb + C]
                        for cl in range(C):
                            tp = ws[cl] * ts[cl]
                            a0s[cl] += tp * q00[p]
                            a1s[cl] += tp * q01[p]
                            a2s[cl] += tp * q11[p]
                for j in range(B):
                    det = l00[j] * l11[j] - l01[j] * l01[j]
                    a00 = l11[j] / det
                    l01[j] = -l01[j] / det
                    l11[j] = l00[j] / det
                    l00[j] = a00
            if robust:
                for p in range(P):
                    for j in range(B):
                        e0 = np.float64(d0[p, j]) - u0[j] - bt0[p]
                        e1 = np.float64(d1[p, j]) - u1[j] - bt1[p]
                        quad = s00[p] * e0 * e0 + 2.0 * s01[p] * e0 * e1 + s11[p] * e1 * e1
                        tr = s00[p] * l00[j] + 2.0 * s01[p] * l01[j] + s11[p] * l11[j]
                        cj = 0.5 * nu[p] + 0.5 * (quad + tr + trace_b[p])
                        t[p, j] = w[j] * (a_tau[p] / cj)  # E[tau] in the storage type (0 where unobserved)
                    for j in range(B):
                        tp = np.float64(t[p, j]) + (1.0 - w[j])  # E[tau] as stored (1 where unobserved)
                        c[j] = w[j] * (a_tau[p] / tp) + (1.0 - w[j])  # its rate a / E[tau]; log 1 = 0 unobserved
                    acc[ic, p, 9] += _sum_log(c, B)
                    if store_tau:
                        for s in range(R):
                            n0 = (ga + s) * M + c0
                            jb = s * C
                            ts, tt, ws = tau[p, n0 : n0 + C], t[p, jb : jb + C], w[jb : jb + C]
                            for cl in range(C):
                                ts[cl] = tt[cl] + (1.0 - ws[cl])
            else:
                for p in range(P):
                    for j in range(B):
                        t[p, j] = w[j]
            # the prior mean: m + Phi_0[rows, lo:hi] Z[:, lo:hi, cols]
            if has_mean:
                for s in range(R):
                    jb = s * C
                    _band_rows_into(pm0[jb : jb + C], Phi0[ga + s], Z[0], lo, hi, c0, C, m[0])
                    _band_rows_into(pm1[jb : jb + C], Phi0[ga + s], Z[1], lo, hi, c0, C, m[1])
            # q(T~) with the new weights
            for j in range(B):
                l00[j] = prior_prec
                l01[j] = 0.0
                l11[j] = prior_prec
                h0[j] = prior_prec * (pm0[j] if has_mean else 0.0)
                h1[j] = prior_prec * (pm1[j] if has_mean else 0.0)
            for p in range(P):
                for j in range(B):
                    tp = np.float64(t[p, j])
                    e0 = np.float64(d0[p, j]) - b0[p]
                    e1 = np.float64(d1[p, j]) - b1[p]
                    l00[j] += tp * s00[p]
                    l01[j] += tp * s01[p]
                    l11[j] += tp * s11[p]
                    h0[j] += tp * (s00[p] * e0 + s01[p] * e1)
                    h1[j] += tp * (s01[p] * e0 + s11[p] * e1)
            # the new q(T~[n]): covariance k = Lambda^-1 and the plain step's mean in h
            for j in range(B):
                det = l00[j] * l11[j] - l01[j] * l01[j]
                S00 = l11[j] / det
                S01 = -l01[j] / det
                S11 = l00[j] / det
                m0 = S00 * h0[j] + S01 * h1[j]
                m1 = S01 * h0[j] + S11 * h1[j]
                k00[j] = S00
                k01[j] = S01
                k11[j] = S11
                c[j] = det
                h0[j] = m0
                h1[j] = m1
            g5 = 0.0
            if relax != 1.0:
                # over-relaxed step from q(T~[n])'s current mean (in the bias's gauge); the
                # plain step's block gain is 1/2 d' Lambda d (d = optimum - current)
                for j in range(B):
                    dd0 = h0[j] - (u0[j] - sh0)
                    dd1 = h1[j] - (u1[j] - sh1)
                    g5 += 0.5 * (l00[j] * dd0 * dd0 + 2.0 * l01[j] * dd0 * dd1 + l11[j] * dd1 * dd1)
                    h0[j] = h0[j] - dd0 + relax * dd0
                    h1[j] = h1[j] - dd1 + relax * dd1
            # the new mean as stored (rounded when float32), kept in h for the sums below
            for j in range(B):
                st0[j] = h0[j]
                st1[j] = h1[j]
            g1 = 0.0
            g2 = 0.0
            g3 = 0.0
            g4 = 0.0
            g6 = 0.0
            g7 = 0.0
            for j in range(B):
                m0 = np.float64(st0[j])
                m1 = np.float64(st1[j])
                h0[j] = m0
                h1[j] = m1
                g1 += m0 * m0
                g2 += m1 * m1
                g6 += m0
                g7 += m1
            for s in range(R):
                n0 = (ga + s) * M + c0
                jb = s * C
                _copy(mu_T[0, n0 : n0 + C], st0[jb : jb + C], C)
                _copy(mu_T[1, n0 : n0 + C], st1[jb : jb + C], C)
            if keep_S:
                # the covariances as stored (rounded when float32): the ELBO is that of the stored q
                for j in range(B):
                    st0[j] = k00[j]
                    st1[j] = k01[j]
                    st2[j] = k11[j]
                for j in range(B):
                    k00[j] = st0[j]
                    k01[j] = st1[j]
                    k11[j] = st2[j]
                    c[j] = k00[j] * k11[j] - k01[j] * k01[j]
                for s in range(R):
                    n0 = (ga + s) * M + c0
                    jb = s * C
                    _copy(S_q[0, n0 : n0 + C], st0[jb : jb + C], C)
                    _copy(S_q[1, n0 : n0 + C], st1[jb : jb + C], C)
                    _copy(S_q[2, n0 : n0 + C], st2[jb : jb + C], C)
                logdet = _sum_log(c, B)
            else:
                logdet = -_sum_log(c, B)
            for j in range(B):
                g3 += k00[j]
                g4 += k11[j]
            glob[ic, 0] += logdet
            glob[ic, 1] += g1
            glob[ic, 2] += g2
            glob[ic, 3] += g3
            glob[ic, 4] += g4
            glob[ic, 5] += g6
            glob[ic, 6] += g7
            short[ic] += (1.0 - relax) ** 2 * g5
            for p in range(P):
                a0 = 0.0
                a1 = 0.0
                a2 = 0.0
                a3 = 0.0
                a4 = 0.0
                a5 = 0.0
                a6 = 0.0
                a7 = 0.0
                a8 = 0.0
                for j in range(B):
                    tp = np.float64(t[p, j])
                    e0 = np.float64(d0[p, j]) - h0[j]
                    e1 = np.float64(d1[p, j]) - h1[j]
                    a0 += tp
                    a1 += tp * e0
                    a2 += tp * e1
                    a3 += tp * e0 * e0
                    a4 += tp * e0 * e1
                    a5 += tp * e1 * e1
                    a6 += tp * k00[j]
                    a7 += tp * k01[j]
                    a8 += tp * k11[j]
                acc[ic, p, 0] += a0
                acc[ic, p, 1] += a1
                acc[ic, p, 2] += a2
                acc[ic, p, 3] += a3
                acc[ic, p, 4] += a4
                acc[ic, p, 5] += a5
                acc[ic, p, 6] += a6
                acc[ic, p, 7] += a7
                acc[ic, p, 8] += a8
            # the residual's projection along the first axis: proj[:, lo:hi, cols] += Phi_0[rows, lo:hi]' r
            if has_mean:
                for j in range(B):
                    rr0[j] = h0[j] - pm0[j]
                    rr1[j] = h1[j] - pm1[j]
                for l in range(lo, hi):
                    _band_cols_add(proj[0, l, c0 : c0 + C], PhiT[l, ga:gb], rr0, R, C)
                    _band_cols_add(proj[1, l, c0 : c0 + C], PhiT[l, ga:gb], rr1, R, C)
    a = acc.sum(0)
    gl = glob.sum(0)
    s1 = a[:, 1:3].copy()
    s2 = np.empty((P, 2, 2))
    sS = np.empty((P, 2, 2))
    for p in range(P):
        s2[p, 0, 0], s2[p, 0, 1], s2[p, 1, 0], s2[p, 1, 1] = a[p, 3], a[p, 4], a[p, 4], a[p, 5]
        sS[p, 0, 0], sS[p, 0, 1], sS[p, 1, 0], sS[p, 1, 1] = a[p, 6], a[p, 7], a[p, 7], a[p, 8]
    return a[:, 0].copy(), s1, s2, sS, a[:, 9].copy(), gl[:5].copy(), short.sum(), gl[5:].copy()


@njit(parallel=True, cache=True)
def _S_T_kernel(tau, Sinv, prior_prec, obs, robust, out, block):
    """S_T[n] = (sum_p tau^[n,p] Sigma_p^-1 + I / Sigma_T)^-1 for every voxel."""
    N, D = out.shape[0], out.shape[1]
    P = Sinv.shape[0]
    has_obs = obs.shape[0] > 0
    nb = (N + block - 1) // block
    for ib in prange(nb):
        lam = np.empty((D, D))
        L = np.empty((D, D))
        Sn = np.empty((D, D))
        for n in range(ib * block, min(N, (ib + 1) * block)):
            seen = not has_obs or obs[n] != 0
            for i in range(D):
                for j in range(D):
                    lam[i, j] = prior_prec if i == j else 0.0
            if seen:
                for p in range(P):
                    tp = tau[p, n] if robust else 1.0
                    for i in range(D):
                        for j in range(D):
                            lam[i, j] += tp * Sinv[p, i, j]
            if D == 2:
                det = lam[0, 0] * lam[1, 1] - lam[0, 1] * lam[1, 0]
                out[n, 0, 0] = lam[1, 1] / det
                out[n, 0, 1] = -lam[0, 1] / det
                out[n, 1, 0] = -lam[1, 0] / det
                out[n, 1, 1] = lam[0, 0] / det
                continue
            G.chol(lam, L, D)
            G.chol_inverse(L, Sn, D)
            for i in range(D):
                for j in range(D):
                    out[n, i, j] = Sn[i, j]


# ----------------------------------------------------------------- the state
@dataclass
class VBState:
    """Everything the VB solver keeps between iterations.

    Per-voxel arrays are class-first (``mu_T[d, n]``) over the N voxels of
    the grid (the ROI's bounding box with the spatial prior, the ROI
    otherwise); ``tau[p, n]`` holds E[tau] (robust only; stale, with
    ``tau_stale``, between the iterations of :func:`solve` that do not store
    it). Hyperparameters
    are the current point estimates; ``Sinv_q`` and ``prior_prec_q`` are the
    values q(T~) was last computed with (its covariance is rebuilt from
    them rather than stored).
    """

    mu_T: np.ndarray
    tau: np.ndarray | None
    a_tau: np.ndarray  # shape of q(tau) per rater, as used in the last pass
    mu_b: np.ndarray
    S_b: np.ndarray
    Sigma: np.ndarray
    nu: np.ndarray
    beta: float | None
    Sinv_q: np.ndarray
    prior_prec_q: float
    v_W: np.ndarray | None = None  # U' mu_W: q(W)'s means in the eigenbasis of Phi' Phi
    s_W: np.ndarray | None = None
    alpha: float | None = None
    sigma_T: float | None = None
    prior_mean: np.ndarray | None = None
    m: np.ndarray | None = None  # the spatial prior's constant mean (D,)
    W_hyper: tuple = ()  # (alpha, sigma_T) q(W) was computed with
    stats: dict = field(default_factory=dict)
    elbo: list = field(default_factory=list)
    seconds: list = field(default_factory=list)  # wall time of each iteration
    cpu_seconds: list = field(default_factory=list)  # process CPU time of each iteration (all threads)
    floor_hits: int = 0
    # pending gauge shift c (D,): q(T~)'s mean is mu_T - c until the next pass rewrites mu_T
    T_shift: np.ndarray | None = None
    gauge: list = field(default_factory=list)  # the gauge step's c per iteration (D,)
    rounding: list = field(default_factory=list)  # bound on the rounding of each recorded ELBO
    largest_decrease: float = 0.0  # largest ELBO decrease beyond rounding (0: none)
    ones_eig: np.ndarray | None = None  # Psi' 1, cached for the m and q(W) steps
    W_step: float = 1.0  # over-relaxation factor of the next (q(W), m) step (eq:rt-overrelax)
    W_relax: list = field(default_factory=list)  # per iteration: the factor taken (1: plain step)
    W_rejected: int = 0  # (q(W), m) steps beyond omega = 2 refused by the ELBO and taken plainly
    relax_gap: list = field(default_factory=list)  # per iteration: ELBO given up by the over-relaxed steps
    # q(T~)'s covariances (S00, S01, S11) as the last pass stored them (robust, D = 2): read by the
    # next pass's q(tau) step instead of rebuilt from E[tau]; freed before the outputs
    S_q: np.ndarray | None = None
    tau_stale: bool = False  # tau holds an earlier iteration's E[tau] (see iterate's keep_tau)
    # D = 2 with the spatial prior, where the pass forms the prior mean itself (_vb_pass2) instead
    # of reading prior_mean: the prior mean's products but the first axis's, (D, L_0, M) float64,
    # and the pass's first-axis projection Phi_0' (mu_T - prior mean), (D, L_0, M) in the storage type
    Z: np.ndarray | None = None
    proj_T: np.ndarray | None = None


@dataclass(frozen=True)
class Problem:
    """The data as the solver sees them: kernel storage, grid, observed voxels."""

    kd: G.KernelData
    shape: tuple[int, ...]  # the grid the voxels fill (C order)
    obs: np.ndarray  # uint8 (N,), or empty when every voxel is observed
    basis: KroneckerBasis | None

    @property
    def n_voxels(self) -> int:
        return self.kd.n_voxels

    @property
    def n_observed(self) -> int:
        return self.n_voxels if self.obs.size == 0 else int(np.count_nonzero(self.obs))


def make_problem(kd: G.KernelData, config: Config, shape=None, observed=None, voxel_size=None) -> Problem:
    """Bundle kernel data with its grid (needed by the spatial prior)."""
    shape = (kd.n_voxels,) if shape is None else tuple(int(s) for s in shape)
    if int(np.prod(shape)) != kd.n_voxels:
        raise ValueError(f"grid {shape} does not hold {kd.n_voxels} voxels")
    obs = np.zeros(0, np.uint8) if observed is None else np.ascontiguousarray(np.asarray(observed).reshape(-1), dtype=np.uint8)
    basis = None
    if config.spatial_prior:
        basis = KroneckerBasis.create(
            shape, config.basis_spacing, config.basis_width, config.basis_origin,
            voxel_size=voxel_size, units=config.basis_units,
        )
    elif obs.size and not obs.all():
        raise ValueError("unobserved voxels need the spatial prior (with a flat prior they have no posterior)")
    return Problem(kd, shape, obs, basis)


def _storage_dtype(config: Config, kd: G.KernelData):
    if config.storage == "float32":
        return np.float32
    if config.storage == "float64":
        return np.float64
    return np.float64 if kd.n_raters * kd.n_voxels <= 4_000_000 else np.float32


# ------------------------------------------------------------ global updates
def _prior_mean(basis: KroneckerBasis, v_W: np.ndarray, m: np.ndarray, out: np.ndarray) -> None:
    """out[d, :] = Phi mu_W[d] + m[d] = Psi v_W[d] + m[d] (mode products; classes on get_num_threads() threads)."""
    # in float64, rounded once to the storage type: a float32 sum of Psi v
    # and m is rounded twice, and its bias (1e-7 per voxel) moved the ELBO.
    # The sum is cast as it is written (no float64 temporary of the volume).
    basis.expand_eig_into(v_W, m, out.reshape((v_W.shape[0],) + basis.shape), threads=get_num_threads())


def _refresh_prior(prob: "Problem", st: "VBState") -> None:
    """The prior mean for the next pass, from v_W and m: ``st.Z`` for the D = 2 pass, which forms
    it block by block (m is passed as it is at the pass), the stored volume ``st.prior_mean`` otherwise."""
    if prob.kd.dim == 2:
        st.Z = prob.basis.expand_rest_eig(st.v_W, threads=get_num_threads(), out=st.Z)
        if st.proj_T is None:
            st.proj_T = np.empty(st.Z.shape, dtype=st.mu_T.dtype)
    else:
        if st.prior_mean is None:
            st.prior_mean = np.empty((prob.kd.dim, prob.n_voxels), dtype=st.mu_T.dtype)
        _prior_mean(prob.basis, st.v_W, st.m, st.prior_mean)


def prior_mean_of(prob: "Problem", st: "VBState") -> np.ndarray:
    """The spatial prior's mean Phi mu_W + m = Psi v_W + m, (D, N) float64 (for checks and outputs)."""
    out = np.empty((prob.kd.dim, prob.n_voxels))
    _prior_mean(prob.basis, st.v_W, st.m, out)
    return out


#: The D = 2 pass's layout without the spatial prior: one row of N voxels in strips of G.BLOCK.
_ONE_ROW = np.zeros((1, 4), dtype=np.int64)
_ONE_ROW[0, 1] = 1


def _no_prior_layout(n: int, block: int, dtype) -> tuple:
    return (n, _ONE_ROW, block, np.zeros((1, 0)), np.zeros((0, 1), dtype=dtype), np.zeros((2, 0, 0)), np.zeros(2),
            np.zeros((2, 0, 0), dtype=dtype))


#: Voxel rows per row group of the D = 2 pass with the spatial prior (strips of G.BLOCK / PASS_ROWS
#: columns): on the benchmark volume 8 rows (strips of 1024) took 0.21-0.28 s a pass, 16 rows
#: 0.24-0.31 s, 4 rows 0.22-0.25 s, 32 rows 0.27 s (interleaved full solves; the machine drifts).
PASS_ROWS = 8
#: Rows shorter than G.BLOCK / PASS_ROWS are cut into at least this many strips (the parallel
#: tasks). A constant, not the thread count: the pass's sums are taken per strip, so their
#: order, and the ELBO's last bits, must not depend on the machine.
PASS_STRIPS = 8


def _pass_layout(prob: "Problem", st: "VBState", block: int = G.BLOCK) -> tuple:
    """(M, groups, strip, Phi_0, Phi_0', Z, m, proj) for :func:`_vb_pass2`: rows of M voxels, row groups
    with Phi_0's band, strip width; the spatial prior's parts (empty without it).

    Strips of at most block / PASS_ROWS columns (a block of about ``block`` voxels), narrower
    where the rows are short so that there are at least PASS_STRIPS strips. Grids whose rows
    (the product of all axes but the first) are very short run on few strips: a 1-D grid on
    one, serially; the spatial prior's grids are 2-D or 3-D images in practice.
    """
    N = prob.n_voxels
    if prob.basis is None:
        return _no_prior_layout(N, block, st.mu_T.dtype)
    if st.Z is None:
        raise RuntimeError("robust-t: the prior mean's stack (Z) is missing; _refresh_prior makes it")
    M = N // prob.shape[0]
    strip = max(1, min(block // PASS_ROWS, -(-M // PASS_STRIPS)))
    Phi0 = prob.basis.Phi[0]
    PhiT = np.ascontiguousarray(Phi0.T, dtype=st.proj_T.dtype)
    return (M, prob.basis.row_band_table(PASS_ROWS), strip, Phi0, PhiT, st.Z, np.asarray(st.m, dtype=np.float64), st.proj_T)


def _ones_eig(prob: "Problem", st: "VBState") -> np.ndarray:
    """Psi' 1 (cached): the projection of a constant field, for the mean m."""
    if st.ones_eig is None:
        st.ones_eig = prob.basis.project_eig(np.ones(prob.shape))
    return st.ones_eig


def mu_W_of(prob: "Problem", st: VBState) -> np.ndarray:
    """q(W)'s means in the bases' own coordinates, mu_W = U v_W, (D, *basis_shape)."""
    return prob.basis.unrotate(st.v_W)


def _project_mu_T(prob: Problem, st: VBState) -> np.ndarray:
    """Psi' mu_T (D, *basis_shape) in float64, for the q(W) step and the ELBO.

    The projection is of the residual mu_T - prior mean, plus the prior
    mean's own projection taken in the eigenbasis, Psi' (Psi v + m 1) = g v
    + m Psi' 1 (Psi' Psi = diag(g)). With D = 2 the pass took the residual's
    first-axis product itself (``st.proj_T``, in the storage type, against
    the float64 prior mean it formed from ``st.Z`` and ``st.m``), completed
    here on the small stack; otherwise, with float32 storage, the residual
    against the stored float32 prior mean is contracted here in float32
    (float64 storage: Psi' mu_T in float64). The residual is small (the
    consensus is near its prior mean almost everywhere), so float32
    rounding, about 1e-7 of sum |x|, is small in absolute terms; a float32
    contraction of mu_T itself put the ELBO 7e-6 off (section "Float32
    storage"), and a float64 one costs 6 x the time.
    """
    basis, D = prob.basis, prob.kd.dim
    grid = (D,) + prob.shape
    bshape = (D,) + (1,) * basis.ndim
    if st.proj_T is not None:
        # the D = 2 pass's first-axis projection of the residual mu_T - prior mean (storage type),
        # completed on the small stack, plus the prior mean's own projection g v + m Psi' 1
        z = basis.project_rest_eig(st.proj_T, threads=get_num_threads())
        return z + basis.gram_eigenvalues() * st.v_W + st.m.reshape(bshape) * _ones_eig(prob, st)
    if st.mu_T.dtype != np.float32 or st.prior_mean is None:
        return basis.project_eig(st.mu_T.reshape(grid), dtype=np.float64)
    z = basis.project_difference_eig(st.mu_T.reshape(grid), st.prior_mean.reshape(grid), threads=get_num_threads())
    return z + basis.gram_eigenvalues() * st.v_W + st.m.reshape(bshape) * _ones_eig(prob, st)


def _update_W(prob: Problem, st: VBState, config: Config, eta: float = 1.0, proj=None) -> dict:
    """q(W), then m, then alpha, then Sigma_T; returns the terms the ELBO needs.

    ``eta`` over-relaxes the (q(W) mean, m) step: with (v*, m*) the joint
    optimum, the new mean is old + eta (optimum - old) (eq:rt-overrelax;
    1: the optimum itself). ``proj`` = (Psi' mu_T, sum_n mu_T), the step's
    only inputs that need a pass over the volume, may be passed in (from
    the returned terms) to redo the step with another eta without one.

    Everything in the eigenbasis of Phi' Phi, with y = mu_T - m: z = U' Phi' y
    = Psi' mu_T - m Psi' 1, v = U' mu_W = z s / Sigma_T, <Phi' y, mu_W> =
    <z, v>, mu_W' Phi'Phi mu_W = sum g v^2 and |mu_W|^2 = |v|^2 (U is
    orthogonal); sum_n Phi_n' mu_W = <Psi' 1, v> for the m step.
    """
    basis, D, N = prob.basis, prob.kd.dim, prob.n_voxels
    z1 = _ones_eig(prob, st)
    if proj is None:
        # the ELBO subtracts <z, v> from sum y^2, both of order N: see _project_mu_T for the precision
        # sum_n mu_T from the pass that stored this mu_T (no pending gauge shift here: the step runs before it)
        sum_T = st.stats.get("sum_T")
        proj = (_project_mu_T(prob, st), st.mu_T.sum(axis=1, dtype=np.float64) if sum_T is None else sum_T)
    z_raw, sum_T = proj
    bshape = (D,) + (1,) * z1.ndim
    g = basis.gram_eigenvalues()
    s = 1.0 / (g / st.sigma_T + st.alpha)
    # q(W) and m jointly (eq:rt-mean-joint): alternating them creeps along
    # (m + c, W - c u), the constant level traded between the two
    m_new = update_m_joint(sum_T, z_raw, z1, s, st.sigma_T, N)
    v_new = (z_raw - m_new.reshape(bshape) * z1) * (s / st.sigma_T)
    if eta != 1.0:
        v_new = st.v_W + eta * (v_new - st.v_W)
        m_new = st.m + eta * (m_new - st.m)
    st.m = m_new
    z = z_raw - st.m.reshape(bshape) * z1
    v = v_new
    st.W_hyper = (st.alpha, st.sigma_T)
    st.v_W, st.s_W = v, s
    glob = st.stats["glob"]
    # sum_n (mu_T - m)^2 = sum mu_T^2 - 2 m . sum mu_T + N |m|^2, its parts kept for the rounding bound
    y2_parts = [float(glob[1 : 1 + D].sum()), -2.0 * float(st.m @ sum_T), N * float(st.m @ st.m)]
    cross = float(np.sum(z * v))
    quad_W = float(np.sum(g * v * v))
    tr_SWG = float(np.sum(g * s))
    if config.alpha is None:
        st.alpha = float(update_alpha(v, s, D))
    if config.sigma_T is None:
        st.sigma_T = max(
            float(update_sigma_T(sum(y2_parts), cross, quad_W, glob[1 + D :].sum(), tr_SWG, N, D)),
            config.sigma_T_floor,
        )
    return {"cross": cross, "quad_W": quad_W, "tr_SWG": tr_SWG, "z": z, "y2_parts": y2_parts, "proj": proj}


def _run_pass(X, mode, tau, mu_T, prior_mean, obs, Sinv, Sinv_prev, mu_b, mu_b_tau, trace_b, a_tau, nu, prior_prec,
              prior_prec_prev, robust, block, relax=1.0, *, S_q=None, S_valid=False, store_tau=True, layout=None):
    """The fused pass (:func:`_vb_pass2` for D = 2, :func:`_vb_pass` otherwise) on the input ``X`` (P, N, C).

    D = 2 only (see :func:`_vb_pass2`): ``S_q``, q(T~)'s covariances kept
    between passes; ``store_tau`` False, E[tau] not written; ``layout``,
    :func:`_pass_layout`'s tuple, which carries the spatial prior (the D = 2
    pass forms the prior mean itself; ``prior_mean`` is for :func:`_vb_pass`).
    Returns the kernel's sums and, last, sum_n mu_T[:, n] of the mu_T it stored (D,), float64
    (None from :func:`_vb_pass`, which does not sum it: the q(W) step sums mu_T itself).
    """
    D = mu_T.shape[0]
    if D != 2:
        return _vb_pass(X, mode, tau, mu_T, prior_mean, obs, Sinv, Sinv_prev, mu_b, mu_b_tau, trace_b, a_tau, nu,
                        prior_prec, prior_prec_prev, robust, block, relax) + (None,)
    # the columns as (P, N) views: unit stride along the voxels, which the vectorised loads need
    X0 = X[:, :, 0]
    X1 = X[:, :, 1] if X.shape[2] > 1 else X0[:, :0]
    single = mu_T.dtype == np.float32  # float32 storage: float32 scratch and roots (see _vb_pass2)
    if S_q is None:
        S_q, S_valid = np.zeros((3, 0), dtype=mu_T.dtype), False
    if layout is None:
        layout = _no_prior_layout(mu_T.shape[1], block, mu_T.dtype)
    return _vb_pass2(X0, X1, mode, tau, mu_T, obs, Sinv, Sinv_prev, mu_b, mu_b_tau, trace_b, a_tau, nu,
                     float(prior_prec), float(prior_prec_prev), bool(robust), float(relax), bool(single), S_q,
                     bool(S_valid), bool(store_tau), *layout)


def _init_state(prob: Problem, config: Config, dtype) -> VBState:
    """The start: the raters' plain mean for mu_T, tau = 1, b = 0, Sigma_p from
    the residuals around the mean, and q(W) fitted to that mean."""
    kd = prob.kd
    P, N, D = kd.n_raters, kd.n_voxels, kd.dim
    eyes = np.ascontiguousarray(np.broadcast_to(np.eye(D), (P, D, D)))
    mu_T = np.zeros((D, N), dtype=dtype)
    # one Gaussian pass with identity covariances and no bias is the plain mean
    # (a vanishing prior precision keeps unobserved voxels finite, at 0)
    _, _, s2, _, _, glob, _, _ = _run_pass(
        kd.X, kd.mode, np.zeros((P, 0), dtype=dtype), mu_T, np.zeros((D, 0), dtype=dtype), prob.obs, eyes, eyes,
        np.zeros((P, D)), np.zeros((P, D)), np.zeros(P), np.ones(P), np.ones(P), 1e-12, 1e-12, False, G.BLOCK,
    )
    n_obs = prob.n_observed
    Sigma = s2 / n_obs
    scale = max(float(np.trace(Sigma, axis1=1, axis2=2).mean()) / D, 1e-4)
    # a ridge of 1% of the average variance keeps a rater equal to the mean invertible
    Sigma = Sigma + 0.01 * scale * np.eye(D)
    Sigma, _ = G.clip_covariance(Sigma, config.variance_floor)
    mean_sq = float(glob[1 : 1 + D].sum()) / (n_obs * D)
    nu = np.full(P, float(config.nu if config.nu is not None else config.nu_init))
    beta = None
    if config.bias == "prior":
        beta = float(config.beta) if config.beta is not None else 1.0 / (0.1 * scale)
    st = VBState(
        mu_T=mu_T,
        tau=np.ones((P, N), dtype=dtype) if config.robust else None,
        a_tau=(nu + D) / 2,
        mu_b=np.zeros((P, D)),
        S_b=np.zeros((P, D, D)),
        Sigma=Sigma,
        nu=nu,
        beta=beta,
        Sinv_q=G.inv_logdet(Sigma)[0],
        prior_prec_q=0.0,
        W_step=float(config.relax),  # taken from the second iteration on (the first is plain)
    )
    if prob.basis is not None:
        st.sigma_T = float(config.sigma_T) if config.sigma_T is not None else scale
        st.alpha = float(config.alpha) if config.alpha is not None else 1.0 / max(mean_sq, 1e-6)
        grid = mu_T.reshape((D,) + prob.shape)
        # the constant mean starts at the raters' mean level, W at the fluctuation around it
        st.m = mu_T.mean(axis=1, dtype=np.float64)
        z1 = _ones_eig(prob, st)
        st.s_W = 1.0 / (prob.basis.gram_eigenvalues() / st.sigma_T + st.alpha)
        st.v_W = (prob.basis.project_eig(grid) - st.m.reshape((D,) + (1,) * z1.ndim) * z1) * (st.s_W / st.sigma_T)
        st.W_hyper = (st.alpha, st.sigma_T)
        _refresh_prior(prob, st)
        st.prior_prec_q = 1.0 / st.sigma_T
    return st


def iterate(prob: Problem, st: VBState, config: Config, keep_tau: bool = True) -> float:
    """One VB iteration (in place); returns the ELBO after it.

    ``keep_tau`` False (robust model, D = 2): E[tau] is not written
    (``st.tau`` keeps its old values and ``st.tau_stale`` is set); the next
    pass rebuilds q(tau) from mu_T and the kept covariances ``st.S_q``, and
    :func:`solve` stores it in its last iteration. Other models and D > 2
    always store it.

    Order: fused pass [q(tau), q(T~)] -> q(b) -> beta -> Sigma_p -> nu_p ->
    q(W) -> m -> alpha -> Sigma_T -> gauge step (always for the ML bias
    without the spatial prior) -> prior mean. Each step maximises the ELBO
    in its block given the others, or (the over-relaxed mean steps of q(T~)
    and (q(W), m), eq:rt-overrelax) raises it, so the ELBO never decreases.
    """
    kd = prob.kd
    P, D = kd.n_raters, kd.dim
    n_obs = prob.n_observed
    Sinv = G.inv_logdet(st.Sigma)[0]
    trace_b = np.einsum("pij,pji->p", Sinv, st.S_b)
    st.a_tau = (st.nu + D) / 2
    prior_prec = 1.0 / st.sigma_T if prob.basis is not None else 0.0
    if prob.basis is not None and (st.Z is None if D == 2 else st.prior_mean is None):
        _refresh_prior(prob, st)  # freed by _build_result: a state iterated again after its outputs
    pm = st.prior_mean if st.prior_mean is not None else np.zeros((D, 0), dtype=st.mu_T.dtype)
    S_valid = st.S_q is not None
    if config.robust and st.tau_stale and not S_valid:
        raise RuntimeError("robust-t: neither E[tau] nor q(T~)'s covariances are kept; the state cannot be iterated")
    store_tau = keep_tau or not (config.robust and D == 2)
    tau = st.tau if st.tau is not None else np.zeros((P, 0), dtype=st.mu_T.dtype)
    # q(tau) pairs the stored mu_T with the bias it was shifted against (eq:rt-gauge)
    mu_b_tau = st.mu_b if st.T_shift is None else st.mu_b - st.T_shift[None, :]
    args = (kd.X, kd.mode, tau, st.mu_T, pm, prob.obs, Sinv, st.Sinv_q, st.mu_b, np.ascontiguousarray(mu_b_tau),
            trace_b, st.a_tau, st.nu, prior_prec, st.prior_prec_q, bool(config.robust), G.BLOCK,
            float(config.relax) if st.elbo else 1.0)
    if config.robust and D == 2 and st.S_q is None:
        st.S_q = np.empty((D + 1, prob.n_voxels), dtype=st.mu_T.dtype)
    sw, s1, s2, sS, slogc, glob, short_T, sum_T = _run_pass(*args, S_q=st.S_q, S_valid=S_valid, store_tau=store_tau,
                                                             layout=_pass_layout(prob, st) if D == 2 else None)
    # not stored: st.tau is kept as the buffer the last iteration writes (allocating it then
    # would page-fault P x N values in one pass: 0.5-1.5 s on the benchmark machine)
    st.tau_stale = config.robust and not store_tau
    st.Sinv_q, st.prior_prec_q, st.T_shift = Sinv, prior_prec, None
    st.stats = {"sw": sw, "s1": s1, "s2": s2, "sS": sS, "slogc": slogc, "glob": glob, "sum_T": sum_T}

    # q(b) and beta
    if config.bias == "none":
        st.mu_b, st.S_b = np.zeros((P, D)), np.zeros((P, D, D))
    else:
        st.mu_b, st.S_b = _q_b_from_stats(sw, s1, st.Sigma, st.beta if config.bias == "prior" else None)
        if config.bias == "prior" and config.beta is None:
            st.beta = float(update_beta(st.mu_b, st.S_b))
    # Sigma_p: M_p = sum_n tau [ (D~ - mu_T - b)(...)' + S_T + S_b ]
    outer = np.einsum("pi,pj->pij", s1, st.mu_b)
    M = s2 - outer - np.swapaxes(outer, 1, 2) + sw[:, None, None] * (np.einsum("pi,pj->pij", st.mu_b, st.mu_b) + st.S_b) + sS
    st.stats["M"] = M
    Sigma, hits = G.clip_covariance(M / n_obs, config.variance_floor)
    st.Sigma, st.floor_hits = Sigma, st.floor_hits + hits
    # nu_p
    if config.robust and config.nu is None:
        elog = n_obs * special.digamma(st.a_tau) - slogc
        st.nu = update_nu(elog - sw, n_obs, config.nu_bounds)
    wterms = None
    eta = 1.0
    value_W_plain = None
    if prob.basis is not None:
        # over-relaxed (q(W), m) step (eq:rt-overrelax); the first is plain
        eta = st.W_step if (config.relax > 1.0 and st.elbo) else 1.0
        saved = (st.v_W, st.s_W, st.m, st.alpha, st.sigma_T, st.W_hyper)
        wterms = _update_W(prob, st, config, 1.0)
        if eta != 1.0:
            # the plain step's ELBO (for the stop rule), then the over-relaxed step from the
            # same start; both in the eigenbasis with the projection reused
            value_W_plain = _elbo_fast(prob, st, config, wterms)[0]
            plain = (st.v_W, st.s_W, st.m, st.alpha, st.sigma_T, st.W_hyper, wterms)
            st.v_W, st.s_W, st.m, st.alpha, st.sigma_T, st.W_hyper = saved
            wterms = _update_W(prob, st, config, eta, proj=wterms["proj"])
    value, scale = _elbo_fast(prob, st, config, wterms)
    if value_W_plain is not None:
        if eta > 2.0 and value < st.elbo[-1]:
            # beyond 2 the step may lower the block's ELBO: refused, the plain one kept
            st.v_W, st.s_W, st.m, st.alpha, st.sigma_T, st.W_hyper, wterms = plain
            value = value_W_plain
            st.W_rejected += 1
            eta, st.W_step = 1.0, float(config.relax)
        else:
            st.W_step = min(eta * RELAX_GROWTH, RELAX_MAX)
    if prob.basis is not None:
        st.W_relax.append(eta)
    # what the over-relaxed mean steps gave up against plain ones in this iteration's
    # ELBO (the stop rule measures the plain steps' progress: see solve)
    gap = float(short_T) + (0.0 if value_W_plain is None else max(0.0, value_W_plain - value))
    # The ML bias with a flat prior on T~ is only defined up to the common
    # shift (T~ + c, b - c): the gauge step fixes sum_p b_p = 0 whether or not
    # it is asked for (gain 0), with the shift of mu_T left pending.
    if config.gauge_step or (config.bias == "ml" and prob.basis is None):
        value += _gauge_step(prob, st, config, wterms)
    if prob.basis is not None:
        _refresh_prior(prob, st)
    if not np.isfinite(value):
        raise FloatingPointError("robust-t: the ELBO is not finite; the data may be degenerate (e.g. all raters identical)")
    st.elbo.append(value)
    st.relax_gap.append(gap)
    st.rounding.append(ROUNDING * scale)
    return value


#: Growth of the (q(W), m) step's over-relaxation factor (models/robust_t.md (eq:rt-overrelax)) after a step that
#: raised the ELBO, and its cap (steps beyond 2 are checked against the ELBO).
RELAX_GROWTH = 1.5
RELAX_MAX = 8.0


#: Bound on the relative rounding of the recorded ELBO, as a multiple of the
#: sum of the absolute values of the terms it adds (``_elbo_fast``): float64
#: sums of up to ~1e8 per-voxel terms, accumulated per block of G.BLOCK
#: voxels and then over blocks, lose at most (block + blocks) * eps of that
#: sum in the worst case; 1e-12 is about 4500 eps.
ROUNDING = 1e-12


def _settle(st: VBState) -> None:
    """Apply a pending gauge shift to the stored mu_T (before outputs or reference checks)."""
    if st.T_shift is not None:
        st.mu_T -= st.T_shift[:, None].astype(st.mu_T.dtype)
        st.T_shift = None


def _gauge_step(prob: Problem, st: VBState, config: Config, wterms) -> float:
    """Maximise the ELBO along the common shift of biases, consensus and prior mean; returns the gain.

    Moves b_p -> b_p + c for every rater, T~ -> T~ - c at every voxel and
    (with the spatial prior) its constant mean m -> m - c. The likelihood,
    every entropy and E log p(T~ | W, m) are unchanged; only the bias
    prior's term moves, a concave quadratic in c maximised at
    c = -mean_p mu_b (the biases centred). For ML biases the direction is
    flat and the same c fixes the gauge sum_p b_p = 0 (gain 0). The shift of
    mu_T is left pending (``T_shift``): the next pass's q(tau) step reads
    mu_T against mu_b - c as ``mu_b_tau``, and q(T~) is then recomputed
    from scratch.

    References
    ----------
    models/robust_t.md (eq:rt-gauge)
    """
    P = prob.kd.n_raters
    if config.bias == "none":
        return 0.0
    c = -st.mu_b.mean(axis=0)
    gain = 0.5 * P * st.beta * float(c @ c) if config.bias == "prior" else 0.0
    st.mu_b = st.mu_b + c[None, :]
    if prob.basis is not None:
        st.m = st.m - c
    st.T_shift = c if st.T_shift is None else st.T_shift + c
    st.gauge.append(c)
    return gain


def _elbo_fast(prob: Problem, st: VBState, config: Config, wterms) -> tuple[float, float]:
    """The ELBO from the pass's sums and the global parameters (every term).

    Uses Tr(Sigma_p^-1 M_p) for the expected quadratic forms (equal to N D
    after an unclipped Sigma update), and the expanded squares of
    :func:`update_sigma_T` for E log p(T~ | W). Returns the ELBO and the sum
    of the absolute values of the terms it adds (the scale its rounding is
    relative to: the expanded squares cancel to far below their size).
    """
    kd, stats = prob.kd, st.stats
    P, D = kd.n_raters, kd.dim
    n_obs, N = prob.n_observed, prob.n_voxels
    Sinv, logdet = G.inv_logdet(st.Sigma)
    sw, slogc, glob, M = stats["sw"], stats["slogc"], stats["glob"], stats["M"]
    trq = np.einsum("pij,pji->p", Sinv, M)
    if config.robust:
        elog = n_obs * special.digamma(st.a_tau) - slogc
    else:
        elog = np.zeros(P)
    terms = [-0.5 * n_obs * D * LOG2PI - 0.5 * n_obs * logdet, 0.5 * D * elog, -0.5 * trq]
    if config.robust:
        nu, a = st.nu, st.a_tau
        terms += [n_obs * (0.5 * nu * np.log(0.5 * nu) - special.gammaln(0.5 * nu)), (0.5 * nu - 1) * elog, -0.5 * nu * sw,
                  n_obs * (a + special.gammaln(a) + (1 - a) * special.digamma(a)), -slogc]
    if config.bias == "prior":
        beta = st.beta
        terms += [0.5 * D * math.log(beta / (2 * math.pi)) - 0.5 * beta * (np.sum(st.mu_b**2, 1) + np.trace(st.S_b, axis1=1, axis2=2)),
                  0.5 * D * (1 + LOG2PI) + 0.5 * G.inv_logdet(st.S_b)[1]]
    # entropy of q(T~) over every voxel of the grid
    terms += [0.5 * N * D * (1 + LOG2PI), 0.5 * float(glob[0])]
    if prob.basis is not None:
        sT, alpha = st.sigma_T, st.alpha
        s = st.s_W
        L = s.size
        parts = [*wterms["y2_parts"], -2 * wterms["cross"], wterms["quad_W"], glob[1 + D :].sum(), D * wterms["tr_SWG"]]
        terms += [-0.5 * N * D * math.log(2 * math.pi * sT), -0.5 * sum(parts) / sT]
        terms += [D * 0.5 * L * math.log(alpha / (2 * math.pi)) - 0.5 * alpha * (np.sum(st.v_W**2) + D * s.sum())]
        terms += [D * (0.5 * L * (1 + LOG2PI) + 0.5 * np.log(s).sum())]
        terms += [0.5 * abs(x) / sT for x in parts]  # scale only (see below)
        n_scale_only = len(parts)
    else:
        n_scale_only = 0
    vals = [float(np.sum(t)) for t in terms[: len(terms) - n_scale_only]]
    scale = sum(float(np.sum(np.abs(t))) for t in terms)
    return float(sum(vals)), scale


# ------------------------------------------------------------------ solving
def solve(prob: Problem, config: Config, *, max_iter: int = 200, tol: float = 1e-6, progress=None,
          label: str = "robust-t", state: VBState | None = None) -> tuple[VBState, bool, str]:
    """Run the VB iterations until the ELBO increases by at most ``tol`` of its value.

    Converged when -r <= change and change + gap <= tol * |ELBO|, r the
    bound on the ELBO's rounding (``ROUNDING`` times the size of its terms)
    and gap what the iteration's over-relaxed mean steps gave up against
    plain ones (0 for plain coordinate ascent; eq:rt-overrelax): an
    over-relaxed step trades immediate gain for later progress, so its own
    change would stop the run early. A decrease beyond
    r is not convergence: iteration goes on and the largest such decrease is
    kept in ``state.largest_decrease`` (the result's ``/optimizer`` attrs).
    The robust model with D = 2 stores E[tau] in its last iteration only
    (``iterate``'s ``keep_tau``): once the rule is met, one more iteration
    runs to store it, unless that iteration was already the max_iter-th.
    Returns the state, whether it converged, and why it stopped.
    """
    if max_iter < 1:
        raise ConfigError(f"max_iter must be at least 1, got {max_iter}")
    st = state if state is not None else _init_state(prob, config, _storage_dtype(config, prob.kd))
    converged, reason = False, f"max_iter ({max_iter}) reached"
    # BLAS on one thread while iterating: the mode products on the small stack run on
    # get_num_threads() threads of their own (KroneckerBasis.expand_rest_eig, project_rest_eig),
    # and OpenBLAS's idle threads spin after each call, taking the cores from the numba pass
    # that follows (0.40 s against 0.33 s per pass)
    # E[tau] (robust, D = 2) is stored only by the last iteration: the one max_iter makes last,
    # or one more after the stop rule is met (never beyond max_iter)
    final = False
    with bar(f"{label} VB", total=max_iter, progress=progress) as b, threadpool_limits(limits=1, user_api="blas"):
        for i in range(max_iter):
            prev = st.elbo[-1] if st.elbo else None
            t0, c0 = time.perf_counter(), time.process_time()
            value = iterate(prob, st, config, keep_tau=final or i == max_iter - 1)
            st.seconds.append(time.perf_counter() - t0)
            st.cpu_seconds.append(time.process_time() - c0)
            b.advance(info=f"ELBO {value:.8g}")
            if prev is None:
                continue
            change, rounding = value - prev, max(st.rounding[-1], st.rounding[-2] if len(st.rounding) > 1 else 0.0)
            # the over-relaxed steps' own change understates the progress: plain steps' (eq:rt-overrelax)
            gap = st.relax_gap[-1]
            if change < -rounding:
                st.largest_decrease = max(st.largest_decrease, -change)
            elif not final and change + gap <= tol * abs(value):
                converged, reason = True, f"relative ELBO change below tol ({tol:g})"
                final = st.tau_stale  # then one more iteration, which stores E[tau]
                if not final:
                    break
                continue
            if final:
                break
    _settle(st)
    return st, converged, reason


def _check_tau(st: VBState) -> None:
    if st.tau_stale:
        raise RuntimeError("robust-t: E[tau] was not stored by the last iteration (iterate's keep_tau); "
                           "run one more iteration with keep_tau=True")


def S_T_of(prob: Problem, st: VBState, config: Config, dtype=None) -> np.ndarray:
    """The covariances of q(T~), (N, D, D), rebuilt from tau^ and the values q was computed with."""
    D = prob.kd.dim
    out = np.empty((prob.n_voxels, D, D), dtype=dtype or st.mu_T.dtype)
    _check_tau(st)
    tau = st.tau if st.tau is not None else np.zeros((prob.kd.n_raters, 0), dtype=st.mu_T.dtype)
    _S_T_kernel(tau, st.Sinv_q, st.prior_prec_q, prob.obs, bool(config.robust), out, G.BLOCK)
    return out


def _region_of_interest(data: RaterMaps, config: Config):
    """Which voxels the solver sees: ("all",), ("box", slices, obs) or ("voxels", index)."""
    roi = data.roi()
    if roi is None:
        return ("all",)
    if config.spatial_prior:
        idx = np.nonzero(roi)
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
        return ("box", box, roi[box])
    return ("voxels", np.flatnonzero(roi))


def problem_from_data(data: RaterMaps, config: Config):
    """The solver's :class:`Problem` for a subject, and how to put results back on its grid."""
    region = _region_of_interest(data, config)
    if region[0] == "all":
        kd = G.prepare(data, config.link)
        prob = make_problem(kd, config, data.shape, None, data.spacing)
    elif region[0] == "box":
        box, obs = region[1], region[2]
        kd = G.prepare(data, config.link, box=box)
        prob = make_problem(kd, config, obs.shape, obs, data.spacing)
    else:
        kd = G.prepare(data, config.link, voxels=region[1])
        prob = make_problem(kd, config, None, None, data.spacing)
    return prob, region


def _scatter(values: np.ndarray, region, full_shape, fill) -> np.ndarray:
    """Put per-voxel rows (N, ...) of the solver's grid back on the subject's grid."""
    trailing = values.shape[1:]
    if region[0] == "all":
        return values.reshape(tuple(full_shape) + trailing)
    out = np.empty(tuple(full_shape) + trailing, dtype=values.dtype)
    out[...] = fill
    if region[0] == "box":
        box, obs = region[1], region[2].astype(bool)
        sub = values.reshape(obs.shape + trailing)
        view = out[box]
        view[obs] = sub[obs]
    else:
        out.reshape((-1,) + trailing)[region[1]] = values
    return out


def _scatter_first(values: np.ndarray, region, full_shape, fill) -> np.ndarray:
    """Class- or rater-first rows (C, N) back on the subject's grid, (C, *shape).

    A view when the solver saw the whole grid (no copy of tau or mu_T).
    """
    C = values.shape[0]
    if region[0] == "all":
        return values.reshape((C,) + tuple(full_shape))
    fill = np.broadcast_to(np.asarray(fill, dtype=values.dtype), (C,))
    out = np.empty((C,) + tuple(full_shape), dtype=values.dtype)
    for c in range(C):
        out[c] = _scatter(values[c], region, full_shape, fill[c])
    return out


def fit(
    data: RaterMaps,
    config: Config | None = None,
    *,
    max_iter: int = 200,
    tol: float = 1e-6,
    random_seed=None,
    progress: bool | None = None,
    method: str | None = None,
) -> FusionResult:
    """Fuse the raters' maps with the robust model (or its variants) by VB.

    Parameters
    ----------
    data : RaterMaps
        Probability maps (binary masks and labels are read as one-hot
        probabilities; convert them first with ``to_prob`` for the paper's
        log-odds maps).
    config : Config, optional
    max_iter : int
        Maximum number of VB iterations.
    tol : float
        Stop when the relative ELBO change is below this.
    random_seed : optional
        Unused by the solver (it is deterministic: the start is the raters'
        mean); accepted for the common contract.
    progress : bool, optional
    method : str, optional
        The registry name recorded in the result (default from the config).

    Returns
    -------
    FusionResult
        ``/consensus``: F^-1(mu_T) (background outside the ROI);
        ``/maps``: ``consensus_sd`` (posterior sd of the consensus
        probability, foreground for K = 2) and ``tau`` (E[tau], rater last;
        Student-t only); ``/raters``: bias, covariance, sd, nu, mean_tau;
        ``/variational``: mu_T, S_T, mu_b, S_b, tau's Gamma (shape and mean),
        mu_W, s_W and the hyperparameters; ``/optimizer``: the ELBO.
    """
    config = config or Config()
    method = method or _default_name(config)
    t0 = time.perf_counter()
    prob, region = problem_from_data(data, config)
    st, converged, reason = solve(prob, config, max_iter=max_iter, tol=tol, progress=progress, label=method)
    return _build_result(data, config, prob, region, st, converged, reason, method, time.perf_counter() - t0)


def _default_name(config: Config) -> str:
    if config.bias == "ml" and not config.spatial_prior and not config.robust:
        return "continuous-staple"
    return "robust-t" if config.robust else "gaussian"


def _background_coords(space: G.LinkSpace) -> np.ndarray:
    e0 = np.zeros(space.n_classes)
    e0[0] = 1.0
    return space.forward(e0)


def _build_result(data, config, prob, region, st, converged, reason, method, seconds) -> FusionResult:
    kd, space = prob.kd, prob.kd.space
    P, D, K = kd.n_raters, kd.dim, space.n_classes
    shape, sdims = data.shape, data.spatial_dims
    _settle(st)
    _check_tau(st)  # before anything is freed: a stale state can still be iterated
    coords = space.coord_labels()
    # not needed any more: freed before the outputs are made
    st.prior_mean = st.Z = st.proj_T = None
    st.S_q = None  # rebuilt by S_T_of for the outputs
    S_T = S_T_of(prob, st, config, np.float32)
    bg = _background_coords(space)
    mu_full = _scatter_first(st.mu_T.astype(np.float32, copy=False), region, shape, bg)
    S_full = _scatter(S_T, region, shape, 0.0)
    del S_T
    prob_map = G.inverse_link_map(mu_full.reshape(D, -1), space).reshape(shape + (K,))
    sd = _consensus_sd(mu_full.reshape(D, -1), S_full.reshape(-1, D, D), space, int(config.sd_nodes)).reshape(shape + (-1,))
    maps = {"consensus_sd": (sdims, sd[..., 0]) if K == 2 else (sdims + ("class",), sd)}
    n_obs = prob.n_observed
    sw = st.stats["sw"]
    raters = {
        "bias": (("rater", "class"), st.mu_b),
        "covariance": (("rater", "class", "class2"), st.Sigma),
        "sd": ("rater", np.sqrt(np.trace(st.Sigma, axis1=1, axis2=2) / D)),
    }
    variational = {
        "mu_T": (("class",) + sdims, mu_full),
        "S_T": (sdims + ("class", "class2"), S_full),
        "mu_b": (("rater", "class"), st.mu_b),
        "S_b": (("rater", "class", "class2"), st.S_b),
        "Sigma": (("rater", "class", "class2"), st.Sigma),
    }
    if config.robust:
        tau = _scatter_first(st.tau.astype(np.float32, copy=False), region, shape, 1.0)
        maps["tau"] = (("rater",) + sdims, tau)
        raters["nu"] = ("rater", st.nu)
        raters["mean_tau"] = ("rater", sw / n_obs)
        raters["mean_tau_contested"] = ("rater", _contested_tau(kd, st, prob))
        variational["tau_shape"] = ("rater", st.a_tau)
        variational["tau_mean"] = (("rater",) + sdims, tau)
        variational["nu"] = ("rater", st.nu)
    hyper = {}
    if st.beta is not None:
        hyper["beta"] = st.beta
    if prob.basis is not None:
        bdims = tuple(f"basis_{d}" for d in sdims)
        variational["mu_W"] = (("class",) + bdims, mu_W_of(prob, st))
        variational["s_W"] = (bdims, st.s_W)
        variational["m"] = (("class",), st.m)
        hyper.update(alpha=st.alpha, sigma_T=st.sigma_T, W_alpha=st.W_hyper[0], W_sigma_T=st.W_hyper[1])
    for k, v in hyper.items():
        variational[k] = ((), float(v))
    var_ds = xr.Dataset(variational, coords={"class": coords, "class2": coords})
    var_ds.attrs.update(
        link=config.link,
        likelihood=config.likelihood,
        grid_shape=list(prob.shape) if prob.basis is not None else [],
        box_start=[s.start for s in region[1]] if region[0] == "box" else [],
        n_observed=int(n_obs),
        floor_hits=int(st.floor_hits),
    )
    rat_ds = xr.Dataset(raters, coords={"class": coords, "class2": coords})
    result = FusionResult.build(
        method=method,
        data=data,
        config=config,
        probability=_background_outside(prob_map, data.roi()),
        variational=var_ds,
        raters=rat_ds,
        maps=xr.Dataset(maps),
        objective=np.asarray(st.elbo),
        objective_name="ELBO",
        converged=converged,
        stop_reason=reason,
        seconds=seconds,
        attrs={"link": config.link, "likelihood": config.likelihood},
    )
    opt = result.tree["optimizer"].to_dataset()
    opt = opt.assign(
        iteration_seconds=("iteration", np.asarray(st.seconds, dtype=float)),
        iteration_cpu_seconds=("iteration", np.asarray(st.cpu_seconds, dtype=float)),
        elbo_rounding=("iteration", np.asarray(st.rounding, dtype=float)),
    )
    if st.W_relax:
        # the (q(W), m) step's over-relaxation factor per iteration (eq:rt-overrelax)
        opt = opt.assign(relax_W=("iteration", np.asarray(st.W_relax, dtype=float)))
    if st.relax_gap:
        opt = opt.assign(relax_gap=("iteration", np.asarray(st.relax_gap, dtype=float)))
    opt.attrs["largest_decrease"] = float(st.largest_decrease)
    opt.attrs["relax"] = float(config.relax)
    opt.attrs["relax_W_refused"] = int(st.W_rejected)
    result.tree["optimizer"] = xr.DataTree(opt)
    return result


def _contested_tau(kd: G.KernelData, st: VBState, prob: Problem, tol: float = 1e-3, chunk: int = 1 << 20) -> np.ndarray:
    """Mean E[tau] per rater over the contested voxels: those where the raters' maps differ by more than ``tol``.

    Where every rater gives the same map (most of the background of binary
    masks) tau^ is high for all; this summary compares raters where it matters.
    """
    P, N = kd.n_raters, kd.n_voxels
    total = np.zeros(P)
    count = 0
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        x = kd.X[:, s:e]
        contested = (x.max(axis=0) - x.min(axis=0)).max(axis=-1) > tol
        if prob.obs.size:
            contested &= prob.obs[s:e].astype(bool)
        total += st.tau[:, s:e].sum(axis=1, where=contested[None], dtype=np.float64)
        count += int(contested.sum())
    return total / count if count else np.full(P, np.nan)


def _consensus_sd(mu: np.ndarray, S: np.ndarray, space: G.LinkSpace, n_nodes: int, chunk: int = 1 << 20) -> np.ndarray:
    """Posterior sd of the consensus probability, (N, 1) foreground for K = 2 else (N, K).

    By chunks of voxels, so that the summaries' temporaries stay small.
    """
    N = mu.shape[1]
    K = space.n_classes
    out = np.empty((N, 1 if K == 2 else K), np.float32)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        summ = G.probability_summaries(mu[:, s:e].T, S[s:e], space, method="quadrature", mass=None, n_nodes=n_nodes)
        out[s:e] = summ["consensus_sd"][:, 1:2] if K == 2 else summ["consensus_sd"]
    return out


def _background_outside(prob: np.ndarray, roi) -> np.ndarray:
    if roi is not None:
        prob[~roi] = 0.0
        prob[~roi, 0] = 1.0
    return prob


# ------------------------------------------------------- reference ELBO (dense)
def dense_q(prob: Problem, st: VBState, config: Config) -> dict:
    """The state in plain dense arrays (small problems): the input of :func:`elbo_reference`."""
    kd = prob.kd
    P, N, D = kd.n_raters, kd.n_voxels, kd.dim
    _settle(st)
    q = {
        "mu_T": st.mu_T.astype(np.float64),
        "S_T": S_T_of(prob, st, config, np.float64),
        "mu_b": st.mu_b.copy(),
        "S_b": st.S_b.copy(),
    }
    if config.robust:
        q["a"] = np.broadcast_to(st.a_tau[:, None], (P, N)).copy()
        _check_tau(st)
        q["c"] = q["a"] / st.tau.astype(np.float64)
    if prob.basis is not None:
        Ud = np.ones((1, 1))
        for U in prob.basis.U:
            Ud = np.kron(Ud, U)
        q["mu_W"] = mu_W_of(prob, st).reshape(D, -1)
        q["S_W"] = (Ud * st.s_W.reshape(-1)) @ Ud.T
    return q


def hyper_of(st: VBState) -> dict:
    """The point-estimated hyperparameters of a state."""
    return {"Sigma": st.Sigma.copy(), "nu": st.nu.copy(), "beta": st.beta, "alpha": st.alpha, "sigma_T": st.sigma_T,
            "m": None if st.m is None else st.m.copy()}


def elbo_reference(Dt: np.ndarray, q: dict, hyper: dict, config: Config, Phi: np.ndarray | None = None,
                   observed: np.ndarray | None = None) -> float:
    """The ELBO written out term by term with dense arrays (small problems).

    Independent of the solver's fused sums; the tests maximise it block by
    block numerically and compare with the closed-form updates.

    Parameters
    ----------
    Dt : ndarray (P, N, D)
        Link coordinates of the data.
    q : dict
        ``mu_T`` (D, N), ``S_T`` (N, D, D), ``mu_b`` (P, D), ``S_b`` (P, D, D);
        Student-t: ``a``, ``c`` (P, N), the Gamma shape and rate of each
        q(tau[n, p]); spatial prior: ``mu_W`` (D, L), ``S_W`` (L, L).
    hyper : dict
        ``Sigma`` (P, D, D), ``nu`` (P,), ``beta``, ``alpha``, ``sigma_T``,
        ``m`` (D,) (the spatial prior's constant mean; zero if absent).
    config : Config
    Phi : ndarray (N, L), optional
        Dense basis matrix (spatial prior).
    observed : ndarray of bool (N,), optional

    References
    ----------
    models/robust_t.md (eq:rt-elbo)
    """
    P, N, D = Dt.shape
    obs = np.ones(N, bool) if observed is None else np.asarray(observed, bool)
    Sigma = hyper["Sigma"]
    Sinv, logdet = G.inv_logdet(Sigma)
    mu_T, S_T, mu_b, S_b = q["mu_T"], q["S_T"], q["mu_b"], q["S_b"]
    e = Dt - mu_T.T[None] - mu_b[:, None]
    quad = np.einsum("pni,pij,pnj->pn", e, Sinv, e) + np.einsum("pij,nji->pn", Sinv, S_T) + np.einsum("pij,pji->p", Sinv, S_b)[:, None]
    if config.robust:
        a, c = q["a"], q["c"]
        Et, Elog = a / c, special.digamma(a) - np.log(c)
    else:
        Et, Elog = np.ones((P, N)), np.zeros((P, N))
    lik = -0.5 * D * LOG2PI - 0.5 * logdet[:, None] + 0.5 * D * Elog - 0.5 * Et * quad
    val = float(lik[:, obs].sum())
    if config.robust:
        nu = hyper["nu"][:, None]
        ptau = 0.5 * nu * np.log(0.5 * nu) - special.gammaln(0.5 * nu) + (0.5 * nu - 1) * Elog - 0.5 * nu * Et
        htau = a - np.log(c) + special.gammaln(a) + (1 - a) * special.digamma(a)
        val += float((ptau + htau)[:, obs].sum())
    if config.bias == "prior":
        beta = hyper["beta"]
        val += float(np.sum(0.5 * D * np.log(beta / (2 * np.pi)) - 0.5 * beta * (np.sum(mu_b**2, 1) + np.trace(S_b, axis1=1, axis2=2))))
        val += float(np.sum(0.5 * D * (1 + LOG2PI) + 0.5 * np.linalg.slogdet(S_b)[1]))
    val += float(np.sum(0.5 * D * (1 + LOG2PI) + 0.5 * np.linalg.slogdet(S_T)[1]))
    if config.spatial_prior:
        sT, alpha = hyper["sigma_T"], hyper["alpha"]
        mu_W, S_W = q["mu_W"], q["S_W"]
        L = S_W.shape[0]
        m0 = hyper.get("m")
        m = mu_W @ Phi.T + (0.0 if m0 is None else np.asarray(m0, float)[:, None])  # (D, N)
        spread = np.einsum("nl,lm,nm->n", Phi, S_W, Phi)
        sq = (mu_T - m) ** 2 + np.diagonal(S_T, axis1=1, axis2=2).T + spread[None]
        val += float(np.sum(-0.5 * np.log(2 * np.pi * sT) - 0.5 * sq / sT))
        val += float(np.sum(0.5 * L * np.log(alpha / (2 * np.pi)) - 0.5 * alpha * (np.sum(mu_W**2, 1) + np.trace(S_W))))
        val += D * (0.5 * L * (1 + LOG2PI) + 0.5 * np.linalg.slogdet(S_W)[1])
    return val


# --------------------------------------------------------------- simulation
def default_hyper(link: str, n_raters: int, dim: int, rng: np.random.Generator) -> dict:
    """Hyperparameters for :func:`simulate`, on the scale of the link's coordinates."""
    scale = 0.06 if link == "sqrt" else 0.4  # typical rater noise sd in link units
    sds = scale * rng.uniform(0.6, 1.6, size=n_raters)
    corr = rng.uniform(-0.3, 0.3, size=n_raters)
    Sigma = np.empty((n_raters, dim, dim))
    for p in range(n_raters):
        C = np.full((dim, dim), corr[p]) + (1 - corr[p]) * np.eye(dim)
        Sigma[p] = sds[p] ** 2 * C
    nu_choices = np.array([2.5, 4.0, 8.0, 30.0])
    return {
        "Sigma": Sigma,
        "nu": nu_choices[np.arange(n_raters) % nu_choices.size],
        "beta": 1.0 / (0.5 * scale) ** 2,
        "alpha": 1.0 / (0.6 if link == "sqrt" else 3.0) ** 2,
        "sigma_T": (0.3 * scale) ** 2,
    }


def simulate(config: Config | None = None, shape=(32, 32), n_raters: int = 5, random_seed=None, *,
             n_classes: int = 2, hyper: dict | None = None):
    """Draw a subject from the model's own generative story.

    W_k ~ N(0, I / alpha); T~[n] ~ N(W Phi_n, Sigma_T I); b_p ~ N(0, I / beta)
    (centred to sum_p b_p = 0 for ``bias="ml"``, zero for ``"none"``);
    tau[n,p] ~ Gamma(nu_p / 2, nu_p / 2) (1 for the Gaussian model);
    D~[p,n] ~ N(T~[n] + b_p, Sigma_p / tau[n,p]). With ``spatial_prior=False``
    the flat prior cannot be drawn from, and T~ is still drawn from the
    spatial story (any T~ is a valid truth then).

    Parameters
    ----------
    config : Config, optional
    shape : tuple of int
        Spatial shape (2-D or 3-D).
    n_raters : int
    random_seed : optional
    n_classes : int
    hyper : dict, optional
        Overrides of :func:`default_hyper` (``Sigma``, ``nu``, ``beta``,
        ``alpha``, ``sigma_T``).

    Returns
    -------
    data : RaterMaps
        F^-1(D~): the raters' probability maps (exact for logit within
        the link's clipping; for sqrt the sign and norm of D~ are lost, so
        use ``truth["coords"]`` with :func:`bayesfuse.gaussian.from_coords`
        to fit the drawn link coordinates themselves).
    truth : dict
        ``coords`` (P, N, D), ``T`` (D, N), ``probability`` (*shape, K),
        ``b``, ``tau``, ``W``, and the hyperparameters.
    """
    config = config or Config()
    rng = np.random.default_rng(random_seed)
    space = G.link_space(config.link, n_classes)
    D, P = space.dim, int(n_raters)
    shape = tuple(int(s) for s in shape)
    N = int(np.prod(shape))
    h = default_hyper(config.link, P, D, rng)
    h.update(hyper or {})
    h["Sigma"] = np.asarray(h["Sigma"], float)
    h["nu"] = np.broadcast_to(np.asarray(h["nu"], float), (P,)).copy()
    basis = KroneckerBasis.create(shape, config.basis_spacing, config.basis_width, config.basis_origin, units="voxel")
    W = rng.normal(0, 1 / math.sqrt(h["alpha"]), size=(D,) + basis.basis_shape)
    T = np.stack([basis.expand(W[d]).reshape(-1) for d in range(D)])
    T += rng.normal(0, math.sqrt(h["sigma_T"]), size=T.shape)
    if config.bias == "none":
        b = np.zeros((P, D))
    else:
        b = rng.normal(0, 1 / math.sqrt(h["beta"]), size=(P, D))
        if config.bias == "ml":
            b -= b.mean(axis=0)
    tau = rng.gamma(h["nu"][:, None] / 2, 2 / h["nu"][:, None], size=(P, N)) if config.robust else np.ones((P, N))
    Lc = np.linalg.cholesky(h["Sigma"])
    eps = np.einsum("pij,pnj->pni", Lc, rng.normal(size=(P, N, D))) / np.sqrt(tau)[..., None]
    coords = T.T[None] + b[:, None] + eps
    probs = space.inverse(coords).reshape((P,) + shape + (n_classes,)).astype(np.float32)
    if n_classes == 2:
        data = RaterMaps.from_arrays(probs[..., 1], kind="probability")
    else:
        data = RaterMaps.from_arrays(probs, kind="probability", class_axis=True)
    truth = {
        "coords": coords, "T": T, "probability": space.inverse(T.T).reshape(shape + (n_classes,)),
        "b": b, "tau": tau, "W": W, **h,
    }
    return data, truth


# ------------------------------------------------------------- PyMC model
def fixed_from_result(result: FusionResult) -> dict:
    """The point-estimated hyperparameters of a VB result, to pin in :func:`build_model`.

    Returns ``Sigma`` (P, D, D), ``nu`` (P,) (Student-t), ``beta``
    (bias prior), ``alpha``, ``sigma_T`` and ``m`` (D,) (spatial prior), and ``b``
    (P, D) for maximum-likelihood biases (a parameter, not a latent
    variable, in that variant).
    """
    var = result.group("variational")
    cfg = result.config
    out = {"Sigma": var["Sigma"].values.astype(float)}
    if cfg.get("likelihood", "student-t") == "student-t":
        out["nu"] = var["nu"].values.astype(float)
    for k in ("beta", "alpha", "sigma_T"):
        if k in var:
            out[k] = float(var[k].values)
    if "m" in var:
        out["m"] = var["m"].values.astype(float)
    if cfg.get("bias") == "ml":
        out["b"] = var["mu_b"].values.astype(float)
    return out


def _config_of(result: FusionResult) -> Config:
    cfg = dict(result.config)
    for k in ("basis_spacing", "basis_width", "basis_origin", "nu_bounds"):
        if isinstance(cfg.get(k), list):
            cfg[k] = tuple(cfg[k])
    return Config(**cfg)


def bias_weights(Sigma: np.ndarray) -> np.ndarray:
    """Precision weights A_p = (sum_q Sigma_q^-1)^-1 Sigma_p^-1 (P, D, D), summing to I:
    ``build_model(bias_form="mean-split")``'s consensus as the raters see it is T~ + sum_p A_p b_p."""
    prec = np.linalg.inv(np.asarray(Sigma, float))
    return np.linalg.solve(prec.sum(axis=0)[None], prec)


def build_model(data: RaterMaps, config: Config | None = None, hyper: str = "fixed", fixed: dict | None = None,
                *, tau: str = "explicit", bias_form: str = "raters", whiten: bool = False):
    """The declarative PyMC model of (eq:rt-model), dims ``rater``, ``class``, x, y(, z).

    Parameters
    ----------
    data : RaterMaps
        A small (downsampled) subject: NUTS samples one T~ and, for the
        Student-t, one tau per rater and voxel. A region of interest is not
        supported here (crop instead).
    config : Config, optional
    hyper : {"fixed", "prior"}
        ``"fixed"`` pins Sigma_p, nu_p, beta, alpha, Sigma_T, the spatial
        prior's mean m (and the ML biases of ``continuous-staple``) at
        ``fixed``, so that NUTS samples exactly the posterior the VB
        approximates. ``"prior"`` puts weak priors on them instead: LKJ
        (eta = 2) with half-normal scales on each Sigma_p, Gamma(2, 0.1) on
        nu_p, Gamma(1, 1e-3)-like weak priors on the precisions beta and
        alpha, a half-normal on sqrt(Sigma_T), a flat prior on m (as in the
        solver, where m is a point estimate under a flat prior).
    fixed : dict, optional
        Values for ``hyper="fixed"`` (see :func:`fixed_from_result`);
        default: those of a VB fit of ``data`` with ``config``.
    tau : {"explicit", "marginal"}
        Student-t written as the Gaussian scale mixture with tau[n, p] ~
        Gamma(nu/2, nu/2) explicit (the paper's graphical model), or with tau
        integrated out (``pm.MvStudentT``).
    bias_form : {"raters", "mean-split"}
        How the bias prior b_p ~ N(0, I / beta) is written (the same
        posterior either way). ``"raters"``: ``b`` free, one per rater.
        ``"mean-split"``: b = b_mean + b_dev with ``b_mean`` ~ N(0, I /
        (P beta)) and ``b_dev`` (class, rater) ~ ZeroSumNormal(1 / sqrt(beta))
        over raters (the distribution of b_p - mean_p b_p for iid b_p,
        independent of the mean), and T~ = V - sum_p A_p b_p with ``V`` free:
        the consensus as the raters see it, through the precision weights
        A_p = (sum_q Sigma_q^-1)^-1 Sigma_p^-1 (``hyper="fixed"``; A_p = I / P
        under ``"prior"``), which sum to I, so T~ = V - b_mean - sum_p A_p
        b_dev_p. The data pin V and b_dev; the common shift (T~ + c, b - c)
        of the ``"raters"`` form, a ridge that NUTS's diagonal mass matrix
        crosses slowly, becomes the single variable ``b_mean``, and a rater
        far more precise than the rest no longer ties every voxel to its
        own bias. A linear change of variables with a constant Jacobian.
        ``T`` and ``b`` are then deterministics with the same names and
        dims. Only with ``bias="prior"``.
    whiten : bool
        With ``bias_form="mean-split"``, the spatial prior and
        ``hyper="fixed"``: per link coordinate, (W_k, b_mean_k) = R^-T z_k
        with R R' = Lambda = diag(alpha I_L, P beta) + G'G / Sigma_T,
        G = [Phi, 1], the precision of their posterior given V; the free
        variable ``Wb_white`` (class, basis_all) then has an identity conditional
        covariance (overlapping bases and the shared constant of Phi W and
        b_mean no longer correlate the coordinates NUTS moves in). Their
        prior is a ``pm.Potential`` (``W_prior``) on a flat z; ``W`` and
        ``b_mean`` are deterministics. Linear, constant Jacobian.

    Returns
    -------
    pymc.Model
        Free variables ``T`` (x, y[, z], class), ``b`` (rater, class),
        ``tau`` (rater, x, y[, z]), ``W`` (class, basis_x, basis_y[, basis_z]);
        the observed link coordinates ``D_obs``.

    References
    ----------
    models/robust_t.md (eq:rt-model)
    """
    import pymc as pm
    import pytensor.tensor as pt

    config = config or Config()
    if hyper not in ("fixed", "prior"):
        raise ConfigError(f"hyper must be 'fixed' or 'prior', not {hyper!r}")
    if tau not in ("explicit", "marginal"):
        raise ConfigError(f"tau must be 'explicit' or 'marginal', not {tau!r}")
    if bias_form not in ("raters", "mean-split"):
        raise ConfigError(f"bias_form must be 'raters' or 'mean-split', not {bias_form!r}")
    split = bias_form == "mean-split" and config.bias == "prior"
    if bias_form == "mean-split" and not split:
        raise ConfigError("bias_form='mean-split' needs the bias prior (bias='prior')")
    if whiten and not (split and config.spatial_prior and hyper == "fixed"):
        raise ConfigError("whiten needs bias_form='mean-split', the spatial prior and hyper='fixed'")
    if data.roi() is not None:
        raise InputError("mask", "the PyMC form of robust-t takes the whole grid; crop to the region of interest instead")
    kd = G.prepare(data, config.link)
    space = kd.space
    P, D = kd.n_raters, kd.dim
    sdims, shape = data.spatial_dims, data.shape
    Dt = kd.coords().reshape((P,) + shape + (D,))
    if hyper == "fixed" and fixed is None:
        fixed = fixed_from_result(fit(data, config, progress=False))
    coords = {"rater": data.rater_names, "class": space.coord_labels(), "class2": space.coord_labels()}
    coords.update({d: np.arange(s) for d, s in zip(sdims, shape)})
    basis = None
    if config.spatial_prior:
        basis = KroneckerBasis.create(shape, config.basis_spacing, config.basis_width, config.basis_origin,
                                      voxel_size=data.spacing, units=config.basis_units)
        coords.update({f"basis_{d}": np.arange(n) for d, n in zip(sdims, basis.basis_shape)})
    robust = config.robust
    with pm.Model(coords=coords) as model:
        D_data = pm.Data("D_link", Dt, dims=("rater",) + sdims + ("class",))
        if hyper == "fixed":
            Sigma = pt.as_tensor(np.asarray(fixed["Sigma"], float))
            chol = pt.as_tensor(np.linalg.cholesky(np.asarray(fixed["Sigma"], float)))
            nu = pt.as_tensor(np.asarray(fixed["nu"], float)) if robust else None
            beta = fixed.get("beta")
            alpha = fixed.get("alpha")
            sigma_T = fixed.get("sigma_T")
            m_mean = pt.as_tensor(np.asarray(fixed.get("m", np.zeros(D)), float)) if basis is not None else None
        else:
            chols = []
            for p in range(P):
                if D == 1:
                    c = pm.HalfNormal(f"Sigma_sd_{p}", 1.0).reshape((1, 1))
                else:
                    c, _, _ = pm.LKJCholeskyCov(f"Sigma_chol_{p}", n=D, eta=2.0, sd_dist=pm.HalfNormal.dist(1.0), compute_corr=True)
                chols.append(c)
            chol = pt.stack(chols)
            Sigma = pm.Deterministic("Sigma", chol @ chol.transpose(0, 2, 1), dims=("rater", "class", "class2"))
            nu = pm.Gamma("nu", 2.0, 0.1, dims="rater") if robust else None
            beta = pm.Gamma("beta", 1.0, 1e-3) if config.bias == "prior" else None
            alpha = pm.Gamma("alpha", 1.0, 1e-3) if basis is not None else None
            sigma_T = pm.HalfNormal("sigma_T_sd", 1.0) ** 2 if basis is not None else None
            m_mean = pm.Flat("m", dims="class") if basis is not None else None
        # consensus in link space
        wdims = ("class",) + tuple(f"basis_{d}" for d in sdims)
        if whiten:
            L = basis.n_basis
            Phi_np = basis.dense()
            G1 = np.hstack([Phi_np, np.ones((Phi_np.shape[0], 1))])
            prior_prec = np.r_[np.full(L, float(alpha)), P * float(beta)]
            R = np.linalg.cholesky(np.diag(prior_prec) + G1.T @ G1 / float(sigma_T))
            model.add_coord("basis_all", np.arange(L + 1))
            z = pm.Flat("Wb_white", dims=("class", "basis_all"))
            theta = pt.as_tensor(np.linalg.inv(R).T) @ z.T  # (L + 1, D): R^-T z_k per coordinate
            W = pm.Deterministic("W", theta[:L].T.reshape((D,) + basis.basis_shape), dims=wdims)
            b_mean = pm.Deterministic("b_mean", theta[L], dims="class")
            pm.Potential("W_prior", pm.logp(pm.Normal.dist(0.0, 1.0 / np.sqrt(float(alpha))), W).sum()
                         + pm.logp(pm.Normal.dist(0.0, 1.0 / np.sqrt(P * float(beta))), b_mean).sum())
            Phi = pt.as_tensor(Phi_np)
        elif basis is not None:
            L = basis.n_basis
            W = pm.Normal("W", 0.0, 1.0 / pt.sqrt(alpha), dims=wdims)
            Phi = pt.as_tensor(basis.dense())  # small grids only (the PyMC form is for downsampled data)
        if basis is not None:
            mean = ((W.reshape((D, L)) @ Phi.T).T + m_mean[None, :]).reshape(shape + (D,))
        if split:
            # T~ = V - sum_p A_p b_p, b = b_mean + b_dev (linear, constant Jacobian)
            if not whiten:
                b_mean = pm.Normal("b_mean", 0.0, 1.0 / pt.sqrt(P * beta), dims="class")
            # ZeroSumNormal sums to zero over its last axis(es): raters last
            b_dev = pm.ZeroSumNormal("b_dev", sigma=1.0 / pt.sqrt(beta), dims=("class", "rater"), n_zerosum_axes=1)
            A = pt.as_tensor(bias_weights(fixed["Sigma"]) if hyper == "fixed" else np.broadcast_to(np.eye(D) / P, (P, D, D)))
            seen = b_mean + pt.sum(A @ b_dev.T[:, :, None], axis=0)[:, 0]  # sum_p A_p b_p
            if basis is not None:
                V = pm.Normal("V", mean + seen, pt.sqrt(sigma_T), dims=sdims + ("class",))
            else:
                V = pm.Flat("V", dims=sdims + ("class",))
            T = pm.Deterministic("T", V - seen, dims=sdims + ("class",))
        elif basis is not None:
            T = pm.Normal("T", mean, pt.sqrt(sigma_T), dims=sdims + ("class",))
        else:
            T = pm.Flat("T", dims=sdims + ("class",))
        # biases
        if split:
            b = pm.Deterministic("b", b_mean[None, :] + b_dev.T, dims=("rater", "class"))
        elif config.bias == "prior":
            b = pm.Normal("b", 0.0, 1.0 / pt.sqrt(beta), dims=("rater", "class"))
        elif config.bias == "ml":
            # without a prior the biases are only defined up to a common shift:
            # pinned (fixed) or given a weak prior on the sum-zero gauge
            if hyper == "fixed":
                b = pt.as_tensor(np.asarray(fixed["b"], float))
            else:
                # ZeroSumNormal sums to zero over its last axis: raters last, then transposed
                b_ml = pm.ZeroSumNormal("b_ml", sigma=10.0, dims=("class", "rater"), n_zerosum_axes=1)
                b = pm.Deterministic("b", b_ml.T, dims=("rater", "class"))
        else:
            b = pt.zeros((P, D))
        bexp = b.reshape((P,) + (1,) * len(shape) + (D,))
        mu = T[None] + bexp
        cexp = chol.reshape((P,) + (1,) * len(shape) + (D, D))
        if robust and tau == "explicit":
            nexp = nu.reshape((P,) + (1,) * len(shape))
            tau_rv = pm.Gamma("tau", nexp / 2, nexp / 2, dims=("rater",) + sdims)
            pm.MvNormal("D_obs", mu=mu, chol=cexp / pt.sqrt(tau_rv)[..., None, None], observed=D_data,
                        dims=("rater",) + sdims + ("class",))
        elif robust:
            nexp = nu.reshape((P,) + (1,) * len(shape))
            pm.MvStudentT("D_obs", nu=nexp, mu=mu, scale=Sigma.reshape((P,) + (1,) * len(shape) + (D, D)),
                          observed=D_data, dims=("rater",) + sdims + ("class",))
        else:
            pm.MvNormal("D_obs", mu=mu, chol=cexp, observed=D_data, dims=("rater",) + sdims + ("class",))
    return model


def posterior_draws(result: FusionResult, n: int = 1000, region=None, random_seed=None) -> xr.DataTree:
    """Draws from q with ``chain`` (1) and ``draw`` dims, named and shaped as in :func:`build_model`.

    ``T`` (spatial, class) ~ N(mu_T, S_T) per voxel; ``tau`` (rater, spatial)
    ~ Gamma(a, a / E[tau]) (Student-t); ``b`` (rater, class) ~ N(mu_b, S_b)
    (bias prior); ``W`` (class, basis dims) ~ N(mu_W, S_W), S_W in its
    Kronecker eigenbasis. Independent across factors, as q is.

    Parameters
    ----------
    result : FusionResult
    n : int
        Number of draws.
    region : dict {dim: slice} or tuple of slices, optional
        Spatial sub-box for T and tau (draws of a whole volume are large).
    random_seed : optional
    """
    rng = np.random.default_rng(random_seed)
    var = result.group("variational")
    sdims = result.spatial_dims
    if region is None:
        sel = {}
    elif isinstance(region, dict):
        sel = dict(region)
    else:
        sel = dict(zip(sdims, region))
    mu = var["mu_T"].isel(sel).transpose(*sdims, "class")
    S = var["S_T"].isel(sel).transpose(*sdims, "class", "class2").values.astype(float)
    D = mu.sizes["class"]
    Lc = np.linalg.cholesky(S + 1e-30 * np.eye(D))  # outside the ROI S_T = 0: a point mass
    z = rng.standard_normal((n,) + mu.shape)
    T = mu.values[None] + np.einsum("...ij,n...j->n...i", Lc, z)
    post = {"T": (("chain", "draw") + sdims + ("class",), T[None])}
    coords = {d: mu[d].values for d in mu.dims}
    if "tau_shape" in var:
        a = var["tau_shape"].values
        m = var["tau_mean"].isel(sel).transpose("rater", *sdims).values.astype(float)
        shape_a = a.reshape((-1,) + (1,) * len(sdims))
        tau = rng.gamma(shape_a, m / shape_a, size=(n,) + m.shape)
        post["tau"] = (("chain", "draw", "rater") + sdims, tau[None])
    cfg = result.config
    if cfg.get("bias", "prior") == "prior":
        Lb = np.linalg.cholesky(var["S_b"].values)
        b = var["mu_b"].values[None] + np.einsum("pij,npj->npi", Lb, rng.standard_normal((n,) + var["mu_b"].shape))
        post["b"] = (("chain", "draw", "rater", "class"), b[None])
    if "mu_W" in var:
        config = _config_of(result)
        grid = tuple(var.attrs["grid_shape"])
        spacing = tuple(float(s) for s in result.tree.attrs["spacing"])
        basis = KroneckerBasis.create(grid, config.basis_spacing, config.basis_width, config.basis_origin,
                                      voxel_size=spacing, units=config.basis_units)
        W = basis.sample(var["mu_W"].values, var["s_W"].values[None], rng, n=n)
        post["W"] = (("chain", "draw") + var["mu_W"].dims, W[None])
    ds = xr.Dataset(post, coords={**coords, "rater": result.rater_names, "chain": [0], "draw": np.arange(n)})
    ds.attrs["source"] = f"bayesfuse {result.method}: draws from the variational posterior q"
    return xr.DataTree.from_dict({"/posterior": ds})
