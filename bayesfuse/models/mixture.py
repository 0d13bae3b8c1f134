"""Mixture of consensuses: clusters of raters, one consensus map per cluster (VB).

Model 2 of MODELS.md (seed 000, section 3 and supplement 1.2); card
``models/mixture.md``. Each rater's map is drawn around one of M consensus
maps; the VB finds the maps, the responsibilities r[p, m] (how much rater p
belongs to component m), the mixing weights pi and a per-rater variance.

How PCA and the VB fit together (the paper leaves it open; the card derives
the choice):

1. The raters' maps, in link space (``bayesfuse.gaussian.LinkSpace``), are
   centred on their mean and decomposed by PCA through the P x P Gram matrix
   (one streamed pass over the volume). Each rater becomes a point y_p in the
   J = P - 1 (at most) principal coordinates, without loss: the maps are the
   mean plus sum_j y_pj U_j.
2. The consensus maps are restricted to the mean plus the leading Q
   principal modes (``T~_m = mean + sum_{j<=Q} w_mj U_j``: "the inverse
   mapping from the components weights to the original space"). By default
   Q = M - 1 (``n_modes=None``): M maps span an (M-1)-dimensional affine
   space, and each added component adds one mode.
3. The paper's Gaussian likelihood then runs on the J principal coordinates
   as its "voxels": y_p | z_p = m ~ N((w_m, 0), sigma_p^2 I_J). The
   coordinates beyond Q carry each rater's own deviations, which no
   consensus can absorb, so sigma_p^2 does not collapse on a rater alone in
   a component (while Q < J; a floor guards Q = J); and the evidence for a
   component sums J coordinates, not N voxels, so responsibilities are not
   0/1 from the first iteration.

The incremental scheme (variational boosting, the paper's): component 1 is
fitted alone; then one component at a time is added, the earlier
components' q(w) frozen, the new one initialised from the residuals (the
paper's rule, plus one candidate seeded at each rater; the candidate whose
fit reaches the highest ELBO is kept); a rater *joins* the new component when
its responsibility for it exceeds ``join_threshold``; the scheme stops when
fewer than ``min_joiners`` raters join (the paper: "no rater is added to the
newly introduced component"); ``stop_rule="joins+elbo"`` also requires the
ELBO to rise. A final joint fit frees all components.

Pure update functions (``update_q_w``, ``update_responsibilities``,
``update_pi``, ``update_sigma2``, ``elbo``, ``initial_responsibilities``)
state each update on its own; ``principal_coordinates`` and the two
streamed passes (``gram_matrices``, ``component_maps``) connect them to
the volume.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from numba import njit, prange
from scipy.special import logsumexp

from .. import gaussian as G
from ..data import RaterMaps
from ..errors import ConfigError, InputError
from ..progress import bar
from ..result import FusionResult

LOG2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------ config
@dataclass(frozen=True)
class Config:
    """Options and hyperparameters of the mixture of consensuses.

    Attributes
    ----------
    link : {"sqrt", "logit", "identity"}
        Link from the simplex to link space (sqrt keeps K coordinates,
        logit and identity K - 1).
    max_components : int
        Upper bound on M (the scheme usually stops earlier).
    n_modes : int or None
        Q, the number of principal modes the consensus maps may use. None:
        Q = M - 1 while M components are fitted (one mode per added
        component). An integer fixes Q for every M (capped at J).
    min_joiners : int
        A new component is kept only when at least this many raters join
        it. With 1, a single rater can found a component (its consensus is
        then that rater's own map).
    join_threshold : float
        A rater joins a component when its responsibility for it exceeds
        this value (0.5: the component holds most of the rater).
    seeds : {"raters", "paper"}
        Initialisations of a new component: ``"paper"`` only the paper's
        residual rule; ``"raters"`` that rule plus one candidate seeded at
        each rater's coordinates (P + 1 small fits; the best ELBO wins).
    stop_rule : {"joins", "joins+elbo"}
        ``"joins"``: the paper's rule (a new component is kept when at least
        ``min_joiners`` raters join it). ``"joins+elbo"``: it must also
        raise the ELBO, corrected by log M! for the components' labelling,
        above the previous stage's (a variational Bayes-factor test; with
        the weak default prior it is conservative for few raters, see the
        card).
    refine : bool
        After the incremental scheme, fit all components jointly (no
        component frozen).
    prior_scale : float
        Prior sd of the component weights w_m, in units of the raters'
        root-mean-square spread per principal coordinate (weak by default;
        it keeps q(w) proper for a component no rater belongs to).
    min_variance : float
        Floor of sigma_p^2 relative to the raters' mean variance per
        coordinate (guards raters with identical maps).
    """

    link: str = "sqrt"
    max_components: int = 8
    n_modes: int | None = None
    min_joiners: int = 2
    join_threshold: float = 0.5
    seeds: str = "raters"
    stop_rule: str = "joins"
    refine: bool = True
    prior_scale: float = 10.0
    min_variance: float = 1e-6

    def __post_init__(self):
        if self.link not in ("sqrt", "logit", "identity"):
            raise ConfigError(f"link must be one of sqrt, logit, identity; got {self.link!r}")
        if self.seeds not in ("raters", "paper"):
            raise ConfigError(f"seeds must be 'raters' or 'paper', not {self.seeds!r}")
        if self.stop_rule not in ("joins", "joins+elbo"):
            raise ConfigError(f"stop_rule must be 'joins' or 'joins+elbo', not {self.stop_rule!r}")
        if not (isinstance(self.max_components, (int, np.integer)) and self.max_components >= 1):
            raise ConfigError(f"max_components must be an integer >= 1, got {self.max_components!r}")
        if self.n_modes is not None and not (isinstance(self.n_modes, (int, np.integer)) and self.n_modes >= 1):
            raise ConfigError(f"n_modes must be None or an integer >= 1, got {self.n_modes!r}")
        if not (isinstance(self.min_joiners, (int, np.integer)) and self.min_joiners >= 1):
            raise ConfigError(f"min_joiners must be an integer >= 1, got {self.min_joiners!r}")
        if not 0 < float(self.join_threshold) < 1:
            raise ConfigError(f"join_threshold must lie in (0, 1), got {self.join_threshold!r}")
        if not float(self.prior_scale) > 0:
            raise ConfigError(f"prior_scale must be positive, got {self.prior_scale!r}")
        if not float(self.min_variance) >= 0:
            raise ConfigError(f"min_variance must be >= 0, got {self.min_variance!r}")
        if not isinstance(self.refine, (bool, np.bool_)):
            raise ConfigError(f"refine must be true or false, got {self.refine!r}")


# ------------------------------------------------------- PCA of the raters
@dataclass(frozen=True)
class Principal:
    """The raters in principal coordinates (eq:mix-pca).

    Attributes
    ----------
    scores : ndarray (P, J)
        y_p: rater p's coordinates on the J principal modes.
    eigenvalues : ndarray (J,)
        e_j = sum_p y_pj^2, decreasing.
    vectors : ndarray (P, J)
        Orthonormal eigenvectors of the centred Gram matrix (columns sum to
        zero): U_j = sum_p vectors[p, j] / sqrt(e_j) D~_p.
    """

    scores: np.ndarray
    eigenvalues: np.ndarray
    vectors: np.ndarray

    @property
    def n_raters(self) -> int:
        return self.scores.shape[0]

    @property
    def n_coords(self) -> int:
        return self.scores.shape[1]

    def mode_weights(self) -> np.ndarray:
        """B[j, p] with U_j = sum_p B[j, p] D~_p (the modes as combinations of raters)."""
        return (self.vectors / np.sqrt(self.eigenvalues)).T


def principal_coordinates(gram: np.ndarray, rel_tol: float = 1e-10) -> Principal:
    """PCA of P maps from their Gram matrix G[p, q] = <D~_p, D~_q>.

    The centred Gram matrix H G H (H = I - 11'/P) has the eigenpairs of the
    maps' scatter; its eigenvalues above ``rel_tol`` times the largest are
    kept (at most P - 1). Each eigenvector's sign is fixed so that its
    third moment over raters is positive (a rule that moves with the raters
    when they are permuted).

    Parameters
    ----------
    gram : ndarray (P, P)
        Uncentred Gram matrix of the raters' link maps.

    Returns
    -------
    Principal

    References
    ----------
    models/mixture.md (eq:mix-pca)
    """
    g = np.asarray(gram, dtype=np.float64)
    p = g.shape[0]
    h = np.eye(p) - 1.0 / p
    gc = h @ g @ h
    gc = 0.5 * (gc + gc.T)
    w, v = np.linalg.eigh(gc)
    order = np.argsort(w)[::-1]
    w, v = w[order], v[:, order]
    top = max(float(w[0]), 0.0) if w.size else 0.0
    keep = (w > rel_tol * top) & (w > 0) if top > 0 else np.zeros(w.size, bool)
    keep[p - 1 :] = False  # centring removes one dimension
    w, v = w[keep], v[:, keep]
    sign = np.sign(np.sum(v**3, axis=0))
    sign[sign == 0] = 1.0
    v = v * sign
    return Principal(scores=v * np.sqrt(w), eigenvalues=w, vectors=v)


# --------------------------------------------------- pure update functions
@dataclass
class MixState:
    """The VB state in principal coordinates.

    Attributes
    ----------
    r : ndarray (P, M)
        Responsibilities q(z_p = m).
    mu : ndarray (M, Q)
        Means of q(w_m).
    s : ndarray (M,)
        q(w_m) = N(mu_m, s_m I_Q) (isotropic: eq:mix-qw).
    pi : ndarray (M,)
        Mixing weights.
    sigma2 : ndarray (P,)
        Per-rater variance per principal coordinate.
    """

    r: np.ndarray
    mu: np.ndarray
    s: np.ndarray
    pi: np.ndarray
    sigma2: np.ndarray

    def copy(self) -> "MixState":
        return MixState(self.r.copy(), self.mu.copy(), self.s.copy(), self.pi.copy(), self.sigma2.copy())

    @property
    def n_components(self) -> int:
        return self.mu.shape[0]


def split_scores(scores: np.ndarray, n_modes: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, t): the first Q coordinates a_p and the energy t_p = ||y_p,>Q||^2 beyond them."""
    return scores[:, :n_modes], np.sum(scores[:, n_modes:] ** 2, axis=1)


def expected_sq_dist(a: np.ndarray, tail: np.ndarray, mu: np.ndarray, s: np.ndarray) -> np.ndarray:
    """E_q ||y_p - (w_m, 0)||^2 = ||a_p - mu_m||^2 + Q s_m + t_p, (P, M).

    References
    ----------
    models/mixture.md (eq:mix-resp)
    """
    q = a.shape[1]
    d = np.sum((a[:, None, :] - mu[None, :, :]) ** 2, axis=2)
    return d + q * s[None, :] + tail[:, None]


def update_q_w(a: np.ndarray, r: np.ndarray, sigma2: np.ndarray, prior_var: float) -> tuple[np.ndarray, np.ndarray]:
    """q(w_m) = N(mu_m, s_m I_Q) for every component.

    s_m = (1 / omega^2 + sum_p r[p,m] / sigma_p^2)^-1,
    mu_m = s_m sum_p r[p,m] a_p / sigma_p^2:
    the paper's q(T~_m) (precision-weighted mean of the raters, weights
    r[p, m] Sigma_p^-1) with Sigma_p = sigma_p^2 I in principal
    coordinates and the weak prior w_m ~ N(0, omega^2 I).

    Parameters
    ----------
    a : ndarray (P, Q)
        The raters' first Q principal coordinates.
    r : ndarray (P, M)
    sigma2 : ndarray (P,)
    prior_var : float
        omega^2.

    Returns
    -------
    mu : ndarray (M, Q)
    s : ndarray (M,)

    References
    ----------
    models/mixture.md (eq:mix-qw)
    """
    wts = r / sigma2[:, None]
    s = 1.0 / (1.0 / prior_var + wts.sum(axis=0))
    mu = s[:, None] * (wts.T @ a)
    return mu, s


def update_responsibilities(dist2: np.ndarray, pi: np.ndarray, sigma2: np.ndarray, n_coords: int) -> tuple[np.ndarray, np.ndarray]:
    """r[p, m] proportional to rho[p, m], computed in log space.

    log rho[p,m] = log pi_m - J/2 log(2 pi sigma_p^2) - E||y_p - w_m||^2 / (2 sigma_p^2).

    Parameters
    ----------
    dist2 : ndarray (P, M)
        :func:`expected_sq_dist`.
    pi : ndarray (M,)
    sigma2 : ndarray (P,)
    n_coords : int
        J.

    Returns
    -------
    r, log_rho : ndarray (P, M)

    References
    ----------
    models/mixture.md (eq:mix-resp)
    """
    with np.errstate(divide="ignore"):
        log_pi = np.log(pi)
    log_rho = log_pi[None, :] - 0.5 * n_coords * (LOG2PI + np.log(sigma2))[:, None] - dist2 / (2.0 * sigma2[:, None])
    log_norm = logsumexp(log_rho, axis=1, keepdims=True)
    return np.exp(log_rho - log_norm), log_rho


def update_pi(r: np.ndarray) -> np.ndarray:
    """pi_m = 1/P sum_p r[p, m].

    References
    ----------
    models/mixture.md (eq:mix-pi)
    """
    return r.mean(axis=0)


def update_sigma2(r: np.ndarray, dist2: np.ndarray, n_coords: int, floor: float = 0.0) -> np.ndarray:
    """sigma_p^2 = 1/J sum_m r[p,m] E||y_p - w_m||^2, raised to ``floor``.

    The ELBO in sigma_p^2 is -J/2 log sigma^2 - c / (2 sigma^2) with
    c = sum_m r E||.||^2: unimodal, so the floor is its constrained
    maximiser.

    References
    ----------
    models/mixture.md (eq:mix-sigma)
    """
    return np.maximum(np.sum(r * dist2, axis=1) / n_coords, floor)


def elbo(r: np.ndarray, log_rho: np.ndarray, mu: np.ndarray, s: np.ndarray, prior_var: float) -> float:
    """The evidence lower bound, every term included.

    L = sum_{p,m} r[p,m] (log rho[p,m] - log r[p,m])
        + sum_m [ E_q log N(w_m; 0, omega^2 I) + H(q(w_m)) ],
    with log rho evaluated at the current pi and sigma^2. Frozen components
    contribute constants.

    References
    ----------
    models/mixture.md (eq:mix-elbo)
    """
    q = mu.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        rl = np.where(r > 0, r * (log_rho - np.log(np.where(r > 0, r, 1.0))), 0.0)
    val = float(np.sum(rl))
    if q:
        val += float(np.sum(-0.5 * q * math.log(prior_var) - (np.sum(mu**2, axis=1) + q * s) / (2 * prior_var) + 0.5 * q * (1 + np.log(s))))
    return val


def initial_responsibilities(a: np.ndarray, tail: np.ndarray, r: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """The paper's start for a new component.

    res_p = sum_m ||y_p - T~_m|| (the raters' residuals to every existing
    consensus; the paper sums absolute residuals over voxels, here the
    Euclidean norm in principal coordinates, which the rotation keeps);
    r[p, new] = res_p / sum_p res_p and the old responsibilities are scaled
    by 1 - r[p, new] so that every row sums to one.

    Returns
    -------
    ndarray (P, M + 1)

    References
    ----------
    models/mixture.md (eq:mix-init)
    """
    dist = np.sqrt(np.maximum(np.sum((a[:, None, :] - mu[None]) ** 2, axis=2) + tail[:, None], 0.0))
    res = dist.sum(axis=1)
    total = res.sum()
    new = res / total if total > 0 else np.full(res.shape, 1.0 / res.size)
    return np.concatenate([r * (1 - new)[:, None], new[:, None]], axis=1)


# ----------------------------------------------------------- one stage fit
@dataclass
class StageFit:
    """The outcome of fitting one stage (a fixed set of components)."""

    state: MixState
    trace: list
    converged: bool
    first_r: np.ndarray | None = None  # responsibilities after the first iteration


def fit_stage(scores: np.ndarray, state: MixState, active: np.ndarray, n_modes: int, prior_var: float,
              floor: float, max_iter: int, tol: float) -> StageFit:
    """Coordinate ascent on the ELBO with the components not in ``active`` frozen.

    One iteration: responsibilities, pi, sigma^2, then q(w_m) for the
    active components; each step maximises the ELBO in its block, so the
    recorded ELBO never decreases. Stops when the relative change is below
    ``tol`` or after ``max_iter`` iterations.
    """
    st = state.copy()
    a, tail = split_scores(scores, n_modes)
    j = scores.shape[1]
    trace: list[float] = []
    converged = False
    first_r = None
    for _ in range(max_iter):
        d2 = expected_sq_dist(a, tail, st.mu, st.s)
        st.r, _ = update_responsibilities(d2, st.pi, st.sigma2, j)
        if first_r is None:
            first_r = st.r.copy()
        st.pi = update_pi(st.r)
        st.sigma2 = update_sigma2(st.r, d2, j, floor)
        if active.size:
            mu, s = update_q_w(a, st.r, st.sigma2, prior_var)
            st.mu[active], st.s[active] = mu[active], s[active]
        d2 = expected_sq_dist(a, tail, st.mu, st.s)
        _, log_rho = update_responsibilities(d2, st.pi, st.sigma2, j)
        value = elbo(st.r, log_rho, st.mu, st.s, prior_var)
        trace.append(value)
        if len(trace) > 1 and abs(trace[-1] - trace[-2]) <= tol * max(abs(value), 1.0):
            converged = True
            break
    return StageFit(st, trace, converged, first_r)


# ------------------------------------------------------ the incremental scheme
@dataclass
class SchemeResult:
    """What the incremental scheme found."""

    state: MixState
    n_modes: int
    trace: list
    stage: list  # per iteration: number of components being fitted (0 for the final joint fit)
    fit: list  # per iteration: which fit it belongs to (1, 2, ...; the ELBO climbs within each)
    events: list  # human-readable record of added / removed components
    added_at: list  # iteration (1-based) at which each kept component's fit began
    stop_reason: str
    converged: bool
    first_responsibilities: dict = field(default_factory=dict)  # creation id -> r after its first iteration
    ids: list = field(default_factory=lambda: [1])  # creation id of each kept component


def _modes_for(config: Config, n_added: int, n_coords: int) -> int:
    """Q once ``n_added`` components have been added after the first (never decreases)."""
    q = n_added if config.n_modes is None else int(config.n_modes)
    return int(min(max(q, 0), n_coords))


def _pad(state: MixState, n_modes: int) -> MixState:
    """Extend frozen components to new modes: q(w_m) = N((mu_m, 0), s_m I_Q).

    The mean is 0 on a mode added after the component's fit (its map does
    not change) and q stays isotropic, the form (eq:mix-qw) has.
    """
    st = state.copy()
    q = st.mu.shape[1]
    if q < n_modes:
        st.mu = np.concatenate([st.mu, np.zeros((st.mu.shape[0], n_modes - q))], axis=1)
    return st


def _joiners(r: np.ndarray, m: int, threshold: float) -> np.ndarray:
    return np.flatnonzero(r[:, m] > threshold)


def _prune(state: MixState) -> tuple[MixState, list[int]]:
    """Drop components that no rater has its largest responsibility on."""
    owner = np.argmax(state.r, axis=1)
    keep = np.unique(owner)
    dropped = [int(m) for m in range(state.n_components) if m not in keep]
    if not dropped:
        return state, []
    r = state.r[:, keep]
    r = r / r.sum(axis=1, keepdims=True)
    return MixState(r, state.mu[keep], state.s[keep], update_pi(r), state.sigma2.copy()), dropped


def _starts(scores, base: MixState, q: int, prior_var: float, config: Config, names: list[str]):
    """Initial states for a new component: the paper's residual rule, then one per rater."""
    a, tail = split_scores(scores, q)
    r0 = initial_responsibilities(a, tail, base.r, base.mu)
    mu0, s0 = update_q_w(a, r0, base.sigma2, prior_var)  # q(w_new) from the residual responsibilities
    starts = [("residuals", mu0[-1], float(s0[-1]))]
    if config.seeds == "raters":
        starts += [(f"rater {names[i]}", a[i].copy(), float(base.sigma2[i])) for i in range(len(names))]
    for label, mu_new, s_new in starts:
        yield label, MixState(r0.copy(), np.vstack([base.mu, mu_new[None]]), np.append(base.s, s_new), update_pi(r0), base.sigma2.copy())


def run_scheme(scores: np.ndarray, config: Config, *, max_iter: int, tol: float, names: list[str],
               progress=None) -> SchemeResult:
    """Variational boosting: add components one at a time (module docstring).

    Components are named by their order of creation (#1, #2, ...) in the
    event log; the result orders them by decreasing pi at the end.

    Parameters
    ----------
    scores : ndarray (P, J)
        Principal coordinates of the raters.
    config : Config
    max_iter, tol : per stage fit.
    names : list of str
        Rater names, for the event log.

    References
    ----------
    models/mixture.md (eq:mix-init)
    """
    p, j = scores.shape
    spread = float(np.mean(scores**2)) if j else 0.0
    prior_var = _prior_var(scores, config)
    floor = config.min_variance * max(spread, 1e-300)
    if j == 0:
        st = MixState(np.ones((p, 1)), np.zeros((1, 0)), np.ones(1), np.ones(1), np.full(p, max(floor, 1e-300)))
        return SchemeResult(st, 0, [0.0], [1], [1], ["the raters' maps are identical: one component"], [1],
                            "the raters' maps are identical (no principal mode)", True)
    trace: list[float] = []
    stage: list[int] = []
    events: list[str] = []
    first_r: dict = {}
    # component #1 alone
    n_added = 0
    q = _modes_for(config, n_added, j)
    st = MixState(np.ones((p, 1)), np.zeros((1, q)), np.full(1, prior_var), np.ones(1), np.full(p, max(spread, floor)))
    f = fit_stage(scores, st, np.array([0]), q, prior_var, floor, max_iter, tol)
    st, converged = f.state, f.converged
    trace += f.trace
    stage += [1] * len(f.trace)
    fits = [1] * len(f.trace)
    ids, added_at = [1], [1]
    events.append(f"#1: all {p} raters ({len(f.trace)} iterations)")
    stop = f"max_components={config.max_components} reached"
    with bar("mixture VB", total=config.max_components, progress=progress) as pb:
        pb.advance(info=f"M=1 ELBO {trace[-1]:.6g}")
        while st.n_components < config.max_components:
            m_new, new_id = st.n_components, n_added + 2
            q_next = _modes_for(config, n_added + 1, j)
            base = _pad(st, q_next)
            active = np.array([m_new])
            best = None
            for label, cand in _starts(scores, base, q_next, prior_var, config, names):
                fc = fit_stage(scores, cand, active, q_next, prior_var, floor, max_iter, tol)
                n_join = _joiners(fc.state.r, m_new, config.join_threshold).size
                key = (n_join >= config.min_joiners, fc.trace[-1])
                if best is None or key > best[0]:
                    best = (key, label, fc, n_join)
            (ok, _), label, f, n_join = best
            if not ok:
                top = float(f.state.r[:, m_new].max())
                stop = (f"fewer than min_joiners={config.min_joiners} raters join component #{new_id} "
                        f"(best start: {label}; {n_join} joined, largest responsibility {top:.3f})")
                events.append(f"#{new_id} rejected: {stop}")
                break
            # log M! for the M! labellings of a mixture that q(z, w) sees one of
            gain = (f.trace[-1] + math.lgamma(m_new + 2)) - (trace[-1] + math.lgamma(m_new + 1))
            if config.stop_rule == "joins+elbo" and not gain > 0:
                stop = (f"the ELBO does not rise with component #{new_id} ({gain:+.3g} nats with the log M! "
                        f"correction; best start: {label}, joined by {n_join})")
                events.append(f"#{new_id} rejected: {stop}")
                break
            n_added, q = n_added + 1, q_next
            first_r[new_id] = f.first_r
            added_at.append(len(trace) + 1)
            ids.append(new_id)
            trace += f.trace
            stage += [m_new + 1] * len(f.trace)
            fits += [fits[-1] + 1] * len(f.trace)
            converged = f.converged
            who = ", ".join(names[i] for i in _joiners(f.state.r, m_new, config.join_threshold))
            events.append(f"#{new_id} added (start: {label}; joined by {who}; {len(f.trace)} iterations)")
            st, dropped = _prune(f.state)
            for k in sorted(dropped, reverse=True):
                events.append(f"#{ids[k]} removed: no rater belongs to it any more")
                ids.pop(k)
                added_at.pop(k)
            pb.advance(info=f"M={st.n_components} ELBO {trace[-1]:.6g}")
    st = _pad(st, q)
    if config.refine and st.n_components > 1 and q > 0:
        for _ in range(st.n_components):
            f = fit_stage(scores, st, np.arange(st.n_components), q, prior_var, floor, max_iter, tol)
            trace += f.trace
            stage += [0] * len(f.trace)
            fits += [fits[-1] + 1] * len(f.trace)
            converged = f.converged
            st, dropped = _prune(f.state)
            events.append(f"joint fit of {', '.join(f'#{i}' for i in ids)} ({len(f.trace)} iterations)")
            for k in sorted(dropped, reverse=True):
                events.append(f"#{ids[k]} removed after the joint fit: no rater belongs to it")
                ids.pop(k)
                added_at.pop(k)
            if not dropped:
                break
    return SchemeResult(st, q, trace, stage, fits, events, added_at, stop, converged, first_r, ids)


# ------------------------------------------------------- streamed passes
#: Voxels per block of the Gram pass: link coordinates of a block are
#: materialised in float64 (P x block x D), then one matrix product per
#: pair of coordinates.
GRAM_BLOCK = 1 << 16


@njit(parallel=True, cache=True)
def _coords_block(X, mode, start, out):
    """out[d, p, i] = D~[p, start + i, d] (class-first, so each (d, p) row is contiguous)."""
    D, P, B = out.shape
    for i in prange(B):
        v = np.empty(D)
        for p in range(P):
            G.load_d(X, p, start + i, mode, v)
            for d in range(D):
                out[d, p, i] = v[d]


def gram_matrices(kd: G.KernelData, block: int = GRAM_BLOCK) -> np.ndarray:
    """Class-resolved Gram matrices of the raters' link maps, in one pass.

    G[d, e, p, q] = sum_n D~[p, n, d] D~[q, n, e] (float64). Their trace
    over (d, e) is the Gram matrix of the whole maps (the PCA's input); the
    blocks give the paper's voxel-level covariances without another pass
    (:func:`voxel_covariances`). Each block of voxels is written class-first
    in float64, then one matrix product per pair of coordinates.

    Parameters
    ----------
    kd : KernelData
        The raters' maps (``bayesfuse.gaussian.prepare``).
    block : int
        Voxels per block (does not change the result beyond rounding).

    Returns
    -------
    ndarray (D, D, P, P)

    References
    ----------
    models/mixture.md (eq:mix-pca)
    """
    p, n, d = kd.n_raters, kd.n_voxels, kd.dim
    out = np.zeros((d, d, p, p))
    buf = np.empty((d, p, min(block, n)))
    for s in range(0, n, block):
        b = min(block, n - s)
        c = buf[:, :, :b] if b == buf.shape[2] else np.empty((d, p, b))
        _coords_block(kd.X, kd.mode, s, c)
        for i in range(d):
            for k in range(i, d):
                g = c[i] @ c[k].T
                out[i, k] += g
                if k != i:
                    out[k, i] += g.T
    return out


def map_coefficients(pc: Principal, mu: np.ndarray, n_modes: int) -> np.ndarray:
    """A[m, p]: the consensus maps as combinations of the raters' link maps.

    T~_m = mean + sum_{j<=Q} mu_mj U_j with U_j = sum_p B[j, p] D~_p gives
    A[m, p] = 1/P + sum_{j<=Q} mu_mj B[j, p] (each row sums to one because
    the modes are centred).

    References
    ----------
    models/mixture.md (eq:mix-back)
    """
    p = pc.n_raters
    b = pc.mode_weights()[:n_modes]
    return np.full((mu.shape[0], p), 1.0 / p) + mu[:, :n_modes] @ b


def voxel_covariances(grams: np.ndarray, coef: np.ndarray, b: np.ndarray, s: np.ndarray, r: np.ndarray, n_voxels: int) -> np.ndarray:
    """The paper's per-rater covariance at the voxels, from the Gram matrices.

    Sigma_p = 1/N sum_n sum_m r[p,m] [ (D~_pn - T~_mn)(D~_pn - T~_mn)' + S_m[n] ]
    with T~_m = sum_q A[m,q] D~_q and S_m[n] = s_m sum_j U_j[n] U_j[n]':
    both sums over voxels are quadratic forms of the class-resolved Gram
    matrices, so no pass over the volume is needed. This is the paper's
    M-step for Sigma_p (supplement 1.2) evaluated at the fitted consensus
    maps; it reports each rater's agreement with its component voxel by
    voxel (it is not used by the fit, which runs in principal coordinates).

    Parameters
    ----------
    grams : ndarray (D, D, P, P)
    coef : ndarray (M, P)
        :func:`map_coefficients`.
    b : ndarray (Q, P)
        Mode weights of the Q modes the maps use.
    s, r : ndarray (M,), (P, M)
    n_voxels : int

    Returns
    -------
    ndarray (P, D, D)

    References
    ----------
    models/mixture.md (eq:mix-voxel-sigma)
    """
    p = coef.shape[1]
    eye = np.eye(p)
    out = np.zeros((p,) + grams.shape[:2])
    mode_form = np.einsum("jp,deps,js->de", b, grams, b) if b.size else np.zeros(grams.shape[:2])
    for m in range(coef.shape[0]):
        c = eye - coef[m][None, :]  # row p: D~_p - T~_m as a combination of the raters
        quad = np.einsum("pq,deqs,ps->pde", c, grams, c)
        out += r[:, m][:, None, None] * (quad + s[m] * mode_form[None])
    return out / n_voxels


@njit(parallel=True, cache=True)
def _maps_kernel(X, mode, A, B, s_main, main, code, basis, fg_out, lab_out, prob_out, mu_out, S_out, block):
    P, N = X.shape[0], X.shape[1]
    M = A.shape[0]
    Q = B.shape[0]
    D = mu_out.shape[1]
    K = prob_out.shape[1]
    two = fg_out.shape[0] > 0
    nb = (N + block - 1) // block
    for ib in prange(nb):
        d = np.empty((P, D))
        t = np.empty(D)
        u = np.empty(D)
        pk = np.empty(K)
        for n in range(ib * block, min(N, (ib + 1) * block)):
            for p in range(P):
                G.load_d(X, p, n, mode, d[p])
            for m in range(M):
                for i in range(D):
                    acc = 0.0
                    for p in range(P):
                        acc += A[m, p] * d[p, i]
                    t[i] = acc
                G.inverse_link(t, code, basis, pk)
                if two:
                    fg_out[m, n] = pk[1]
                else:
                    best = 0
                    for k in range(1, K):
                        if pk[k] > pk[best]:
                            best = k
                    lab_out[m, n] = best
                if m == main:
                    for k in range(K):
                        prob_out[n, k] = pk[k]
                    for i in range(D):
                        mu_out[n, i] = t[i]
            for i in range(D):
                for e in range(D):
                    S_out[n, i, e] = 0.0
            for j in range(Q):
                for i in range(D):
                    acc = 0.0
                    for p in range(P):
                        acc += B[j, p] * d[p, i]
                    u[i] = acc
                for i in range(D):
                    for e in range(D):
                        S_out[n, i, e] += s_main * u[i] * u[e]


def component_maps(kd: G.KernelData, coef: np.ndarray, b: np.ndarray, s_main: float, main: int = 0) -> dict:
    """The consensus maps mapped back to the voxels, in one pass.

    Parameters
    ----------
    kd : KernelData
    coef : ndarray (M, P)
        :func:`map_coefficients`.
    b : ndarray (Q, P)
        Mode weights (for the main component's posterior covariance).
    s_main : float
        s_m of the main component: q(T~_main[n]) = N(mu_T[n], s_m sum_j U_j[n] U_j[n]').
    main : int
        The component whose full q(T~) is returned.

    Returns
    -------
    dict
        ``foreground`` (M, N) float32 (two classes) or ``labels`` (M, N)
        uint8 (K > 2); ``probability`` (N, K), ``mu_T`` (N, D) and ``S_T``
        (N, D, D) of the main component, float32.

    References
    ----------
    models/mixture.md (eq:mix-back)
    """
    space = kd.space
    p, n, d, k = kd.n_raters, kd.n_voxels, kd.dim, space.n_classes
    m = coef.shape[0]
    two = k == 2
    fg = np.empty((m, n) if two else (0, n), np.float32)
    lab = np.empty((0, n) if two else (m, n), np.uint8)
    prob = np.empty((n, k), np.float32)
    mu = np.empty((n, d), np.float32)
    S = np.empty((n, d, d), np.float32)
    bb = np.ascontiguousarray(b, dtype=np.float64).reshape(-1, p)
    _maps_kernel(kd.X, kd.mode, np.ascontiguousarray(coef, dtype=np.float64), bb, float(s_main), int(main),
                 space.inverse_code, np.ascontiguousarray(space.basis), fg, lab, prob, mu, S, G.BLOCK)
    out = {"probability": prob, "mu_T": mu, "S_T": S}
    if two:
        out["foreground"] = fg
    else:
        out["labels"] = lab
    return out


# ---------------------------------------------------------------------- fit
def _order_components(state: MixState, names: list[str]) -> np.ndarray:
    """Largest pi first; ties broken by the smallest member's name (moves with the raters)."""
    owner = np.argmax(state.r, axis=1)
    first_name = []
    for m in range(state.n_components):
        members = sorted(names[i] for i in np.flatnonzero(owner == m))
        first_name.append(members[0] if members else "\uffff")
    keys = [(-round(float(state.pi[m]), 12), first_name[m]) for m in range(state.n_components)]
    return np.array(sorted(range(state.n_components), key=lambda m: keys[m]))


def prepare_principal(data: RaterMaps, config: Config) -> tuple[G.KernelData, np.ndarray, Principal, np.ndarray | None]:
    """The raters' link maps, their Gram matrices and principal coordinates.

    Voxels outside the region of interest are left out.
    """
    roi = data.roi()
    voxels = None if roi is None else np.flatnonzero(roi.reshape(-1))
    kd = G.prepare(data, config.link, voxels=voxels)
    grams = gram_matrices(kd)
    gram = np.einsum("ddpq->pq", grams)
    return kd, grams, principal_coordinates(gram), roi


def fit(
    data: RaterMaps,
    config: Config | None = None,
    *,
    max_iter: int = 500,
    tol: float = 1e-9,
    random_seed=None,
    progress: bool | None = None,
    method: str = "mixture",
) -> FusionResult:
    """Fuse raters into one or several consensus maps (mixture of consensuses).

    Parameters
    ----------
    data : RaterMaps
        Masks, labels or probability maps, K classes.
    config : Config, optional
    max_iter : int
        Iterations per stage fit (each candidate start, and the joint fit).
    tol : float
        Relative change of the ELBO below which a stage fit stops.
    random_seed : optional
        Accepted for the contract; the fit is deterministic.
    progress : bool, optional
    method : str

    Returns
    -------
    FusionResult
        ``/consensus``: the main component (largest pi); ``/maps``:
        ``components`` (component, *spatial), the foreground of every
        component's consensus (K = 2) or ``component_labels`` (K > 2);
        ``/raters``: ``responsibility`` (rater, component), ``component``
        (the argmax), ``sigma2`` (variance per principal coordinate) and the
        voxel-level covariance ``sigma`` (rater, coord, coord2);
        ``/variational``: q(w) (``w_mean``, ``w_var``), ``pi``, the PCA
        (``eigenvalues``, ``scores``) and the main component's ``mu_T`` /
        ``S_T``; ``/optimizer``: the ELBO per iteration with ``stage`` (the
        number of components fitted at that iteration, 0 for the joint fit)
        and attrs ``n_components``, ``n_modes``, ``added_at``, ``events``,
        ``stop_reason``.
    """
    config = config or Config()
    t0 = time.perf_counter()
    if data.n_raters < 2:
        raise InputError(data._who(), "the mixture needs at least two raters")
    kd, grams, pc, roi = prepare_principal(data, config)
    names = data.rater_names
    scheme = run_scheme(pc.scores, config, max_iter=max_iter, tol=tol, names=names, progress=progress)
    st = scheme.state
    order = _order_components(st, names)
    st = MixState(st.r[:, order], st.mu[order], st.s[order], st.pi[order], st.sigma2)
    q = scheme.n_modes
    coef = map_coefficients(pc, st.mu, q)
    b = pc.mode_weights()[:q]
    maps = component_maps(kd, coef, b, float(st.s[0]) if q else 0.0, main=0)
    sigma_vox = voxel_covariances(grams, coef, b, st.s, st.r, kd.n_voxels)
    if not (np.all(np.isfinite(st.r)) and np.all(np.isfinite(maps["probability"]))):
        raise FloatingPointError(f"{method}: the fit produced non-finite values")
    return _build(data, config, method, kd, pc, scheme, st, maps, sigma_vox, roi, time.perf_counter() - t0)


def _full(values: np.ndarray, shape: tuple, roi, fill) -> np.ndarray:
    """Scatter per-voxel values (N, ...) onto the grid, ``fill`` outside the ROI."""
    if roi is None:
        return values.reshape(shape + values.shape[1:])
    out = np.full(shape + values.shape[1:], fill, dtype=values.dtype)
    out[roi] = values
    return out


def _build(data, config, method, kd, pc, scheme, st, maps, sigma_vox, roi, seconds) -> FusionResult:
    shape, sdims = data.shape, data.spatial_dims
    space = kd.space
    k, d = space.n_classes, space.dim
    m = st.n_components
    comp = np.arange(m)
    bg = np.zeros(k, np.float32)
    bg[0] = 1.0
    prob = maps["probability"]
    if roi is not None:
        full = np.empty(shape + (k,), np.float32)
        full[...] = bg
        full[roi] = prob
        prob = full
    else:
        prob = prob.reshape(shape + (k,))
    coords = space.coord_labels()
    mu_T = _full(maps["mu_T"], shape, roi, 0.0)
    S_T = _full(maps["S_T"], shape, roi, 0.0)
    name, per = ("components", maps["foreground"]) if "foreground" in maps else ("component_labels", maps["labels"])
    comp_maps = {name: (("component",) + sdims, _full(per.T, shape, roi, 0).transpose((len(shape),) + tuple(range(len(shape)))))}
    maps_ds = xr.Dataset(comp_maps, coords={"component": comp})
    for v in maps_ds.data_vars:
        maps_ds[v].attrs["description"] = f"bayesfuse {method} consensus of each component"
    owner = np.argmax(st.r, axis=1)
    raters = xr.Dataset(
        {
            "responsibility": (("rater", "component"), st.r),
            "assigned": (("rater",), owner.astype(np.int64)),
            "sigma2": (("rater",), st.sigma2),
            "sigma": (("rater", "coord", "coord2"), sigma_vox),
        },
        coords={"component": comp, "coord": coords, "coord2": coords},
    )
    j = pc.n_coords
    variational = xr.Dataset(
        {
            "w_mean": (("component", "mode"), st.mu[:, : scheme.n_modes]),
            "w_var": (("component",), st.s),
            "pi": (("component",), st.pi),
            "eigenvalues": (("pc",), pc.eigenvalues),
            "scores": (("rater", "pc"), pc.scores),
            "mu_T": (sdims + ("coord",), mu_T),
            "S_T": (sdims + ("coord", "coord2"), S_T),
        },
        coords={"component": comp, "mode": np.arange(scheme.n_modes), "pc": np.arange(j), "coord": coords, "coord2": coords},
        attrs={"link": config.link, "n_modes": scheme.n_modes, "n_coords": j,
               "prior_var": float(_prior_var(pc.scores, config)),
               "note": "mu_T, S_T: q(T~) of the main component (component 0) in link space"},
    )
    variational = variational.assign_coords(rater=data.rater_names)
    result = FusionResult.build(
        method=method,
        data=data,
        config=config,
        probability=prob,
        variational=variational,
        raters=raters,
        objective=np.asarray(scheme.trace),
        objective_name="ELBO (per stage: components frozen while a new one is fitted)",
        converged=scheme.converged,
        stop_reason=scheme.stop_reason,
        seconds=seconds,
        maps=maps_ds,
        attrs={"n_components": int(m)},
    )
    opt = result.tree["optimizer"].to_dataset()
    opt["stage"] = ("iteration", np.asarray(scheme.stage, dtype=np.int64))
    opt["fit"] = ("iteration", np.asarray(scheme.fit, dtype=np.int64))
    opt.attrs.update(
        n_components=int(m),
        n_modes=int(scheme.n_modes),
        added_at=[int(a) for a in scheme.added_at],
        events="\n".join(scheme.events),
    )
    result.tree["optimizer"] = xr.DataTree(opt)
    return result


def _prior_var(scores: np.ndarray, config: Config) -> float:
    spread = float(np.mean(scores**2)) if scores.size else 0.0
    return (config.prior_scale**2) * max(spread, 1e-300)


# --------------------------------------------------------------------- PyMC
def fixed_from_result(result: FusionResult) -> dict:
    """The point estimates the VB treats as Dirac (pi, sigma^2) and the model's size.

    ``build_model(hyper="fixed", fixed=...)`` pins them, so that NUTS
    samples exactly the posterior of the component weights w that q(w)
    approximates (with Z summed out).
    """
    var = result.group("variational")
    return {
        "pi": var["pi"].values.tolist(),
        "sigma2": result.group("raters")["sigma2"].values.tolist(),
        "n_components": int(var.sizes["component"]),
        "n_modes": int(var.attrs["n_modes"]),
        "prior_var": float(var.attrs["prior_var"]),
        "w_mean": var["w_mean"].values.tolist(),
    }


def build_model(data: RaterMaps, config: Config | None = None, hyper: str = "fixed", fixed: dict | None = None):
    """The mixture with Z summed out, on the raters' principal coordinates.

    log p(y) = sum_p logsumexp_m [ log pi_m + log N(y_p; (w_m, 0), sigma_p^2 I_J) ]
    (eq:mix-marginal), a ``pm.Potential``; w (component, mode) has the weak
    prior N(0, omega^2) of the VB. The deterministic ``responsibility``
    (rater, component) is p(z_p = m | y, w): its posterior mean over NUTS
    draws is p(z_p = m | y), which the VB's r approximates.

    Parameters
    ----------
    data : RaterMaps
        The principal coordinates are recomputed from it as ``fit`` does.
    hyper : {"fixed", "prior"}
        ``fixed``: pi and sigma^2 pinned at ``fixed`` (from
        :func:`fixed_from_result`), as the VB's point estimates.
        ``prior``: pi ~ Dirichlet(1), sigma_p^2 ~ InverseGamma(1, v) with v
        the raters' mean variance per coordinate.
    fixed : dict
        ``n_components`` and ``n_modes`` (required), ``pi``, ``sigma2``,
        ``prior_var``.

    Notes
    -----
    Label switching: the posterior has one mode per labelling of the
    components (exactly symmetric when pi is uniform). With ``fixed["w_mean"]``
    the chains start at the VB's means, so they explore the VB's labelling
    when the components are well apart; :func:`match_components` relabels
    each chain to the VB's components (Hungarian matching on the means)
    when they are not.

    References
    ----------
    models/mixture.md (eq:mix-model), (eq:mix-marginal)
    """
    import pymc as pm
    import pytensor.tensor as pt

    config = config or Config()
    if hyper not in ("fixed", "prior"):
        raise ConfigError(f"hyper must be 'fixed' or 'prior', not {hyper!r}")
    fixed = dict(fixed or {})
    if "n_components" not in fixed:
        raise ConfigError("mixture: build_model needs fixed={'n_components': M, 'n_modes': Q, ...} (see fixed_from_result)")
    _, _, pc, _ = prepare_principal(data, config)
    m = int(fixed["n_components"])
    q = int(min(fixed.get("n_modes", m - 1), pc.n_coords))
    a, tail = split_scores(pc.scores, q)
    j = pc.n_coords
    spread = float(np.mean(pc.scores**2)) if j else 1.0
    prior_var = float(fixed.get("prior_var", _prior_var(pc.scores, config)))
    coords = {"rater": data.rater_names, "component": np.arange(m), "mode": np.arange(q)}
    with pm.Model(coords=coords) as model:
        a_d = pm.Data("scores", a, dims=("rater", "mode"))
        t_d = pm.Data("tail", tail, dims="rater")
        # chains start at the VB's means (nutpie jitters by U(-1, 1)), in its labelling
        start = np.asarray(fixed["w_mean"], dtype=float).reshape(m, -1)[:, :q] if "w_mean" in fixed else None
        w = pm.Normal("w", 0.0, math.sqrt(prior_var), dims=("component", "mode"), initval=start)
        if hyper == "fixed":
            if "pi" not in fixed or "sigma2" not in fixed:
                raise ConfigError("mixture: hyper='fixed' needs fixed['pi'] and fixed['sigma2'] (see fixed_from_result)")
            pi = pm.Data("pi", np.asarray(fixed["pi"], dtype=float), dims="component")
            sigma2 = pm.Data("sigma2", np.asarray(fixed["sigma2"], dtype=float), dims="rater")
        else:
            pi = pm.Dirichlet("pi", a=np.ones(m), dims="component")
            sigma2 = pm.InverseGamma("sigma2", alpha=1.0, beta=spread, dims="rater")
        d2 = pt.sum((a_d[:, None, :] - w[None, :, :]) ** 2, axis=2) + t_d[:, None]
        logp = pt.log(pi)[None, :] - 0.5 * j * pt.log(2 * np.pi * sigma2)[:, None] - d2 / (2 * sigma2[:, None])
        pm.Potential("mixture", pm.math.logsumexp(logp, axis=1).sum())
        pm.Deterministic("responsibility", pt.special.softmax(logp, axis=1), dims=("rater", "component"))
    return model


def match_components(w: xr.DataArray, reference: np.ndarray) -> xr.DataArray:
    """Relabel the components of every chain to match ``reference`` (label switching).

    For each chain, the permutation minimising sum_m ||mean_chain(w_m) -
    reference_m||^2 is found by the Hungarian algorithm and applied to all
    draws of that chain.

    Parameters
    ----------
    w : DataArray (chain, draw, component, ...)
    reference : ndarray (M, ...)
        E.g. the VB's means ``w_mean``.

    Returns
    -------
    DataArray, same dims, components permuted per chain.
    """
    from scipy.optimize import linear_sum_assignment

    out = w.copy()
    ref = np.asarray(reference, dtype=float).reshape(reference.shape[0], -1)
    for c in range(w.sizes["chain"]):
        chain = w.isel(chain=c).transpose("draw", "component", ...).values
        mean = chain.mean(axis=0).reshape(chain.shape[1], -1)
        cost = ((mean[:, None, :] - ref[None, :, :]) ** 2).sum(axis=2)
        rows, cols = linear_sum_assignment(cost)
        perm = np.empty_like(cols)
        perm[cols] = rows  # reference component k takes chain component perm[k]
        out[{"chain": c}] = w.isel(chain=c).isel(component=perm).values
    return out


def posterior_draws(result: FusionResult, n: int = 1000, region=None, random_seed=None) -> xr.DataTree:
    """Draws of the component weights from q(w_m) = N(mu_m, s_m I_Q).

    Named and shaped as the PyMC model's ``w`` (component, mode), one
    chain. ``region`` is accepted for the common contract and ignored: w
    is global (the maps it gives need the raters' modes, i.e. the data).

    References
    ----------
    models/mixture.md (eq:mix-qw)
    """
    var = result.group("variational")
    mu = var["w_mean"].values
    s = var["w_var"].values
    rng = np.random.default_rng(random_seed)
    draws = mu[None] + np.sqrt(s)[None, :, None] * rng.standard_normal((int(n),) + mu.shape)
    # the PyMC model's deterministic p(z_p = m | y, w) at each draw (pi, sigma^2 pinned)
    q = mu.shape[1]
    a, tail = split_scores(var["scores"].values, q)
    sigma2 = result.group("raters")["sigma2"].values
    pi = var["pi"].values
    j = var.sizes["pc"]
    resp = np.empty((int(n), a.shape[0], mu.shape[0]))
    for i in range(int(n)):
        d2 = expected_sq_dist(a, tail, draws[i], np.zeros(mu.shape[0]))
        resp[i], _ = update_responsibilities(d2, pi, sigma2, j)
    # responsibility first: tools that lay every variable out in the
    # dataset's dim order then keep (rater, component) as the PyMC model has it
    post = xr.Dataset(
        {
            "responsibility": (("chain", "draw", "rater", "component"), resp[None]),
            "w": (("chain", "draw", "component", "mode"), draws[None]),
        },
        coords={"chain": [0], "draw": np.arange(int(n)), "component": var["component"].values,
                "mode": var["mode"].values, "rater": result.rater_names},
        attrs={"approximation": "mean-field VB q(w_m) (models/mixture.md eq:mix-qw)"},
    )
    return xr.DataTree.from_dict({"/posterior": post})


def simulate(config: Config | None = None, shape=(32, 32, 24), n_raters: int = 6, random_seed=None,
             n_components: int = 2, noise: float = 0.1) -> tuple[RaterMaps, dict]:
    """Raters drawn from the paper's voxel-level story of the mixture.

    M truths (a ball, with a lobe added for truth 1 and a bite removed for
    truth 2, ...); raters assigned to truths in contiguous blocks; rater p's
    link map is F(truth) + iid Gaussian noise of sd ``noise`` (times a
    per-rater factor in [0.5, 1.5]), mapped back to probabilities by F^-1
    (square-root link).

    Returns
    -------
    RaterMaps, dict
        Probability maps and ``{"truths", "membership", "noise"}``.
    """
    rng = np.random.default_rng(random_seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grid))
    truths = []
    for m in range(n_components):
        t = r < 0.5
        if m:
            centre = np.zeros(len(shape))
            centre[(m - 1) % len(shape)] = 0.5 if m % 2 else -0.5
            ball = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) < 0.4
            t = (t | ball) if m % 2 else (t & ~ball)
        truths.append(t.astype(np.uint8))
    membership = np.repeat(np.arange(n_components), [len(b) for b in np.array_split(np.arange(n_raters), n_components)])
    sd = noise * rng.uniform(0.5, 1.5, n_raters)
    maps = []
    for i in range(n_raters):
        t = truths[membership[i]].astype(float)
        link = np.stack([np.sqrt(1 - t), np.sqrt(t)], axis=-1) + sd[i] * rng.standard_normal(shape + (2,))
        sq = link**2
        maps.append((sq[..., 1] / sq.sum(axis=-1)).astype(np.float32))
    data = RaterMaps.from_arrays(maps, kind="probability")
    return data, {"truths": np.stack(truths), "membership": membership, "noise": sd}
