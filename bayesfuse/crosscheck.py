"""Cross-check a model's closed-form solver (VB or EM) against NUTS.

This is what the project is for: every model of the zoo is written twice,
as a PyMC model and as a hand-derived solver, and :func:`run` proves the
second against the first on a problem small enough for NUTS:

1. fit the solver (``fit``) on the data (downsampled by the caller or by
   ``bayesfuse check --downsample``);
2. build the PyMC model with ``hyper="fixed"`` at the solver's point
   estimates (``fixed_from_result``), so that both target the same
   posterior, and sample it with NUTS (nutpie, :func:`sample_nuts`);
3. check NUTS first (r_hat <= 1.01, bulk and tail ESS >= 400, no
   divergences: :func:`bayesfuse.crosscheck_stats.nuts_health`); an
   unhealthy run is reported as such and no agreement is claimed;
4. compare, per latent variable and element, the solver's posterior with
   NUTS's (z-score, sd ratio, coverage of q's central interval, Wasserstein
   distance), the EM estimate with the posterior mode, and q's density with
   the posterior's (PSIS k-hat on a block); the model's
   :class:`~bayesfuse.crosscheck_models.Criteria` say what must hold;
5. :meth:`CrossCheck.write` stores ``summary.csv`` (one row per variable),
   ``crosscheck.nc`` (the NUTS and the solver's DataTrees, per-element
   statistics) and figures; :meth:`CrossCheck.verdict` is the short text
   the command prints.

The pass criteria and what "solver vs NUTS" means for EM models are in
:mod:`bayesfuse.crosscheck_models` and in each model card's "Cross-check"
section.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .crosscheck_stats import Health, bernoulli_stats, element_stats, nuts_health, pareto_khat, share_within

#: Files :meth:`CrossCheck.write` produces.
OUTPUTS = ("summary.csv", "crosscheck.nc", "marginals.png", "zscore_map.png", "sd_ratio_map.png")

#: Columns of ``summary.csv``.
SUMMARY_COLUMNS = (
    "variable", "elements", "compared", "where", "within_sd", "share_within", "share_within_all",
    "z_abs_median", "z_abs_max", "sd_ratio_median", "sd_ratio_min", "sd_ratio_max", "coverage_mean",
    "wasserstein_median", "khat", "rhat_max", "ess_bulk_min", "ess_tail_min", "mode_gap", "criterion",
    "required", "passed",
)

#: Exit codes of ``bayesfuse check``.
EXIT_PASS, EXIT_DISAGREE, EXIT_UNHEALTHY = 0, 1, 3


# ------------------------------------------------------------------- NUTS
_COMPILED: dict[str, Any] = {}


def _fingerprint(model) -> str:
    """A key of the model's structure: the logp graph, its constants, and the
    names, shapes and dtypes of its data. Two models with the same key differ
    only in the values of their ``pm.Data``, which nutpie swaps in without
    compiling again."""
    import pytensor
    from pytensor.compile.sharedvalue import SharedVariable
    from pytensor.graph import Constant
    from pytensor.graph.traversal import ancestors

    logp = model.logp()
    h = hashlib.sha256()
    h.update(pytensor.printing.debugprint(logp, file="str", print_type=True).encode())
    for v in ancestors([logp]):
        if isinstance(v, Constant):
            h.update(np.ascontiguousarray(np.asarray(v.data)).tobytes())
        elif isinstance(v, SharedVariable):
            val = np.asarray(v.get_value(borrow=True))
            h.update(f"{v.name}:{val.shape}:{val.dtype}".encode())
    for rv in model.free_RVs:
        h.update(f"{rv.name}{model.rvs_to_values[rv].name}".encode())
    h.update(json.dumps({k: list(map(str, v)) for k, v in model.coords.items()}, sort_keys=True).encode())
    return h.hexdigest()


def _compiled(model) -> tuple[Any, float, bool]:
    """nutpie's compiled model, from the cache when the structure is known."""
    import nutpie

    key = _fingerprint(model)
    t0 = time.perf_counter()
    if key in _COMPILED:
        compiled = _COMPILED[key]
        names = {var.name for var in compiled.shared_var_keys}
        data = {d.name: d.get_value() for d in model.data_vars if d.name in names}
        return (compiled.with_data(**data) if data else compiled), time.perf_counter() - t0, True
    compiled = nutpie.compile_pymc_model(model)
    _COMPILED[key] = compiled
    return compiled, time.perf_counter() - t0, False


def sample_nuts(model, *, draws: int = 1000, tune: int = 1000, chains: int = 4, random_seed=0,
                cores: int | None = None, target_accept: float = 0.8, store_unconstrained: bool = False,
                adaptation: str = "diag") -> xr.DataTree:
    """NUTS draws of a PyMC model with nutpie, as a DataTree.

    The compiled model is cached per structure (:func:`_fingerprint`): the
    same model on new data (SBC, a solver with an injected error) does not
    compile again. Warm-up draws are not kept.

    Returns
    -------
    DataTree
        ``posterior``, ``sample_stats`` (and ``unconstrained_posterior`` with
        ``store_unconstrained``); attrs ``compile_seconds``,
        ``sample_seconds``, ``compile_cached``, ``adaptation``.

    ``adaptation`` is nutpie's mass-matrix adaptation: ``"diag"``, or
    ``"low_rank"`` (diagonal plus the leading eigenvectors of the draws'
    and gradients' covariance) for posteriors with a few strongly
    correlated directions, such as the common shift of the robust-t
    family's consensus and biases.
    """
    import nutpie

    compiled, compile_s, cached = _compiled(model)
    seed = 0 if random_seed is None else int(np.random.SeedSequence(random_seed).generate_state(1)[0])
    t0 = time.perf_counter()
    tree = nutpie.sample(compiled, draws=int(draws), tune=int(tune), chains=int(chains),
                         cores=int(cores or min(int(chains), os.cpu_count() or 1)), seed=seed,
                         progress_bar=False, save_warmup=False, store_unconstrained=store_unconstrained,
                         target_accept=float(target_accept), adaptation=adaptation)
    tree.attrs.update(compile_seconds=float(compile_s), sample_seconds=float(time.perf_counter() - t0),
                      compile_cached=int(cached), adaptation=adaptation)
    return tree


# ------------------------------------------------------- log densities
def _value_point(model, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Natural-scale values of the free variables -> the model's value (unconstrained) point.

    Estimates on the boundary of the support (a sensitivity of exactly 1)
    are moved inside by 1e-10 (renormalised on a simplex), where the
    transform is finite.
    """
    point = {}
    for rv in model.free_RVs:
        x = np.asarray(values[rv.name], dtype=np.float64)
        tr = model.rvs_to_transforms.get(rv)
        vname = model.rvs_to_values[rv].name
        if tr is None:
            point[vname] = x
            continue
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            val = np.asarray(tr.forward(x, *rv.owner.inputs).eval())
        if not np.all(np.isfinite(val)):
            x = np.clip(x, 1e-10, 1 - 1e-10)
            if "dirichlet" in type(rv.owner.op).__name__.lower():
                x = x / x.sum(axis=-1, keepdims=True)
            val = np.asarray(tr.forward(x, *rv.owner.inputs).eval())
        point[vname] = val
    return point


def _draw_points(tree: xr.DataTree, model) -> list[dict[str, np.ndarray]]:
    """Every NUTS draw as a value-space point (from ``unconstrained_posterior``)."""
    uc = tree["unconstrained_posterior"].to_dataset()
    names = [model.rvs_to_values[rv].name for rv in model.free_RVs]
    stacked = {n: np.asarray(uc[n].stack(sample=("chain", "draw")).transpose("sample", ...).values) for n in names}
    n = next(iter(stacked.values())).shape[0]
    return [{k: v[s] for k, v in stacked.items()} for s in range(n)]


@dataclass
class ModeCheck:
    """Is the solver's point estimate the posterior mode?

    ``logp_mode`` is the log density at the mode found by L-BFGS from the
    best NUTS draw (NUTS finds the mode's basin, the optimiser its top): the
    best draw alone lies about half a nat per few parameters below the mode,
    too coarse to see an estimate a fraction of a nat off.
    """

    logp_point: float
    logp_mode: float
    logp_draws_max: float
    draws_above: int
    draws: int

    #: Nats by which the mode may exceed the estimate (the optimiser's and the
    #: solver's stopping errors are far below).
    TOL = 1e-3

    @property
    def gap(self) -> float:
        """log p(mode) - log p(point): about 0 (or below, for a mode on the boundary) when the point is the mode."""
        return self.logp_mode - self.logp_point

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.logp_point) and self.draws_above == 0 and self.gap <= self.TOL)

    def message(self) -> str:
        if self.passed:
            where = f"{self.gap:.2g} nats below" if self.gap >= 0 else f"{-self.gap:.2g} nats above"
            return f"the EM estimate is the posterior mode (log density {where} the optimised mode, no NUTS draw above it)"
        return (f"the EM estimate is NOT the posterior mode: its log density is {self.gap:.3g} nats below the mode; "
                f"{self.draws_above} of {self.draws} NUTS draws lie above it")


def _polish_mode(model, start: dict[str, np.ndarray]) -> float:
    """Largest log density (no Jacobian) reached by L-BFGS-B from ``start`` (value space)."""
    from scipy.optimize import minimize

    names = [v.name for v in model.value_vars]
    shapes = [np.shape(start[n]) for n in names]
    sizes = [int(np.prod(sh)) for sh in shapes]
    fn = model.compile_logp(jacobian=False)
    grad = model.compile_dlogp(jacobian=False)

    def point(x):
        out, i = {}, 0
        for n, sh, k in zip(names, shapes, sizes):
            out[n] = x[i:i + k].reshape(sh)
            i += k
        return out

    def f(x):
        p = point(x)
        v = float(fn(p))
        return (-v if np.isfinite(v) else 1e300), -np.asarray(grad(p), dtype=np.float64)

    x0 = np.concatenate([np.ravel(start[n]) for n in names])
    res = minimize(f, x0, jac=True, method="L-BFGS-B", options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-9})
    return max(-float(res.fun), float(fn(point(x0))))


def mode_check(model, point: dict[str, np.ndarray], tree: xr.DataTree) -> ModeCheck:
    """Compare log p(point | data) with log p at every NUTS draw and at the mode
    polished from the best draw (no Jacobian: the density whose mode EM finds)."""
    fn = model.compile_logp(jacobian=False)
    lp0 = float(fn(_value_point(model, point)))
    points = _draw_points(tree, model)
    lps = np.array([float(fn(p)) for p in points])
    tol = 1e-8 * max(1.0, abs(lp0))
    mode = _polish_mode(model, points[int(np.argmax(lps))])
    return ModeCheck(lp0, mode, float(lps.max()), int(np.sum(lps > lp0 + tol)), int(lps.size))


def khat_of_block(model, block, fixed_point: dict[str, np.ndarray]) -> float:
    """PSIS k-hat of q on a block against the posterior with the rest held fixed.

    ``block`` = (values, log_q, label) from
    :func:`bayesfuse.crosscheck_models.q_block`; log p is the PyMC model's
    log density on the value scale with the Jacobian (the density of the
    value variables, the scale q is defined on).
    """
    values, log_q, _ = block
    fn = model.compile_logp(jacobian=True)
    n = log_q.size
    lp = np.empty(n)
    for s in range(n):
        pt = dict(fixed_point)
        pt.update({k: v[s] for k, v in values.items()})
        lp[s] = float(fn(pt))
    return pareto_khat(lp - log_q)


# ---------------------------------------------------------------- results
@dataclass
class CrossCheck:
    """The outcome of :func:`run`: statistics, NUTS and solver trees, verdict."""

    method: str
    data_description: str
    criteria: Any
    health: Health
    summary: pd.DataFrame
    stats: dict[str, xr.Dataset]
    nuts: xr.DataTree
    result: Any
    q_draws: xr.DataTree | None
    mode: ModeCheck | None
    khat: float
    khat_label: str
    vb_seconds: float
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Why NUTS was not healthy, where the model can say (``Criteria.diagnose``; robust-t:
    #: ``T_modes``, :func:`bayesfuse.crosscheck_models.robust_t_modes`); written to ``/diagnostics``.
    diagnostics: dict[str, xr.Dataset] = field(default_factory=dict)

    @property
    def agreement(self) -> bool:
        """Every required criterion holds (regardless of NUTS's health)."""
        req = self.summary[self.summary["required"]]
        ok = bool(req["passed"].fillna(True).astype(bool).all())
        if self.mode is not None:
            ok &= self.mode.passed
        if self.criteria.khat_max is not None and np.isfinite(self.khat):
            ok &= self.khat <= self.criteria.khat_max
        elif self.criteria.khat_max is not None and self.khat == np.inf:
            ok = False
        return ok

    @property
    def passed(self) -> bool:
        """NUTS healthy and every criterion met."""
        return self.health.ok and self.agreement

    @property
    def exit_code(self) -> int:
        if not self.health.ok:
            return EXIT_UNHEALTHY
        return EXIT_PASS if self.agreement else EXIT_DISAGREE

    @property
    def compile_seconds(self) -> float:
        return float(self.nuts.attrs.get("compile_seconds", np.nan))

    @property
    def sample_seconds(self) -> float:
        return float(self.nuts.attrs.get("sample_seconds", np.nan))

    def verdict(self) -> str:
        """The short text ``bayesfuse check`` prints."""
        solver = "EM" if self.criteria.family == "em" else "VB"
        lines = [f"bayesfuse check: {self.method} on {self.data_description}", "  " + self.health.message()]
        lines.append(f"  {solver} {self.vb_seconds:.3g} s; NUTS {self.sample_seconds:.3g} s sampling "
                     f"(+ {self.compile_seconds:.3g} s compile{', cached' if self.nuts.attrs.get('compile_cached') else ''}); "
                     f"NUTS / {solver}: {self.sample_seconds / max(self.vb_seconds, 1e-9):.3g}x")
        for _, r in self.summary.iterrows():
            if r["variable"] == "mode":
                continue
            status = "pass" if r["passed"] is True or r["passed"] == 1 else ("n/a" if pd.isna(r["passed"]) else "FAIL")
            if not r["required"]:
                status = "reported"
            if r["compared"] == 0:
                what = "no element with spread in q (every estimate on the boundary, where the Laplace q is a point)" \
                    if r["where"] == "interior" else f"no {r['where']} element"
                lines.append(f"  {r['variable']}: {what}: n/a")
                continue
            share = "" if pd.isna(r["share_within"]) else f"{r['share_within']:.1%} of {r['compared']} {r['where']} within {r['within_sd']:g} sd, "
            lines.append(f"  {r['variable']}: {share}median |z| {r['z_abs_median']:.3g}, max |z| {r['z_abs_max']:.3g}, "
                         f"median sd ratio {r['sd_ratio_median']:.3g}, coverage {r['coverage_mean']:.3g}: {status}")
        if self.mode is not None:
            lines.append(f"  mode: {self.mode.message()}: {'pass' if self.mode.passed else 'FAIL'}")
        if np.isfinite(self.khat) or self.khat == np.inf:
            lim = self.criteria.khat_max
            ok = lim is None or self.khat <= lim
            lines.append(f"  k-hat {self.khat:.3g} ({self.khat_label})" + ("" if lim is None else f": {'pass' if ok else 'FAIL'} (<= {lim:g})"))
        elif self.khat_label:
            lines.append(f"  k-hat: {self.khat_label}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        multimodal = any("n_modes" in ds and bool((ds["n_modes"] >= 2).any()) for ds in self.diagnostics.values())
        if not self.health.ok and multimodal:
            lines.append("  VERDICT: NUTS is NOT healthy, so no agreement is claimed (the posterior has several modes "
                         "where the chains disagree, see the note: more draws do not help)")
        elif not self.health.ok:
            lines.append("  VERDICT: NUTS is NOT healthy, so no agreement is claimed (raise --draws/--tune, or see the worst variable)")
        elif self.agreement:
            lines.append(f"  VERDICT: PASS: the {solver} solver agrees with NUTS on every criterion")
        else:
            lines.append(f"  VERDICT: FAIL: the {solver} solver disagrees with NUTS (see the failed criteria)")
        return "\n".join(lines)

    # ------------------------------------------------------------- output
    def tree(self) -> xr.DataTree:
        """Both DataTrees and the per-element statistics, for ``crosscheck.nc``."""
        groups: dict[str, xr.Dataset] = {}
        for name in ("posterior", "sample_stats", "unconstrained_posterior"):
            if name in self.nuts.children:
                ds = self.nuts[name].to_dataset()
                groups[f"/nuts/{name}"] = ds[[v for v in ds.data_vars if ds[v].dtype != object]]
        if self.q_draws is not None:
            groups["/solver/posterior"] = self.q_draws["posterior"].to_dataset()
        for name in self.result.tree.children:
            groups[f"/solver/{name}"] = self.result.tree[name].to_dataset()
        for name, ds in self.stats.items():
            groups[f"/stats/{name}"] = ds
        for name, ds in self.diagnostics.items():
            groups[f"/diagnostics/{name}"] = ds
        root = xr.Dataset(attrs={
            "method": self.method, "data": self.data_description, "passed": int(self.passed),
            "nuts_healthy": int(self.health.ok), "verdict": self.verdict(), "solver_seconds": self.vb_seconds,
            "nuts_compile_seconds": self.compile_seconds, "nuts_sample_seconds": self.sample_seconds,
            "khat": float(self.khat), "criteria": self.criteria.reason,
            "solver_attrs": json.dumps({k: str(v) for k, v in self.result.tree.attrs.items()}),
        })
        return xr.DataTree.from_dict({"/": root, **groups})

    def write(self, out_dir: str | os.PathLike, force: bool = False) -> list[Path]:
        """Write :data:`OUTPUTS` into ``out_dir`` atomically (staged, then moved)."""
        from . import crosscheck_figures as figs
        from .io import write_staged
        from .result import write_tree

        def fill(stage: Path) -> None:
            self.summary.to_csv(stage / "summary.csv", index=False)
            write_tree(self.tree(), stage / "crosscheck.nc")
            figs.save_all(self, stage)

        return write_staged(out_dir, OUTPUTS, force, fill, prefix=".bayesfuse-check-")


# ------------------------------------------------------------ comparison
def _where_mask(rule, stats: xr.Dataset, masks: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean mask over the elements that the rule's share is taken over."""
    shape = stats["zscore"].shape
    if rule.where == "contested" and "contested" in masks:
        m = masks["contested"]
        return np.broadcast_to(m.reshape(m.shape + (1,) * (len(shape) - m.ndim)), shape)
    if rule.where == "interior":
        # q with spread; a point drawn repeatedly has sd ~ 1e-15 from rounding
        return np.asarray(stats["sd_q"].values > 1e-9 * np.maximum(1.0, np.abs(stats["mean_q"].values)))
    return np.ones(shape, dtype=bool)


def summary_row(rule, stats: xr.Dataset, mask: np.ndarray, health: Health, khat: float) -> dict:
    """One row of ``summary.csv`` for a compared variable."""
    z = np.abs(stats["zscore"].values)
    ratio = stats["sd_ratio"].values
    sel = mask & np.isfinite(ratio) if mask.any() else mask
    share = share_within(z, rule.within_sd, mask)
    med_ratio = float(np.median(ratio[sel])) if sel.any() else float("nan")
    passed: bool | float = True
    if not mask.any():
        passed = float("nan")  # nothing to compare (e.g. no contested voxel): neither pass nor fail
    else:
        if rule.share is not None and not share >= rule.share:
            passed = False
        if rule.sd_ratio is not None and not (rule.sd_ratio[0] <= med_ratio <= rule.sd_ratio[1]):
            passed = False
    h = health.per_variable.get(rule.variable, {})
    return {
        "variable": rule.variable, "elements": int(z.size), "compared": int(mask.sum()), "where": rule.where,
        "within_sd": rule.within_sd, "share_within": share, "share_within_all": share_within(z, rule.within_sd),
        "z_abs_median": float(np.median(z[mask])) if mask.any() else np.nan,
        "z_abs_max": float(np.max(z[mask])) if mask.any() else np.nan,
        "sd_ratio_median": med_ratio,
        "sd_ratio_min": float(np.min(ratio[sel])) if sel.any() else np.nan,
        "sd_ratio_max": float(np.max(ratio[sel])) if sel.any() else np.nan,
        "coverage_mean": float(np.mean(stats["coverage"].values[mask])) if mask.any() else np.nan,
        "wasserstein_median": float(np.median(stats["wasserstein"].values[mask])) if mask.any() else np.nan,
        "khat": khat, "rhat_max": h.get("rhat_max", np.nan), "ess_bulk_min": h.get("ess_bulk_min", np.nan),
        "ess_tail_min": h.get("ess_tail_min", np.nan), "mode_gap": np.nan, "criterion": rule.describe(),
        "required": bool(rule.required and (rule.share is not None or rule.sd_ratio is not None)), "passed": passed,
    }


def _point_draws(result, name: str, like: xr.DataArray, n: int) -> xr.DataArray:
    """A point estimate from the result as n identical 'draws' shaped like NUTS's."""
    for g in ("raters", "variational"):
        ds = result.group(g)
        if name in ds:
            da = ds[name]
            break
    else:
        raise KeyError(f"{result.method}: the result holds no estimate of {name!r} to compare with NUTS")
    dims = [d for d in like.dims if d not in ("chain", "draw")]
    da = da.transpose(*dims)
    vals = np.broadcast_to(np.asarray(da.values, dtype=np.float64), (1, n) + da.shape)
    return xr.DataArray(vals, dims=("chain", "draw", *dims), coords={d: like[d] for d in dims if d in like.coords})


def _describe(data, note: str) -> str:
    return f"{data.n_raters} raters, {'x'.join(map(str, data.shape))} voxels ({data.kind}{', ' + note if note else ''})"


def run(
    data,
    method: str,
    *,
    config=None,
    options: dict | None = None,
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    random_seed: int = 0,
    target_accept: float = 0.9,
    mass: float = 0.9,
    fit_kwargs: dict | None = None,
    note: str = "",
) -> CrossCheck:
    """Cross-check ``method``'s solver against NUTS on ``data``.

    Parameters
    ----------
    data : RaterMaps
        A problem small enough for NUTS (see
        :meth:`bayesfuse.data.RaterMaps.downsample`).
    method : str
        Registry name of a model with a PyMC form and declared criteria.
    config, options : optional
        The model's Config, or options for it.
    draws, tune, chains : int
        NUTS settings (nutpie).
    random_seed : int
        Seeds the solver, q's draws and NUTS.
    target_accept : float
        NUTS's target acceptance rate (0.9 rather than nutpie's 0.8: posteriors
        piled against a boundary of (0, 1), as STAPLE's often are on small
        problems, otherwise give the odd divergence).
    mass : float
        Mass of q's central interval whose NUTS coverage is reported.
    fit_kwargs : dict, optional
        ``max_iter``, ``tol`` for the solver.
    note : str
        How the data were made (shown in the verdict).

    Returns
    -------
    CrossCheck
    """
    from .calibration import contested_voxels
    from .crosscheck_models import align_components, criteria_for, label_posterior, point_estimate, q_block
    from .models import get_model

    spec = get_model(method)
    crit = criteria_for(method)
    mod = spec.load()
    config = config if config is not None else spec.config(**(options or {}))
    times = []
    # twice: the first fit includes numba's compilation of the solver's kernels
    for _ in range(2):
        t0 = time.perf_counter()
        result = mod.fit(data, config, random_seed=random_seed, method=method, progress=False, **(fit_kwargs or {}))
        times.append(time.perf_counter() - t0)
    vb_seconds = times[-1]
    fixed = mod.fixed_from_result(result)
    model = mod.build_model(data, config, hyper="fixed", fixed=fixed)
    # the same posterior, written for NUTS (e.g. robust-t's mean bias split off the common shift)
    nuts_model = mod.build_model(data, config, hyper="fixed", fixed=fixed, **crit.nuts_form) if crit.nuts_form else model
    tree = sample_nuts(nuts_model, draws=draws, tune=tune, chains=chains, random_seed=random_seed,
                       target_accept=target_accept, store_unconstrained=crit.mode or crit.khat_max is not None)
    post, notes = align_components(method, result, tree["posterior"].to_dataset())
    if notes:
        tree["posterior"] = xr.DataTree(post)
    health = nuts_health(tree)
    diagnostics: dict[str, xr.Dataset] = {}
    if not health.ok and crit.diagnose is not None:
        # why the chains disagree, measured where the model can say (robust-t: its per-voxel modes)
        diagnostics, more = crit.diagnose(data, config, result, fixed, post)
        notes = notes + more
    n_total = int(post.sizes["chain"] * post.sizes["draw"])
    q_tree = None
    draw_fn = getattr(mod, "posterior_draws", None)
    if draw_fn is None:
        notes.append(f"{method} has no posterior_draws (a point estimate): its point estimate is compared")
    else:
        try:
            q_tree = draw_fn(result, n=n_total, random_seed=random_seed)
        except NotImplementedError as exc:
            notes.append(f"no posterior draws from the solver ({exc}); its point estimate is compared")
    masks = {"contested": contested_voxels(data)}

    # k-hat of q on its block (the rest held at the point estimate)
    khat, khat_label, block_vars = float("nan"), "", set()
    block_khat: dict[str, float] = {}
    point = None
    if crit.family == "vb" and q_tree is not None:
        from .crosscheck_models import q_means, vb_blocks

        fixed_value = _value_point(model, q_means(result, q_tree["posterior"].to_dataset(), model))
        blocks = vb_blocks(method, result, model, fixed_value, min(n_total, 1000), random_seed)
        for blk in blocks:
            k = khat_of_block(model, (blk.values, blk.log_q, blk.label), fixed_value)
            block_khat[blk.variable] = max(block_khat.get(blk.variable, -np.inf), k)
        if block_khat:
            khat = max(block_khat.values())
            khat_label = "largest over blocks: " + ", ".join(f"{v} {k:.2f}" for v, k in block_khat.items()) + \
                " (each block against the posterior with the rest at q's means)"
    if crit.family == "em":
        point = point_estimate(method, result, model)
        block = q_block(method, result, model, n_total, random_seed)
        if block is None:
            khat_label = "no q density: the solver's result is a point estimate"
        else:
            khat = khat_of_block(model, block, _value_point(model, point))
            khat_label = block[2]
            block_vars = {rv.name for rv in model.free_RVs if model.rvs_to_values[rv].name in block[0]}

    stats: dict[str, xr.Dataset] = {}
    rows = []
    for rule in crit.rules:
        if rule.variable == "consensus" and crit.family == "em":
            w_n = label_posterior(method, data, config, result, post)
            w_q = result.probability.values
            sdims = result.spatial_dims
            if w_q.shape[-1] == 2:
                st = bernoulli_stats(w_q[..., 1], w_n[..., 1], sdims, mass)
            else:
                st = bernoulli_stats(w_q, w_n, sdims + ("class",), mass)
            row_khat = float("nan")
        elif rule.labels:
            # p(label | data): the solver's probabilities against the NUTS mean of the deterministic
            st = bernoulli_stats(_point_draws(result, rule.variable, post[rule.variable], 1).values[0, 0],
                                 post[rule.variable].mean(("chain", "draw")).values, post[rule.variable].dims[2:], mass)
            st = st.assign_coords({d: post[rule.variable][d] for d in st.dims if d in post[rule.variable].coords})
            row_khat = float("nan")
        else:
            nuts_da = post[rule.variable]
            if q_tree is not None and rule.variable in q_tree["posterior"]:
                q_da = q_tree["posterior"][rule.variable]
            else:
                q_da = _point_draws(result, rule.variable, nuts_da, n_total)
            st = element_stats(q_da, nuts_da, mass)
            row_khat = khat if rule.variable in block_vars else block_khat.get(rule.variable, float("nan"))
        stats[rule.variable] = st
        rows.append(summary_row(rule, st, _where_mask(rule, st, masks), health, row_khat))
    mode = None
    if crit.mode:
        mode = mode_check(model, point, tree)
        rows.append({c: np.nan for c in SUMMARY_COLUMNS} | {
            "variable": "mode", "elements": mode.draws, "compared": mode.draws, "where": "NUTS draws",
            "mode_gap": mode.gap, "criterion": f"log density of the EM estimate within {ModeCheck.TOL:g} nats of the "
            "posterior mode (L-BFGS from the best NUTS draw) and above every draw",
            "required": True, "passed": mode.passed})
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    return CrossCheck(method=method, data_description=_describe(data, note), criteria=crit, health=health,
                      summary=summary, stats=stats, nuts=tree, result=result, q_draws=q_tree, mode=mode,
                      khat=khat, khat_label=khat_label, vb_seconds=vb_seconds, masks=masks, notes=notes,
                      diagnostics=diagnostics)
