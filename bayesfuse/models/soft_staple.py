"""Soft-STAPLE (exact) and simplified soft-STAPLE: EM for soft binary reports.

Registry names ``soft-staple`` (``model="exact"``) and
``soft-staple-simplified`` (``model="simplified"``). Seed 001, section 2;
MODELS.md section 3. Card: ``models/soft_staple.md``, which derives the
M-steps (the paper's "the M-step remains the same" maximises neither
objective) and the design below.

Exact soft-STAPLE maximises L_soft(theta) = sum_t sum_B q_t(B) log p(B; theta).
Exchanging the sums, L_soft = sum_B Q(B) log p(B; theta) with the *soft
pattern histogram* Q(B) = sum_t q_t(B) (eq:soft-histogram): the whole EM is
binary STAPLE on the 2^P-vector Q, and the data are read twice, once to
make Q and once to write w_t(1) = sum_B q_t(B) p(x=1 | B) (eq:soft-posterior).
Both passes form, per voxel, the outer product of two half tensor factors
of q_t (2^P multiply-adds, no 2^P-wide temporaries) (eq:soft-gemm). Quantised soft masks
(levels 0, gamma, 1) are compressed to their few distinct patterns first
(:mod:`bayesfuse.patterns`), so the passes run over patterns, not voxels.
The cost is O(N 2^P): past :data:`MAX_EXACT_RATERS` raters, the method
refuses and points to the simplified model, which is linear in P.

Simplified soft-STAPLE treats each soft report as a noisy observation
z_it with p(z_it | x = a) = sum_b q_it(b) p(y = b | x = a); its EM is
the EM of the model with latent (x_t, y_t) (eq:simplified-mstep), run on
patterns when the maps are quantised and on voxels (one numba pass per
iteration) when they are continuous.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np
import xarray as xr

from .. import patterns as pat
from ..data import RaterMaps
from ..errors import ConfigError, InputError
from ..result import FusionResult
from . import staple

#: Most raters exact soft-STAPLE accepts on soft (non-0/1) maps: it sums
#: 2^P terms per voxel (or per distinct pattern). At P = 16 a 180 x 256 x 256
#: volume of continuous maps is about 10^12 multiply-adds; see the card.
MAX_EXACT_RATERS = 16

@dataclass(frozen=True)
class Config:
    """Options of soft-STAPLE and simplified soft-STAPLE.

    Attributes
    ----------
    model : {"exact", "simplified"}
        Set by the registry name (``soft-staple``, ``soft-staple-simplified``).
    prior, confidence_weight, init_sensitivity, init_specificity,
    sensitivity_prior, specificity_prior, criterion
        As in :class:`bayesfuse.models.staple.Config`; ``"raters"`` takes
        the mean of the raters' foreground probabilities.
    leave_out_unanimous : bool
        Estimate from the voxels where the raters do not all report the same
        hard label (all 0 or all 1); those voxels get that label.
    max_levels : int
        Soft maps with at most this many distinct values are compressed to
        patterns (the soft-dilation protocol gives 3: 0, gamma, 1).
    """

    model: Literal["exact", "simplified"] = "exact"
    prior: str | float = "raters"
    confidence_weight: float = 1.0
    init_sensitivity: float | None = None
    init_specificity: float | None = None
    sensitivity_prior: tuple[float, float] = (1.0, 1.0)
    specificity_prior: tuple[float, float] = (1.0, 1.0)
    leave_out_unanimous: bool = False
    criterion: Literal["objective", "theta"] = "objective"
    max_levels: int = pat.MAX_LEVELS

    def __post_init__(self):
        if self.model not in ("exact", "simplified"):
            raise ConfigError(f"model must be 'exact' or 'simplified', not {self.model!r}")
        staple.check_prior_option(self.prior)
        if not isinstance(self.prior, str) and np.atleast_1d(self.prior).size != 1:
            raise ConfigError("soft-STAPLE is binary: prior is one foreground probability")
        if not (np.isfinite(self.confidence_weight) and self.confidence_weight > 0):
            raise ConfigError(f"confidence_weight must be positive, not {self.confidence_weight!r}")
        staple.check_init(self.init_sensitivity, self.init_specificity)
        for name in ("sensitivity_prior", "specificity_prior"):
            staple.check_beta_pair(name, getattr(self, name))
        if self.criterion not in ("objective", "theta"):
            raise ConfigError(f"criterion must be 'objective' or 'theta', not {self.criterion!r}")
        if not 2 <= int(self.max_levels) <= 64:
            raise ConfigError(f"max_levels must lie in 2..64, not {self.max_levels!r}")


def _alpha(config: Config) -> np.ndarray:
    a_se, b_se = config.sensitivity_prior
    a_sp, b_sp = config.specificity_prior
    return np.array([[a_sp, b_sp], [b_se, a_se]], dtype=float)


# --------------------------------------------------------------------------
# exact soft-STAPLE: the soft pattern histogram and the blocked passes
def all_patterns(n_raters: int) -> np.ndarray:
    """Every B in {0,1}^P as columns (P, 2^P); column code = sum_i b_i 2^i."""
    codes = np.arange(2**n_raters)
    return ((codes[None, :] >> np.arange(n_raters)[:, None]) & 1).astype(np.int64)


def _split(n_raters: int) -> int:
    return n_raters // 2


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


@numba.njit(cache=True, nogil=True)
def _half_factors(q, t, lo, hi, scale, out):
    # out[code] = scale * prod_{i in lo..hi-1} q_i(b_i), code = sum b_i 2^(i-lo)
    out[0] = scale
    size = 1
    for i in range(lo, hi):
        qi = np.float64(q[i, t])
        for a in range(size):
            out[a + size] = out[a] * qi
            out[a] = out[a] * (1.0 - qi)
        size *= 2


#: Let LLVM reorder sums (vectorised reductions); no assumption on NaN/inf.
_REASSOC = {"reassoc", "contract"}


@numba.njit(cache=True, nogil=True, fastmath=_REASSOC)
def _histogram_kernel(q, weights, h, acc):
    p, n = q.shape
    u = np.empty(acc.shape[0])
    v = np.empty(acc.shape[1])
    use_w = weights.shape[0] == n
    for t in range(n):
        c = weights[t] if use_w else 1.0
        if c == 0.0:
            continue
        _half_factors(q, t, 0, h, c, u)
        _half_factors(q, t, h, p, 1.0, v)
        for a in range(u.shape[0]):
            ua = u[a]
            for b in range(v.shape[0]):
                acc[a, b] += ua * v[b]


@numba.njit(cache=True, nogil=True, fastmath=_REASSOC)
def _posterior_kernel(q, gm, h, out):
    p, n = q.shape
    u = np.empty(gm.shape[0])
    v = np.empty(gm.shape[1])
    for t in range(n):
        _half_factors(q, t, 0, h, 1.0, u)
        _half_factors(q, t, h, p, 1.0, v)
        s = 0.0
        for a in range(u.shape[0]):
            inner = 0.0
            for b in range(v.shape[0]):
                inner += gm[a, b] * v[b]
            s += u[a] * inner
        out[t] = s


def soft_histogram(q: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Q(B) = sum_t c_t prod_i q_it(b_i) for all B in {0,1}^P, in one pass.

    Per column t the 2^P products are the outer product of two half
    factors (raters 0..h-1 and h..P-1, 2^h and 2^(P-h) entries), so the
    pass costs 2^P multiply-adds per column and no 2^P-wide temporaries.

    Parameters
    ----------
    q : ndarray (P, n)
        Foreground probabilities per voxel or per pattern.
    weights : ndarray (n,), optional
        c_t: pattern counts, or 0/1 to leave voxels out. Default 1.

    Returns
    -------
    ndarray (2^P,)
        Indexed by the code sum_i b_i 2^i.

    References
    ----------
    models/soft_staple.md (eq:soft-histogram), (eq:soft-gemm)
    """
    p, n = q.shape
    h = _split(p)
    acc = np.zeros((2**h, 2 ** (p - h)))
    w = np.zeros(0) if weights is None else np.ascontiguousarray(weights, dtype=np.float64)
    _histogram_kernel(q, w, h, acc)
    # acc[a, b] belongs to code a + b 2^h: column-major flattening
    return acc.ravel(order="F")


def soft_posterior(q: np.ndarray, g: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """w_t = sum_B q_t(B) g(B) for every column t, in one pass.

    With the half factors u_t, v_t of :func:`soft_histogram` and
    G[a, b] = g(a + b 2^h): w_t = u_t' G v_t.

    Parameters
    ----------
    q : ndarray (P, n)
    g : ndarray (2^P,)
        p(x = 1 | y = B; theta) per code.
    out : ndarray (n,), optional
        Written in place (float32 is fine).

    References
    ----------
    models/soft_staple.md (eq:soft-posterior), (eq:soft-gemm)
    """
    p, n = q.shape
    h = _split(p)
    gm = np.ascontiguousarray(np.asarray(g, dtype=np.float64).reshape(2 ** (p - h), 2**h).T)
    if out is None:
        out = np.empty(n)
    _posterior_kernel(q, gm, h, out)
    return out


def vote_statistics(q: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first M-step's statistics with ITK's start w_t(1) = mean_i q_it(1).

    N[i, 1, b] = sum_t c_t w_t(1) q_it(b), N[i, 0, b] = sum_t c_t w_t(0) q_it(b),
    class_weight = (sum_t c_t w_t(0), sum_t c_t w_t(1)). For hard reports
    this is staple's vote start.

    References
    ----------
    models/soft_staple.md (eq:soft-init)
    """
    p, n = q.shape
    stats = np.zeros((p, 2, 2))
    cw = np.zeros(2)
    for s, e in _blocks(n, 1 << 16):
        qb = np.asarray(q[:, s:e], dtype=np.float64)
        c = np.ones(e - s) if weights is None else np.asarray(weights[s:e], dtype=np.float64)
        w1 = qb.mean(axis=0) * c
        w0 = (1 - qb.mean(axis=0)) * c
        stats[:, 1, 1] += qb @ w1
        stats[:, 1, 0] += (1 - qb) @ w1
        stats[:, 0, 1] += qb @ w0
        stats[:, 0, 0] += (1 - qb) @ w0
        cw += (w0.sum(), w1.sum())
    return stats, cw


def m_step_paper(q: np.ndarray, counts: np.ndarray, w1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The paper's literal M-step ("remains the same", Eq. 5 with y -> q): NOT the EM update.

    theta_i1 = sum_t c_t q_it(1) w_t(1) / sum_t c_t w_t(1),
    theta_i0 = sum_t c_t q_it(0) w_t(0) / sum_t c_t w_t(0).
    Kept to show (tests) that its fixed point is not a stationary point of
    L_soft; :func:`fit` never uses it.

    Returns
    -------
    sensitivity, specificity : ndarray (P,)

    References
    ----------
    models/soft_staple.md (eq:soft-paper-mstep)
    """
    q = np.asarray(q, dtype=float)
    a1 = counts * w1
    a0 = counts * (1 - w1)
    return (q @ a1) / a1.sum(), ((1 - q) @ a0) / a0.sum()


# --------------------------------------------------------------------------
# simplified soft-STAPLE: one numba pass per E-step
#: Voxels per chunk of the simplified pass (the chunk's per-voxel
#: accumulators stay in L1).
CHUNK = 2048


@numba.njit(cache=True, nogil=True, fastmath=_REASSOC)
def _simplified_pass(q, weights, sens, spec, log_p1, log_p0, groups, s1, s0, class_weight, post):
    p, n = q.shape
    use_w = weights.shape[0] == n
    write = post.shape[0] == n
    a1 = np.empty(CHUNK)
    a0 = np.empty(CHUNK)
    m1 = np.empty(CHUNK)
    m0 = np.empty(CHUNK)
    c1 = np.empty(CHUNK)
    c0 = np.empty(CHUNK)
    loglik = 0.0
    for start in range(0, n, CHUNK):
        m = min(n, start + CHUNK) - start
        for k in range(m):
            a1[k] = log_p1
            a0[k] = log_p0
        # products of the factors f over a group of raters cannot underflow
        # (groups are cut by the factors' lower bounds): one log per group
        for g in range(groups.shape[0] - 1):
            for k in range(m):
                m1[k] = 1.0
                m0[k] = 1.0
            for i in range(groups[g], groups[g + 1]):
                se = sens[i]
                sp = spec[i]
                row = q[i]
                for k in range(m):
                    v = np.float64(row[start + k])
                    m1[k] *= v * se + (1.0 - v) * (1.0 - se)
                    m0[k] *= v * (1.0 - sp) + (1.0 - v) * sp
            if groups.shape[0] > 2:
                for k in range(m):
                    a1[k] += math.log(m1[k]) if m1[k] > 0.0 else -np.inf
                    a0[k] += math.log(m0[k]) if m0[k] > 0.0 else -np.inf
        if groups.shape[0] == 2:
            # one run: the products are safe, Z = p1 m1 + p0 m0 directly
            p1 = math.exp(log_p1)
            p0 = math.exp(log_p0)
            for k in range(m):
                c = weights[start + k] if use_w else 1.0
                z1 = p1 * m1[k]
                z = z1 + p0 * m0[k]
                if z == 0.0:
                    return np.nan
                r1 = z1 / z
                if write:
                    post[start + k] = r1
                loglik += c * math.log(z)
                c1[k] = c * r1
                c0[k] = c - c1[k]
        else:
            for k in range(m):
                c = weights[start + k] if use_w else 1.0
                top = max(a1[k], a0[k])
                if top == -np.inf:
                    return np.nan
                lz = top + math.log(math.exp(a1[k] - top) + math.exp(a0[k] - top))
                r1 = math.exp(a1[k] - lz)
                if write:
                    post[start + k] = r1
                loglik += c * lz
                c1[k] = c * r1
                c0[k] = c - c1[k]
        for k in range(m):
            class_weight[1] += c1[k]
            class_weight[0] += c0[k]
        for i in range(p):
            se = sens[i]
            sp = spec[i]
            row = q[i]
            acc1 = 0.0
            acc0 = 0.0
            for k in range(m):
                v = np.float64(row[start + k])
                f1 = v * se + (1.0 - v) * (1.0 - se)
                f0 = v * (1.0 - sp) + (1.0 - v) * sp
                # posterior of the hidden hard report y given x and z (f = 0
                # only where the numerator is 0 too)
                acc1 += c1[k] * (v * se / max(f1, 1e-300))
                acc0 += c0[k] * ((1.0 - v) * sp / max(f0, 1e-300))
            s1[i] += acc1
            s0[i] += acc0
    return loglik


#: Smallest positive value of a float32 report: the least non-zero factor
#: of a rater whose sensitivity or specificity is exactly 0 or 1.
_TINY_REPORT = float(np.finfo(np.float32).smallest_subnormal)


def _rater_groups(sens: np.ndarray, spec: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Cut the raters into runs whose factors' product (times the smaller
    class prior, for the first run) stays above 1e-290."""
    lb = np.minimum(np.minimum(sens, 1 - sens), np.minimum(spec, 1 - spec))
    lb = np.log(np.maximum(lb, _TINY_REPORT))
    cuts, total = [0], float(np.log(prior.min()))
    for i, v in enumerate(lb):
        if total + v < -290 * np.log(10) and i > cuts[-1]:
            cuts.append(i)
            total = 0.0
        total += v
    cuts.append(lb.size)
    return np.asarray(cuts, dtype=np.int64)


def simplified_e_step(q: np.ndarray, weights: np.ndarray | None, theta: np.ndarray, prior: np.ndarray,
                      posterior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """E-step of simplified soft-STAPLE with its hidden hard reports, in one pass.

    With f_ia = p(z_it | x = a) (eq:simplified-likelihood),
    w_t(1) = p1 prod_i f_i1 / sum_a p_a prod_i f_ia (eq:simplified-estep), and
    the expected counts of the augmented model
    N[i, 1, 1] = sum_t c_t w_t(1) rho_it1, rho_it1 = q_it(1) theta_i1 / f_i1,
    N[i, 0, 0] = sum_t c_t w_t(0) rho_it0, rho_it0 = q_it(0) theta_i0 / f_i0,
    and the complements (eq:simplified-mstep). The products over raters are
    formed in runs that cannot underflow and enter the log once per run.

    Parameters
    ----------
    q : ndarray (P, n)
        Soft reports q_it(1) per voxel or pattern.
    weights : ndarray (n,) or None
        Counts (patterns) or 0/1 (voxels left out); None: all 1.
    theta : ndarray (P, 2, 2)
    prior : ndarray (2,)
    posterior : ndarray (n,), optional
        Receives w_t(1) (float32 is fine), also for weight-0 columns.

    Returns
    -------
    stats : ndarray (P, 2, 2)
    class_weight : ndarray (2,)
    log_likelihood : float
        L_simple = sum_t c_t log sum_a p_a prod_i f_ia.

    References
    ----------
    models/soft_staple.md (eq:simplified-likelihood), (eq:simplified-estep), (eq:simplified-mstep)
    """
    p = q.shape[0]
    sens = np.ascontiguousarray(theta[:, 1, 1])
    spec = np.ascontiguousarray(theta[:, 0, 0])
    s1, s0, cw = np.zeros(p), np.zeros(p), np.zeros(2)
    w = np.zeros(0) if weights is None else np.ascontiguousarray(weights, dtype=np.float64)
    post = np.zeros(0, dtype=np.float32) if posterior is None else posterior
    with np.errstate(divide="ignore"):
        lp = np.log(prior)
    ll = _simplified_pass(q, w, sens, spec, float(lp[1]), float(lp[0]), _rater_groups(sens, spec, prior), s1, s0, cw, post)
    if not np.isfinite(ll):
        raise FloatingPointError("simplified soft-STAPLE: a voxel has probability 0 under both classes "
                                 "(a rater's sensitivity or specificity reached 0 or 1 exactly); "
                                 "use Beta priors (sensitivity_prior=(2, 2)) to keep them inside (0, 1)")
    # rho <= 1, so s <= class weight up to rounding: keep the complements >= 0
    s1, s0 = np.minimum(s1, cw[1]), np.minimum(s0, cw[0])
    stats = np.empty((p, 2, 2))
    stats[:, 1, 1], stats[:, 1, 0] = s1, cw[1] - s1
    stats[:, 0, 0], stats[:, 0, 1] = s0, cw[0] - s0
    return stats, cw, float(ll)


# --------------------------------------------------------------------------
@dataclass
class SoftData:
    """The input as the EM needs it: patterns when the maps compress, else voxels."""

    q: np.ndarray                      # (P, N) float view of the maps
    table: pat.Patterns | None         # quantised or hard maps
    values: np.ndarray | None          # (P, n) q per pattern
    counts: np.ndarray | None          # (n,) EM weights per pattern
    unanimous: np.ndarray | None       # (n,) all 0 or all 1
    weights: np.ndarray | None         # (N,) 0/1 for voxels left out (continuous case)
    hard: bool                         # every value is 0 or 1


def soft_data(data: RaterMaps, config: Config) -> SoftData:
    """Read the maps once: compress them to patterns if they hold few levels."""
    who = data._who()
    if data.n_raters < 2:
        raise InputError(data.sources[0] if data.sources else "raters", f"{data.n_raters} rater given; soft-STAPLE needs at least 2")
    if data.n_classes != 2:
        raise InputError(who, f"soft-STAPLE fuses binary problems; the raters hold {data.n_classes} classes (use multi-staple)")
    roi = data.roi()
    if data.kind == "probability":
        q = data.foreground()
        table = pat.compress_soft(q, roi, config.max_levels)
    else:
        q = data.binary()
        table = pat.compress_labels(q, 2, roi)
    qf = q.reshape(q.shape[0], -1)
    if table is not None:
        values = np.asarray(table.values, dtype=np.float64)
        unanimous = np.all(values == 0, axis=0) | np.all(values == 1, axis=0)
        counts = table.counts.copy()
        if config.leave_out_unanimous:
            counts[unanimous] = 0.0
        hard = bool(np.all((values == 0) | (values == 1)))
        out = SoftData(q=qf, table=table, values=values, counts=counts, unanimous=unanimous, weights=None, hard=hard)
        total, fg = counts.sum(), float(values[:, counts > 0].max(initial=0.0))
        bg = float(values[:, counts > 0].min(initial=1.0))
    else:
        weights = None
        if roi is not None or config.leave_out_unanimous:
            keep = np.ones(qf.shape[1], dtype=bool) if roi is None else roi.ravel().copy()
            if config.leave_out_unanimous:
                keep &= ~_unanimous_voxels(qf)
            weights = keep.astype(np.float64)
        out = SoftData(q=qf, table=None, values=None, counts=None, unanimous=None, weights=weights, hard=False)
        total = qf.shape[1] if weights is None else weights.sum()
        fg, bg = 0.0, 1.0
        if total and weights is not None:
            fg = float(max(qf[i][weights > 0].max() for i in range(qf.shape[0])))
            bg = float(min(qf[i][weights > 0].min() for i in range(qf.shape[0])))
        elif total:
            fg, bg = float(qf.max()), float(qf.min())
    where = "inside the region of interest" if data.mask is not None else "in the image"
    if total == 0:
        raise InputError(who, f"the raters agree on every voxel {where}: with leave_out_unanimous there is nothing to estimate")
    if fg == 0:
        raise InputError(who, f"no rater gives any voxel {where} a foreground probability above 0: there is nothing to fuse")
    if bg == 1:
        raise InputError(who, f"every rater gives every voxel {where} foreground probability 1: there is nothing to fuse")
    if config.model == "exact" and not out.hard and data.n_raters > MAX_EXACT_RATERS:
        raise InputError(who, f"exact soft-STAPLE sums 2^P terms per voxel; {data.n_raters} raters with soft values exceed its "
                              f"limit of {MAX_EXACT_RATERS} (use soft-staple-simplified, whose cost is linear in P)")
    return out


def _unanimous_voxels(qf: np.ndarray) -> np.ndarray:
    out = np.empty(qf.shape[1], dtype=bool)
    for s, e in _blocks(qf.shape[1], 1 << 18):
        b = qf[:, s:e]
        out[s:e] = np.all(b == 0, axis=0) | np.all(b == 1, axis=0)
    return out


def _prior(config: Config, class_weight0: np.ndarray, who: str) -> np.ndarray:
    if config.prior == "raters" or config.prior == "estimate":
        fg = config.confidence_weight * class_weight0[1] / class_weight0.sum()
        if not 0 < fg < 1:
            raise InputError(who, f"the foreground prior confidence_weight x raters' mean foreground probability = "
                                  f"{config.confidence_weight:g} x {class_weight0[1] / class_weight0.sum():.4g} = {fg:.4g} is not inside (0, 1)")
        return np.array([1 - fg, fg])
    fg = float(np.atleast_1d(config.prior)[0])
    return np.array([1 - fg, fg])


# --------------------------------------------------------------------------
def fit(
    data: RaterMaps,
    config: Config | None = None,
    *,
    max_iter: int = staple.MAX_ITER,
    tol: float | None = None,
    random_seed=None,
    progress: bool | None = None,
    method: str | None = None,
) -> FusionResult:
    """Fuse soft binary maps (probabilities of foreground) by soft-STAPLE.

    Parameters
    ----------
    data : RaterMaps
        Probability maps (P, *spatial) of a two-class problem; binary masks
        are accepted (q in {0, 1}: the result is STAPLE's).
    config : Config, optional
    max_iter, tol, progress
        As in :func:`bayesfuse.models.staple.fit`.
    random_seed : optional
        Unused (deterministic EM), accepted for the common contract.
    method : str, optional

    Returns
    -------
    FusionResult
        ``/consensus/probability``: w_t(1) (eq:soft-posterior or
        eq:simplified-estep); ``/raters``: sensitivity, specificity,
        confusion; ``/optimizer/objective``: L_soft or L_simple plus the log
        Beta priors, at every iteration.
    """
    config = config or Config()
    method = method or ("soft-staple" if config.model == "exact" else "soft-staple-simplified")
    t0 = time.perf_counter()
    sd = soft_data(data, config)
    alpha = _alpha(config)
    estimate_prior = config.prior == "estimate"
    tol = (staple.TOL_THETA if config.criterion == "theta" else staple.TOL_OBJECTIVE) if tol is None else float(tol)
    p = data.n_raters

    if sd.table is not None:
        stats0 = vote_statistics(sd.values, sd.counts)
    else:
        stats0 = vote_statistics(sd.q, sd.weights)
    prior0 = _prior(config, stats0[1], data._who())

    def m_fn(stats, class_weight, previous):
        theta = staple.m_step_theta(stats, alpha, previous)
        return theta, (staple.m_step_prior(class_weight) if estimate_prior else prior0)

    if config.init_sensitivity is not None:
        start = {"start_params": (staple.initial_theta(p, 2, config.init_sensitivity, config.init_specificity), prior0)}
    else:
        start = {"start_stats": stats0}
    common = dict(max_iter=max_iter, tol=tol, criterion=config.criterion, label=f"{method} EM", progress=progress, **start)

    if config.model == "exact":
        run, prob, info_q, info_c = _fit_exact(sd, data, alpha, m_fn, common)
    else:
        run, prob, info_q, info_c = _fit_simplified(sd, data, alpha, m_fn, common)

    theta = run.theta
    sens, spec = theta[:, 1, 1].copy(), theta[:, 0, 0].copy()
    grad, info = staple.binary_information(info_q, info_c, sens, spec, float(run.prior[1]),
                                           config.sensitivity_prior, config.specificity_prior)
    lap = staple.laplace_logit(np.concatenate([sens, spec]), info)
    variational = {"prior": (("class",), run.prior), **staple.laplace_dataset(sens, spec, lap, data.rater_names)}
    raters = {"sensitivity": (("rater",), sens), "specificity": (("rater",), spec),
              "confusion": (("rater", "true_class", "rater_class"), theta)}
    attrs = {"prior_fixed": int(not estimate_prior),
             "compressed": int(sd.table is not None),
             "n_patterns": int(sd.table.n_patterns) if sd.table is not None else -1}
    objective_name = "L_soft + log prior (EM)" if config.model == "exact" else "L_simple + log prior (EM)"
    return FusionResult.build(
        method=method, data=data, config=config, probability=prob, raters=raters, variational=variational,
        objective=run.objective, objective_name=objective_name, converged=run.converged,
        stop_reason=run.stop_reason, seconds=time.perf_counter() - t0, attrs=attrs,
    )


def _fit_exact(sd: SoftData, data: RaterMaps, alpha, m_fn, common):
    """EM for L_soft on the soft pattern histogram: STAPLE's E- and M-steps on
    every B in {0,1}^P weighted by Q(B), then one pass for w_t(1).

    References
    ----------
    models/soft_staple.md (eq:soft-objective), (eq:soft-bound), (eq:soft-estep), (eq:soft-mstep)
    """
    p = data.n_raters
    if sd.hard:
        # 0/1 reports: q_t(B) is a point mass and Q the pattern count: STAPLE
        hist_values, hist = sd.values.astype(np.int64), sd.counts
    else:
        hist_values = all_patterns(p)
        hist = soft_histogram(sd.values, sd.counts) if sd.table is not None else soft_histogram(sd.q, sd.weights)

    def e_fn(theta, prior):
        resp, logz = staple.e_step(hist_values, theta, prior)
        stats = staple.expected_counts(hist_values, hist, resp, 2)
        return stats, resp.T @ hist, staple.log_posterior(hist, logz, theta, alpha), resp

    run = staple.run_em(e_fn, m_fn, **common)
    g = run.extra[:, 1]
    if sd.table is not None:
        w1 = g.copy() if sd.hard else soft_posterior(sd.values, g)
        prob = _pattern_probability(sd, data, w1)
    else:
        prob = _voxel_probability(sd, data, lambda out: soft_posterior(sd.q, g, out))
    return run, prob, hist_values.astype(float), hist


def _fit_simplified(sd: SoftData, data: RaterMaps, alpha, m_fn, common):
    if sd.table is not None:
        q, weights = np.ascontiguousarray(sd.values), sd.counts
    else:
        q, weights = sd.q, sd.weights

    def e_fn(theta, prior):
        stats, cw, ll = simplified_e_step(q, weights, theta, prior)
        return stats, cw, ll + staple.log_dirichlet(theta, alpha), None

    run = staple.run_em(e_fn, m_fn, **common)
    if sd.table is not None:
        w1 = np.zeros(q.shape[1], dtype=np.float32)
        simplified_e_step(q, weights, run.theta, run.prior, posterior=w1)
        prob = _pattern_probability(sd, data, w1.astype(np.float64))
    else:
        prob = _voxel_probability(sd, data, lambda out: simplified_e_step(q, weights, run.theta, run.prior, posterior=out))
    return run, prob, q, weights


def _pattern_probability(sd: SoftData, data: RaterMaps, w1: np.ndarray) -> np.ndarray:
    """Per-pattern w(1) onto the voxels; left-out unanimous patterns get their label."""
    if sd.unanimous is not None and np.any(sd.counts[sd.unanimous] == 0):
        fixed = sd.unanimous & (sd.counts == 0)
        w1 = np.where(fixed, sd.values[0], w1)
    return pat.expand(sd.table, np.stack([1 - w1, w1], axis=1), data.shape, data.roi())


def _voxel_probability(sd: SoftData, data: RaterMaps, posterior_fn) -> np.ndarray:
    """w_t(1) for every voxel, written in place into a (*spatial, 2) float32 map.

    Voxels outside the ROI get the background; voxels left out because the
    raters agree (all 0 or all 1) get that label.
    """
    n = sd.q.shape[1]
    out = np.empty((n, 2), dtype=np.float32)
    w1 = np.empty(n, dtype=np.float32)
    posterior_fn(w1)
    if sd.weights is not None:
        left_out = sd.weights == 0
        roi = data.roi()
        if roi is not None:
            inside = roi.ravel()
            w1[~inside] = 0.0
            left_out &= inside
        w1[left_out] = sd.q[0][left_out]
    out[:, 1] = w1
    np.subtract(1.0, w1, out=out[:, 0])
    return out.reshape(*data.shape, 2)


# --------------------------------------------------------------------------
def fixed_from_result(result: FusionResult) -> dict:
    """The class prior EM used (pinned by ``build_model(hyper="fixed")``)."""
    return {"prior": result.group("variational")["prior"].values.tolist()}


def posterior_draws(result: FusionResult, n: int = 1000, region=None, random_seed=None) -> xr.DataTree:
    """Draws of (sensitivity, specificity) from the Laplace approximation at the EM optimum.

    For exact soft-STAPLE the "posterior" is exp(L_soft) times the priors,
    a pseudo-posterior (L_soft is an expected log-likelihood, not a
    likelihood); it is what ``build_model`` samples. ``region`` is ignored
    (the parameters are global). Card: models/staple.md (eq:staple-laplace).
    """
    return staple.draws_from_laplace(result, n, random_seed)


def build_model(data: RaterMaps, config: Config | None = None, hyper: str = "fixed", fixed: dict | None = None):
    """The PyMC form of soft-STAPLE (exact or simplified), the true class marginalised.

    Exact: ``pm.Potential`` sum_B Q(B) log sum_a p(B, x = a), the expected
    log-likelihood L_soft on the soft pattern histogram Q (``pm.Data``
    ``histogram`` over the 2^P patterns) (eq:soft-histogram). Simplified:
    ``pm.Potential`` sum_t c_t log sum_a p_a prod_i f_ia over the distinct
    patterns (or voxels, for continuous maps) (eq:simplified-likelihood).
    ``sensitivity`` and ``specificity`` (dim ``rater``) have the Config's
    Beta priors; the class prior is pinned (``hyper="fixed"``) or has a flat
    Dirichlet prior (``hyper="prior"``).
    """
    import pymc as pm

    config = config or Config()
    sd = soft_data(data, config)
    if config.model == "exact":
        if sd.hard:
            used = sd.counts > 0
            q, c = sd.values[:, used], sd.counts[used]
        else:
            q = all_patterns(data.n_raters).astype(float)
            c = soft_histogram(sd.values, sd.counts) if sd.table is not None else soft_histogram(sd.q, sd.weights)
    elif sd.table is not None:
        used = sd.counts > 0
        q, c = sd.values[:, used], sd.counts[used]
    else:
        keep = np.ones(sd.q.shape[1], dtype=bool) if sd.weights is None else sd.weights > 0
        q, c = np.asarray(sd.q[:, keep], dtype=float), np.ones(int(keep.sum()))
    if fixed is not None and "prior" in fixed:
        prior_value = np.asarray(fixed["prior"], dtype=float)
    elif config.prior == "estimate" and hyper == "fixed":
        raise ConfigError("prior='estimate' with hyper='fixed' needs fixed={'prior': ...} (see fixed_from_result)")
    else:
        stats0 = vote_statistics(sd.values, sd.counts) if sd.table is not None else vote_statistics(sd.q, sd.weights)
        prior_value = _prior(config, stats0[1], data._who())
    coords = {"rater": data.rater_names, "pattern": np.arange(c.size), "class": np.arange(2)}
    with pm.Model(coords=coords) as model:
        reports = pm.Data("reports", q, dims=("rater", "pattern"))
        weights = pm.Data("histogram" if config.model == "exact" else "counts", c, dims="pattern")
        if hyper == "fixed":
            prior = pm.Data("class_prior", prior_value, dims="class")
        elif hyper == "prior":
            prior = pm.Dirichlet("class_prior", a=np.ones(2), dims="class")
        else:
            raise ConfigError(f"hyper must be 'fixed' or 'prior', not {hyper!r}")
        sens, spec = staple.binary_rater_variables(data.n_raters, config)
        joint = staple.binary_joint_tensor(reports, sens, spec, prior)
        pm.Potential("loglik", (weights * pm.math.logsumexp(joint, axis=1)).sum())
    return model
