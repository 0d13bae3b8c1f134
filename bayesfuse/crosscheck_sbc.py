"""Simulation-based calibration of a model's solver (``bayesfuse check --sbc N``).

For each of N simulations: draw the parameters from the PyMC model's prior,
draw data from the model's generative story given them (the module's
``simulate``), fit the closed-form solver, and record where each true value
falls among draws from q (the PIT, "VSBC": Yao et al. 2018) and, with
``nuts=True``, among NUTS draws of the PyMC model (Talts et al. 2018). If q
is the posterior, every PIT is uniform over the simulations; a solver that
is biased or overconfident piles the PITs at the ends (or the middle, if
underconfident). Uniformity is tested with arviz-stats' ``pot_c`` test and
drawn as ECDF-of-PIT difference plots by arviz-plots.

Which parameters are drawn from the prior: the free variables of the PyMC
model that ``simulate`` accepts as keyword arguments (STAPLE: sensitivity
and specificity); ``simulate`` draws the rest of the story (the labels).
The prior is the Config's, with the model's ``sbc_options``
(:mod:`bayesfuse.crosscheck_models`: raters better than chance for the
STAPLE family, so that the mirror mode of a flat prior does not turn the
SBC into a test of label switching).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from .errors import ConfigError

#: Files :meth:`SBC.write` produces.
OUTPUTS = ("sbc.csv", "sbc.nc", "sbc_ecdf_pit.png")

#: Family-wise level of the uniformity tests (Bonferroni over every parameter).
ALPHA = 0.01


def pit(draws: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Share of draws below the truth, ties split at random: (S, *shape), (*shape) -> (*shape).

    Uniform on [0, 1] over simulations when the draws come from the
    posterior; a q that is a point (a boundary estimate) gives 0 or 1.
    """
    d = np.asarray(draws, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)[None]
    below = (d < t).mean(axis=0)
    ties = (d == t).mean(axis=0)
    return below + ties * rng.random(below.shape)


@dataclass
class SBC:
    """PIT values per simulation and their uniformity tests."""

    method: str
    pits: xr.Dataset          # variables (chain=1, draw=simulation, *dims); "<name>_nuts" for NUTS
    table: pd.DataFrame       # one row per variable element: p-value, mean PIT, share in the tails
    options: dict

    @property
    def threshold(self) -> float:
        return ALPHA / max(len(self.table), 1)

    @property
    def passed(self) -> bool:
        return bool((self.table["p_value"] >= self.threshold).all())

    def verdict(self) -> str:
        n = int(self.pits.sizes["draw"])
        lines = [f"bayesfuse check --sbc: {self.method}, {n} simulations from the prior ({self.options or 'Config defaults'})"]
        for var, g in self.table.groupby("variable", sort=False):
            lines.append(f"  {var}: min p {g['p_value'].min():.3g} over {len(g)} elements, "
                         f"mean PIT {g['mean_pit'].mean():.3f}, share of PITs outside [0.05, 0.95] {g['tails'].mean():.3f} (0.10 if uniform)")
        lines.append(f"  VERDICT: {'PASS' if self.passed else 'FAIL'}: uniformity (pot_c) "
                     f"{'not rejected' if self.passed else 'rejected'} at {ALPHA:g} family-wise (p >= {self.threshold:.2g} for each)")
        return "\n".join(lines)

    def figure(self):
        from arviz_plots import plot_ecdf_pit

        from .figures import _plt

        _plt()
        tree = xr.DataTree.from_dict({"/prior_sbc": self.pits})
        n = sum(int(np.prod(da.shape[2:])) for da in self.pits.data_vars.values())
        rows = -(-n // 4)
        return plot_ecdf_pit(tree, group="prior_sbc", backend="matplotlib", col_wrap=4,
                             figure_kwargs={"figsize": (3.2 * min(n, 4), 2.8 * rows), "layout": "constrained"})

    def write(self, out_dir, force: bool = False) -> list[Path]:
        from .io import write_staged
        from .figures import _plt
        from .result import write_tree

        def fill(stage: Path) -> None:
            self.table.to_csv(stage / "sbc.csv", index=False)
            write_tree(xr.DataTree.from_dict({"/prior_sbc": self.pits}), stage / "sbc.nc")
            self.figure().savefig(stage / "sbc_ecdf_pit.png", dpi=90)
            _plt().close("all")

        return write_staged(out_dir, OUTPUTS, force, fill, prefix=".bayesfuse-check-")


def _stack(da: xr.DataArray) -> np.ndarray:
    return np.asarray(da.stack(sample=("chain", "draw")).transpose("sample", ...).values, dtype=np.float64)


def run(method: str, *, n_sims: int = 50, shape=(12, 12, 8), n_raters: int = 4, options: dict | None = None,
        random_seed: int = 0, q_draws: int = 1000, nuts: bool = False, draws: int = 500, tune: int = 500,
        chains: int = 4) -> SBC:
    """Simulation-based calibration of ``method``'s solver (and, with ``nuts``, of NUTS).

    Parameters
    ----------
    method : str
        Registry name; its module needs ``simulate`` and ``posterior_draws``.
    n_sims : int
        Simulations.
    shape, n_raters
        Size of each simulated case.
    options : dict, optional
        Config options on top of the model's ``sbc_options``.
    q_draws : int
        Draws from q per simulation.
    nuts, draws, tune, chains
        Also rank the truth among NUTS draws (compiles when the model's
        shapes change between simulations: slow).
    """
    import arviz_stats  # noqa: F401  (registers the .azstats accessor)
    import pymc as pm

    from . import crosscheck
    from .crosscheck_models import criteria_for
    from .models import get_model

    spec = get_model(method)
    crit = criteria_for(method)
    mod = spec.load()
    opts = {**crit.sbc_options, **(options or {})}
    config = spec.config(**opts)
    if not hasattr(mod, "simulate") or not hasattr(mod, "posterior_draws"):
        raise ConfigError(f"{method}: SBC needs the model's generative story (simulate) and draws from q (posterior_draws)")
    accepted = set(inspect.signature(mod.simulate).parameters)
    seeds = np.random.SeedSequence(random_seed).spawn(int(n_sims))
    template = None
    names: list[str] = []
    pits: dict[str, list] = {}
    coords: dict[str, dict] = {}
    for i, ss in enumerate(seeds):
        seed = int(ss.generate_state(1)[0])
        rng = np.random.default_rng(ss)
        if template is None:
            data0, _ = mod.simulate(config, shape=tuple(shape), n_raters=n_raters, random_seed=seed)
            res0 = mod.fit(data0, config, random_seed=seed, method=method, progress=False)
            template = mod.build_model(data0, config, hyper="fixed", fixed=mod.fixed_from_result(res0))
            names = [rv.name for rv in template.free_RVs if rv.name in accepted]
            if not names:
                raise ConfigError(f"{method}: simulate() takes none of the PyMC model's free variables; nothing to calibrate")
        truth = dict(zip(names, (np.asarray(v) for v in pm.draw([template[n] for n in names], random_seed=seed))))
        data, _ = mod.simulate(config, shape=tuple(shape), n_raters=n_raters, random_seed=seed, **truth)
        result = mod.fit(data, config, random_seed=seed, method=method, progress=False)
        try:
            q = mod.posterior_draws(result, n=q_draws, random_seed=seed)["posterior"]
        except NotImplementedError as exc:
            raise ConfigError(f"{method}: SBC needs draws from q: {exc}") from None
        post = None
        if nuts:
            model = mod.build_model(data, config, hyper="fixed", fixed=mod.fixed_from_result(result))
            post = crosscheck.sample_nuts(model, draws=draws, tune=tune, chains=chains, random_seed=seed)["posterior"]
        for n in names:
            pits.setdefault(n, []).append(pit(_stack(q[n]), truth[n], rng))
            coords[n] = {d: q[n][d].values for d in q[n].dims if d not in ("chain", "draw") and d in q[n].coords}
            if post is not None:
                pits.setdefault(f"{n}_nuts", []).append(pit(_stack(post[n]), truth[n], rng))
                coords[f"{n}_nuts"] = coords[n]
    ds = xr.Dataset()
    for n, vals in pits.items():
        base = n.removesuffix("_nuts")
        dims = [d for d in q[base].dims if d not in ("chain", "draw")]
        ds[n] = xr.DataArray(np.stack(vals)[None], dims=("chain", "draw", *dims), coords=coords[n])
    p_values = ds.azstats.uniformity_test(dim=["chain", "draw"], method="pot_c")[0]
    rows = []
    for n in ds.data_vars:
        a = ds[n].values.reshape(ds.sizes["draw"], -1)
        pv = np.asarray(p_values[n].values).reshape(-1)
        labels = [",".join(map(str, idx)) for idx in np.ndindex(ds[n].shape[2:])] or [""]
        if ds[n].ndim > 2 and ds[n].dims[2] in ds[n].coords:
            labels = [str(c) for c in ds[n][ds[n].dims[2]].values] if ds[n].ndim == 3 else labels
        for e in range(a.shape[1]):
            rows.append({"variable": n, "element": labels[e], "p_value": float(pv[e]), "mean_pit": float(a[:, e].mean()),
                         "tails": float(np.mean((a[:, e] < 0.05) | (a[:, e] > 0.95)))})
    return SBC(method=method, pits=ds, table=pd.DataFrame(rows), options=opts)
