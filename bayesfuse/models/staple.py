"""STAPLE (binary) and multi-label STAPLE: EM on voxel patterns.

Registry names ``staple`` (binary masks, per-rater sensitivity and
specificity) and ``multi-staple`` (K labels, per-rater confusion matrices).
Card: ``models/staple.md``; the equations there are restated from MODELS.md
section 3 and seed 001 (Eqs. 1-6), and the defaults follow ITK's
``STAPLEImageFilter`` so that ``staple`` reproduces SimpleITK's output.

Design: the EM depends on the data only through the counts of the distinct
voxel patterns (at most K^P, usually a few dozen), so :func:`fit` reads the
maps once (:mod:`bayesfuse.patterns`), iterates on the pattern table, and
writes the consensus with one gather pass. An iteration costs O(P K n) for
n distinct patterns, whatever the image size.

The update functions below are pure NumPy functions of the pattern table
and are shared with ``soft_staple`` (exact soft-STAPLE is STAPLE on the
soft pattern histogram; see ``models/soft_staple.md``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import numba
import numpy as np
import xarray as xr
from scipy.special import gammaln, logsumexp

from .. import patterns as pat
from .. import progress as progress_mod
from ..data import RaterMaps
from ..errors import ConfigError, InputError
from ..result import FusionResult

#: Defaults of the solver (iterations on a pattern table cost microseconds).
MAX_ITER = 10_000
#: Relative change of the objective below which EM stops (criterion "objective").
TOL_OBJECTIVE = 1e-12
#: Largest change of any sensitivity/specificity/confusion entry below which
#: EM stops (criterion "theta"): ITK's rule, (delta)^2 <= 1e-14.
TOL_THETA = 1e-7


@dataclass(frozen=True)
class Config:
    """Options of STAPLE and multi-label STAPLE.

    Attributes
    ----------
    mode : {"binary", "multi"}
        ``binary``: sensitivity and specificity per rater (``staple``);
        ``multi``: a K x K confusion matrix per rater (``multi-staple``).
        Set by the registry name.
    prior : "raters", "estimate", float or tuple of float
        The prior probability of the true classes. ``"raters"`` (default, as
        ITK): fixed to the raters' mean class fractions over the voxels
        used, the foreground one times ``confidence_weight``
        (eq:staple-prior-raters). ``"estimate"``: updated by EM
        (eq:staple-mstep-prior). A number (binary: the foreground
        probability) or K numbers summing to 1: fixed.
    confidence_weight : float
        ITK's ``ConfidenceWeight``: multiplies the raters' foreground
        fraction when ``prior="raters"`` (binary only).
    init_sensitivity, init_specificity : float, optional
        Start from these values (every rater) instead of ITK's start, which
        takes the raters' vote fraction as the first posterior
        (eq:staple-init). Give both or neither. In ``multi`` mode the
        confusion matrices start with ``init_specificity`` on the
        background's diagonal entry, ``init_sensitivity`` on the other
        classes' and the rest of each row spread evenly.
    sensitivity_prior, specificity_prior : (float, float)
        Beta(a, b) priors (binary mode); (1, 1) is flat and makes EM the
        maximum-likelihood estimate as in ITK. a, b >= 1.
    confusion_prior : float
        Dirichlet concentration of every confusion-matrix row (multi mode);
        1 is flat. >= 1.
    leave_out_unanimous : bool
        Estimate from the voxels where the raters disagree only (NiftySeg's
        ``-unc``): the background that every rater leaves out inflates the
        specificities. Unanimous voxels get the label they agree on.
    criterion : {"objective", "theta"}
        Stop when the relative change of the log posterior is below ``tol``
        (default 1e-12), or when no rater parameter moves more than ``tol``
        (default 1e-7: ITK's rule).
    """

    mode: Literal["binary", "multi"] = "binary"
    prior: str | float | tuple = "raters"
    confidence_weight: float = 1.0
    init_sensitivity: float | None = None
    init_specificity: float | None = None
    sensitivity_prior: tuple[float, float] = (1.0, 1.0)
    specificity_prior: tuple[float, float] = (1.0, 1.0)
    confusion_prior: float = 1.0
    leave_out_unanimous: bool = False
    criterion: Literal["objective", "theta"] = "objective"

    def __post_init__(self):
        if self.mode not in ("binary", "multi"):
            raise ConfigError(f"mode must be 'binary' or 'multi', not {self.mode!r}")
        check_prior_option(self.prior)
        if not (np.isfinite(self.confidence_weight) and self.confidence_weight > 0):
            raise ConfigError(f"confidence_weight must be positive, not {self.confidence_weight!r}")
        if self.mode == "multi" and self.confidence_weight != 1.0:
            raise ConfigError("confidence_weight applies to binary STAPLE only")
        check_init(self.init_sensitivity, self.init_specificity)
        for name in ("sensitivity_prior", "specificity_prior"):
            check_beta_pair(name, getattr(self, name))
        if not (np.isfinite(self.confusion_prior) and self.confusion_prior >= 1):
            raise ConfigError(f"confusion_prior must be >= 1, not {self.confusion_prior!r}")
        if self.mode == "multi" and (tuple(self.sensitivity_prior) != (1.0, 1.0) or tuple(self.specificity_prior) != (1.0, 1.0)):
            raise ConfigError("multi-staple takes confusion_prior, not sensitivity_prior/specificity_prior")
        if self.criterion not in ("objective", "theta"):
            raise ConfigError(f"criterion must be 'objective' or 'theta', not {self.criterion!r}")


def check_prior_option(prior) -> None:
    """Refuse a ``prior`` option that is none of "raters", "estimate", p, (p_0..p_K-1)."""
    if isinstance(prior, str):
        if prior not in ("raters", "estimate"):
            raise ConfigError(f"prior must be 'raters', 'estimate' or a probability, not {prior!r}")
        return
    p = np.atleast_1d(np.asarray(prior, dtype=float))
    if p.size == 1:
        if not 0 < p[0] < 1:
            raise ConfigError(f"a fixed foreground prior must lie strictly between 0 and 1, not {prior!r}")
    elif np.any(p <= 0) or abs(p.sum() - 1) > 1e-9:
        raise ConfigError(f"fixed class priors must be positive and sum to 1, not {prior!r}")


def check_beta_pair(name: str, ab) -> None:
    """A Beta(a, b) prior's parameters: two finite numbers >= 1 (the MAP stays defined)."""
    if len(ab) != 2 or min(ab) < 1 or not np.all(np.isfinite(ab)):
        raise ConfigError(f"{name} must be a pair (a, b) of Beta parameters >= 1, not {ab!r}")


def check_init(sens, spec) -> None:
    """Both initial values or neither, each strictly inside (0, 1)."""
    if (sens is None) != (spec is None):
        raise ConfigError("give both init_sensitivity and init_specificity, or neither (ITK's start from the vote)")
    for name, v in (("init_sensitivity", sens), ("init_specificity", spec)):
        if v is not None and not 0 < v < 1:
            raise ConfigError(f"{name} must lie strictly between 0 and 1, not {v!r}")


# --------------------------------------------------------------------------
# update functions (pure NumPy on a pattern table)
def log_confusion(theta: np.ndarray) -> np.ndarray:
    """log of confusion matrices, -inf where an entry is 0 (no warning)."""
    with np.errstate(divide="ignore"):
        return np.log(theta)


def e_step(values: np.ndarray, theta: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior of the true class for every pattern, and the log marginal.

    Parameters
    ----------
    values : ndarray (P, n), int
        Pattern table: rater i's label in pattern j.
    theta : ndarray (P, K, K)
        Confusion matrices, ``theta[i, a, b] = p(y_i = b | x = a)``.
    prior : ndarray (K,)
        p(x = a).

    Returns
    -------
    resp : ndarray (n, K)
        w(a | pattern) = p(x = a | y; theta) (eq:staple-estep).
    log_marginal : ndarray (n,)
        log p(y; theta) = logsumexp_a [log prior_a + sum_i log theta[i, a, y_i]].

    References
    ----------
    models/staple.md (eq:staple-estep)
    """
    lt = log_confusion(theta)
    with np.errstate(divide="ignore"):
        joint = np.broadcast_to(np.log(prior), (values.shape[1], prior.size)).copy()
    for i in range(values.shape[0]):
        joint += lt[i][:, values[i]].T
    log_marginal = logsumexp(joint, axis=1)
    possible = np.isfinite(log_marginal)
    with np.errstate(invalid="ignore"):
        resp = np.exp(joint - log_marginal[:, None])
    # a pattern impossible under every class (a report a rater never gives,
    # with its parameter at 0 or 1) has no posterior; it only occurs with
    # weight 0, and a uniform row keeps the expected counts finite
    resp[~possible] = 1.0 / prior.size
    return resp, log_marginal


def expected_counts(values: np.ndarray, counts: np.ndarray, resp: np.ndarray, n_classes: int) -> np.ndarray:
    """N[i, a, b] = sum_j c_j w(a | j) 1{y_ij = b}, the E-step's sufficient statistics.

    References
    ----------
    models/staple.md (eq:staple-counts)
    """
    weighted = resp * counts[:, None]
    out = np.zeros((values.shape[0], resp.shape[1], n_classes))
    for i in range(values.shape[0]):
        for b in range(n_classes):
            out[i, :, b] = weighted[values[i] == b].sum(axis=0)
    return out


def m_step_theta(stats: np.ndarray, alpha: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrices maximising the EM bound with Dirichlet row priors.

    theta[i, a, b] = (N[i, a, b] + alpha[a, b] - 1) / sum_b' (N[i, a, b'] + alpha[a, b'] - 1).
    For K = 2 this is seed 001's Eq. 5 (with Beta priors). A row without
    any weight (no voxel believed to be of class a) keeps its previous
    value (uniform at the start) instead of becoming 0/0.

    Parameters
    ----------
    stats : ndarray (P, K, K)
        Expected counts N from :func:`expected_counts`.
    alpha : ndarray (K, K)
        Dirichlet concentrations of the rows (all >= 1).
    previous : ndarray (P, K, K), optional

    References
    ----------
    models/staple.md (eq:staple-mstep)
    """
    num = stats + (alpha - 1.0)[None]
    den = num.sum(axis=2, keepdims=True)
    empty = den <= 0
    theta = num / np.where(empty, 1.0, den)
    if np.any(empty):
        fill = previous if previous is not None else np.full_like(theta, 1.0 / theta.shape[2])
        theta = np.where(empty, fill, theta)
    return theta


def m_step_prior(class_weight: np.ndarray) -> np.ndarray:
    """p(x = a) = sum_j c_j w(a | j) / sum_j c_j.

    References
    ----------
    models/staple.md (eq:staple-mstep-prior)
    """
    return class_weight / class_weight.sum()


def log_dirichlet(theta: np.ndarray, alpha: np.ndarray) -> float:
    """Sum over raters and rows of the log Dirichlet(alpha[a]) density of theta[i, a].

    Entries with alpha = 1 contribute no log theta term (so theta = 0 there
    is fine).

    References
    ----------
    models/staple.md (eq:staple-objective)
    """
    a = np.broadcast_to(alpha, theta.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a == 1.0, 0.0, (a - 1.0) * np.log(theta))
    norm = gammaln(alpha.sum(axis=1)) - gammaln(alpha).sum(axis=1)
    return float(terms.sum() + theta.shape[0] * norm.sum())


def log_posterior(counts: np.ndarray, log_marginal: np.ndarray, theta: np.ndarray, alpha: np.ndarray) -> float:
    """The EM objective: sum_j c_j log p(y_j; theta) + log p(theta).

    Patterns with count 0 are left out (their log marginal may be -inf).

    References
    ----------
    models/staple.md (eq:staple-objective)
    """
    used = counts > 0
    return float(np.dot(counts[used], log_marginal[used])) + log_dirichlet(theta, alpha)


def vote_start(values: np.ndarray, n_classes: int) -> np.ndarray:
    """ITK's first posterior: the fraction of raters voting each class, (n, K).

    References
    ----------
    models/staple.md (eq:staple-init)
    """
    p = values.shape[0]
    return np.stack([(values == a).sum(axis=0) / p for a in range(n_classes)], axis=1)


def initial_theta(n_raters: int, n_classes: int, sensitivity: float, specificity: float) -> np.ndarray:
    """Confusion matrices with the given diagonal (class 0: specificity, others: sensitivity).

    References
    ----------
    models/staple.md (eq:staple-init)
    """
    k = n_classes
    diag = np.full(k, float(sensitivity))
    diag[0] = float(specificity)
    theta = np.empty((k, k))
    for a in range(k):
        theta[a] = (1.0 - diag[a]) / (k - 1)
        theta[a, a] = diag[a]
    return np.broadcast_to(theta, (n_raters, k, k)).copy()


def concentration(config: Config, n_classes: int) -> np.ndarray:
    """The (K, K) Dirichlet concentrations of the confusion rows."""
    if config.mode == "binary":
        a_se, b_se = config.sensitivity_prior
        a_sp, b_sp = config.specificity_prior
        return np.array([[a_sp, b_sp], [b_se, a_se]], dtype=float)
    return np.full((n_classes, n_classes), float(config.confusion_prior))


# --------------------------------------------------------------------------
# the EM loop, shared by the STAPLE family
@dataclass
class EMRun:
    """What :func:`run_em` returns."""

    theta: np.ndarray
    prior: np.ndarray
    extra: object
    objective: np.ndarray
    converged: bool
    stop_reason: str


def run_em(
    e_step_fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, float, object]],
    m_step_fn: Callable[[np.ndarray, np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]],
    *,
    start_stats: tuple[np.ndarray, np.ndarray] | None = None,
    start_params: tuple[np.ndarray, np.ndarray] | None = None,
    max_iter: int,
    tol: float,
    criterion: str,
    label: str,
    progress: bool | None,
) -> EMRun:
    """Alternate M- and E-steps until the stopping rule holds.

    Iteration k: parameters theta_k (the M-step of the previous E-step's
    statistics, or the start), E-step at theta_k, objective L(theta_k),
    stop test. So the returned parameters and the last E-step belong
    together, as in ITK.

    Parameters
    ----------
    e_step_fn : (theta, prior) -> (stats, class_weight, objective, extra)
    m_step_fn : (stats, class_weight, previous_theta) -> (theta, prior)
    start_stats : (stats, class_weight), optional
        Start with an M-step on these (ITK's vote start).
    start_params : (theta, prior), optional
        Start with an E-step at these.
    """
    if max_iter < 1:
        raise ConfigError(f"max_iter must be at least 1, not {max_iter}")
    if start_params is not None:
        theta, prior = start_params
    else:
        theta, prior = m_step_fn(start_stats[0], start_stats[1], None)
    trace: list[float] = []
    converged, reason, prev = False, "max_iter", None
    with progress_mod.bar(label, total=max_iter, progress=progress) as bar:
        for _ in range(max_iter):
            stats, class_weight, obj, extra = e_step_fn(theta, prior)
            trace.append(obj)
            bar.advance(info=f"log p {obj:.10g}")
            if prev is not None:
                if criterion == "theta":
                    done = float(np.max(np.abs(theta - prev))) <= tol
                else:
                    done = abs(trace[-1] - trace[-2]) <= tol * max(abs(trace[-1]), 1e-300)
                if done:
                    converged, reason = True, f"{criterion} change below tol={tol:g}"
                    break
            prev = theta
            theta, prior = m_step_fn(stats, class_weight, theta)
    return EMRun(theta=theta, prior=prior, extra=extra, objective=np.asarray(trace), converged=converged, stop_reason=reason)


# --------------------------------------------------------------------------
# Laplace approximation of the posterior of (sensitivity, specificity)
@numba.njit(cache=True, nogil=True)
def _information_kernel(q, weights, sens, spec, prior1, grad, info):
    p, n = q.shape
    use_w = weights.shape[0] == n
    d = np.empty(2 * p)
    lp1 = math.log(prior1)
    lp0 = math.log1p(-prior1)
    for t in range(n):
        c = weights[t] if use_w else 1.0
        if c == 0.0:
            continue
        l1 = lp1
        l0 = lp0
        for i in range(p):
            v = np.float64(q[i, t])
            f1 = v * sens[i] + (1.0 - v) * (1.0 - sens[i])
            f0 = v * (1.0 - spec[i]) + (1.0 - v) * spec[i]
            l1 += math.log(f1) if f1 > 0.0 else -np.inf
            l0 += math.log(f0) if f0 > 0.0 else -np.inf
            d[i] = (2.0 * v - 1.0) / f1 if f1 > 0.0 else 0.0
            d[p + i] = (1.0 - 2.0 * v) / f0 if f0 > 0.0 else 0.0
        top = max(l1, l0)
        if top == -np.inf:
            continue
        r1 = math.exp(l1 - top)
        r0 = math.exp(l0 - top)
        z = r1 + r0
        r1 /= z
        r0 /= z
        if r1 == 0.0:
            for i in range(p):
                d[i] = 0.0
        if r0 == 0.0:
            for i in range(p):
                d[p + i] = 0.0
        for i in range(p):
            grad[i] += c * r1 * d[i]
            grad[p + i] += c * r0 * d[p + i]
            info[i, i] += c * r1 * d[i] * d[i]
            info[p + i, p + i] += c * r0 * d[p + i] * d[p + i]
        # minus the variance of the complete-data score: r1 r0 (g1 - g0)(g1 - g0)'
        cv = c * r1 * r0
        for i in range(p):
            d[p + i] = -d[p + i]
        for a in range(2 * p):
            da = cv * d[a]
            for b in range(2 * p):
                info[a, b] -= da * d[b]


def binary_information(q: np.ndarray, counts: np.ndarray | None, sens: np.ndarray, spec: np.ndarray,
                       prior1: float, sens_prior=(1.0, 1.0), spec_prior=(1.0, 1.0),
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and observed information of the log posterior in (sensitivity, specificity).

    For patterns of soft or hard reports q (rater's foreground probability)
    with likelihood factors f_i1 = q theta_i1 + (1-q)(1-theta_i1) and
    f_i0 = q (1-theta_i0) + (1-q) theta_i0 (hard reports: q in {0, 1}),
    by Louis' identity with the latent true class.

    Parameters
    ----------
    q : ndarray (P, n)
        Reports per pattern (or per voxel), read in one pass.
    counts : ndarray (n,) or None
        Weight of each column (None: 1 each).
    sens, spec : ndarray (P,)
    prior1 : float
        p(x = 1), held fixed.

    Returns
    -------
    grad : ndarray (2P,)
        d log p / d(sens_1..sens_P, spec_1..spec_P).
    info : ndarray (2P, 2P)
        minus the Hessian.

    References
    ----------
    models/staple.md (eq:staple-louis)
    """
    p, n = q.shape
    grad = np.zeros(2 * p)
    info = np.zeros((2 * p, 2 * p))
    w = np.zeros(0) if counts is None else np.ascontiguousarray(counts, dtype=np.float64)
    _information_kernel(q, w, np.ascontiguousarray(sens, dtype=float), np.ascontiguousarray(spec, dtype=float),
                        float(prior1), grad, info)
    theta = np.concatenate([sens, spec])
    a = np.array([sens_prior[0]] * p + [spec_prior[0]] * p, dtype=float)
    b = np.array([sens_prior[1]] * p + [spec_prior[1]] * p, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        grad += np.where(a > 1, (a - 1) / theta, 0.0) - np.where(b > 1, (b - 1) / (1 - theta), 0.0)
        info[np.diag_indices(2 * p)] += np.where(a > 1, (a - 1) / theta**2, 0.0) + np.where(b > 1, (b - 1) / (1 - theta) ** 2, 0.0)
    return grad, info


#: Parameters closer to 0 or 1 than this are left out of the Laplace
#: approximation (their logit is unbounded): drawn as points.
BOUNDARY = 1e-9


def laplace_logit(theta: np.ndarray, info: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Gaussian approximation of the posterior in eta = logit(theta).

    The Laplace approximation N(theta_hat, I^-1) at the EM optimum, carried
    to eta by the delta method: eta ~ N(logit theta_hat, (J I J)^-1) with
    J = diag(theta_hat (1 - theta_hat)). Same first-order accuracy, and the
    draws stay inside (0, 1).

    Returns
    -------
    (mean, cov, inside) or None
        ``inside`` marks the parameters inside (BOUNDARY, 1 - BOUNDARY);
        ``mean`` and ``cov`` are over those. None when the information
        matrix is not positive definite (a model the data do not identify).

    References
    ----------
    models/staple.md (eq:staple-laplace)
    """
    inside = (theta > BOUNDARY) & (theta < 1 - BOUNDARY)
    t = theta[inside]
    jac = t * (1 - t)
    prec = jac[:, None] * info[np.ix_(inside, inside)] * jac[None, :]
    try:
        chol = np.linalg.cholesky(prec)
    except np.linalg.LinAlgError:
        return None
    cov = np.linalg.solve(chol.T, np.linalg.solve(chol, np.eye(t.size)))
    mean = np.log(t) - np.log1p(-t)
    return mean, cov, inside


def laplace_dataset(sens: np.ndarray, spec: np.ndarray, lap, names: list[str]) -> dict:
    """The Laplace approximation as variables of the ``/variational`` group."""
    p = sens.size
    theta = np.concatenate([sens, spec])
    params = [f"sensitivity[{n}]" for n in names] + [f"specificity[{n}]" for n in names]
    if lap is None:
        return {"laplace_ok": ((), 0)}
    mean, cov, inside = lap
    full_mean = np.log(np.clip(theta, 1e-300, None)) - np.log(np.clip(1 - theta, 1e-300, None))
    full_mean[inside] = mean
    full_cov = np.zeros((2 * p, 2 * p))
    full_cov[np.ix_(inside, inside)] = cov
    return {
        "laplace_ok": ((), 1),
        "laplace_mean": (("parameter",), full_mean),
        "laplace_cov": (("parameter", "parameter_b"), full_cov),
        "laplace_inside": (("parameter",), inside.astype(np.int8)),
        "laplace_point": (("parameter",), theta),
        "parameter": (("parameter",), np.array(params)),
    }


def draws_from_laplace(result: FusionResult, n: int, random_seed) -> xr.DataTree:
    """Draws of sensitivity and specificity from the stored Laplace approximation.

    References
    ----------
    models/staple.md (eq:staple-laplace)
    """
    var = result.group("variational")
    if "laplace_ok" not in var or int(var["laplace_ok"]) != 1:
        raise NotImplementedError(
            f"{result.method}: no posterior approximation is stored (the information matrix at the EM "
            "optimum is not positive definite, or the model is not binary); the result is a point estimate"
        )
    rng = np.random.default_rng(random_seed)
    mean = var["laplace_mean"].values
    cov = var["laplace_cov"].values
    inside = var["laplace_inside"].values.astype(bool)
    point = var["laplace_point"].values
    eta = np.broadcast_to(mean, (n, mean.size)).copy()
    if inside.any():
        eta[:, inside] = rng.multivariate_normal(mean[inside], cov[np.ix_(inside, inside)], size=n, method="cholesky")
    theta = 1.0 / (1.0 + np.exp(-eta))
    theta[:, ~inside] = point[~inside]
    p = theta.shape[1] // 2
    names = result.rater_names
    post = xr.Dataset(
        {
            "sensitivity": (("chain", "draw", "rater"), theta[None, :, :p]),
            "specificity": (("chain", "draw", "rater"), theta[None, :, p:]),
        },
        coords={"chain": [0], "draw": np.arange(n), "rater": names},
        attrs={"approximation": "Laplace in logit space at the EM optimum (models/staple.md eq:staple-laplace)"},
    )
    return xr.DataTree.from_dict({"/posterior": post})


# --------------------------------------------------------------------------
# data preparation shared by fit and build_model
@dataclass
class PatternData:
    """The pattern table the EM runs on, and how to write the consensus back."""

    patterns: pat.Patterns
    values: np.ndarray          # (P, n) labels of every pattern column
    counts: np.ndarray          # (n,) counts used by the EM (0 for left-out columns)
    unanimous: np.ndarray       # (n,) bool: every rater gives the same label
    n_classes: int


def _labels(data: RaterMaps, config: Config) -> tuple[np.ndarray, int]:
    if data.n_raters < 2:
        raise InputError(data.sources[0] if data.sources else "raters", f"{data.n_raters} rater given; STAPLE needs at least 2")
    if config.mode == "binary":
        return data.binary(), 2
    if data.kind == "probability":
        raise InputError(data._who(), "multi-staple fuses hard labels; these are probability maps (use soft-staple for soft binary maps)")
    return data.labels(), data.n_classes


def pattern_data(data: RaterMaps, config: Config) -> PatternData:
    """Compress the raters' labels to a pattern table and apply the options."""
    labels, k = _labels(data, config)
    table = pat.compress_labels(labels, k, data.roi())
    values = table.values
    unanimous = np.all(values == values[:1], axis=0)
    counts = table.counts.copy()
    if config.leave_out_unanimous:
        counts[unanimous] = 0.0
    where = "inside the region of interest" if data.mask is not None else "in the image"
    if counts.sum() == 0:
        raise InputError(data._who(), f"the raters agree on every voxel {where}: with leave_out_unanimous there is nothing to estimate (fuse without it: the consensus is their common label)")
    used = counts > 0
    present = np.unique(values[:, used])
    if present.size < 2:
        raise InputError(data._who(), f"every rater labels every voxel {where} as class {int(present[0])}: there is nothing to fuse "
                         "(sensitivities are undefined)")
    return PatternData(patterns=table, values=values, counts=counts, unanimous=unanimous, n_classes=k)


def class_prior(config: Config, pd: PatternData, who: str) -> np.ndarray:
    """The fixed (or starting) prior of the true classes.

    References
    ----------
    models/staple.md (eq:staple-prior-raters)
    """
    k = pd.n_classes
    if isinstance(config.prior, str):
        votes = vote_start(pd.values, k)
        frac = (votes * pd.counts[:, None]).sum(axis=0) / pd.counts.sum()
        if k == 2:
            fg = config.confidence_weight * frac[1]
            if not 0 < fg < 1:
                raise InputError(who, f"the foreground prior confidence_weight x raters' foreground fraction = "
                                      f"{config.confidence_weight:g} x {frac[1]:.4g} = {fg:.4g} is not inside (0, 1)")
            return np.array([1 - fg, fg])
        if np.any(frac <= 0):
            missing = [int(a) for a in np.flatnonzero(frac <= 0)]
            raise InputError(who, f"no rater uses class(es) {missing}: their prior would be 0 (give prior=... explicitly, or fewer classes)")
        return frac
    p = np.atleast_1d(np.asarray(config.prior, dtype=float))
    if p.size == 1:
        if k != 2:
            raise ConfigError(f"a single prior value is the foreground probability of binary STAPLE; give {k} values for {k} classes")
        return np.array([1 - p[0], p[0]])
    if p.size != k:
        raise ConfigError(f"prior has {p.size} values for {k} classes")
    return p


# --------------------------------------------------------------------------
def fit(
    data: RaterMaps,
    config: Config | None = None,
    *,
    max_iter: int = MAX_ITER,
    tol: float | None = None,
    random_seed=None,
    progress: bool | None = None,
    method: str | None = None,
) -> FusionResult:
    """Fuse binary masks (STAPLE) or label maps (multi-label STAPLE) by EM.

    Parameters
    ----------
    data : RaterMaps
        Binary masks (``mode="binary"``) or labels (``mode="multi"``).
    config : Config, optional
    max_iter : int
        Most EM iterations.
    tol : float, optional
        Stopping threshold of ``config.criterion`` (defaults 1e-12 for
        "objective", 1e-7 for "theta").
    random_seed : optional
        Unused: the EM is deterministic (accepted for the common contract).
    progress : bool, optional
        Progress bar.
    method : str, optional
        Registry name recorded in the result.

    Returns
    -------
    FusionResult
        ``/consensus/probability`` is the posterior w(a) of the true class
        (eq:staple-estep); ``/raters`` holds ``confusion`` (rater,
        true_class, rater_class) and, for K = 2, ``sensitivity`` and
        ``specificity``; ``/optimizer/objective`` the log posterior at every
        iteration (eq:staple-objective).
    """
    config = config or Config()
    method = method or ("staple" if config.mode == "binary" else "multi-staple")
    t0 = time.perf_counter()
    pd = pattern_data(data, config)
    k = pd.n_classes
    alpha = concentration(config, k)
    prior0 = class_prior(config, pd, data._who())
    estimate_prior = config.prior == "estimate"
    values, counts = pd.values, pd.counts

    def e_fn(theta, prior):
        resp, logz = e_step(values, theta, prior)
        stats = expected_counts(values, counts, resp, k)
        return stats, resp.T @ counts, log_posterior(counts, logz, theta, alpha), resp

    def m_fn(stats, class_weight, previous):
        theta = m_step_theta(stats, alpha, previous)
        prior = m_step_prior(class_weight) if estimate_prior else prior0
        return theta, prior

    start = _start(config, values, counts, k, data.n_raters, prior0)
    tol = (TOL_THETA if config.criterion == "theta" else TOL_OBJECTIVE) if tol is None else float(tol)
    run = run_em(e_fn, m_fn, max_iter=max_iter, tol=tol, criterion=config.criterion,
                 label=f"{method} EM", progress=progress, **start)

    resp = run.extra.copy()
    if config.leave_out_unanimous:
        resp[pd.unanimous] = np.eye(k)[values[0, pd.unanimous]]
    prob = pat.expand(pd.patterns, resp, data.shape, data.roi(), background=0)
    raters, variational = _rater_tables(run, config, pd, data)
    return FusionResult.build(
        method=method, data=data, config=config, probability=prob, raters=raters, variational=variational,
        objective=run.objective, objective_name="log posterior (EM)", converged=run.converged,
        stop_reason=run.stop_reason, seconds=time.perf_counter() - t0,
        attrs={"n_patterns": int((counts > 0).sum()), "prior_fixed": int(not estimate_prior)},
    )


def _start(config: Config, values, counts, k, p, prior0) -> dict:
    if config.init_sensitivity is not None:
        return {"start_params": (initial_theta(p, k, config.init_sensitivity, config.init_specificity), prior0)}
    w0 = vote_start(values, k)
    return {"start_stats": (expected_counts(values, counts, w0, k), w0.T @ counts)}


def _rater_tables(run: EMRun, config: Config, pd: PatternData, data: RaterMaps) -> tuple[dict, dict]:
    k = pd.n_classes
    theta = run.theta
    raters = {"confusion": (("rater", "true_class", "rater_class"), theta)}
    variational = {"prior": (("class",), run.prior)}
    if k == 2:
        sens, spec = theta[:, 1, 1].copy(), theta[:, 0, 0].copy()
        raters = {"sensitivity": (("rater",), sens), "specificity": (("rater",), spec), **raters}
        if config.mode == "binary":
            q = pd.values.astype(float)
            grad, info = binary_information(q, pd.counts, sens, spec, float(run.prior[1]),
                                            config.sensitivity_prior, config.specificity_prior)
            variational.update(laplace_dataset(sens, spec, laplace_logit(np.concatenate([sens, spec]), info), data.rater_names))
    return raters, variational


# --------------------------------------------------------------------------
def fixed_from_result(result: FusionResult) -> dict:
    """The prior of the true classes that EM used (pinned by ``build_model(hyper="fixed")``)."""
    prior = result.group("variational")["prior"].values
    return {"prior": prior.tolist()}


def posterior_draws(result: FusionResult, n: int = 1000, region=None, random_seed=None) -> xr.DataTree:
    """Draws of the rater parameters from the Laplace approximation at the EM optimum.

    EM gives a point estimate (the MAP); with many voxels the posterior of
    (sensitivity, specificity) is close to Gaussian in logit space
    (models/staple.md (eq:staple-laplace)), which the NUTS cross-check
    tests. ``region`` is accepted for the common contract and ignored: the
    rater parameters are global. multi-staple has no approximation.
    """
    if _mode(result) != "binary":
        raise NotImplementedError("multi-staple: EM gives a point estimate; no posterior approximation of the confusion matrices is made")
    return draws_from_laplace(result, n, random_seed)


def _mode(result: FusionResult) -> str:
    return str(result.config.get("mode", "binary"))


def build_model(data: RaterMaps, config: Config | None = None, hyper: str = "fixed", fixed: dict | None = None):
    """The PyMC model of STAPLE with the true class marginalised.

    The data enter as the pattern table (labels of each distinct pattern
    and its voxel count, in ``pm.Data``); the likelihood is
    sum_j c_j log sum_a p(x = a) prod_i theta[i, a, y_ij] (eq:staple-objective),
    a ``pm.Potential``. Binary mode: ``sensitivity`` and ``specificity``
    (dim ``rater``) with the Config's Beta priors; multi mode:
    ``confusion`` (rater, true_class, rater_class) with Dirichlet rows.

    Parameters
    ----------
    hyper : {"fixed", "prior"}
        ``fixed``: the class prior is pinned (``fixed["prior"]``, else the
        Config's fixed or raters' value; ``prior="estimate"`` needs
        ``fixed``). ``prior``: a flat Beta / Dirichlet prior on it.
    fixed : dict, optional
        From :func:`fixed_from_result`.

    References
    ----------
    models/staple.md (eq:staple-model), (eq:staple-objective), (eq:staple-patterns)
    """
    import pymc as pm
    import pytensor.tensor as pt

    config = config or Config()
    pd = pattern_data(data, config)
    k = pd.n_classes
    used = pd.counts > 0
    values, counts = pd.values[:, used], pd.counts[used]
    prior_value = _fixed_prior(config, pd, data, hyper, fixed)
    coords = {"rater": data.rater_names, "pattern": np.arange(counts.size), "class": np.arange(k),
              "true_class": np.arange(k), "rater_class": np.arange(k)}
    alpha = concentration(config, k)
    with pm.Model(coords=coords) as model:
        y = pm.Data("patterns", values.astype(np.int64), dims=("rater", "pattern"))
        c = pm.Data("counts", counts, dims="pattern")
        if hyper == "fixed":
            prior = pm.Data("class_prior", prior_value, dims="class")
        elif hyper == "prior":
            prior = pm.Dirichlet("class_prior", a=np.ones(k), dims="class")
        else:
            raise ConfigError(f"hyper must be 'fixed' or 'prior', not {hyper!r}")
        if config.mode == "binary":
            sens, spec = binary_rater_variables(data.n_raters, config)
            joint = binary_joint_tensor(y, sens, spec, prior)
        else:
            conf = pm.Dirichlet("confusion", a=np.broadcast_to(alpha, (data.n_raters, k, k)).copy(),
                                dims=("rater", "true_class", "rater_class"),
                                initval=initial_theta(data.n_raters, k, INITVAL, INITVAL))
            logc = pt.log(conf)                                   # (P, K, K)
            rater_idx = np.arange(data.n_raters)[:, None]
            picked = logc[rater_idx, :, y]                        # (P, n, K)
            joint = picked.sum(axis=0) + pt.log(prior)[None, :]
        pm.Potential("loglik", (c * pm.math.logsumexp(joint, axis=1)).sum())
    return model


#: Where NUTS chains start: raters better than chance. The likelihood has a
#: mirror mode (x <-> 1 - x with sensitivity <-> 1 - specificity, exact when
#: the class prior is 1/2) that the data make negligible, but chains started
#: around 0.5 can fall into it (models/staple.md, "The PyMC model").
INITVAL = 0.9


def binary_rater_variables(n_raters: int, config):
    """``sensitivity`` and ``specificity`` (dim rater) with the Config's Beta priors."""
    import pymc as pm

    start = np.full(n_raters, INITVAL)
    sens = pm.Beta("sensitivity", *config.sensitivity_prior, dims="rater", initval=start)
    spec = pm.Beta("specificity", *config.specificity_prior, dims="rater", initval=start)
    return sens, spec


def binary_joint_tensor(q, sens, spec, prior):
    """log p(reports, x = a) per column, (n, 2), as a PyTensor expression.

    f_i1 = q theta_i1 + (1-q)(1-theta_i1), f_i0 = q (1-theta_i0) + (1-q) theta_i0:
    for 0/1 reports the STAPLE factors (eq:staple-estep), for soft reports
    the simplified soft-STAPLE factors (models/soft_staple.md).
    """
    import pytensor.tensor as pt

    q = pt.cast(q, "float64")
    f1 = q * sens[:, None] + (1 - q) * (1 - sens[:, None])
    f0 = q * (1 - spec[:, None]) + (1 - q) * spec[:, None]
    return pt.stack([pt.log(f0).sum(axis=0), pt.log(f1).sum(axis=0)], axis=1) + pt.log(prior)[None, :]


def _fixed_prior(config: Config, pd: PatternData, data: RaterMaps, hyper: str, fixed: dict | None) -> np.ndarray:
    if fixed is not None and "prior" in fixed:
        return np.asarray(fixed["prior"], dtype=float)
    if config.prior == "estimate":
        if hyper == "fixed":
            raise ConfigError("prior='estimate' with hyper='fixed' needs fixed={'prior': ...} (see fixed_from_result)")
        return np.full(pd.n_classes, 1.0 / pd.n_classes)
    return class_prior(config, pd, data._who())


def simulate(config: Config | None = None, shape=(32, 32, 32), n_raters: int = 5, random_seed=None,
             sensitivity=None, specificity=None, n_classes: int = 2) -> tuple[RaterMaps, dict]:
    """Raters drawn from STAPLE's own story: a true label map, independent voxel errors.

    The truth is a set of nested balls (class a inside class a-1); rater i
    reports the true class with probability ``sensitivity[i]`` (class >= 1)
    or ``specificity[i]`` (class 0) and otherwise a uniformly chosen other
    class.

    Returns
    -------
    RaterMaps, dict
        The raters and ``{"truth", "sensitivity", "specificity"}``.
    """
    rng = np.random.default_rng(random_seed)
    sens = np.asarray(sensitivity if sensitivity is not None else rng.uniform(0.7, 0.95, n_raters), dtype=float)
    spec = np.asarray(specificity if specificity is not None else rng.uniform(0.9, 0.99, n_raters), dtype=float)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grid))
    truth = np.zeros(shape, dtype=np.uint8)
    for a in range(1, n_classes):
        truth[r < 0.75 * (1 - (a - 1) / n_classes)] = a
    maps = []
    for i in range(n_raters):
        keep_p = np.where(truth == 0, spec[i], sens[i])
        correct = rng.random(shape) < keep_p
        other = (truth + rng.integers(1, n_classes, size=shape)) % n_classes
        maps.append(np.where(correct, truth, other).astype(np.uint8))
    kind = "binary" if n_classes == 2 else "labels"
    data = RaterMaps.from_arrays(maps, kind=kind, n_classes=n_classes)
    return data, {"truth": truth, "sensitivity": sens, "specificity": spec}
