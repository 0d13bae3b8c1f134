"""Statistics of the cross-check: NUTS health, q-vs-NUTS comparisons, PSIS k-hat.

Pure functions of arrays and DataTrees, used by :mod:`bayesfuse.crosscheck`
and :mod:`bayesfuse.crosscheck_sbc`. ArviZ 1.x (arviz-stats) provides r_hat,
bulk/tail ESS and the Pareto smoothing; the per-element Wasserstein distance
is scipy's (arviz-stats' ``wasserstein`` sums over marginals or takes the
joint, and we need it element by element).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

#: NUTS is healthy when every r_hat is at most this (issue 6; Vehtari et al. 2021).
RHAT_MAX = 1.01
#: ... and every bulk and tail ESS is at least this.
ESS_MIN = 400

#: Names of the per-element statistics (variables of the ``/stats/<var>`` groups).
ELEMENT_STATS = ("mean_q", "sd_q", "mean_nuts", "sd_nuts", "zscore", "sd_ratio", "coverage", "wasserstein")

SAMPLE_DIMS = ("chain", "draw")


# --------------------------------------------------------------- NUTS health
@dataclass
class Health:
    """NUTS diagnostics against the thresholds above."""

    rhat_max: float
    ess_bulk_min: float
    ess_tail_min: float
    divergences: int
    chains: int
    draws: int
    worst: str = ""
    per_variable: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        # NaN statistics (a variable that never moved) are not healthy either
        return bool(self.rhat_max <= RHAT_MAX and self.ess_bulk_min >= ESS_MIN
                    and self.ess_tail_min >= ESS_MIN and self.divergences == 0)

    def message(self) -> str:
        head = "healthy" if self.ok else "NOT healthy"
        return (f"NUTS {head}: {self.chains} chains x {self.draws} draws, max r_hat {self.rhat_max:.4f} "
                f"(<= {RHAT_MAX}), min bulk ESS {self.ess_bulk_min:.0f}, min tail ESS {self.ess_tail_min:.0f} "
                f"(>= {ESS_MIN}), {self.divergences} divergences" + (f"; worst: {self.worst}" if self.worst else ""))


def _worst(ds: xr.Dataset, largest: bool) -> tuple[float, str]:
    best_v, best_name = (-np.inf if largest else np.inf), ""
    for name, da in ds.data_vars.items():
        a = np.asarray(da.values, dtype=float)
        if a.size == 0:
            continue
        # NaN counts as the worst value: the diagnostic could not be computed
        a = np.where(np.isnan(a), np.inf if largest else -np.inf, a)
        i = int(np.argmax(a) if largest else np.argmin(a))
        v = float(a.flat[i])
        if (v > best_v) if largest else (v < best_v):
            idx = np.unravel_index(i, a.shape) if a.ndim else ()
            coords = ",".join(str(da[d].values[j]) if d in da.coords else str(j) for d, j in zip(da.dims, idx))
            best_v, best_name = v, f"{name}[{coords}]" if coords else name
    return best_v, best_name


def nuts_health(tree: xr.DataTree, var_names=None) -> Health:
    """r_hat, bulk and tail ESS (arviz-stats) and divergences of a NUTS run.

    Parameters
    ----------
    tree : DataTree
        With ``posterior`` and ``sample_stats`` (``diverging``) groups.
    var_names : list of str, optional
        Variables to diagnose (default: all of ``posterior``).
    """
    import arviz_stats as azs

    post = tree["posterior"].to_dataset()
    if var_names is not None:
        post = post[list(var_names)]
    rhat = azs.rhat(post)
    bulk = azs.ess(post, method="bulk")
    tail = azs.ess(post, method="tail")
    # An element equal in every draw of every chain (a deterministic saturated
    # at 1, e.g. a mixture responsibility of 1 - 1e-21) is exact: no Monte
    # Carlo error, though r_hat and ESS are NaN (0/0). A stuck free variable is
    # not constant across chains, whose starts are jittered.
    n = post.sizes["chain"] * post.sizes["draw"]
    for name in post.data_vars:
        const = (post[name].max(SAMPLE_DIMS) == post[name].min(SAMPLE_DIMS))
        if bool(const.any()):
            rhat[name] = rhat[name].where(~const, 1.0)
            bulk[name] = bulk[name].where(~const, float(n))
            tail[name] = tail[name].where(~const, float(n))
    r, rname = _worst(rhat, largest=True)
    b, bname = _worst(bulk, largest=False)
    t, tname = _worst(tail, largest=False)
    div = int(tree["sample_stats"]["diverging"].sum()) if "sample_stats" in tree.children else 0
    worst = []
    if not r <= RHAT_MAX:
        worst.append(f"r_hat {r:.4f} at {rname}")
    if not b >= ESS_MIN:
        worst.append(f"bulk ESS {b:.0f} at {bname}")
    if not t >= ESS_MIN:
        worst.append(f"tail ESS {t:.0f} at {tname}")
    per = {name: {"rhat_max": float(np.nanmax(rhat[name].values)) if rhat[name].size else np.nan,
                  "ess_bulk_min": float(np.nanmin(bulk[name].values)) if bulk[name].size else np.nan,
                  "ess_tail_min": float(np.nanmin(tail[name].values)) if tail[name].size else np.nan}
           for name in post.data_vars}
    return Health(rhat_max=r, ess_bulk_min=b, ess_tail_min=t, divergences=div,
                  chains=int(post.sizes["chain"]), draws=int(post.sizes["draw"]), worst="; ".join(worst),
                  per_variable=per)


# ------------------------------------------------------------- comparisons
def _samples(da: xr.DataArray) -> xr.DataArray:
    """(sample, *element dims) from (chain, draw, *dims)."""
    return da.stack(sample=SAMPLE_DIMS).transpose("sample", ...)


def _safe_ratio(num: np.ndarray, den: np.ndarray, equal: np.ndarray) -> np.ndarray:
    """num / den, with 0/0 read through ``equal`` (0 if equal, inf otherwise)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    zero = den == 0
    out[zero & equal] = 0.0
    out[zero & ~equal] = np.copysign(np.inf, num[zero & ~equal])
    return out


def element_stats(q: xr.DataArray, nuts: xr.DataArray, mass: float = 0.9) -> xr.Dataset:
    """Per-element comparison of draws from q with NUTS draws.

    Both arrays have dims ``(chain, draw, *dims)`` with the same ``dims``;
    the result has ``dims`` and the variables of :data:`ELEMENT_STATS`:

    - ``zscore`` = (mean_q - mean_nuts) / sd_nuts;
    - ``sd_ratio`` = sd_q / sd_nuts (1: same spread; < 1: q overconfident);
    - ``coverage``: share of the NUTS draws inside q's central ``mass``
      interval (``mass`` when q is right; less when q is too narrow or off);
    - ``wasserstein``: the 1-Wasserstein distance between the two samples
      (scipy), divided by sd_nuts (a shift of d sd between equal shapes gives d).
    """
    from scipy.stats import wasserstein_distance

    qs, ns = _samples(q), _samples(nuts)
    dims = [d for d in ns.dims if d != "sample"]
    qs = qs.transpose("sample", *dims)
    for d in dims:
        if d in ns.coords and d in qs.coords and not np.array_equal(ns[d].values, qs[d].values):
            raise ValueError(f"q and NUTS draws of {nuts.name} disagree on the coordinates of {d!r}")
    qa = np.asarray(qs.values, dtype=np.float64).reshape(qs.shape[0], -1)
    na = np.asarray(ns.values, dtype=np.float64).reshape(ns.shape[0], -1)
    mq, sq = qa.mean(0), qa.std(0, ddof=1)
    mn, sn = na.mean(0), na.std(0, ddof=1)
    # a point estimate repeated as draws: exactly no spread (std leaves ~1e-16)
    sq[np.ptp(qa, axis=0) == 0] = 0.0
    sn[np.ptp(na, axis=0) == 0] = 0.0
    lo, hi = np.quantile(qa, [(1 - mass) / 2, (1 + mass) / 2], axis=0)
    cover = ((na >= lo) & (na <= hi)).mean(0)
    w1 = np.array([wasserstein_distance(qa[:, e], na[:, e]) for e in range(na.shape[1])])
    same = np.isclose(mq, mn, rtol=0, atol=1e-12)
    shape = ns.shape[1:]
    values = {
        "mean_q": mq, "sd_q": sq, "mean_nuts": mn, "sd_nuts": sn,
        "zscore": _safe_ratio(mq - mn, sn, same),
        "sd_ratio": _safe_ratio(sq, sn, sq == 0),
        "coverage": cover,
        "wasserstein": _safe_ratio(w1, sn, w1 == 0),
    }
    coords = {d: ns[d] for d in dims if d in ns.coords}
    return xr.Dataset({k: (dims, v.reshape(shape)) for k, v in values.items()}, coords=coords)


def bernoulli_stats(w_q: np.ndarray, w_nuts: np.ndarray, dims: tuple[str, ...], mass: float = 0.9) -> xr.Dataset:
    """Per-element comparison of two Bernoulli posteriors of label indicators.

    The latent label x of an EM model has posterior Bernoulli(w) given the
    rater parameters: ``w_q`` = w(theta_EM) (the solver's consensus),
    ``w_nuts`` = E[w(theta)] over the NUTS draws of theta (the label's
    posterior with theta integrated out). The statistics are those of
    :func:`element_stats`, exact for two Bernoulli distributions: sd
    sqrt(w (1 - w)), q's central interval from
    :func:`bayesfuse.summaries.categorical_summaries`, its NUTS coverage
    P(x in [lo, hi]) under Bernoulli(w_nuts), and W1 = |w_q - w_nuts|.
    """
    from .summaries import categorical_summaries

    wq = np.clip(np.asarray(w_q, dtype=np.float64), 0, 1)
    wn = np.clip(np.asarray(w_nuts, dtype=np.float64), 0, 1)
    sq, sn = np.sqrt(wq * (1 - wq)), np.sqrt(wn * (1 - wn))
    s = categorical_summaries(wq, mass)
    lo, hi = s["consensus_lo"], s["consensus_hi"]
    cover = np.where(lo == hi, np.where(lo == 1, wn, 1 - wn), 1.0)
    diff = wq - wn
    same = np.abs(diff) <= 1e-12
    values = {
        "mean_q": wq, "sd_q": sq, "mean_nuts": wn, "sd_nuts": sn,
        "zscore": _safe_ratio(diff, sn, same),
        "sd_ratio": _safe_ratio(sq, sn, sq == 0),
        "coverage": cover,
        "wasserstein": _safe_ratio(np.abs(diff), sn, same),
    }
    return xr.Dataset({k: (dims, v) for k, v in values.items()})


# ------------------------------------------------------------------- PSIS
def pareto_khat(log_ratio: np.ndarray) -> float:
    """Pareto k-hat of importance ratios given on the log scale.

    ``log_ratio`` = log p(theta | data) - log q(theta) at draws theta ~ q
    (each up to a constant). arviz-stats' ``psislw`` negates its input (it
    takes log-likelihoods, whose negation are the LOO log ratios), so it is
    given ``-log_ratio``. k < 0.5: q is a good importance proposal for the
    posterior; 0.5-0.7: usable; > 0.7: q misses posterior mass (Yao et al.
    2018, Vehtari et al. 2024). Constant ratios (q equal to the posterior up
    to its normaliser) give -inf.
    """
    from arviz_stats.base import array_stats

    lr = np.asarray(log_ratio, dtype=np.float64).ravel()
    if not np.all(np.isfinite(lr)):
        # q puts mass where the posterior has none (or the reverse): the
        # importance weights are degenerate
        return float("inf")
    if np.ptp(lr) <= 1e-12 * max(1.0, float(np.abs(lr).max())):
        return float("-inf")
    _, khat = array_stats.psislw(-lr)
    return float(khat)


def share_within(z: np.ndarray, within: float, where: np.ndarray | None = None) -> float:
    """Share of elements with |z| <= within (optionally only ``where``)."""
    a = np.abs(np.asarray(z, dtype=np.float64))
    if where is not None:
        a = a[np.broadcast_to(where, a.shape)]
    return float(np.mean(a <= within)) if a.size else float("nan")
