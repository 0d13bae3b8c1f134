"""Gaussian pieces in link space, shared by the robust model and the mixture.

The robust Student-t fusion (``models/robust_t.md``) and the mixture of
consensuses (MODELS.md section 2) both put a Gaussian on the raters' maps in
link space, ``D~[p, n] ~ N(T~[n] (+ b_p), Sigma_p / w[n, p])``, with per-rater
K x K covariances and per-voxel (tau^) or per-rater (responsibility) weights.
This module holds what they share, written once:

- :class:`LinkSpace`: the working coordinates of a link. The square-root link
  keeps all K coordinates (D~ lies on the unit sphere of R^K, which spans
  R^K). The logit and identity links map the simplex into a (K-1)-dimensional
  subspace (the centred log-ratios, resp. p - 1/K, sum to zero), where a full
  K x K covariance is singular; they are written in an orthonormal
  (Helmert) basis of that subspace, so the Gaussian lives in R^(K-1). For
  K = 2 the logit coordinate is the log-odds / sqrt(2).
- kernel storage of the data (:func:`prepare`): a two-class foreground map is
  kept as given, (P, N, 1) float32, and the link is applied inside the
  kernels; anything else is stored once in link coordinates (P, N, D).
- small dense algebra: Cholesky-based inverse and log-determinant of batches
  of D x D matrices (:func:`inv_logdet`), Mahalanobis forms
  (:func:`mahalanobis`), and their ``numba`` counterparts for fused kernels.
- the weighted q(T) update (:func:`update_q_T`), the per-rater covariance
  M-step (:func:`covariance_m_step`), and probability-space summaries of a
  Gaussian q in link space (:func:`probability_summaries`).

Conventions: voxel arrays of the kernels are class-first, ``mu[d, n]`` (so
each coordinate is one contiguous volume, which the spatial prior's mode
products need); per-voxel covariances are ``S[n, d, e]``; per-rater
quantities are ``Sigma[p, d, e]``, ``bias[p, d]``. Sums over voxels are
accumulated in float64 whatever the storage type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from .data import RaterMaps
from .links import EPS, get_link

#: Data modes of the fused kernels: how ``X[p, n, :]`` becomes D~[p, n].
MODE_PRE = 0  # X holds link coordinates already, (P, N, D)
MODE_SQRT2 = 1  # X holds a two-class foreground p, (P, N, 1): D~ = (sqrt(1-p), sqrt(p))
MODE_LOGIT2 = 2  # foreground p: D~ = (log p - log(1-p)) / sqrt(2), p clipped to [EPS, 1-EPS]
MODE_IDENT2 = 3  # foreground p: D~ = (2p - 1) / sqrt(2)

#: Link codes of the inverse map inside kernels.
INV_SQRT, INV_LOGIT, INV_IDENT = 0, 1, 2

#: Voxels per block of the parallel kernels: large enough to amortise the
#: per-block scratch, small enough to balance two to a few dozen threads.
BLOCK = 8192


# --------------------------------------------------------------------- links
def helmert_basis(k: int) -> np.ndarray:
    """Orthonormal basis (K, K-1) of the sum-zero subspace of R^K.

    Column j (1-based) is (-1, ..., -1, j, 0, ..., 0) / sqrt(j (j + 1)) with j
    entries -1: it contrasts class j with the classes below it, so for K = 2
    the single coordinate grows with the foreground.
    """
    h = np.zeros((k, k - 1))
    for j in range(1, k):
        h[:j, j - 1] = -1.0
        h[j, j - 1] = j
        h[:, j - 1] /= math.sqrt(j * (j + 1))
    return h


@dataclass(frozen=True)
class LinkSpace:
    """The working coordinates of a link for K classes.

    Attributes
    ----------
    link : {"sqrt", "logit", "identity"}
    n_classes : int
        K.
    dim : int
        D, the dimension of the Gaussian: K for ``sqrt``, K - 1 otherwise.
    basis : ndarray (K, D)
        For ``logit`` / ``identity``: the Helmert basis; coordinates are
        ``r = F(p) @ basis`` (after centring, for identity). The identity
        matrix for ``sqrt``.
    """

    link: str
    n_classes: int
    dim: int = field(init=False)
    basis: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        get_link(self.link)  # validates the name
        if self.n_classes < 2:
            raise ValueError(f"a link space needs at least two classes, got {self.n_classes}")
        k = self.n_classes
        if self.link == "sqrt":
            object.__setattr__(self, "dim", k)
            object.__setattr__(self, "basis", np.eye(k))
        else:
            object.__setattr__(self, "dim", k - 1)
            object.__setattr__(self, "basis", helmert_basis(k))

    @property
    def inverse_code(self) -> int:
        return {"sqrt": INV_SQRT, "logit": INV_LOGIT, "identity": INV_IDENT}[self.link]

    def coord_labels(self) -> list[str]:
        """Labels of the D coordinates (class indices for sqrt, ``ilr<j>`` otherwise)."""
        if self.link == "sqrt":
            return [str(k) for k in range(self.n_classes)]
        prefix = "ilr" if self.link == "logit" else "c"
        return [f"{prefix}{j}" for j in range(1, self.dim + 1)]

    def forward(self, p: np.ndarray) -> np.ndarray:
        """Link coordinates (..., D) of probabilities (..., K), in float64."""
        p = np.asarray(p, dtype=np.float64)
        r = get_link(self.link).forward(p)
        if self.link == "sqrt":
            return r
        if self.link == "identity":
            r = r - 1.0 / self.n_classes
        return r @ self.basis

    def inverse(self, r: np.ndarray) -> np.ndarray:
        """Probabilities (..., K) of link coordinates (..., D)."""
        r = np.asarray(r, dtype=np.float64)
        if self.link == "sqrt":
            return get_link("sqrt").inverse(r)
        full = r @ self.basis.T
        if self.link == "identity":
            full = full + 1.0 / self.n_classes
        return get_link(self.link).inverse(full)

    def to_class_space(self, r: np.ndarray, cov: bool = False) -> np.ndarray:
        """Coordinates (..., D) (or covariances (..., D, D)) expressed over the K classes.

        For sqrt this is the identity; for logit it gives centred log-ratios
        (the covariance then has rank K - 1).
        """
        b = self.basis
        if cov:
            return b @ r @ b.T
        return r @ b.T


def link_space(link: str, n_classes: int) -> LinkSpace:
    """The :class:`LinkSpace` of ``link`` for ``n_classes`` classes."""
    return LinkSpace(link, int(n_classes))


@dataclass(frozen=True)
class KernelData:
    """The raters' maps as the fused kernels read them.

    Attributes
    ----------
    X : ndarray (P, N, C), float32
        C = 1 (a foreground map, the link applied inside the kernels) or D
        (link coordinates).
    mode : int
        One of the ``MODE_*`` constants.
    space : LinkSpace
    """

    X: np.ndarray
    mode: int
    space: LinkSpace

    @property
    def n_raters(self) -> int:
        return self.X.shape[0]

    @property
    def n_voxels(self) -> int:
        return self.X.shape[1]

    @property
    def dim(self) -> int:
        return self.space.dim

    def coords(self, dtype=np.float64) -> np.ndarray:
        """D~ materialised, (P, N, D): for small problems and tests."""
        return link_coords(self.X, self.mode, self.space.dim).astype(dtype, copy=False)

    def subset(self, index: np.ndarray) -> "KernelData":
        """The same data on a subset of voxels (index into N)."""
        return KernelData(np.ascontiguousarray(self.X[:, index]), self.mode, self.space)


_FG_MODES = {"sqrt": MODE_SQRT2, "logit": MODE_LOGIT2, "identity": MODE_IDENT2}


def prepare(data: RaterMaps, link: str = "sqrt", voxels: np.ndarray | None = None, box: tuple[slice, ...] | None = None) -> KernelData:
    """Put a subject's maps into the kernels' storage.

    A two-class problem without a class axis keeps its foreground map as
    given (no copy when it is float32 already), flattened to (P, N, 1). Other
    inputs are converted once to link coordinates, (P, N, D) float32.

    Parameters
    ----------
    data : RaterMaps
    link : {"sqrt", "logit", "identity"}
    voxels : ndarray of int, optional
        Flat indices of the voxels to keep (e.g. a region of interest), into
        the box when one is given.
    box : tuple of slice, optional
        A sub-box of the spatial grid to keep (applied before ``voxels``).
    """
    space = link_space(link, data.n_classes)
    p = data.n_raters
    sel = (slice(None),) + tuple(box) if box is not None else (slice(None),)
    if data.n_classes == 2 and not data.has_class_axis:
        fg = data.foreground(np.float32)[sel].reshape(p, -1)
        if voxels is not None:
            fg = fg[:, voxels]
        # C order (a no-op for the plain view): one compiled kernel per dtype
        return KernelData(np.ascontiguousarray(fg)[:, :, None], _FG_MODES[link], space)
    probs = data.probabilities(np.float32)[sel].reshape(p, -1, data.n_classes)
    if voxels is not None:
        probs = probs[:, voxels]
    X = np.empty(probs.shape[:2] + (space.dim,), dtype=np.float32)
    step = 1 << 20
    for s in range(0, probs.shape[1], step):
        X[:, s : s + step] = space.forward(probs[:, s : s + step])
    return KernelData(X, MODE_PRE, space)


def from_coords(coords: np.ndarray, space: LinkSpace) -> KernelData:
    """Kernel data from link coordinates given directly, (P, N, D).

    For data simulated in link space (recovery tests), where mapping to the
    simplex and back would lose information (the sqrt link's sign and norm).
    """
    coords = np.asarray(coords, dtype=np.float32)
    if coords.ndim != 3 or coords.shape[2] != space.dim:
        raise ValueError(f"link coordinates must be (P, N, {space.dim}), got {coords.shape}")
    return KernelData(np.ascontiguousarray(coords), MODE_PRE, space)


# ------------------------------------------------------- numba small helpers
_SQRT1_2 = 1.0 / math.sqrt(2.0)


@njit(inline="always", cache=True)
def load_d(X, p, n, mode, out):
    """Write D~[p, n] into ``out`` (length D), applying the link if needed."""
    if mode == MODE_PRE:
        for d in range(out.shape[0]):
            out[d] = X[p, n, d]
    elif mode == MODE_SQRT2:
        f = np.float64(X[p, n, 0])
        out[0] = math.sqrt(max(1.0 - f, 0.0))
        out[1] = math.sqrt(max(f, 0.0))
    elif mode == MODE_LOGIT2:
        f = min(max(np.float64(X[p, n, 0]), EPS), 1.0 - EPS)
        out[0] = (math.log(f) - math.log(1.0 - f)) * _SQRT1_2
    else:
        out[0] = (2.0 * np.float64(X[p, n, 0]) - 1.0) * _SQRT1_2


@njit(inline="always", cache=True)
def chol(A, L, D):
    """Lower Cholesky factor of the SPD matrix A (D x D) into L; returns log|A|.

    Returns NaN when A is not positive definite, so that callers can refuse it.
    """
    logdet = 0.0
    for j in range(D):
        s = A[j, j]
        for k in range(j):
            s -= L[j, k] * L[j, k]
        if not s > 0.0:
            return np.nan
        ljj = math.sqrt(s)
        L[j, j] = ljj
        logdet += 2.0 * math.log(ljj)
        for i in range(j + 1, D):
            t = A[i, j]
            for k in range(j):
                t -= L[i, k] * L[j, k]
            L[i, j] = t / ljj
        for i in range(j):
            L[i, j] = 0.0
    return logdet


@njit(inline="always", cache=True)
def chol_solve(L, b, x, D):
    """Solve (L L') x = b for x (all length D)."""
    for i in range(D):
        t = b[i]
        for k in range(i):
            t -= L[i, k] * x[k]
        x[i] = t / L[i, i]
    for i in range(D - 1, -1, -1):
        t = x[i]
        for k in range(i + 1, D):
            t -= L[k, i] * x[k]
        x[i] = t / L[i, i]


@njit(inline="always", cache=True)
def chol_inverse(L, out, D):
    """(L L')^-1 into out, column by column, solving in place (no allocation:
    this runs once per voxel inside parallel kernels)."""
    for j in range(D):
        for i in range(D):
            t = 1.0 if i == j else 0.0
            for k in range(i):
                t -= L[i, k] * out[k, j]
            out[i, j] = t / L[i, i]
        for i in range(D - 1, -1, -1):
            t = out[i, j]
            for k in range(i + 1, D):
                t -= L[k, i] * out[k, j]
            out[i, j] = t / L[i, i]


@njit(inline="always", cache=True)
def inverse_link(r, code, basis, out):
    """Probabilities ``out`` (length K) of link coordinates ``r`` (length D)."""
    K = out.shape[0]
    if code == INV_SQRT:
        s = 0.0
        for k in range(K):
            out[k] = r[k] * r[k]
            s += out[k]
        if s > 0.0:
            for k in range(K):
                out[k] /= s
        else:
            for k in range(K):
                out[k] = 1.0 / K
        return
    D = r.shape[0]
    for k in range(K):
        t = 0.0
        for d in range(D):
            t += basis[k, d] * r[d]
        out[k] = t
    if code == INV_LOGIT:
        m = out[0]
        for k in range(1, K):
            m = max(m, out[k])
        s = 0.0
        for k in range(K):
            out[k] = math.exp(out[k] - m)
            s += out[k]
        for k in range(K):
            out[k] /= s
    else:
        s = 0.0
        for k in range(K):
            out[k] = max(out[k] + 1.0 / K, 0.0)
            s += out[k]
        for k in range(K):
            out[k] = out[k] / s if s > 0.0 else 1.0 / K


# ------------------------------------------------------------- dense algebra
def inv_logdet(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse and log-determinant of a batch of SPD matrices (..., D, D).

    Through the Cholesky factor, so a matrix that is not positive definite
    raises ``numpy.linalg.LinAlgError`` instead of giving a NaN.
    """
    A = np.asarray(A, dtype=np.float64)
    L = np.linalg.cholesky(A)
    logdet = 2.0 * np.sum(np.log(np.diagonal(L, axis1=-2, axis2=-1)), axis=-1)
    eye = np.broadcast_to(np.eye(A.shape[-1]), A.shape)
    Linv = np.linalg.solve(L, eye)
    return np.swapaxes(Linv, -1, -2) @ Linv, logdet


def mahalanobis(resid: np.ndarray, Sigma: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances r' Sigma^-1 r.

    Parameters
    ----------
    resid : ndarray (..., D)
        Residuals, e.g. (P, N, D) for D~ - mu against each rater's Sigma.
    Sigma : ndarray (..., D, D)
        Covariances broadcasting against ``resid``'s leading dims, e.g.
        (P, 1, D, D) for one per rater.
    """
    Sinv, _ = inv_logdet(Sigma)
    return np.einsum("...i,...ij,...j->...", resid, Sinv, resid)


def clip_covariance(Sigma: np.ndarray, min_variance: float) -> tuple[np.ndarray, int]:
    """Raise the eigenvalues of a batch of covariances to ``min_variance``.

    This is the exact maximiser of the Gaussian M-step objective
    ``-N/2 log|Sigma| - 1/2 Tr(Sigma^-1 M)`` over ``Sigma >= min_variance I``
    (the objective depends on Sigma's eigenvalues one by one once the
    eigenvectors are M's), so a floor keeps the objective monotone.
    Returns the clipped matrices and how many eigenvalues were raised.
    """
    w, V = np.linalg.eigh(Sigma)
    low = w < min_variance
    if not low.any():
        return Sigma, 0
    w = np.maximum(w, min_variance)
    return (V * w[..., None, :]) @ np.swapaxes(V, -1, -2), int(low.sum())


# --------------------------------------------------------- the q(T) update
@njit(parallel=True, cache=True)
def _q_T_kernel(X, mode, weights, Sinv, bias, prior_prec, prior_mean, mu_out, S_out, block):
    P, N = X.shape[0], X.shape[1]
    D = mu_out.shape[0]
    per_voxel = weights.shape[1] > 1
    has_mean = prior_mean.shape[1] > 0
    store_S = S_out.shape[0] > 0
    nb = (N + block - 1) // block
    logdets = np.zeros(nb)
    for ib in prange(nb):
        d = np.empty(D)
        lam = np.empty((D, D))
        L = np.empty((D, D))
        h = np.empty(D)
        m = np.empty(D)
        Sn = np.empty((D, D))
        acc = 0.0
        for n in range(ib * block, min(N, (ib + 1) * block)):
            for i in range(D):
                h[i] = prior_prec * (prior_mean[i, n] if has_mean else 0.0)
                for j in range(D):
                    lam[i, j] = prior_prec if i == j else 0.0
            for p in range(P):
                w = weights[p, n] if per_voxel else weights[p, 0]
                if w == 0.0:
                    continue
                load_d(X, p, n, mode, d)
                for i in range(D):
                    d[i] -= bias[p, i]
                for i in range(D):
                    t = 0.0
                    for j in range(D):
                        lam[i, j] += w * Sinv[p, i, j]
                        t += Sinv[p, i, j] * d[j]
                    h[i] += w * t
            acc -= chol(lam, L, D)
            chol_solve(L, h, m, D)
            for i in range(D):
                mu_out[i, n] = m[i]
            if store_S:
                chol_inverse(L, Sn, D)
                for i in range(D):
                    for j in range(D):
                        S_out[n, i, j] = Sn[i, j]
        logdets[ib] = acc
    return logdets.sum()


def update_q_T(
    kd: KernelData,
    weights: np.ndarray,
    Sigma: np.ndarray,
    bias: np.ndarray | None = None,
    prior_var: float | None = None,
    prior_mean: np.ndarray | None = None,
    *,
    out: np.ndarray | None = None,
    return_cov: bool = False,
    dtype=np.float64,
):
    """Weighted Gaussian update of the consensus, q(T~[n]) = N(mu[n], S[n]).

    S[n] = (sum_p w[n,p] Sigma_p^-1 + I / prior_var)^-1 and
    mu[n] = S[n] (sum_p w[n,p] Sigma_p^-1 (D~[p,n] - b_p) + prior_mean[n] / prior_var).
    With ``w = tau^`` this is the robust model's q(T); with ``w = r[p, m]``
    (one weight per rater) the mixture's q(T~_m).

    Parameters
    ----------
    kd : KernelData
        The raters' maps (:func:`prepare`).
    weights : ndarray (P, N) or (P,)
        Per-voxel or per-rater weights (non-negative).
    Sigma : ndarray (P, D, D)
        Rater covariances.
    bias : ndarray (P, D), optional
        Posterior means of the biases (zero when omitted).
    prior_var : float, optional
        Sigma_T; None for a flat prior on T~.
    prior_mean : ndarray (D, N), optional
        The prior mean W Phi_n (zero when omitted and ``prior_var`` given).
    out : ndarray (D, N), optional
        Where to write mu (float32 or float64).
    return_cov : bool
        Also return S as (N, D, D).

    Returns
    -------
    mu : ndarray (D, N)
    sum_logdet : float
        sum_n log|S[n]| (for the entropy of q(T~)).
    S : ndarray (N, D, D)
        Only with ``return_cov``.

    References
    ----------
    models/robust_t.md (eq:rt-qT)
    """
    P, N = kd.n_raters, kd.n_voxels
    D = kd.dim
    w = np.asarray(weights, dtype=np.float64)
    w = w[:, None] if w.ndim == 1 else w
    if w.shape not in ((P, 1), (P, N)):
        raise ValueError(f"weights must be (P,) or (P, N) = ({P}, {N}), got {np.shape(weights)}")
    Sinv, _ = inv_logdet(Sigma)
    b = np.zeros((P, D)) if bias is None else np.asarray(bias, dtype=np.float64)
    prec = 0.0 if prior_var is None else 1.0 / float(prior_var)
    pm = np.zeros((D, 0)) if prior_mean is None else prior_mean
    mu = np.empty((D, N), dtype=dtype) if out is None else out
    S = np.empty((N, D, D)) if return_cov else np.empty((0, D, D))
    logdet = _q_T_kernel(kd.X, kd.mode, w, Sinv, b, prec, pm, mu, S, BLOCK)
    if not np.isfinite(logdet):
        raise FloatingPointError("q(T) precision is not positive definite: some voxel has no weight and no prior")
    return (mu, logdet, S) if return_cov else (mu, logdet)


# ---------------------------------------------------- covariance M-step
@njit(parallel=True, cache=True)
def _cov_kernel(X, mode, weights, mu, S, bias, block):
    P, N = X.shape[0], X.shape[1]
    D = mu.shape[0]
    per_voxel = weights.shape[1] > 1
    shared_S = S.shape[0] == 1
    nb = (N + block - 1) // block
    acc = np.zeros((nb, P, D, D))
    wsum = np.zeros((nb, P))
    for ib in prange(nb):
        d = np.empty(D)
        for n in range(ib * block, min(N, (ib + 1) * block)):
            sn = 0 if shared_S else n
            for p in range(P):
                w = weights[p, n] if per_voxel else weights[p, 0]
                if w == 0.0:
                    continue
                load_d(X, p, n, mode, d)
                for i in range(D):
                    d[i] -= mu[i, n] + bias[p, i]
                for i in range(D):
                    for j in range(D):
                        acc[ib, p, i, j] += w * (d[i] * d[j] + S[sn, i, j])
                wsum[ib, p] += w
    return acc.sum(axis=0), wsum.sum(axis=0)


def covariance_m_step(
    kd: KernelData,
    weights: np.ndarray,
    mu: np.ndarray,
    S: np.ndarray,
    bias: np.ndarray | None = None,
    S_bias: np.ndarray | None = None,
    min_variance: float = 0.0,
) -> np.ndarray:
    """Per-rater covariance M-step.

    Sigma_p = 1/N sum_n w[n,p] [ e e' + S[n] + S_b[p] ],  e = D~[p,n] - mu[n] - b_p.

    The normaliser is the number of voxels N (not the sum of weights): in the
    robust model the weights are tau^ and the Gamma prior, not Sigma_p,
    carries their scale; in the mixture the responsibilities of a rater sum
    to one over components, and the caller sums the components' returns.

    Parameters
    ----------
    kd : KernelData
    weights : ndarray (P, N) or (P,)
    mu : ndarray (D, N)
        Posterior means of T~.
    S : ndarray (N, D, D) or (D, D)
        Posterior covariances of T~ (one shared matrix allowed).
    bias, S_bias : ndarray (P, D) and (P, D, D), optional
        Posterior mean and covariance of the biases.
    min_variance : float
        Eigenvalue floor (see :func:`clip_covariance`).

    Returns
    -------
    ndarray (P, D, D)

    References
    ----------
    models/robust_t.md (eq:rt-sigma-p)
    """
    P, N, D = kd.n_raters, kd.n_voxels, kd.dim
    w = np.asarray(weights, dtype=np.float64)
    w = w[:, None] if w.ndim == 1 else w
    S = np.asarray(S, dtype=np.float64)
    S = S[None] if S.ndim == 2 else S
    b = np.zeros((P, D)) if bias is None else np.asarray(bias, dtype=np.float64)
    acc, wsum = _cov_kernel(kd.X, kd.mode, w, mu, S, b, BLOCK)
    if S_bias is not None:
        acc = acc + wsum[:, None, None] * np.asarray(S_bias)
    Sigma = acc / N
    if min_variance > 0:
        Sigma, _ = clip_covariance(Sigma, min_variance)
    return Sigma


# ------------------------------------------ probability-space summaries
@njit(inline="always", cache=True)
def _select(a, k):
    """The k-th smallest entry of ``a`` (partially reorders ``a``; Hoare's quickselect)."""
    lo, hi = 0, a.shape[0] - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return a[k]
    return a[k]


@njit(inline="always", cache=True)
def _quantile(a, q):
    """numpy's default (linear) quantile of ``a`` at level q; reorders ``a``."""
    n = a.shape[0]
    h = (n - 1) * q
    k = int(math.floor(h))
    lo = _select(a, k)
    if k + 1 >= n:
        return lo
    hi = a[k + 1]
    for i in range(k + 2, n):  # after selecting k, a[k+1:] holds the larger values
        if a[i] < hi:
            hi = a[i]
    return lo + (h - k) * (hi - lo)


@njit(parallel=True, cache=True)
def _mc_summaries(mu, S, z, code, basis, q_lo, q_hi, want_q, mean_out, sd_out, lo_out, hi_out, block):
    """Mean, sd and two quantiles of F^-1(mu[n] + chol(S[n]) z[s]) over the draws s."""
    N, D = mu.shape
    n_draws = z.shape[0]
    K = mean_out.shape[1]
    nb = (N + block - 1) // block
    for ib in prange(nb):
        A = np.empty((D, D))
        L = np.empty((D, D))
        r = np.empty(D)
        pk = np.empty(K)
        vals = np.empty((K, n_draws))
        for n in range(ib * block, min(N, (ib + 1) * block)):
            for i in range(D):
                for j in range(D):
                    A[i, j] = S[n, i, j]
            if not chol(A, L, D) > -np.inf:
                for i in range(D):  # zero variance: a point mass at mu
                    for j in range(D):
                        L[i, j] = 0.0
            for s in range(n_draws):
                for i in range(D):
                    t = mu[n, i]
                    for j in range(i + 1):
                        t += L[i, j] * z[s, j]
                    r[i] = t
                inverse_link(r, code, basis, pk)
                for k in range(K):
                    vals[k, s] = pk[k]
            for k in range(K):
                m1 = 0.0
                for s in range(n_draws):
                    m1 += vals[k, s]
                m1 /= n_draws
                m2 = 0.0
                for s in range(n_draws):
                    m2 += (vals[k, s] - m1) ** 2
                mean_out[n, k] = m1
                sd_out[n, k] = math.sqrt(m2 / max(n_draws - 1, 1))
                if want_q:
                    lo_out[n, k] = _quantile(vals[k], q_lo)
                    hi_out[n, k] = _quantile(vals[k], q_hi)


@njit(parallel=True, cache=True)
def _quad_moments(mu, S, nodes, wts, code, basis, mean_out, sd_out, block):
    """Mean and sd of F^-1(T~) under N(mu, S) by a tensor Gauss-Hermite rule."""
    N, D = mu.shape
    K = mean_out.shape[1]
    Q = nodes.shape[0]
    nb = (N + block - 1) // block
    for ib in prange(nb):
        A = np.empty((D, D))
        L = np.empty((D, D))
        r = np.empty(D)
        pk = np.empty(K)
        m1 = np.empty(K)
        m2 = np.empty(K)
        idx = np.empty(D, dtype=np.int64)
        for n in range(ib * block, min(N, (ib + 1) * block)):
            for i in range(D):
                for j in range(D):
                    A[i, j] = S[n, i, j]
            if not chol(A, L, D) > -np.inf:
                for i in range(D):
                    for j in range(D):
                        L[i, j] = 0.0
            for k in range(K):
                m1[k] = 0.0
                m2[k] = 0.0
            total = Q**D
            for q in range(total):
                rem = q
                w = 1.0
                for i in range(D):
                    idx[i] = rem % Q
                    rem //= Q
                    w *= wts[idx[i]]
                for i in range(D):
                    t = mu[n, i]
                    for j in range(i + 1):
                        t += L[i, j] * nodes[idx[j]]
                    r[i] = t
                inverse_link(r, code, basis, pk)
                for k in range(K):
                    m1[k] += w * pk[k]
                    m2[k] += w * pk[k] * pk[k]
            for k in range(K):
                mean_out[n, k] = m1[k]
                sd_out[n, k] = math.sqrt(max(m2[k] - m1[k] * m1[k], 0.0))


def _space_of(link, dim: int) -> LinkSpace:
    if isinstance(link, LinkSpace):
        if link.dim != dim:
            raise ValueError(f"link space has {link.dim} coordinates, the means have {dim}")
        return link
    return link_space(link, dim if link == "sqrt" else dim + 1)


def probability_summaries(
    mu: np.ndarray,
    S: np.ndarray,
    link: str | LinkSpace = "sqrt",
    *,
    mass: float | None = 0.9,
    method: str = "auto",
    n_draws: int = 256,
    random_seed=None,
    block_size: int = BLOCK,
    n_nodes: int = 9,
) -> dict[str, np.ndarray]:
    """Posterior summaries of the probability map F^-1(T~) when T~[n] ~ N(mu[n], S[n]).

    Parameters
    ----------
    mu : ndarray (..., D)
        Means in link coordinates, any leading (voxel) dims; for a
        class-first array pass ``np.moveaxis(mu, 0, -1)``.
    S : ndarray (..., D, D)
        Covariances, same leading dims.
    link : str or LinkSpace
        ``"sqrt"`` (D = K), ``"logit"`` or ``"identity"`` (D = K - 1), or a
        :class:`LinkSpace`.
    mass : float or None
        Mass of the central interval; None skips the quantiles.
    method : {"auto", "mc", "quadrature"}
        ``"mc"``: Monte Carlo with common random numbers: ``n_draws``
        standard normal points (scrambled Sobol, seeded by ``random_seed``)
        are shared by all voxels and mapped through each voxel's mean and
        Cholesky factor, so no draw of the volume is ever held (memory is
        one K x n_draws buffer per thread) and no random generator runs per
        voxel. ``"quadrature"``: tensor Gauss-Hermite rule with ``n_nodes``
        points per coordinate (``n_nodes ** D`` evaluations per voxel) for
        the mean and sd; the interval is exact when D = 1 (F^-1 is then
        monotone in the coordinate) and omitted otherwise. ``"auto"``:
        quadrature when D = 1, Monte Carlo otherwise.
    n_draws : int
        Monte Carlo draws per voxel (a power of 2 keeps the Sobol points
        balanced).
    random_seed : int or Generator, optional
    block_size : int
        Voxels per parallel block (does not change the results).
    n_nodes : int
        Gauss-Hermite points per coordinate.

    Returns
    -------
    dict of float32 arrays (..., K)
        ``consensus_mean``, ``consensus_sd`` and, with an interval,
        ``consensus_lo`` / ``consensus_hi`` (the (1 - mass)/2 and
        (1 + mass)/2 quantiles).
    """
    # float32 inputs are read as they are (no float64 copy of a volume)
    mu = np.asarray(mu)
    D = mu.shape[-1]
    lead = mu.shape[:-1]
    S = np.asarray(S)
    if S.shape != lead + (D, D):
        raise ValueError(f"S must be {lead + (D, D)} to match mu {mu.shape}, got {S.shape}")
    space = _space_of(link, D)
    K = space.n_classes
    # C order keeps one compiled kernel per dtype (a transposed view would add another)
    mu2 = np.ascontiguousarray(mu.reshape(-1, D))
    S2 = np.ascontiguousarray(S.reshape(-1, D, D))
    N = mu2.shape[0]
    code, basis = space.inverse_code, np.ascontiguousarray(space.basis)
    if mass is not None and not 0 < mass < 1:
        raise ValueError(f"mass must lie in (0, 1), got {mass}")
    if method == "auto":
        method = "quadrature" if D == 1 else "mc"
    out: dict[str, np.ndarray] = {}
    mean = np.empty((N, K), np.float32)
    sd = np.empty((N, K), np.float32)
    if method == "quadrature":
        t, w = np.polynomial.hermite_e.hermegauss(int(n_nodes))
        _quad_moments(mu2, S2, t, w / w.sum(), code, basis, mean, sd, block_size)
        if mass is not None and D == 1:
            from scipy.special import ndtri

            z = ndtri((1 + mass) / 2)
            sdv = np.sqrt(S2[:, 0, 0].astype(np.float64))
            ends = [space.inverse((mu2[:, 0] + sgn * z * sdv)[:, None]) for sgn in (-1.0, 1.0)]
            out["consensus_lo"] = np.minimum(*ends)  # F^-1 is monotone in the one coordinate
            out["consensus_hi"] = np.maximum(*ends)
    elif method == "mc":
        from scipy.special import ndtri
        from scipy.stats import qmc

        u = qmc.Sobol(d=D, scramble=True, seed=np.random.default_rng(random_seed)).random(int(n_draws))
        z = ndtri(np.clip(u, 1e-12, 1 - 1e-12))
        want = mass is not None
        q = (1 - mass) / 2 if want else 0.0
        lo = np.empty((N, K) if want else (0, K), np.float32)
        hi = np.empty((N, K) if want else (0, K), np.float32)
        _mc_summaries(mu2, S2, z, code, basis, q, 1 - q, want, mean, sd, lo, hi, block_size)
        if want:
            out["consensus_lo"], out["consensus_hi"] = lo, hi
    else:
        raise ValueError(f"method must be 'auto', 'mc' or 'quadrature', not {method!r}")
    out["consensus_mean"], out["consensus_sd"] = mean, sd
    return {k: v.reshape(lead + (K,)).astype(np.float32, copy=False) for k, v in out.items()}


@njit(parallel=True, cache=True)
def _inverse_map_kernel(mu, code, basis, out, block):
    D, N = mu.shape
    K = out.shape[1]
    nb = (N + block - 1) // block
    for ib in prange(nb):
        r = np.empty(D)
        pk = np.empty(K)
        for n in range(ib * block, min(N, (ib + 1) * block)):
            for i in range(D):
                r[i] = mu[i, n]
            inverse_link(r, code, basis, pk)
            for k in range(K):
                out[n, k] = pk[k]


def inverse_link_map(mu: np.ndarray, space: LinkSpace, out: np.ndarray | None = None) -> np.ndarray:
    """F^-1 of class-first link coordinates ``mu`` (D, N): probabilities (N, K), float32.

    One streamed pass, without float64 temporaries of the volume.
    """
    D, N = mu.shape
    if D != space.dim:
        raise ValueError(f"mu has {D} coordinates, the link space {space.dim}")
    out = np.empty((N, space.n_classes), np.float32) if out is None else out
    _inverse_map_kernel(mu, space.inverse_code, np.ascontiguousarray(space.basis), out, BLOCK)
    return out


def link_coords(X: np.ndarray, mode: int, dim: int) -> np.ndarray:
    """D~ of kernel storage, materialised (P, N, D) in float64."""
    P, N = X.shape[:2]
    out = np.empty((P, N, dim))
    _coords_kernel(X, mode, out)
    return out


@njit(parallel=True, cache=True)
def _coords_kernel(X, mode, out):
    P, N, D = out.shape
    for n in prange(N):
        d = np.empty(D)
        for p in range(P):
            load_d(X, p, n, mode, d)
            for i in range(D):
                out[p, n, i] = d[i]
