"""Calibration of the per-voxel credible intervals, measured on phantoms drawn
from each model's own generative story.

For a model with a ``simulate(config, shape, n_raters, random_seed)`` (the
model contract), :func:`calibrate` draws data with known truth, fits the
closed-form solver (VB or EM), computes the per-voxel central intervals of
:mod:`bayesfuse.summaries`, and counts the share of voxels whose true value
lies inside (*coverage*). A calibrated posterior covers about ``mass`` of the
truths. :func:`calibrate_nuts` does the same with NUTS on a small problem, the
reference the closed-form solver is judged against.

What "the true value" is follows the summaries' quantity:

- Gaussian q in link space (robust-t family): the true consensus probability
  T[n] of the simulation (``truth["probability"]``, (*spatial) foreground or
  (*spatial, K));
- label posterior (STAPLE family): the true label's indicator 1[x_n = k]
  (``truth["truth"]`` or ``truth["labels"]``).

Coverage is reported over all voxels and over the *contested* ones, where the
raters' hard labels are not unanimous: far from the structure every
interval covers its truth trivially, and the contested voxels are where the
intervals say something.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .errors import ConfigError

#: Columns of the tables :func:`calibrate` and :func:`calibrate_nuts` return.
COLUMNS = ("method", "solver", "rep", "mass", "voxels", "coverage", "contested", "coverage_contested",
           "mean_width_contested", "calibration_error", "quantity")

#: Bins of the reliability diagram behind :func:`calibration_error`.
N_BINS = 10


def coverage(lo: np.ndarray, hi: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> float:
    """Share of the values ``truth`` that lie in ``[lo, hi]`` (optionally only ``where``).

    The bounds are compared with a tolerance of 1e-6, the float32 storage
    error of the summaries, so that a truth of exactly 0 or 1 at an interval
    end counts as inside.
    """
    lo, hi, truth = (np.asarray(a, dtype=np.float64) for a in (lo, hi, truth))
    inside = (truth >= lo - 1e-6) & (truth <= hi + 1e-6)
    if where is not None:
        inside = inside[np.broadcast_to(where, inside.shape)]
    return float(inside.mean()) if inside.size else float("nan")


def calibration_error(prob: np.ndarray, outcome: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error of predicted probabilities against 0/1 outcomes.

    The predictions are binned into ``n_bins`` equal-width bins; the error is
    the voxel-weighted mean over bins of |mean prediction - observed
    frequency|. 0 for a perfectly calibrated label posterior; it says what
    the conservative {0, 1} intervals of a label indicator cannot.
    """
    p = np.asarray(prob, dtype=np.float64).ravel()
    y = np.asarray(outcome, dtype=np.float64).ravel()
    if p.size == 0:
        return float("nan")
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    n = np.bincount(idx, minlength=n_bins)
    sp = np.bincount(idx, weights=p, minlength=n_bins)
    sy = np.bincount(idx, weights=y, minlength=n_bins)
    used = n > 0
    return float(np.sum(np.abs(sp[used] - sy[used])) / p.size)


def contested_voxels(data) -> np.ndarray:
    """Voxels (spatial shape) where the raters' hard labels are not unanimous."""
    lab = data.labels()
    return np.any(lab != lab[:1], axis=0)


def true_quantity(truth: dict, n_classes: int, posterior: str) -> np.ndarray:
    """The simulation's truth of the summaries' quantity, as (*spatial) for K = 2
    (the foreground) or (*spatial, K).

    Parameters
    ----------
    truth : dict
        The second return value of a model's ``simulate``.
    n_classes : int
    posterior : {"gaussian", "categorical"}
        The summaries' posterior kind (:func:`bayesfuse.summaries.posterior_kind`).
    """
    if posterior == "gaussian":
        if "probability" not in truth:
            raise KeyError("the simulation gives no true probability map (truth['probability'])")
        t = np.asarray(truth["probability"], dtype=np.float64)
        if n_classes == 2 and t.ndim and t.shape[-1] == 2:
            t = t[..., 1]
        return t
    labels = truth.get("truth", truth.get("labels"))
    if labels is None:
        raise KeyError("the simulation gives no true labels (truth['truth'] or truth['labels'])")
    labels = np.asarray(labels)
    if n_classes == 2:
        return (labels == 1).astype(np.float64)
    return (labels[..., None] == np.arange(n_classes)).astype(np.float64)


@dataclass(frozen=True)
class Problem:
    """One simulated case: the raters, the truth of the quantity, the contested voxels."""

    data: Any
    truth: np.ndarray
    contested: np.ndarray


def fit_simulated(method: str, data, truth: dict, config, seed, fit_kwargs: dict | None = None):
    """Fit the closed-form solver to a simulation, on exactly what the story drew.

    A Gaussian model whose simulation returns its link coordinates
    (``truth["coords"]``, (P, N, D)) is fitted on them: mapping D~ to the
    simplex and back loses the sqrt link's sign and norm, so fitting the
    probability maps would fit data the story did not draw (with the sqrt
    link its coverage falls to about 0.5 that way). This uses the module's
    solver pieces ``make_problem``, ``solve`` and ``_build_result`` (robust-t
    family); other models are fitted with ``fit`` on the maps.
    """
    from . import gaussian as G
    from .models import get_model

    mod = get_model(method).load()
    kw = dict(fit_kwargs or {})
    pieces = all(hasattr(mod, f) for f in ("make_problem", "solve", "_build_result"))
    if "coords" in truth and pieces and data.roi() is None:
        space = G.link_space(config.link, data.n_classes)
        kd = G.from_coords(np.asarray(truth["coords"]), space)
        prob = mod.make_problem(kd, config, data.shape, None, data.spacing)
        st, converged, reason = mod.solve(prob, config, max_iter=kw.get("max_iter", 200), tol=kw.get("tol", 1e-6), progress=False, label=method)
        return mod._build_result(data, config, prob, ("all",), st, converged, reason, method, 0.0), "link coordinates"
    return mod.fit(data, config, random_seed=seed, method=method, progress=False, **kw), "probability maps"


def simulate(method: str, config, shape, n_raters, seed) -> tuple[Any, dict]:
    """Data and truth from the model's own ``simulate`` (the model contract)."""
    from .models import get_model

    mod = get_model(method).load()
    if not hasattr(mod, "simulate"):
        raise NotImplementedError(f"{method}: the model has no simulate(); its calibration cannot be measured")
    return mod.simulate(config, shape=tuple(shape), n_raters=n_raters, random_seed=seed)


def _row(method, solver, rep, mass, prob: Problem, lo, hi, quantity, mean=None) -> dict:
    """One table row; ``mean`` (a label posterior) adds the calibration error."""
    c = prob.contested
    width = np.asarray(hi, dtype=np.float64) - np.asarray(lo, dtype=np.float64)
    cw = width[np.broadcast_to(c if width.ndim == c.ndim else c[..., None], width.shape)]
    return {
        "method": method, "solver": solver, "rep": rep, "mass": mass,
        "voxels": int(c.size), "coverage": coverage(lo, hi, prob.truth),
        "contested": int(c.sum()),
        "coverage_contested": coverage(lo, hi, prob.truth, c if width.ndim == c.ndim else c[..., None]),
        "mean_width_contested": float(cw.mean()) if cw.size else float("nan"),
        "calibration_error": float("nan") if mean is None else calibration_error(
            np.asarray(mean)[np.broadcast_to(c if np.ndim(mean) == c.ndim else c[..., None], np.shape(mean))],
            prob.truth[np.broadcast_to(c if prob.truth.ndim == c.ndim else c[..., None], prob.truth.shape)]),
        "quantity": quantity,
    }


def calibrate(
    method: str,
    *,
    n_reps: int = 3,
    shape: Sequence[int] = (32, 32, 24),
    n_raters: int = 5,
    mass: float = 0.9,
    random_seed: int = 0,
    options: dict | None = None,
    fit_kwargs: dict | None = None,
) -> pd.DataFrame:
    """Coverage of the closed-form solver's intervals on the model's own phantoms.

    Parameters
    ----------
    method : str
        A registry name whose module has ``simulate``.
    n_reps : int
        Independent simulations (seeds ``random_seed + rep``).
    shape, n_raters : optional
        Size of each simulated case.
    mass : float
        Credible mass of the intervals.
    options : dict, optional
        Config options of the method (also passed to ``simulate``).
    fit_kwargs : dict, optional
        ``max_iter``, ``tol``, ... for ``fit``.

    Returns
    -------
    pandas.DataFrame
        One row per repetition with the columns of :data:`COLUMNS`.
    """
    from . import summaries
    from .models import get_model

    mass = summaries.check_mass(mass)
    spec = get_model(method)
    config = spec.config(**(options or {}))
    rows = []
    for rep in range(int(n_reps)):
        seed = int(random_seed) + rep
        data, truth = simulate(method, config, shape, n_raters, seed)
        result, fitted_on = fit_simulated(method, data, truth, config, seed, fit_kwargs)
        kind = summaries.posterior_kind(result)
        if kind == "none":
            raise NotImplementedError(f"{method}: a rule without a posterior has no intervals to calibrate")
        prob = Problem(data, true_quantity(truth, data.n_classes, kind), contested_voxels(data))
        s = summaries.summarize(result, mass, random_seed=seed)
        solver = "VB" if kind == "gaussian" else "EM"
        mean = result.consensus.values if kind == "categorical" else None
        rows.append(_row(method, solver, rep, mass, prob, s["consensus_lo"].values, s["consensus_hi"].values,
                         f"{s.attrs['quantity']}; fitted on the simulated {fitted_on}", mean))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def sample_nuts(model, *, draws: int = 300, tune: int = 300, chains: int = 2, random_seed=0):
    """NUTS draws (nutpie) of a PyMC model, as a DataTree with a ``posterior`` group.

    The cross-check's runner (:func:`bayesfuse.crosscheck.sample_nuts`: one
    NUTS runner for the project, compiled models cached by structure).
    """
    from .crosscheck import sample_nuts as run

    return run(model, draws=draws, tune=tune, chains=chains, random_seed=random_seed)


def _confusion_draws(post) -> np.ndarray:
    """Confusion matrices (S, P, K, K) of the draws: ``confusion`` or sensitivity/specificity."""
    if "confusion" in post:
        c = post["confusion"].stack(sample=("chain", "draw")).transpose("sample", ...).values
        return np.asarray(c, dtype=np.float64)
    sens = post["sensitivity"].stack(sample=("chain", "draw")).transpose("sample", "rater").values
    spec = post["specificity"].stack(sample=("chain", "draw")).transpose("sample", "rater").values
    theta = np.empty(sens.shape + (2, 2))
    theta[..., 0, 0], theta[..., 0, 1] = spec, 1 - spec
    theta[..., 1, 0], theta[..., 1, 1] = 1 - sens, sens
    return theta


def label_posterior_from_draws(method: str, data, config, post, prior) -> np.ndarray:
    """p(x_n = k | data), averaged over the draws of the rater parameters, (*spatial, K).

    With the true class marginalised, NUTS samples the rater parameters only;
    the label posterior is then E_theta[w_n(theta)], each w_n(theta) given by
    the model's own E-step on its pattern table (``pattern_data``,
    ``e_step``; the STAPLE family).
    """
    from . import patterns as pat
    from .models import get_model

    mod = get_model(method).load()
    if not (hasattr(mod, "pattern_data") and hasattr(mod, "e_step")):
        raise NotImplementedError(f"{method}: no E-step on a pattern table to turn rater draws into a label posterior")
    pd_ = mod.pattern_data(data, config)
    theta = _confusion_draws(post)
    acc = np.zeros((pd_.values.shape[1], pd_.n_classes))
    for t in theta:
        resp, _ = mod.e_step(pd_.values, t, np.asarray(prior, dtype=np.float64))
        acc += resp
    return pat.expand(pd_.patterns, acc / theta.shape[0], data.shape, data.roi(), background=0)


def calibrate_nuts(
    method: str,
    *,
    n_reps: int = 1,
    shape: Sequence[int] = (8, 8, 4),
    n_raters: int = 5,
    mass: float = 0.9,
    random_seed: int = 0,
    options: dict | None = None,
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    pin: str = "estimates",
) -> pd.DataFrame:
    """Coverage of NUTS' intervals on small simulations from the model's own story.

    The PyMC model (``build_model(hyper="fixed")``, hyperparameters pinned at
    the closed-form solver's estimates, as in the cross-check) is sampled
    with nutpie (4 chains x 1000 draws by default: with 2 x 300 the per-voxel
    T of robust-t has r_hat up to 1.16 and an ESS of 10, and the intervals
    come out too narrow); per voxel, the central interval of the drawn quantity
    (T = F^-1(T~) for the Gaussian models, the label indicator from the
    draw-averaged label posterior for the STAPLE family) is compared with the
    truth, as :func:`calibrate` does for the closed-form solver.

    ``pin="truth"`` pins the hyperparameters at the values the simulation
    drew with instead (where the simulation returns them under the names of
    ``fixed_from_result``): then, averaged over repetitions, the coverage of
    an exact posterior is the nominal mass, which separates the sampler and
    the model from the error of the point estimates.
    """
    from . import summaries
    from .models import get_model

    mass = summaries.check_mass(mass)
    spec = get_model(method)
    mod = spec.load()
    config = spec.config(**(options or {}))
    rows = []
    for rep in range(int(n_reps)):
        seed = int(random_seed) + rep
        data, truth = simulate(method, config, shape, n_raters, seed)
        result = mod.fit(data, config, random_seed=seed, method=method, progress=False)
        kind = summaries.posterior_kind(result)
        fixed = mod.fixed_from_result(result)
        if pin == "truth":
            fixed = {k: (truth[k] if k in truth else v) for k, v in fixed.items()}
        elif pin != "estimates":
            raise ConfigError(f"pin must be 'estimates' or 'truth', not {pin!r}")
        tree = sample_nuts(mod.build_model(data, config, hyper="fixed", fixed=fixed), draws=draws, tune=tune,
                           chains=chains, random_seed=seed)
        post = tree["posterior"].to_dataset()
        prob = Problem(data, true_quantity(truth, data.n_classes, kind), contested_voxels(data))
        if kind == "gaussian":
            lo, hi, mean = _gaussian_nuts_interval(mod, result, post, mass)
        else:
            prior = fixed.get("prior", result.group("variational").get("prior"))
            w = label_posterior_from_draws(method, data, config, post, np.asarray(prior))
            s = summaries.categorical_summaries(w, mass)
            k = data.n_classes
            lo, hi = (s[n][..., 1] if k == 2 else s[n] for n in ("consensus_lo", "consensus_hi"))
            mean = w[..., 1] if k == 2 else w
        rows.append(_row(method, "NUTS" if pin == "estimates" else "NUTS (true hyperparameters)", rep, mass, prob, lo, hi,
                         f"as the closed-form solver's; hyperparameters pinned at the {'solver' if pin == 'estimates' else 'simulation'}'s",
                         mean if kind != "gaussian" else None))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _gaussian_nuts_interval(mod, result, post, mass):
    """Central interval and mean of T = F^-1(T~) from NUTS draws of ``T`` (link coordinates).

    The PyMC forms of the Gaussian models name the consensus in link space
    ``T`` with dims (*spatial, class) (the ``class`` dim holding the link's
    D coordinates); the draws go through the link's inverse one by one.
    """
    from .gaussian import link_space
    from .summaries import _link_name

    if "T" not in post:
        raise NotImplementedError(f"{result.method}: the PyMC model has no variable T (the consensus in link space)")
    sdims = result.spatial_dims
    T = post["T"].stack(sample=("chain", "draw")).transpose("sample", *sdims, ...).values
    space = link_space(_link_name(result), result.n_classes)
    p = space.inverse(T)  # (S, *spatial, K)
    if result.n_classes == 2:
        p = p[..., 1]
    a = (1 - mass) / 2
    lo, hi = np.quantile(p, [a, 1 - a], axis=0)
    return lo, hi, p.mean(axis=0)


def summary_table(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean coverage per method and solver over repetitions (for the model cards)."""
    df = pd.concat(list(frames), ignore_index=True)
    if df.empty:
        raise ConfigError("no calibration rows to summarise")
    g = df.groupby(["method", "solver", "mass"], sort=False)
    out = g.agg(reps=("rep", "count"), voxels=("voxels", "mean"), coverage=("coverage", "mean"),
                contested=("contested", "mean"), coverage_contested=("coverage_contested", "mean"),
                coverage_contested_min=("coverage_contested", "min"), coverage_contested_max=("coverage_contested", "max"),
                mean_width_contested=("mean_width_contested", "mean"), calibration_error=("calibration_error", "mean"))
    return out.reset_index()


def markdown(table: pd.DataFrame) -> str:
    """A summary table as Markdown (the model cards' calibration section)."""
    head = ["method", "solver", "mass", "reps", "voxels", "coverage (all)", "contested voxels",
            "coverage (contested)", "range over reps (contested)", "mean width (contested)", "calibration error (contested)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['method']} | {r['solver']} | {r['mass']:g} | {int(r['reps'])} | {int(r['voxels'])} | "
            f"{r['coverage']:.3f} | {int(round(r['contested']))} | {r['coverage_contested']:.3f} | "
            f"{r['coverage_contested_min']:.3f}-{r['coverage_contested_max']:.3f} | {r['mean_width_contested']:.3f} | "
            f"{'-' if np.isnan(r['calibration_error']) else format(r['calibration_error'], '.3f')} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bayesfuse.calibration METHOD [...]``: print the cards' calibration tables."""
    import argparse

    from .commands.common import parse_pairs

    p = argparse.ArgumentParser(prog="python -m bayesfuse.calibration", description=main.__doc__)
    p.add_argument("methods", nargs="+")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shape", type=int, nargs="+", default=[32, 32, 24])
    p.add_argument("--raters", type=int, default=5)
    p.add_argument("--mass", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opt", "-o", action="append", default=[], metavar="KEY=VALUE", help="model option for every method")
    p.add_argument("--nuts", action="store_true", help="also NUTS on a small problem (calibrate_nuts)")
    p.add_argument("--nuts-shape", type=int, nargs="+", default=[8, 8, 4])
    p.add_argument("--pin", nargs="+", default=["estimates"], choices=["estimates", "truth"],
                   help="NUTS: hyperparameters pinned at the solver's estimates and/or the simulation's values")
    args = p.parse_args(argv)
    options = parse_pairs(args.opt, "--opt")
    frames = []
    for m in args.methods:
        frames.append(calibrate(m, n_reps=args.reps, shape=args.shape, n_raters=args.raters, mass=args.mass,
                                random_seed=args.seed, options=options))
        for pin in args.pin if args.nuts else []:
            frames.append(calibrate_nuts(m, n_reps=args.reps, shape=args.nuts_shape, n_raters=args.raters,
                                         mass=args.mass, random_seed=args.seed, options=options, pin=pin))
    print(markdown(summary_table(frames)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
